//! `her2map batch`: synthetic patients (different seeds and ids, one
//! without MRI, one whose only files are truncated) and a stray non-DICOM
//! file in one folder tree. One row per case, the failure recorded, a rerun
//! keeps the done cases, and every probability equals what the node's own
//! stages compute for that patient (`her2map infer DIR --json`).

use std::path::{Path, PathBuf};
use std::process::Command;

use her2map::batch::csv::Table;
use her2map::synth::{SynthOptions, write_synthetic_patient};

fn her2map() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_her2map"));
    c.env("HER2MAP__MODEL__DEMO", "true")
        .env("HER2MAP__LOG__LEVEL", "warn")
        .env_remove("RUST_LOG");
    c
}

fn run_json(args: &[&str]) -> serde_json::Value {
    let out = her2map().args(args).arg("--json").output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

fn patient(root: &Path, name: &str, seed: u64) -> PathBuf {
    let dir = root.join(name);
    let opts = SynthOptions {
        seed,
        patient_id: format!("ID-{name}"),
        ..Default::default()
    };
    write_synthetic_patient(&dir, &opts).unwrap();
    dir
}

fn rows(csv: &Path) -> Table {
    Table::parse(&std::fs::read_to_string(csv).unwrap())
}

#[test]
fn batch_rows_failures_resume_and_the_node_probabilities() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("archive");
    let full = patient(&tree, "a", 11);
    let no_mr = patient(&tree, "b", 12);
    std::fs::remove_dir_all(no_mr.join("MR")).unwrap();
    let broken = patient(&tree, "c", 13);
    std::fs::remove_dir_all(broken.join("MR")).unwrap();
    std::fs::remove_dir_all(broken.join("MG")).unwrap();
    for f in std::fs::read_dir(broken.join("US")).unwrap() {
        // Header intact, pixel data cut short: grouped, then undecodable.
        let p = f.unwrap().path();
        let len = std::fs::metadata(&p).unwrap().len();
        let file = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        file.set_len(len - 2000).unwrap();
    }
    std::fs::write(tree.join("notes.txt"), "not DICOM").unwrap();

    let out = tmp.path().join("results.csv");
    let s = run_json(&[
        "batch",
        tree.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(s["cases"], 3, "{s}");
    assert_eq!(
        (s["done"].as_u64(), s["failed"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(s["unreadable_files"], 1);
    let unreadable = std::fs::read_to_string(out.with_extension("unreadable.csv")).unwrap();
    assert!(unreadable.contains("notes.txt"), "{unreadable}");
    let t = rows(&out);
    for c in [
        "case_id",
        "patient_key",
        "patient_id",
        "accession_numbers",
        "lesion_side",
        "modalities_used",
        "modalities_missing",
        "prob",
        "prob_mg",
        "prob_us",
        "prob_mri",
        "status",
        "weights_sha256",
        "error",
    ] {
        assert!(t.has(c), "column {c}");
    }
    assert_eq!(t.rows.len(), 3);
    let by_id = |id: &str| {
        t.rows
            .iter()
            .find(|r| r["patient_id"] == id)
            .unwrap()
            .clone()
    };
    let failed = by_id("ID-c");
    assert_eq!(failed["status"], "failed");
    assert!(failed["error"].contains("no usable modality"), "{failed:?}");
    assert_eq!(by_id("ID-b")["modalities_missing"], "MR");
    assert_eq!(by_id("ID-a")["modalities_used"], "US+MR+MG");
    assert_eq!(by_id("ID-a")["accession_numbers"], "SYNMG1;SYNMR1;SYNUS1");
    let detail = std::fs::read_to_string(out.with_extension("jsonl")).unwrap();
    assert_eq!(detail.lines().count(), 3);

    // The node's own stages on each patient's folder give the same numbers.
    for (dir, id) in [(&full, "ID-a"), (&no_mr, "ID-b")] {
        let v = run_json(&["infer", dir.to_str().unwrap()]);
        let row = by_id(id);
        let side = &v["sides"][0];
        let f = |s: &str| s.parse::<f32>().ok();
        assert_eq!(f(&row["prob"]), Some(side["prob"].as_f64().unwrap() as f32));
        for (col, key) in [("prob_mg", "mg"), ("prob_us", "us"), ("prob_mri", "mri")] {
            let want = side["branch_probs"][key].as_f64().map(|p| p as f32);
            assert_eq!(f(&row[col]), want, "{id} {col}");
        }
        assert_eq!(row["weights_sha256"], v["weights_sha256"].as_str().unwrap());
        let status = if f(&row["prob"]).unwrap() >= 0.5 {
            "positive"
        } else {
            "negative"
        };
        assert_eq!(row["status"], status);
    }

    // A rerun keeps the two done cases and tries the failed one again.
    let s = run_json(&[
        "batch",
        tree.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(
        (
            s["skipped"].as_u64(),
            s["done"].as_u64(),
            s["failed"].as_u64()
        ),
        (Some(2), Some(0), Some(1)),
        "{s}"
    );
    let again = rows(&out);
    assert_eq!(again.rows.len(), 3);
    for r in t.rows.iter().filter(|r| r["error"].is_empty()) {
        assert!(again.rows.contains(r), "kept row changed: {r:?}");
    }
    assert_eq!(
        std::fs::read_to_string(out.with_extension("jsonl"))
            .unwrap()
            .lines()
            .count(),
        3
    );

    // Changed inputs (a done case lost its mammograms) run that case again.
    std::fs::remove_dir_all(no_mr.join("MG")).unwrap();
    let s = run_json(&[
        "batch",
        tree.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--jobs",
        "2",
    ]);
    assert_eq!(
        (s["skipped"].as_u64(), s["done"].as_u64()),
        (Some(1), Some(1)),
        "{s}"
    );
    assert_eq!(
        rows(&out)
            .rows
            .iter()
            .find(|r| r["patient_id"] == "ID-b")
            .unwrap()["modalities_used"],
        "US"
    );

    // --no-phi: no Patient ID or accession number in the results.
    let anon = tmp.path().join("anon.csv");
    run_json(&[
        "batch",
        tree.to_str().unwrap(),
        "--out",
        anon.to_str().unwrap(),
        "--no-phi",
    ]);
    let text = std::fs::read_to_string(&anon).unwrap()
        + &std::fs::read_to_string(anon.with_extension("jsonl")).unwrap();
    assert!(
        !text.contains("ID-a") && !text.contains("SYNMG1"),
        "PHI in the --no-phi results"
    );
    assert!(
        !text.contains("archive/c"),
        "file paths in the --no-phi detail"
    );
}
