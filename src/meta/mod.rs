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
//! Jacobian-vector product J_c v, taken in forward mode ([`jvp`]): the costs evaluated once more
//! with tangents carried beside the values. The meta network is differentiated to first order
//! only; no backward pass of the costs is computed or kept.
//!
//! Its memory is that of its largest phase, never two at once: (1) the gradient of the other
//! terms, if any, for theta'; (2) the meta loss's forward and backward at theta' for v; (3) the
//! costs in forward mode, which keep no record (each activation and its tangent are freed as the
//! network moves on). Phase 2 is about a plain training step, so the step's peak is too.

pub mod study;

pub use crate::optim::Sgd;
use metaseg_autograd::{grad, jvp, no_grad, second_order, Backend, Error, Result, Var};

/// A loss (a scalar, or per-voxel costs) at some parameters.
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

/// One meta step's problem: the inner loss is sum(eps * costs(theta)) + other(theta), and
/// `meta_loss(theta')` the loss on the meta batch. All must be deterministic (dropout keyed by a
/// fixed seed and step). Costs and other terms are separate so that the fast path can take the
/// other terms' gradient and drop their graph before it needs the costs.
pub struct MetaStep<'a, B: Backend> {
    pub theta: &'a [Var<B>],
    /// The optimiser's momentum buffers, if it has taken a step.
    pub buffers: Option<&'a [Var<B>]>,
    pub sgd: Sgd,
    /// The per-voxel costs c (any shape).
    pub costs: Loss<'a, B>,
    /// The other terms of the inner loss (a scalar), if any.
    pub other: Option<Loss<'a, B>>,
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
        // The inner loss's gradient is differentiated again: ops with a first-order fused
        // backward record their composition now rather than recompute it in that backward.
        let c = second_order(|| (self.costs)(self.theta))?;
        let eps = Var::parameter(c.backend(), c.backend().fill(c.shape(), 0.0)?);
        let mut inner = eps.mul(&c)?.sum()?;
        if let Some(other) = self.other {
            inner = inner.add(&second_order(|| other(self.theta))?)?;
        }
        let wrt: Vec<&Var<B>> = self.theta.iter().collect();
        let g = grad(&inner, &wrt, None, true)?;
        let (ahead, _) = self.sgd.step(self.theta, &g, self.buffers)?;
        let meta = (self.meta_loss)(&ahead)?;
        Ok(grad(&meta, &[&eps], None, false)?.remove(0))
    }

    /// The phases run one after the other, each one's graph dropped when it ends (see the top).
    fn fast(&self) -> Result<Var<B>> {
        let ahead = self.look_ahead_at_zero()?;
        let v = {
            let meta = (self.meta_loss)(&ahead)?;
            grad(&meta, &ahead.iter().collect::<Vec<_>>(), None, false)?
        };
        drop(ahead);
        let (_, jv) = jvp(self.costs, self.theta, &v)?;
        jv.scale(-self.sgd.lr)
    }

    /// theta' at eps = 0, where only the other terms move theta, as fresh parameters: v is the
    /// meta loss's gradient with respect to theta' itself.
    fn look_ahead_at_zero(&self) -> Result<Vec<Var<B>>> {
        let g_other = match self.other {
            Some(other) => {
                let wrt: Vec<&Var<B>> = self.theta.iter().collect();
                grad(&other(self.theta)?, &wrt, None, false)?
            }
            None => self
                .theta
                .iter()
                .map(|t| Var::zeros(t.backend(), t.shape()))
                .collect::<Result<_>>()?,
        };
        // One step over the parameters' flat form: the same elementwise ops per element as a
        // step per parameter, in a handful of dispatches whatever the number of parameters.
        let backend = g_other[0].backend();
        let flat = |vs: &[Var<B>]| -> Result<[Var<B>; 1]> {
            let values: Vec<&B::Tensor> = vs.iter().map(Var::value).collect();
            Ok([Var::constant(backend, backend.concat_flat(&values)?)])
        };
        let (ahead, _) = no_grad(|| -> Result<_> {
            let buffers = self.buffers.map(flat).transpose()?;
            let buffers = buffers.as_ref().map(|b| &b[..]);
            self.sgd.step(&flat(self.theta)?, &flat(&g_other)?, buffers)
        })?;
        let shapes: Vec<_> = self.theta.iter().map(|t| t.shape().clone()).collect();
        Ok(backend
            .split_flat(ahead[0].value(), &shapes)?
            .into_iter()
            .map(|t| Var::parameter(backend, t))
            .collect())
    }
}
