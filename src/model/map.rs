//! `Model3` as a whole: runs the branches whose modality is present in at
//! least one sample, fuses the embeddings with a per-sample masked mean,
//! appends the clinical covariates, applies the shared head, and derives
//! per-branch scores and class-1 CAMs.

use std::path::Path;

use candle_core::{D, DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::config::MapConfig;
use super::hovertrans::HoverTrans;
use super::layers::Linear;
use super::swin3d::SwinTransformerV2_3d;
use super::trace::Trace;
use super::weights::{Checkpoint, get};
use super::{ModelError, Result};
use crate::modality::Modality;

/// One batch of model inputs. Per-sample flags are `[US, MRI, MG]`; a branch
/// whose flag is 0 for every sample is not run and its tensor may be `None`.
/// Where a branch runs, samples with flag 0 should carry zeros (what the
/// reference feeds for a missing modality); their embedding is masked out of
/// the fusion either way.
#[derive(Debug, Clone)]
pub struct MapInputs {
    /// (B, 1, D, D, D)
    pub mri: Option<Tensor>,
    /// (B, 1, S, S)
    pub us: Option<Tensor>,
    /// (B, 4, S, S): CC, MLO, CC crop, MLO crop
    pub mg: Option<Tensor>,
    /// (B, clinical_dim)
    pub clinical: Tensor,
    pub flags: Vec<[bool; 3]>,
}

/// Everything one forward pass produces. Arrays are indexed by
/// [`Modality::branch`] (US, MRI, MG); `None` where the branch was skipped.
#[derive(Debug, Clone)]
pub struct MapOutput {
    /// (B, num_classes) head(cat(fused, clinical)).
    pub logits: Tensor,
    /// (B,) softmax(logits)[:, 1], the HER2-positive score.
    pub probs: Tensor,
    /// (B, num_classes) head(cat(branch embedding, clinical)).
    pub branch_logits: [Option<Tensor>; 3],
    /// (B,) softmax(branch_logits)[:, 1].
    pub branch_probs: [Option<Tensor>; 3],
    /// (B, F) branch embeddings.
    pub embeddings: [Option<Tensor>; 3],
    /// (B, F) masked mean of the embeddings.
    pub fused: Tensor,
    /// Class-1 CAM on the branch's input grid: `cams_grid` linearly
    /// upsampled (half-pixel centres, like PyTorch's align_corners=False):
    /// (B, S, S) for US/MG, (B, D, D, D) for MRI in (z, y, x) order.
    pub cams: [Option<Tensor>; 3],
    /// Class-1 CAM on the branch's feature grid, ReLU(sum_k W[1,k] A_k) with
    /// W = head.weight over the F embedding columns and A the mapping-head
    /// activations (US/MG, (B, h, w)) or the final normed tokens (MRI,
    /// (B, g, g, g)); the fixtures' `cam_*`.
    pub cams_grid: [Option<Tensor>; 3],
    /// `cams_grid` before the ReLU (signed class-1 evidence); the fixtures'
    /// `cam_*_raw`.
    pub cams_raw: [Option<Tensor>; 3],
}

/// The loaded `Model3`.
#[derive(Debug, Clone)]
pub struct MapModel {
    cfg: MapConfig,
    mri: SwinTransformerV2_3d,
    us: HoverTrans,
    mg: HoverTrans,
    head: Linear,
    /// (F, 1) head.weight[1, :F], the class-1 CAM weights.
    cam_weight: Tensor,
    sha256: String,
    device: Device,
}

impl MapModel {
    /// Load a `.pth` or `.safetensors` checkpoint; the configuration is
    /// derived from its tensor shapes.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let ckpt = Checkpoint::open(path, device)?;
        let cfg = MapConfig::from_shapes(&ckpt.shapes)?;
        Self::from_varbuilder(ckpt.vb, cfg, ckpt.sha256)
    }

    /// Build from any `VarBuilder` (e.g. random weights for benchmarks).
    pub fn from_varbuilder(vb: VarBuilder, cfg: MapConfig, sha256: String) -> Result<Self> {
        cfg.validate()?;
        let device = vb.device().clone();
        let mri = SwinTransformerV2_3d::new(&cfg.mri, &vb.pp("backbone_mri"))?;
        let us = HoverTrans::new(&cfg.us, &vb.pp("backbone_us"), cfg.fusion_dim)?;
        let mg = HoverTrans::new(&cfg.mg, &vb.pp("backbone_mm"), cfg.fusion_dim)?;
        let f = cfg.fusion_dim;
        let hvb = vb.pp("head");
        let head_w = get(&hvb, &[cfg.num_classes, f + cfg.clinical_dim], "weight")?;
        let head_b = get(&hvb, &[cfg.num_classes], "bias")?;
        let cam_weight = head_w.narrow(0, 1, 1)?.narrow(1, 0, f)?.t()?.contiguous()?;
        Ok(Self {
            cfg,
            mri,
            us,
            mg,
            head: Linear::from_parts(head_w, Some(head_b)),
            cam_weight,
            sha256,
            device,
        })
    }

    pub fn config(&self) -> &MapConfig {
        &self.cfg
    }

    pub fn weights_sha256(&self) -> &str {
        &self.sha256
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn mri(&self) -> &SwinTransformerV2_3d {
        &self.mri
    }

    pub fn us(&self) -> &HoverTrans {
        &self.us
    }

    pub fn mg(&self) -> &HoverTrans {
        &self.mg
    }

    pub fn forward(&self, inputs: &MapInputs) -> Result<MapOutput> {
        self.run(inputs, &mut Trace::disabled())
    }

    /// Forward pass that also returns every stage and block intermediate of
    /// the branches that ran, named like the parity fixtures without the
    /// variant (e.g. `mri.layers.0.blocks.1`, `us.stage.2.blocks.0.row`).
    pub fn forward_traced(&self, inputs: &MapInputs) -> Result<(MapOutput, Trace)> {
        let mut trace = Trace::enabled("");
        let out = self.run(inputs, &mut trace)?;
        Ok((out, trace))
    }

    fn run(&self, inputs: &MapInputs, trace: &mut Trace) -> Result<MapOutput> {
        let (b, clin) = inputs.clinical.dims2().map_err(|_| {
            ModelError::Input(format!(
                "clinical has shape {:?}, expected (B, {})",
                inputs.clinical.dims(),
                self.cfg.clinical_dim
            ))
        })?;
        if clin != self.cfg.clinical_dim {
            return Err(ModelError::Input(format!(
                "clinical has {clin} columns, expected {}",
                self.cfg.clinical_dim
            )));
        }
        if inputs.flags.len() != b {
            return Err(ModelError::Input(format!(
                "{} flag rows for a batch of {b}",
                inputs.flags.len()
            )));
        }
        if let Some(sample) = inputs.flags.iter().position(|f| !f.iter().any(|&x| x)) {
            return Err(ModelError::NoModality { sample });
        }
        let clinical = inputs.clinical.to_dtype(DType::F32)?;

        let jobs = branch_inputs(inputs, b)?;
        // Branches run one after the other, each using every core inside its
        // ops (running them concurrently gained nothing measurable on the
        // 2-core target and raised peak RSS by ~120 MiB).
        let mut embeddings: [Option<Tensor>; 3] = [None, None, None];
        let mut cams_raw: [Option<Tensor>; 3] = [None, None, None];
        for (branch, x) in &jobs {
            let run = self.run_branch(*branch, x, trace.is_enabled())?;
            trace.absorb(run.trace);
            embeddings[branch.branch()] = Some(run.embedding);
            cams_raw[branch.branch()] = Some(run.cam);
        }

        let fused = self.masked_mean(&inputs.flags, &embeddings, b)?;

        let logits = self.apply_head(&fused, &clinical)?;
        let probs = class1_prob(&logits)?;
        let mut branch_logits: [Option<Tensor>; 3] = [None, None, None];
        let mut branch_probs: [Option<Tensor>; 3] = [None, None, None];
        let mut cams: [Option<Tensor>; 3] = [None, None, None];
        let mut cams_grid: [Option<Tensor>; 3] = [None, None, None];
        for k in 0..3 {
            if let Some(e) = &embeddings[k] {
                let l = self.apply_head(e, &clinical)?;
                branch_probs[k] = Some(class1_prob(&l)?);
                branch_logits[k] = Some(l);
            }
            if let Some(c) = &cams_raw[k] {
                let relu = c.relu()?;
                let side = match k {
                    0 => self.cfg.us.img_size,
                    1 => self.cfg.mri.img_size,
                    _ => self.cfg.mg.img_size,
                };
                cams[k] = Some(upsample_linear(&relu, side)?);
                cams_grid[k] = Some(relu);
            }
        }
        Ok(MapOutput {
            logits,
            probs,
            branch_logits,
            branch_probs,
            embeddings,
            fused,
            cams,
            cams_grid,
            cams_raw,
        })
    }

    /// The fusion: the mean of each sample's branch embeddings over the
    /// branches it has (the reference's masked mean), so a missing
    /// modality's branch neither runs nor counts.
    fn masked_mean(
        &self,
        flags: &[[bool; 3]],
        embeddings: &[Option<Tensor>; 3],
        b: usize,
    ) -> Result<Tensor> {
        let w: Vec<f32> = flags
            .iter()
            .flat_map(|f| f.iter().map(|&x| if x { 1f32 } else { 0f32 }))
            .collect();
        let w = Tensor::from_vec(w, (b, 3), &self.device)?;
        let count = w.sum_keepdim(1)?;
        let mut sum: Option<Tensor> = None;
        for (k, emb) in embeddings.iter().enumerate() {
            if let Some(e) = emb {
                let term = e.broadcast_mul(&w.narrow(1, k, 1)?)?;
                sum = Some(match sum {
                    Some(s) => (s + term)?,
                    None => term,
                });
            }
        }
        // Non-empty: every sample has a flag, so some branch ran.
        let sum = sum.ok_or(ModelError::NoModality { sample: 0 })?;
        Ok(sum.broadcast_div(&count)?)
    }

    /// One branch: embedding and raw class-1 CAM on its feature grid.
    fn run_branch(&self, branch: Modality, x: &Tensor, traced: bool) -> Result<BranchRun> {
        let b = x.dim(0)?;
        let mut trace = if traced {
            Trace::enabled(&format!("{}.", branch.key()))
        } else {
            Trace::disabled()
        };
        let (embedding, cam) = match branch {
            Modality::MR => {
                let out = self.mri.forward(x, &mut trace)?;
                let g = self.mri.final_grid();
                // (B, L, F) @ (F, 1) -> (B, g, g, g) in (g0, g1, g2) order.
                let cam = out
                    .tokens
                    .broadcast_matmul(&self.cam_weight)?
                    .reshape((b, g, g, g))?;
                (out.embedding, cam)
            }
            Modality::US | Modality::MG => {
                let net = if branch == Modality::US {
                    &self.us
                } else {
                    &self.mg
                };
                let out = net.forward(x, &mut trace)?;
                let (_, f, h, w) = out.activations.dims4()?;
                let cam = out
                    .activations
                    .reshape((b, f, h * w))?
                    .transpose(1, 2)?
                    .broadcast_matmul(&self.cam_weight)?
                    .reshape((b, h, w))?;
                (out.embedding, cam)
            }
        };
        Ok(BranchRun {
            embedding,
            cam,
            trace,
        })
    }

    fn apply_head(&self, emb: &Tensor, clinical: &Tensor) -> candle_core::Result<Tensor> {
        self.head.forward(&Tensor::cat(&[emb, clinical], 1)?)
    }
}

/// The input of each branch to run, validated against the batch: a branch
/// absent from every sample is skipped, not run on zeros.
fn branch_inputs(inputs: &MapInputs, b: usize) -> Result<Vec<(Modality, Tensor)>> {
    let mut jobs: Vec<(Modality, Tensor)> = Vec::with_capacity(3);
    for branch in Modality::MODEL_ORDER {
        if !inputs.flags.iter().any(|f| f[branch.branch()]) {
            continue;
        }
        let x = match branch {
            Modality::US => &inputs.us,
            Modality::MR => &inputs.mri,
            Modality::MG => &inputs.mg,
        }
        .as_ref()
        .ok_or_else(|| {
            ModelError::Input(format!(
                "{} flag is set but no {} tensor was given",
                branch.key(),
                branch.key()
            ))
        })?
        .to_dtype(DType::F32)?;
        if x.dim(0)? != b {
            return Err(ModelError::Input(format!(
                "{} batch is {}, clinical batch is {b}",
                branch.key(),
                x.dim(0)?
            )));
        }
        jobs.push((branch, x));
    }
    Ok(jobs)
}

struct BranchRun {
    embedding: Tensor,
    cam: Tensor,
    trace: Trace,
}

fn class1_prob(logits: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::ops::softmax(logits, D::Minus1)?
        .narrow(1, 1, 1)?
        .squeeze(1)
}

/// (out, in) matrix of 1-D linear interpolation with half-pixel centres
/// (PyTorch's `align_corners=False`).
fn interp_matrix(out: usize, inp: usize, device: &Device) -> candle_core::Result<Tensor> {
    let mut m = vec![0f32; out * inp];
    let scale = inp as f64 / out as f64;
    for o in 0..out {
        let src = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(inp - 1);
        let i1 = (i0 + 1).min(inp - 1);
        let t = (src - i0 as f64) as f32;
        m[o * inp + i0] += 1.0 - t;
        m[o * inp + i1] += t;
    }
    Tensor::from_vec(m, (out, inp), device)
}

/// Separable linear upsampling of (B, a, b[, c]) maps to `side` per axis.
fn upsample_linear(x: &Tensor, side: usize) -> candle_core::Result<Tensor> {
    let rank = x.rank();
    let mut y = x.clone();
    // Interpolate the last axis, then rotate it to the front of the spatial
    // axes; after rank-1 rounds every axis is done and back in order.
    for _ in 1..rank {
        let inp = y.dim(D::Minus1)?;
        let m = interp_matrix(side, inp, x.device())?;
        y = y.broadcast_matmul(&m.t()?)?;
        // move last axis to position 1
        let mut perm: Vec<usize> = vec![0, rank - 1];
        perm.extend(1..rank - 1);
        y = y.permute(perm)?.contiguous()?;
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The separable upsampling equals PyTorch-style bilinear interpolation
    /// with align_corners=False (candle's upsample_bilinear2d).
    #[test]
    fn cam_upsampling_is_bilinear_half_pixel() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 6, 6), &dev).unwrap();
        let got = upsample_linear(&x, 128).unwrap();
        let want = x
            .unsqueeze(1)
            .unwrap()
            .upsample_bilinear2d(128, 128, false)
            .unwrap()
            .squeeze(1)
            .unwrap();
        let d = crate::model::max_abs_diff(&got, &want);
        assert!(d < 1e-5, "{d:e}");
        // 3-D maps keep their axis order: a map varying only along the last
        // axis still varies only along the last axis.
        let ramp = Tensor::arange(0f32, 3.0, &dev)
            .unwrap()
            .reshape((1, 1, 1, 3))
            .unwrap()
            .broadcast_as((1, 3, 3, 3))
            .unwrap()
            .contiguous()
            .unwrap();
        let up = upsample_linear(&ramp, 9).unwrap();
        assert_eq!(up.dims(), &[1, 9, 9, 9]);
        let flat = up.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for z in 0..9 {
            for y in 0..9 {
                for xx in 0..9 {
                    let d = (flat[(z * 9 + y) * 9 + xx] - flat[xx]).abs();
                    assert!(d < 1e-6, "({z},{y},{xx})");
                }
            }
        }
        assert!(flat[8] > flat[0]);
    }
}
