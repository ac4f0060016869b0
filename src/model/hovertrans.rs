//! The US and MG branches: the HoVer-Trans variant of the reference (stem,
//! four stages of horizontal/vertical strip attention plus two pixel streams,
//! merge convolutions) and the authors' mapping head to the fusion width.
//! Row and column strips use different layouts; the reshapes below reproduce
//! the reference literally.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::config::HoverConfig;
use super::layers::{ConvBnRelu, Linear, Mlp, Norm, global_avg, layer_norm};
use super::ops;
use super::trace::Trace;
use super::weights::get;
use super::{ModelError, Result};

/// Plain multi-head attention (no qk/v bias, proj with bias), scale hd^-1/2.
#[derive(Debug, Clone)]
struct Attention {
    /// qk and v weights stacked into one (3D, D) projection.
    qkv: Linear,
    proj: Linear,
    num_heads: usize,
    /// hd^-1/2 for every head, (nH,).
    scale: Tensor,
}

impl Attention {
    fn new(vb: &VarBuilder, dim: usize, num_heads: usize) -> Result<Self> {
        let qk = Linear::new(&vb.pp("qk"), dim, 2 * dim, false)?;
        let v = Linear::new(&vb.pp("v"), dim, dim, false)?;
        // qk's rows are (2, heads, hd) and v's (heads, hd): stacked they are
        // the (3, heads, hd) layout of a single qkv projection.
        let w = Tensor::cat(&[qk.weight(), v.weight()], 0)?;
        let scale = ((dim / num_heads) as f64).powf(-0.5);
        Ok(Self {
            qkv: Linear::from_parts(w, None),
            proj: Linear::new(&vb.pp("proj"), dim, dim, true)?,
            num_heads,
            scale: (Tensor::ones(num_heads, candle_core::DType::F32, vb.device())? * scale)?,
        })
    }

    /// x: (B, L, D)
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let nh = self.num_heads;
        let qkv = self.qkv.forward(x)?.reshape((b, l, 3, nh, d / nh))?;
        let qkv = ops::split_heads(&qkv, &self.scale, false)?;
        let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?);
        let attn = ops::softmax_last_dim(&q.matmul(&k.t()?)?)?;
        let out = attn
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, l, d))?;
        self.proj.forward(&out)
    }
}

#[derive(Debug, Clone)]
struct HoverBlock {
    attn_out1: Attention,
    attn_out2: Attention,
    mlp1: Mlp,
    mlp2: Mlp,
    norm_out: Norm,
    norm_mlp: Norm,
    norm_proj: Norm,
    proj1: Linear,
    proj2: Linear,
    attn_in1: Attention,
    attn_in2: Attention,
    norm_in: Norm,
    mlp_in1: Mlp,
    mlp_in2: Mlp,
    norm_mlp_in: Norm,
    /// batch size is not known here; these are the per-stage geometry.
    n: usize,
    p: usize,
    d: usize,
}

/// The four token sets a HoVer block transforms.
struct Tokens {
    /// (B*n, n, Di) pixel stream 1 and 2
    p1: Tensor,
    p2: Tensor,
    /// (B, n, Do) row and column strips
    row: Tensor,
    col: Tensor,
}

impl HoverBlock {
    fn new(cfg: &HoverConfig, vb: &VarBuilder, stage: usize) -> Result<Self> {
        let di = cfg.inner_dim(stage);
        let dout = cfg.outer_dim(stage);
        let (ho, hi) = (cfg.num_heads[stage], cfg.num_inner_heads[stage]);
        let r = cfg.mlp_ratio;
        Ok(Self {
            attn_out1: Attention::new(&vb.pp("attn_out1"), dout, ho)?,
            attn_out2: Attention::new(&vb.pp("attn_out2"), dout, ho)?,
            mlp1: Mlp::new(&vb.pp("mlp1"), dout, r * dout)?,
            mlp2: Mlp::new(&vb.pp("mlp2"), dout, r * dout)?,
            norm_out: layer_norm(&vb.pp("norm_out"), dout)?,
            norm_mlp: layer_norm(&vb.pp("norm_mlp"), dout)?,
            norm_proj: layer_norm(&vb.pp("norm_proj"), di)?,
            proj1: Linear::new(&vb.pp("proj1"), di, di, true)?,
            proj2: Linear::new(&vb.pp("proj2"), di, di, true)?,
            attn_in1: Attention::new(&vb.pp("attn_in1"), di, hi)?,
            attn_in2: Attention::new(&vb.pp("attn_in2"), di, hi)?,
            norm_in: layer_norm(&vb.pp("norm_in"), di)?,
            mlp_in1: Mlp::new(&vb.pp("mlp_in1"), di, r * di)?,
            mlp_in2: Mlp::new(&vb.pp("mlp_in2"), di, r * di)?,
            norm_mlp_in: layer_norm(&vb.pp("norm_mlp_in"), di)?,
            n: cfg.patches(stage),
            p: cfg.patch_sizes[stage],
            d: cfg.dims[stage],
        })
    }

    /// R2P: row strips [b, i, (kh, j, kw, c)] -> [b*n + i, kh, j, kw, c],
    /// swap kh and j -> pixel layout [b*n + i, j, (kh, kw, c)].
    fn row_to_pixel(&self, row: &Tensor) -> candle_core::Result<Tensor> {
        let b = row.dim(0)?;
        let (n, p, d) = (self.n, self.p, self.d);
        row.reshape((b * n, p, n, p, d))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * n, n, p * p * d))
    }

    /// C2P: column strips [b, j, (i, kh, kw, c)] -> [b, j, i, (kh, kw, c)],
    /// swap i and j -> pixel layout [b*n + i, j, (kh, kw, c)].
    fn col_to_pixel(&self, col: &Tensor) -> candle_core::Result<Tensor> {
        let b = col.dim(0)?;
        let (n, p, d) = (self.n, self.p, self.d);
        col.reshape((b, n, n, p * p * d))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * n, n, p * p * d))
    }

    /// Inner attention runs over all n*n pixel tokens of an image.
    fn inner(&self, attn: &Attention, p: &Tensor) -> candle_core::Result<Tensor> {
        let (bn, n, di) = p.dims3()?;
        let x = self.norm_in.forward(p)?.reshape((bn / n, n * n, di))?;
        attn.forward(&x)?.reshape((bn, n, di))
    }

    fn forward(&self, t: Tokens) -> candle_core::Result<Tokens> {
        let Tokens { p1, p2, row, col } = t;
        let add = ops::add;
        let row = add(
            &row,
            &self.attn_out1.forward(&self.norm_out.forward(&row)?)?,
        )?;
        let row = add(&row, &self.mlp1.forward(&self.norm_mlp.forward(&row)?)?)?;
        let col = add(
            &col,
            &self.attn_out2.forward(&self.norm_out.forward(&col)?)?,
        )?;
        let col = add(&col, &self.mlp2.forward(&self.norm_mlp.forward(&col)?)?)?;
        // Both streams add the same projections of the updated strips.
        let from_row = self
            .proj1
            .forward(&self.norm_proj.forward(&self.row_to_pixel(&row)?)?)?;
        let from_col = self
            .proj2
            .forward(&self.norm_proj.forward(&self.col_to_pixel(&col)?)?)?;

        let p1 = add(&p1, &from_row)?;
        let p1 = add(&p1, &self.inner(&self.attn_in1, &p1)?)?;
        let p1 = add(&p1, &from_col)?;
        let p1 = add(&p1, &self.inner(&self.attn_in2, &p1)?)?;
        let p1 = add(&p1, &self.mlp_in1.forward(&self.norm_mlp_in.forward(&p1)?)?)?;

        let p2 = add(&p2, &from_col)?;
        let p2 = add(&p2, &self.inner(&self.attn_in2, &p2)?)?;
        let p2 = add(&p2, &from_row)?;
        let p2 = add(&p2, &self.inner(&self.attn_in1, &p2)?)?;
        let p2 = add(&p2, &self.mlp_in2.forward(&self.norm_mlp_in.forward(&p2)?)?)?;
        Ok(Tokens { p1, p2, row, col })
    }
}

#[derive(Debug, Clone)]
struct HoverStage {
    /// ToEmbed.norm_proj, shared by row and column strips.
    embed_norm: Norm,
    blocks: Vec<HoverBlock>,
    merge: [ConvBnRelu; 3],
    n: usize,
    p: usize,
    d: usize,
}

impl HoverStage {
    fn new(cfg: &HoverConfig, vb: &VarBuilder, stage: usize) -> Result<Self> {
        let d = cfg.dims[stage];
        let blocks = (0..cfg.depths[stage])
            .map(|j| HoverBlock::new(cfg, &vb.pp(format!("blocks.{j}")), stage))
            .collect::<Result<Vec<_>>>()?;
        let m = vb.pp("merge.conv");
        let merge = [
            ConvBnRelu::new(&m.pp("0"), &m.pp("1"), 2 * d, 4 * d, 1, 1, 0)?,
            ConvBnRelu::new(&m.pp("3"), &m.pp("4"), 4 * d, 4 * d, 3, 1, 1)?,
            ConvBnRelu::new(&m.pp("6"), &m.pp("7"), 4 * d, 2 * d, 1, 1, 0)?,
        ];
        Ok(Self {
            embed_norm: layer_norm(&vb.pp("pixel_embed.norm_proj"), cfg.outer_dim(stage))?,
            blocks,
            merge,
            n: cfg.patches(stage),
            p: cfg.patch_sizes[stage],
            d,
        })
    }

    /// Pixel stream [b*n + i, j, (kh, kw, c)] -> image [b, c, (i, kh), (j, kw)].
    fn fold(&self, p: &Tensor, b: usize) -> candle_core::Result<Tensor> {
        let (n, ps, d) = (self.n, self.p, self.d);
        p.reshape(vec![b, n, n, ps, ps, d])?
            .permute(vec![0, 5, 1, 3, 2, 4])?
            .contiguous()?
            .reshape((b, d, n * ps, n * ps))
    }

    /// x: (B, d, S, S) -> (B, 2d, S, S). `pos` = (row_pos, column_pos) at stage 0.
    fn forward(
        &self,
        x: &Tensor,
        pos: Option<(&Tensor, &Tensor)>,
        stage: usize,
        trace: &mut Trace,
    ) -> candle_core::Result<Tensor> {
        let b = x.dim(0)?;
        let (n, p, d) = (self.n, self.p, self.d);
        // [b, c, i, kh, j, kw]
        let x6 = x.reshape(vec![b, d, n, p, n, p])?;
        let pixel =
            x6.permute(vec![0, 2, 4, 3, 5, 1])?
                .contiguous()?
                .reshape((b * n, n, p * p * d))?;
        // Row strip i: (kh, j, kw, c); column strip j: (i, kh, kw, c).
        let row =
            x6.permute(vec![0, 2, 3, 4, 5, 1])?
                .contiguous()?
                .reshape((b, n, p * n * p * d))?;
        let col =
            x6.permute(vec![0, 4, 2, 3, 5, 1])?
                .contiguous()?
                .reshape((b, n, n * p * p * d))?;
        let row = self.embed_norm.forward(&row)?;
        let col = self.embed_norm.forward(&col)?;
        trace.record(|| format!("stage.{stage}.pixel_embed.pixel"), &pixel);
        trace.record(|| format!("stage.{stage}.pixel_embed.row"), &row);
        trace.record(|| format!("stage.{stage}.pixel_embed.col"), &col);
        let (row, col) = match pos {
            Some((rp, cp)) => (row.broadcast_add(rp)?, col.broadcast_add(cp)?),
            None => (row, col),
        };
        let mut t = Tokens {
            p1: pixel.clone(),
            p2: pixel,
            row,
            col,
        };
        for (j, blk) in self.blocks.iter().enumerate() {
            trace.record(|| format!("stage.{stage}.blocks.{j}.in_row"), &t.row);
            trace.record(|| format!("stage.{stage}.blocks.{j}.in_col"), &t.col);
            t = blk.forward(t)?;
            trace.record(|| format!("stage.{stage}.blocks.{j}.pixel1"), &t.p1);
            trace.record(|| format!("stage.{stage}.blocks.{j}.pixel2"), &t.p2);
            trace.record(|| format!("stage.{stage}.blocks.{j}.row"), &t.row);
            trace.record(|| format!("stage.{stage}.blocks.{j}.col"), &t.col);
        }
        let img = Tensor::cat(&[self.fold(&t.p1, b)?, self.fold(&t.p2, b)?], 1)?;
        let y = self.merge[0].forward(&img)?;
        let y = self.merge[1].forward(&y)?;
        self.merge[2].forward(&y)
    }
}

/// HoVer-Trans backbone with the mapping head (`backbone_us` / `backbone_mm`).
#[derive(Debug, Clone)]
pub struct HoverTrans {
    cfg: HoverConfig,
    stem: [ConvBnRelu; 3],
    /// pixel_pos re-laid onto the (1, d0, S0, S0) image, so that adding it
    /// before unfolding equals adding it to the unfolded tensor.
    pixel_pos: Tensor,
    row_pos: Tensor,
    column_pos: Tensor,
    stages: Vec<HoverStage>,
    mapping_head: ConvBnRelu,
}

/// Output of a HoVer-Trans branch.
#[derive(Debug, Clone)]
pub struct HoverOutput {
    /// (B, F) global average of the mapping head.
    pub embedding: Tensor,
    /// (B, F, h, w) mapping head activations (for the CAM).
    pub activations: Tensor,
}

impl HoverTrans {
    pub fn new(cfg: &HoverConfig, vb: &VarBuilder, fusion_dim: usize) -> Result<Self> {
        let c = cfg.in_chans;
        let st = vb.pp("downsample.0");
        let stem = [
            ConvBnRelu::new(&st.pp("0"), &st.pp("1"), c, 2 * c, 3, 2, 1)?,
            ConvBnRelu::new(&st.pp("3"), &st.pp("4"), 2 * c, 4 * c, 3, 2, 1)?,
            ConvBnRelu::new(&st.pp("6"), &st.pp("7"), 4 * c, cfg.dims[0], 3, 1, 1)?,
        ];
        let (d0, p0, n0) = (cfg.dims[0], cfg.patch_sizes[0], cfg.patches(0));
        let s0 = cfg.side(0);
        // pixel_pos is (1, (c, kh, kw), (i, j)); on the image it sits at
        // [c, (i, kh), (j, kw)].
        let pixel_pos = get(vb, &[1, cfg.inner_dim(0), n0 * n0], "pixel_pos")?
            .reshape(vec![1, d0, p0, p0, n0, n0])?
            .permute(vec![0, 1, 4, 2, 5, 3])?
            .contiguous()?
            .reshape((1, d0, s0, s0))?;
        let row_pos = get(vb, &[1, n0, cfg.outer_dim(0)], "row_pos")?;
        let column_pos = get(vb, &[1, n0, cfg.outer_dim(0)], "column_pos")?;
        let stages = (0..cfg.num_stages())
            .map(|i| HoverStage::new(cfg, &vb.pp(format!("stage.{i}")), i))
            .collect::<Result<Vec<_>>>()?;
        let mh = vb.pp("mapping_head");
        let mapping_head = ConvBnRelu::new(
            &mh.pp("0"),
            &mh.pp("1"),
            cfg.out_chans(),
            fusion_dim,
            3,
            1,
            0,
        )?;
        Ok(Self {
            cfg: cfg.clone(),
            stem,
            pixel_pos,
            row_pos,
            column_pos,
            stages,
            mapping_head,
        })
    }

    pub fn config(&self) -> &HoverConfig {
        &self.cfg
    }

    /// x: (B, in_chans, S, S) with S = img_size.
    pub fn forward(&self, x: &Tensor, trace: &mut Trace) -> Result<HoverOutput> {
        let side = self.cfg.img_size;
        let dims = x.dims();
        if dims.len() != 4 || dims[1] != self.cfg.in_chans || dims[2..] != [side, side] {
            return Err(ModelError::Input(format!(
                "image input has shape {dims:?}, expected (B, {}, {side}, {side})",
                self.cfg.in_chans
            )));
        }
        let mut h = x.clone();
        for conv in &self.stem {
            h = conv.forward(&h)?;
        }
        trace.record(|| "downsample.0".into(), &h);
        for (i, stage) in self.stages.iter().enumerate() {
            let pos = if i == 0 {
                h = ops::add(&h, &self.pixel_pos.broadcast_as(h.shape())?.contiguous()?)?;
                Some((&self.row_pos, &self.column_pos))
            } else {
                h = h.avg_pool2d(2)?;
                trace.record(|| format!("downsample.{i}"), &h);
                None
            };
            h = stage.forward(&h, pos, i, trace)?;
            trace.record(|| format!("stage.{i}"), &h);
        }
        let activations = self.mapping_head.forward(&h)?;
        trace.record(|| "mapping_head".into(), &activations);
        let embedding = global_avg(&activations)?;
        trace.record(|| "out".into(), &embedding);
        Ok(HoverOutput {
            embedding,
            activations,
        })
    }
}
