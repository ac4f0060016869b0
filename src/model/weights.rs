//! Opening a checkpoint (`.pth` through candle's pickle reader, `.safetensors`
//! memory-mapped with pages released as tensors are copied out), hashing it,
//! and fetching tensors with errors that name the key and both shapes. This is
//! the only place where the model touches files.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sha2::{Digest, Sha256};

use super::{ModelError, Result};

/// On-disk format of a checkpoint, chosen by file extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsFormat {
    /// `torch.save(state_dict)` zip archive (`.pth`, `.pt`).
    Pth,
    Safetensors,
}

impl WeightsFormat {
    pub fn from_path(path: &Path) -> Result<Self> {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("safetensors") => Ok(Self::Safetensors),
            Some(e) if e.eq_ignore_ascii_case("pth") || e.eq_ignore_ascii_case("pt") => {
                Ok(Self::Pth)
            }
            _ => Err(ModelError::UnsupportedFormat(path.to_path_buf())),
        }
    }
}

/// SHA-256 of a file, hex encoded (streamed, the file is not held in memory).
pub fn sha256_file(path: &Path) -> Result<String> {
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

const DATA_PARALLEL_PREFIX: &str = "module.";

/// An opened checkpoint: a `VarBuilder` over it, every key's shape (for
/// deriving the configuration) and the file's SHA-256.
pub struct Checkpoint {
    pub path: PathBuf,
    pub format: WeightsFormat,
    pub sha256: String,
    pub shapes: HashMap<String, Vec<usize>>,
    pub vb: VarBuilder<'static>,
}

impl Checkpoint {
    pub fn open(path: &Path, device: &Device) -> Result<Self> {
        let format = WeightsFormat::from_path(path)?;
        if let Err(source) = std::fs::metadata(path) {
            return Err(ModelError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
        let sha256 = sha256_file(path)?;
        let (shapes, vb): (HashMap<String, Vec<usize>>, VarBuilder) = match format {
            WeightsFormat::Safetensors => {
                let st = MmapSafetensors::open(path)?;
                let shapes = st
                    .index
                    .iter()
                    .map(|(k, v)| (k.clone(), v.shape.clone()))
                    .collect();
                let vb = VarBuilder::from_backend(Box::new(st), DType::F32, device.clone());
                (shapes, vb)
            }
            WeightsFormat::Pth => {
                // A bare state_dict (what the authors' train.py saves), or one
                // nested under a "state_dict" / "model" key of a training
                // checkpoint.
                let mut pth = candle_core::pickle::PthTensors::new(path, None)?;
                for key in ["state_dict", "model"] {
                    if pth.tensor_infos().is_empty() {
                        pth = candle_core::pickle::PthTensors::new(path, Some(key)).unwrap_or(pth);
                    }
                }
                let shapes = pth
                    .tensor_infos()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.layout.dims().to_vec()))
                    .collect();
                let vb = VarBuilder::from_backend(Box::new(pth), DType::F32, device.clone());
                (shapes, vb)
            }
        };
        // Checkpoints saved from nn.DataParallel prefix every key with
        // "module."; look tensors up under that prefix then.
        let prefixed =
            !shapes.is_empty() && shapes.keys().all(|k| k.starts_with(DATA_PARALLEL_PREFIX));
        let (shapes, vb) = if prefixed {
            let shapes = shapes
                .into_iter()
                .map(|(k, v)| (k[DATA_PARALLEL_PREFIX.len()..].to_string(), v))
                .collect();
            (
                shapes,
                vb.rename_f(|k| format!("{DATA_PARALLEL_PREFIX}{k}")),
            )
        } else {
            (shapes, vb)
        };
        Ok(Self {
            path: path.to_path_buf(),
            format,
            sha256,
            shapes,
            vb,
        })
    }
}

/// A memory-mapped .safetensors file that gives each tensor's pages back to
/// the kernel once the tensor has been copied out. With a plain mapping every
/// touched page stays resident until the whole map is dropped, so loading
/// would briefly need the checkpoint twice (mapped file + copies).
struct MmapSafetensors {
    mmap: memmap2::Mmap,
    index: HashMap<String, safetensors::tensor::TensorInfo>,
    /// Absolute offset of the data section.
    data_start: usize,
}

/// Page granularity used for releasing; a wrong guess only makes madvise fail,
/// which is ignored (the pages then stay until the map is dropped).
const PAGE: usize = 4096;

impl MmapSafetensors {
    fn open(path: &Path) -> Result<Self> {
        let io = |source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the file is mapped read-only; like every mmap-based loader
        // we rely on it not being truncated or rewritten while the model is
        // being built (the map is dropped once every tensor is copied out).
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let (header_len, meta) =
            safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| ModelError::Config {
                key: path.display().to_string(),
                msg: format!("not a valid safetensors file: {e}"),
            })?;
        let index = meta
            .tensors()
            .into_iter()
            .map(|(k, v)| (k, v.clone()))
            .collect();
        Ok(Self {
            mmap,
            index,
            data_start: 8 + header_len,
        })
    }

    fn load(&self, name: &str, dev: &Device) -> candle_core::Result<Tensor> {
        use candle_core::safetensors::Load;
        let info = self
            .index
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            })?;
        let (start, end) = (
            self.data_start + info.data_offsets.0,
            self.data_start + info.data_offsets.1,
        );
        let bytes = self.mmap.get(start..end).ok_or_else(|| {
            candle_core::Error::Msg(format!("tensor {name}: data outside the file"))
        })?;
        let view = safetensors::tensor::TensorView::new(info.dtype, info.shape.clone(), bytes)
            .map_err(|e| candle_core::Error::Msg(format!("tensor {name}: {e}")))?;
        let tensor = view.load(dev)?;
        // The tensor owns a copy now: drop the pages wholly inside its range.
        let first = start.div_ceil(PAGE) * PAGE;
        let last = end / PAGE * PAGE;
        if last > first {
            // SAFETY: read-only shared file mapping; dropping its pages only
            // means a later access re-reads them from the file, and no
            // borrowed view into this range outlives this call.
            let _ = unsafe {
                self.mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    first,
                    last - first,
                )
            };
        }
        Ok(tensor)
    }
}

impl candle_nn::var_builder::SimpleBackend for MmapSafetensors {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.get_unchecked(name, dtype, dev)?;
        if tensor.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: tensor.shape().clone(),
            });
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }
}

fn full_key(vb: &VarBuilder, name: &str) -> String {
    let p = vb.prefix();
    if p.is_empty() {
        name.to_string()
    } else {
        format!("{p}.{name}")
    }
}

/// Fetch `name` (relative to `vb`'s prefix) as `dtype` with the exact `shape`.
/// A missing key or a different shape becomes an error naming the full key.
pub(crate) fn get_dtype(
    vb: &VarBuilder,
    shape: &[usize],
    name: &str,
    dtype: DType,
) -> Result<Tensor> {
    match vb.get_with_hints_dtype(shape, name, Default::default(), dtype) {
        Ok(t) => Ok(t),
        Err(err) => {
            let key = full_key(vb, name);
            if !vb.contains_tensor(name) {
                return Err(ModelError::MissingTensor { key });
            }
            match vb.get_unchecked_dtype(name, dtype) {
                Ok(t) if t.dims() != shape => Err(ModelError::ShapeMismatch {
                    key,
                    expected: shape.to_vec(),
                    found: t.dims().to_vec(),
                }),
                _ => Err(ModelError::Config {
                    key,
                    msg: err.to_string(),
                }),
            }
        }
    }
}

/// Fetch an f32 tensor of the exact `shape`.
pub(crate) fn get(vb: &VarBuilder, shape: &[usize], name: &str) -> Result<Tensor> {
    get_dtype(vb, shape, name, DType::F32)
}
