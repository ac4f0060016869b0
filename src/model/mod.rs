//! The HER2 MAP `Model3` ported to Candle: configuration, weight loading, the
//! three backbones (3-D Swin V2 for MRI, HoVer-Trans for US and MG) and the
//! fusion head.
//!
//! Layout follows candle-transformers: every module has a `new(cfg, vb)` that
//! reads its weights through `vb.pp(..)` with names mirroring the checkpoint's
//! `state_dict` keys, and a `forward`. Everything that does not depend on the
//! input (relative position bias, clamped logit scales, attention masks,
//! batch-norm folded into the preceding convolution) is computed once in `new`.
//! On CPU the elementwise hot spots run in the fused rayon kernels of `ops`;
//! other devices use plain candle ops.
//!
//! ```no_run
//! use std::path::Path;
//! use candle_core::{Device, Tensor};
//! use her2map::model::{MapInputs, MapModel};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dev = Device::Cpu;
//! let model = MapModel::load(Path::new("map3.pth"), &dev)?; // or .safetensors
//! let cfg = model.config();
//! let s = cfg.us_input_side();
//! let out = model.forward(&MapInputs {
//!     mri: None, // MRI absent in every sample: the branch is skipped
//!     us: Some(Tensor::zeros((1, 1, s, s), candle_core::DType::F32, &dev)?),
//!     mg: Some(Tensor::zeros((1, 4, s, s), candle_core::DType::F32, &dev)?),
//!     clinical: Tensor::zeros((1, cfg.clinical_dim), candle_core::DType::F32, &dev)?,
//!     flags: vec![[true, false, true]], // [US, MRI, MG]
//! })?;
//! let p_her2_positive = out.probs.to_vec1::<f32>()?[0];
//! # let _ = p_her2_positive;
//! # Ok(())
//! # }
//! ```

mod config;
mod hovertrans;
mod layers;
mod map;
mod ops;
mod swin3d;
mod trace;
mod weights;

pub use config::{HoverConfig, MapConfig, SwinConfig};
pub use hovertrans::HoverTrans;
pub use map::{MapInputs, MapModel, MapOutput};
pub use swin3d::SwinTransformerV2_3d;
pub use trace::Trace;
pub use weights::{Checkpoint, WeightsFormat, sha256_file};

/// Everything that can go wrong while loading or running the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read weights file {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unsupported weights file {0} (expected .pth, .pt or .safetensors)")]
    UnsupportedFormat(std::path::PathBuf),
    #[error("tensor `{key}` is missing from the checkpoint")]
    MissingTensor { key: String },
    #[error("tensor `{key}` has shape {found:?} in the checkpoint, expected {expected:?}")]
    ShapeMismatch {
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("cannot derive the model configuration from `{key}`: {msg}")]
    Config { key: String, msg: String },
    #[error("invalid input: {0}")]
    Input(String),
    #[error("sample {sample} has no modality present (all flags are 0)")]
    NoModality { sample: usize },
    #[error("device: {0}")]
    Device(String),
    #[error("inference engine: {0}")]
    Engine(String),
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ModelError>;

/// Largest absolute difference of two tensors (tests of the fast paths).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("comparable tensors")
}
