//! Benchmark: full-size synthetic patient (4 MG views 3328×4084, 5 US
//! instances 800×600 incl. a 5-frame cine, 6-phase DCE-MRI of 160 × 512²)
//! → `prepare_case`. Prints median wall time over N runs and peak RSS
//! (VmHWM). `cargo bench --bench prepare` (release); BENCH_RUNS=N to change
//! the number of runs (default 3), BENCH_DIR to reuse a generated patient.
//! Each run also prints a SHA-256 of the prepared inputs (identical before
//! and after a speed change, or the change altered them).
use std::time::Instant;

use her2map::imaging::{ImagingSettings, InputGrid, prepare_case};
use her2map::synth::{SynthOptions, write_synthetic_patient};

fn vm_hwm_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
}

/// SHA-256 of the model inputs (the MRI, US and MG tensors' bytes) and of
/// the selections' geometry, so that a speed change can show it left them
/// bit for bit the same.
fn inputs_digest(case: &her2map::imaging::PreparedCase) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for data in [
        case.mri.as_ref().map(|v| &v.data),
        case.us.as_ref().map(|v| &v.data),
        case.mg.as_ref().map(|v| &v.data),
    ]
    .into_iter()
    .flatten()
    {
        for v in data {
            h.update(v.to_le_bytes());
        }
    }
    for s in &case.selections {
        h.update(format!("{} {} {:?}\n", s.role, s.roi_provider, s.geometry).as_bytes());
    }
    hex::encode(h.finalize())
}

/// Child process: only prepare_case, so VmHWM is the preparation's own peak.
fn prepare_only(dir: &std::path::Path, runs: usize) {
    let mut files = Vec::new();
    walk(dir, &mut files);
    files.sort();
    let settings = ImagingSettings::default();
    let mut times = Vec::new();
    for i in 0..runs {
        let t = Instant::now();
        let case = prepare_case(&files, &settings, InputGrid::default());
        let dt = t.elapsed().as_secs_f64();
        assert!(
            case.mri.is_some() && case.us.is_some() && case.mg.is_some(),
            "{:?}",
            case.errors
        );
        println!("run {i}: {dt:.2} s; inputs sha256 {}", inputs_digest(&case));
        times.push(dt);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "prepare_case: {} files; median {:.2} s over {runs} runs (min {:.2}, max {:.2}); rayon threads {}; peak RSS (VmHWM) {} MiB",
        files.len(),
        times[times.len() / 2],
        times[0],
        times[times.len() - 1],
        rayon::current_num_threads(),
        vm_hwm_kib().unwrap_or(0) / 1024
    );
}

fn main() {
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    if let Ok(dir) = std::env::var("BENCH_PREPARE_DIR") {
        prepare_only(std::path::Path::new(&dir), runs);
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = std::env::var("BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| tmp.path().to_path_buf());
    let mut existing = Vec::new();
    walk(&dir, &mut existing);
    if existing.is_empty() {
        let t = Instant::now();
        let summary = write_synthetic_patient(
            &dir,
            &SynthOptions {
                full_size: true,
                ..Default::default()
            },
        )
        .expect("synth");
        let n: usize = summary.studies.iter().map(|s| s.files.len()).sum();
        println!(
            "synth --full-size: {n} files, {:.1} MB in {:.1} s (generator VmHWM {} MiB)",
            summary.total_bytes as f64 / 1e6,
            t.elapsed().as_secs_f64(),
            vm_hwm_kib().unwrap_or(0) / 1024
        );
    }
    let exe = std::env::current_exe().expect("current exe");
    let status = std::process::Command::new(exe)
        .env("BENCH_PREPARE_DIR", &dir)
        .env("BENCH_RUNS", runs.to_string())
        .status()
        .expect("spawn child");
    assert!(status.success());
}
