//! Small building blocks shared by the backbones: linear layers that run as
//! one 2-D matmul with the bias (and activation) fused, LayerNorm (optionally
//! fused with a residual add), the erf-GELU MLP, and convolutions with their
//! eval-mode BatchNorm folded in.

use candle_core::{D, Tensor};
use candle_nn::VarBuilder;

use super::Result;
use super::ops::{self, Act};
use super::weights::get;

/// PyTorch's default LayerNorm / BatchNorm epsilon (the reference uses it everywhere).
pub(crate) const NORM_EPS: f64 = 1e-5;

/// `y = act(x W^T + b)` over the last dimension. Leading dimensions are
/// flattened so the product is a single large GEMM instead of a batched one.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub(crate) fn from_parts(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub(crate) fn new(vb: &VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = get(vb, &[out_dim, in_dim], "weight")?;
        let bias = if bias {
            Some(get(vb, &[out_dim], "bias")?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    pub(crate) fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_act(x, Act::Identity)
    }

    pub(crate) fn forward_act(&self, x: &Tensor, act: Act) -> candle_core::Result<Tensor> {
        let dims = x.dims();
        let in_dim = dims[dims.len() - 1];
        let rows = x.elem_count() / in_dim.max(1);
        let y = x.reshape((rows, in_dim))?.matmul(&self.weight.t()?)?;
        let y = match (&self.bias, act) {
            (Some(b), _) => ops::bias_act(&y, b, 1, act)?,
            (None, Act::Identity) => y,
            (None, Act::Relu) => y.relu()?,
            (None, Act::Gelu) => y.gelu_erf()?,
        };
        let mut out = dims.to_vec();
        if let Some(last) = out.last_mut() {
            *last = self.weight.dim(0)?;
        }
        y.reshape(out)
    }
}

/// LayerNorm (eps 1e-5) over the last dimension, weight and bias packed as
/// (2, C) for the fused CPU kernel.
#[derive(Debug, Clone)]
pub(crate) struct Norm {
    wb: Tensor,
}

impl Norm {
    pub(crate) fn new(vb: &VarBuilder, dim: usize) -> Result<Self> {
        let w = get(vb, &[dim], "weight")?;
        let b = get(vb, &[dim], "bias")?;
        Ok(Self {
            wb: Tensor::stack(&[w, b], 0)?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        ops::layer_norm(x, &self.wb, NORM_EPS as f32, None)
    }

    /// `residual + LN(x)` (Swin V2 post-norm).
    pub(crate) fn forward_residual(
        &self,
        residual: &Tensor,
        x: &Tensor,
    ) -> candle_core::Result<Tensor> {
        ops::layer_norm(x, &self.wb, NORM_EPS as f32, Some(residual))
    }
}

pub(crate) fn layer_norm(vb: &VarBuilder, dim: usize) -> Result<Norm> {
    Norm::new(vb, dim)
}

/// fc1 -> exact (erf) GELU -> fc2.
#[derive(Debug, Clone)]
pub(crate) struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    pub(crate) fn new(vb: &VarBuilder, dim: usize, hidden: usize) -> Result<Self> {
        Ok(Self {
            fc1: Linear::new(&vb.pp("fc1"), dim, hidden, true)?,
            fc2: Linear::new(&vb.pp("fc2"), hidden, dim, true)?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.fc2.forward(&self.fc1.forward_act(x, Act::Gelu)?)
    }
}

/// Conv2d -> BatchNorm2d (eval) -> ReLU, with the batch norm folded into the
/// convolution's weight and bias at load time:
/// `w' = w * g / sqrt(var + eps)`, `b' = (b - mean) * g / sqrt(var + eps) + beta`.
#[derive(Debug, Clone)]
pub(crate) struct ConvBnRelu {
    weight: Tensor,
    /// (out,)
    bias: Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl ConvBnRelu {
    /// `conv` and `bn` are the two sibling modules (e.g. `downsample.0.0` and
    /// `downsample.0.1`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        conv: &VarBuilder,
        bn: &VarBuilder,
        in_c: usize,
        out_c: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let w = get(conv, &[out_c, in_c, kernel, kernel], "weight")?;
        let b = get(conv, &[out_c], "bias")?;
        let gamma = get(bn, &[out_c], "weight")?;
        let beta = get(bn, &[out_c], "bias")?;
        let mean = get(bn, &[out_c], "running_mean")?;
        let var = get(bn, &[out_c], "running_var")?;
        let inv = (var + NORM_EPS)?.sqrt()?.recip()?;
        let g = (gamma * inv)?;
        let weight = w.broadcast_mul(&g.reshape((out_c, 1, 1, 1))?)?;
        let bias = ((b - mean)? * &g)?.add(&beta)?;
        Ok(Self {
            weight,
            bias,
            kernel,
            stride,
            padding,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let out_c = self.weight.dim(0)?;
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        let y = if k == 1 && s == 1 && p == 0 {
            // A 1x1 convolution is a matmul over channels.
            let wm = self.weight.reshape((out_c, c))?;
            wm.broadcast_left(b)?
                .matmul(&x.reshape((b, c, h * w))?)?
                .reshape((b, out_c, h, w))?
        } else if (h + 2 * p) % s == 0 && (w + 2 * p) % s == 0 {
            // im2col from k*k shifted (and, for stride 2, parity-split)
            // views of the padded input, then one (out, c*k*k) x (c*k*k, oh*ow)
            // GEMM: much faster on CPU than the generic conv2d for these
            // few-channel, large-image layers.
            let xp = if p > 0 {
                x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?
            } else {
                x.clone()
            };
            let (hp, wp) = (h + 2 * p, w + 2 * p);
            let (oh, ow) = ((hp - k) / s + 1, (wp - k) / s + 1);
            // [b, c, hp/s, s, wp/s, s]: row kh + s*i = s*(i + kh/s) + kh%s.
            let xs = xp.reshape(vec![b, c, hp / s, s, wp / s, s])?;
            let mut views = Vec::with_capacity(k * k);
            for kh in 0..k {
                for kw in 0..k {
                    let v = xs
                        .narrow(3, kh % s, 1)?
                        .narrow(2, kh / s, oh)?
                        .narrow(5, kw % s, 1)?
                        .narrow(4, kw / s, ow)?
                        .squeeze(5)?
                        .squeeze(3)?;
                    views.push(v);
                }
            }
            let cols = Tensor::stack(&views, 2)?.reshape((b, c * k * k, oh * ow))?;
            self.weight
                .reshape((out_c, c * k * k))?
                .broadcast_left(b)?
                .matmul(&cols)?
                .reshape((b, out_c, oh, ow))?
        } else {
            x.conv2d(&self.weight, p, s, 1, 1)?
        };
        ops::bias_act(&y, &self.bias, 1, Act::Relu)
    }
}

/// Mean over all dimensions after the first two, e.g. (B, C, H, W) -> (B, C).
pub(crate) fn global_avg(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c) = (x.dim(0)?, x.dim(1)?);
    x.reshape((b, c, ()))?.mean(D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The im2col path equals candle's conv2d (+ bias + ReLU) for the
    /// kernel/stride/padding combinations the model uses.
    #[test]
    fn im2col_conv_matches_conv2d() {
        let dev = Device::Cpu;
        for (k, s, p, side) in [(3, 2, 1, 16), (3, 1, 1, 12), (3, 1, 0, 8), (1, 1, 0, 6)] {
            let x = Tensor::randn(0f32, 1.0, (2, 3, side, side), &dev).unwrap();
            let conv = ConvBnRelu {
                weight: Tensor::randn(0f32, 0.3, (5, 3, k, k), &dev).unwrap(),
                bias: Tensor::randn(0f32, 0.1, 5, &dev).unwrap(),
                kernel: k,
                stride: s,
                padding: p,
            };
            let want = x
                .conv2d(&conv.weight, p, s, 1, 1)
                .unwrap()
                .broadcast_add(&conv.bias.reshape((1, 5, 1, 1)).unwrap())
                .unwrap()
                .relu()
                .unwrap();
            let got = conv.forward(&x).unwrap();
            assert_eq!(got.dims(), want.dims());
            let d = crate::model::max_abs_diff(&got, &want);
            assert!(d < 1e-5, "k{k} s{s} p{p}: {d:e}");
        }
    }
}
