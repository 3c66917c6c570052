//! Batch and instance normalisation and channel dropout, composed of differentiable ops: the
//! statistics (a batch norm's from one pass of `channel_dots` and one launch of
//! `batch_statistic` per statistic, an instance norm's from means over axes and elementwise ops
//! on the small per-channel statistics), and one fused pass over the full tensor,
//! `channel_affine` (x a + b per channel) or `channel_affine_relu` (see layers.rs). Only
//! `batch_statistic` has rules of its own; the tape differentiates the rest, at any order.
//!
//! Layout NCDHW; statistics and the affine parameters (gamma, beta of shape [C]) are per channel.

use crate::backend::{Backend, Distribution, UnaryOp};
use crate::layers::{dims5, dot_row, FusedBatchNorm, LayerBackend};
use crate::losses::LossBackend;
use crate::ops::{rule, tangent};
use crate::var::{forward_mode, grad, no_grad, plain, second_order_coming, Var};
use crate::{Error, Result, Shape};

/// What a batch norm in training mode measured: the per-channel mean and biased variance of the
/// batch (shape [C], constants), for the caller's running statistics.
#[derive(Clone)]
pub struct BatchStats<B: Backend> {
    pub mean: Var<B>,
    pub var: Var<B>,
    /// Elements per channel (N D H W), for the unbiased variance.
    pub count: usize,
}

/// The running statistics of a batch norm, as PyTorch keeps them (start: mean 0, variance 1).
#[derive(Clone)]
pub struct RunningStats<B: Backend> {
    pub mean: Var<B>,
    pub var: Var<B>,
}

impl<B: Backend> RunningStats<B> {
    pub fn new(backend: &B, channels: usize) -> Result<Self> {
        let shape = Shape::from([channels]);
        Ok(RunningStats {
            mean: Var::zeros(backend, &shape)?,
            var: Var::ones(backend, &shape)?,
        })
    }
}

impl<B: LossBackend> RunningStats<B> {
    /// running = (1 - momentum) running + momentum batch, with the unbiased batch variance
    /// (PyTorch's update), each an `ema` launch. Not recorded.
    pub fn update(&self, batch: &BatchStats<B>, momentum: f64) -> Result<Self> {
        if !(0.0..=1.0).contains(&momentum) || batch.count < 2 {
            return Err(Error::InvalidArgument {
                op: "batch_norm3d",
                message: format!(
                    "momentum {momentum} must be in [0, 1] and a channel needs at least 2 \
                     elements (has {})",
                    batch.count
                ),
            });
        }
        let unbiased = batch.count as f64 / (batch.count - 1) as f64;
        no_grad(|| {
            Ok(RunningStats {
                mean: self.mean.ema(&batch.mean, 1.0 - momentum)?,
                var: self.var.ema(&batch.var.scale(unbiased)?, 1.0 - momentum)?,
            })
        })
    }
}

/// A per-channel [C] tensor as [1, C, 1, 1, 1], checked against `channels`.
fn per_channel<B: Backend>(op: &'static str, p: &Var<B>, channels: usize) -> Result<Var<B>> {
    if p.shape().dims() != [channels] {
        return Err(Error::Shape {
            op,
            lhs: p.shape().clone(),
            rhs: Shape::from([channels]),
            reason: "a per-channel parameter must have shape [C]".into(),
        });
    }
    p.reshape(&Shape::from([1, channels, 1, 1, 1]))
}

/// Instance norm: (x - mean) / sqrt(var + eps) * gamma + beta with the statistics over D, H, W
/// per sample and channel.
fn instance_normalize<B: LayerBackend>(
    op: &'static str,
    x: &Var<B>,
    gamma: &Var<B>,
    beta: &Var<B>,
    eps: f64,
) -> Result<Var<B>> {
    let axes = [2, 3, 4];
    let c = dims5(op, x.shape())?[1];
    check_eps(op, eps)?;
    // Statistics and coefficients are small ([N, C, 1, 1, 1]); the full tensor is touched by
    // two fused passes (centre, normalise) and the square and sums of the variance.
    let mean = x.mean_axes(&axes, true)?;
    let ones = Var::ones(x.backend(), mean.shape())?;
    let centred = x.channel_affine(&ones, &mean.neg()?)?;
    let var = centred.square()?.mean_axes(&axes, true)?;
    let scale = per_channel(op, gamma, c)?.div(&var.add_scalar(eps)?.sqrt()?)?;
    let shift = per_channel(op, beta, c)?.sub(&mean.mul(&scale)?)?;
    x.channel_affine(&scale, &shift)
}

/// Which per-channel statistic of a batch in training mode [`BatchStatistic`] computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Statistic {
    Mean,
    /// The biased variance.
    Variance,
    /// The batch norm's scale a = gamma / sqrt(var + eps).
    Scale,
    /// The batch norm's shift b = beta - mean a.
    Shift,
}

/// One per-channel statistic of a batch norm in training mode, from the moments
/// [sum x^2; sum x] of `count` elements per channel: mean = sum x / count, var =
/// max(sum x^2 / count - mean^2, 0) (NaN stays NaN), and the scale and shift from them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchStatistic {
    pub statistic: Statistic,
    pub count: usize,
    pub eps: f64,
}

impl BatchStatistic {
    /// (mean, q = sum x^2 / count - mean^2, std = sqrt(max(q, 0) + eps), a) of one channel.
    fn parts(&self, s2: f64, s1: f64, gamma: f64) -> [f64; 4] {
        let inv = 1.0 / self.count as f64;
        let mean = s1 * inv;
        let q = s2 * inv - mean * mean;
        let std = (UnaryOp::Relu.apply(q) + self.eps).sqrt();
        [mean, q, std, gamma / std]
    }

    /// The statistic of one channel from its moments (s2 = sum x^2, s1 = sum x): the f64
    /// reference of [`LayerBackend::batch_statistic`].
    pub fn value(&self, s2: f64, s1: f64, gamma: f64, beta: f64) -> f64 {
        let [mean, q, _, a] = self.parts(s2, s1, gamma);
        match self.statistic {
            Statistic::Mean => mean,
            Statistic::Variance => UnaryOp::Relu.apply(q),
            Statistic::Scale => a,
            Statistic::Shift => beta - mean * a,
        }
    }

    /// Its gradient for an incoming g: [d s2, d s1, d gamma] (d beta is g for the shift, else
    /// 0). With (g_a, g_mean, g_var) the parts of g on a, mean and var (g on the statistic
    /// itself; -g mean and -g a for the shift): d gamma = g_a / std, d q = (g_var - g_a a /
    /// (2 std^2)) [q > 0], d s2 = d q / count, d s1 = (g_mean - 2 mean d q) / count.
    pub fn gradient(&self, s2: f64, s1: f64, gamma: f64, g: f64) -> [f64; 3] {
        let [mean, q, std, a] = self.parts(s2, s1, gamma);
        let (g_a, g_mean, g_var) = match self.statistic {
            Statistic::Mean => (0.0, g, 0.0),
            Statistic::Variance => (0.0, 0.0, g),
            Statistic::Scale => (g, 0.0, 0.0),
            Statistic::Shift => (-g * mean, -g * a, 0.0),
        };
        let d_q = (g_var - g_a * a / (2.0 * std * std)) * UnaryOp::ReluMask.apply(q);
        let inv = 1.0 / self.count as f64;
        [d_q * inv, (g_mean - 2.0 * mean * d_q) * inv, g_a / std]
    }

    /// [`BatchStatistic::parts`] in differentiable ops on [C] tensors.
    fn parts_of<B: LayerBackend>(&self, moments: &Var<B>, gamma: &Var<B>) -> Result<[Var<B>; 4]> {
        let inv = 1.0 / self.count as f64;
        let mean = row(moments, 1)?.scale(inv)?;
        let q = row(moments, 0)?.scale(inv)?.sub(&mean.square()?)?;
        let std = q.relu()?.add_scalar(self.eps)?.sqrt()?;
        let a = gamma.div(&std)?;
        Ok([mean, q, std, a])
    }

    /// [`BatchStatistic::gradient`] in differentiable ops: (d moments [2, C], d gamma), for a
    /// gradient that is itself differentiated (at second order or in forward mode).
    fn gradient_of<B: LayerBackend>(
        &self,
        moments: &Var<B>,
        gamma: &Var<B>,
        g: &Var<B>,
    ) -> Result<(Var<B>, Var<B>)> {
        let [mean, q, std, a] = self.parts_of(moments, gamma)?;
        let zeros = Var::zeros(g.backend(), g.shape())?;
        let (g_a, g_mean, g_var) = match self.statistic {
            Statistic::Mean => (zeros.clone(), g.clone(), zeros),
            Statistic::Variance => (zeros.clone(), zeros, g.clone()),
            Statistic::Scale => (g.clone(), zeros.clone(), zeros),
            Statistic::Shift => (g.mul(&mean)?.neg()?, g.mul(&a)?.neg()?, zeros),
        };
        let from_a = g_a.mul(&a)?.div(&std.square()?)?.scale(0.5)?;
        let d_q = g_var.sub(&from_a)?.mul(&q.unary(UnaryOp::ReluMask)?)?;
        let d_s1 = g_mean.sub(&mean.mul(&d_q)?.scale(2.0)?)?;
        let inv = 1.0 / self.count as f64;
        let d_moments = stack_rows(&d_q.scale(inv)?, &d_s1.scale(inv)?)?;
        Ok((d_moments, g_a.div(&std)?))
    }

    /// The statistic's tangent for tangents `d` of (moments, gamma, beta): d mean = d s1 /
    /// count, d q = (d s2 / count - 2 mean d mean) [q > 0], d std = d q / (2 std),
    /// d a = (d gamma - a d std) / std, d b = d beta - d mean a - mean d a.
    fn tangent_of<B: LayerBackend>(&self, x: &[Var<B>], d: &[Option<Var<B>>]) -> Result<Var<B>> {
        let (moments, gamma) = (&x[0], &x[1]);
        let [mean, q, std, a] = self.parts_of(moments, gamma)?;
        let or_zeros = |t: &Option<Var<B>>, like: &Var<B>| {
            t.clone()
                .map_or_else(|| Var::zeros(like.backend(), like.shape()), Ok)
        };
        let d_moments = or_zeros(&d[0], moments)?;
        let inv = 1.0 / self.count as f64;
        let d_mean = row(&d_moments, 1)?.scale(inv)?;
        let d_q = row(&d_moments, 0)?
            .scale(inv)?
            .sub(&mean.mul(&d_mean)?.scale(2.0)?)?
            .mul(&q.unary(UnaryOp::ReluMask)?)?;
        let d_std = d_q.div(&std.scale(2.0)?)?;
        let d_a = || or_zeros(&d[1], gamma)?.sub(&a.mul(&d_std)?)?.div(&std);
        match self.statistic {
            Statistic::Mean => Ok(d_mean),
            Statistic::Variance => Ok(d_q),
            Statistic::Scale => d_a(),
            Statistic::Shift => or_zeros(&d[2], gamma)?
                .sub(&d_mean.mul(&a)?)?
                .sub(&mean.mul(&d_a()?)?),
        }
    }
}

/// Row `k` of a [2, C] tensor as [C].
fn row<B: LayerBackend>(rows: &Var<B>, k: usize) -> Result<Var<B>> {
    let c = rows.shape().dims()[1];
    dot_row(rows, k)?.reshape(&Shape::from([c]))
}

/// Two [C] tensors as the rows of one [2, C].
fn stack_rows<B: LayerBackend>(first: &Var<B>, second: &Var<B>) -> Result<Var<B>> {
    let c = first.shape().numel();
    let lift = |v: &Var<B>| v.reshape(&Shape::from([1, 1, c, 1, 1]));
    Var::concat_channels(&[&lift(first)?, &lift(second)?])?.reshape(&Shape::from([2, c]))
}

impl<B: LayerBackend> Var<B> {
    /// A batch statistic `s` per channel ([C]) from the moments (self, [2, C],
    /// channel_dots(x, x)), gamma and beta ([C]), in one launch. Its gradient takes two fused
    /// launches when nothing differentiates it again, else the differentiable formulas of
    /// [`BatchStatistic::gradient`] (second order, forward mode).
    pub fn batch_statistic(
        &self,
        gamma: &Var<B>,
        beta: &Var<B>,
        s: BatchStatistic,
    ) -> Result<Self> {
        let value = self
            .backend()
            .batch_statistic(self.value(), gamma.value(), beta.value(), s)?;
        Ok(Var::from_op_with_jvp(
            "batch_statistic",
            value,
            &[self, gamma, beta],
            rule(move |x: &[Var<B>], _, g: &Var<B>| {
                let (moments, gamma) = (&x[0], &x[1]);
                let d_beta = (s.statistic == Statistic::Shift).then(|| g.clone());
                let (d_moments, d_gamma) = if plain() {
                    let b = g.backend();
                    let fused = |wrt_moments| -> Result<Var<B>> {
                        let (m, gm) = (moments.value(), gamma.value());
                        let t = b.batch_statistic_backward(m, gm, g.value(), s, wrt_moments)?;
                        Ok(Var::constant(b, t))
                    };
                    (fused(true)?, fused(false)?)
                } else {
                    s.gradient_of(moments, gamma, g)?
                };
                Ok(vec![Some(d_moments), Some(d_gamma), d_beta])
            }),
            tangent(move |x, _, d| s.tangent_of(x, d)),
        ))
    }
}

/// [`batch_coefficients`] composed of small ops, for forward mode: their tangents share the
/// intermediate statistics, where each fused statistic's tangent would recompute them.
fn composed_coefficients<B: LayerBackend>(
    op: &'static str,
    x: &Var<B>,
    gamma: &Var<B>,
    beta: &Var<B>,
    eps: f64,
) -> Result<(Var<B>, Var<B>, BatchStats<B>)> {
    let [n, c, d, h, w] = dims5(op, x.shape())?;
    let count = n * d * h * w;
    let moments = x.channel_dots(x)?;
    let per_element = 1.0 / count as f64;
    let mean = dot_row(&moments, 1)?.scale(per_element)?;
    let squares = dot_row(&moments, 0)?.scale(per_element)?;
    let var = squares.sub(&mean.square()?)?.relu()?;
    let scale = per_channel(op, gamma, c)?.div(&var.add_scalar(eps)?.sqrt()?)?;
    let shift = per_channel(op, beta, c)?.sub(&mean.mul(&scale)?)?;
    let channel = Shape::from([c]);
    let stats = BatchStats {
        mean: mean.detach().reshape(&channel)?,
        var: var.detach().reshape(&channel)?,
        count,
    };
    Ok((scale, shift, stats))
}

/// The batch's per-channel scale and shift ([1, C, 1, 1, 1]) as recorded ops, and the moments
/// channel_dots(x, x) ([2, C]) they come from: one pass over x, then one launch per statistic.
fn batch_coefficients<B: LayerBackend>(
    x: &Var<B>,
    gamma: &Var<B>,
    beta: &Var<B>,
    p: FusedBatchNorm,
) -> Result<(Var<B>, Var<B>, Var<B>)> {
    let moments = x.channel_dots(x)?;
    let of = |statistic| moments.batch_statistic(gamma, beta, p.statistic(statistic));
    let per_channel = Shape::from([1, gamma.shape().numel(), 1, 1, 1]);
    let scale = of(Statistic::Scale)?.reshape(&per_channel)?;
    let shift = of(Statistic::Shift)?.reshape(&per_channel)?;
    Ok((scale, shift, moments))
}

/// A batch norm in training mode composed of recorded ops ([`batch_coefficients`], the affine
/// pass), for a caller that will differentiate its gradient ([`crate::second_order`]): the backward
/// with create_graph then differentiates these ops, as the forward recorded them. The batch's
/// mean and variance come from one `batch_norm_statistics` launch on the moments.
fn composed_batch_norm<B: LayerBackend>(
    [x, gamma, beta]: [&Var<B>; 3],
    p: FusedBatchNorm,
) -> Result<(Var<B>, BatchStats<B>)> {
    let (scale, shift, moments) = batch_coefficients(x, gamma, beta, p)?;
    let b = x.backend();
    let [_, _, mean, var] =
        b.batch_norm_statistics(moments.value(), gamma.value(), beta.value(), p)?;
    let stats = BatchStats {
        mean: Var::constant(b, mean),
        var: Var::constant(b, var),
        count: p.count,
    };
    Ok((affine(x, &scale, &shift, p.relu)?, stats))
}

/// A batch norm in training mode as one recorded op over (x, gamma, beta): its statistics from
/// one pass of channel_dots(x, x) and one launch, then the affine pass. Its backward is
/// [`LayerBackend::batch_norm_backward`] (a few launches) when nothing differentiates it again;
/// otherwise the gradient of the same map composed of differentiable ops ([`batch_coefficients`]
/// and the affine pass, recomputed from the inputs), recorded, so second order sees the
/// composition. A caller that knows second order is coming records the composition in the
/// forward instead ([`composed_batch_norm`]) and saves the recomputation.
fn fused_batch_norm<B: LayerBackend>(
    [x, gamma, beta]: [&Var<B>; 3],
    p: FusedBatchNorm,
) -> Result<(Var<B>, BatchStats<B>)> {
    let b = x.backend();
    let moments = b.channel_dots(x.value(), x.value())?;
    let [scale, shift, mean, var] =
        b.batch_norm_statistics(&moments, gamma.value(), beta.value(), p)?;
    let per_channel = Shape::from([1, gamma.shape().numel(), 1, 1, 1]);
    let (scale, shift) = (
        b.reshape(&scale, &per_channel)?,
        b.reshape(&shift, &per_channel)?,
    );
    let y = if p.relu {
        b.channel_affine_relu(x.value(), &scale, &shift)?
    } else {
        b.channel_affine(x.value(), &scale, &shift)?
    };
    let stats = BatchStats {
        mean: Var::constant(b, mean),
        var: Var::constant(b, var),
        count: p.count,
    };
    let rule = rule(move |inputs: &[Var<B>], y: &Var<B>, g: &Var<B>| {
        if plain() {
            let b = g.backend();
            let xyg = [inputs[0].value(), y.value(), g.value()];
            let d = b.batch_norm_backward(xyg, &moments, inputs[1].value(), p)?;
            return Ok(d.map(|t| Some(Var::constant(b, t))).into());
        }
        let [x, gamma, beta] = [&inputs[0], &inputs[1], &inputs[2]];
        let (scale, shift, _) = batch_coefficients(x, gamma, beta, p)?;
        let composed = affine(x, &scale, &shift, p.relu)?;
        let d = grad(&composed, &[x, gamma, beta], Some(g), true)?;
        Ok(d.into_iter().map(Some).collect())
    });
    Ok((
        Var::from_op("batch_norm3d", y, &[x, gamma, beta], rule),
        stats,
    ))
}

fn check_eps(op: &'static str, eps: f64) -> Result<()> {
    if eps <= 0.0 {
        return Err(Error::InvalidArgument {
            op,
            message: format!("eps {eps} must be positive"),
        });
    }
    Ok(())
}

/// x scale + shift per channel, followed by a ReLU in the same pass if `relu`.
fn affine<B: LayerBackend>(
    x: &Var<B>,
    scale: &Var<B>,
    shift: &Var<B>,
    relu: bool,
) -> Result<Var<B>> {
    if relu {
        x.channel_affine_relu(scale, shift)
    } else {
        x.channel_affine(scale, shift)
    }
}

/// Normalisation layers and dropout.
impl<B: LayerBackend> Var<B> {
    /// Batch norm with the batch's statistics (over N, D, H, W per channel), as in training.
    /// Returns the output and the batch statistics for [`RunningStats::update`].
    pub fn batch_norm3d_train(
        &self,
        gamma: &Var<B>,
        beta: &Var<B>,
        eps: f64,
    ) -> Result<(Var<B>, BatchStats<B>)> {
        self.batch_norm_train(gamma, beta, eps, false)
    }

    /// relu(batch_norm3d_train), the normalisation and the ReLU in one pass over the tensor.
    pub fn batch_norm3d_train_relu(
        &self,
        gamma: &Var<B>,
        beta: &Var<B>,
        eps: f64,
    ) -> Result<(Var<B>, BatchStats<B>)> {
        self.batch_norm_train(gamma, beta, eps, true)
    }

    fn batch_norm_train(
        &self,
        gamma: &Var<B>,
        beta: &Var<B>,
        eps: f64,
        relu: bool,
    ) -> Result<(Var<B>, BatchStats<B>)> {
        let op = "batch_norm3d";
        dims5(op, self.shape())?;
        check_eps(op, eps)?;
        let c = self.shape().dims()[1];
        for p in [gamma, beta] {
            per_channel(op, p, c)?;
        }
        if forward_mode() {
            let (scale, shift, stats) = composed_coefficients(op, self, gamma, beta, eps)?;
            return Ok((affine(self, &scale, &shift, relu)?, stats));
        }
        let [n, _, d, h, w] = dims5(op, self.shape())?;
        let p = FusedBatchNorm {
            count: n * d * h * w,
            eps,
            relu,
        };
        if second_order_coming() {
            return composed_batch_norm([self, gamma, beta], p);
        }
        fused_batch_norm([self, gamma, beta], p)
    }

    /// Batch norm in eval mode: (x - running mean) / sqrt(running var + eps) * gamma + beta.
    pub fn batch_norm3d_eval(
        &self,
        gamma: &Var<B>,
        beta: &Var<B>,
        running: &RunningStats<B>,
        eps: f64,
    ) -> Result<Var<B>> {
        self.batch_norm_eval(gamma, beta, running, eps, false)
    }

    /// relu(batch_norm3d_eval), in one pass over the tensor.
    pub fn batch_norm3d_eval_relu(
        &self,
        gamma: &Var<B>,
        beta: &Var<B>,
        running: &RunningStats<B>,
        eps: f64,
    ) -> Result<Var<B>> {
        self.batch_norm_eval(gamma, beta, running, eps, true)
    }

    fn batch_norm_eval(
        &self,
        gamma: &Var<B>,
        beta: &Var<B>,
        running: &RunningStats<B>,
        eps: f64,
        relu: bool,
    ) -> Result<Var<B>> {
        let op = "batch_norm3d";
        let c = dims5(op, self.shape())?[1];
        check_eps(op, eps)?;
        let std = per_channel(op, &running.var, c)?.add_scalar(eps)?.sqrt()?;
        let scale = per_channel(op, gamma, c)?.div(&std)?;
        let shift =
            per_channel(op, beta, c)?.sub(&per_channel(op, &running.mean, c)?.mul(&scale)?)?;
        affine(self, &scale, &shift, relu)
    }

    /// Instance norm: statistics over D, H, W per sample and channel, then the per-channel affine.
    pub fn instance_norm3d(&self, gamma: &Var<B>, beta: &Var<B>, eps: f64) -> Result<Var<B>> {
        instance_normalize("instance_norm3d", self, gamma, beta, eps)
    }

    /// Channel dropout: each (sample, channel) is kept with probability 1 - p and scaled by
    /// 1 / (1 - p), or zeroed. Its uniform is element n C + c of the counter-based generator at
    /// (seed, step * 2^32), so a step's mask is the same on every backend and steps never share
    /// counters.
    pub fn dropout3d(&self, p: f64, seed: u64, step: u32) -> Result<Var<B>> {
        let [n, c, ..] = dims5("dropout3d", self.shape())?;
        if !(0.0..1.0).contains(&p) {
            return Err(Error::InvalidArgument {
                op: "dropout3d",
                message: format!("p {p} must be in [0, 1)"),
            });
        }
        if p == 0.0 {
            return Ok(self.clone());
        }
        let shape = Shape::from([n, c, 1, 1, 1]);
        let u = Var::random(
            self.backend(),
            &shape,
            Distribution::Uniform,
            seed,
            u64::from(step) << 32,
        )?;
        // relu_mask(u - p) is 1 exactly where u > p.
        let mask = no_grad(|| {
            u.add_scalar(-p)?
                .unary(crate::UnaryOp::ReluMask)?
                .scale(1.0 / (1.0 - p))
        })?;
        self.channel_affine(&mask, &Var::zeros(self.backend(), &shape)?)
    }
}
