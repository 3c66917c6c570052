//! DTML: dual-task mutual learning (Zhang et al., PRCV 2021; METHODS.md, section 3).
//!
//! Two V-Nets of the configured architecture, each with a segmentation head and a tanh SDF head,
//! trained together on the whole batch (labeled and unlabeled patches). Net A is the trainer's
//! student, read through its segmentation head (validation, prediction and `metaseg predict` use
//! it); net B ([`Dtml::net_b`], initialised from a seed of its own) is read through its SDF head.
//!
//! - Net A: 0.5 (CE + Dice) on the labeled patches, the supervised method's losses (softmax CE and
//!   softmax-Dice over the foreground classes: the project's 2-class form of the paper's BCE + Dice
//!   on one sigmoid channel).
//! - Net B: Dice(sigmoid(-k sdf_B), y) on the labeled patches (squared denominator, s = 1e-5, over
//!   the batch, as the DTC code's dice_loss), plus |sdf_B - sdf_gt| averaged when `dtml.l1_sdf` (the
//!   paper; the released code computes it without adding it; logged either way). sdf_gt is the
//!   normalised SDF of METHODS.md of each labeled patch's mask, in voxel units (the released code
//!   computes it on the cropped patch with scipy's EDT, no spacing), by the distance kernels.
//! - Mutual term on every patch, added to both losses (one backward pass reaches both networks):
//!   mean (sigmoid(-k sdf_B) - p_A)^2, p_A the softmax probability of the foreground, weighted
//!   by consistency * exp(-5 (1 - min(t', T) / T)^2) with t' = iteration // rampup_unit.
//!
//! With more than two classes each foreground class c is one-vs-rest: SDF channel c against the
//! mask of class c and softmax probability c; the SDF head's channel 0 is unused.
//!
//! Each network has its own SGD (or Adam) state; both take the same learning rate and clipping.
//! Checkpoints add net B's parameters, statistics and optimiser under `dtml/`.

use super::{Method, MethodKind, Setup, Stage, Streams, Training};
use crate::nn::NetBackend;
use crate::optim::Rampup;
use crate::train::checkpoint::Parts;
use crate::train::config::{ConfigError, TrainConfig};
use crate::train::network::{optimizer_rule, Guarded, Heads, Learner, Weights};
use crate::train::run;
use crate::train::trainer::{slice_batch, step_log, Context, DeviceBatch, StepLog};
use metaseg_autograd::{grad, DiceOptions, Error, Reduction, Result, Var};
use serde::{Deserialize, Serialize};

/// Salt of net B's initialisation and dropout streams, apart from net A's.
const NET_B_SALT: u64 = 0xd7_0b00;

/// The `[dtml]` keys. `l1_sdf` is on by default, as the paper trains (METHODS.md: gaps are filled
/// from the paper, the released code's behaviour is a flag); `--set dtml.l1_sdf=false` runs as the
/// released code does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DtmlConfig {
    /// Add the L1 loss |sdf_B - sdf_gt| to net B's loss (the paper adds it; the released code
    /// computes it and does not).
    pub l1_sdf: bool,
    /// Learning rate of both networks in place of `optimizer.lr` (the schedule still applies).
    /// The tanh SDF head behind sigmoid(-1500 sdf) has gradients about 375 times the Dice's, so
    /// a rate tuned for one-head methods can saturate it in the first steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// k of the SDF-to-probability map sigmoid(-k sdf).
    pub sdf_scale: f64,
    /// Weight of the mutual term at the end of the ramp-up (1 in the paper).
    pub consistency: f64,
    /// Ramp-up length T in units of `rampup_unit` iterations (40 x 150 in the paper).
    pub rampup: f64,
    pub rampup_unit: u64,
}

/// The paper's recipe (METHODS.md, section 3).
impl Default for DtmlConfig {
    fn default() -> Self {
        DtmlConfig {
            l1_sdf: true,
            lr: None,
            sdf_scale: 1500.0,
            consistency: 1.0,
            rampup: 40.0,
            rampup_unit: 150,
        }
    }
}

impl DtmlConfig {
    /// What the types cannot check; every message names its key.
    pub fn check(&self, config: &TrainConfig) -> std::result::Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.into()));
        if config.network.kind != "vnet" {
            return bad("dtml needs network.kind = \"vnet\" (the U-Net has no SDF head)");
        }
        if config.data.classes < 2 {
            return bad("dtml needs data.classes >= 2 (background and a foreground)");
        }
        if !self.sdf_scale.is_finite() || self.sdf_scale <= 0.0 {
            return bad("dtml.sdf_scale must be positive (1500 in the paper)");
        }
        if !self.consistency.is_finite() || self.consistency < 0.0 {
            return bad("dtml.consistency must be >= 0");
        }
        if self.lr.is_some_and(|lr| !lr.is_finite() || lr <= 0.0) {
            return bad("dtml.lr must be positive (omit it to use optimizer.lr)");
        }
        if !self.rampup.is_finite() || self.rampup < 0.0 {
            return bad("dtml.rampup must be >= 0 (0: no ramp-up)");
        }
        if self.rampup_unit == 0 {
            return bad("dtml.rampup_unit must be at least 1 iteration");
        }
        Ok(())
    }

    /// The mutual term's weight over the run.
    pub fn mutual_weight(&self) -> Rampup {
        Rampup {
            weight: self.consistency,
            length: self.rampup,
            unit: self.rampup_unit,
        }
    }
}

/// DTML's kind: two networks with SDF heads over the whole batch.
pub struct Kind;

impl MethodKind for Kind {
    fn streams(&self, _: Stage) -> Streams {
        Streams {
            unlabeled: true,
            unlabeled_labels: false,
        }
    }

    fn heads(&self, _: &TrainConfig, _: Stage) -> Heads {
        Heads {
            sdf: true,
            ..Heads::default()
        }
    }

    fn check(&self, config: &TrainConfig) -> std::result::Result<(), ConfigError> {
        config.dtml.check(config)
    }

    /// Net B initialised from a seed of its own, with net A's optimiser rule.
    fn build<B: NetBackend>(&self, setup: &Setup<'_, B>) -> Result<Box<dyn Training<B>>> {
        let seed = setup.config.seed ^ NET_B_SALT;
        let weights = Weights::init(setup.backend, setup.net, seed)?;
        Ok(Box::new(Dtml {
            net_b: Learner::new(weights, optimizer_rule(setup.config)),
        }))
    }
}

/// DTML's second network, read through its SDF head (its architecture is the student's).
pub struct Dtml<B: NetBackend> {
    pub net_b: Learner<B>,
}

/// The loss terms of one step, before weighting.
pub struct Terms<B: NetBackend> {
    pub ce: Var<B>,
    pub dice: Var<B>,
    pub sdf_dice: Var<B>,
    pub sdf_l1: Var<B>,
    pub mutual: Var<B>,
}

/// The normalised SDF (METHODS.md) of every channel of masks [N, C, D, H, W], each channel on its
/// own, in voxel units.
pub fn signed_distance<B: NetBackend>(masks: &Var<B>) -> Result<Var<B>> {
    let d = masks.shape().dims().to_vec();
    let one_channel = metaseg_autograd::Shape::from([d[0] * d[1], 1, d[2], d[3], d[4]]);
    masks
        .reshape(&one_channel)?
        .sdf([1.0; 3])?
        .reshape(masks.shape())
}

/// |x| as relu(x) + relu(-x): differentiable, with gradient 0 at 0.
fn absolute<B: NetBackend>(x: &Var<B>) -> Result<Var<B>> {
    x.relu()?.add(&x.neg()?.relu()?)
}

/// The terms of net A's segmentation logits and net B's SDF head [N, K, patch] on `batch`.
pub fn terms<B: NetBackend>(
    config: &TrainConfig,
    batch: &DeviceBatch<B>,
    seg_a: &Var<B>,
    sdf_b: &Var<B>,
) -> Result<Terms<B>> {
    let (labeled, k) = (batch.labeled, config.dtml.sdf_scale);
    let foreground = config.data.classes - 1;
    let seg_labeled = slice_batch(seg_a, 0, labeled)?;
    let ce = seg_labeled.cross_entropy(&batch.y, None, Reduction::Mean)?;
    let dice = seg_labeled.softmax_dice(
        &batch.y,
        DiceOptions {
            include_background: false,
            ..DiceOptions::default()
        },
    )?;
    let sdf = sdf_b.slice_channels(1, foreground)?;
    let sdf_labeled = slice_batch(&sdf, 0, labeled)?;
    let y = batch.y.slice_channels(1, foreground)?;
    // Dice(sigmoid(-k sdf), y): sigmoid-Dice of the logits -k sdf.
    let sdf_dice = sdf_labeled
        .scale(-k)?
        .sigmoid_dice(&y, DiceOptions::default())?;
    let sdf_l1 = absolute(&sdf_labeled.sub(&signed_distance(&y)?)?)?.mean()?;
    let p_a = seg_a.softmax_channels()?.slice_channels(1, foreground)?;
    let mutual = sdf.sdf_probability(k)?.sub(&p_a)?.square()?.mean()?;
    Ok(Terms {
        ce,
        dice,
        sdf_dice,
        sdf_l1,
        mutual,
    })
}

impl<B: NetBackend> Terms<B> {
    /// Net A's loss + net B's loss + weight * mutual.
    pub fn total(&self, config: &DtmlConfig, weight: f64) -> Result<Var<B>> {
        let net_a = self.ce.add(&self.dice)?.scale(0.5)?;
        let mut net_b = self.sdf_dice.clone();
        if config.l1_sdf {
            net_b = net_b.add(&self.sdf_l1)?;
        }
        net_a.add(&net_b)?.add(&self.mutual.scale(weight)?)
    }
}

fn no_sdf_head() -> Error {
    Error::InvalidArgument {
        op: Method::Dtml.name(),
        message: "net B has no SDF head: it was not made for dtml".into(),
    }
}

impl<B: NetBackend> Training<B> for Dtml<B> {
    /// One DTML iteration at `t`: both networks' training passes over the whole batch, one
    /// backward pass of the total, an update of each network with its own optimiser.
    fn step(
        &mut self,
        cx: &Context<'_>,
        student: &mut Learner<B>,
        batch: &DeviceBatch<B>,
        t: u64,
    ) -> Result<StepLog> {
        let config = cx.config;
        let net_b = &mut self.net_b;
        let a = student.weights.run(cx.net, &batch.x, cx.train_mode(t))?;
        let b = (net_b.weights).run(cx.net, &batch.x, cx.mode(config.seed ^ NET_B_SALT, t))?;
        let sdf_b = b.sdf.as_ref().ok_or_else(no_sdf_head)?;
        let terms = terms(config, batch, &a.logits, sdf_b)?;
        let weight = config.dtml.mutual_weight().at(t);
        let total = terms.total(&config.dtml, weight)?;
        let wrt: Vec<&Var<B>> = (student.weights.params.values().iter())
            .chain(net_b.weights.params.values())
            .collect();
        let mut grads_a = grad(&total, &wrt, None, false)?;
        let grads_b = grads_a.split_off(student.weights.params.len());
        let clip = config.optimizer.clip;
        let lr = cx
            .schedule()
            .lr(config.dtml.lr.unwrap_or(config.optimizer.lr), t);
        student.weights.keep_stats(&a.batch_stats)?;
        student.update(grads_a, clip, lr)?;
        net_b.weights.keep_stats(&b.batch_stats)?;
        net_b.update(grads_b, clip, lr)?;
        let named = [
            ("loss", total),
            ("ce", terms.ce),
            ("dice", terms.dice),
            ("sdf_dice", terms.sdf_dice),
            ("sdf_l1", terms.sdf_l1),
            ("mutual", terms.mutual),
        ];
        let mut log = step_log(&named, lr)?;
        log.push(("mutual_weight", weight));
        Ok(log)
    }

    fn save(&self, parts: &mut Parts) -> run::Result<()> {
        parts.put_learner(Method::Dtml.name(), &self.net_b)
    }

    fn networks(&mut self) -> Vec<(&'static str, Guarded<'_, B>)> {
        vec![(Method::Dtml.name(), Guarded::Learner(&mut self.net_b))]
    }

    fn load(&mut self, backend: &B, parts: &Parts) -> run::Result<()> {
        parts.learner(Method::Dtml.name(), &mut self.net_b, backend)
    }
}
