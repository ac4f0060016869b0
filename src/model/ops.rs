//! CPU fast paths for the two elementwise hot spots of the model: exact-form
//! GELU (erf) and the attention softmax. Candle's CPU versions call scalar
//! libm `erf`/`exp` per element; these use branch-free rational/polynomial
//! approximations (a few ulp in f32, far below the parity tolerances) that
//! the compiler vectorises, spread over rayon threads. Other devices, dtypes
//! or layouts fall back to candle's own ops.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Elements per rayon task: large enough to amortise scheduling.
const CHUNK: usize = 1 << 14;

/// erf(x) for f32: Eigen/XLA's rational approximation on [-4, 4] (erf is
/// +-1 in f32 beyond that).
#[inline(always)]
fn erf_f32(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = p * x2 + -2.101_024e-6;
    p = p * x2 + -5.692_506_4e-5;
    p = p * x2 + -7.349_906_3e-4;
    p = p * x2 + -2.954_6e-3;
    p = p * x2 + -1.609_603_3e-2;
    p *= x;
    let mut q = x2 * -1.456_607_2e-5 + -2.133_740_5e-4;
    q = q * x2 + -1.682_827e-3;
    q = q * x2 + -7.373_329e-3;
    q = q * x2 + -1.426_474e-2;
    p / q
}

/// exp(x) for f32 (Cephes expf polynomial), inputs clamped to the normal
/// range. Rounding and the float-to-int step use the 1.5*2^23 trick (the
/// rounded integer lands in the low mantissa bits), so the whole function is
/// plain float/integer arithmetic that vectorises.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    let x = x.clamp(-87.0, 88.0);
    let kf = x * LOG2E + MAGIC;
    let k = kf - MAGIC; // round(x * log2 e)
    let ki = (kf.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let r = x - k * 0.693_359_4 - k * -2.121_944_4e-4;
    let mut y = 1.987_569_1e-4_f32;
    y = y * r + 1.398_199_9e-3;
    y = y * r + 8.333_452e-3;
    y = y * r + 4.166_579_6e-2;
    y = y * r + 1.666_666_5e-1;
    y = y * r + 0.5;
    let y = y * r * r + r + 1.0;
    y * f32::from_bits((ki.wrapping_add(127) as u32) << 23)
}

/// Lanes of the manual reductions: independent accumulators let the compiler
/// vectorise max and sum (strict f32 semantics forbid reassociating a single
/// accumulator).
const LANES: usize = 8;

#[inline(always)]
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf_f32(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// Activation fused into a bias add.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Act {
    Identity,
    Relu,
    Gelu,
}

#[inline(always)]
fn lane_max(s: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let mut chunks = s.chunks_exact(LANES);
    for c in &mut chunks {
        for k in 0..LANES {
            m[k] = m[k].max(c[k]);
        }
    }
    let head = m.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    chunks.remainder().iter().fold(head, |a, &b| a.max(b))
}

#[inline(always)]
fn lane_sum(s: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = s.chunks_exact(LANES);
    for c in &mut chunks {
        for k in 0..LANES {
            acc[k] += c[k];
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// Sum of squared deviations from `mean`.
#[inline(always)]
fn lane_sq_dev(s: &[f32], mean: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = s.chunks_exact(LANES);
    for c in &mut chunks {
        for k in 0..LANES {
            let d = c[k] - mean;
            acc[k] += d * d;
        }
    }
    let tail: f32 = chunks
        .remainder()
        .iter()
        .map(|&v| (v - mean) * (v - mean))
        .sum();
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn softmax_inplace(d: &mut [f32]) {
    let max = lane_max(d);
    for o in d.iter_mut() {
        *o = exp_f32(*o - max);
    }
    let inv = 1.0 / lane_sum(d);
    for o in d.iter_mut() {
        *o *= inv;
    }
}

#[inline(always)]
fn softmax_body(src: &[f32], bias: Option<&[f32]>, dst: &mut [f32], n: usize) {
    match bias {
        Some(b) => {
            for ((s, b), d) in src
                .chunks_exact(n)
                .zip(b.chunks_exact(n))
                .zip(dst.chunks_exact_mut(n))
            {
                for ((o, &x), &y) in d.iter_mut().zip(s).zip(b) {
                    *o = x + y;
                }
                softmax_inplace(d);
            }
        }
        None => {
            for (s, d) in src.chunks_exact(n).zip(dst.chunks_exact_mut(n)) {
                d.copy_from_slice(s);
                softmax_inplace(d);
            }
        }
    }
}

#[inline(always)]
fn act_body(src: &[f32], bias: &[f32], dst: &mut [f32], act: Act) {
    // `bias` has the row length (Linear) or length 1 broadcast (conv plane).
    let n = bias.len();
    macro_rules! run {
        ($f:expr) => {
            if n == 1 {
                let b = bias[0];
                for (o, &x) in dst.iter_mut().zip(src) {
                    *o = $f(x + b);
                }
            } else {
                for (s, d) in src.chunks_exact(n).zip(dst.chunks_exact_mut(n)) {
                    for ((o, &x), &b) in d.iter_mut().zip(s).zip(bias) {
                        *o = $f(x + b);
                    }
                }
            }
        };
    }
    match act {
        Act::Identity => run!(|v: f32| v),
        Act::Relu => run!(|v: f32| v.max(0.0)),
        Act::Gelu => run!(gelu),
    }
}

#[inline(always)]
fn layer_norm_body(src: &[f32], res: Option<&[f32]>, wb: &[f32], dst: &mut [f32], eps: f32) {
    let n = wb.len() / 2;
    let (w, b) = wb.split_at(n);
    for (r, (s, d)) in src.chunks_exact(n).zip(dst.chunks_exact_mut(n)).enumerate() {
        let mean = lane_sum(s) / n as f32;
        let var = lane_sq_dev(s, mean) / n as f32;
        let rstd = 1.0 / (var + eps).sqrt();
        for (((o, &x), &w), &b) in d.iter_mut().zip(s).zip(w).zip(b) {
            *o = (x - mean) * rstd * w + b;
        }
        if let Some(res) = res {
            for (o, &x) in d.iter_mut().zip(&res[r * n..(r + 1) * n]) {
                *o += x;
            }
        }
    }
}

#[inline(always)]
fn add_body(a: &[f32], b: &[f32], dst: &mut [f32]) {
    for ((o, &x), &y) in dst.iter_mut().zip(a).zip(b) {
        *o = x + y;
    }
}

/// `(b, n, parts, nh, hd)` -> plane `(part, b, h)` of `(parts, b, nh, n, hd)`,
/// L2-normalising q and k rows (cosine attention) and scaling q per head.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn split_heads_body(
    src: &[f32],
    dst: &mut [f32],
    plane: usize,
    dims: [usize; 5],
    scale: &[f32],
    cosine: bool,
) {
    let [b, n, parts, nh, hd] = dims;
    let part = plane / (b * nh);
    let bi = (plane / nh) % b;
    let h = plane % nh;
    for t in 0..n {
        let off = ((bi * n + t) * parts + part) * nh * hd + h * hd;
        let s = &src[off..off + hd];
        let d = &mut dst[t * hd..(t + 1) * hd];
        let mut f = if part == 0 { scale[h] } else { 1.0 };
        if cosine && part < 2 {
            let norm = lane_sum_sq(s).sqrt().max(NORMALIZE_EPS);
            f /= norm;
        }
        for (o, &x) in d.iter_mut().zip(s) {
            *o = x * f;
        }
    }
}

#[inline(always)]
fn lane_sum_sq(s: &[f32]) -> f32 {
    lane_sq_dev(s, 0.0)
}

/// F.normalize's epsilon.
const NORMALIZE_EPS: f32 = 1e-12;

/// Emit `$name` = `$body` compiled for AVX2+FMA when the CPU has it, else baseline.
macro_rules! simd_dispatch {
    ($name:ident, $body:ident, ($($arg:ident : $ty:ty),*)) => {
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    $body($($arg),*)
                }
                if has_avx2() {
                    // SAFETY: the CPU supports avx2 and fma.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

simd_dispatch!(softmax_k, softmax_body, (src: &[f32], bias: Option<&[f32]>, dst: &mut [f32], n: usize));
simd_dispatch!(act_k, act_body, (src: &[f32], bias: &[f32], dst: &mut [f32], act: Act));
simd_dispatch!(layer_norm_k, layer_norm_body, (src: &[f32], res: Option<&[f32]>, wb: &[f32], dst: &mut [f32], eps: f32));
simd_dispatch!(add_k, add_body, (a: &[f32], b: &[f32], dst: &mut [f32]));
simd_dispatch!(split_heads_k, split_heads_body, (src: &[f32], dst: &mut [f32], plane: usize, dims: [usize; 5], scale: &[f32], cosine: bool));

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Contiguous f32 data of a CPU storage.
fn f32_data<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Ok(&v[start..end]),
        _ => Err(candle_core::Error::Msg(format!(
            "{op}: expects contiguous f32"
        ))),
    }
}

/// Rows per rayon task for rows of length `n`.
fn rows_per_task(n: usize) -> usize {
    (CHUNK / n.max(1)).max(1)
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "her2map-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let src = f32_data(s, l, self.name())?;
        let n = l.dims().last().copied().unwrap_or(1).max(1);
        let step = rows_per_task(n) * n;
        let mut dst = vec![0f32; src.len()];
        dst.par_chunks_mut(step)
            .zip(src.par_chunks(step))
            .for_each(|(d, s)| softmax_k(s, None, d, n));
        Ok((CpuStorage::F32(dst), l.shape().clone()))
    }
}

/// softmax(attn + bias) with attn (bw, nh, n, n) and bias (nwb, nh, n, n):
/// window w uses bias plane w % nwb.
struct SoftmaxBias;

impl CustomOp2 for SoftmaxBias {
    fn name(&self) -> &'static str {
        "her2map-softmax-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let src = f32_data(s1, l1, self.name())?;
        let bias = f32_data(s2, l2, self.name())?;
        let n = l1.dims().last().copied().unwrap_or(1).max(1);
        let per_window = l2.dims()[1..].iter().product::<usize>();
        let nwb = bias.len() / per_window.max(1);
        let mut dst = vec![0f32; src.len()];
        // One task per window: the bias slice is then a single plane.
        dst.par_chunks_mut(per_window)
            .zip(src.par_chunks(per_window))
            .enumerate()
            .for_each(|(w, (d, s))| {
                let p = w % nwb;
                softmax_k(s, Some(&bias[p * per_window..(p + 1) * per_window]), d, n)
            });
        Ok((CpuStorage::F32(dst), l1.shape().clone()))
    }
}

/// act(x + bias), bias broadcast along `channel_dim` (trailing dims = `inner`).
struct BiasAct {
    inner: usize,
    act: Act,
}

impl CustomOp2 for BiasAct {
    fn name(&self) -> &'static str {
        "her2map-bias-act"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let src = f32_data(s1, l1, self.name())?;
        let bias = f32_data(s2, l2, self.name())?;
        let c = bias.len();
        let mut dst = vec![0f32; src.len()];
        if self.inner == 1 {
            let step = rows_per_task(c) * c;
            dst.par_chunks_mut(step)
                .zip(src.par_chunks(step))
                .for_each(|(d, s)| act_k(s, bias, d, self.act));
        } else {
            // Rows of `inner` values share one bias value (channel r % c).
            let inner = self.inner;
            dst.par_chunks_mut(inner)
                .zip(src.par_chunks(inner))
                .enumerate()
                .with_min_len(rows_per_task(inner))
                .for_each(|(r, (d, s))| act_k(s, &bias[r % c..r % c + 1], d, self.act));
        }
        Ok((CpuStorage::F32(dst), l1.shape().clone()))
    }
}

/// LayerNorm over the last dim with packed (2, C) weight/bias, optionally
/// added to a residual: res + LN(x).
struct LayerNormOp {
    eps: f32,
}

impl CustomOp2 for LayerNormOp {
    fn name(&self) -> &'static str {
        "her2map-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let src = f32_data(s1, l1, "layer-norm")?;
        let wb = f32_data(s2, l2, "layer-norm")?;
        let n = wb.len() / 2;
        let step = rows_per_task(n) * n;
        let mut dst = vec![0f32; src.len()];
        dst.par_chunks_mut(step)
            .zip(src.par_chunks(step))
            .for_each(|(d, s)| layer_norm_k(s, None, wb, d, self.eps));
        Ok((CpuStorage::F32(dst), l1.shape().clone()))
    }
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "her2map-residual-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let res = f32_data(s1, l1, "residual-layer-norm")?;
        let src = f32_data(s2, l2, "residual-layer-norm")?;
        let wb = f32_data(s3, l3, "residual-layer-norm")?;
        let n = wb.len() / 2;
        let step = rows_per_task(n) * n;
        let mut dst = vec![0f32; src.len()];
        dst.par_chunks_mut(step)
            .zip(src.par_chunks(step))
            .zip(res.par_chunks(step))
            .for_each(|((d, s), r)| layer_norm_k(s, Some(r), wb, d, self.eps));
        Ok((CpuStorage::F32(dst), l2.shape().clone()))
    }
}

struct Add;

impl CustomOp2 for Add {
    fn name(&self) -> &'static str {
        "her2map-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let a = f32_data(s1, l1, self.name())?;
        let b = f32_data(s2, l2, self.name())?;
        let mut dst = vec![0f32; a.len()];
        dst.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
            .for_each(|(d, (a, b))| add_k(a, b, d));
        Ok((CpuStorage::F32(dst), l1.shape().clone()))
    }
}

/// (b, n, parts, nh, hd) -> (parts, b, nh, n, hd); part 0 scaled per head,
/// parts 0 and 1 L2-normalised first when `cosine`.
struct SplitHeads {
    cosine: bool,
}

impl CustomOp2 for SplitHeads {
    fn name(&self) -> &'static str {
        "her2map-split-heads"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let src = f32_data(s1, l1, self.name())?;
        let scale = f32_data(s2, l2, self.name())?;
        let d = l1.dims();
        let dims = [d[0], d[1], d[2], d[3], d[4]];
        let [b, n, parts, nh, hd] = dims;
        let mut dst = vec![0f32; src.len()];
        dst.par_chunks_mut(n * hd)
            .enumerate()
            .with_min_len(rows_per_task(n * hd))
            .for_each(|(plane, out)| split_heads_k(src, out, plane, dims, scale, self.cosine));
        Ok((CpuStorage::F32(dst), Shape::from(vec![parts, b, nh, n, hd])))
    }
}

fn fast_path(xs: &[&Tensor]) -> bool {
    xs.iter()
        .all(|x| x.device().is_cpu() && x.dtype() == DType::F32 && x.is_contiguous())
}

/// 0.5 x (1 + erf(x / sqrt 2)), PyTorch's exact GELU.
#[cfg(test)]
pub(crate) fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    let zero = Tensor::zeros(1, DType::F32, x.device())?;
    bias_act(&x.flatten_all()?, &zero, 0, Act::Gelu)?.reshape(x.shape())
}

/// Softmax over the last dimension.
pub(crate) fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    if fast_path(&[x]) && x.rank() > 0 {
        x.apply_op1_no_bwd(&Softmax)
    } else {
        candle_nn::ops::softmax(x, D::Minus1)
    }
}

/// softmax(attn + bias) over the last dim; attn (bw, nh, n, n), bias
/// (nwb, nh, n, n) broadcast over windows (window w uses plane w % nwb).
pub(crate) fn softmax_with_bias(attn: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    if fast_path(&[attn, bias]) {
        attn.apply_op2_no_bwd(bias, &SoftmaxBias)
    } else {
        let (bw, nh, n, _) = attn.dims4()?;
        let nwb = bias.dim(0)?;
        let a = attn
            .reshape((bw / nwb, nwb, nh, n, n))?
            .broadcast_add(bias)?
            .reshape((bw, nh, n, n))?;
        candle_nn::ops::softmax_last_dim(&a)
    }
}

/// act(x + bias) with `bias` of length x.dim(channel_dim), broadcast over
/// every other dim (Linear: last dim; conv NCHW: dim 1).
pub(crate) fn bias_act(
    x: &Tensor,
    bias: &Tensor,
    channel_dim: usize,
    act: Act,
) -> candle_core::Result<Tensor> {
    let inner: usize = x.dims()[channel_dim + 1..].iter().product();
    if fast_path(&[x, bias]) {
        return x.apply_op2_no_bwd(bias, &BiasAct { inner, act });
    }
    let mut shape = vec![1usize; x.rank()];
    shape[channel_dim] = bias.elem_count();
    let y = x.broadcast_add(&bias.reshape(shape)?)?;
    match act {
        Act::Identity => Ok(y),
        Act::Relu => y.relu(),
        Act::Gelu => y.gelu_erf(),
    }
}

/// LayerNorm over the last dim; `wb` = stack(weight, bias), (2, C).
/// With `residual`, returns residual + LN(x).
pub(crate) fn layer_norm(
    x: &Tensor,
    wb: &Tensor,
    eps: f32,
    residual: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let op = LayerNormOp { eps };
    match residual {
        Some(r) if fast_path(&[r, x, wb]) && r.shape() == x.shape() => {
            r.apply_op3_no_bwd(x, wb, &op)
        }
        None if fast_path(&[x, wb]) => x.apply_op2_no_bwd(wb, &op),
        _ => {
            let y = candle_nn::ops::layer_norm(&x.contiguous()?, &wb.get(0)?, &wb.get(1)?, eps)?;
            match residual {
                Some(r) => r + y,
                None => Ok(y),
            }
        }
    }
}

/// a + b for same-shape tensors.
pub(crate) fn add(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if fast_path(&[a, b]) && a.shape() == b.shape() {
        a.apply_op2_no_bwd(b, &Add)
    } else {
        a + b
    }
}

/// (b, n, parts, nh, hd) -> (parts, b, nh, n, hd), part 0 (q) multiplied by
/// `scale` (nh,), q and k L2-normalised first when `cosine` (Swin V2).
pub(crate) fn split_heads(x: &Tensor, scale: &Tensor, cosine: bool) -> candle_core::Result<Tensor> {
    if fast_path(&[x, scale]) && x.rank() == 5 {
        return x.apply_op2_no_bwd(scale, &SplitHeads { cosine });
    }
    let (_, _, parts, nh, _) = x.dims5()?;
    let t = x.permute((2, 0, 3, 1, 4))?;
    let norm = |v: Tensor| -> candle_core::Result<Tensor> {
        if cosine {
            let n = v
                .sqr()?
                .sum_keepdim(D::Minus1)?
                .sqrt()?
                .maximum(NORMALIZE_EPS as f64)?;
            v.broadcast_div(&n)
        } else {
            Ok(v)
        }
    };
    let q = norm(t.get(0)?)?.broadcast_mul(&scale.reshape((1, nh, 1, 1))?)?;
    let mut out = vec![q];
    for p in 1..parts {
        let v = t.get(p)?;
        out.push(if p == 1 { norm(v)? } else { v });
    }
    Tensor::stack(&out, 0)?.contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn erf_and_exp_are_accurate() {
        let mut worst_erf = 0f64;
        let mut worst_exp = 0f64;
        for i in -60_000..=60_000 {
            let x = i as f32 * 1e-4; // [-6, 6]
            let e = erf_f32(x) as f64;
            worst_erf = worst_erf.max((e - erf_ref(x as f64)).abs());
            let y = x * 14.0; // [-84, 84]
            let r = (y as f64).exp();
            worst_exp = worst_exp.max(((exp_f32(y) as f64) - r).abs() / r);
        }
        assert!(worst_erf < 1e-6, "erf abs error {worst_erf:e}");
        assert!(worst_exp < 1e-6, "exp rel error {worst_exp:e}");
    }

    /// erf in f64 from its Taylor series (|x| < 3) or continued fraction.
    fn erf_ref(x: f64) -> f64 {
        let a = x.abs();
        let v = if a < 3.0 {
            let mut term = a;
            let mut sum = a;
            let mut k = 0.0;
            loop {
                k += 1.0;
                term *= -a * a / k;
                let t = term / (2.0 * k + 1.0);
                sum += t;
                if t.abs() < 1e-17 {
                    break;
                }
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc continued fraction (Lentz), converges fast for a >= 3.
            let mut f = 0.0;
            for k in (1..60).rev() {
                f = (k as f64 / 2.0) / (a + f);
            }
            1.0 - (-a * a).exp() / (std::f64::consts::PI.sqrt() * (a + f))
        };
        v.copysign(x)
    }

    use super::tests_support::strided;

    #[test]
    fn fused_kernels_match_fallbacks() {
        let dev = Device::Cpu;
        let qkv = Tensor::randn(0f32, 1.0, (2, 37, 3, 4, 8), &dev).unwrap();
        let scale = Tensor::new(&[0.5f32, 2.0, 1.0, 3.0], &dev).unwrap();
        for cosine in [false, true] {
            let a = split_heads(&qkv, &scale, cosine).unwrap();
            let b = split_heads(&strided(&qkv), &scale, cosine).unwrap();
            assert!(
                crate::model::max_abs_diff(&a, &b) < 1e-6,
                "split_heads cosine={cosine}"
            );
        }
        let x = Tensor::randn(0f32, 2.0, (6, 5, 24), &dev).unwrap();
        let r = Tensor::randn(0f32, 1.0, (6, 5, 24), &dev).unwrap();
        let wb = Tensor::randn(1f32, 0.1, (2, 24), &dev).unwrap();
        let a = layer_norm(&x, &wb, 1e-5, Some(&r)).unwrap();
        let b = layer_norm(&strided(&x), &wb, 1e-5, Some(&r)).unwrap();
        assert!(crate::model::max_abs_diff(&a, &b) < 1e-5, "layer_norm");
        let bias = Tensor::randn(0f32, 1.0, 5, &dev).unwrap();
        for act in [Act::Identity, Act::Relu, Act::Gelu] {
            let a = bias_act(&x, &bias, 1, act).unwrap();
            let b = bias_act(&strided(&x), &bias, 1, act).unwrap();
            assert!(
                crate::model::max_abs_diff(&a, &b) < 1e-5,
                "bias_act {act:?}"
            );
        }
        let attn = Tensor::randn(0f32, 3.0, (6, 2, 9, 9), &dev).unwrap();
        let bias = Tensor::randn(0f32, 3.0, (3, 2, 9, 9), &dev).unwrap();
        let a = softmax_with_bias(&attn, &bias).unwrap();
        let b = softmax_with_bias(&strided(&attn), &bias).unwrap();
        assert!(
            crate::model::max_abs_diff(&a, &b) < 1e-6,
            "softmax_with_bias"
        );
    }

    #[test]
    fn fast_ops_match_candle() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 3.0, (7, 33, 27), &dev).unwrap();
        let d = crate::model::max_abs_diff(&gelu_erf(&x).unwrap(), &x.gelu_erf().unwrap());
        assert!(d < 1e-5, "gelu {d:e}");
        let masked = (x.clone() - 100.0).unwrap();
        let y = Tensor::cat(&[&x, &masked], 2).unwrap();
        let d = crate::model::max_abs_diff(
            &(softmax_last_dim(&y).unwrap()),
            &(candle_nn::ops::softmax(&y, D::Minus1).unwrap()),
        );
        assert!(d < 1e-6, "softmax {d:e}");
    }
}

#[cfg(test)]
mod tests_support {
    use candle_core::Tensor;

    /// A non-contiguous tensor with the same values, which takes the
    /// candle fallback path (the one other devices use).
    pub(super) fn strided(x: &Tensor) -> Tensor {
        let r = x.rank();
        let y = x.transpose(0, r - 1).unwrap().contiguous().unwrap();
        let y = y.transpose(0, r - 1).unwrap();
        assert!(!y.is_contiguous());
        y
    }
}
