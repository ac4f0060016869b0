//! `her2map evaluate`: how well the model did on a site's labelled past
//! cases — the batch results ([`crate::batch`]) joined with the pathology
//! labels ([`labels`]), the statistics of [`stats`] overall and per
//! subgroup, an optional paired comparison with a second result file, and
//! the HTML report ([`report`]). Reads files only; runs no model.

pub mod labels;
pub mod report;
pub mod stats;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::batch::csv::Table;
use crate::batch::results::{self, Row};
use stats::{CalibrationBin, Paired, RocPoint};

/// What `her2map evaluate` was asked.
#[derive(Debug, Clone)]
pub struct EvaluateOptions {
    pub results: PathBuf,
    pub labels: PathBuf,
    /// Subgroup columns besides the modality combination (a label-file or a
    /// results column).
    pub by: Vec<String>,
    /// Cases scoring at or above it are called positive.
    pub threshold: f64,
    pub target_sensitivity: f64,
    pub bootstrap_resamples: usize,
    pub seed: u64,
    /// A second results file of the same cases (other weights, other
    /// modalities): DeLong's paired test against it.
    pub compare: Option<PathBuf>,
}

/// A threshold with what it gives.
#[derive(Debug, Clone, Serialize)]
pub struct OperatingPoint {
    pub threshold: f64,
    pub sensitivity: f64,
    pub specificity: f64,
}

/// The statistics of one set of cases.
#[derive(Debug, Clone, Serialize)]
pub struct Metrics {
    pub n: usize,
    pub positives: usize,
    pub negatives: usize,
    /// `None` (null) without both classes.
    pub auroc: Option<f64>,
    /// DeLong, 95%.
    pub auroc_ci: Option<[f64; 2]>,
    /// Percentile bootstrap, 95%, with the seed of the options.
    pub auroc_ci_bootstrap: Option<[f64; 2]>,
    pub threshold: f64,
    pub tp: usize,
    pub fp: usize,
    pub tn: usize,
    #[serde(rename = "fn")]
    pub fn_: usize,
    pub sensitivity: Option<f64>,
    pub sensitivity_ci: Option<[f64; 2]>,
    pub specificity: Option<f64>,
    pub specificity_ci: Option<[f64; 2]>,
    pub ppv: Option<f64>,
    pub ppv_ci: Option<[f64; 2]>,
    pub npv: Option<f64>,
    pub npv_ci: Option<[f64; 2]>,
    pub youden: Option<OperatingPoint>,
    pub target_sensitivity: Option<OperatingPoint>,
    pub brier: Option<f64>,
    pub calibration: Vec<CalibrationBin>,
    /// The ROC curve, highest threshold first (the first point's threshold,
    /// infinite, is null); empty without both classes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub roc: Vec<RocPoint>,
    /// For the report: (false-positive rate, low, high) of the bootstrap
    /// band of the true-positive rate.
    #[serde(skip)]
    pub roc_band: Vec<(f64, f64, f64)>,
}

/// The paired comparison of two result files on their common cases.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub a: String,
    pub b: String,
    #[serde(flatten)]
    pub test: Option<Paired>,
}

/// Everything `--json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    /// Result rows with a probability and no label.
    pub unmatched: usize,
    /// Result rows with an error.
    pub failed: usize,
    pub labels_without_result: usize,
    #[serde(flatten)]
    pub overall: Metrics,
    /// Per subgroup column, per value.
    pub subgroups: BTreeMap<String, BTreeMap<String, Metrics>>,
    pub comparison: Option<Comparison>,
    pub bootstrap_resamples: usize,
    pub seed: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum EvaluateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Input(String),
}

fn read(path: &Path) -> Result<String, EvaluateError> {
    std::fs::read_to_string(path).map_err(|source| EvaluateError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_results(path: &Path) -> Result<Vec<Row>, EvaluateError> {
    results::read_rows(path).map_err(|source| EvaluateError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn prob(r: &Row) -> Option<f64> {
    r.get("prob").parse::<f64>().ok().filter(|p| p.is_finite())
}

/// Join, compute, and compare (see [`EvaluateOptions`]).
pub fn evaluate(opts: &EvaluateOptions) -> Result<Evaluation, EvaluateError> {
    let rows = read_results(&opts.results)?;
    let table = Table::parse(&read(&opts.labels)?);
    let join = labels::join(&rows, &table).map_err(EvaluateError::Input)?;
    let cases: Vec<(&Row, bool)> = join
        .matched
        .iter()
        .filter_map(|m| prob(m.result).map(|_| (m.result, m.positive)))
        .collect();
    let overall = metrics(&cases, opts, true);
    let mut subgroups = BTreeMap::new();
    let mut columns = vec!["modalities_used".to_string()];
    columns.extend(opts.by.iter().map(|c| c.trim().to_ascii_lowercase()));
    columns.dedup();
    for col in columns {
        let mut groups: BTreeMap<String, Vec<(&Row, bool)>> = BTreeMap::new();
        for m in &join.matched {
            let value = m
                .label
                .get(&col)
                .cloned()
                .unwrap_or_else(|| m.result.get(&col).to_string());
            groups
                .entry(value)
                .or_default()
                .push((m.result, m.positive));
        }
        let name = if col == "modalities_used" {
            "modalities".to_string()
        } else {
            col
        };
        subgroups.insert(
            name,
            groups
                .into_iter()
                .map(|(v, cs)| (v, metrics(&cs, opts, false)))
                .collect(),
        );
    }
    let comparison = match &opts.compare {
        Some(other) => Some(compare(&cases, other, opts)?),
        None => None,
    };
    Ok(Evaluation {
        unmatched: join.unmatched,
        failed: join.failed,
        labels_without_result: join.labels_without_result,
        overall,
        subgroups,
        comparison,
        bootstrap_resamples: opts.bootstrap_resamples,
        seed: opts.seed,
    })
}

/// The statistics of `cases`; with `band`, the ROC curve's bootstrap band
/// too (the report draws it).
fn metrics(cases: &[(&Row, bool)], opts: &EvaluateOptions, band: bool) -> Metrics {
    let y: Vec<bool> = cases.iter().map(|c| c.1).collect();
    let p: Vec<f64> = cases.iter().filter_map(|c| prob(c.0)).collect();
    let positives = y.iter().filter(|v| **v).count();
    let delong = stats::auroc_delong(&y, &p);
    let grid: Vec<f64> = if band {
        (0..=50).map(|i| i as f64 / 50.0).collect()
    } else {
        Vec::new()
    };
    let boot = stats::bootstrap(&y, &p, opts.bootstrap_resamples, opts.seed, &grid);
    let roc = stats::roc_curve(&y, &p);
    let (tp, fp, tn, fn_) = stats::confusion(&y, &p, opts.threshold);
    let ratio = |k: usize, n: usize| (n > 0).then(|| k as f64 / n as f64);
    let both = delong.is_some();
    let point = |r: RocPoint| OperatingPoint {
        threshold: r.threshold,
        sensitivity: r.tpr,
        specificity: 1.0 - r.fpr,
    };
    Metrics {
        n: y.len(),
        positives,
        negatives: y.len() - positives,
        auroc: delong.map(|d| d.0),
        auroc_ci: delong.map(|d| d.1),
        auroc_ci_bootstrap: boot.as_ref().map(|b| {
            [
                stats::quantile(&b.aucs, 0.025),
                stats::quantile(&b.aucs, 0.975),
            ]
        }),
        threshold: opts.threshold,
        tp,
        fp,
        tn,
        fn_,
        sensitivity: ratio(tp, tp + fn_),
        sensitivity_ci: stats::wilson(tp, tp + fn_),
        specificity: ratio(tn, tn + fp),
        specificity_ci: stats::wilson(tn, tn + fp),
        ppv: ratio(tp, tp + fp),
        ppv_ci: stats::wilson(tp, tp + fp),
        npv: ratio(tn, tn + fn_),
        npv_ci: stats::wilson(tn, tn + fn_),
        youden: if both {
            stats::youden(&roc).map(point)
        } else {
            None
        },
        target_sensitivity: if both {
            stats::threshold_for_sensitivity(&roc, opts.target_sensitivity).map(point)
        } else {
            None
        },
        brier: (!y.is_empty()).then(|| stats::brier(&y, &p)),
        calibration: stats::calibration(&y, &p, 10),
        roc_band: match &boot {
            Some(b) => grid
                .iter()
                .zip(&b.tpr)
                .map(|(&f, t)| (f, stats::quantile(t, 0.025), stats::quantile(t, 0.975)))
                .collect(),
            None => Vec::new(),
        },
        roc: if both { roc } else { Vec::new() },
    }
}

/// DeLong's paired test of this file's scores (a) against `other`'s (b) on
/// the labelled cases both scored (joined by case id).
fn compare(
    cases: &[(&Row, bool)],
    other: &Path,
    opts: &EvaluateOptions,
) -> Result<Comparison, EvaluateError> {
    let rows = read_results(other)?;
    let by_id: BTreeMap<&str, f64> = rows
        .iter()
        .filter(|r| r.get("error").is_empty())
        .filter_map(|r| prob(r).map(|p| (r.get("case_id"), p)))
        .collect();
    let (mut y, mut a, mut b) = (Vec::new(), Vec::new(), Vec::new());
    for (r, positive) in cases {
        if let (Some(pa), Some(&pb)) = (prob(r), by_id.get(r.get("case_id"))) {
            y.push(*positive);
            a.push(pa);
            b.push(pb);
        }
    }
    Ok(Comparison {
        a: opts.results.display().to_string(),
        b: other.display().to_string(),
        test: stats::delong_paired(&y, &a, &b),
    })
}
