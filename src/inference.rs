//! The inference engine: one dedicated thread owns the loaded [`MapModel`] and
//! its device and serves requests from a bounded queue; async callers get the
//! result through a oneshot channel and never block a tokio worker. Requests
//! and responses hold plain `Vec<f32>` data so callers need not know candle.
//! Also the library side of `her2map infer` ([`infer_tensors_file`]).

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
    /// Time spent in the model (tensor building, forward, read-back).
    pub compute_ms: f64,
    /// Time from submission to the reply, including queueing.
    pub total_ms: f64,
    pub weights_sha256: String,
    /// The device that ran it (`device_label`).
    pub device: String,
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

/// Starts the engine thread.
pub struct Engine;

impl Engine {
    /// Load the weights on `device` synchronously (a load failure is returned,
    /// so the node can refuse to start), then serve requests on a dedicated
    /// thread through a queue of `queue` pending requests.
    pub fn start(weights: &Path, device: &str, queue: usize) -> Result<EngineHandle, ModelError> {
        let device = parse_device(device)?;
        tune_allocator();
        let model = MapModel::load(weights, &device)?;
        tracing::info!(
            weights = %weights.display(),
            sha256 = model.weights_sha256(),
            device = %device_label(&device),
            "HER2 MAP model loaded"
        );
        Self::start_with_model(model, queue)
    }

    /// Serve an already built model.
    pub fn start_with_model(model: MapModel, queue: usize) -> Result<EngineHandle, ModelError> {
        let (tx, mut rx) = mpsc::channel::<Job>(queue.max(1));
        let config = model.config().clone();
        let sha256 = model.weights_sha256().to_string();
        std::thread::Builder::new()
            .name("her2map-model".into())
            .spawn(move || {
                // Ends when every EngineHandle has been dropped.
                while let Some(job) = rx.blocking_recv() {
                    // A panic inside candle on some odd input must fail that
                    // request, not take the engine down for every later one.
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        run_request(&model, &job.req)
                    }))
                    .unwrap_or_else(|panic| {
                        let msg = panic
                            .downcast_ref::<String>()
                            .map(String::as_str)
                            .or_else(|| panic.downcast_ref::<&str>().copied())
                            .unwrap_or("unknown panic");
                        tracing::error!(%msg, "model panicked on a request");
                        Err(ModelError::Engine(format!("model panicked: {msg}")))
                    })
                    .map(|mut r| {
                        r.total_ms = job.submitted.elapsed().as_secs_f64() * 1e3;
                        r
                    });
                    // The caller may have gone away; nothing to do then.
                    let _ = job.reply.send(result);
                }
            })
            .map_err(|e| ModelError::Engine(format!("cannot spawn model thread: {e}")))?;
        Ok(EngineHandle { tx, config, sha256 })
    }
}

/// Cheap to clone; the engine stops when the last handle is dropped.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Job>,
    config: MapConfig,
    sha256: String,
}

impl EngineHandle {
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
        let (reply, rx) = oneshot::channel();
        let job = Job {
            req,
            submitted: Instant::now(),
            reply,
        };
        self.tx
            .send(job)
            .await
            .map_err(|_| ModelError::Engine("model thread has stopped".into()))?;
        rx.await
            .map_err(|_| ModelError::Engine("model thread dropped the request".into()))?
    }

    /// Blocking variant for non-async callers (must not be called from
    /// inside a tokio runtime).
    pub fn infer_blocking(&self, req: InferRequest) -> Result<InferResponse, ModelError> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            req,
            submitted: Instant::now(),
            reply,
        };
        self.tx
            .blocking_send(job)
            .map_err(|_| ModelError::Engine("model thread has stopped".into()))?;
        rx.blocking_recv()
            .map_err(|_| ModelError::Engine("model thread dropped the request".into()))?
    }
}

fn run_request(model: &MapModel, req: &InferRequest) -> Result<InferResponse, ModelError> {
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
        weights_sha256: model.weights_sha256().to_string(),
        device: device_label(model.device()),
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
