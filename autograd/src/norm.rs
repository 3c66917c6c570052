//! Batch and instance normalisation and channel dropout, composed of differentiable ops: the
//! statistics (a batch norm's from one pass of `channel_dots`, an instance norm's from means over
//! axes), elementwise ops on the small per-channel statistics, and one fused pass over the full
//! tensor, `channel_affine` (x a + b per channel) or `channel_affine_relu` (see layers.rs). They
//! need no backward rule of their own: the tape differentiates the composition, at any order.
//!
//! Layout NCDHW; statistics and the affine parameters (gamma, beta of shape [C]) are per channel.

use crate::backend::{Backend, Distribution};
use crate::layers::{dims5, dot_row, LayerBackend};
use crate::var::{no_grad, Var};
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

    /// running = (1 - momentum) running + momentum batch, with the unbiased batch variance
    /// (PyTorch's update). Not recorded.
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
            let blend = |old: &Var<B>, new: &Var<B>| -> Result<Var<B>> {
                old.scale(1.0 - momentum)?.add(&new.scale(momentum)?)
            };
            Ok(RunningStats {
                mean: blend(&self.mean, &batch.mean)?,
                var: blend(&self.var, &batch.var.scale(unbiased)?)?,
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

/// The batch's per-channel mean and biased variance ([1, C, 1, 1, 1]) and the elements per
/// channel, from one pass of channel_dots(x, x): var = E[x^2] - E[x]^2, clamped at 0 against
/// rounding.
fn batch_moments<B: LayerBackend>(op: &'static str, x: &Var<B>) -> Result<(Var<B>, Var<B>, usize)> {
    let [n, _, d, h, w] = dims5(op, x.shape())?;
    let count = n * d * h * w;
    let moments = x.channel_dots(x)?;
    let per_element = 1.0 / count as f64;
    let mean = dot_row(&moments, 1)?.scale(per_element)?;
    let squares = dot_row(&moments, 0)?.scale(per_element)?;
    Ok((mean.clone(), squares.sub(&mean.square()?)?.relu()?, count))
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
        let c = dims5(op, self.shape())?[1];
        check_eps(op, eps)?;
        let (mean, var, count) = batch_moments(op, self)?;
        let scale = per_channel(op, gamma, c)?.div(&var.add_scalar(eps)?.sqrt()?)?;
        let shift = per_channel(op, beta, c)?.sub(&mean.mul(&scale)?)?;
        let y = affine(self, &scale, &shift, relu)?;
        let channel = Shape::from([c]);
        let stats = BatchStats {
            mean: mean.detach().reshape(&channel)?,
            var: var.detach().reshape(&channel)?,
            count,
        };
        Ok((y, stats))
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
