//! The dense contrastive losses of METHODS.md: the local contrastive loss of Chaitanya et al.
//! (pull each sampled voxel to its class mean in both images of a pair) and the dense InfoNCE of
//! IDEAL's pre-training (each location of view 1 against every location of the batch in view 2).
//! Embeddings are [N, E, ...] (NCDHW): axis 1 holds the E channels of a voxel's embedding.
//!
//! The local contrastive loss is composed from the elementwise ops, sums and matmuls (its class
//! means are matmuls of the embeddings with the labels), so its gradient works at any order and it
//! runs on any backend through the existing kernels. Dense InfoNCE needs one primitive
//! ([`ContrastiveBackend`]): the log-sum-exp over the whole batch of every location's
//! similarities, which a kernel streams without storing the M x M matrix. Its backward is another
//! streamed primitive without a rule of its own (`Rule::FirstOrder`: second order is a typed
//! `NoSecondOrder` error).

use crate::backend::{Backend, MatmulSpec, UnaryOp};
use crate::layers::{LayerBackend, Window3d};
use crate::var::{no_grad, Rule, Var};
use crate::{random, Cpu64, CpuTensor, Error, Result, Shape};
use std::sync::Arc;

/// Added to the squared norm before the square root of an L2 normalisation, so a zero vector
/// normalises to zero with a finite gradient. Its square root (1e-12) is PyTorch's
/// `F.normalize` eps; for any embedding of norm >> 1e-12 the result is the exact normalisation.
pub const NORM_EPS_SQUARED: f64 = 1e-24;

/// The temperature of both losses in METHODS.md.
pub const DEFAULT_TAU: f64 = 0.1;

/// The streamed primitive of dense InfoNCE. `qn` and `kn` are [N, E, ...] with the locations
/// after the channel axis; with M = N S locations numbered m = n S + s and
/// s_ij = qn_i . kn_j / tau, the primitive computes lse_i = log sum_j exp(s_ij) over all M
/// columns, without ever holding the M x M matrix.
pub trait ContrastiveBackend: Backend {
    /// lse_i for every location i of `qn`, shape [N, 1, ...].
    fn infonce_logsumexp(
        &self,
        qn: &Self::Tensor,
        kn: &Self::Tensor,
        tau: f64,
    ) -> Result<Self::Tensor>;
    /// Given the forward's `lse` and its gradient `g` (both [N, 1, ...]), with
    /// P_ij = exp(s_ij - lse_i): d qn_i = g_i / tau sum_j P_ij kn_j and
    /// d kn_j = 1 / tau sum_i g_i P_ij qn_i, each streamed like the forward.
    fn infonce_logsumexp_backward(
        &self,
        qn: &Self::Tensor,
        kn: &Self::Tensor,
        lse: &Self::Tensor,
        g: &Self::Tensor,
        tau: f64,
    ) -> Result<(Self::Tensor, Self::Tensor)>;
    /// The anchor mask [N, 1, ...] of labels [N, C, ...], as [`sample_anchors`] defines it.
    fn sample_anchors(
        &self,
        labels: &Self::Tensor,
        per_class: usize,
        seed: u64,
    ) -> Result<Self::Tensor>;
}

fn check_tau(op: &'static str, tau: f64) -> Result<()> {
    if tau > 0.0 && tau.is_finite() {
        return Ok(());
    }
    Err(Error::InvalidArgument {
        op,
        message: format!("the temperature tau must be positive and finite, got {tau}"),
    })
}

/// [N, E, S] of queries and keys, which must have the same shape of rank >= 2.
pub fn infonce_dims(op: &'static str, q: &Shape, k: &Shape) -> Result<(usize, usize, usize)> {
    if q != k {
        return Err(Error::Shape {
            op,
            lhs: q.clone(),
            rhs: k.clone(),
            reason: "queries and keys must have the same shape [N, E, ...]".into(),
        });
    }
    match q.dims() {
        [n, e, rest @ ..] => Ok((*n, *e, rest.iter().product())),
        _ => Err(Error::InvalidArgument {
            op,
            message: format!("expected [N, E, ...] (rank >= 2), got shape {q}"),
        }),
    }
}

/// The shape of the per-location log-sum-exp, [N, 1, ...], checked against the gradient `g`.
pub fn infonce_backward_dims(
    q: &Shape,
    k: &Shape,
    lse: &Shape,
    g: &Shape,
) -> Result<(usize, usize, usize)> {
    let dims = infonce_dims("infonce_logsumexp_backward", q, k)?;
    let expected = q.reduced(&[1]);
    for s in [lse, g] {
        if *s != expected {
            return Err(Error::Shape {
                op: "infonce_logsumexp_backward",
                lhs: q.clone(),
                rhs: s.clone(),
                reason: "lse and its gradient must be [N, 1, ...] of the queries".into(),
            });
        }
    }
    Ok(dims)
}

/// Shapes and temperature of the local contrastive loss, checked: `emb` [N, E, ...], `labels`
/// [N, C, ...] with the same N and spatial dimensions, `anchors` [N, 1, ...], N even and > 0.
/// Returns (N, E, C, S).
pub fn local_contrastive_dims(
    emb: &Shape,
    labels: &Shape,
    anchors: Option<&Shape>,
    tau: f64,
) -> Result<(usize, usize, usize, usize)> {
    const OP: &str = "local_contrastive";
    check_tau(OP, tau)?;
    let mismatch = |rhs: &Shape, reason: &str| Error::Shape {
        op: OP,
        lhs: emb.clone(),
        rhs: rhs.clone(),
        reason: reason.into(),
    };
    let [n, e, spatial @ ..] = emb.dims() else {
        return Err(Error::InvalidArgument {
            op: OP,
            message: format!("expected embeddings [N, E, ...] (rank >= 2), got shape {emb}"),
        });
    };
    if *n == 0 || n % 2 != 0 {
        return Err(Error::InvalidArgument {
            op: OP,
            message: format!(
                "the batch must pair images 2i and 2i+1, so N must be even and positive; \
                 embeddings have shape {emb}"
            ),
        });
    }
    let same_voxels =
        |s: &Shape| s.rank() == emb.rank() && s.dims()[0] == *n && &s.dims()[2..] == spatial;
    if !same_voxels(labels) {
        return Err(mismatch(
            labels,
            "labels must be [N, C, ...] over the same voxels",
        ));
    }
    if let Some(a) = anchors {
        if !same_voxels(a) || a.dims()[1] != 1 {
            return Err(mismatch(
                a,
                "anchors must be [N, 1, ...] over the same voxels",
            ));
        }
    }
    let c = labels.dims()[1];
    Ok((*n, *e, c, spatial.iter().product()))
}

/// Normalisation of embeddings along the channel axis.
impl<B: Backend> Var<B> {
    /// x / sqrt(sum_e x_e^2 + 1e-24) along `axis`: the L2 normalisation of every vector along it
    /// (see [`NORM_EPS_SQUARED`]).
    pub fn l2_normalize(&self, axis: usize) -> Result<Self> {
        let norm = self
            .square()?
            .sum_axes(&[axis], true)?
            .add_scalar(NORM_EPS_SQUARED)?
            .sqrt()?;
        self.div(&norm)
    }
}

/// Dense InfoNCE.
impl<B: ContrastiveBackend> Var<B> {
    /// lse_i = log sum_j exp(self_i . keys_j / tau) over all locations j of the batch, [N, 1, ...]
    /// (see [`ContrastiveBackend`]). First order only: its backward is a streamed kernel without
    /// a rule of its own, so differentiating it twice is `Error::NoSecondOrder`.
    pub fn infonce_logsumexp(&self, keys: &Var<B>, tau: f64) -> Result<Self> {
        check_tau("dense_infonce", tau)?;
        infonce_dims("dense_infonce", self.shape(), keys.shape())?;
        let value = self
            .backend()
            .infonce_logsumexp(self.value(), keys.value(), tau)?;
        Ok(Var::from_op(
            "infonce_logsumexp",
            value,
            &[self, keys],
            Rule::FirstOrder(Box::new(
                move |b: &B, x: &[&B::Tensor], lse: &B::Tensor, g: &B::Tensor| {
                    let (d_q, d_k) = b.infonce_logsumexp_backward(x[0], x[1], lse, g, tau)?;
                    Ok(vec![Some(d_q), Some(d_k)])
                },
            )),
        ))
    }

    /// Dense InfoNCE of queries `self` and keys `keys`, both [N, E, ...] with location i of one
    /// corresponding to location i of the other. With qn, kn normalised along the channels and M
    /// the N S locations of the batch:
    /// mean over i of -log(exp(qn_i . kn_i / tau) / sum_j exp(qn_i . kn_j / tau)),
    /// computed as mean(lse_i - qn_i . kn_i / tau).
    pub fn dense_infonce(&self, keys: &Var<B>, tau: f64) -> Result<Self> {
        check_tau("dense_infonce", tau)?;
        infonce_dims("dense_infonce", self.shape(), keys.shape())?;
        let qn = self.l2_normalize(1)?;
        let kn = keys.l2_normalize(1)?;
        let lse = qn.infonce_logsumexp(&kn, tau)?;
        let positive = qn.mul(&kn)?.sum_axes(&[1], true)?.scale(1.0 / tau)?;
        lse.sub(&positive)?.mean()
    }
}

/// The local contrastive loss. It needs `max_pool3d` only for a constant shift of the
/// log-sum-exp (see the body).
impl<B: LayerBackend> Var<B> {
    /// The local contrastive loss of Chaitanya et al. on embeddings `self` [N, E, ...] with one-hot
    /// `labels` [N, C, ...] (class 0 is the background) and optional `anchors` [N, 1, ...] (1 where
    /// a voxel is an anchor; every voxel when `None`). Images 2i and 2i+1 form a pair (a, b).
    ///
    /// Embeddings are L2-normalised per voxel (z); mu_c^x is the normalised sum (equivalently,
    /// mean) of the z of class c in image x. For an anchor v of foreground class c in either image
    /// of a pair and each positive P in {mu_c^a, mu_c^b} whose class is present in its image:
    /// l = -log(exp(z_v . P / tau) / sum_{c' >= 1, x in {a, b}, c' present in x} exp(z_v . mu_c'^x / tau)).
    ///
    /// The mean: the sum of l over every (anchor, positive) term of every pair, divided by the
    /// number of such terms. An anchor whose class is absent from the partner image has one
    /// positive (its own image's mean); anchors on the background and pairs without foreground
    /// anchors contribute no term; with no term at all the loss is 0. Labels weight the terms as
    /// given, so soft labels weight them fractionally (and count fractionally).
    pub fn local_contrastive(
        &self,
        labels: &Var<B>,
        anchors: Option<&Var<B>>,
        tau: f64,
    ) -> Result<Self> {
        let (n, e, c, s) =
            local_contrastive_dims(self.shape(), labels.shape(), anchors.map(Var::shape), tau)?;
        let b = self.backend();
        let z = self.reshape(&Shape::from([n, e, s]))?.l2_normalize(1)?;
        let y = labels.reshape(&Shape::from([n, c, s]))?;
        // Class means, class-major [N, C, E]: y [C, S] @ z^T [S, E] per image.
        let trans_b = MatmulSpec {
            trans_a: false,
            trans_b: true,
        };
        let mu = y.matmul(&z, trans_b)?.l2_normalize(2)?;
        // Both images of a pair see the same 2C means (a's classes, then b's): [N, 2C, E].
        let pair = |x: Var<B>, inner: usize| -> Result<Var<B>> {
            x.reshape(&Shape::from([n / 2, 1, 2 * c * inner]))?
                .broadcast_to(&Shape::from([n / 2, 2, 2 * c * inner]))?
                .reshape(&Shape::from([n, 2 * c, inner]))
        };
        let means = pair(mu, e)?;
        // Logits of every voxel against the 2C means: [N, 2C, S].
        let logits = means.matmul(&z, MatmulSpec::default())?.scale(1.0 / tau)?;
        // Term t of the 2C is a foreground class present in its image: [N, 2C, 1].
        let present = pair(y.sum_axes(&[2], true)?.unary(UnaryOp::ReluMask)?, 1)?;
        let foreground: Vec<f64> = (0..2 * c)
            .map(|t| f64::from(u8::from(t % c != 0)))
            .collect();
        let foreground = Var::from_f64(b, &foreground, &Shape::from([1, 2 * c, 1]), false)?;
        let terms = present.mul(&foreground)?;
        let log_denominator = masked_logsumexp(&logits, &terms, tau)?;
        // Weight of the term (voxel v, positive t): v is an anchor of t's class and t exists.
        let mut weight = class_of_term(b, c)?
            .matmul(&y, MatmulSpec::default())?
            .mul(&terms)?;
        if let Some(a) = anchors {
            weight = weight.mul(&a.reshape(&Shape::from([n, 1, s]))?)?;
        }
        let total = weight.mul(&log_denominator.sub(&logits)?)?.sum()?;
        let count = weight.sum()?;
        // Dividing by count + [count = 0] leaves the mean exact and makes "no term" a 0.
        let no_term = count.unary(UnaryOp::ReluMask)?.neg()?.add_scalar(1.0)?;
        total.div(&count.add(&no_term)?)
    }
}

/// [2C, C]: row t is the one-hot of class t mod C (the class that term t is a mean of), so that
/// this @ labels [N, C, S] is 1 at (t, v) when voxel v has term t's class.
fn class_of_term<B: Backend>(b: &B, c: usize) -> Result<Var<B>> {
    let values: Vec<f64> = (0..2 * c * c)
        .map(|i| f64::from(u8::from((i / c) % c == i % c)))
        .collect();
    Var::from_f64(b, &values, &Shape::from([2 * c, c]), false)
}

/// log sum_t terms_t exp(logits_t) over axis 1 of [N, 2C, S], [N, 1, S]. The masked terms
/// contribute exactly 0 (their exponentials are multiplied by 0). Stable: shifted by m = the
/// largest logit among the present terms, a constant, since the value does not depend on m (and
/// so neither does any derivative). Where no term is present the sum is 0; its log is taken of 1
/// instead (such voxels carry no weight in the loss).
fn masked_logsumexp<B: LayerBackend>(logits: &Var<B>, terms: &Var<B>, tau: f64) -> Result<Var<B>> {
    let b = logits.backend();
    let [n, t, s] = *logits.shape().dims() else {
        unreachable!("logits are [N, 2C, S]")
    };
    let shift = no_grad(|| -> Result<Var<B>> {
        // Cosines lie in [-1, 1], so absent terms pushed down by 3 / tau are below every present one.
        let masked = logits.add(&terms.add_scalar(-1.0)?.scale(3.0 / tau)?)?;
        let window = Window3d {
            kernel: [t, 1, 1],
            stride: [t, 1, 1],
        };
        let volume = b.reshape(masked.value(), &Shape::from([n, 1, t, s, 1]))?;
        let max = b.max_pool3d(&volume, window)?;
        Ok(Var::constant(b, b.reshape(&max, &Shape::from([n, 1, s]))?))
    })?;
    let sum = logits
        .sub(&shift)?
        .exp()?
        .mul(terms)?
        .sum_axes(&[1], true)?;
    let none = terms
        .sum_axes(&[1], true)?
        .unary(UnaryOp::ReluMask)?
        .neg()?
        .add_scalar(1.0)?;
    sum.add(&none)?.log()?.add(&shift)
}

/// Anchor voxels for the local contrastive loss: for each image and each foreground class c >= 1
/// present in it (a voxel is of class c when labels[n, c, v] > 0.5), `per_class` distinct voxels
/// of that class drawn uniformly (all of them when it has fewer), as a mask [N, 1, ...]. Each voxel
/// v of the class gets the key random_bits(seed, ((n C + c) << 32) + v) of the counter-based
/// generator, and the `per_class` smallest keys (ties by voxel index) are the draw: uniform without
/// replacement, deterministic from the seed, and computable in parallel, so the GPU kernel
/// (`sample_anchors` in kernels/random.wgsl) makes the same mask. The mask is a constant: no
/// gradient flows through sampling.
pub fn sample_anchors(
    labels: &[f64],
    shape: &Shape,
    per_class: usize,
    seed: u64,
) -> Result<Vec<f64>> {
    let (n, c, s) = anchor_dims(shape, per_class)?;
    if labels.len() != shape.numel() {
        return Err(Error::InvalidArgument {
            op: "sample_anchors",
            message: format!("{} label values for shape {shape}", labels.len()),
        });
    }
    let mut mask = vec![0.0; n * s];
    for image in 0..n {
        for class in 1..c {
            let plane = image * c + class;
            let mut keyed: Vec<(u32, usize)> = (0..s)
                .filter(|&v| labels[plane * s + v] > 0.5)
                .map(|v| {
                    (
                        random::random_bits(seed, ((plane as u64) << 32) + v as u64),
                        v,
                    )
                })
                .collect();
            keyed.sort_unstable();
            for &(_, v) in keyed.iter().take(per_class) {
                mask[image * s + v] = 1.0;
            }
        }
    }
    Ok(mask)
}

/// Most anchors per image and class: the GPU kernel keeps that many candidates per invocation.
pub const MAX_ANCHORS: usize = 16;

/// (N, C, voxels per image) of labels [N, C, ...] for `per_class` anchors, or the error.
pub fn anchor_dims(shape: &Shape, per_class: usize) -> Result<(usize, usize, usize)> {
    let [n, c, ..] = *shape.dims() else {
        return Err(Error::InvalidArgument {
            op: "sample_anchors",
            message: format!("expected labels [N, C, ...] (rank >= 2), got shape {shape}"),
        });
    };
    if per_class > MAX_ANCHORS {
        return Err(Error::InvalidArgument {
            op: "sample_anchors",
            message: format!("{per_class} anchors per class: at most {MAX_ANCHORS}"),
        });
    }
    Ok((n, c, shape.numel() / (n * c).max(1)))
}

/// [`sample_anchors`] on a tensor of any backend (the backend's own kernel): the mask as an op
/// with no gradient (differentiating through it is `Error::NoGradient`).
impl<B: ContrastiveBackend> Var<B> {
    pub fn sample_anchors(&self, per_class: usize, seed: u64) -> Result<Self> {
        let value = self
            .backend()
            .sample_anchors(self.value(), per_class, seed)?;
        Ok(Var::from_op("sample_anchors", value, &[self], Rule::None))
    }
}

/// The reference: plain f64 loops over the M x M similarities, one row at a time.
impl ContrastiveBackend for Cpu64 {
    fn sample_anchors(&self, labels: &CpuTensor, per_class: usize, seed: u64) -> Result<CpuTensor> {
        let mask = sample_anchors(&labels.data, &labels.shape, per_class, seed)?;
        Ok(cpu(mask, labels.shape.reduced(&[1])))
    }

    fn infonce_logsumexp(&self, qn: &CpuTensor, kn: &CpuTensor, tau: f64) -> Result<CpuTensor> {
        let (n, e, s) = infonce_dims("dense_infonce", &qn.shape, &kn.shape)?;
        let lse = (0..n * s)
            .map(|i| {
                let row = similarity_row(&qn.data, &kn.data, i, (n, e, s), tau);
                let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln()
            })
            .collect();
        Ok(cpu(lse, qn.shape.reduced(&[1])))
    }

    fn infonce_logsumexp_backward(
        &self,
        qn: &CpuTensor,
        kn: &CpuTensor,
        lse: &CpuTensor,
        g: &CpuTensor,
        tau: f64,
    ) -> Result<(CpuTensor, CpuTensor)> {
        let (n, e, s) = infonce_backward_dims(&qn.shape, &kn.shape, &lse.shape, &g.shape)?;
        let at = |m: usize, ch: usize| (m / s * e + ch) * s + m % s;
        let mut d_q = vec![0.0; qn.data.len()];
        let mut d_k = vec![0.0; kn.data.len()];
        for i in 0..n * s {
            let row = similarity_row(&qn.data, &kn.data, i, (n, e, s), tau);
            for (j, &sij) in row.iter().enumerate() {
                let w = g.data[i] * (sij - lse.data[i]).exp() / tau;
                for ch in 0..e {
                    d_q[at(i, ch)] += w * kn.data[at(j, ch)];
                    d_k[at(j, ch)] += w * qn.data[at(i, ch)];
                }
            }
        }
        Ok((cpu(d_q, qn.shape.clone()), cpu(d_k, kn.shape.clone())))
    }
}

/// s_ij = q_i . k_j / tau for row i against all M = N S locations j of [N, E, S] data.
fn similarity_row(
    q: &[f64],
    k: &[f64],
    i: usize,
    (n, e, s): (usize, usize, usize),
    tau: f64,
) -> Vec<f64> {
    let at = |m: usize, ch: usize| (m / s * e + ch) * s + m % s;
    (0..n * s)
        .map(|j| (0..e).map(|ch| q[at(i, ch)] * k[at(j, ch)]).sum::<f64>() / tau)
        .collect()
}

fn cpu(data: Vec<f64>, shape: Shape) -> CpuTensor {
    CpuTensor {
        data: Arc::new(data),
        shape,
    }
}
