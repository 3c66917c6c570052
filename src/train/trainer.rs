//! One training step of each method over a two-stream batch. A method is a step function over
//! the trainer's state (student, optimiser, teacher); the seed methods of later issues add theirs
//! in the same mould.
//!
//! - supervised: 0.5 (CE + Dice) on the labeled patches (`full` is the same step with every case
//!   labeled, the ceiling of the tables).
//! - mean-teacher: the supervised loss plus consistency * ramp(t) * mean (softmax(student) -
//!   softmax(teacher(x + noise)))^2 on the unlabeled patches; after the update the teacher's
//!   parameters follow the student by EMA (min(1 - 1/(t+1), decay)), its batch-norm statistics
//!   follow its own training-mode passes, as in the SSL4MIS code.
//! - mlb-seg: meta-learned weights of the unlabeled patches' initial-label and PLE costs, then a
//!   supervised step on the labeled patches; see [`super::mlb_seg`].
//! - online-pl: Dice on the labeled patches plus beta Dice to a teacher's probabilities on the
//!   unlabeled ones, momentum copies, the teacher following the student; see [`super::online_pl`].
//! - dtml: two networks, segmentation and signed distance, trained together with a mutual term;
//!   see [`super::dtml`].
//! - local-contrastive: the supervised loss plus lambda times the local contrastive loss on
//!   labeled and pseudo-labeled patches, in pseudo-label rounds; see [`super::local_contrastive`].
//! - ideal: dense contrastive pre-training of the encoder, then two decoders supervising each
//!   other; see [`super::ideal`].

use super::config::TrainConfig;
use crate::nn::layers::{updated_stats, BN_MOMENTUM};
use crate::nn::{
    Declarations, Forward, Mode, NetBackend, Network, Outputs, ParamStore, UNet, UNetConfig, VNet,
    VNetConfig,
};
use crate::optim::{
    clip_grad_norm, sigmoid_rampup, teacher_decay, Adam, Optimizer, Rule, Schedule, Sgd,
};
use metaseg_autograd::{
    grad, no_grad, BatchStats, DiceOptions, Distribution, Reduction, Result, Shape, Upsample, Var,
};

/// The network a configuration names.
pub enum Net {
    VNet(Box<VNet>),
    UNet(Box<UNet>),
}

impl Net {
    pub fn new(config: &TrainConfig, in_channels: usize) -> Result<Net> {
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
                // DTML reads its second network through the tanh SDF head.
                sdf_head: config.method == "dtml",
                // The local contrastive loss reads the projection head's embeddings.
                projection: (config.method == "local-contrastive")
                    .then_some(config.local_contrastive.embedding),
                // IDEAL: cross pseudo supervision between two decoders, after dense contrastive
                // pre-training of the encoder through a bottleneck projection.
                second_decoder: config.method == "ideal",
                encoder_projection: (config.method == "ideal-pretrain")
                    .then_some(config.ideal.embedding),
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

/// A mean teacher: parameters and running statistics.
#[derive(Clone)]
pub struct Teacher<B: NetBackend> {
    pub params: ParamStore<B>,
    pub stats: ParamStore<B>,
}

/// Everything a run updates: the student, its optimiser, the teacher if the method has one.
pub struct Trainer<B: NetBackend> {
    pub config: TrainConfig,
    pub net: Net,
    pub params: ParamStore<B>,
    pub stats: ParamStore<B>,
    pub optimizer: Optimizer<B>,
    pub teacher: Option<Teacher<B>>,
    /// A momentum copy of the student, if the method keeps one (online-pl): updated by the method's
    /// step, evaluated and saved as the run's network.
    pub momentum: Option<Teacher<B>>,
    /// DTML's second network (see [`super::dtml`]).
    pub dtml: Option<super::dtml::NetB<B>>,
}

/// A batch on the device: images [N, C, patch], one-hot labels of the first `labeled` [L, K, patch]
/// (of all N for MLB-Seg, whose unlabeled patches carry their initial labels).
pub struct DeviceBatch<B: NetBackend> {
    pub x: Var<B>,
    pub y: Var<B>,
    pub labeled: usize,
}

/// The loss terms of one step, as read back (the total first).
pub type StepLog = Vec<(&'static str, f64)>;

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

impl<B: NetBackend> Trainer<B> {
    pub fn new(backend: &B, config: &TrainConfig, in_channels: usize) -> Result<Self> {
        let net = Net::new(config, in_channels)?;
        let params = net.init_params(backend, config.seed)?;
        let stats = net.init_stats(backend)?;
        let o = &config.optimizer;
        let rule = match o.kind.as_str() {
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
        };
        let copy = || Teacher {
            params: params.clone(),
            stats: stats.clone(),
        };
        let teacher = config.has_teacher().then(copy);
        let momentum = config.has_momentum_copy().then(copy);
        let dtml = super::dtml::NetB::for_config(backend, &net, config, rule)?;
        Ok(Trainer {
            config: config.clone(),
            net,
            params,
            stats,
            optimizer: Optimizer::new(rule),
            teacher,
            momentum,
            dtml,
        })
    }

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

    /// One step of the configured method at iteration `t` (from 0).
    pub fn step(&mut self, batch: &DeviceBatch<B>, t: u64) -> Result<StepLog> {
        if self.config.method == "mlb-seg" {
            return super::mlb_seg::step(self, batch, t);
        }
        if self.config.has_momentum_copy() {
            return super::online_pl::step(self, batch, t);
        }
        if self.config.method == "dtml" {
            return super::dtml::step(self, batch, t);
        }
        if self.config.method == "local-contrastive" {
            return super::local_contrastive::step(self, batch, t);
        }
        if self.config.method == "ideal-pretrain" {
            return super::ideal::pretrain_step(self, batch, t);
        }
        if self.config.method == "ideal" {
            return super::ideal::step(self, batch, t);
        }
        let seed = self.config.seed;
        let mode = Mode::Train {
            seed,
            step: t as u32,
        };
        let out = self.net.run(&self.params, &self.stats, &batch.x, mode)?;
        let labeled = slice_batch(&out.logits, 0, batch.labeled)?;
        let (ce, dice) = supervised_loss(&labeled, &batch.y)?;
        let supervised = ce.add(&dice)?.scale(0.5)?;
        let mut terms = vec![("ce", ce), ("dice", dice)];
        let mut total = supervised;
        if let Some(teacher) = &self.teacher {
            let (consistency, teacher_stats) = self.consistency(teacher, batch, &out.logits, t)?;
            let mt = &self.config.mean_teacher;
            let weight =
                mt.consistency * sigmoid_rampup((t / mt.rampup_unit.max(1)) as f64, mt.rampup);
            total = total.add(&consistency.scale(weight)?)?;
            terms.push(("consistency", consistency));
            self.teacher.as_mut().expect("checked").stats = teacher_stats;
        }
        let lr = self.schedule().lr(self.config.optimizer.lr, t);
        let clip = self.config.optimizer.clip;
        self.descend(&total, &out.batch_stats, clip, lr, t)?;
        terms.insert(0, ("loss", total));
        self.step_log(&terms, lr)
    }

    /// The network that is validated, tested and predicts: the momentum copy if the method keeps
    /// one, else the student (parameters, running statistics).
    pub fn evaluated(&self) -> (&ParamStore<B>, &ParamStore<B>) {
        match &self.momentum {
            Some(m) => (&m.params, &m.stats),
            None => (&self.params, &self.stats),
        }
    }

    /// The running statistics after a training-mode forward pass that measured `batch_stats`.
    pub(crate) fn keep_stats(&mut self, batch_stats: &[(usize, BatchStats<B>)]) -> Result<()> {
        let stats = updated_stats(self.stats.values(), batch_stats, BN_MOMENTUM)?;
        self.stats = self
            .stats
            .with_values(stats.iter().map(|v| v.value().clone()).collect())?;
        Ok(())
    }

    /// One descent step on `total`: its gradient with respect to every parameter, the running
    /// statistics of the forward pass that measured `batch_stats`, then [`Trainer::update`].
    pub(crate) fn descend(
        &mut self,
        total: &Var<B>,
        batch_stats: &[(usize, BatchStats<B>)],
        clip: f64,
        lr: f64,
        t: u64,
    ) -> Result<()> {
        let wrt: Vec<&Var<B>> = self.params.values().iter().collect();
        let grads = grad(total, &wrt, None, false)?;
        self.keep_stats(batch_stats)?;
        self.update(grads, clip, lr, t)
    }

    /// One optimiser update with `grads` clipped to global norm `clip` (0: none) at `lr`, then
    /// the teacher's EMA towards the new student with the decay of iteration `t`.
    pub(crate) fn update(
        &mut self,
        mut grads: Vec<Var<B>>,
        clip: f64,
        lr: f64,
        t: u64,
    ) -> Result<()> {
        if clip > 0.0 {
            grads = clip_grad_norm(&grads, clip)?;
        }
        self.params = self.optimizer.step(&self.params, &grads, lr)?;
        if let Some(teacher) = self.teacher.as_mut() {
            let decay = match self.config.method.as_str() {
                // IDEAL's key encoder: a fixed momentum from the start, as MoCo's.
                "ideal-pretrain" => self.config.ideal.key_momentum,
                _ => teacher_decay(t, self.config.mean_teacher.ema_decay),
            };
            teacher.params = teacher.params.ema(&self.params, decay)?;
        }
        Ok(())
    }

    /// A step's log: the named scalars read back in one transfer (the first is the loss), the
    /// learning rate `lr` second.
    pub(crate) fn step_log(&self, terms: &[(&'static str, Var<B>)], lr: f64) -> Result<StepLog> {
        let backend = self.params.values()[0].backend();
        let scalars: Vec<&B::Tensor> = terms.iter().map(|(_, v)| v.value()).collect();
        let values = backend.to_f64(&backend.concat_flat(&scalars)?)?;
        let mut log: StepLog = terms.iter().map(|(n, _)| *n).zip(values).collect();
        log.insert(1, ("lr", lr));
        Ok(log)
    }

    /// The teacher's logits on `x` plus its input noise clamp(0.1 N(0, 1), -0.2, 0.2), drawn from
    /// a stream of its own per iteration and `salt`, in training mode, and the teacher's new
    /// running statistics.
    pub(crate) fn teacher_logits(
        &self,
        teacher: &Teacher<B>,
        x: &Var<B>,
        salt: u64,
        t: u64,
    ) -> Result<(Var<B>, ParamStore<B>)> {
        let stream = self.config.seed ^ 0x7eac_4e00 ^ salt;
        let noise = Var::random(
            x.backend(),
            x.shape(),
            Distribution::Normal,
            stream,
            t << 32,
        )?
        .scale(0.1)?
        .clamp(-0.2, 0.2)?;
        let (logits, stats) = no_grad(|| -> Result<_> {
            let mode = Mode::Train {
                seed: stream,
                step: t as u32,
            };
            let out = self
                .net
                .run(&teacher.params, &teacher.stats, &x.add(&noise)?, mode)?;
            let stats = updated_stats(teacher.stats.values(), &out.batch_stats, BN_MOMENTUM)?;
            Ok((out.logits, stats))
        })?;
        let stats = teacher
            .stats
            .with_values(stats.iter().map(|v| v.value().clone()).collect())?;
        Ok((logits.detach(), stats))
    }

    /// The mean-teacher consistency on the unlabeled patches, and the teacher's new statistics.
    fn consistency(
        &self,
        teacher: &Teacher<B>,
        batch: &DeviceBatch<B>,
        student: &Var<B>,
        t: u64,
    ) -> Result<(Var<B>, ParamStore<B>)> {
        let n = batch.x.shape().dims()[0];
        let unlabeled = n - batch.labeled;
        let x_u = slice_batch(&batch.x, batch.labeled, unlabeled)?;
        let (logits_t, stats) = self.teacher_logits(teacher, &x_u, 0, t)?;
        let student_u = slice_batch(student, batch.labeled, unlabeled)?;
        let consistency = student_u.softmax_mse(&logits_t)?;
        Ok((consistency, stats))
    }
}
