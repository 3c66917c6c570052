//! Classification losses and their helpers: softmax / log-softmax over the channel axis, per-voxel
//! cross-entropy and binary cross-entropy with logits, the per-class sums of softmax-Dice, and the
//! fused EMA of a parameter store. Tensors are [N, C, ...] (NCDHW for volumes): axis 1 is the class.
//!
//! The primitives ([`LossBackend`]) are the ones a fused kernel pays for; every other loss here is
//! composed from them and the elementwise ops, so its gradient at any order comes for free. Each
//! primitive's backward rule is written in differentiable ops (second order works throughout).

use crate::backend::Backend;
use crate::ops::{rule, tangent};
use crate::var::Var;
use crate::{Cpu64, CpuTensor, Error, Result, Shape};
use std::sync::Arc;

/// The primitives of the loss family. Inputs of rank >= 2 are viewed as [N, C, S] with S the
/// product of the dimensions after the class axis.
pub trait LossBackend: Backend {
    /// softmax over axis 1, or log-softmax when `log`.
    fn softmax_channels(&self, x: &Self::Tensor, log: bool) -> Result<Self::Tensor>;
    /// Per voxel `-sum_c y_c log softmax(z)_c`, shape [N, 1, ...].
    fn cross_entropy_voxels(&self, z: &Self::Tensor, y: &Self::Tensor) -> Result<Self::Tensor>;
    /// The gradient of [`LossBackend::cross_entropy_voxels`] with respect to the logits, given its
    /// gradient `g` [N, 1, ...], or one value [1, 1, ...] for every voxel (the backward of the
    /// summed loss): `g (softmax(z) sum_c y - y)`. One fused pass.
    fn cross_entropy_backward(
        &self,
        z: &Self::Tensor,
        y: &Self::Tensor,
        g: &Self::Tensor,
    ) -> Result<Self::Tensor>;
    /// Per voxel `sum_c max(z,0) - z y + log(1 + exp(-|z|))` (BCE with logits), shape [N, 1, ...].
    fn bce_with_logits_voxels(&self, z: &Self::Tensor, y: &Self::Tensor) -> Result<Self::Tensor>;
    /// With p = softmax over axis 1, per class c summed over the batch and all voxels: row 0 is
    /// sum(p y), row 1 sum(p^2) (sum(p) unless `squared`), row 2 sum(y^2) (sum(y)). Shape [3, C].
    fn softmax_dice_sums(
        &self,
        z: &Self::Tensor,
        y: &Self::Tensor,
        squared: bool,
    ) -> Result<Self::Tensor>;
    /// The gradient of [`LossBackend::softmax_dice_sums`] with respect to the logits, given the
    /// gradient `d_sums` [3, C] of the sums: with p = softmax(z), u = G0 y + 2 G1 p (squared) or
    /// G0 y + G1 (plain), d z = p (u - sum_c p u). One fused pass.
    fn softmax_dice_backward(
        &self,
        z: &Self::Tensor,
        y: &Self::Tensor,
        d_sums: &Self::Tensor,
        squared: bool,
    ) -> Result<Self::Tensor>;
    /// `decay * teacher + (1 - decay) * student` elementwise, in one dispatch: a parameter store
    /// that keeps every parameter in one flat buffer updates its teacher copy with one call.
    fn ema(
        &self,
        teacher: &Self::Tensor,
        student: &Self::Tensor,
        decay: f64,
    ) -> Result<Self::Tensor>;
}

/// [N, C, S] of a tensor of rank >= 2.
pub fn channel_dims(op: &'static str, shape: &Shape) -> Result<(usize, usize, usize)> {
    match shape.dims() {
        [n, c, rest @ ..] => Ok((*n, *c, rest.iter().product())),
        _ => Err(Error::InvalidArgument {
            op,
            message: format!("expected [N, C, ...] (rank >= 2), got shape {shape}"),
        }),
    }
}

/// The shape with the class axis reduced to 1: [N, 1, ...].
pub fn voxel_shape(shape: &Shape) -> Shape {
    shape.reduced(&[1])
}

/// Checks that two operands of a loss have the same shape.
pub fn same_shape(op: &'static str, a: &Shape, b: &Shape) -> Result<()> {
    if a != b {
        return Err(Error::Shape {
            op,
            lhs: a.clone(),
            rhs: b.clone(),
            reason: "logits and target must have the same shape".into(),
        });
    }
    Ok(())
}

/// Whether the gradient `g` of a per-voxel cross-entropy is one value for all voxels ([1, 1, ...])
/// rather than [N, 1, ...]; any other shape is an error.
pub fn cross_entropy_gradient_is_scalar(z: &Shape, g: &Shape) -> Result<bool> {
    if *g == voxel_shape(z) {
        return Ok(false);
    }
    if g.rank() == z.rank() && g.numel() == 1 {
        return Ok(true);
    }
    Err(Error::Shape {
        op: "cross_entropy_backward",
        lhs: z.clone(),
        rhs: g.clone(),
        reason: "the gradient must be per voxel [N, 1, ...] or one value [1, 1, ...]".into(),
    })
}

/// How a per-voxel loss is reduced: none ([N, 1, ...]), the total, or the total / (N * voxels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    None,
    Sum,
    Mean,
}

impl Reduction {
    pub fn parse(s: &str) -> Option<Reduction> {
        match s {
            "none" => Some(Reduction::None),
            "sum" => Some(Reduction::Sum),
            "mean" => Some(Reduction::Mean),
            _ => None,
        }
    }
}

/// Options of softmax-Dice and sigmoid-Dice (METHODS.md: s = 1e-5, squared denominator).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DiceOptions {
    pub squared: bool,
    pub smooth: f64,
    pub include_background: bool,
}

impl Default for DiceOptions {
    fn default() -> Self {
        DiceOptions {
            squared: true,
            smooth: 1e-5,
            include_background: true,
        }
    }
}

/// The primitives as differentiable ops.
impl<B: LossBackend> Var<B> {
    /// softmax over axis 1. d x = y (g - sum_c g y).
    pub fn softmax_channels(&self) -> Result<Self> {
        let value = self.backend().softmax_channels(self.value(), false)?;
        Ok(Var::from_op_with_jvp(
            "softmax_channels",
            value,
            &[self],
            rule(|_, y, g| {
                let dot = g.mul(y)?.sum_axes(&[1], true)?;
                Ok(vec![Some(y.mul(&g.sub(&dot)?)?)])
            }),
            // The Jacobian is symmetric, so the tangent has the gradient's form.
            tangent(|_, y, d| {
                let t = d[0].as_ref().expect("moves");
                y.mul(&t.sub(&t.mul(y)?.sum_axes(&[1], true)?)?)
            }),
        ))
    }

    /// log-softmax over axis 1. d x = g - softmax(x) sum_c g.
    pub fn log_softmax_channels(&self) -> Result<Self> {
        let value = self.backend().softmax_channels(self.value(), true)?;
        Ok(Var::from_op_with_jvp(
            "log_softmax_channels",
            value,
            &[self],
            rule(|x, _, g| {
                let p = x[0].softmax_channels()?;
                Ok(vec![Some(g.sub(&p.mul(&g.sum_axes(&[1], true)?)?)?)])
            }),
            // d log p = dx - sum_c p dx.
            tangent(|_, y, d| {
                let t = d[0].as_ref().expect("moves");
                t.sub(&t.mul(&y.exp()?)?.sum_axes(&[1], true)?)
            }),
        ))
    }

    /// Per-voxel cross-entropy -sum_c y log softmax(z), [N, 1, ...].
    /// d z = g (softmax(z) sum_c y - y) (the fused [`Var::cross_entropy_backward`]);
    /// d y = -g log_softmax(z), computed only for a target that needs it.
    pub fn cross_entropy_voxels(&self, target: &Var<B>) -> Result<Self> {
        same_shape("cross_entropy", self.shape(), target.shape())?;
        let value = self
            .backend()
            .cross_entropy_voxels(self.value(), target.value())?;
        Ok(Var::from_op_with_jvp(
            "cross_entropy_voxels",
            value,
            &[self, target],
            rule(|zy, _, g| {
                let (z, y) = (&zy[0], &zy[1]);
                let d_z = z.cross_entropy_backward(y, g)?;
                let d_y = y
                    .requires_grad()
                    .then(|| g.mul(&z.log_softmax_channels()?)?.neg())
                    .transpose()?;
                Ok(vec![Some(d_z), d_y])
            }),
            // dc = sum_c (p sum_k y - y)_c dz_c - sum_c log p_c dy_c.
            tangent(|zy, c, d| {
                let (z, y) = (&zy[0], &zy[1]);
                let mut terms = Vec::new();
                if let Some(t) = &d[0] {
                    let p = z.softmax_channels()?;
                    let r = p.mul(&y.sum_axes(&[1], true)?)?.sub(y)?;
                    terms.push(Ok(Some(r.mul(t)?.sum_axes(&[1], true)?)));
                }
                if let Some(t) = &d[1] {
                    let log_p = z.log_softmax_channels()?;
                    terms.push(Ok(Some(log_p.mul(t)?.sum_axes(&[1], true)?.neg()?)));
                }
                crate::var::sum_tangents(c.backend(), c.shape(), terms)
            }),
        ))
    }

    /// The fused gradient of the per-voxel cross-entropy, F = g (p sum_c y - y) with p = softmax(z).
    /// Its own rule, for an incoming h, with s = sum_c y and t = sum_c h p:
    /// d z = g s p (h - t), d y = g (t - h), d g = s t - sum_c h y.
    pub fn cross_entropy_backward(&self, target: &Var<B>, g: &Var<B>) -> Result<Self> {
        same_shape("cross_entropy", self.shape(), target.shape())?;
        cross_entropy_gradient_is_scalar(self.shape(), g.shape())?;
        let value =
            self.backend()
                .cross_entropy_backward(self.value(), target.value(), g.value())?;
        Ok(Var::from_op(
            "cross_entropy_backward",
            value,
            &[self, target, g],
            rule(|x, _, h| {
                let (z, y, g) = (&x[0], &x[1], &x[2]);
                let p = z.softmax_channels()?;
                let s = y.sum_axes(&[1], true)?;
                let t = h.mul(&p)?.sum_axes(&[1], true)?;
                let d_z = g.mul(&s)?.mul(&p.mul(&h.sub(&t)?)?)?;
                let d_y = g.mul(&t.sub(h)?)?;
                let d_g = s.mul(&t)?.sub(&h.mul(y)?.sum_axes(&[1], true)?)?;
                Ok(vec![Some(d_z), Some(d_y), Some(d_g.sum_to(g.shape())?)])
            }),
        ))
    }

    /// The total cross-entropy over all voxels, a scalar: the sum of `cross_entropy_voxels`, with
    /// d z = the fused backward given the one value g for every voxel (no per-voxel gradient is
    /// materialised) and d y = -g log_softmax(z) for a target that needs it.
    pub fn cross_entropy_total(&self, target: &Var<B>) -> Result<Self> {
        same_shape("cross_entropy", self.shape(), target.shape())?;
        let b = self.backend();
        let per_voxel = b.cross_entropy_voxels(self.value(), target.value())?;
        let all: Vec<usize> = (0..self.shape().rank()).collect();
        let value = b.reshape(&b.sum_axes(&per_voxel, &all)?, &Shape::scalar())?;
        Ok(Var::from_op(
            "cross_entropy_total",
            value,
            &[self, target],
            rule(|zy, _, g| {
                let (z, y) = (&zy[0], &zy[1]);
                let g = g.reshape(&Shape(vec![1; z.shape().rank()]))?;
                let d_z = z.cross_entropy_backward(y, &g)?;
                let d_y = y
                    .requires_grad()
                    .then(|| g.mul(&z.log_softmax_channels()?)?.neg())
                    .transpose()?;
                Ok(vec![Some(d_z), d_y])
            }),
        ))
    }

    /// Per-voxel binary cross-entropy with logits, summed over channels, [N, 1, ...].
    /// d z = g (sigmoid(z) - y), d y = -g z.
    pub fn bce_with_logits_voxels(&self, target: &Var<B>) -> Result<Self> {
        same_shape("binary_cross_entropy", self.shape(), target.shape())?;
        let value = self
            .backend()
            .bce_with_logits_voxels(self.value(), target.value())?;
        Ok(Var::from_op(
            "bce_with_logits_voxels",
            value,
            &[self, target],
            rule(|zy, _, g| {
                let (z, y) = (&zy[0], &zy[1]);
                let d_z = g.mul(&z.sigmoid()?.sub(y)?)?;
                let d_y = g.mul(z)?.neg()?;
                Ok(vec![Some(d_z), Some(d_y)])
            }),
        ))
    }

    /// The [3, C] class sums of softmax-Dice (see [`LossBackend::softmax_dice_sums`]).
    /// d z is the fused [`Var::softmax_dice_backward`]; with G = d sums and p = softmax(z),
    /// d y = G0 p + 2 G2 y (squared) or G0 p + G2 (plain), computed only for a target that needs it.
    pub fn softmax_dice_sums(&self, target: &Var<B>, squared: bool) -> Result<Self> {
        same_shape("softmax_dice", self.shape(), target.shape())?;
        let value = self
            .backend()
            .softmax_dice_sums(self.value(), target.value(), squared)?;
        Ok(Var::from_op(
            "softmax_dice_sums",
            value,
            &[self, target],
            rule(move |zy, _, g| {
                let (z, y) = (&zy[0], &zy[1]);
                let d_z = z.softmax_dice_backward(y, g, squared)?;
                if !y.requires_grad() {
                    return Ok(vec![Some(d_z), None]);
                }
                let p = z.softmax_channels()?;
                let g0 = class_row(g, 0, z.shape())?;
                let g2 = class_row(g, 2, z.shape())?;
                let d_y = if squared {
                    g0.mul(&p)?.add(&g2.mul(y)?.scale(2.0)?)?
                } else {
                    g0.mul(&p)?.add(&g2)?.broadcast_to(y.shape())?
                };
                Ok(vec![Some(d_z), Some(d_y)])
            }),
        ))
    }

    /// The fused gradient of the softmax-Dice sums with respect to the logits (see
    /// [`LossBackend::softmax_dice_backward`]), F = p (u - s) with s = sum_c p u. Its own rule, for
    /// an incoming h: t = sum_c h p, r = p (h - t); d p = h (u - s) - t u + b r with b = 2 G1
    /// (squared) or 0; d z = p (d p - sum_c p d p); d y = G0 r; d G0 = sum y r,
    /// d G1 = sum 2 p r (squared) or sum r, d G2 = 0 (sums over the batch and the voxels).
    pub fn softmax_dice_backward(
        &self,
        target: &Var<B>,
        d_sums: &Var<B>,
        squared: bool,
    ) -> Result<Self> {
        same_shape("softmax_dice", self.shape(), target.shape())?;
        let value = self.backend().softmax_dice_backward(
            self.value(),
            target.value(),
            d_sums.value(),
            squared,
        )?;
        Ok(Var::from_op(
            "softmax_dice_backward",
            value,
            &[self, target, d_sums],
            rule(move |x, _, h| d_softmax_dice_backward(&x[0], &x[1], &x[2], h, squared)),
        ))
    }

    /// `decay * self + (1 - decay) * student` (the mean-teacher update) as one kernel.
    pub fn ema(&self, student: &Var<B>, decay: f64) -> Result<Self> {
        if self.shape() != student.shape() {
            return Err(Error::Shape {
                op: "ema",
                lhs: self.shape().clone(),
                rhs: student.shape().clone(),
                reason: "teacher and student must have the same shape".into(),
            });
        }
        let value = self.backend().ema(self.value(), student.value(), decay)?;
        Ok(Var::from_op(
            "ema",
            value,
            &[self, student],
            rule(move |_, _, g| Ok(vec![Some(g.scale(decay)?), Some(g.scale(1.0 - decay)?)])),
        ))
    }
}

fn d_softmax_dice_backward<B: LossBackend>(
    z: &Var<B>,
    y: &Var<B>,
    g: &Var<B>,
    h: &Var<B>,
    squared: bool,
) -> Result<Vec<Option<Var<B>>>> {
    let classes = |x: Var<B>| -> Result<Var<B>> {
        let axes: Vec<usize> = (0..x.shape().rank()).filter(|&a| a != 1).collect();
        x.sum_axes(&axes, false)?
            .reshape(&Shape::from([1, z.shape().dims()[1]]))
    };
    let p = z.softmax_channels()?;
    let g0 = class_row(g, 0, z.shape())?;
    let g1 = class_row(g, 1, z.shape())?;
    let u = if squared {
        g0.mul(y)?.add(&g1.mul(&p)?.scale(2.0)?)?
    } else {
        g0.mul(y)?.add(&g1)?
    };
    let s = p.mul(&u)?.sum_axes(&[1], true)?;
    let t = h.mul(&p)?.sum_axes(&[1], true)?;
    let r = p.mul(&h.sub(&t)?)?;
    let mut d_p = h.mul(&u.sub(&s)?)?.sub(&t.mul(&u)?)?;
    if squared {
        d_p = d_p.add(&g1.mul(&r)?.scale(2.0)?)?;
    }
    let d_z = p.mul(&d_p.sub(&p.mul(&d_p)?.sum_axes(&[1], true)?)?)?;
    let d_y = y.requires_grad().then(|| g0.mul(&r)).transpose()?;
    let d_g0 = classes(y.mul(&r)?)?;
    let d_g1 = if squared {
        classes(p.mul(&r)?.scale(2.0)?)?
    } else {
        classes(r)?
    };
    // Stack the rows into [3, C] (row 2 stays zero): e0 d_g0 + e1 d_g1.
    let row = |k: usize| -> Result<Var<B>> {
        let mut e = [0.0; 3];
        e[k] = 1.0;
        Var::from_f64(g.backend(), &e, &Shape::from([3, 1]), false)
    };
    let d_g = row(0)?.mul(&d_g0)?.add(&row(1)?.mul(&d_g1)?)?;
    Ok(vec![Some(d_z), d_y, Some(d_g)])
}

/// Row k of a [3, C] tensor as [1, C, 1, ...] (the rank of `like`), by a differentiable mask-and-sum.
fn class_row<B: Backend>(g: &Var<B>, k: usize, like: &Shape) -> Result<Var<B>> {
    let mut mask = [0.0; 3];
    mask[k] = 1.0;
    let mask = Var::from_f64(g.backend(), &mask, &Shape::from([3, 1]), false)?;
    let mut dims = vec![1; like.rank()];
    dims[1] = like.dims()[1];
    g.mul(&mask)?.sum_axes(&[0], false)?.reshape(&Shape(dims))
}

/// The losses, composed from the primitives.
impl<B: LossBackend> Var<B> {
    /// Cross-entropy of logits `self` against a one-hot or soft `target`, optionally weighted per
    /// voxel by `weight` [N, 1, ...]; `Mean` divides the (weighted) total by N * voxels.
    pub fn cross_entropy(
        &self,
        target: &Var<B>,
        weight: Option<&Var<B>>,
        reduction: Reduction,
    ) -> Result<Self> {
        let voxels = voxel_shape(self.shape()).numel();
        match (weight, reduction) {
            // Unweighted totals skip the per-voxel gradient in the backward.
            (None, Reduction::Sum) => self.cross_entropy_total(target),
            (None, Reduction::Mean) => self.cross_entropy_total(target)?.scale(1.0 / voxels as f64),
            _ => {
                let ce = self.cross_entropy_voxels(target)?;
                reduce_voxels("cross_entropy", ce, weight, reduction)
            }
        }
    }

    /// Binary cross-entropy with logits, summed over channels per voxel, weighted and reduced as
    /// [`Var::cross_entropy`] (for single-channel outputs: PyTorch's BCEWithLogits).
    pub fn binary_cross_entropy(
        &self,
        target: &Var<B>,
        weight: Option<&Var<B>>,
        reduction: Reduction,
    ) -> Result<Self> {
        let bce = self.bce_with_logits_voxels(target)?;
        reduce_voxels("binary_cross_entropy", bce, weight, reduction)
    }

    /// mean over all elements of (softmax(self) - softmax(other))^2: the mean-teacher consistency.
    pub fn softmax_mse(&self, other: &Var<B>) -> Result<Self> {
        same_shape("softmax_mse", self.shape(), other.shape())?;
        self.softmax_channels()?
            .sub(&other.softmax_channels()?)?
            .square()?
            .mean()
    }

    /// 1 - mean over the included classes of (2 I_c + s) / (P_c + Y_c + s), p = softmax(self).
    pub fn softmax_dice(&self, target: &Var<B>, options: DiceOptions) -> Result<Self> {
        let sums = self.softmax_dice_sums(target, options.squared)?;
        let row = |k| class_row(&sums, k, &Shape::from([1, sums.shape().dims()[1]]));
        dice_from_sums("softmax_dice", &row(0)?, &row(1)?, &row(2)?, options)
    }
}

/// Losses composed from elementwise ops and reductions only (any backend).
impl<B: Backend> Var<B> {
    /// Dice of p = sigmoid(self) per channel over the batch, 1 - mean over channels (for
    /// single-channel outputs: 1 - Dice).
    pub fn sigmoid_dice(&self, target: &Var<B>, options: DiceOptions) -> Result<Self> {
        same_shape("sigmoid_dice", self.shape(), target.shape())?;
        channel_dims("sigmoid_dice", self.shape())?;
        let p = self.sigmoid()?;
        let axes: Vec<usize> = (0..self.shape().rank()).filter(|&a| a != 1).collect();
        let per_class = |x: Var<B>| -> Result<Var<B>> {
            let c = self.shape().dims()[1];
            x.sum_axes(&axes, false)?.reshape(&Shape::from([1, c]))
        };
        let inter = per_class(p.mul(target)?)?;
        let (sp, sy) = if options.squared {
            (per_class(p.square()?)?, per_class(target.square()?)?)
        } else {
            (per_class(p)?, per_class(target.clone())?)
        };
        dice_from_sums("sigmoid_dice", &inter, &sp, &sy, options)
    }

    /// Sharpening with temperature t: p^(1/t) / (p^(1/t) + (1-p)^(1/t)), computed as
    /// sigmoid((log p - log(1 - p)) / t) (the same for p in (0, 1)).
    pub fn sharpen(&self, temperature: f64) -> Result<Self> {
        if temperature <= 0.0 {
            return Err(Error::InvalidArgument {
                op: "sharpen",
                message: format!("temperature must be positive, got {temperature}"),
            });
        }
        let logit = self.log()?.sub(&self.neg()?.add_scalar(1.0)?.log()?)?;
        logit.scale(1.0 / temperature)?.sigmoid()
    }

    /// Per-voxel entropy of probabilities over axis 1, -sum_c p log(p + eps), [N, 1, ...]
    /// (eps keeps p = 0 finite; UA-MT uses 1e-6).
    pub fn entropy(&self, eps: f64) -> Result<Self> {
        channel_dims("entropy", self.shape())?;
        self.mul(&self.add_scalar(eps)?.log()?)?
            .sum_axes(&[1], true)?
            .neg()
    }
}

/// Weights a per-voxel loss [N, 1, ...] and reduces it.
fn reduce_voxels<B: Backend>(
    op: &'static str,
    loss: Var<B>,
    weight: Option<&Var<B>>,
    reduction: Reduction,
) -> Result<Var<B>> {
    let loss = match weight {
        Some(w) if w.shape() != loss.shape() => {
            return Err(Error::Shape {
                op,
                lhs: loss.shape().clone(),
                rhs: w.shape().clone(),
                reason: "the weight must have the per-voxel shape [N, 1, ...]".into(),
            })
        }
        Some(w) => loss.mul(w)?,
        None => loss,
    };
    match reduction {
        Reduction::None => Ok(loss),
        Reduction::Sum => loss.sum(),
        Reduction::Mean => loss.mean(),
    }
}

/// 1 - mean over the included classes of (2 I + s) / (P + Y + s), from [1, C] class sums.
fn dice_from_sums<B: Backend>(
    op: &'static str,
    inter: &Var<B>,
    sum_p: &Var<B>,
    sum_y: &Var<B>,
    options: DiceOptions,
) -> Result<Var<B>> {
    let c = inter.shape().dims()[1];
    let first = usize::from(!options.include_background);
    if first >= c {
        return Err(Error::InvalidArgument {
            op,
            message: format!("no class left: {c} classes and include_background=false"),
        });
    }
    let s = options.smooth;
    let dice = inter
        .scale(2.0)?
        .add_scalar(s)?
        .div(&sum_p.add(sum_y)?.add_scalar(s)?)?;
    let mask: Vec<f64> = (0..c).map(|k| f64::from(u8::from(k >= first))).collect();
    let mask = Var::from_f64(inter.backend(), &mask, inter.shape(), false)?;
    dice.mul(&mask)?
        .sum()?
        .scale(-1.0 / (c - first) as f64)?
        .add_scalar(1.0)
}

/// The reference: plain f64 loops.
impl LossBackend for Cpu64 {
    fn softmax_channels(&self, x: &CpuTensor, log: bool) -> Result<CpuTensor> {
        let (n, c, s) = channel_dims("softmax_channels", &x.shape)?;
        let mut out = vec![0.0; x.data.len()];
        for b in 0..n {
            for v in 0..s {
                let at = |k: usize| (b * c + k) * s + v;
                let max = (0..c).map(|k| x.data[at(k)]).fold(f64::MIN, f64::max);
                let total: f64 = (0..c).map(|k| (x.data[at(k)] - max).exp()).sum();
                for k in 0..c {
                    let shifted = x.data[at(k)] - max;
                    out[at(k)] = if log {
                        shifted - total.ln()
                    } else {
                        shifted.exp() / total
                    };
                }
            }
        }
        Ok(cpu(out, x.shape.clone()))
    }

    fn cross_entropy_voxels(&self, z: &CpuTensor, y: &CpuTensor) -> Result<CpuTensor> {
        same_shape("cross_entropy", &z.shape, &y.shape)?;
        let log_p = self.softmax_channels(z, true)?;
        per_voxel(z, |i| -y.data[i] * log_p.data[i])
    }

    fn cross_entropy_backward(
        &self,
        z: &CpuTensor,
        y: &CpuTensor,
        g: &CpuTensor,
    ) -> Result<CpuTensor> {
        same_shape("cross_entropy", &z.shape, &y.shape)?;
        let (n, c, s) = channel_dims("cross_entropy", &z.shape)?;
        let p = self.softmax_channels(z, false)?;
        let scalar = cross_entropy_gradient_is_scalar(&z.shape, &g.shape)?;
        let mut out = vec![0.0; z.data.len()];
        for b in 0..n {
            for v in 0..s {
                let at = |k: usize| (b * c + k) * s + v;
                let sum_y: f64 = (0..c).map(|k| y.data[at(k)]).sum();
                let g = if scalar { g.data[0] } else { g.data[b * s + v] };
                for k in 0..c {
                    out[at(k)] = g * (p.data[at(k)] * sum_y - y.data[at(k)]);
                }
            }
        }
        Ok(cpu(out, z.shape.clone()))
    }

    fn bce_with_logits_voxels(&self, z: &CpuTensor, y: &CpuTensor) -> Result<CpuTensor> {
        same_shape("binary_cross_entropy", &z.shape, &y.shape)?;
        channel_dims("binary_cross_entropy", &z.shape)?;
        per_voxel(z, |i| {
            let (z, y) = (z.data[i], y.data[i]);
            z.max(0.0) - z * y + (-z.abs()).exp().ln_1p()
        })
    }

    fn softmax_dice_sums(&self, z: &CpuTensor, y: &CpuTensor, squared: bool) -> Result<CpuTensor> {
        same_shape("softmax_dice", &z.shape, &y.shape)?;
        let (_, c, s) = channel_dims("softmax_dice", &z.shape)?;
        let p = self.softmax_channels(z, false)?;
        let mut sums = vec![0.0; 3 * c];
        for (i, (&p, &y)) in p.data.iter().zip(y.data.iter()).enumerate() {
            let k = (i / s) % c;
            sums[k] += p * y;
            sums[c + k] += if squared { p * p } else { p };
            sums[2 * c + k] += if squared { y * y } else { y };
        }
        Ok(cpu(sums, Shape::from([3, c])))
    }

    fn softmax_dice_backward(
        &self,
        z: &CpuTensor,
        y: &CpuTensor,
        d_sums: &CpuTensor,
        squared: bool,
    ) -> Result<CpuTensor> {
        same_shape("softmax_dice", &z.shape, &y.shape)?;
        let (n, c, s) = channel_dims("softmax_dice", &z.shape)?;
        let p = self.softmax_channels(z, false)?;
        let g = &d_sums.data;
        let u = |i: usize| {
            let k = (i / s) % c;
            if squared {
                g[k] * y.data[i] + 2.0 * g[c + k] * p.data[i]
            } else {
                g[k] * y.data[i] + g[c + k]
            }
        };
        let mut out = vec![0.0; z.data.len()];
        for b in 0..n {
            for v in 0..s {
                let at = |k: usize| (b * c + k) * s + v;
                let dot: f64 = (0..c).map(|k| p.data[at(k)] * u(at(k))).sum();
                for k in 0..c {
                    out[at(k)] = p.data[at(k)] * (u(at(k)) - dot);
                }
            }
        }
        Ok(cpu(out, z.shape.clone()))
    }

    fn ema(&self, teacher: &CpuTensor, student: &CpuTensor, decay: f64) -> Result<CpuTensor> {
        let data = teacher
            .data
            .iter()
            .zip(student.data.iter())
            .map(|(t, s)| decay * t + (1.0 - decay) * s)
            .collect();
        Ok(cpu(data, teacher.shape.clone()))
    }
}

fn cpu(data: Vec<f64>, shape: Shape) -> CpuTensor {
    CpuTensor {
        data: Arc::new(data),
        shape,
    }
}

/// sum over the class axis of term(i) for every element index i: [N, 1, ...].
fn per_voxel(x: &CpuTensor, term: impl Fn(usize) -> f64) -> Result<CpuTensor> {
    let (n, c, s) = channel_dims("per_voxel", &x.shape)?;
    let mut out = vec![0.0; n * s];
    for b in 0..n {
        for k in 0..c {
            for v in 0..s {
                out[b * s + v] += term((b * c + k) * s + v);
            }
        }
    }
    Ok(cpu(out, voxel_shape(&x.shape)))
}
