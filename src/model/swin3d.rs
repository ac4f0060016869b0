//! The MRI branch: a 3-D Swin Transformer V2 (`SwinTransformerV2_3D` of the
//! reference), including its quirks: the colliding `relative_position_index`
//! and the `attn_mask` are taken from the checkpoint, patch merging keeps 4 of
//! the 8 sub-voxels, attention is cosine attention with a clamped logit scale,
//! the blocks are residual post-norm, GELU is the exact erf form.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use super::config::SwinConfig;
use super::layers::{Linear, Mlp, Norm, layer_norm};
use super::ops;
use super::trace::Trace;
use super::weights::{get, get_dtype};
use super::{ModelError, Result};

/// ln(1/0.01) as PyTorch computes it in f32 (the clamp bound of logit_scale).
const LOGIT_SCALE_MAX: f32 = 4.605_170_2;

/// Conv3d with kernel = stride = patch, written as patch extraction + one
/// matmul (Candle has no Conv3d), then LayerNorm.
#[derive(Debug, Clone)]
struct PatchEmbed3d {
    /// (in_chans * p^3, embed) — the conv kernel flattened in (c, kz, ky, kx)
    /// order and transposed.
    proj_w: Tensor,
    proj_b: Tensor,
    norm: Norm,
    patch: usize,
    in_chans: usize,
    embed: usize,
}

impl PatchEmbed3d {
    fn new(cfg: &SwinConfig, vb: &VarBuilder) -> Result<Self> {
        let (p, c, e) = (cfg.patch_size, cfg.in_chans, cfg.embed_dim);
        let w = get(&vb.pp("proj"), &[e, c, p, p, p], "weight")?;
        let proj_w = w.reshape((e, c * p * p * p))?.t()?.contiguous()?;
        let proj_b = get(&vb.pp("proj"), &[e], "bias")?;
        Ok(Self {
            proj_w,
            proj_b,
            norm: layer_norm(&vb.pp("norm"), e)?,
            patch: p,
            in_chans: c,
            embed: e,
        })
    }

    /// (B, C, D, H, W) -> tokens (B, G^3, E) in (z, y, x) raster order.
    fn forward(&self, x: &Tensor, trace: &mut Trace) -> candle_core::Result<Tensor> {
        let (b, c, d, _, _) = x.dims5()?;
        let p = self.patch;
        let g = d / p;
        // [b, c, gz, kz, gy, ky, gx, kx] -> [b, gz, gy, gx, c, kz, ky, kx]
        let patches = x
            .reshape(vec![b, c, g, p, g, p, g, p])?
            .permute(vec![0, 2, 4, 6, 1, 3, 5, 7])?
            .contiguous()?
            .reshape((b * g * g * g, self.in_chans * p * p * p))?;
        let y = patches
            .matmul(&self.proj_w)?
            .broadcast_add(&self.proj_b)?
            .reshape((b, g * g * g, self.embed))?;
        trace.record_with(
            || "patch_embed.proj".into(),
            || {
                y.transpose(1, 2)?
                    .contiguous()?
                    .reshape((b, self.embed, g, g, g))
            },
        )?;
        let y = self.norm.forward(&y)?;
        trace.record(|| "patch_embed".into(), &y);
        Ok(y)
    }
}

/// Swin V2 window attention with everything input-independent precomputed.
#[derive(Debug, Clone)]
struct WindowAttention3d {
    /// qkv with bias cat(q_bias, 0, v_bias).
    qkv: Linear,
    proj: Linear,
    /// exp(min(logit_scale, ln 100)) per head, (nH,).
    scale: Tensor,
    /// 16*sigmoid(cpb_mlp(table))[index] (+ attn_mask): (nWb, nH, N, N), where
    /// nWb is 1 for unshifted blocks and the number of windows otherwise.
    bias: Tensor,
    num_heads: usize,
}

impl WindowAttention3d {
    fn new(
        cfg: &SwinConfig,
        vb: &VarBuilder,
        dim: usize,
        num_heads: usize,
        window: usize,
        mask: Option<Tensor>,
    ) -> Result<Self> {
        let n = window * window * window;
        let t = 2 * cfg.window_size - 1;
        let qkv_w = get(&vb.pp("qkv"), &[3 * dim, dim], "weight")?;
        let q_bias = get(vb, &[dim], "q_bias")?;
        let v_bias = get(vb, &[dim], "v_bias")?;
        let k_bias = q_bias.zeros_like()?;
        let qkv_b = Tensor::cat(&[&q_bias, &k_bias, &v_bias], 0)?;
        let qkv = Linear::from_parts(qkv_w, Some(qkv_b));
        let proj = Linear::new(&vb.pp("proj"), dim, dim, true)?;

        let logit_scale = get(vb, &[num_heads, 1, 1], "logit_scale")?;
        let scale = logit_scale
            .clamp(f32::NEG_INFINITY, LOGIT_SCALE_MAX)?
            .exp()?
            .reshape(num_heads)?;

        // Continuous position bias: evaluate the MLP once on the stored
        // coordinate table and gather with the stored (colliding) index.
        let table = get(vb, &[1, t, t, t, 3], "relative_coords_table")?.reshape((t * t * t, 3))?;
        let cpb = vb.pp("cpb_mlp");
        let fc0 = Linear::new(&cpb.pp("0"), 3, cfg.cpb_hidden, true)?;
        let fc2 = Linear::new(&cpb.pp("2"), cfg.cpb_hidden, num_heads, false)?;
        let table_bias = fc2.forward(&fc0.forward(&table)?.relu()?)?; // (T^3, nH)
        let index = get_dtype(vb, &[n, n], "relative_position_index", DType::I64)?;
        let rows = t * t * t;
        let max_index = index.flatten_all()?.to_vec1::<i64>()?;
        if let Some(bad) = max_index.iter().find(|&&i| i < 0 || i as usize >= rows) {
            return Err(ModelError::Config {
                key: format!("{}.relative_position_index", vb.prefix()),
                msg: format!("index {bad} outside the {rows}-row coordinate table"),
            });
        }
        let gathered = table_bias.index_select(&index.flatten_all()?, 0)?; // (N*N, nH)
        let rel = gathered.reshape((n, n, num_heads))?.permute((2, 0, 1))?;
        let rel = (candle_nn::ops::sigmoid(&rel.contiguous()?)? * 16.0)?;
        let bias = match mask {
            Some(mask) => {
                let nw = mask.dim(0)?;
                rel.unsqueeze(0)?
                    .broadcast_add(&mask.reshape((nw, 1, n, n))?)?
                    .contiguous()?
            }
            None => rel.unsqueeze(0)?.contiguous()?,
        };
        Ok(Self {
            qkv,
            proj,
            scale,
            bias,
            num_heads,
        })
    }

    /// x: (B * nW, N, C) windows, all windows of one sample contiguous.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (bw, n, c) = x.dims3()?;
        let nh = self.num_heads;
        let hd = c / nh;
        let qkv = self.qkv.forward(x)?.reshape((bw, n, 3, nh, hd))?;
        // (3, bw, nH, N, hd): q and k L2-normalised (cosine attention), q
        // times the clamped logit scale of its head.
        let qkv = ops::split_heads(&qkv, &self.scale, true)?;
        let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
        let attn = q.matmul(&k.t()?)?; // (bw, nH, N, N)
        let attn = ops::softmax_with_bias(&attn, &self.bias)?;
        let out = attn
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((bw, n, c))?;
        self.proj.forward(&out)
    }
}

#[derive(Debug, Clone)]
struct SwinBlock3d {
    attn: WindowAttention3d,
    norm1: Norm,
    norm2: Norm,
    mlp: Mlp,
    window: usize,
    /// Gather indices for shift + window partition and their inverse.
    partition: Option<(Tensor, Tensor)>,
}

impl SwinBlock3d {
    fn new(cfg: &SwinConfig, vb: &VarBuilder, layer: usize, block: usize) -> Result<Self> {
        let dim = cfg.dim(layer);
        let grid = cfg.grid(layer);
        let (window, shift) = cfg.window_shift(layer, block);
        let n = window * window * window;
        let mask = if shift > 0 {
            let nw = (grid / window).pow(3);
            Some(get(vb, &[nw, n, n], "attn_mask")?)
        } else {
            None
        };
        let attn =
            WindowAttention3d::new(cfg, &vb.pp("attn"), dim, cfg.num_heads[layer], window, mask)?;
        Ok(Self {
            attn,
            norm1: layer_norm(&vb.pp("norm1"), dim)?,
            norm2: layer_norm(&vb.pp("norm2"), dim)?,
            mlp: Mlp::new(&vb.pp("mlp"), dim, dim * cfg.mlp_ratio)?,
            window,
            partition: partition_indices(grid, window, shift, vb.device())?,
        })
    }

    /// x: (B, G^3, C) -> same.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l, c) = x.dims3()?;
        let n = self.window * self.window * self.window;
        // Cyclic shift + window partition as one gather, and window reverse +
        // reverse shift as its inverse gather.
        let windows = match &self.partition {
            Some((fwd, _)) => x.index_select(fwd, 1)?,
            None => x.clone(),
        };
        let a = self.attn.forward(&windows.reshape((b * l / n, n, c))?)?;
        let a = a.reshape((b, l, c))?;
        let a = match &self.partition {
            Some((_, inv)) => a.index_select(inv, 1)?,
            None => a,
        };
        let x = self.norm1.forward_residual(x, &a)?;
        self.norm2.forward_residual(&x, &self.mlp.forward(&x)?)
    }
}

/// Token gather of `torch.roll(x, -shift)` followed by window_partition:
/// `fwd[t]` is the grid token (z, y, x raster) that lands at window-ordered
/// position t (windows in (g0, g1, g2) block order, tokens in (a0, a1, a2)
/// order inside a window). `inv` is its inverse (window_reverse + roll back).
/// `None` where both are the identity (one window covering the whole grid).
fn partition_indices(
    grid: usize,
    window: usize,
    shift: usize,
    device: &candle_core::Device,
) -> candle_core::Result<Option<(Tensor, Tensor)>> {
    if grid == window && shift == 0 {
        return Ok(None);
    }
    let (g, w) = (grid, window);
    let gw = g / w;
    let l = g * g * g;
    let mut fwd = vec![0u32; l];
    let mut t = 0;
    for w0 in 0..gw {
        for w1 in 0..gw {
            for w2 in 0..gw {
                for a0 in 0..w {
                    for a1 in 0..w {
                        for a2 in 0..w {
                            let z = (w0 * w + a0 + shift) % g;
                            let y = (w1 * w + a1 + shift) % g;
                            let xx = (w2 * w + a2 + shift) % g;
                            fwd[t] = ((z * g + y) * g + xx) as u32;
                            t += 1;
                        }
                    }
                }
            }
        }
    }
    let mut inv = vec![0u32; l];
    for (t, &src) in fwd.iter().enumerate() {
        inv[src as usize] = t as u32;
    }
    Ok(Some((
        Tensor::from_vec(fwd, l, device)?,
        Tensor::from_vec(inv, l, device)?,
    )))
}

/// Keeps sub-voxels (0,0,0), (1,0,0), (0,1,0), (1,1,0) of every 2x2x2 cell
/// (odd positions on the last axis are dropped, as in the reference), then
/// Linear(4C -> 2C, no bias) and LayerNorm(2C).
#[derive(Debug, Clone)]
struct PatchMerging3d {
    reduction: Linear,
    norm: Norm,
    grid: usize,
}

impl PatchMerging3d {
    fn new(vb: &VarBuilder, dim: usize, grid: usize) -> Result<Self> {
        Ok(Self {
            reduction: Linear::new(&vb.pp("reduction"), 4 * dim, 2 * dim, false)?,
            norm: layer_norm(&vb.pp("norm"), 2 * dim)?,
            grid,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, _, c) = x.dims3()?;
        let h = self.grid / 2;
        // [b, i0, a0, i1, a1, i2, a2, c] with a2 = 0 -> [b, i0, i1, i2, a1, a0, c]:
        // channel block s = 2*a1 + a0 gives the reference's concatenation order.
        let x = x
            .reshape(vec![b, h, 2, h, 2, h, 2, c])?
            .narrow(6, 0, 1)?
            .squeeze(6)?
            .permute(vec![0, 1, 3, 5, 4, 2, 6])?
            .contiguous()?
            .reshape((b, h * h * h, 4 * c))?;
        self.norm.forward(&self.reduction.forward(&x)?)
    }
}

#[derive(Debug, Clone)]
struct BasicLayer3d {
    blocks: Vec<SwinBlock3d>,
    downsample: Option<PatchMerging3d>,
}

/// `SwinTransformerV2_3D` up to the pooled embedding (its own heads are unused
/// by `Model3`).
#[derive(Debug, Clone)]
pub struct SwinTransformerV2_3d {
    cfg: SwinConfig,
    patch_embed: PatchEmbed3d,
    layers: Vec<BasicLayer3d>,
    norm: Norm,
}

/// Output of the MRI branch.
#[derive(Debug, Clone)]
pub struct SwinOutput {
    /// (B, F) mean of the final normed tokens.
    pub embedding: Tensor,
    /// (B, G^3, F) final normed tokens on the last grid (for the CAM).
    pub tokens: Tensor,
}

impl SwinTransformerV2_3d {
    pub fn new(cfg: &SwinConfig, vb: &VarBuilder) -> Result<Self> {
        let patch_embed = PatchEmbed3d::new(cfg, &vb.pp("patch_embed"))?;
        let nl = cfg.num_layers();
        let mut layers = Vec::with_capacity(nl);
        for i in 0..nl {
            let lvb = vb.pp(format!("layers.{i}"));
            let blocks = (0..cfg.depths[i])
                .map(|j| SwinBlock3d::new(cfg, &lvb.pp(format!("blocks.{j}")), i, j))
                .collect::<Result<Vec<_>>>()?;
            let downsample = if i + 1 < nl {
                Some(PatchMerging3d::new(
                    &lvb.pp("downsample"),
                    cfg.dim(i),
                    cfg.grid(i),
                )?)
            } else {
                None
            };
            layers.push(BasicLayer3d { blocks, downsample });
        }
        let norm = layer_norm(&vb.pp("norm"), cfg.num_features())?;
        Ok(Self {
            cfg: cfg.clone(),
            patch_embed,
            layers,
            norm,
        })
    }

    pub fn config(&self) -> &SwinConfig {
        &self.cfg
    }

    /// Side of the last token grid (3 at every size used so far).
    pub fn final_grid(&self) -> usize {
        self.cfg.grid(self.cfg.num_layers() - 1)
    }

    /// x: (B, in_chans, D, D, D) with D = img_size.
    pub fn forward(&self, x: &Tensor, trace: &mut Trace) -> Result<SwinOutput> {
        let side = self.cfg.img_size;
        let dims = x.dims();
        if dims.len() != 5 || dims[1] != self.cfg.in_chans || dims[2..] != [side, side, side] {
            return Err(ModelError::Input(format!(
                "MRI input has shape {dims:?}, expected (B, {}, {side}, {side}, {side})",
                self.cfg.in_chans
            )));
        }
        let mut h = self.patch_embed.forward(x, trace)?;
        for (i, layer) in self.layers.iter().enumerate() {
            for (j, blk) in layer.blocks.iter().enumerate() {
                h = blk.forward(&h)?;
                trace.record(|| format!("layers.{i}.blocks.{j}"), &h);
            }
            if let Some(ds) = &layer.downsample {
                h = ds.forward(&h)?;
            }
            trace.record(|| format!("layers.{i}"), &h);
        }
        let tokens = self.norm.forward(&h)?;
        trace.record(|| "norm".into(), &tokens);
        let embedding = tokens.mean(1)?;
        trace.record(|| "out".into(), &embedding);
        Ok(SwinOutput { embedding, tokens })
    }
}
