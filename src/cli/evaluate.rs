//! `her2map evaluate`: the batch results against the pathology labels (see
//! `her2map::evaluate`), printed as a summary or one JSON object, with the
//! HTML report and a threshold snippet on request.

use std::path::PathBuf;
use std::process::ExitCode;

use her2map::config::Settings;
use her2map::evaluate::{EvaluateOptions, Evaluation, Metrics, evaluate, report};

#[derive(Clone, Copy, clap::ValueEnum)]
enum ThresholdRule {
    /// Youden's J.
    Youden,
    /// The highest threshold reaching `--target-sensitivity`.
    TargetSensitivity,
}

#[derive(clap::Args)]
pub struct EvaluateArgs {
    /// The results CSV of `her2map batch`.
    results: PathBuf,
    /// CSV with `patient_id` (or `accession_number`) and `her2`
    /// (positive/negative), or `ihc` (0, 1+, 2+, 3+) with `ish`.
    #[arg(long)]
    labels: PathBuf,
    /// Subgroups by this label-file (or results) column, besides the
    /// modality combination; repeatable.
    #[arg(long)]
    by: Vec<String>,
    /// Threshold for sensitivity, specificity, PPV and NPV; default:
    /// `[report] threshold`.
    #[arg(long)]
    threshold: Option<f64>,
    #[arg(long, default_value_t = 0.9)]
    target_sensitivity: f64,
    /// Bootstrap resamples for the AUROC interval and the ROC band.
    #[arg(long, default_value_t = 2000)]
    bootstrap: usize,
    #[arg(long, default_value_t = 20_261_201)]
    seed: u64,
    /// A second results file of the same cases: DeLong's paired test.
    #[arg(long)]
    compare: Option<PathBuf>,
    /// Write the HTML report and the plots (PNG, SVG) here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Write the chosen threshold as a `[report]` config snippet here.
    #[arg(long, value_name = "FILE")]
    set_threshold: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "youden")]
    threshold_rule: ThresholdRule,
    #[arg(long)]
    json: bool,
}

pub async fn run(args: EvaluateArgs, settings: &Settings) -> anyhow::Result<ExitCode> {
    let opts = EvaluateOptions {
        results: args.results,
        labels: args.labels,
        by: args.by,
        threshold: args
            .threshold
            .unwrap_or(f64::from(settings.report.threshold)),
        target_sensitivity: args.target_sensitivity,
        bootstrap_resamples: args.bootstrap.max(1),
        seed: args.seed,
        compare: args.compare,
    };
    let (report_dir, snippet, rule, json) = (
        args.report,
        args.set_threshold,
        args.threshold_rule,
        args.json,
    );
    let ev = tokio::task::spawn_blocking(move || -> anyhow::Result<Evaluation> {
        let ev = evaluate(&opts)?;
        if let Some(dir) = &report_dir {
            report::write_report(dir, &opts, &ev)?;
        }
        Ok(ev)
    })
    .await??;
    if let Some(path) = snippet {
        let point = match rule {
            ThresholdRule::Youden => ev.overall.youden.as_ref(),
            ThresholdRule::TargetSensitivity => ev.overall.target_sensitivity.as_ref(),
        }
        .ok_or_else(|| anyhow::anyhow!("no threshold: the labelled cases lack a class"))?;
        std::fs::write(
            &path,
            format!(
                "# From her2map evaluate ({} rule): sensitivity {:.3}, specificity {:.3} on {} cases.\n[report]\nthreshold = {}\n",
                match rule {
                    ThresholdRule::Youden => "Youden's J",
                    ThresholdRule::TargetSensitivity => "target sensitivity",
                },
                point.sensitivity,
                point.specificity,
                ev.overall.n,
                point.threshold
            ),
        )?;
    }
    if json {
        println!("{}", serde_json::to_string(&ev)?);
    } else {
        print_summary(&ev);
    }
    Ok(ExitCode::SUCCESS)
}

fn pct(v: Option<f64>, ci: Option<[f64; 2]>) -> String {
    match (v, ci) {
        (Some(v), Some([lo, hi])) => {
            format!("{:.1}% ({:.1}–{:.1})", v * 100.0, lo * 100.0, hi * 100.0)
        }
        _ => "n/a".into(),
    }
}

fn print_summary(ev: &Evaluation) {
    let m: &Metrics = &ev.overall;
    println!(
        "{} cases ({} HER2+, {} HER2−); {} unmatched, {} failed, {} labels without a result",
        m.n, m.positives, m.negatives, ev.unmatched, ev.failed, ev.labels_without_result
    );
    match (m.auroc, m.auroc_ci, m.auroc_ci_bootstrap) {
        (Some(a), Some(d), Some(b)) => println!(
            "AUROC {a:.3} (DeLong 95% {:.3}–{:.3}; bootstrap {:.3}–{:.3})",
            d[0], d[1], b[0], b[1]
        ),
        _ => println!("AUROC n/a (needs both classes)"),
    }
    println!("at threshold {}:", m.threshold);
    println!("  sensitivity {}", pct(m.sensitivity, m.sensitivity_ci));
    println!("  specificity {}", pct(m.specificity, m.specificity_ci));
    println!("  PPV {}", pct(m.ppv, m.ppv_ci));
    println!("  NPV {}", pct(m.npv, m.npv_ci));
    if let Some(y) = &m.youden {
        println!(
            "Youden's J threshold {} (sens {:.3}, spec {:.3})",
            y.threshold, y.sensitivity, y.specificity
        );
    }
    if let Some(t) = &m.target_sensitivity {
        println!(
            "target-sensitivity threshold {} (sens {:.3}, spec {:.3})",
            t.threshold, t.sensitivity, t.specificity
        );
    }
    if let Some(b) = m.brier {
        println!("Brier score {b:.4}");
    }
    for (col, groups) in &ev.subgroups {
        for (value, g) in groups {
            println!(
                "  {col} = {value}: n {} ({}+), AUROC {}",
                g.n,
                g.positives,
                g.auroc.map(|a| format!("{a:.3}")).unwrap_or("n/a".into())
            );
        }
    }
    if let Some(c) = &ev.comparison
        && let Some(t) = &c.test
    {
        println!(
            "paired DeLong on {} cases: AUROC {:.3} vs {:.3}, difference {:+.3} (95% {:.3}–{:.3}), p = {:.4}",
            t.n,
            t.auroc_a,
            t.auroc_b,
            t.difference,
            t.difference_ci[0],
            t.difference_ci[1],
            t.p_value
        );
    }
}
