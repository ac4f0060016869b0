//! The node's Prometheus metrics: one process-wide registry of counters and
//! histograms that the seams update as things happen (ingest's StoreService
//! hooks, the pipeline's stage timings, the outbox's delivery results), and
//! the text exposition format (Prometheus 0.0.4) they are written in.
//! Gauges that are a view of stored state (cases by state, outbox rows,
//! spool space) are read at scrape time by `http::metrics`, not kept here.
//! A leaf: it imports nothing of the node, so any module may count.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

/// A counter family with fixed label names.
pub struct CounterVec {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    values: Mutex<BTreeMap<Vec<String>, u64>>,
}

impl CounterVec {
    const fn new(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Self {
        CounterVec {
            name,
            help,
            labels,
            values: Mutex::new(BTreeMap::new()),
        }
    }

    /// Add `by` to the series with these label values (in `labels` order).
    pub fn add(&self, values: &[&str], by: u64) {
        let key = values.iter().map(|v| v.to_string()).collect();
        let mut map = self.values.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry(key).or_insert(0) += by;
    }

    pub fn inc(&self, values: &[&str]) {
        self.add(values, 1);
    }

    /// The current value of one series (tests, the status view).
    pub fn get(&self, values: &[&str]) -> u64 {
        let key: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        let map = self.values.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&key).copied().unwrap_or(0)
    }

    /// The sum over every series.
    pub fn total(&self) -> u64 {
        let map = self.values.lock().unwrap_or_else(|e| e.into_inner());
        map.values().sum()
    }

    fn render(&self, out: &mut String) {
        header(out, self.name, self.help, "counter");
        let map = self.values.lock().unwrap_or_else(|e| e.into_inner());
        if self.labels.is_empty() && map.is_empty() {
            let _ = writeln!(out, "{} 0", self.name);
        }
        for (key, v) in map.iter() {
            let pairs: Vec<(&str, &str)> = self
                .labels
                .iter()
                .copied()
                .zip(key.iter().map(String::as_str))
                .collect();
            sample(out, self.name, &pairs, *v as f64);
        }
    }
}

/// Seconds-valued histogram family with fixed buckets and label names.
pub struct HistogramVec {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    buckets: &'static [f64],
    values: Mutex<BTreeMap<Vec<String>, Hist>>,
}

#[derive(Default, Clone)]
struct Hist {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl HistogramVec {
    const fn new(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
        buckets: &'static [f64],
    ) -> Self {
        HistogramVec {
            name,
            help,
            labels,
            buckets,
            values: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn observe(&self, values: &[&str], d: Duration) {
        self.observe_secs(values, d.as_secs_f64());
    }

    pub fn observe_secs(&self, values: &[&str], secs: f64) {
        if !secs.is_finite() {
            return;
        }
        let secs = secs.max(0.0);
        let key = values.iter().map(|v| v.to_string()).collect();
        let mut map = self.values.lock().unwrap_or_else(|e| e.into_inner());
        let h = map.entry(key).or_insert_with(|| Hist {
            counts: vec![0; self.buckets.len()],
            ..Default::default()
        });
        for (i, le) in self.buckets.iter().enumerate() {
            if secs <= *le {
                h.counts[i] += 1;
            }
        }
        h.sum += secs;
        h.count += 1;
    }

    /// Observations so far in one series.
    pub fn count(&self, values: &[&str]) -> u64 {
        let key: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        let map = self.values.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&key).map_or(0, |h| h.count)
    }

    fn render(&self, out: &mut String) {
        header(out, self.name, self.help, "histogram");
        let map = self.values.lock().unwrap_or_else(|e| e.into_inner());
        let empty = Hist {
            counts: vec![0; self.buckets.len()],
            ..Default::default()
        };
        let unlabelled = [(Vec::new(), empty)];
        let series: Vec<(&Vec<String>, &Hist)> = if self.labels.is_empty() && map.is_empty() {
            unlabelled.iter().map(|(k, v)| (k, v)).collect()
        } else {
            map.iter().collect()
        };
        for (key, h) in series {
            let mut pairs: Vec<(&str, &str)> = self
                .labels
                .iter()
                .copied()
                .zip(key.iter().map(String::as_str))
                .collect();
            let bucket = format!("{}_bucket", self.name);
            let les: Vec<String> = self.buckets.iter().map(|b| format_float(*b)).collect();
            for (le, n) in les.iter().zip(&h.counts) {
                let mut with_le = pairs.clone();
                with_le.push(("le", le));
                sample(out, &bucket, &with_le, *n as f64);
            }
            pairs.push(("le", "+Inf"));
            sample(out, &bucket, &pairs, h.count as f64);
            pairs.pop();
            sample(out, &format!("{}_sum", self.name), &pairs, h.sum);
            sample(out, &format!("{}_count", self.name), &pairs, h.count as f64);
        }
    }
}

const FAST: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const SLOW: &[f64] = &[
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// Every metric the node counts as it works.
pub struct Metrics {
    pub associations_opened: CounterVec,
    pub associations_rejected: CounterVec,
    pub associations_active: AtomicI64,
    pub instances: CounterVec,
    pub received_bytes: AtomicU64,
    pub ingest_seconds: HistogramVec,
    pub stage_seconds: HistogramVec,
    pub delivery_latency_seconds: HistogramVec,
    pub delivery_attempts: CounterVec,
    pub http_requests: CounterVec,
    pub http_auth_failures: CounterVec,
}

/// The registry of this process.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    associations_opened: CounterVec::new(
        "her2map_associations_opened_total",
        "DICOM associations accepted.",
        &[],
    ),
    associations_rejected: CounterVec::new(
        "her2map_associations_rejected_total",
        "DICOM associations (or connections before one) refused, by reason.",
        &["reason"],
    ),
    associations_active: AtomicI64::new(0),
    instances: CounterVec::new(
        "her2map_instances_received_total",
        "C-STORE requests answered, by outcome (stored, duplicate, failed), DIMSE status and modality.",
        &["outcome", "status", "modality"],
    ),
    received_bytes: AtomicU64::new(0),
    ingest_seconds: HistogramVec::new(
        "her2map_ingest_duration_seconds",
        "Time from a C-STORE's command to its durable answer (receive, fsync, index).",
        &[],
        FAST,
    ),
    stage_seconds: HistogramVec::new(
        "her2map_case_stage_duration_seconds",
        "Time a case spent in each pipeline stage.",
        &["stage"],
        SLOW,
    ),
    delivery_latency_seconds: HistogramVec::new(
        "her2map_last_instance_to_delivery_seconds",
        "Time from a case's last received instance to an output's delivery.",
        &[],
        SLOW,
    ),
    delivery_attempts: CounterVec::new(
        "her2map_delivery_attempts_total",
        "Result deliveries tried, by destination and outcome (sent, retry, dead).",
        &["destination", "outcome"],
    ),
    http_requests: CounterVec::new(
        "her2map_http_requests_total",
        "HTTP requests answered, by status code class.",
        &["code"],
    ),
    http_auth_failures: CounterVec::new(
        "her2map_http_auth_failures_total",
        "HTTP requests refused for a missing or wrong token.",
        &[],
    ),
});

impl Metrics {
    /// One answered C-STORE. The modality label keeps to the known codes so
    /// that a peer cannot grow the series without bound.
    pub fn instance(&self, outcome: &str, status: u16, modality: &str) {
        let modality = match modality.trim() {
            m @ ("MG" | "US" | "MR" | "SR" | "SEG" | "PR" | "OT" | "CT" | "DX" | "CR") => m,
            "" => "unknown",
            _ => "other",
        };
        self.instances
            .inc(&[outcome, &format!("0x{status:04X}"), modality]);
    }

    /// Write the counted metrics in the text format.
    pub fn render(&self, out: &mut String) {
        self.associations_opened.render(out);
        self.associations_rejected.render(out);
        gauge(
            out,
            "her2map_associations_active",
            "DICOM associations open now.",
            &[(&[], self.associations_active.load(Ordering::Relaxed) as f64)],
        );
        self.instances.render(out);
        header(
            out,
            "her2map_received_bytes_total",
            "Data set bytes received by C-STORE.",
            "counter",
        );
        let bytes = self.received_bytes.load(Ordering::Relaxed);
        let _ = writeln!(out, "her2map_received_bytes_total {bytes}");
        self.ingest_seconds.render(out);
        self.stage_seconds.render(out);
        self.delivery_latency_seconds.render(out);
        self.delivery_attempts.render(out);
        self.http_requests.render(out);
        self.http_auth_failures.render(out);
    }
}

/// A bounded label for a free-text rejection reason: its first clause,
/// lower case, at most 48 characters (reasons may carry peer details).
pub fn reason_label(reason: &str) -> String {
    let head = reason.split([':', '(']).next().unwrap_or("").trim();
    let label: String = head.chars().take(48).collect::<String>().to_lowercase();
    if label.is_empty() {
        "unknown".into()
    } else {
        label
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {}", help.replace('\\', "\\\\"));
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A gauge family: each sample its label pairs and value.
pub fn gauge(out: &mut String, name: &str, help: &str, samples: &[(&[(&str, &str)], f64)]) {
    header(out, name, help, "gauge");
    for (labels, v) in samples {
        sample(out, name, labels, *v);
    }
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], v: f64) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, val)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let val = val
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            let _ = write!(out, "{k}=\"{val}\"");
        }
        out.push('}');
    }
    let _ = writeln!(out, " {}", format_float(v));
}

fn format_float(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else if v.is_nan() {
        "NaN".into()
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_render_in_the_text_format() {
        let c = CounterVec::new("t_things_total", "Things.", &["kind"]);
        c.inc(&["a\"b"]);
        c.add(&["c"], 2);
        let h = HistogramVec::new("t_wait_seconds", "Waits.", &[], &[0.1, 1.0]);
        h.observe_secs(&[], 0.5);
        let mut out = String::new();
        c.render(&mut out);
        h.render(&mut out);
        assert!(out.contains("# TYPE t_things_total counter\n"), "{out}");
        assert!(out.contains("t_things_total{kind=\"a\\\"b\"} 1\n"), "{out}");
        assert!(out.contains("t_things_total{kind=\"c\"} 2\n"), "{out}");
        assert!(
            out.contains("t_wait_seconds_bucket{le=\"0.1\"} 0\n"),
            "{out}"
        );
        assert!(out.contains("t_wait_seconds_bucket{le=\"1\"} 1\n"), "{out}");
        assert!(
            out.contains("t_wait_seconds_bucket{le=\"+Inf\"} 1\n"),
            "{out}"
        );
        assert!(out.contains("t_wait_seconds_count 1\n"), "{out}");
        assert_eq!(c.get(&["c"]), 2);
        assert_eq!(c.total(), 3);
    }
}
