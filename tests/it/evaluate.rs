//! `her2map evaluate` against reference implementations: synthetic results
//! and labels with a known seed, the statistics recomputed by
//! scripts/evaluate_reference.py (scikit-learn, MLstatkit's DeLong interval
//! and paired test, statsmodels' Wilson interval) and
//! compared within 1e-9; the bootstrap is checked for reproducibility.

use std::path::{Path, PathBuf};
use std::process::Command;

use rand::{Rng, SeedableRng};

const TOL: f64 = 1e-9;

fn her2map() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_her2map"));
    c.env("HER2MAP__LOG__LEVEL", "warn").env_remove("RUST_LOG");
    c
}

fn evaluate(args: &[&str]) -> serde_json::Value {
    let out = her2map()
        .arg("evaluate")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

fn reference(args: &[&str]) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/evaluate_reference.py");
    let out = Command::new("python3")
        .arg(&script)
        .args(args)
        .output()
        .expect("python3 must be installed (the reference implementations run on it)");
    assert!(
        out.status.success(),
        "the reference script failed — it needs `python3 -m pip install scikit-learn \
         MLstatkit statsmodels` (see .ci/run):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Synthetic results (probabilities rounded to 2 decimals: many ties) and
/// labels: `her2` for most patients, `ihc`/`ish` for some, one equivocal
/// without ISH, one unlabelled, failed cases; a site column.
fn write_data(dir: &Path, seed: u64) -> (PathBuf, PathBuf, PathBuf) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let head = "case_id,patient_key,patient_id,accession_numbers,study_dates,instances,lesion_side,modalities_used,modalities_missing,prob,prob_mg,prob_us,prob_mri,status,threshold,weights_sha256,inputs_sha256,error\n";
    let (mut res, mut other, mut labels) = (
        head.to_string(),
        head.to_string(),
        "patient_id,her2,ihc,ish,site\n".to_string(),
    );
    let combos = ["US+MR+MG", "US+MG", "MG"];
    for i in 0..150 {
        let positive = rng.random_bool(0.35);
        let noise: f64 = rng.random_range(-1.0..1.0) + rng.random_range(-1.0..1.0);
        let p = (1.0 / (1.0 + (-(1.3 * f64::from(u8::from(positive)) - 0.7 + noise)).exp())
            * 100.0)
            .round()
            / 100.0;
        let q = ((p + rng.random_range(-0.25..0.25)).clamp(0.0, 1.0) * 1000.0).round() / 1000.0;
        let combo = combos[i % 3];
        let error = if i % 37 == 5 {
            "no usable modality: truncated"
        } else {
            ""
        };
        let (pp, qq) = if error.is_empty() {
            (format!("{p}"), format!("{q}"))
        } else {
            (String::new(), String::new())
        };
        for (out, v) in [(&mut res, &pp), (&mut other, &qq)] {
            out.push_str(&format!("c{i:04},k{i},P{i},A{i},20240101-20240101,9,R,{combo},,{v},,,,negative,0.5,w,d,{error}\n"));
        }
        if i == 7 {
            continue; // no label row
        }
        let site = ["north", "south"][i % 2];
        let (her2, ihc, ish) = match i % 10 {
            0 => ("", if positive { "3+" } else { "1+" }, ""),
            1 => ("", "2+", if positive { "positive" } else { "negative" }),
            2 if i == 12 => ("", "2+", ""), // equivocal, no ISH: no label
            _ => (if positive { "positive" } else { "negative" }, "", ""),
        };
        labels.push_str(&format!("P{i},{her2},{ihc},{ish},{site}\n"));
    }
    labels.push_str("P999,positive,,,north\n"); // a label without a result
    let paths = (
        dir.join("results.csv"),
        dir.join("labels.csv"),
        dir.join("other.csv"),
    );
    std::fs::write(&paths.0, res).unwrap();
    std::fs::write(&paths.1, labels).unwrap();
    std::fs::write(&paths.2, other).unwrap();
    paths
}

fn close(a: &serde_json::Value, b: &serde_json::Value, what: &str) {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => assert!((x - y).abs() <= TOL, "{what}: {x} vs reference {y}"),
        _ => assert_eq!(a, b, "{what}"),
    }
}

fn same_stats(ours: &serde_json::Value, theirs: &serde_json::Value, what: &str) {
    for k in [
        "n",
        "positives",
        "negatives",
        "tp",
        "fp",
        "tn",
        "fn",
        "auroc",
        "brier",
        "sensitivity",
        "specificity",
        "ppv",
        "npv",
    ] {
        close(&ours[k], &theirs[k], &format!("{what}.{k}"));
    }
    for k in [
        "sensitivity_ci",
        "specificity_ci",
        "ppv_ci",
        "npv_ci",
        "auroc_ci",
    ] {
        if theirs[k].is_null() {
            assert!(ours[k].is_null(), "{what}.{k}");
            continue;
        }
        for i in 0..2 {
            close(&ours[k][i], &theirs[k][i], &format!("{what}.{k}[{i}]"));
        }
    }
    if theirs["auroc"].is_null() {
        return;
    }
    close(
        &ours["auroc"],
        &theirs["auroc_delong"],
        &format!("{what}.auroc (DeLong's)"),
    );
    for k in ["youden", "target_sensitivity"] {
        for f in ["threshold", "sensitivity", "specificity"] {
            close(&ours[k][f], &theirs[k][f], &format!("{what}.{k}.{f}"));
        }
    }
    let roc = ours["roc"].as_array().unwrap();
    let theirs_roc = theirs["roc"].as_array().unwrap();
    assert_eq!(roc.len(), theirs_roc.len(), "{what}: ROC points");
    for (i, (a, b)) in roc.iter().zip(theirs_roc).enumerate() {
        close(
            &a["threshold"],
            &b[0],
            &format!("{what}.roc[{i}].threshold"),
        );
        close(&a["fpr"], &b[1], &format!("{what}.roc[{i}].fpr"));
        close(&a["tpr"], &b[2], &format!("{what}.roc[{i}].tpr"));
    }
    // calibration_curve leaves out empty bins.
    let bins: Vec<&serde_json::Value> = ours["calibration"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["n"].as_u64() > Some(0))
        .collect();
    let refs = theirs["calibration"].as_array().unwrap();
    assert_eq!(bins.len(), refs.len(), "{what}: calibration bins");
    for (b, r) in bins.iter().zip(refs) {
        close(
            &b["mean_predicted"],
            &r[0],
            &format!("{what}.calibration mean"),
        );
        close(
            &b["fraction_positive"],
            &r[1],
            &format!("{what}.calibration fraction"),
        );
    }
}

#[test]
fn statistics_match_the_reference_implementations() {
    let tmp = tempfile::tempdir().unwrap();
    let (results, labels, other) = write_data(tmp.path(), 18);
    let (r, l, o) = (
        results.to_str().unwrap(),
        labels.to_str().unwrap(),
        other.to_str().unwrap(),
    );
    let ours = evaluate(&[
        r,
        "--labels",
        l,
        "--by",
        "site",
        "--compare",
        o,
        "--threshold",
        "0.5",
        "--target-sensitivity",
        "0.9",
    ]);
    let theirs = reference(&[r, l, "0.5", "0.9", "--by", "site", "--compare", o]);
    close(&ours["unmatched"], &theirs["unmatched"], "unmatched");
    close(&ours["failed"], &theirs["failed"], "failed");
    assert_eq!(
        ours["labels_without_result"], 6,
        "P999, the equivocal one, the four failed cases' labels"
    );
    same_stats(&ours, &theirs, "overall");
    for group in ["modalities", "site"] {
        let ref_groups = theirs["subgroups"][group].as_object().unwrap();
        let our_groups = ours["subgroups"][group].as_object().unwrap();
        assert_eq!(our_groups.len(), ref_groups.len(), "{group}");
        for (v, t) in ref_groups {
            same_stats(&our_groups[v], t, &format!("{group}={v}"));
        }
    }
    let (c, t) = (&ours["comparison"], &theirs["comparison"]);
    assert_eq!(t["method"], "delong");
    for k in ["n", "auroc_a", "auroc_b", "z", "p_value"] {
        close(&c[k], &t[k], &format!("comparison.{k}"));
    }
    let se = c["difference"].as_f64().unwrap() / c["z"].as_f64().unwrap();
    close(&(se * se).into(), &t["var_diff"], "comparison variance");

    // The bootstrap interval: reproducible with its seed, another seed moves
    // it, and it lies near DeLong's.
    let again = evaluate(&[r, "--labels", l, "--by", "site", "--compare", o]);
    assert_eq!(again["auroc_ci_bootstrap"], ours["auroc_ci_bootstrap"]);
    let reseeded = evaluate(&[r, "--labels", l, "--seed", "7"]);
    assert_ne!(reseeded["auroc_ci_bootstrap"], ours["auroc_ci_bootstrap"]);
    for i in 0..2 {
        let (b, d) = (
            ours["auroc_ci_bootstrap"][i].as_f64().unwrap(),
            ours["auroc_ci"][i].as_f64().unwrap(),
        );
        assert!((b - d).abs() < 0.03, "bootstrap {b} vs DeLong {d}");
    }
}

/// Headless Chromium, as root in CI (hence no sandbox); a missing browser
/// fails the test with the install line instead of skipping it.
fn chromium(args: &[&str]) -> std::process::Output {
    let bin = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| Command::new(b).arg("--version").output().is_ok_and(|o| o.status.success()))
        .expect("headless Chromium is needed for the report test: `apt-get install -y chromium` (.ci/run installs it)");
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new("timeout")
        .arg("120")
        .arg(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn the_html_report_opens_in_chromium_and_shows_the_roc_plot() {
    let tmp = tempfile::tempdir().unwrap();
    let (results, labels, other) = write_data(tmp.path(), 19);
    let dir = tmp.path().join("report");
    let snippet = tmp.path().join("threshold.toml");
    let v = evaluate(&[
        results.to_str().unwrap(),
        "--labels",
        labels.to_str().unwrap(),
        "--by",
        "site",
        "--compare",
        other.to_str().unwrap(),
        "--report",
        dir.to_str().unwrap(),
        "--set-threshold",
        snippet.to_str().unwrap(),
    ]);
    for f in [
        "report.html",
        "roc.png",
        "roc.svg",
        "calibration.png",
        "calibration.svg",
    ] {
        assert!(std::fs::metadata(dir.join(f)).unwrap().len() > 1000, "{f}");
    }
    // The snippet is a config layer the node loads, with Youden's threshold.
    let text = std::fs::read_to_string(&snippet).unwrap();
    let value: toml_like::Threshold = toml_like::parse(&text);
    assert_eq!(value.0, v["youden"]["threshold"].as_f64().unwrap());
    let settings = her2map::config::Settings::load_with_env(Some(&snippet), false).unwrap();
    assert_eq!(f64::from(settings.report.threshold), value.0 as f32 as f64);

    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    assert!(
        !html.contains("src=") && !html.contains("<link") && !html.contains("url("),
        "external asset"
    );
    let page = format!("file://{}", dir.join("report.html").display());
    let dom = String::from_utf8(chromium(&["--dump-dom", &page]).stdout).unwrap();
    let roc = dom
        .find("<figure id=\"roc\">")
        .expect("the ROC figure in the rendered page");
    assert!(dom[roc..].contains("<svg"), "the ROC figure holds its SVG");
    assert!(dom.contains("ROC — AUROC"), "the ROC plot's title");
    assert!(dom.contains("id=\"subgroups\"") && dom.contains("Paired comparison"));

    // The screenshot is kept; the ROC curve's blue and the band's pale blue
    // are on it.
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("evaluate-report.png");
    chromium(&[
        "--window-size=1400,1400",
        &format!("--screenshot={}", shot.display()),
        &page,
    ]);
    let img = image::open(&shot).expect("a PNG screenshot").to_rgb8();
    let count = |f: &dyn Fn(&image::Rgb<u8>) -> bool| img.pixels().filter(|p| f(p)).count();
    let line = count(&|p| p[0] < 40 && p[1] < 40 && p[2] > 200);
    let band = count(&|p| (190..=225).contains(&p[0]) && (190..=225).contains(&p[1]) && p[2] > 245);
    assert!(
        line > 300 && band > 3000,
        "ROC line {line} px, band {band} px in {}",
        shot.display()
    );
}

/// The one value of the `[report] threshold = X` snippet.
mod toml_like {
    pub struct Threshold(pub f64);
    pub fn parse(text: &str) -> Threshold {
        let v = text
            .lines()
            .find_map(|l| l.strip_prefix("threshold = "))
            .expect("a threshold line");
        Threshold(v.trim().parse().unwrap())
    }
}
