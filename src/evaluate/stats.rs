//! The statistics of a site validation, on (label, score) pairs: the ROC
//! curve and its AUROC, DeLong's variance and paired test (Sun & Xu 2014's
//! fast algorithm with midranks), a seeded percentile bootstrap, Wilson
//! intervals, Youden's J, the threshold for a target sensitivity, the Brier
//! score and a calibration table. Pure functions: no I/O. Conventions follow
//! scikit-learn (a score at or above the threshold is positive; ROC points
//! at every distinct score, highest first), which the tests check against.

use rand::{Rng, SeedableRng};

/// The 97.5th percentile of the standard normal (two-sided 95%).
pub const Z95: f64 = 1.959_963_984_540_054;

/// Midranks (1-based; ties get the mean of their ranks).
pub fn midranks(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut ranks = vec![0.0; x.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j < order.len() && x[order[j]] == x[order[i]] {
            j += 1;
        }
        let r = 0.5 * (i + j - 1) as f64 + 1.0;
        for &k in &order[i..j] {
            ranks[k] = r;
        }
        i = j;
    }
    ranks
}

/// DeLong's AUROCs of several scores of the same cases and their covariance.
#[derive(Debug, Clone)]
pub struct Delong {
    pub aucs: Vec<f64>,
    pub cov: Vec<Vec<f64>>,
}

/// Sun & Xu (2014): the AUROC of each score and their DeLong covariance.
/// `None` without at least one positive and one negative.
pub fn delong(y: &[bool], scores: &[&[f64]]) -> Option<Delong> {
    let m = y.iter().filter(|&&v| v).count();
    let n = y.len() - m;
    if m == 0 || n == 0 {
        return None;
    }
    let mut v10s = Vec::new(); // per score: one value per positive
    let mut v01s = Vec::new(); // per score: one value per negative
    let mut aucs = Vec::new();
    for s in scores {
        let pos: Vec<f64> = s.iter().zip(y).filter(|p| *p.1).map(|p| *p.0).collect();
        let neg: Vec<f64> = s.iter().zip(y).filter(|p| !*p.1).map(|p| *p.0).collect();
        let all: Vec<f64> = pos.iter().chain(&neg).copied().collect();
        let (tx, ty, tz) = (midranks(&pos), midranks(&neg), midranks(&all));
        let auc =
            tz[..m].iter().sum::<f64>() / (m * n) as f64 - (m as f64 + 1.0) / (2.0 * n as f64);
        aucs.push(auc);
        v10s.push(
            (0..m)
                .map(|i| (tz[i] - tx[i]) / n as f64)
                .collect::<Vec<_>>(),
        );
        v01s.push(
            (0..n)
                .map(|j| 1.0 - (tz[m + j] - ty[j]) / m as f64)
                .collect::<Vec<_>>(),
        );
    }
    let k = scores.len();
    let mut cov = vec![vec![0.0; k]; k];
    for a in 0..k {
        for b in 0..k {
            cov[a][b] = sample_cov(&v10s[a], &v10s[b]) / m as f64
                + sample_cov(&v01s[a], &v01s[b]) / n as f64;
        }
    }
    Some(Delong { aucs, cov })
}

/// Sample covariance (n − 1 denominator); 0 for fewer than two values.
fn sample_cov(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len();
    if n < 2 {
        return 0.0;
    }
    let (ma, mb) = (mean(a), mean(b));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - ma) * (y - mb))
        .sum::<f64>()
        / (n - 1) as f64
}

fn mean(a: &[f64]) -> f64 {
    a.iter().sum::<f64>() / a.len() as f64
}

/// AUROC with its DeLong 95% interval (normal approximation, clipped to
/// [0, 1]).
pub fn auroc_delong(y: &[bool], p: &[f64]) -> Option<(f64, [f64; 2])> {
    let d = delong(y, &[p])?;
    let (auc, var) = (d.aucs[0], d.cov[0][0].max(0.0));
    let half = Z95 * var.sqrt();
    Some((auc, [(auc - half).max(0.0), (auc + half).min(1.0)]))
}

/// DeLong's test of two correlated AUROCs (the same cases scored twice).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Paired {
    pub n: usize,
    pub auroc_a: f64,
    pub auroc_b: f64,
    /// `auroc_b − auroc_a`, with its 95% interval.
    pub difference: f64,
    pub difference_ci: [f64; 2],
    pub z: f64,
    /// Two-sided.
    pub p_value: f64,
}

pub fn delong_paired(y: &[bool], a: &[f64], b: &[f64]) -> Option<Paired> {
    let d = delong(y, &[a, b])?;
    let var = d.cov[0][0] + d.cov[1][1] - 2.0 * d.cov[0][1];
    let diff = d.aucs[1] - d.aucs[0];
    let se = var.max(0.0).sqrt();
    let z = if se > 0.0 { diff / se } else { 0.0 };
    Some(Paired {
        n: y.len(),
        auroc_a: d.aucs[0],
        auroc_b: d.aucs[1],
        difference: diff,
        difference_ci: [diff - Z95 * se, diff + Z95 * se],
        z,
        p_value: if se > 0.0 {
            erfc(z.abs() / std::f64::consts::SQRT_2)
        } else {
            1.0
        },
    })
}

/// The complementary error function: 1 − erf(x), erf from its series
/// 2/√π · e^{−x²} · Σ 2ⁿ x^{2n+1} / (1·3·…·(2n+1)) (all terms positive, so
/// no cancellation inside the sum; absolute error near 1e−16).
pub fn erfc(x: f64) -> f64 {
    if x < 0.0 {
        return 2.0 - erfc(-x);
    }
    if x > 27.0 {
        return 0.0;
    }
    let mut term = x;
    let mut sum = x;
    let mut k = 0.0;
    while term > sum * 1e-17 {
        k += 1.0;
        term *= 2.0 * x * x / (2.0 * k + 1.0);
        sum += term;
        if k > 2000.0 {
            break;
        }
    }
    let erf = 2.0 / std::f64::consts::PI.sqrt() * (-x * x).exp() * sum;
    (1.0 - erf).max(0.0)
}

/// One point of the ROC curve: cases scoring at or above `threshold` are
/// called positive.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct RocPoint {
    /// `f64::INFINITY` for the first point (nothing called positive).
    pub threshold: f64,
    pub fpr: f64,
    pub tpr: f64,
}

/// The ROC curve at every distinct score, highest first, from (0, 0) —
/// scikit-learn's `roc_curve(..., drop_intermediate=False)`.
pub fn roc_curve(y: &[bool], p: &[f64]) -> Vec<RocPoint> {
    let m = y.iter().filter(|&&v| v).count() as f64;
    let n = y.len() as f64 - m;
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
    let mut points = vec![RocPoint {
        threshold: f64::INFINITY,
        fpr: 0.0,
        tpr: 0.0,
    }];
    let (mut tp, mut fp) = (0.0, 0.0);
    for (i, &k) in order.iter().enumerate() {
        if y[k] {
            tp += 1.0;
        } else {
            fp += 1.0;
        }
        let last_of_tie = order.get(i + 1).is_none_or(|&next| p[next] != p[k]);
        if last_of_tie {
            points.push(RocPoint {
                threshold: p[k],
                fpr: if n > 0.0 { fp / n } else { f64::NAN },
                tpr: if m > 0.0 { tp / m } else { f64::NAN },
            });
        }
    }
    points
}

/// Counts at a threshold: (tp, fp, tn, fn).
pub fn confusion(y: &[bool], p: &[f64], threshold: f64) -> (usize, usize, usize, usize) {
    let mut c = (0, 0, 0, 0);
    for (&yi, &pi) in y.iter().zip(p) {
        match (yi, pi >= threshold) {
            (true, true) => c.0 += 1,
            (false, true) => c.1 += 1,
            (false, false) => c.2 += 1,
            (true, false) => c.3 += 1,
        }
    }
    c
}

/// Wilson's 95% score interval of `k` successes in `n` (Wilson 1927);
/// `None` for `n = 0`.
pub fn wilson(k: usize, n: usize) -> Option<[f64; 2]> {
    if n == 0 {
        return None;
    }
    let (k, n) = (k as f64, n as f64);
    let z2 = Z95 * Z95;
    let phat = k / n;
    let denom = 1.0 + z2 / n;
    let centre = (phat + z2 / (2.0 * n)) / denom;
    let half = Z95 * (phat * (1.0 - phat) / n + z2 / (4.0 * n * n)).sqrt() / denom;
    Some([centre - half, centre + half])
}

/// The ROC point maximising Youden's J = sensitivity + specificity − 1
/// (the highest such threshold on ties).
pub fn youden(roc: &[RocPoint]) -> Option<RocPoint> {
    roc.iter().filter(|r| r.threshold.is_finite()).fold(
        None,
        |best: Option<RocPoint>, r| match best {
            Some(b) if b.tpr - b.fpr >= r.tpr - r.fpr => Some(b),
            _ => Some(*r),
        },
    )
}

/// The highest threshold whose sensitivity reaches `target` (so the best
/// specificity among those that do).
pub fn threshold_for_sensitivity(roc: &[RocPoint], target: f64) -> Option<RocPoint> {
    roc.iter()
        .find(|r| r.threshold.is_finite() && r.tpr >= target)
        .copied()
}

/// Mean squared difference of score and outcome.
pub fn brier(y: &[bool], p: &[f64]) -> f64 {
    let s: f64 = y
        .iter()
        .zip(p)
        .map(|(&yi, &pi)| (pi - if yi { 1.0 } else { 0.0 }).powi(2))
        .sum();
    s / y.len() as f64
}

/// One bin of the calibration table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CalibrationBin {
    pub low: f64,
    pub high: f64,
    pub n: usize,
    pub mean_predicted: Option<f64>,
    pub fraction_positive: Option<f64>,
}

/// `bins` equal-width bins of [0, 1]; a score on an inner edge goes to the
/// lower bin (scikit-learn's `calibration_curve(strategy="uniform")`).
pub fn calibration(y: &[bool], p: &[f64], bins: usize) -> Vec<CalibrationBin> {
    let step = 1.0 / bins as f64;
    let edges: Vec<f64> = (0..=bins).map(|i| i as f64 * step).collect();
    let mut acc = vec![(0usize, 0.0f64, 0usize); bins];
    for (&yi, &pi) in y.iter().zip(p) {
        let b = edges[1..bins].iter().filter(|&&e| e < pi).count();
        acc[b].0 += 1;
        acc[b].1 += pi;
        acc[b].2 += usize::from(yi);
    }
    acc.iter()
        .enumerate()
        .map(|(i, &(n, sum, pos))| CalibrationBin {
            low: edges[i],
            high: edges[i + 1],
            n,
            mean_predicted: (n > 0).then(|| sum / n as f64),
            fraction_positive: (n > 0).then(|| pos as f64 / n as f64),
        })
        .collect()
}

/// The true-positive rate of a ROC curve at a false-positive rate (the best
/// point at or left of it: the curve as a step function).
pub fn tpr_at(roc: &[RocPoint], fpr: f64) -> f64 {
    roc.iter()
        .filter(|r| r.fpr <= fpr + 1e-12)
        .map(|r| r.tpr)
        .fold(0.0, f64::max)
}

/// The seeded percentile bootstrap of the AUROC (cases resampled with
/// replacement; a resample without both classes is drawn again), with the
/// ROC curve's true-positive rate at each `fpr_grid` value per resample
/// for a confidence band.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    pub aucs: Vec<f64>,
    /// Per grid point, the resamples' true-positive rates.
    pub tpr: Vec<Vec<f64>>,
}

pub fn bootstrap(
    y: &[bool],
    p: &[f64],
    resamples: usize,
    seed: u64,
    fpr_grid: &[f64],
) -> Option<Bootstrap> {
    let m = y.iter().filter(|&&v| v).count();
    if m == 0 || m == y.len() {
        return None;
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut out = Bootstrap {
        aucs: Vec::with_capacity(resamples),
        tpr: vec![Vec::with_capacity(resamples); fpr_grid.len()],
    };
    let (mut yb, mut pb) = (vec![false; y.len()], vec![0.0; y.len()]);
    while out.aucs.len() < resamples {
        for i in 0..y.len() {
            let k = rng.random_range(0..y.len());
            yb[i] = y[k];
            pb[i] = p[k];
        }
        let Some(d) = delong(&yb, &[&pb]) else {
            continue;
        };
        out.aucs.push(d.aucs[0]);
        let roc = roc_curve(&yb, &pb);
        for (g, &f) in fpr_grid.iter().enumerate() {
            out.tpr[g].push(tpr_at(&roc, f));
        }
    }
    Some(out)
}

/// The `q` quantile (0..1) by linear interpolation between order
/// statistics (numpy's default).
pub fn quantile(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let h = (v.len() - 1) as f64 * q;
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(v.len() - 1);
    v[lo] + (h - lo as f64) * (v[hi] - v[lo])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erfc_known_values() {
        assert!((erfc(0.0) - 1.0).abs() < 1e-15);
        assert!((erfc(1.0) - 0.157_299_207_050_285_13).abs() < 1e-15);
        assert!((erfc(Z95 / std::f64::consts::SQRT_2) - 0.05).abs() < 1e-14);
        assert!((erfc(3.0) - 2.209_049_699_858_544e-5).abs() < 1e-15);
        assert!(erfc(6.0) < 1e-15 && erfc(-1.0) > 1.84);
    }

    #[test]
    fn a_perfect_and_a_useless_score() {
        let y = [true, true, false, false];
        assert_eq!(auroc_delong(&y, &[0.9, 0.8, 0.2, 0.1]).unwrap().0, 1.0);
        assert_eq!(auroc_delong(&y, &[0.5; 4]).unwrap().0, 0.5);
        assert!(auroc_delong(&[true, true], &[0.1, 0.2]).is_none());
    }

    #[test]
    fn bootstrap_is_reproducible_with_its_seed() {
        let y: Vec<bool> = (0..40).map(|i| i % 3 == 0).collect();
        let p: Vec<f64> = (0..40).map(|i| ((i * 37) % 41) as f64 / 41.0).collect();
        let a = bootstrap(&y, &p, 200, 7, &[0.5]).unwrap();
        let b = bootstrap(&y, &p, 200, 7, &[0.5]).unwrap();
        let c = bootstrap(&y, &p, 200, 8, &[0.5]).unwrap();
        assert_eq!(a.aucs, b.aucs);
        assert_ne!(a.aucs, c.aucs);
    }
}
