//! The resampling and channel layers of V-Net and U-Net: max and average pooling, nearest and
//! trilinear up-sampling, and a window over the channel axis (slice, zero-pad, concat).
//!
//! Every primitive is linear in its differentiated input, and each comes with its adjoint as another
//! primitive: avg_pool3d <-> avg_pool3d_backward, upsample3d <-> upsample3d_backward,
//! max_pool3d_gather <-> max_pool3d_scatter (at fixed argmax positions), channel_window <-> the
//! window that puts it back. So every backward rule is a differentiable op and second order works.
//!
//! Layout NCDHW; spatial axes are indexed 0 = D, 1 = H, 2 = W in the per-axis settings.

use crate::backend::{Backend, UnaryOp};
use crate::cpu64::{filled, reserved, Cpu64, CpuTensor};
use crate::norm::{BatchStatistic, Statistic};
use crate::ops::{rule, tangent};
use crate::var::{sum_tangents, Var};
use crate::{Error, Result, Shape};
use std::sync::Arc;

/// A pooling window: `kernel` and `stride` per spatial axis (D, H, W); no padding, so an output
/// axis has `(input - kernel) / stride + 1` positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window3d {
    pub kernel: [usize; 3],
    pub stride: [usize; 3],
}

impl Window3d {
    /// The pooled shape of `input` (checked: rank 5, non-zero kernel and stride, input >= kernel).
    pub fn output_shape(&self, op: &'static str, input: &Shape) -> Result<Shape> {
        let [n, c, d, h, w] = dims5(op, input)?;
        let mut out = [n, c, 0, 0, 0];
        for a in 0..3 {
            let (size, k, s) = ([d, h, w][a], self.kernel[a], self.stride[a]);
            if k == 0 || s == 0 || size < k {
                return Err(Error::InvalidArgument {
                    op,
                    message: format!(
                        "kernel {:?} stride {:?} does not fit input {input}",
                        self.kernel, self.stride
                    ),
                });
            }
            out[2 + a] = (size - k) / s + 1;
        }
        Ok(Shape::from(out))
    }

    fn volume(&self) -> usize {
        self.kernel.iter().product()
    }
}

/// How up-sampling interpolates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upsample {
    /// out[o] = x[floor(o / scale)].
    Nearest,
    /// Trilinear with align_corners = false, as PyTorch: source coordinate (o + 0.5) / scale - 0.5,
    /// clamped at 0; the upper neighbour is clamped to the last index.
    Trilinear,
}

impl Upsample {
    pub fn name(self) -> &'static str {
        match self {
            Upsample::Nearest => "upsample_nearest",
            Upsample::Trilinear => "upsample_trilinear",
        }
    }
}

/// The up-sampled shape of `input` by integer `scale` per spatial axis.
pub fn upsample_shape(op: &'static str, input: &Shape, scale: [usize; 3]) -> Result<Shape> {
    let [n, c, d, h, w] = dims5(op, input)?;
    if scale.contains(&0) {
        return Err(Error::InvalidArgument {
            op,
            message: format!("scale {scale:?} must be positive"),
        });
    }
    let scaled = |size: usize, s: usize| size.saturating_mul(s);
    Shape::checked(
        op,
        &[
            n,
            c,
            scaled(d, scale[0]),
            scaled(h, scale[1]),
            scaled(w, scale[2]),
        ],
    )
}

/// [N, C, D, H, W] of a rank-5 shape, or an error naming `op`.
pub fn dims5(op: &'static str, s: &Shape) -> Result<[usize; 5]> {
    match *s.dims() {
        [n, c, d, h, w] => Ok([n, c, d, h, w]),
        _ => Err(Error::InvalidArgument {
            op,
            message: format!("expected an [N, C, D, H, W] tensor, got shape {s}"),
        }),
    }
}

/// Trilinear weight of input index `i` in output index `o` along one axis (align_corners = false,
/// integer scale `s`, `size` input positions). In exact integer arithmetic: the source coordinate
/// times 2s is t = 2o + 1 - s (clamped at 0), its floor i0 = t div 2s, lambda = (t - 2s i0) / 2s.
pub fn linear_weight(o: usize, i: usize, s: usize, size: usize) -> f64 {
    let t = (2 * o + 1).saturating_sub(s);
    let i0 = t / (2 * s);
    let lambda = (t - 2 * s * i0) as f64 / (2 * s) as f64;
    let i1 = (i0 + 1).min(size - 1);
    let mut weight = 0.0;
    if i == i0 {
        weight += 1.0 - lambda;
    }
    if i == i1 {
        weight += lambda;
    }
    weight
}

/// The primitives of this family. `Cpu64` implements them as plain loops (the reference).
pub trait LayerBackend: Backend {
    /// The maximum of each window.
    fn max_pool3d(&self, x: &Self::Tensor, window: Window3d) -> Result<Self::Tensor>;
    /// out[o] = v[argmax of x over window o]: ties go to the first maximum in (d, h, w) order, as
    /// PyTorch. `v` has x's shape. max_pool3d(x) = max_pool3d_gather(x, x).
    fn max_pool3d_gather(
        &self,
        x: &Self::Tensor,
        v: &Self::Tensor,
        window: Window3d,
    ) -> Result<Self::Tensor>;
    /// The adjoint of the gather: out[i] = sum of g[o] over the windows o whose argmax is i.
    fn max_pool3d_scatter(
        &self,
        x: &Self::Tensor,
        g: &Self::Tensor,
        window: Window3d,
    ) -> Result<Self::Tensor>;
    /// The mean of each window.
    fn avg_pool3d(&self, x: &Self::Tensor, window: Window3d) -> Result<Self::Tensor>;
    /// The adjoint of avg_pool3d: out[i] = sum of g[o] / |window| over the windows o holding i.
    fn avg_pool3d_backward(
        &self,
        g: &Self::Tensor,
        window: Window3d,
        input: &Shape,
    ) -> Result<Self::Tensor>;
    fn upsample3d(
        &self,
        x: &Self::Tensor,
        mode: Upsample,
        scale: [usize; 3],
    ) -> Result<Self::Tensor>;
    /// The adjoint of upsample3d: out[i] = sum over o of weight(o, i) g[o].
    fn upsample3d_backward(
        &self,
        g: &Self::Tensor,
        mode: Upsample,
        scale: [usize; 3],
        input: &Shape,
    ) -> Result<Self::Tensor>;
    /// out[n, c, ...] = x[n, c + start, ...] where 0 <= c + start < C, else 0; `channels` output
    /// channels. A slice for start >= 0, a zero padding in front for start < 0.
    fn channel_window(
        &self,
        x: &Self::Tensor,
        start: isize,
        channels: usize,
    ) -> Result<Self::Tensor>;
    /// out = x a + b with a, b of one shape, [1, C, 1, 1, 1] (per channel) or [N, C, 1, 1, 1]
    /// (per sample and channel), broadcast over the spatial axes.
    fn channel_affine(
        &self,
        x: &Self::Tensor,
        a: &Self::Tensor,
        b: &Self::Tensor,
    ) -> Result<Self::Tensor>;
    /// relu(x a + b) with a, b per channel ([1, C, 1, 1, 1]): a batch norm and its ReLU in one
    /// pass. NaN stays NaN.
    fn channel_affine_relu(
        &self,
        x: &Self::Tensor,
        a: &Self::Tensor,
        b: &Self::Tensor,
    ) -> Result<Self::Tensor>;
    /// Per channel, summed over the batch and the spatial axes of x and m [N, C, D, H, W]: row 0
    /// sum(x m), row 1 sum(m); shape [2, C]. A batch's moments are channel_dots(x, x) (sums of
    /// x^2 and of x), an affine map's parameter gradients channel_dots(x, g).
    fn channel_dots(&self, x: &Self::Tensor, m: &Self::Tensor) -> Result<Self::Tensor>;
    /// A batch norm's statistic `s` per channel ([C]: mean, variance, scale or shift, see
    /// [`BatchStatistic`]) from the moments channel_dots(x, x) ([2, C]), gamma and beta ([C];
    /// beta only read for the shift): the dozen small ops of the statistics in one launch.
    fn batch_statistic(
        &self,
        moments: &Self::Tensor,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        s: BatchStatistic,
    ) -> Result<Self::Tensor>;
    /// The gradient of batch_statistic for an incoming `g` ([C]) with respect to the moments
    /// ([2, C]) with `wrt_moments`, else to gamma ([C]); beta's is g (shift) or zero.
    fn batch_statistic_backward(
        &self,
        moments: &Self::Tensor,
        gamma: &Self::Tensor,
        g: &Self::Tensor,
        s: BatchStatistic,
        wrt_moments: bool,
    ) -> Result<Self::Tensor>;
    /// A batch norm's per-channel statistics in training mode from the moments
    /// channel_dots(x, x) ([2, C]), gamma and beta ([C]): [scale, shift, mean, biased variance]
    /// as [`BatchStatistic::value`] gives them, in one launch.
    fn batch_norm_statistics(
        &self,
        moments: &Self::Tensor,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        p: FusedBatchNorm,
    ) -> Result<[Self::Tensor; 4]>;
    /// A batch norm's first-order gradient in training mode (see [`FusedBatchNorm`]): for
    /// y = x a + b per channel (relu of it with `relu`; `y` is that output), a and b from the
    /// moments channel_dots(x, x) ([2, C]) and gamma ([C]), and an incoming g of y's shape:
    /// (d x, d gamma, d beta), what the composed ops' backward gives, in a few launches.
    fn batch_norm_backward(
        &self,
        xyg: [&Self::Tensor; 3],
        moments: &Self::Tensor,
        gamma: &Self::Tensor,
        p: FusedBatchNorm,
    ) -> Result<[Self::Tensor; 3]>;
}

/// The settings of a batch norm's fused launches ([`LayerBackend::batch_norm_statistics`],
/// [`LayerBackend::batch_norm_backward`]): elements per channel, eps, and whether a ReLU follows
/// the normalisation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FusedBatchNorm {
    pub count: usize,
    pub eps: f64,
    pub relu: bool,
}

impl FusedBatchNorm {
    /// The [`BatchStatistic`] of this batch norm.
    pub fn statistic(&self, statistic: Statistic) -> BatchStatistic {
        BatchStatistic {
            statistic,
            count: self.count,
            eps: self.eps,
        }
    }

    /// Per channel, from the moments (s2, s1), gamma and the sums (d a, d b) = channel_dots(x,
    /// g'), g' = g [y > 0] with a ReLU: [d gamma, d beta, a, p, q] with d x = g' a + x p + q.
    /// The scale's and the shift's gradients of [`BatchStatistic::gradient`] added, then the
    /// moments' own backward (d x = 2 x d s2 + d s1).
    pub fn coefficients(&self, s2: f64, s1: f64, gamma: f64, d_a: f64, d_b: f64) -> [f64; 5] {
        let of = |statistic| self.statistic(statistic);
        let from_a = of(Statistic::Scale).gradient(s2, s1, gamma, d_a);
        let from_b = of(Statistic::Shift).gradient(s2, s1, gamma, d_b);
        let a = of(Statistic::Scale).value(s2, s1, gamma, 0.0);
        [
            from_a[2] + from_b[2],
            d_b,
            a,
            2.0 * (from_a[0] + from_b[0]),
            from_a[1] + from_b[1],
        ]
    }
}

/// Checks the operands of the batch-statistic ops: moments [2, C], gamma and the third
/// operand (beta or the incoming gradient) [C]. Returns C.
pub fn statistic_channels(moments: &Shape, gamma: &Shape, third: &Shape) -> Result<usize> {
    let c = gamma.dims().first().copied().unwrap_or(0);
    let ok = gamma.dims() == [c] && third.dims() == [c] && moments.dims() == [2, c];
    if !ok {
        return Err(Error::Shape {
            op: "batch_statistic",
            lhs: moments.clone(),
            rhs: gamma.clone(),
            reason: format!("moments must be [2, C] and gamma, {third} [C]"),
        });
    }
    Ok(c)
}

/// Checks the operands of channel_dots; returns [N, C, D H W].
pub fn dots_dims(x: &Shape, m: &Shape) -> Result<[usize; 3]> {
    let [n, c, d, h, w] = dims5("channel_dots", x)?;
    if x != m {
        return Err(Error::Shape {
            op: "channel_dots",
            lhs: x.clone(),
            rhs: m.clone(),
            reason: "the shapes must be equal".into(),
        });
    }
    Ok([n, c, d * h * w])
}

/// Checks the operands of channel_affine_relu: a and b per channel.
pub fn affine_relu_entries(x: &Shape, a: &Shape, b: &Shape) -> Result<usize> {
    let entries = affine_entries(x, a, b)?;
    if a.dims()[0] != 1 {
        return Err(Error::Shape {
            op: "channel_affine_relu",
            lhs: x.clone(),
            rhs: a.clone(),
            reason: "a and b must be per channel, [1, C, 1, 1, 1]".into(),
        });
    }
    Ok(entries)
}

/// Checks the operands of channel_affine; returns how many (sample, channel) entries a holds.
pub fn affine_entries(x: &Shape, a: &Shape, b: &Shape) -> Result<usize> {
    let [n, c, ..] = dims5("channel_affine", x)?;
    let ok = a == b && (a.dims() == [1, c, 1, 1, 1] || a.dims() == [n, c, 1, 1, 1]);
    if !ok {
        return Err(Error::Shape {
            op: "channel_affine",
            lhs: x.clone(),
            rhs: a.clone(),
            reason: format!(
                "a and b (shapes {a} and {b}) must both be [1, C, 1, 1, 1] or [N, C, 1, 1, 1]"
            ),
        });
    }
    Ok(a.numel())
}

/// The window positions of output index `o` along one axis.
fn window(o: usize, k: usize, s: usize) -> std::ops::Range<usize> {
    o * s..o * s + k
}

/// Row-major flat index of (n*C + c, d, h, w) in a volume of spatial size [d, h, w].
fn flat(nc: usize, p: [usize; 3], size: [usize; 3]) -> usize {
    ((nc * size[0] + p[0]) * size[1] + p[1]) * size[2] + p[2]
}

/// Calls f(nc, output position) for every output element, in order.
fn for_each_position(nc: usize, size: [usize; 3], mut f: impl FnMut(usize, [usize; 3])) {
    if nc == 0 || size.contains(&0) {
        // No positions; an axis of 2^50 beside one of 0 would otherwise loop for ever.
        return;
    }
    for b in 0..nc {
        for d in 0..size[0] {
            for h in 0..size[1] {
                for w in 0..size[2] {
                    f(b, [d, h, w]);
                }
            }
        }
    }
}

fn spatial(s: &Shape) -> [usize; 3] {
    [s.dims()[2], s.dims()[3], s.dims()[4]]
}

/// The flat index in x of the first maximum of window `o` of volume `nc`; a NaN is the maximum
/// (the first NaN, if several), as in numpy's `max` and PyTorch's max pooling.
fn argmax(x: &CpuTensor, nc: usize, o: [usize; 3], win: Window3d) -> usize {
    let above = |a: f64, b: f64| a > b || (a.is_nan() && !b.is_nan());
    let size = spatial(&x.shape);
    let mut best: Option<usize> = None;
    for d in window(o[0], win.kernel[0], win.stride[0]) {
        for h in window(o[1], win.kernel[1], win.stride[1]) {
            for w in window(o[2], win.kernel[2], win.stride[2]) {
                let i = flat(nc, [d, h, w], size);
                if best.is_none_or(|b| above(x.data[i], x.data[b])) {
                    best = Some(i);
                }
            }
        }
    }
    best.expect("a window holds at least one position")
}

fn cpu(data: Vec<f64>, shape: Shape) -> CpuTensor {
    CpuTensor {
        data: Arc::new(data),
        shape,
    }
}

fn same_shape(op: &'static str, a: &Shape, b: &Shape) -> Result<()> {
    if a != b {
        return Err(Error::Shape {
            op,
            lhs: a.clone(),
            rhs: b.clone(),
            reason: "the shapes must be equal".into(),
        });
    }
    Ok(())
}

impl LayerBackend for Cpu64 {
    fn max_pool3d(&self, x: &CpuTensor, window: Window3d) -> Result<CpuTensor> {
        self.max_pool3d_gather(x, x, window)
    }

    fn max_pool3d_gather(&self, x: &CpuTensor, v: &CpuTensor, win: Window3d) -> Result<CpuTensor> {
        let out = win.output_shape("max_pool3d", &x.shape)?;
        same_shape("max_pool3d_gather", &x.shape, &v.shape)?;
        let mut data = Vec::with_capacity(out.numel());
        for_each_position(out.dims()[0] * out.dims()[1], spatial(&out), |b, o| {
            data.push(v.data[argmax(x, b, o, win)]);
        });
        Ok(cpu(data, out))
    }

    fn max_pool3d_scatter(&self, x: &CpuTensor, g: &CpuTensor, win: Window3d) -> Result<CpuTensor> {
        let out = win.output_shape("max_pool3d_scatter", &x.shape)?;
        same_shape("max_pool3d_scatter", &out, &g.shape)?;
        let mut data = vec![0.0; x.shape.numel()];
        let mut k = 0;
        for_each_position(out.dims()[0] * out.dims()[1], spatial(&out), |b, o| {
            data[argmax(x, b, o, win)] += g.data[k];
            k += 1;
        });
        Ok(cpu(data, x.shape.clone()))
    }

    fn avg_pool3d(&self, x: &CpuTensor, win: Window3d) -> Result<CpuTensor> {
        let out = win.output_shape("avg_pool3d", &x.shape)?;
        let size = spatial(&x.shape);
        let mut data = Vec::with_capacity(out.numel());
        for_each_position(out.dims()[0] * out.dims()[1], spatial(&out), |b, o| {
            let mut sum = 0.0;
            for d in window(o[0], win.kernel[0], win.stride[0]) {
                for h in window(o[1], win.kernel[1], win.stride[1]) {
                    for w in window(o[2], win.kernel[2], win.stride[2]) {
                        sum += x.data[flat(b, [d, h, w], size)];
                    }
                }
            }
            data.push(sum / win.volume() as f64);
        });
        Ok(cpu(data, out))
    }

    fn avg_pool3d_backward(
        &self,
        g: &CpuTensor,
        win: Window3d,
        input: &Shape,
    ) -> Result<CpuTensor> {
        let out = win.output_shape("avg_pool3d_backward", input)?;
        same_shape("avg_pool3d_backward", &out, &g.shape)?;
        let size = spatial(input);
        let mut data = vec![0.0; input.numel()];
        let mut k = 0;
        for_each_position(out.dims()[0] * out.dims()[1], spatial(&out), |b, o| {
            for d in window(o[0], win.kernel[0], win.stride[0]) {
                for h in window(o[1], win.kernel[1], win.stride[1]) {
                    for w in window(o[2], win.kernel[2], win.stride[2]) {
                        data[flat(b, [d, h, w], size)] += g.data[k] / win.volume() as f64;
                    }
                }
            }
            k += 1;
        });
        Ok(cpu(data, input.clone()))
    }

    fn upsample3d(&self, x: &CpuTensor, mode: Upsample, scale: [usize; 3]) -> Result<CpuTensor> {
        let out = upsample_shape(mode.name(), &x.shape, scale)?;
        let size = spatial(&x.shape);
        let mut data = reserved(mode.name(), out.numel())?;
        for_each_position(out.dims()[0] * out.dims()[1], spatial(&out), |b, o| {
            let mut sum = 0.0;
            for_each_source(mode, o, scale, size, |i, weight| {
                sum += weight * x.data[flat(b, i, size)];
            });
            data.push(sum);
        });
        Ok(cpu(data, out))
    }

    fn upsample3d_backward(
        &self,
        g: &CpuTensor,
        mode: Upsample,
        scale: [usize; 3],
        input: &Shape,
    ) -> Result<CpuTensor> {
        let out = upsample_shape(mode.name(), input, scale)?;
        same_shape("upsample3d_backward", &out, &g.shape)?;
        let size = spatial(input);
        let mut data = vec![0.0; input.numel()];
        let mut k = 0;
        for_each_position(out.dims()[0] * out.dims()[1], spatial(&out), |b, o| {
            for_each_source(mode, o, scale, size, |i, weight| {
                data[flat(b, i, size)] += weight * g.data[k];
            });
            k += 1;
        });
        Ok(cpu(data, input.clone()))
    }

    fn channel_window(&self, x: &CpuTensor, start: isize, channels: usize) -> Result<CpuTensor> {
        let [n, c, d, h, w] = dims5("channel_window", &x.shape)?;
        let volume = d * h * w;
        let out = Shape::checked("channel_window", &[n, channels, d, h, w])?;
        let mut data = filled("channel_window", out.numel(), 0.0)?;
        for b in 0..n {
            for k in 0..channels {
                let src = k as isize + start;
                if (0..c as isize).contains(&src) {
                    let from = (b * c + src as usize) * volume;
                    let to = (b * channels + k) * volume;
                    data[to..to + volume].copy_from_slice(&x.data[from..from + volume]);
                }
            }
        }
        Ok(cpu(data, out))
    }

    fn channel_affine(&self, x: &CpuTensor, a: &CpuTensor, b: &CpuTensor) -> Result<CpuTensor> {
        let entries = affine_entries(&x.shape, &a.shape, &b.shape)?;
        let volume: usize = x.shape.dims()[2..].iter().product();
        let data = x
            .data
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let k = (i / volume) % entries;
                v * a.data[k] + b.data[k]
            })
            .collect();
        Ok(cpu(data, x.shape.clone()))
    }

    fn channel_affine_relu(
        &self,
        x: &CpuTensor,
        a: &CpuTensor,
        b: &CpuTensor,
    ) -> Result<CpuTensor> {
        affine_relu_entries(&x.shape, &a.shape, &b.shape)?;
        let y = self.channel_affine(x, a, b)?;
        self.unary(UnaryOp::Relu, &y)
    }

    fn channel_dots(&self, x: &CpuTensor, m: &CpuTensor) -> Result<CpuTensor> {
        let [_, c, volume] = dots_dims(&x.shape, &m.shape)?;
        let mut sums = vec![0.0; 2 * c];
        for (i, (&xv, &mv)) in x.data.iter().zip(m.data.iter()).enumerate() {
            let k = (i / volume) % c;
            sums[k] += xv * mv;
            sums[c + k] += mv;
        }
        Ok(cpu(sums, Shape::from([2, c])))
    }

    fn batch_statistic(
        &self,
        moments: &CpuTensor,
        gamma: &CpuTensor,
        beta: &CpuTensor,
        s: BatchStatistic,
    ) -> Result<CpuTensor> {
        let ch = statistic_channels(&moments.shape, &gamma.shape, &beta.shape)?;
        let m = &moments.data;
        let data = (0..ch)
            .map(|k| s.value(m[k], m[ch + k], gamma.data[k], beta.data[k]))
            .collect();
        Ok(cpu(data, Shape::from([ch])))
    }

    fn batch_statistic_backward(
        &self,
        moments: &CpuTensor,
        gamma: &CpuTensor,
        g: &CpuTensor,
        s: BatchStatistic,
        wrt_moments: bool,
    ) -> Result<CpuTensor> {
        let ch = statistic_channels(&moments.shape, &gamma.shape, &g.shape)?;
        let m = &moments.data;
        let d: Vec<[f64; 3]> = (0..ch)
            .map(|k| s.gradient(m[k], m[ch + k], gamma.data[k], g.data[k]))
            .collect();
        Ok(if wrt_moments {
            let data = d.iter().map(|d| d[0]).chain(d.iter().map(|d| d[1]));
            cpu(data.collect(), Shape::from([2, ch]))
        } else {
            cpu(d.iter().map(|d| d[2]).collect(), Shape::from([ch]))
        })
    }

    fn batch_norm_statistics(
        &self,
        moments: &CpuTensor,
        gamma: &CpuTensor,
        beta: &CpuTensor,
        p: FusedBatchNorm,
    ) -> Result<[CpuTensor; 4]> {
        let of = |s| self.batch_statistic(moments, gamma, beta, p.statistic(s));
        Ok([
            of(Statistic::Scale)?,
            of(Statistic::Shift)?,
            of(Statistic::Mean)?,
            of(Statistic::Variance)?,
        ])
    }

    fn batch_norm_backward(
        &self,
        [x, y, g]: [&CpuTensor; 3],
        moments: &CpuTensor,
        gamma: &CpuTensor,
        p: FusedBatchNorm,
    ) -> Result<[CpuTensor; 3]> {
        let [_, c, volume] = dots_dims(&x.shape, &g.shape)?;
        dots_dims(&x.shape, &y.shape)?;
        statistic_channels(&moments.shape, &gamma.shape, &gamma.shape)?;
        let masked: Vec<f64> = if p.relu {
            let mask = y.data.iter().map(|&v| UnaryOp::ReluMask.apply(v));
            g.data.iter().zip(mask).map(|(g, m)| g * m).collect()
        } else {
            g.data.to_vec()
        };
        let masked = cpu(masked, g.shape.clone());
        let dots = self.channel_dots(x, &masked)?;
        let (m, d) = (&moments.data, &dots.data);
        let coefficients: Vec<[f64; 5]> = (0..c)
            .map(|k| p.coefficients(m[k], m[c + k], gamma.data[k], d[k], d[c + k]))
            .collect();
        let dx = x
            .data
            .iter()
            .zip(masked.data.iter())
            .enumerate()
            .map(|(i, (&xv, &gv))| {
                let [_, _, a, px, q] = coefficients[(i / volume) % c];
                gv * a + xv * px + q
            });
        let row = |r: usize| {
            cpu(
                coefficients.iter().map(|k| k[r]).collect(),
                Shape::from([c]),
            )
        };
        Ok([cpu(dx.collect(), x.shape.clone()), row(0), row(1)])
    }
}

/// Calls f(input position, weight) for every input position output position `o` reads.
fn for_each_source(
    mode: Upsample,
    o: [usize; 3],
    scale: [usize; 3],
    size: [usize; 3],
    mut f: impl FnMut([usize; 3], f64),
) {
    match mode {
        Upsample::Nearest => f([o[0] / scale[0], o[1] / scale[1], o[2] / scale[2]], 1.0),
        Upsample::Trilinear => {
            // Every input index with a non-zero weight is within one of o / scale.
            let near = |a: usize| {
                let c = o[a] / scale[a];
                c.saturating_sub(1)..(c + 2).min(size[a])
            };
            for d in near(0) {
                let wd = linear_weight(o[0], d, scale[0], size[0]);
                for h in near(1) {
                    let wh = linear_weight(o[1], h, scale[1], size[1]);
                    for w in near(2) {
                        let ww = linear_weight(o[2], w, scale[2], size[2]);
                        if wd * wh * ww != 0.0 {
                            f([d, h, w], wd * wh * ww);
                        }
                    }
                }
            }
        }
    }
}

/// The differentiable layers.
impl<B: LayerBackend> Var<B> {
    /// Max pooling; the gradient goes to the first maximum of each window.
    pub fn max_pool3d(&self, window: Window3d) -> Result<Self> {
        let value = self.backend().max_pool3d(self.value(), window)?;
        Ok(Var::from_op_with_jvp(
            "max_pool3d",
            value,
            &[self],
            rule(move |x, _, g| Ok(vec![Some(x[0].max_pool3d_scatter(g, window)?)])),
            tangent(move |x, _, d| x[0].max_pool3d_gather(d[0].as_ref().expect("moves"), window)),
        ))
    }

    /// `v` read at the argmax positions of `self`'s windows. Linear in `v`; piecewise constant in
    /// `self` (zero derivative almost everywhere).
    pub fn max_pool3d_gather(&self, v: &Var<B>, window: Window3d) -> Result<Self> {
        let value = self
            .backend()
            .max_pool3d_gather(self.value(), v.value(), window)?;
        Ok(Var::from_op_with_jvp(
            "max_pool3d_gather",
            value,
            &[self, v],
            rule(move |xv, _, g| Ok(vec![None, Some(xv[0].max_pool3d_scatter(g, window)?)])),
            // Piecewise constant in the pooled tensor: only v's tangent moves the result.
            tangent(move |xv, y, d| match &d[1] {
                Some(t) => xv[0].max_pool3d_gather(t, window),
                None => Var::zeros(y.backend(), y.shape()),
            }),
        ))
    }

    /// `g` (pooled shape) scattered to the argmax positions of `self`'s windows: the adjoint of
    /// max_pool3d_gather, so each is the other's backward.
    pub fn max_pool3d_scatter(&self, g: &Var<B>, window: Window3d) -> Result<Self> {
        let value = self
            .backend()
            .max_pool3d_scatter(self.value(), g.value(), window)?;
        Ok(Var::from_op_with_jvp(
            "max_pool3d_scatter",
            value,
            &[self, g],
            rule(move |xg, _, d| Ok(vec![None, Some(xg[0].max_pool3d_gather(d, window)?)])),
            tangent(move |xg, y, d| match &d[1] {
                Some(t) => xg[0].max_pool3d_scatter(t, window),
                None => Var::zeros(y.backend(), y.shape()),
            }),
        ))
    }

    pub fn avg_pool3d(&self, window: Window3d) -> Result<Self> {
        let value = self.backend().avg_pool3d(self.value(), window)?;
        Ok(Var::from_op_with_jvp(
            "avg_pool3d",
            value,
            &[self],
            rule(move |x, _, g| Ok(vec![Some(g.avg_pool3d_backward(window, x[0].shape())?)])),
            tangent(move |_, _, d| d[0].as_ref().expect("moves").avg_pool3d(window)),
        ))
    }

    /// The adjoint of avg_pool3d, from the pooled shape back to `input`.
    pub fn avg_pool3d_backward(&self, window: Window3d, input: &Shape) -> Result<Self> {
        let value = self
            .backend()
            .avg_pool3d_backward(self.value(), window, input)?;
        Ok(Var::from_op_with_jvp(
            "avg_pool3d_backward",
            value,
            &[self],
            rule(move |_, _, g| Ok(vec![Some(g.avg_pool3d(window)?)])),
            tangent(move |_, y, d| {
                d[0].as_ref()
                    .expect("moves")
                    .avg_pool3d_backward(window, y.shape())
            }),
        ))
    }

    pub fn upsample3d(&self, mode: Upsample, scale: [usize; 3]) -> Result<Self> {
        let value = self.backend().upsample3d(self.value(), mode, scale)?;
        Ok(Var::from_op_with_jvp(
            mode.name(),
            value,
            &[self],
            rule(move |x, _, g| {
                Ok(vec![Some(g.upsample3d_backward(
                    mode,
                    scale,
                    x[0].shape(),
                )?)])
            }),
            tangent(move |_, _, d| d[0].as_ref().expect("moves").upsample3d(mode, scale)),
        ))
    }

    /// The adjoint of upsample3d, from the up-sampled shape back to `input`.
    pub fn upsample3d_backward(
        &self,
        mode: Upsample,
        scale: [usize; 3],
        input: &Shape,
    ) -> Result<Self> {
        let value = self
            .backend()
            .upsample3d_backward(self.value(), mode, scale, input)?;
        Ok(Var::from_op_with_jvp(
            "upsample3d_backward",
            value,
            &[self],
            rule(move |_, _, g| Ok(vec![Some(g.upsample3d(mode, scale)?)])),
            tangent(move |_, y, d| {
                d[0].as_ref()
                    .expect("moves")
                    .upsample3d_backward(mode, scale, y.shape())
            }),
        ))
    }

    /// See [`LayerBackend::channel_window`]; its adjoint is the window that puts the channels back.
    pub fn channel_window(&self, start: isize, channels: usize) -> Result<Self> {
        let value = self
            .backend()
            .channel_window(self.value(), start, channels)?;
        Ok(Var::from_op_with_jvp(
            "channel_window",
            value,
            &[self],
            rule(move |x, _, g| {
                let c = x[0].shape().dims()[1];
                Ok(vec![Some(g.channel_window(-start, c)?)])
            }),
            tangent(move |_, _, d| {
                d[0].as_ref()
                    .expect("moves")
                    .channel_window(start, channels)
            }),
        ))
    }

    /// `self * a + b` with a, b per channel ([1, C, 1, 1, 1]) or per sample and channel
    /// ([N, C, 1, 1, 1]): one pass, where the broadcasting ops would take two.
    pub fn channel_affine(&self, a: &Var<B>, b: &Var<B>) -> Result<Self> {
        let value = self
            .backend()
            .channel_affine(self.value(), a.value(), b.value())?;
        Ok(Var::from_op_with_jvp(
            "channel_affine",
            value,
            &[self, a, b],
            rule(|xab, _, g| {
                let (x, a, b) = (&xab[0], &xab[1], &xab[2]);
                let zeros = Var::zeros(g.backend(), b.shape())?;
                Ok(vec![
                    Some(g.channel_affine(a, &zeros)?),
                    Some(g.mul(x)?.sum_to(a.shape())?),
                    Some(g.sum_to(b.shape())?),
                ])
            }),
            // x a + b is linear in x and in (a, b).
            tangent(|xab, y, d| {
                let (x, a, b) = (&xab[0], &xab[1], &xab[2]);
                let zeros = |s: &Shape| Var::zeros(y.backend(), s);
                let terms = [
                    d[0].as_ref()
                        .map(|t| t.channel_affine(a, &zeros(b.shape())?)),
                    d[1].as_ref()
                        .map(|t| x.channel_affine(t, &zeros(t.shape())?)),
                    d[2].clone().map(Ok),
                ];
                sum_tangents(y.backend(), y.shape(), terms.map(Option::transpose))
            }),
        ))
    }

    /// relu(self a + b) with a, b per channel ([1, C, 1, 1, 1]), in one pass. With m =
    /// relu_mask(y) and gm = g m: d x = gm a, and d a, d b are channel_dots(x, gm).
    pub fn channel_affine_relu(&self, a: &Var<B>, b: &Var<B>) -> Result<Self> {
        let value = self
            .backend()
            .channel_affine_relu(self.value(), a.value(), b.value())?;
        Ok(Var::from_op_with_jvp(
            "channel_affine_relu",
            value,
            &[self, a, b],
            rule(|xab, y, g| {
                let (x, a, b) = (&xab[0], &xab[1], &xab[2]);
                let gm = g.mul(&y.unary(UnaryOp::ReluMask)?)?;
                let zeros = Var::zeros(g.backend(), b.shape())?;
                let dots = x.channel_dots(&gm)?;
                Ok(vec![
                    Some(gm.channel_affine(a, &zeros)?),
                    Some(dot_row(&dots, 0)?),
                    Some(dot_row(&dots, 1)?),
                ])
            }),
            // The mask is constant almost everywhere: the tangent of x a + b, masked.
            tangent(|xab, y, d| {
                let (x, a, b) = (&xab[0], &xab[1], &xab[2]);
                let zeros = |s: &Shape| Var::zeros(y.backend(), s);
                let affine = match (&d[1], &d[2]) {
                    (None, None) => None,
                    (da, db) => Some(x.channel_affine(
                        &da.clone().map_or_else(|| zeros(a.shape()), Ok)?,
                        &db.clone().map_or_else(|| zeros(b.shape()), Ok)?,
                    )),
                };
                let terms = [
                    d[0].as_ref()
                        .map(|t| t.channel_affine(a, &zeros(b.shape())?)),
                    affine,
                ];
                let t = sum_tangents(y.backend(), y.shape(), terms.map(Option::transpose))?;
                t.mul(&y.unary(UnaryOp::ReluMask)?)
            }),
        ))
    }

    /// Per channel over the batch and space: [sum(self m), sum(m)], shape [2, C] (see
    /// [`LayerBackend::channel_dots`]). With G = [G0, G1]: d self = m G0, d m = self G0 + G1.
    pub fn channel_dots(&self, m: &Var<B>) -> Result<Self> {
        let value = self.backend().channel_dots(self.value(), m.value())?;
        Ok(Var::from_op_with_jvp(
            "channel_dots",
            value,
            &[self, m],
            rule(|xm, _, g| {
                let (x, m) = (&xm[0], &xm[1]);
                let (g0, g1) = (dot_row(g, 0)?, dot_row(g, 1)?);
                let zeros = Var::zeros(g.backend(), g1.shape())?;
                Ok(vec![
                    Some(m.channel_affine(&g0, &zeros)?),
                    Some(x.channel_affine(&g0, &g1)?),
                ])
            }),
            // [sum(dx m + x dm), sum(dm)]: row 1 of channel_dots(dx, m) is sum(m), masked out.
            tangent(|xm, y, d| {
                let (x, m) = (&xm[0], &xm[1]);
                let c = y.shape().dims()[1];
                let mut first = vec![0.0; 2 * c];
                first[..c].fill(1.0);
                let first = Var::from_f64(y.backend(), &first, y.shape(), false)?;
                let terms = [
                    d[0].as_ref().map(|t| t.channel_dots(m)?.mul(&first)),
                    d[1].as_ref().map(|t| x.channel_dots(t)),
                ];
                sum_tangents(y.backend(), y.shape(), terms.map(Option::transpose))
            }),
        ))
    }

    /// Channels `start .. start + len`.
    pub fn slice_channels(&self, start: usize, len: usize) -> Result<Self> {
        let c = dims5("slice_channels", self.shape())?[1];
        if start + len > c || len == 0 {
            return Err(Error::InvalidArgument {
                op: "slice_channels",
                message: format!("channels {start}..{} of {c}", start + len),
            });
        }
        self.channel_window(start as isize, len)
    }

    /// The channels of every tensor in order, one after another (the skip connections of U-Net).
    pub fn concat_channels(parts: &[&Var<B>]) -> Result<Self> {
        let first = parts.first().ok_or_else(|| Error::InvalidArgument {
            op: "concat_channels",
            message: "no tensors to concatenate".into(),
        })?;
        let [n, _, d, h, w] = dims5("concat_channels", first.shape())?;
        let mut total = 0;
        for p in parts {
            let [pn, pc, pd, ph, pw] = dims5("concat_channels", p.shape())?;
            if [pn, pd, ph, pw] != [n, d, h, w] {
                return Err(Error::Shape {
                    op: "concat_channels",
                    lhs: first.shape().clone(),
                    rhs: p.shape().clone(),
                    reason: "only the channel counts may differ".into(),
                });
            }
            total += pc;
        }
        // Each part padded with zeros to its place among all the channels, then summed.
        let mut offset = 0;
        let mut sum: Option<Var<B>> = None;
        for p in parts {
            let placed = p.channel_window(-(offset as isize), total)?;
            offset += p.shape().dims()[1];
            sum = Some(match sum {
                Some(s) => s.add(&placed)?,
                None => placed,
            });
        }
        Ok(sum.expect("at least one part"))
    }
}

/// Row `k` of channel_dots' [2, C] as a per-channel [1, C, 1, 1, 1] tensor.
pub fn dot_row<B: LayerBackend>(dots: &Var<B>, k: usize) -> Result<Var<B>> {
    let c = dots.shape().dims()[1];
    dots.reshape(&Shape::from([1, 2, c, 1, 1]))?
        .channel_window(k as isize, 1)?
        .reshape(&Shape::from([1, c, 1, 1, 1]))
}
