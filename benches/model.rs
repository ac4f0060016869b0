//! Full-size `Model3` CPU benchmark with random weights (plain timing loop).
//!
//! The parent process draws random weights for `MapConfig::reference()`,
//! writes them to a temporary .safetensors file and re-runs itself as a child
//! that loads that file with `MapModel::load` (memory-mapped, like a real
//! checkpoint), so the child's peak RSS is what the node would see. The child
//! reports load time, first-call time, median of N runs, peak RSS (VmHWM),
//! the analytic FLOP count per case and the achieved GFLOP/s.
//!
//! Run: `RAYON_NUM_THREADS=2 cargo bench --bench model` (BENCH_RUNS=N to
//! change the number of timed runs, default 10). `HER2MAP_BENCH_DEVICE`
//! (`cpu`, `cuda:0`; default cpu) picks the device, `HER2MAP_BENCH_BATCHES`
//! (e.g. `8,32`) adds throughput runs at those batch sizes (cases per
//! second, all modalities in every sample). `HER2MAP_BENCH_SAVE=FILE`
//! only writes the random weights to FILE; `HER2MAP_BENCH_WEIGHTS=FILE` then
//! times that file directly (e.g. under `perf record`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use her2map::model::{HoverConfig, MapConfig, MapInputs, MapModel, SwinConfig, Trace};

const CHILD_ENV: &str = "HER2MAP_BENCH_WEIGHTS";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // SAFETY: single-threaded at this point (before any rayon use).
        unsafe { std::env::set_var("RAYON_NUM_THREADS", "2") };
    }
    match std::env::var(CHILD_ENV) {
        Ok(path) => child(Path::new(&path)),
        Err(_) => parent(),
    }
}

fn parent() -> Result<(), Box<dyn std::error::Error>> {
    let cfg = MapConfig::reference();
    let t = Instant::now();
    let backend = RandomWeights::default();
    let store = backend.store.clone_handle();
    let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, Device::Cpu);
    // Building the model requests every tensor it uses, with its shape.
    drop(MapModel::from_varbuilder(vb, cfg, "random".into())?);
    let n_tensors = store.count();
    let tensors = store.take();
    let n_params: usize = tensors.values().map(|t| t.elem_count()).sum();
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("map_reference_random.safetensors");
    candle_core::safetensors::save(&tensors, &path)?;
    drop(tensors);
    let size = std::fs::metadata(&path)?.len();
    println!(
        "random reference weights: {} tensors read by the model, {:.1} M elements, file {:.0} MiB, generated in {:.1} s",
        n_tensors,
        n_params as f64 / 1e6,
        size as f64 / (1 << 20) as f64,
        t.elapsed().as_secs_f64()
    );
    if let Ok(keep) = std::env::var("HER2MAP_BENCH_SAVE") {
        // Keep the generated file (e.g. to profile the child by hand).
        std::fs::copy(&path, &keep)?;
        println!("saved to {keep}; run again with {CHILD_ENV}={keep} to time it");
        return Ok(());
    }
    let status = std::process::Command::new(std::env::current_exe()?)
        .env(CHILD_ENV, &path)
        .args(std::env::args().skip(1))
        .status()?;
    if !status.success() {
        return Err(format!("benchmark child failed: {status}").into());
    }
    Ok(())
}

fn child(path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_default();
    // As the node's Engine::start does.
    her2map::inference::tune_allocator();
    let rss0 = proc_status_kib("VmRSS");
    let t = Instant::now();
    let dev = her2map::inference::parse_device(
        &std::env::var("HER2MAP_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into()),
    )?;
    her2map::inference::set_tf32(std::env::var_os("HER2MAP_BENCH_TF32").is_some());
    println!(
        "device: {} ({})",
        her2map::inference::device_label(&dev),
        her2map::inference::device_name(&dev)
    );
    let model = MapModel::load(path, &dev)?;
    let load_s = t.elapsed().as_secs_f64();
    let rss_loaded = proc_status_kib("VmRSS");
    let cfg = model.config().clone();
    assert_eq!(
        cfg,
        MapConfig::reference(),
        "config derived from full-size shapes"
    );

    let inputs = random_inputs(&cfg, 1, &dev)?;
    let t = Instant::now();
    let out = model.forward(&inputs)?;
    let prob = out.probs.to_vec1::<f32>()?[0];
    let first_s = t.elapsed().as_secs_f64();
    assert!(prob.is_finite(), "non-finite output");

    let mut times = Vec::with_capacity(runs);
    let cpu0 = cpu_seconds();
    for _ in 0..runs {
        let t = Instant::now();
        let out = model.forward(&inputs)?;
        let _ = out.probs.to_vec1::<f32>()?;
        times.push(t.elapsed().as_secs_f64());
    }
    let cpu_per_run = (cpu_seconds() - cpu0) / runs as f64;
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];

    // Per-branch split (one run each, after warm-up).
    let mut branch = Vec::new();
    let t = Instant::now();
    model
        .mri()
        .forward(inputs.mri.as_ref().unwrap(), &mut Trace::disabled())?;
    branch.push(("mri", t.elapsed().as_secs_f64()));
    let t = Instant::now();
    model
        .us()
        .forward(inputs.us.as_ref().unwrap(), &mut Trace::disabled())?;
    branch.push(("us", t.elapsed().as_secs_f64()));
    let t = Instant::now();
    model
        .mg()
        .forward(inputs.mg.as_ref().unwrap(), &mut Trace::disabled())?;
    branch.push(("mg", t.elapsed().as_secs_f64()));

    let flops = swin_flops(&cfg.mri)
        + hover_flops(&cfg.us, cfg.fusion_dim)
        + hover_flops(&cfg.mg, cfg.fusion_dim);
    let hwm = proc_status_kib("VmHWM");
    println!("threads (RAYON_NUM_THREADS): {threads}");
    println!("load (sha256 + mmap + copy + precompute): {load_s:.2} s");
    println!(
        "RSS before load {:.0} MiB, after load {:.0} MiB",
        mib(rss0),
        mib(rss_loaded)
    );
    println!("first call: {first_s:.3} s");
    println!(
        "forward batch 1, all modalities: median {median:.3} s over {runs} runs (min {:.3}, max {:.3})",
        times[0],
        times[times.len() - 1]
    );
    println!("CPU time per forward (all threads, user+sys): {cpu_per_run:.3} s");
    println!(
        "1-min load average after the runs: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .next()
            .unwrap_or("?")
    );
    for (name, s) in &branch {
        println!("  branch {name}: {s:.3} s");
    }
    println!(
        "FLOPs per case (matmuls + convs, analytic): {:.2} GFLOP -> {:.1} GFLOP/s at the median",
        flops / 1e9,
        flops / 1e9 / median
    );
    println!("peak RSS (VmHWM): {:.0} MiB", mib(hwm));
    println!("P(HER2+) on random input: {prob:.4}");

    let batches = std::env::var("HER2MAP_BENCH_BATCHES").unwrap_or_default();
    for b in batches
        .split(',')
        .filter_map(|b| b.trim().parse::<usize>().ok())
    {
        let inputs = random_inputs(&cfg, b, &dev)?;
        // One untimed pass: a new batch size allocates anew.
        let _ = model.forward(&inputs)?.probs.to_vec1::<f32>()?;
        let mut times = Vec::with_capacity(runs);
        for _ in 0..runs {
            let t = Instant::now();
            let _ = model.forward(&inputs)?.probs.to_vec1::<f32>()?;
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        println!(
            "forward batch {b}: median {median:.3} s, {:.3} s per case, {:.1} cases/s",
            median / b as f64,
            b as f64 / median
        );
    }
    if !batches.is_empty() {
        // On the CPU; a GPU's own memory is sampled by scripts/gpu-check.sh.
        println!(
            "peak RSS after the batch runs (VmHWM): {:.0} MiB",
            mib(proc_status_kib("VmHWM"))
        );
    }
    Ok(())
}

/// Random inputs of `b` samples with every modality.
fn random_inputs(cfg: &MapConfig, b: usize, dev: &Device) -> candle_core::Result<MapInputs> {
    let d = cfg.mri_input_side();
    let s = cfg.us_input_side();
    Ok(MapInputs {
        mri: Some(Tensor::rand(-1f32, 1f32, (b, 1, d, d, d), dev)?),
        us: Some(Tensor::rand(0f32, 1f32, (b, cfg.us.in_chans, s, s), dev)?),
        mg: Some(Tensor::rand(0f32, 1f32, (b, cfg.mg.in_chans, s, s), dev)?),
        clinical: Tensor::randn(0f32, 1f32, (b, cfg.clinical_dim), dev)?,
        flags: vec![[true; 3]; b],
    })
}

/// utime + stime of this process (all threads), from /proc/self/stat.
fn cpu_seconds() -> f64 {
    let text = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields overall, in clock ticks (100 Hz on Linux).
    let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn proc_status_kib(field: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Matmul/conv FLOPs (2 per multiply-add) of the MRI branch.
fn swin_flops(c: &SwinConfig) -> f64 {
    let g0 = c.img_size / c.patch_size;
    let mut f =
        2.0 * (g0 * g0 * g0) as f64 * (c.in_chans * c.patch_size.pow(3) * c.embed_dim) as f64;
    for i in 0..c.num_layers() {
        let l = c.grid(i).pow(3) as f64;
        let ch = c.dim(i) as f64;
        for j in 0..c.depths[i] {
            let (w, _) = c.window_shift(i, j);
            let n = (w * w * w) as f64;
            // qkv 6LC^2, proj 2LC^2, mlp 4*r*LC^2, attention 4LNC
            f += (8.0 + 4.0 * c.mlp_ratio as f64) * l * ch * ch + 4.0 * l * n * ch;
        }
        if i + 1 < c.num_layers() {
            f += 2.0 * (l / 8.0) * 4.0 * ch * 2.0 * ch;
        }
    }
    f
}

/// Matmul/conv FLOPs of a HoVer-Trans branch with its mapping head.
fn hover_flops(c: &HoverConfig, fusion: usize) -> f64 {
    let conv = |side: usize, cin: usize, cout: usize, k: usize| {
        2.0 * (side * side) as f64 * (cin * cout * k * k) as f64
    };
    let i = c.in_chans;
    let mut f = conv(c.img_size / 2, i, 2 * i, 3)
        + conv(c.img_size / 4, 2 * i, 4 * i, 3)
        + conv(c.img_size / 4, 4 * i, c.dims[0], 3);
    let r = c.mlp_ratio as f64;
    for s in 0..c.num_stages() {
        let n = c.patches(s) as f64;
        let (di, dout) = (c.inner_dim(s) as f64, c.outer_dim(s) as f64);
        let l = n * n;
        let attn = |t: f64, dm: f64| 8.0 * t * dm * dm + 4.0 * t * t * dm;
        let mlp = |t: f64, dm: f64| 4.0 * r * t * dm * dm;
        let block = 2.0 * (attn(n, dout) + mlp(n, dout))
            + 2.0 * 2.0 * l * di * di
            + 4.0 * attn(l, di)
            + 2.0 * mlp(l, di);
        f += c.depths[s] as f64 * block;
        let (side, d) = (c.side(s), c.dims[s]);
        f +=
            conv(side, 2 * d, 4 * d, 1) + conv(side, 4 * d, 4 * d, 3) + conv(side, 4 * d, 2 * d, 1);
    }
    f + conv(c.head_grid(), c.out_chans(), fusion, 3)
}

/// Shared map of the tensors handed out, so they can be saved afterwards.
#[derive(Default, Clone)]
struct Store(std::sync::Arc<Mutex<HashMap<String, Tensor>>>);

impl Store {
    fn clone_handle(&self) -> Self {
        self.clone()
    }
    fn take(&self) -> HashMap<String, Tensor> {
        std::mem::take(&mut *self.0.lock().expect("store lock"))
    }
    fn count(&self) -> usize {
        self.0.lock().expect("store lock").len()
    }
}

/// A `VarBuilder` backend that invents plausible weights on request, in the
/// spirit of the fixtures' randomisation (fan-in scaled weights, norms near
/// 1, real Swin buffers), and remembers them.
#[derive(Default)]
struct RandomWeights {
    store: Store,
}

impl RandomWeights {
    fn make(&self, s: &Shape, name: &str, dev: &Device) -> candle_core::Result<Tensor> {
        let dims = s.dims();
        let leaf = name.rsplit('.').next().unwrap_or(name);
        let t = match leaf {
            "relative_position_index" => rel_index(dims[0], dev)?,
            "attn_mask" => attn_mask(dims[0], dims[1], dev)?,
            "relative_coords_table" => coords_table(dims[1], dev)?,
            "logit_scale" => Tensor::full(10f32.ln(), dims, dev)?,
            "running_var" => Tensor::rand(0.5f32, 1.5f32, dims, dev)?,
            "weight" if dims.len() == 1 => (Tensor::randn(0f32, 0.1, dims, dev)? + 1.0)?,
            "weight" => {
                let fan_in: usize = dims[1..].iter().product();
                Tensor::randn(0f32, (1.0 / fan_in as f32).sqrt(), dims, dev)?
            }
            _ => Tensor::randn(0f32, 0.1, dims, dev)?,
        };
        self.store
            .0
            .lock()
            .expect("store lock")
            .insert(name.to_string(), t.clone());
        Ok(t)
    }
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.make(&s, name, dev)?;
        if t.dtype() == DType::I64 {
            Ok(t)
        } else {
            t.to_dtype(dtype)
        }
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("no shape known for {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

fn cube_root(n: usize) -> usize {
    (n as f64).cbrt().round() as usize
}

/// The reference's (colliding) 3-D index: (dh+w-1)(2w-1) + (dw+w-1) + (dl+w-1).
fn rel_index(n: usize, dev: &Device) -> candle_core::Result<Tensor> {
    let w = cube_root(n);
    let coord = |t: usize| [(t / (w * w)) as i64, ((t / w) % w) as i64, (t % w) as i64];
    let w1 = w as i64 - 1;
    let mut v = Vec::with_capacity(n * n);
    for a in 0..n {
        for b in 0..n {
            let (ca, cb) = (coord(a), coord(b));
            let d: Vec<i64> = (0..3).map(|k| ca[k] - cb[k] + w1).collect();
            v.push(d[0] * (2 * w1 + 1) + d[1] + d[2]);
        }
    }
    Tensor::from_vec(v, (n, n), dev)
}

/// Standard shifted-window mask (window w, shift w/2) for nW windows.
fn attn_mask(nw: usize, n: usize, dev: &Device) -> candle_core::Result<Tensor> {
    let w = cube_root(n);
    let g = cube_root(nw) * w;
    let s = w / 2;
    let region = |x: usize| {
        if x < g - w {
            0
        } else if x < g - s {
            1
        } else {
            2
        }
    };
    let gw = g / w;
    let mut v = Vec::with_capacity(nw * n * n);
    for win in 0..nw {
        let (w0, w1, w2) = (win / (gw * gw), (win / gw) % gw, win % gw);
        let ids: Vec<usize> = (0..n)
            .map(|t| {
                let (a0, a1, a2) = (t / (w * w), (t / w) % w, t % w);
                region(w0 * w + a0) * 9 + region(w1 * w + a1) * 3 + region(w2 * w + a2)
            })
            .collect();
        for i in 0..n {
            for j in 0..n {
                v.push(if ids[i] == ids[j] { 0f32 } else { -100f32 });
            }
        }
    }
    Tensor::from_vec(v, (nw, n, n), dev)
}

/// Swin V2 log-spaced relative coordinates, (1, t, t, t, 3).
fn coords_table(t: usize, dev: &Device) -> candle_core::Result<Tensor> {
    let w1 = (t / 2) as f32;
    let f = |c: usize| {
        let x = (c as f32 - w1) / w1.max(1.0) * 8.0;
        x.signum() * (x.abs() + 1.0).log2() / 8f32.log2()
    };
    let mut v = Vec::with_capacity(t * t * t * 3);
    for a in 0..t {
        for b in 0..t {
            for c in 0..t {
                v.extend([f(a), f(b), f(c)]);
            }
        }
    }
    Tensor::from_vec(v, (1, t, t, t, 3), dev)
}
