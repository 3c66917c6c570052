//! Optimisers, learning-rate schedules, gradient clipping, the mean teacher's decay and the
//! consistency ramp-up of METHODS.md. An optimiser works on a parameter store's flat form, so a
//! step is a handful of dispatches over one tensor whatever the number of parameters, and every
//! computation stays on the device (clipping included: no norm is read back).

use crate::nn::ParamStore;
use metaseg_autograd::{no_grad, Backend, Error, Result, Shape, Var};

/// SGD with momentum and weight decay as PyTorch applies it (dampening 0, no Nesterov).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sgd {
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
}

/// Parameters after a step, and the momentum buffers of that step.
pub type Stepped<B> = (Vec<Var<B>>, Vec<Var<B>>);

impl Sgd {
    /// d = g + wd theta; buf = mu buf + d (buf = d on the first step); theta' = theta - lr buf.
    /// Returns theta' and the new buffers; recorded like any op, so it can be differentiated
    /// (the meta step's look-ahead does).
    pub fn step<B: Backend>(
        &self,
        theta: &[Var<B>],
        grads: &[Var<B>],
        buffers: Option<&[Var<B>]>,
    ) -> Result<Stepped<B>> {
        let mut next = Vec::with_capacity(theta.len());
        let mut bufs = Vec::with_capacity(theta.len());
        for (k, (t, g)) in theta.iter().zip(grads).enumerate() {
            let d = if self.weight_decay == 0.0 {
                g.clone()
            } else {
                g.add(&t.scale(self.weight_decay)?)?
            };
            let buf = match buffers {
                Some(b) if self.momentum != 0.0 => b[k].scale(self.momentum)?.add(&d)?,
                _ => d,
            };
            next.push(t.sub(&buf.scale(self.lr)?)?);
            bufs.push(buf);
        }
        Ok((next, bufs))
    }
}

/// Adam as PyTorch applies it (L2 weight decay added to the gradient, bias-corrected moments).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Adam {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for Adam {
    fn default() -> Self {
        Adam {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Which update rule, with its hyperparameters (the learning rate is the schedule's base).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Rule {
    Sgd(Sgd),
    Adam(Adam),
}

/// An optimiser's state over one parameter store: its moment buffers in flat form, and the
/// number of steps taken.
pub struct Optimizer<B: Backend> {
    pub rule: Rule,
    /// SGD: [momentum]; Adam: [first moment, second moment]; empty before the first step.
    pub state: Vec<Var<B>>,
    pub steps: u64,
}

impl<B: Backend> Optimizer<B> {
    pub fn new(rule: Rule) -> Self {
        Optimizer {
            rule,
            state: Vec::new(),
            steps: 0,
        }
    }

    /// One update of `params` with gradients `grads` (in store order) at learning rate `lr`,
    /// not recorded. Returns the updated store.
    pub fn step(
        &mut self,
        params: &ParamStore<B>,
        grads: &[Var<B>],
        lr: f64,
    ) -> Result<ParamStore<B>> {
        if grads.len() != params.len() {
            return Err(Error::InvalidArgument {
                op: "optimizer",
                message: format!("{} gradients for {} parameters", grads.len(), params.len()),
            });
        }
        let backend =
            grads
                .first()
                .map(|g| g.backend().clone())
                .ok_or_else(|| Error::InvalidArgument {
                    op: "optimizer",
                    message: "no parameters".into(),
                })?;
        let parts: Vec<&B::Tensor> = grads.iter().map(Var::value).collect();
        let g = Var::constant(&backend, backend.concat_flat(&parts)?);
        self.step_flat(params, &g, lr)
    }

    /// [`Optimizer::step`] with the gradients already in flat form (store order, one [numel]
    /// tensor).
    pub fn step_flat(
        &mut self,
        params: &ParamStore<B>,
        g: &Var<B>,
        lr: f64,
    ) -> Result<ParamStore<B>> {
        if g.shape().numel() != params.numel() {
            return Err(Error::InvalidArgument {
                op: "optimizer",
                message: format!(
                    "a flat gradient of {} elements for {} parameters",
                    g.shape().numel(),
                    params.numel()
                ),
            });
        }
        let theta = Var::constant(g.backend(), params.flat()?);
        let next = no_grad(|| self.update(&theta, g, lr))?;
        self.steps += 1;
        params.from_flat(next.value())
    }

    fn update(&mut self, theta: &Var<B>, g: &Var<B>, lr: f64) -> Result<Var<B>> {
        match self.rule {
            Rule::Sgd(sgd) => {
                let sgd = Sgd { lr, ..sgd };
                let (mut next, bufs) = sgd.step(
                    std::slice::from_ref(theta),
                    std::slice::from_ref(g),
                    (!self.state.is_empty()).then_some(&self.state[..]),
                )?;
                self.state = bufs;
                Ok(next.remove(0))
            }
            Rule::Adam(adam) => {
                let (b1, b2) = adam.betas;
                let d = if adam.weight_decay == 0.0 {
                    g.clone()
                } else {
                    g.add(&theta.scale(adam.weight_decay)?)?
                };
                if self.state.is_empty() {
                    let zeros = Var::zeros(theta.backend(), theta.shape())?;
                    self.state = vec![zeros.clone(), zeros];
                }
                let m = self.state[0].scale(b1)?.add(&d.scale(1.0 - b1)?)?;
                let v = self.state[1]
                    .scale(b2)?
                    .add(&d.square()?.scale(1.0 - b2)?)?;
                let t = (self.steps + 1) as i32;
                let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
                // theta - lr m / c1 / (sqrt(v / c2) + eps), PyTorch's order of operations.
                let denom = v.scale(1.0 / c2)?.sqrt()?.add_scalar(adam.eps)?;
                let next = theta.sub(&m.div(&denom)?.scale(lr / c1)?)?;
                self.state = vec![m, v];
                Ok(next)
            }
        }
    }
}

/// Gradients scaled so their global L2 norm is at most `max_norm` (PyTorch's clip_grad_norm_:
/// factor min(1, max_norm / (norm + 1e-6))). The factor is computed on the device.
pub fn clip_grad_norm<B: Backend>(grads: &[Var<B>], max_norm: f64) -> Result<Vec<Var<B>>> {
    let Some(first) = grads.first() else {
        return Ok(Vec::new());
    };
    let backend = first.backend();
    no_grad(|| {
        let mut squares = Var::zeros(backend, &Shape::scalar())?;
        for g in grads {
            squares = squares.add(&g.square()?.sum()?)?;
        }
        let factor = clip_factor(&squares, max_norm)?;
        grads.iter().map(|g| g.mul(&factor)).collect()
    })
}

/// The factor of [`clip_grad_norm`], min(1, max_norm / (norm + 1e-6)), from the gradients'
/// squared global norm `squares` (a scalar on the device).
pub fn clip_factor<B: Backend>(squares: &Var<B>, max_norm: f64) -> Result<Var<B>> {
    no_grad(|| {
        let limit = Var::full(squares.backend(), &Shape::scalar(), max_norm)?;
        limit
            .div(&squares.sqrt()?.add_scalar(1e-6)?)?
            .clamp(0.0, 1.0)
    })
}

/// A learning-rate schedule over iterations.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Schedule {
    Constant,
    /// x gamma every `every` iterations (x0.1 every 2500 in the LA recipes).
    Step {
        every: u64,
        gamma: f64,
    },
    /// (1 - t / total)^power (power 0.9).
    Poly {
        total: u64,
        power: f64,
    },
    /// LambdaLR 20 / (epoch + 20), with epochs of `epoch` iterations (MLB-Seg's released code).
    Lambda {
        epoch: u64,
    },
}

impl Schedule {
    /// The learning rate at iteration `t` (from 0) for base rate `base`.
    pub fn lr(&self, base: f64, t: u64) -> f64 {
        match *self {
            Schedule::Constant => base,
            Schedule::Step { every, gamma } => base * gamma.powi((t / every.max(1)) as i32),
            Schedule::Poly { total, power } => {
                base * (1.0 - t.min(total) as f64 / total.max(1) as f64).powf(power)
            }
            Schedule::Lambda { epoch } => base * 20.0 / ((t / epoch.max(1)) as f64 + 20.0),
        }
    }
}

/// sigmoid_rampup(t, T) = exp(-5 (1 - clip(t / T, 0, 1))^2), as the SSL4MIS code ramps the
/// consistency weight; METHODS.md uses t = iteration // 150 and T = 40.
pub fn sigmoid_rampup(t: f64, length: f64) -> f64 {
    if length <= 0.0 {
        return 1.0;
    }
    let phase = 1.0 - (t / length).clamp(0.0, 1.0);
    (-5.0 * phase * phase).exp()
}

/// A loss term's weight ramped up over a run: `weight` * sigmoid_rampup(t // `unit`, `length`) at
/// iteration t, the one form of the consistency, mutual and cross-supervision weights of
/// METHODS.md (there `unit` 150 and `length` 40).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rampup {
    /// The weight at the end of the ramp-up.
    pub weight: f64,
    /// Its length in units.
    pub length: f64,
    /// Iterations per unit.
    pub unit: u64,
}

impl Rampup {
    /// The weight at iteration `t` (from 0).
    pub fn at(&self, t: u64) -> f64 {
        self.weight * sigmoid_rampup((t / self.unit.max(1)) as f64, self.length)
    }
}

/// The mean teacher's decay at step t (from 0): min(1 - 1 / (t + 1), decay), so the teacher
/// follows the student closely at first.
pub fn teacher_decay(t: u64, decay: f64) -> f64 {
    (1.0 - 1.0 / (t as f64 + 1.0)).min(decay)
}
