//! The HTML report of a site validation (`her2map evaluate --report DIR`):
//! one self-contained page (plots inline as SVG, no external asset) with
//! the ROC curve and its bootstrap band, the calibration plot and the
//! tables; the plots also as PNG and SVG files beside it. Drawing with
//! plotters; text in the embedded DejaVu Sans (font/LICENSE).

use std::fmt::Write as _;
use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::{EvaluateError, EvaluateOptions, Evaluation, Metrics};

const SIZE: (u32, u32) = (640, 560);

fn io(dir: &Path) -> impl Fn(std::io::Error) -> EvaluateError + '_ {
    move |source| EvaluateError::Io {
        path: dir.to_path_buf(),
        source,
    }
}

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let font: &'static [u8] = include_bytes!("font/DejaVuSans.ttf");
        // The font is compiled in; it parses or no text could ever draw.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, font);
    });
}

/// Write `report.html`, `roc.{png,svg}` and `calibration.{png,svg}` in `dir`.
pub fn write_report(
    dir: &Path,
    opts: &EvaluateOptions,
    ev: &Evaluation,
) -> Result<(), EvaluateError> {
    register_font();
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let m = &ev.overall;
    let plot = |name: &str,
                draw: &dyn Fn(&mut String) -> Result<(), String>|
     -> Result<String, EvaluateError> {
        let mut svg = String::new();
        draw(&mut svg).map_err(EvaluateError::Input)?;
        std::fs::write(dir.join(format!("{name}.svg")), &svg).map_err(io(dir))?;
        Ok(svg)
    };
    let roc_svg = plot("roc", &|s| {
        draw_roc(SVGBackend::with_string(s, SIZE).into_drawing_area(), m)
    })?;
    let cal_svg = plot("calibration", &|s| {
        draw_calibration(SVGBackend::with_string(s, SIZE).into_drawing_area(), m)
    })?;
    let png = |name: &str| dir.join(format!("{name}.png"));
    let roc_png = png("roc");
    draw_roc(BitMapBackend::new(&roc_png, SIZE).into_drawing_area(), m)
        .map_err(EvaluateError::Input)?;
    let cal_png = png("calibration");
    draw_calibration(BitMapBackend::new(&cal_png, SIZE).into_drawing_area(), m)
        .map_err(EvaluateError::Input)?;
    let html = page(opts, ev, &roc_svg, &cal_svg);
    std::fs::write(dir.join("report.html"), html).map_err(io(dir))
}

fn draw_roc<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, m: &Metrics) -> Result<(), String> {
    let e = |x: DrawingAreaErrorKind<DB::ErrorType>| x.to_string();
    root.fill(&WHITE).map_err(e)?;
    let caption = match (m.auroc, m.auroc_ci) {
        (Some(a), Some(ci)) => format!("ROC — AUROC {a:.3} (95% CI {:.3}–{:.3})", ci[0], ci[1]),
        _ => "ROC — needs both classes".to_string(),
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(54)
        .build_cartesian_2d(0f64..1f64, 0f64..1f64)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("1 − specificity (false-positive rate)")
        .y_desc("sensitivity")
        .draw()
        .map_err(e)?;
    if !m.roc_band.is_empty() {
        let mut band: Vec<(f64, f64)> = m.roc_band.iter().map(|b| (b.0, b.2)).collect();
        band.extend(m.roc_band.iter().rev().map(|b| (b.0, b.1)));
        chart
            .draw_series(std::iter::once(Polygon::new(band, BLUE.mix(0.18))))
            .map_err(e)?
            .label("bootstrap 95% band")
            .legend(|(x, y)| {
                Rectangle::new([(x, y - 5), (x + 16, y + 5)], BLUE.mix(0.18).filled())
            });
    }
    chart
        .draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], BLACK.mix(0.4)))
        .map_err(e)?;
    chart
        .draw_series(LineSeries::new(
            m.roc.iter().map(|r| (r.fpr, r.tpr)),
            BLUE.stroke_width(2),
        ))
        .map_err(e)?
        .label("ROC")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLUE.stroke_width(2)));
    if let (Some(se), Some(sp)) = (m.sensitivity, m.specificity) {
        chart
            .draw_series(std::iter::once(Circle::new(
                (1.0 - sp, se),
                6,
                RED.filled(),
            )))
            .map_err(e)?
            .label(format!("threshold {}", m.threshold))
            .legend(|(x, y)| Circle::new((x + 8, y), 5, RED.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(e)?;
    root.present().map_err(e)
}

fn draw_calibration<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    m: &Metrics,
) -> Result<(), String> {
    let e = |x: DrawingAreaErrorKind<DB::ErrorType>| x.to_string();
    root.fill(&WHITE).map_err(e)?;
    let caption = match m.brier {
        Some(b) => format!("Calibration — Brier {b:.4}"),
        None => "Calibration".to_string(),
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(54)
        .build_cartesian_2d(0f64..1f64, 0f64..1f64)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("mean predicted probability")
        .y_desc("fraction HER2-positive")
        .draw()
        .map_err(e)?;
    chart
        .draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], BLACK.mix(0.4)))
        .map_err(e)?;
    let pts: Vec<(f64, f64)> = m
        .calibration
        .iter()
        .filter_map(|b| Some((b.mean_predicted?, b.fraction_positive?)))
        .collect();
    chart
        .draw_series(LineSeries::new(pts.iter().copied(), BLUE.stroke_width(2)))
        .map_err(e)?;
    chart
        .draw_series(pts.iter().map(|&p| Circle::new(p, 5, BLUE.filled())))
        .map_err(e)?;
    root.present().map_err(e)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn num(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "n/a".into())
}

fn with_ci(v: Option<f64>, ci: Option<[f64; 2]>) -> String {
    match (v, ci) {
        (Some(v), Some([lo, hi])) => format!("{v:.3} ({lo:.3}–{hi:.3})"),
        (Some(v), None) => format!("{v:.3}"),
        _ => "n/a".into(),
    }
}

fn metrics_rows(m: &Metrics) -> String {
    let rows = [
        ("cases", m.n.to_string()),
        (
            "HER2-positive / negative",
            format!("{} / {}", m.positives, m.negatives),
        ),
        ("AUROC (DeLong 95% CI)", with_ci(m.auroc, m.auroc_ci)),
        (
            "AUROC bootstrap 95% CI",
            m.auroc_ci_bootstrap
                .map(|c| format!("{:.3}–{:.3}", c[0], c[1]))
                .unwrap_or("n/a".into()),
        ),
        (
            &*format!("sensitivity at {} (Wilson 95% CI)", m.threshold),
            with_ci(m.sensitivity, m.sensitivity_ci),
        ),
        ("specificity", with_ci(m.specificity, m.specificity_ci)),
        ("PPV", with_ci(m.ppv, m.ppv_ci)),
        ("NPV", with_ci(m.npv, m.npv_ci)),
        (
            "Youden's J threshold (sens / spec)",
            m.youden
                .as_ref()
                .map(|p| {
                    format!(
                        "{} ({:.3} / {:.3})",
                        p.threshold, p.sensitivity, p.specificity
                    )
                })
                .unwrap_or("n/a".into()),
        ),
        (
            "target-sensitivity threshold (sens / spec)",
            m.target_sensitivity
                .as_ref()
                .map(|p| {
                    format!(
                        "{} ({:.3} / {:.3})",
                        p.threshold, p.sensitivity, p.specificity
                    )
                })
                .unwrap_or("n/a".into()),
        ),
        (
            "Brier score",
            m.brier.map(|b| format!("{b:.4}")).unwrap_or("n/a".into()),
        ),
    ];
    rows.iter()
        .map(|(k, v)| format!("<tr><th>{}</th><td>{}</td></tr>\n", esc(k), esc(v)))
        .collect()
}

fn page(opts: &EvaluateOptions, ev: &Evaluation, roc_svg: &str, cal_svg: &str) -> String {
    let m = &ev.overall;
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>her2map site validation</title>\n<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}}\
         table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #bbb;padding:4px 8px;text-align:left}}\
         figure{{display:inline-block;margin:0 1em 1em 0}}</style></head><body>\n\
         <h1>HER2 MAP — site validation</h1>\n<p>Results <code>{}</code>, labels <code>{}</code>; \
         {} unmatched result rows, {} failed cases, {} labels without a result; bootstrap {} resamples, seed {}. \
         A research tool's measurement on this site's cases, not a clearance.</p>\n",
        esc(&opts.results.display().to_string()),
        esc(&opts.labels.display().to_string()),
        ev.unmatched,
        ev.failed,
        ev.labels_without_result,
        ev.bootstrap_resamples,
        ev.seed
    );
    let _ = write!(
        h,
        "<h2>Overall</h2>\n<table id=\"summary\">{}</table>\n",
        metrics_rows(m)
    );
    let _ = write!(
        h,
        "<figure id=\"roc\"><figcaption>ROC curve with its bootstrap 95% band</figcaption>{roc_svg}</figure>\n\
         <figure id=\"calibration\"><figcaption>Calibration (10 bins)</figcaption>{cal_svg}</figure>\n"
    );
    h.push_str("<h2>Calibration table</h2>\n<table id=\"calibration-table\"><tr><th>bin</th><th>cases</th><th>mean predicted</th><th>fraction positive</th></tr>\n");
    for b in &m.calibration {
        let _ = writeln!(
            h,
            "<tr><td>{:.1}–{:.1}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            b.low,
            b.high,
            b.n,
            num(b.mean_predicted),
            num(b.fraction_positive)
        );
    }
    h.push_str("</table>\n<h2>Subgroups</h2>\n<table id=\"subgroups\"><tr><th>by</th><th>value</th><th>cases</th><th>HER2+</th><th>AUROC (DeLong 95% CI)</th><th>sensitivity</th><th>specificity</th><th>Brier</th></tr>\n");
    for (col, groups) in &ev.subgroups {
        for (value, g) in groups {
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(col),
                esc(value),
                g.n,
                g.positives,
                esc(&with_ci(g.auroc, g.auroc_ci)),
                esc(&with_ci(g.sensitivity, g.sensitivity_ci)),
                esc(&with_ci(g.specificity, g.specificity_ci)),
                num(g.brier)
            );
        }
    }
    h.push_str("</table>\n");
    if let Some(c) = &ev.comparison {
        h.push_str("<h2>Paired comparison (DeLong)</h2>\n");
        match &c.test {
            Some(t) => {
                let _ = writeln!(
                    h,
                    "<p>A <code>{}</code> vs B <code>{}</code> on {} common cases: AUROC {:.3} vs {:.3}, \
                     B − A {:+.3} (95% CI {:.3}–{:.3}), z = {:.3}, p = {:.4}.</p>",
                    esc(&c.a),
                    esc(&c.b),
                    t.n,
                    t.auroc_a,
                    t.auroc_b,
                    t.difference,
                    t.difference_ci[0],
                    t.difference_ci[1],
                    t.z,
                    t.p_value
                );
            }
            None => h.push_str("<p>Not enough common cases with both classes.</p>\n"),
        }
    }
    h.push_str("</body></html>\n");
    h
}
