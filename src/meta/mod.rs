//! MLB-Seg's meta step (METHODS.md, step 5): the gradient of the meta loss after a one-step
//! look-ahead with respect to per-voxel cost weights eps, at eps = 0, computed exactly in two ways.
//!
//! Reverse over reverse: eps enters the inner loss as sum(eps * c); the inner gradient is taken
//! with `create_graph`, the look-ahead step theta' is recorded, and the meta loss at theta' is
//! differentiated back to eps through all of it.
//!
//! Fast: the look-ahead moves theta by -lr * (mu m + grad(sum(eps c) + other) + wd theta), whose
//! derivative with respect to eps_i is -lr * grad c_i(theta); so
//! dL_meta/d eps_i = -lr * <v, grad c_i(theta)> with v = grad L_meta(theta'), and at eps = 0
//! theta' does not depend on the costs at all. The vector of all <v, grad c_i> is the
//! Jacobian-vector product J_c v, taken in forward mode ([`jvp`]): tangents pushed through the
//! costs' recorded forward graph, about the cost of one more forward pass. The meta network is
//! differentiated to first order only; no backward pass of the inner network is computed or kept.

pub use crate::optim::Sgd;
use metaseg_autograd::{grad, jvp, no_grad, Backend, Error, Result, Var};

/// The costs and other inner-loss terms at some parameters.
pub type InnerLoss<'a, B> = &'a dyn Fn(&[Var<B>]) -> Result<(Var<B>, Option<Var<B>>)>;
/// A scalar loss at some parameters.
pub type Loss<'a, B> = &'a dyn Fn(&[Var<B>]) -> Result<Var<B>>;

/// Which exact method computes the meta-gradient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetaPath {
    Reverse,
    Fast,
}

impl MetaPath {
    pub fn parse(s: &str) -> Option<MetaPath> {
        match s {
            "reverse" => Some(MetaPath::Reverse),
            "fast" => Some(MetaPath::Fast),
            _ => None,
        }
    }
}

/// One meta step's problem. `inner(theta)` gives the per-voxel costs c (any shape) and the other
/// terms of the inner loss (a scalar, or none); `meta_loss(theta')` the loss on the meta batch.
/// Both must be deterministic (dropout keyed by a fixed seed and step).
pub struct MetaStep<'a, B: Backend> {
    pub theta: &'a [Var<B>],
    /// The optimiser's momentum buffers, if it has taken a step.
    pub buffers: Option<&'a [Var<B>]>,
    pub sgd: Sgd,
    pub inner: InnerLoss<'a, B>,
    pub meta_loss: Loss<'a, B>,
}

impl<B: Backend> MetaStep<'_, B> {
    /// dL_meta(theta'(eps)) / d eps at eps = 0, with the shape of the costs (a constant).
    pub fn meta_gradient(&self, path: MetaPath) -> Result<Var<B>> {
        if let Some(t) = self.theta.iter().find(|t| !t.requires_grad()) {
            return Err(Error::InvalidArgument {
                op: "meta_gradient",
                message: format!("parameter of shape {} does not take gradients", t.shape()),
            });
        }
        match path {
            MetaPath::Reverse => self.reverse(),
            MetaPath::Fast => self.fast(),
        }
    }

    fn reverse(&self) -> Result<Var<B>> {
        let (c, other) = (self.inner)(self.theta)?;
        let eps = Var::parameter(c.backend(), c.backend().fill(c.shape(), 0.0)?);
        let mut inner = eps.mul(&c)?.sum()?;
        if let Some(o) = other {
            inner = inner.add(&o)?;
        }
        let wrt: Vec<&Var<B>> = self.theta.iter().collect();
        let g = grad(&inner, &wrt, None, true)?;
        let (ahead, _) = self.sgd.step(self.theta, &g, self.buffers)?;
        let meta = (self.meta_loss)(&ahead)?;
        Ok(grad(&meta, &[&eps], None, false)?.remove(0))
    }

    fn fast(&self) -> Result<Var<B>> {
        let (c, other) = (self.inner)(self.theta)?;
        let wrt: Vec<&Var<B>> = self.theta.iter().collect();
        let backend = c.backend().clone();
        // theta' at eps = 0: only the other terms move it. Computed as constants.
        let g_other = match &other {
            Some(o) => grad(o, &wrt, None, false)?,
            None => zeros_like(&backend, self.theta)?,
        };
        let ahead = no_grad(|| {
            let detached: Vec<Var<B>> = self.theta.iter().map(Var::detach).collect();
            self.sgd.step(&detached, &g_other, self.buffers)
        })?
        .0
        .into_iter()
        .map(|t| Var::parameter(&backend, t.value().clone()))
        .collect::<Vec<_>>();
        let meta = (self.meta_loss)(&ahead)?;
        let v = grad(&meta, &ahead.iter().collect::<Vec<_>>(), None, false)?;
        // J_c v in forward mode along the recorded graph of the costs.
        let tangents: Vec<(&Var<B>, &Var<B>)> = self.theta.iter().zip(&v).collect();
        let jv = jvp(&c, &tangents, false)?;
        no_grad(|| jv.scale(-self.sgd.lr))
    }
}

fn zeros_like<B: Backend>(backend: &B, xs: &[Var<B>]) -> Result<Vec<Var<B>>> {
    xs.iter().map(|x| Var::zeros(backend, x.shape())).collect()
}
