//! IDEAL (Basak et al., ICASSP 2023; METHODS.md, section 4): dense contrastive pre-training of the
//! encoder, then fine-tuning with two decoders that supervise each other.
//!
//! - Pre-training (`ideal-pretrain`, a run of its own in RUN_DIR/pretrain for
//!   `ideal.pretrain_iterations`, on every training patch, labels unused): the query encoder is
//!   the V-Net's encoder with a 1x1 conv projection of the bottleneck (`embedding` channels); the
//!   key encoder is its momentum copy (the trainer's teacher, EMA with `key_momentum` after every
//!   update, MoCo's initialisation as a copy). View 1 is the batch; view 2 is the batch flipped
//!   along a random non-empty set of axes (one draw per step) plus Gaussian noise of std `noise`.
//!   The keys of view 2 are flipped back at the bottleneck's resolution, so location i of the
//!   queries and of the keys is the same anatomical location (the k2 s2 down-sampling maps the
//!   blocks of a flipped patch onto the flipped blocks), and the loss is dense InfoNCE at
//!   temperature `tau`: each query location against every key location of the batch. The query
//!   encoder's tensors are written to RUN_DIR/pretrain/encoder.safetensors (+ .json), loadable on
//!   their own through `ideal.encoder`.
//! - Fine-tuning (`ideal`, in RUN_DIR): the V-Net with a second decoder and head on the shared
//!   encoder, which starts from the pre-trained encoder (its decoders fresh). Each step:
//!   0.5 (CE + Dice) of each decoder on the labeled patches plus weight(t) times cross pseudo
//!   supervision on every patch, CE(logits_A, onehot(argmax logits_B)) + CE(logits_B,
//!   onehot(argmax logits_A)), the hard labels taken without gradient; weight(t) = `cps` *
//!   exp(-5 (1 - min(t', T) / T)^2), t' = t // `rampup_unit`, T = `rampup`. Validation, test
//!   figures and `metaseg predict` read decoder A.

use super::{FirstStage, Method, MethodKind, Setup, Stage, Streams, Training};
use crate::nn::{Forward, NetBackend, ParamStore};
use crate::optim::Rampup;
use crate::train::checkpoint::{self, HostTensor, Parts, Sidecar, FORMAT};
use crate::train::config::{ConfigError, TrainConfig};
use crate::train::network::{Guarded, Heads, Learner, Net, Weights};
use crate::train::run::{self, RunContext, RunData, RunError, RunPaths};
use crate::train::trainer::{
    slice_batch, step_log, supervised_loss, Context, DeviceBatch, StepLog, Trainer,
};
use metaseg_autograd::{
    no_grad, random, Distribution, Error, Interp, Reduction, Result, Shape, UnaryOp, Var, Warp,
    Window3d,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Salt of the key encoder's dropout and batch streams and of view 2's flips and noise.
const KEY_SALT: u64 = 0x1dea_1000;

/// The `[ideal]` keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdealConfig {
    /// Pre-training iterations (a run in RUN_DIR/pretrain); ignored when `encoder` is given.
    pub pretrain_iterations: u64,
    /// Channels of the bottleneck projection's dense embeddings (ours).
    pub embedding: usize,
    /// Temperature of dense InfoNCE ("a parameter" in the paper; ours 0.1).
    pub tau: f64,
    /// Momentum of the key encoder (ours; MoCo's 0.999 suits far longer runs).
    pub key_momentum: f64,
    /// Std of the Gaussian noise added to view 2.
    pub noise: f64,
    /// Weight of cross pseudo supervision at the end of the ramp-up (0.1).
    pub cps: f64,
    /// Ramp-up length T in units of `rampup_unit` iterations.
    pub rampup: f64,
    pub rampup_unit: u64,
    /// A pre-trained encoder (the stem or the .safetensors file of one written by pre-training)
    /// to fine-tune from instead of pre-training; empty: pre-train.
    #[serde(default)]
    pub encoder: String,
}

impl Default for IdealConfig {
    fn default() -> Self {
        IdealConfig {
            pretrain_iterations: 3000,
            embedding: 64,
            tau: 0.1,
            key_momentum: 0.99,
            noise: 0.1,
            cps: 0.1,
            rampup: 40.0,
            rampup_unit: 150,
            encoder: String::new(),
        }
    }
}

impl IdealConfig {
    /// What the types cannot check; every message names its key.
    pub fn check(&self, config: &TrainConfig) -> std::result::Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if config.network.kind != "vnet" {
            return bad(
                "ideal needs network.kind = \"vnet\" (the second decoder and the encoder \
                 projection are the V-Net's)"
                    .into(),
            );
        }
        if self.pretrain_iterations == 0 && self.encoder.is_empty() {
            return bad(
                "ideal.pretrain_iterations must be at least 1 (or name ideal.encoder)".into(),
            );
        }
        if self.embedding == 0 {
            return bad("ideal.embedding must be at least 1".into());
        }
        if !(self.tau.is_finite() && self.tau > 0.0) {
            return bad(format!("ideal.tau {} must be > 0", self.tau));
        }
        if !(0.0..=1.0).contains(&self.key_momentum) {
            return bad(format!(
                "ideal.key_momentum {} must be in [0, 1]",
                self.key_momentum
            ));
        }
        if !(self.noise.is_finite() && self.noise >= 0.0) {
            return bad(format!("ideal.noise {} must be >= 0", self.noise));
        }
        if !(self.cps.is_finite() && self.cps >= 0.0) {
            return bad(format!("ideal.cps {} must be >= 0", self.cps));
        }
        if !(self.rampup.is_finite() && self.rampup >= 0.0) || self.rampup_unit == 0 {
            return bad("ideal.rampup must be >= 0 and ideal.rampup_unit at least 1".into());
        }
        Ok(())
    }

    /// The weight of cross pseudo supervision over the run.
    pub fn cps_weight(&self) -> Rampup {
        Rampup {
            weight: self.cps,
            length: self.rampup,
            unit: self.rampup_unit,
        }
    }
}

/// Pre-training, IDEAL's first stage (unless `ideal.encoder` names an encoder): every training
/// patch, the query encoder and its momentum key encoder, in RUN_DIR/pretrain.
pub fn pretraining(config: &TrainConfig) -> Option<FirstStage> {
    config.ideal.encoder.is_empty().then(|| FirstStage {
        dir: "pretrain",
        config: TrainConfig {
            iterations: config.ideal.pretrain_iterations,
            ..config.clone()
        },
        stage: Stage::First,
        title: "pre-training: dense contrastive",
        iterations_key: "ideal.pretrain_iterations",
        all_cases: true,
    })
}

/// The stem of the pre-trained encoder's files (`.safetensors` and `.json`) of a run.
pub fn encoder_stem(paths: &RunPaths) -> PathBuf {
    paths.sub("pretrain").dir.join("encoder")
}

/// Whether a tensor belongs to the encoder (the part pre-training trains and fine-tuning shares).
pub fn is_encoder(name: &str) -> bool {
    name.starts_with("encoder.") || name.starts_with("down.")
}

/// Writes the query encoder's parameters and statistics (`params/NAME`, `stats/NAME`) to
/// `stem`.safetensors with a JSON sidecar (its pre-training step, seed and configuration).
pub fn save_encoder<B: NetBackend>(network: &Trainer<B>, stem: &Path) -> run::Result<()> {
    let mut parts = Parts::default();
    parts.put_weights("", &network.student.weights)?;
    let mut tensors = parts.tensors;
    tensors.retain(|name, _| name.split_once('/').is_some_and(|(_, n)| is_encoder(n)));
    let sidecar = Sidecar {
        format: FORMAT,
        step: network.student.optimizer.steps,
        seed: network.config.seed,
        config: serde_json::to_value(&network.config).expect("a configuration serialises"),
        stage: network.stage,
        counters: BTreeMap::new(),
    };
    Ok(checkpoint::save(stem, &tensors, &sidecar)?)
}

/// `weights` with their encoder tensors read from the encoder file at `stem` (the decoders' as
/// they were).
pub fn load_encoder<B: NetBackend>(
    backend: &B,
    weights: &mut Weights<B>,
    stem: &Path,
) -> run::Result<()> {
    let (tensors, _) = checkpoint::load(stem)?;
    weights.params = with_encoder(backend, &weights.params, "params", &tensors, stem)?;
    weights.stats = with_encoder(backend, &weights.stats, "stats", &tensors, stem)?;
    Ok(())
}

/// `store` with its encoder tensors replaced by the file's `prefix/NAME` ones; every encoder
/// tensor must be there with its shape.
fn with_encoder<B: NetBackend>(
    backend: &B,
    store: &ParamStore<B>,
    prefix: &str,
    tensors: &BTreeMap<String, HostTensor>,
    stem: &Path,
) -> run::Result<ParamStore<B>> {
    let mut values = Vec::with_capacity(store.len());
    for (spec, own) in store.specs().iter().zip(store.values()) {
        if !is_encoder(&spec.name) {
            values.push(own.value().clone());
            continue;
        }
        let name = format!("{prefix}/{}", spec.name);
        let t = tensors
            .get(&name)
            .filter(|t| t.shape == spec.shape.dims())
            .ok_or_else(|| {
                RunError::Resume(format!(
                    "{}.safetensors has no tensor {name} of shape {}: it is not an encoder of \
                     this network (network.base_width, levels and the image channels must match)",
                    stem.display(),
                    spec.shape
                ))
            })?;
        let data: Vec<f64> = t.data.iter().map(|&x| f64::from(x)).collect();
        values.push(backend.tensor(&data, &spec.shape)?);
    }
    Ok(store.with_values(values)?)
}

fn not_a_vnet() -> Error {
    Error::InvalidArgument {
        op: Method::Ideal.name(),
        message: "ideal runs on a V-Net".into(),
    }
}

/// The axes view 2 of step `t` is flipped along: a random non-empty subset of those longer than
/// one voxel.
pub fn view_flips(seed: u64, t: u64, patch: [usize; 3]) -> Vec<usize> {
    let bits = random::random_bits(seed ^ KEY_SALT, t);
    let axes: Vec<usize> = (0..3).filter(|&a| patch[a] > 1).collect();
    let chosen: Vec<usize> = axes
        .iter()
        .copied()
        .filter(|&a| bits >> a & 1 == 1)
        .collect();
    match (chosen.is_empty(), axes.last()) {
        (true, Some(&last)) => vec![last],
        _ => chosen,
    }
}

/// The flips along `axes` of a grid of `size`, sampled exactly (nearest: the map is onto voxel
/// centres). A flip is its own inverse.
pub fn flips(size: [usize; 3], axes: &[usize]) -> Warp {
    axes.iter()
        .fold(Warp::identity(size), |w, &a| Warp::flip(size, a).then(&w))
        .with_interp(Interp::Nearest)
}

/// One-hot of the argmax over the channels of logits [N, C, ...], without gradient (a voxel
/// whose largest logit is shared by two classes is one-hot in both; with f32 logits this is rare).
pub fn hard_labels<B: NetBackend>(logits: &Var<B>) -> Result<Var<B>> {
    no_grad(|| {
        let d = logits.shape().dims().to_vec();
        let (n, c) = (d[0], d[1]);
        let s: usize = d[2..].iter().product();
        let b = logits.backend();
        let volume = b.reshape(logits.value(), &Shape::from([n, 1, c, s, 1]))?;
        let window = Window3d {
            kernel: [c, 1, 1],
            stride: [c, 1, 1],
        };
        let max = b.max_pool3d(&volume, window)?;
        let mut one = d.clone();
        one[1] = 1;
        let max = Var::constant(b, b.reshape(&max, &Shape(one))?);
        // 1 where max - x <= 0, i.e. x is the maximum.
        let is_max = max
            .sub(logits)?
            .unary(UnaryOp::ReluMask)?
            .neg()?
            .add_scalar(1.0)?;
        Ok(is_max.detach())
    })
}

/// IDEAL's kind: every patch in both stages; the encoder projection in pre-training, the second
/// decoder in fine-tuning.
pub struct Kind;

impl MethodKind for Kind {
    fn streams(&self, _: Stage) -> Streams {
        Streams {
            unlabeled: true,
            unlabeled_labels: false,
        }
    }

    fn heads(&self, config: &TrainConfig, stage: Stage) -> Heads {
        match stage {
            Stage::First => Heads {
                encoder_projection: Some(config.ideal.embedding),
                ..Heads::default()
            },
            Stage::Main => Heads {
                second_decoder: true,
                ..Heads::default()
            },
        }
    }

    fn check(&self, config: &TrainConfig) -> std::result::Result<(), ConfigError> {
        config.ideal.check(config)
    }

    fn needs_unlabeled_cases(&self) -> bool {
        true
    }

    fn first_stage(&self, config: &TrainConfig) -> Option<FirstStage> {
        pretraining(config)
    }

    fn build<B: NetBackend>(&self, setup: &Setup<'_, B>) -> Result<Box<dyn Training<B>>> {
        Ok(match setup.stage {
            Stage::First => Box::new(Pretraining {
                key_encoder: setup.student.clone(),
            }),
            Stage::Main => Box::new(FineTuning),
        })
    }
}

/// Pre-training's state: the key encoder, which starts as a copy of the query encoder (MoCo's
/// initialisation) and is checkpointed as `teacher/`.
pub struct Pretraining<B: NetBackend> {
    pub key_encoder: Weights<B>,
}

impl<B: NetBackend> Training<B> for Pretraining<B> {
    /// One pre-training step at `t` (see the top).
    fn step(
        &mut self,
        cx: &Context<'_>,
        student: &mut Learner<B>,
        batch: &DeviceBatch<B>,
        t: u64,
    ) -> Result<StepLog> {
        let config = cx.config;
        let Net::VNet(vnet) = cx.net else {
            return Err(not_a_vnet());
        };
        let axes = view_flips(config.seed, t, config.batch.patch);
        let x = &batch.x;
        let noise = Var::random(
            x.backend(),
            x.shape(),
            Distribution::Normal,
            config.seed ^ KEY_SALT,
            (t << 32) | 1,
        )?
        .scale(config.ideal.noise)?;
        let view2 = x.warp(&flips(config.batch.patch, &axes))?.add(&noise)?;
        let query = &student.weights;
        let f = Forward::new(
            query.params.values(),
            query.stats.values(),
            cx.train_mode(t),
        );
        let (queries, query_stats) = vnet.dense_embedding(&f, x)?;
        let key = &mut self.key_encoder;
        let keys = no_grad(|| -> Result<_> {
            let mode = cx.mode(config.seed ^ KEY_SALT, t);
            let f = Forward::new(key.params.values(), key.stats.values(), mode);
            let (keys, batch_stats) = vnet.dense_embedding(&f, &view2)?;
            let grid: [usize; 3] = keys.shape().dims()[2..].try_into().expect("rank 5");
            key.keep_stats(&batch_stats)?;
            Ok(keys.warp(&flips(grid, &axes))?.detach())
        })?;
        let infonce = queries.dense_infonce(&keys, config.ideal.tau)?;
        let lr = cx.lr(t);
        student.descend(&infonce, &query_stats, config.optimizer.clip, lr)?;
        // A fixed momentum from the start, as MoCo's; the statistics follow the key's own pass.
        (self.key_encoder).follow_params(&student.weights, config.ideal.key_momentum)?;
        step_log(&[("loss", infonce)], lr)
    }

    /// Pre-training trains no decoder: nothing to validate.
    fn validates(&self) -> bool {
        false
    }

    fn save(&self, parts: &mut Parts) -> run::Result<()> {
        parts.put_weights("teacher", &self.key_encoder)
    }

    fn networks(&mut self) -> Vec<(&'static str, Guarded<'_, B>)> {
        vec![("teacher", Guarded::Weights(&self.key_encoder))]
    }

    fn load(&mut self, backend: &B, parts: &Parts) -> run::Result<()> {
        self.key_encoder = parts.weights("teacher", &self.key_encoder, backend)?;
        Ok(())
    }
}

/// Fine-tuning keeps nothing beside the student (its second decoder is part of the network).
pub struct FineTuning;

impl<B: NetBackend> Training<B> for FineTuning {
    /// One fine-tuning step at `t` (see the top).
    fn step(
        &mut self,
        cx: &Context<'_>,
        student: &mut Learner<B>,
        batch: &DeviceBatch<B>,
        t: u64,
    ) -> Result<StepLog> {
        let out = student.weights.run(cx.net, &batch.x, cx.train_mode(t))?;
        let logits_b = out
            .logits_b
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument {
                op: Method::Ideal.name(),
                message: "the network has no second decoder: it was not made for ideal".into(),
            })?;
        let y = slice_batch(&batch.y, 0, batch.labeled)?;
        let (ce_a, dice_a) = supervised_loss(&slice_batch(&out.logits, 0, batch.labeled)?, &y)?;
        let (ce_b, dice_b) = supervised_loss(&slice_batch(logits_b, 0, batch.labeled)?, &y)?;
        let supervised = ce_a.add(&dice_a)?.add(&ce_b)?.add(&dice_b)?.scale(0.5)?;
        let cps = out
            .logits
            .cross_entropy(&hard_labels(logits_b)?, None, Reduction::Mean)?
            .add(&logits_b.cross_entropy(&hard_labels(&out.logits)?, None, Reduction::Mean)?)?;
        let weight = cx.config.ideal.cps_weight().at(t);
        let total = supervised.add(&cps.scale(weight)?)?;
        let lr = cx.lr(t);
        student.descend(&total, &out.batch_stats, cx.config.optimizer.clip, lr)?;
        let named = [
            ("loss", total),
            ("ce", ce_a),
            ("dice", dice_a),
            ("ce_b", ce_b),
            ("dice_b", dice_b),
            ("cps", cps),
        ];
        let mut log = step_log(&named, lr)?;
        log.push(("cps_weight", weight));
        Ok(log)
    }

    /// The pre-trained encoder (written from the pre-training run's network when it has just
    /// finished, or the one `ideal.encoder` names) under fresh decoders.
    fn start(
        &mut self,
        cx: &Context<'_>,
        student: &mut Learner<B>,
        run: &RunContext<'_, B>,
        resuming: bool,
    ) -> run::Result<Option<RunData>> {
        if resuming {
            return Ok(None);
        }
        let stem = match pretraining(cx.config) {
            Some(first) => {
                let stem = encoder_stem(run.paths);
                let network = first.restore(run.backend, run.channels(), run.paths)?;
                save_encoder(&network, &stem)?;
                stem
            }
            None => Path::new(&cx.config.ideal.encoder).with_extension(""),
        };
        load_encoder(run.backend, &mut student.weights, &stem)?;
        Ok(None)
    }
}
