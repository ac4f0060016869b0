//! The inference engine: one dedicated thread owns the loaded [`MapModel`] and
//! its device and serves requests from a bounded queue; async callers get the
//! result through a oneshot channel and never block a tokio worker. Requests
//! and responses hold plain `Vec<f32>` data so callers need not know candle.
//! Requests queued together run as one batch (at most `[model] max_batch`
//! samples, [`merge`] and [`split`]), which a GPU serves for little more than
//! the cost of one. Also the library side of `her2map infer`
//! ([`infer_tensors_file`]).

use std::collections::VecDeque;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use tokio::sync::{mpsc, oneshot};

use crate::modality::Modality;
use crate::model::{MapConfig, MapInputs, MapModel, MapOutput, ModelError};

/// A dense f32 tensor as plain data (row-major).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorData {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl TensorData {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self, ModelError> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(ModelError::Input(format!(
                "shape {shape:?} needs {n} values, got {}",
                data.len()
            )));
        }
        Ok(Self { shape, data })
    }

    fn to_tensor(&self, device: &Device) -> Result<Tensor, ModelError> {
        let n: usize = self.shape.iter().product();
        if n != self.data.len() {
            return Err(ModelError::Input(format!(
                "shape {:?} needs {n} values, got {}",
                self.shape,
                self.data.len()
            )));
        }
        Ok(Tensor::from_slice(
            &self.data,
            self.shape.as_slice(),
            device,
        )?)
    }

    fn from_tensor(t: &Tensor) -> Result<Self, ModelError> {
        Ok(Self {
            shape: t.dims().to_vec(),
            data: t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
        })
    }
}

/// One batch to score. Flags per sample are `[US, MRI, MG]`.
#[derive(Debug, Clone)]
pub struct InferRequest {
    /// (B, 1, D, D, D); may be `None` when no sample has MRI.
    pub mri: Option<TensorData>,
    /// (B, 1, S, S)
    pub us: Option<TensorData>,
    /// (B, 4, S, S)
    pub mg: Option<TensorData>,
    /// (B, clinical_dim)
    pub clinical: TensorData,
    pub flags: Vec<[bool; 3]>,
    /// Return class-1 CAMs (feature grid and upsampled to the input grid).
    pub want_cams: bool,
}

/// Scores of one sample.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleResult {
    /// P(HER2-positive) = softmax(logits)[1].
    pub prob: f32,
    pub logits: Vec<f32>,
    /// Per-branch P(class 1), `[US, MRI, MG]`; `None` where the sample's flag
    /// for that branch is 0.
    pub branch_probs: [Option<f32>; 3],
    pub branch_logits: [Option<Vec<f32>>; 3],
}

/// CAMs of one branch for the whole batch.
#[derive(Debug, Clone, PartialEq)]
pub struct BranchCams {
    /// ReLU'd CAM on the feature grid, (B, h, w) or (B, g, g, g).
    pub grid: TensorData,
    /// Signed CAM before the ReLU, same shape.
    pub raw: TensorData,
    /// `grid` upsampled to the branch input grid.
    pub input: TensorData,
}

#[derive(Debug, Clone, PartialEq)]
pub struct InferResponse {
    pub samples: Vec<SampleResult>,
    /// `[US, MRI, MG]`, present when requested and the branch ran.
    pub cams: [Option<BranchCams>; 3],
    /// Time spent in the model (tensor building, forward, read-back) for
    /// the whole batch this request ran in.
    pub compute_ms: f64,
    /// Requests that shared this forward pass (1: it ran alone).
    pub batch_requests: usize,
    /// Time from submission to the reply, including queueing.
    pub total_ms: f64,
    pub weights_sha256: String,
    /// The device that ran it (`device_label`).
    pub device: String,
    /// Its name: the GPU's as the driver reports it ("NVIDIA H200"), the
    /// CPU's model name (`device_name`).
    pub device_name: String,
}

/// Parse `"auto"` (CUDA device 0 when this build has CUDA and a device is
/// there, else the CPU), `"cpu"`, `"cuda"` or `"cuda:N"`.
pub fn parse_device(spec: &str) -> Result<Device, ModelError> {
    let spec = spec.trim();
    if spec.eq_ignore_ascii_case("cpu") {
        return Ok(Device::Cpu);
    }
    if spec.eq_ignore_ascii_case("auto") {
        return Ok(cuda_device(0).unwrap_or(Device::Cpu));
    }
    let ordinal = match spec.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| ModelError::Device(format!("cannot parse device `{spec}`")))?,
        None => {
            return Err(ModelError::Device(format!(
                "unknown device `{spec}` (expected cpu or cuda:N)"
            )));
        }
    };
    cuda_device(ordinal)
}

/// The device as the logs, the `case_inference_done` event and the SR's
/// algorithm parameters name it ("cpu", "cuda:0").
pub fn device_label(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// The device's name for logs, events and the SR: the GPU's product name
/// from the driver, or the CPU's model name (Linux), else "CPU".
pub fn device_name(device: &Device) -> String {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => d
            .cuda_stream()
            .context()
            .name()
            .unwrap_or_else(|e| format!("unnamed GPU ({e})")),
        _ if device.is_cpu() => cpu_model_name().unwrap_or_else(|| "CPU".into()),
        _ => device_label(device),
    }
}

fn cpu_model_name() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map(|(_, name)| name.trim().to_string())
        .filter(|n| !n.is_empty())
}

/// `[model] max_batch`: 0 picks 8 samples on a GPU (batching costs it little)
/// and 1 on the CPU, where a batch takes as long as its cases one by one and
/// only raises peak memory.
pub fn resolve_max_batch(max_batch: usize, device: &Device) -> usize {
    match max_batch {
        0 if device.is_cpu() => 1,
        0 => 8,
        n => n,
    }
}

/// Whether f32 matrix products may use TF32 on the GPU (`[model] tf32`).
/// Off by default (candle's default too): TF32 keeps 10 mantissa bits, which
/// is expected to move logits past the parity tolerance. Process-wide; a
/// no-op without CUDA.
pub fn set_tf32(on: bool) {
    #[cfg(feature = "cuda")]
    candle_core::cuda_backend::set_gemm_reduced_precision_f32(on);
    #[cfg(not(feature = "cuda"))]
    let _ = on;
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device, ModelError> {
    Device::new_cuda(ordinal).map_err(|e| ModelError::Device(format!("cuda:{ordinal}: {e}")))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(ordinal: usize) -> Result<Device, ModelError> {
    Err(ModelError::Device(format!(
        "cuda:{ordinal} requested but this build has no CUDA support (build with --features cuda)"
    )))
}

struct Job {
    req: InferRequest,
    submitted: Instant,
    reply: oneshot::Sender<Result<InferResponse, ModelError>>,
}

/// Keep freed memory in glibc's heap instead of returning large blocks to the
/// kernel after every op: a forward pass allocates and frees many tensors of
/// 1-30 MB, and by default each one is a fresh mmap whose pages are faulted in
/// and zeroed again (about 10% of CPU time in the reference-size forward).
/// Process-wide; a no-op outside glibc. Called by [`Engine::start`].
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // 32 MiB is glibc's ceiling for the mmap threshold on 64-bit.
        // SAFETY: mallopt is thread-safe and only changes allocator tuning.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
        }
    }
}

/// How the engine thread takes requests.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    /// Requests waiting for the engine thread at most (`[model] queue`).
    pub queue: usize,
    /// Samples per forward pass at most (`[model] max_batch`; 0: by device,
    /// [`resolve_max_batch`]).
    pub max_batch: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            queue: 1,
            max_batch: 1,
        }
    }
}

/// Starts the engine thread.
pub struct Engine;

impl Engine {
    /// Load the weights on `device` synchronously (a load failure is returned,
    /// so the node can refuse to start), then serve requests on a dedicated
    /// thread.
    pub fn start(
        weights: &Path,
        device: &str,
        opts: EngineOptions,
    ) -> Result<EngineHandle, ModelError> {
        let device = parse_device(device)?;
        tune_allocator();
        let model = MapModel::load(weights, &device)?;
        let handle = Self::start_with_model(model, opts)?;
        tracing::info!(
            weights = %weights.display(),
            sha256 = handle.weights_sha256(),
            device = %handle.device,
            device_name = %handle.device_name,
            max_batch = handle.max_batch,
            "HER2 MAP model loaded"
        );
        Ok(handle)
    }

    /// Serve an already built model.
    pub fn start_with_model(
        model: MapModel,
        opts: EngineOptions,
    ) -> Result<EngineHandle, ModelError> {
        let (tx, mut rx) = mpsc::channel::<Vec<Job>>(opts.queue.max(1));
        let max_batch = resolve_max_batch(opts.max_batch, model.device());
        let handle = EngineHandle {
            tx,
            config: model.config().clone(),
            sha256: model.weights_sha256().to_string(),
            device: device_label(model.device()),
            device_name: device_name(model.device()),
            max_batch,
        };
        let name = handle.device_name.clone();
        std::thread::Builder::new()
            .name("her2map-model".into())
            .spawn(move || {
                // Requests received and not yet run, in order: at most what
                // one batch takes beyond the one being formed, so that the
                // bounded queue still holds callers back.
                let mut pending: VecDeque<Job> = VecDeque::new();
                loop {
                    if pending.is_empty() {
                        // Ends when every EngineHandle has been dropped.
                        match rx.blocking_recv() {
                            Some(group) => pending.extend(group),
                            None => break,
                        }
                    }
                    // Only what is queued already: a lone request never waits.
                    while samples(&pending) < max_batch {
                        match rx.try_recv() {
                            Ok(group) => pending.extend(group),
                            Err(_) => break,
                        }
                    }
                    let mut batch = vec![pending.pop_front().expect("not empty")];
                    let mut n = batch[0].req.flags.len();
                    while let Some(next) = pending.front() {
                        let fits = n + next.req.flags.len() <= max_batch
                            && next.req.want_cams == batch[0].req.want_cams;
                        if !fits {
                            break;
                        }
                        n += next.req.flags.len();
                        batch.extend(pending.pop_front());
                    }
                    serve(&model, &name, batch);
                }
            })
            .map_err(|e| ModelError::Engine(format!("cannot spawn model thread: {e}")))?;
        Ok(handle)
    }
}

fn samples(jobs: &VecDeque<Job>) -> usize {
    jobs.iter().map(|j| j.req.flags.len()).sum()
}

/// Run a batch of jobs and answer each. A merged batch that fails (one bad
/// request) runs again request by request, so that only the bad one fails.
fn serve(model: &MapModel, device_name: &str, batch: Vec<Job>) {
    let results = if batch.len() > 1 {
        let reqs: Vec<&InferRequest> = batch.iter().map(|j| &j.req).collect();
        guarded(|| {
            let (merged, ranges) = merge(&reqs)?;
            let response = run_request(model, device_name, &merged)?;
            Ok(split(response, &reqs, &ranges))
        })
        .ok()
    } else {
        None
    };
    let results = results.unwrap_or_else(|| {
        batch
            .iter()
            .map(|j| guarded(|| run_request(model, device_name, &j.req)))
            .collect()
    });
    for (job, result) in batch.into_iter().zip(results) {
        let result = result.map(|mut r| {
            r.total_ms = job.submitted.elapsed().as_secs_f64() * 1e3;
            r
        });
        // The caller may have gone away; nothing to do then.
        let _ = job.reply.send(result);
    }
}

/// A panic inside candle on some odd input must fail that request, not take
/// the engine down for every later one.
fn guarded<T>(f: impl FnOnce() -> Result<T, ModelError>) -> Result<T, ModelError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        tracing::error!(%msg, "model panicked on a request");
        Err(ModelError::Engine(format!("model panicked: {msg}")))
    })
}

/// Requests as one: their samples one after another (the rows of request
/// `i` are `ranges[i]`). A branch some requests lack is zeros in their rows,
/// with their flags 0, so the masked fusion leaves it out of their results,
/// as when it is skipped; a branch no request has stays absent.
pub fn merge(
    reqs: &[&InferRequest],
) -> Result<(InferRequest, Vec<std::ops::Range<usize>>), ModelError> {
    let mut ranges = Vec::with_capacity(reqs.len());
    let mut start = 0;
    for r in reqs {
        let n = r.flags.len();
        if r.clinical.shape.first() != Some(&n) {
            return Err(ModelError::Input(format!(
                "clinical has shape {:?} for {n} flag rows",
                r.clinical.shape
            )));
        }
        // A flag without its tensor is the request's own error; batched, it
        // would run on another request's zeros.
        let sent = [r.us.is_some(), r.mri.is_some(), r.mg.is_some()];
        if let Some(k) = (0..3).find(|&k| !sent[k] && r.flags.iter().any(|f| f[k])) {
            return Err(ModelError::Input(format!(
                "a {} flag is set without its tensor",
                Modality::MODEL_ORDER[k].key()
            )));
        }
        ranges.push(start..start + n);
        start += n;
    }
    let rows: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
    let stack = |pick: &dyn Fn(&InferRequest) -> Option<&TensorData>| {
        stack_rows(reqs.iter().map(|r| pick(r)).collect(), &rows)
    };
    let merged = InferRequest {
        mri: stack(&|r| r.mri.as_ref())?,
        us: stack(&|r| r.us.as_ref())?,
        mg: stack(&|r| r.mg.as_ref())?,
        clinical: stack(&|r| Some(&r.clinical))?
            .ok_or_else(|| ModelError::Input("empty batch".into()))?,
        flags: reqs.iter().flat_map(|r| r.flags.iter().copied()).collect(),
        want_cams: reqs.iter().any(|r| r.want_cams),
    };
    Ok((merged, ranges))
}

/// Concatenate along the batch axis; `None` parts are `rows[i]` rows of
/// zeros. All `None`: `None`.
fn stack_rows(
    parts: Vec<Option<&TensorData>>,
    rows: &[usize],
) -> Result<Option<TensorData>, ModelError> {
    let Some(like) = parts.iter().flatten().next() else {
        return Ok(None);
    };
    let inner = &like.shape[1..];
    let row: usize = inner.iter().product();
    let total: usize = rows.iter().sum();
    let mut data = Vec::with_capacity(total * row);
    for (part, &n) in parts.iter().zip(rows) {
        match part {
            Some(t)
                if t.shape.len() == like.shape.len()
                    && &t.shape[1..] == inner
                    && t.shape[0] == n =>
            {
                data.extend_from_slice(&t.data)
            }
            Some(t) => {
                return Err(ModelError::Input(format!(
                    "cannot batch a {:?} tensor with a {:?} one for {n} rows",
                    t.shape, like.shape
                )));
            }
            None => data.resize(data.len() + n * row, 0.0),
        }
    }
    let mut shape = like.shape.clone();
    shape[0] = total;
    Ok(Some(TensorData::new(shape, data)?))
}

/// The merged response as one response per request: its samples, and the
/// CAMs of the branches it sent (when it asked for them).
pub fn split(
    response: InferResponse,
    reqs: &[&InferRequest],
    ranges: &[std::ops::Range<usize>],
) -> Vec<Result<InferResponse, ModelError>> {
    let rows = |t: &TensorData, r: &std::ops::Range<usize>| {
        let row: usize = t.shape[1..].iter().product();
        let mut shape = t.shape.clone();
        shape[0] = r.len();
        TensorData {
            shape,
            data: t.data[r.start * row..r.end * row].to_vec(),
        }
    };
    reqs.iter()
        .zip(ranges)
        .map(|(req, r)| {
            let sent = [req.us.is_some(), req.mri.is_some(), req.mg.is_some()];
            let cams = std::array::from_fn(|k| {
                response.cams[k]
                    .as_ref()
                    .filter(|_| req.want_cams && sent[k])
                    .map(|c| BranchCams {
                        grid: rows(&c.grid, r),
                        raw: rows(&c.raw, r),
                        input: rows(&c.input, r),
                    })
            });
            Ok(InferResponse {
                samples: response.samples[r.clone()].to_vec(),
                cams,
                compute_ms: response.compute_ms,
                total_ms: response.total_ms,
                batch_requests: reqs.len(),
                weights_sha256: response.weights_sha256.clone(),
                device: response.device.clone(),
                device_name: response.device_name.clone(),
            })
        })
        .collect()
}

/// Cheap to clone; the engine stops when the last handle is dropped.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Vec<Job>>,
    config: MapConfig,
    sha256: String,
    device: String,
    device_name: String,
    max_batch: usize,
}

impl EngineHandle {
    /// The device the model runs on (`device_label`) and its name.
    pub fn device(&self) -> (&str, &str) {
        (&self.device, &self.device_name)
    }

    /// Samples per forward pass at most, as resolved for the device.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    pub fn config(&self) -> &MapConfig {
        &self.config
    }

    pub fn weights_sha256(&self) -> &str {
        &self.sha256
    }

    /// Requests queued for the engine thread now (the metrics' queue depth).
    pub fn queue_depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Whether the engine thread still takes requests (readiness).
    pub fn is_running(&self) -> bool {
        !self.tx.is_closed()
    }

    /// Queue a request and wait for its result (waits for queue space too).
    pub async fn infer(&self, req: InferRequest) -> Result<InferResponse, ModelError> {
        let mut results = self.infer_many(vec![req]).await;
        results.pop().expect("one result per request")
    }

    /// Queue requests together and wait for their results, in order: the
    /// engine runs them in as few batches as `max_batch` allows (with any
    /// others queued at the time), so cases that are ready together share
    /// the forward pass.
    pub async fn infer_many(
        &self,
        reqs: Vec<InferRequest>,
    ) -> Vec<Result<InferResponse, ModelError>> {
        if reqs.is_empty() {
            return Vec::new();
        }
        let (group, replies) = jobs(reqs);
        if self.tx.send(group).await.is_err() {
            return replies.iter().map(|_| Err(stopped())).collect();
        }
        let mut results = Vec::with_capacity(replies.len());
        for rx in replies {
            results.push(rx.await.unwrap_or_else(|_| Err(dropped())));
        }
        results
    }

    /// Blocking variant for non-async callers (must not be called from
    /// inside a tokio runtime).
    pub fn infer_blocking(&self, req: InferRequest) -> Result<InferResponse, ModelError> {
        let (group, mut replies) = jobs(vec![req]);
        self.tx.blocking_send(group).map_err(|_| stopped())?;
        let rx = replies.pop().expect("one reply per request");
        rx.blocking_recv().unwrap_or_else(|_| Err(dropped()))
    }
}

type Reply = oneshot::Receiver<Result<InferResponse, ModelError>>;

fn jobs(reqs: Vec<InferRequest>) -> (Vec<Job>, Vec<Reply>) {
    let submitted = Instant::now();
    reqs.into_iter()
        .map(|req| {
            let (reply, rx) = oneshot::channel();
            (
                Job {
                    req,
                    submitted,
                    reply,
                },
                rx,
            )
        })
        .unzip()
}

fn stopped() -> ModelError {
    ModelError::Engine("model thread has stopped".into())
}

fn dropped() -> ModelError {
    ModelError::Engine("model thread dropped the request".into())
}

fn run_request(
    model: &MapModel,
    device_name: &str,
    req: &InferRequest,
) -> Result<InferResponse, ModelError> {
    let start = Instant::now();
    let dev = model.device();
    let opt = |t: &Option<TensorData>| t.as_ref().map(|t| t.to_tensor(dev)).transpose();
    let inputs = MapInputs {
        mri: opt(&req.mri)?,
        us: opt(&req.us)?,
        mg: opt(&req.mg)?,
        clinical: req.clinical.to_tensor(dev)?,
        flags: req.flags.clone(),
    };
    let out = model.forward(&inputs)?;
    let samples = collect_samples(&out, &req.flags)?;
    let mut cams: [Option<BranchCams>; 3] = [None, None, None];
    if req.want_cams {
        for (k, slot) in cams.iter_mut().enumerate() {
            if let (Some(g), Some(r), Some(i)) = (&out.cams_grid[k], &out.cams_raw[k], &out.cams[k])
            {
                *slot = Some(BranchCams {
                    grid: TensorData::from_tensor(g)?,
                    raw: TensorData::from_tensor(r)?,
                    input: TensorData::from_tensor(i)?,
                });
            }
        }
    }
    Ok(InferResponse {
        samples,
        cams,
        compute_ms: start.elapsed().as_secs_f64() * 1e3,
        total_ms: 0.0,
        batch_requests: 1,
        weights_sha256: model.weights_sha256().to_string(),
        device: device_label(model.device()),
        device_name: device_name.to_string(),
    })
}

fn collect_samples(out: &MapOutput, flags: &[[bool; 3]]) -> Result<Vec<SampleResult>, ModelError> {
    let logits = out.logits.to_vec2::<f32>()?;
    let probs = out.probs.to_vec1::<f32>()?;
    let mut b_logits: [Option<Vec<Vec<f32>>>; 3] = [None, None, None];
    let mut b_probs: [Option<Vec<f32>>; 3] = [None, None, None];
    for k in 0..3 {
        if let Some(l) = &out.branch_logits[k] {
            b_logits[k] = Some(l.to_vec2::<f32>()?);
        }
        if let Some(p) = &out.branch_probs[k] {
            b_probs[k] = Some(p.to_vec1::<f32>()?);
        }
    }
    let samples = (0..probs.len())
        .map(|i| {
            let pick = |k: usize| flags[i][k];
            SampleResult {
                prob: probs[i],
                logits: logits[i].clone(),
                branch_probs: std::array::from_fn(|k| {
                    b_probs[k].as_ref().filter(|_| pick(k)).map(|p| p[i])
                }),
                branch_logits: std::array::from_fn(|k| {
                    b_logits[k]
                        .as_ref()
                        .filter(|_| pick(k))
                        .map(|l| l[i].clone())
                }),
            }
        })
        .collect();
    Ok(samples)
}

/// Parse `"1,1,1"` (same flags for every sample) or `"1,1,1;0,1,0"` (one
/// group per sample), in `[US, MRI, MG]` order.
pub fn parse_flags(spec: &str, batch: usize) -> Result<Vec<[bool; 3]>, ModelError> {
    let groups: Vec<[bool; 3]> = spec
        .split(';')
        .map(|g| {
            let vals: Vec<&str> = g.split(',').map(str::trim).collect();
            if vals.len() != 3 {
                return Err(ModelError::Input(format!(
                    "flag group `{g}` must have 3 values (US,MRI,MG)"
                )));
            }
            let mut out = [false; 3];
            for (o, v) in out.iter_mut().zip(&vals) {
                *o = match *v {
                    "1" => true,
                    "0" => false,
                    other => {
                        return Err(ModelError::Input(format!("flag `{other}` must be 0 or 1")));
                    }
                };
            }
            Ok(out)
        })
        .collect::<Result<_, _>>()?;
    match groups.len() {
        1 => Ok(vec![groups[0]; batch]),
        n if n == batch => Ok(groups),
        n => Err(ModelError::Input(format!(
            "{n} flag groups for a batch of {batch}"
        ))),
    }
}

/// `her2map infer --model WEIGHTS --inputs TENSORS.safetensors --flags F --json`:
/// loads `input.mri`, `input.us`, `input.mg`, `input.clinical` (batch first;
/// a modality whose flag is 0 in every sample may be absent), runs the model
/// and returns `{"weights_sha256", "samples": [{"prob", "logits",
/// "branch_probs": {"us", "mri", "mg"}}]}` (null for an absent branch).
pub fn infer_tensors_file(
    weights: &Path,
    inputs: &Path,
    flags: &str,
    device: &str,
) -> Result<serde_json::Value, ModelError> {
    let dev = parse_device(device)?;
    let model = MapModel::load(weights, &dev)?;
    let mut tensors = candle_core::safetensors::load(inputs, &dev)
        .map_err(|e| ModelError::Input(format!("cannot read inputs {}: {e}", inputs.display())))?;
    let clinical = tensors
        .remove("input.clinical")
        .ok_or_else(|| ModelError::Input("inputs file has no `input.clinical`".into()))?;
    let batch = clinical.dim(0)?;
    let flags = parse_flags(flags, batch)?;
    let mut take = |branch: Modality| -> Result<Option<Tensor>, ModelError> {
        let key = format!("input.{}", branch.key());
        let t = tensors.remove(&key);
        if t.is_none() && flags.iter().any(|f| f[branch.branch()]) {
            return Err(ModelError::Input(format!(
                "a {} flag is set but the inputs file has no `{key}`",
                branch.key()
            )));
        }
        Ok(t)
    };
    let inputs = MapInputs {
        mri: take(Modality::MR)?,
        us: take(Modality::US)?,
        mg: take(Modality::MG)?,
        clinical,
        flags: flags.clone(),
    };
    let out = model.forward(&inputs)?;
    let samples = collect_samples(&out, &flags)?;
    let samples: Vec<serde_json::Value> = samples
        .iter()
        .map(|s| {
            serde_json::json!({
                "prob": s.prob,
                "logits": s.logits,
                "branch_probs": {
                    "us": s.branch_probs[Modality::US.branch()],
                    "mri": s.branch_probs[Modality::MR.branch()],
                    "mg": s.branch_probs[Modality::MG.branch()],
                },
            })
        })
        .collect();
    Ok(serde_json::json!({
        "weights_sha256": model.weights_sha256(),
        "samples": samples,
    }))
}
