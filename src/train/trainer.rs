//! Everything a run updates: the student (a [`Learner`]) and the method's state beside it, with
//! the configuration and network they share; and the small pieces every method's step uses (the
//! batch on the device, the log of a step, the supervised loss, slicing a batch).

use super::config::TrainConfig;
use super::methods::{Setup, Stage, Training};
use super::network::{optimizer_rule, Guarded, Learner, Net, Weights};
use crate::nn::{Mode, NetBackend};
use crate::optim::Schedule;
use metaseg_autograd::{DiceOptions, Reduction, Result, Shape, Var};
use std::any::Any;

/// A batch on the device: images [N, C, patch], one-hot labels of the first `labeled` [L, K, patch]
/// (of all N when the method's unlabeled patches carry labels).
pub struct DeviceBatch<B: NetBackend> {
    pub x: Var<B>,
    pub y: Var<B>,
    pub labeled: usize,
}

/// The scalars of one step, as read back: the total loss first, the learning rate second.
pub type StepLog = Vec<(&'static str, f64)>;

/// What every method's step reads besides its own state: the run's configuration and network.
#[derive(Clone, Copy)]
pub struct Context<'a> {
    pub config: &'a TrainConfig,
    pub net: &'a Net,
}

impl Context<'_> {
    /// The learning-rate schedule of `[optimizer]`.
    pub fn schedule(&self) -> Schedule {
        let o = &self.config.optimizer;
        match o.schedule.as_str() {
            "step" => Schedule::Step {
                every: o.step_every,
                gamma: o.gamma,
            },
            "poly" => Schedule::Poly {
                total: self.config.iterations,
                power: o.power,
            },
            "lambda" => Schedule::Lambda { epoch: o.epoch },
            _ => Schedule::Constant,
        }
    }

    /// The learning rate of iteration `t`.
    pub fn lr(&self, t: u64) -> f64 {
        self.schedule().lr(self.config.optimizer.lr, t)
    }

    /// Training mode at iteration `t` with the dropout stream of `seed`.
    pub fn mode(&self, seed: u64, t: u64) -> Mode {
        Mode::Train {
            seed,
            step: t as u32,
        }
    }

    /// Training mode at iteration `t` with the run's own dropout stream.
    pub fn train_mode(&self, t: u64) -> Mode {
        self.mode(self.config.seed, t)
    }
}

/// A run's state: configuration and stage, network, the student, the method's state.
pub struct Trainer<B: NetBackend> {
    pub config: TrainConfig,
    pub stage: Stage,
    pub net: Net,
    pub student: Learner<B>,
    pub method: Box<dyn Training<B>>,
}

impl<B: NetBackend> Trainer<B> {
    /// The main stage of the configuration's method, before its first step.
    pub fn new(backend: &B, config: &TrainConfig, in_channels: usize) -> Result<Self> {
        Self::at(backend, config, Stage::Main, in_channels)
    }

    /// `stage` of the configuration's method, before its first step.
    pub fn at(backend: &B, config: &TrainConfig, stage: Stage, in_channels: usize) -> Result<Self> {
        let net = Net::new(
            config,
            config.method.kind().heads(config, stage),
            in_channels,
        )?;
        let weights = Weights::init(backend, &net, config.seed)?;
        let method = config.method.build(&Setup {
            backend,
            config,
            stage,
            net: &net,
            student: &weights,
        })?;
        Ok(Trainer {
            config: config.clone(),
            stage,
            net,
            student: Learner::new(weights, optimizer_rule(config)),
            method,
        })
    }

    pub fn context(&self) -> Context<'_> {
        Context {
            config: &self.config,
            net: &self.net,
        }
    }

    /// One step of the method at iteration `t` (from 0). The gradient norms its updates leave
    /// for the guard are this step's alone.
    pub fn step(&mut self, batch: &DeviceBatch<B>, t: u64) -> Result<StepLog> {
        self.student.grad_norms.clear();
        for (_, network) in self.method.networks() {
            if let Guarded::Learner(l) = network {
                l.grad_norms.clear();
            }
        }
        let cx = Context {
            config: &self.config,
            net: &self.net,
        };
        self.method.step(&cx, &mut self.student, batch, t)
    }

    /// The network that is validated, tested and predicts (the student, or what the method
    /// keeps in its place).
    pub fn evaluated(&self) -> &Weights<B> {
        self.method.evaluated(&self.student.weights)
    }

    /// The method's state as its own type, if it is `M`.
    pub fn state<M: Training<B>>(&self) -> Option<&M> {
        (self.method.as_ref() as &dyn Any).downcast_ref()
    }
}

/// A step's log: the named scalars read back in one transfer (the first is the loss), the
/// learning rate `lr` second.
pub fn step_log<B: NetBackend>(terms: &[(&'static str, Var<B>)], lr: f64) -> Result<StepLog> {
    let backend = terms[0].1.backend();
    let scalars: Vec<&B::Tensor> = terms.iter().map(|(_, v)| v.value()).collect();
    let values = backend.to_f64(&backend.concat_flat(&scalars)?)?;
    let mut log: StepLog = terms.iter().map(|(n, _)| *n).zip(values).collect();
    log.insert(1, ("lr", lr));
    Ok(log)
}

/// The supervised terms of labeled logits against one-hot labels: softmax CE and the softmax
/// Dice loss over the foreground classes (the loss is their mean).
pub fn supervised_loss<B: NetBackend>(logits: &Var<B>, y: &Var<B>) -> Result<(Var<B>, Var<B>)> {
    let ce = logits.cross_entropy(y, None, Reduction::Mean)?;
    let dice = logits.softmax_dice(
        y,
        DiceOptions {
            include_background: false,
            ..DiceOptions::default()
        },
    )?;
    Ok((ce, dice))
}

/// Samples `start .. start + len` of a [N, ...] tensor (rank 5).
pub fn slice_batch<B: NetBackend>(x: &Var<B>, start: usize, len: usize) -> Result<Var<B>> {
    let d = x.shape().dims().to_vec();
    let per_sample: usize = d[1..].iter().product();
    let as_channels = Shape::from([1, d[0], per_sample, 1, 1]);
    let mut out = d.clone();
    out[0] = len;
    x.reshape(&as_channels)?
        .slice_channels(start, len)?
        .reshape(&Shape(out))
}
