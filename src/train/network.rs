//! The network a run trains and the one piece every method repeats: a network's weights
//! (parameters and running statistics) with the batch-norm statistics update and the EMA towards
//! another network, and a [`Learner`], weights with an optimiser, with its descent step. A
//! student, a mean teacher, a momentum copy and DTML's second network are all built from these.

use super::config::TrainConfig;
use crate::nn::layers::{updated_stats, BN_MOMENTUM};
use crate::nn::{
    Declarations, Forward, Mode, NetBackend, Network, Outputs, ParamStore, UNet, UNetConfig, VNet,
    VNetConfig,
};
use crate::optim::{clip_factor, Adam, Optimizer, Rule, Sgd};
use metaseg_autograd::{grad, no_grad, BatchStats, Result, Upsample, Var};

/// The heads and extra parts a method asks of the V-Net beyond segmentation (all off: the plain
/// network).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Heads {
    /// A tanh signed-distance head (DTML).
    pub sdf: bool,
    /// A projection head of this many channels on the last decoder features (local contrastive).
    pub projection: Option<usize>,
    /// A second decoder and head on the shared encoder (IDEAL's fine-tuning).
    pub second_decoder: bool,
    /// A projection of this many channels of the bottleneck (IDEAL's pre-training).
    pub encoder_projection: Option<usize>,
}

/// The network a configuration names.
pub enum Net {
    VNet(Box<VNet>),
    UNet(Box<UNet>),
}

impl Net {
    /// The configuration's network with the method's `heads` (the U-Net has none).
    pub fn new(config: &TrainConfig, heads: Heads, in_channels: usize) -> Result<Net> {
        let n = &config.network;
        let dropout = (n.dropout > 0.0).then_some(n.dropout);
        Ok(match n.kind.as_str() {
            "unet" => Net::UNet(Box::new(UNet::new(UNetConfig {
                in_channels,
                classes: config.data.classes,
                features: (0..n.levels).map(|l| n.base_width << l).collect(),
                three_d: config.batch.patch[0] > 1,
                upsample: Upsample::Trilinear,
                dropout,
            })?)),
            _ => Net::VNet(Box::new(VNet::new(VNetConfig {
                in_channels,
                classes: config.data.classes,
                base_width: n.base_width,
                levels: n.levels,
                dropout,
                sdf_head: heads.sdf,
                projection: heads.projection,
                second_decoder: heads.second_decoder,
                encoder_projection: heads.encoder_projection,
                two_d: config.batch.patch[0] == 1,
            })?)),
        })
    }
}

impl Network for Net {
    fn params(&self) -> &Declarations {
        match self {
            Net::VNet(n) => n.params(),
            Net::UNet(n) => n.params(),
        }
    }
    fn stats(&self) -> &Declarations {
        match self {
            Net::VNet(n) => n.stats(),
            Net::UNet(n) => n.stats(),
        }
    }
    fn forward<B: NetBackend>(&self, f: &Forward<B>, x: &Var<B>) -> Result<Outputs<B>> {
        match self {
            Net::VNet(n) => n.forward(f, x),
            Net::UNet(n) => n.forward(f, x),
        }
    }
}

/// A network's tensors: its parameters and its batch-norm running statistics.
#[derive(Clone)]
pub struct Weights<B: NetBackend> {
    pub params: ParamStore<B>,
    pub stats: ParamStore<B>,
}

impl<B: NetBackend> Weights<B> {
    /// `net`'s initial weights: parameters drawn from `seed`, statistics at mean 0, variance 1.
    pub fn init(backend: &B, net: &Net, seed: u64) -> Result<Self> {
        Ok(Weights {
            params: net.init_params(backend, seed)?,
            stats: net.init_stats(backend)?,
        })
    }

    /// `net`'s forward pass over `x` with these weights.
    pub fn run(&self, net: &Net, x: &Var<B>, mode: Mode) -> Result<Outputs<B>> {
        net.run(&self.params, &self.stats, x, mode)
    }

    /// The running statistics moved by the batch statistics a training-mode pass measured
    /// (PyTorch's momentum update), as constants.
    pub fn keep_stats(&mut self, batch_stats: &[(usize, BatchStats<B>)]) -> Result<()> {
        let stats = updated_stats(self.stats.values(), batch_stats, BN_MOMENTUM)?;
        self.stats = self
            .stats
            .with_values(stats.iter().map(|v| v.value().clone()).collect())?;
        Ok(())
    }

    /// The parameters moved towards `other`'s by EMA: decay * self + (1 - decay) * other (a mean
    /// teacher, whose statistics follow its own passes).
    pub fn follow_params(&mut self, other: &Weights<B>, decay: f64) -> Result<()> {
        self.params = self.params.ema(&other.params, decay)?;
        Ok(())
    }

    /// Parameters and running statistics both moved towards `other`'s by EMA (a momentum copy).
    pub fn follow(&mut self, other: &Weights<B>, decay: f64) -> Result<()> {
        self.follow_params(other, decay)?;
        self.stats = self.stats.ema(&other.stats, decay)?;
        Ok(())
    }
}

/// A network that learns: its weights and its optimiser.
pub struct Learner<B: NetBackend> {
    pub weights: Weights<B>,
    pub optimizer: Optimizer<B>,
    /// The squared global norm of the gradients of each update since the guard after a step last
    /// took them (scalars on the device; see `run::guard`).
    pub grad_norms: Vec<Var<B>>,
}

/// A network a method keeps beside the student, as the guard after every step checks it: one
/// that learns (its gradients' norms and its weights) or one that follows (its weights).
pub enum Guarded<'a, B: NetBackend> {
    Learner(&'a mut Learner<B>),
    Weights(&'a Weights<B>),
}

impl<B: NetBackend> Learner<B> {
    pub fn new(weights: Weights<B>, rule: Rule) -> Self {
        Learner {
            weights,
            optimizer: Optimizer::new(rule),
            grad_norms: Vec::new(),
        }
    }

    /// One descent step on `total`: its gradient with respect to every parameter, the running
    /// statistics of the training pass that measured `batch_stats`, then [`Learner::update`].
    pub fn descend(
        &mut self,
        total: &Var<B>,
        batch_stats: &[(usize, BatchStats<B>)],
        clip: f64,
        lr: f64,
    ) -> Result<()> {
        let wrt: Vec<&Var<B>> = self.weights.params.values().iter().collect();
        let grads = grad(total, &wrt, None, false)?;
        self.weights.keep_stats(batch_stats)?;
        self.update(grads, clip, lr)
    }

    /// One optimiser update with `grads` (in parameter order) clipped to global norm `clip` (0:
    /// none), at learning rate `lr`. Every method's gradients reach its networks here. The
    /// gradients' squared norm, computed once in flat form for clipping and the guard, stays on
    /// the device in `grad_norms`.
    pub fn update(&mut self, grads: Vec<Var<B>>, clip: f64, lr: f64) -> Result<()> {
        if grads.len() != self.weights.params.len() || grads.is_empty() {
            return Err(metaseg_autograd::Error::InvalidArgument {
                op: "optimizer",
                message: format!(
                    "{} gradients for {} parameters",
                    grads.len(),
                    self.weights.params.len()
                ),
            });
        }
        let backend = grads[0].backend().clone();
        let parts: Vec<&B::Tensor> = grads.iter().map(Var::value).collect();
        let mut g = Var::constant(&backend, backend.concat_flat(&parts)?);
        let squares = no_grad(|| g.square()?.sum())?;
        if clip > 0.0 {
            g = no_grad(|| g.mul(&clip_factor(&squares, clip)?))?;
        }
        self.grad_norms.push(squares);
        self.weights.params = self.optimizer.step_flat(&self.weights.params, &g, lr)?;
        Ok(())
    }
}

/// The update rule of the configuration's `[optimizer]`.
pub fn optimizer_rule(config: &TrainConfig) -> Rule {
    let o = &config.optimizer;
    match o.kind.as_str() {
        "adam" => Rule::Adam(Adam {
            lr: o.lr,
            weight_decay: o.weight_decay,
            ..Adam::default()
        }),
        _ => Rule::Sgd(Sgd {
            lr: o.lr,
            momentum: o.momentum,
            weight_decay: o.weight_decay,
        }),
    }
}
