//! Local contrastive loss with pseudo-label self-training (Chaitanya et al., MedIA 2023;
//! METHODS.md, section 2).
//!
//! - Stage 1 (a supervised run of its own in RUN_DIR/stage1, for
//!   `local_contrastive.stage1_iterations`): the network on the labeled cases.
//! - Then `rounds` rounds of joint training that share one run in RUN_DIR (one log, one optimiser,
//!   one schedule over `iterations`, split into equal rounds): at the start of each round every
//!   unlabeled case is predicted by the network so far (round 1: stage 1's) and the predictions,
//!   written to RUN_DIR/pseudo_labels/round-R/CASE.nii.gz, are its labels for that round. Each
//!   step minimises the supervised loss on the labeled patches (0.5 (CE + Dice), as the baselines)
//!   plus lambda L_local on every patch of the batch, labeled and pseudo-labeled, images 2i and
//!   2i + 1 forming a pair (see `Var::local_contrastive`), with `anchors` voxels per foreground
//!   class and image drawn from the step's seed.
//! - The contrastive head is the V-Net's projection head (1x1 conv-BN-ReLU-1x1 conv on the last
//!   decoder features, `embedding` channels); the loss L2-normalises its output.
//! - With `agreement` > 0, each round also predicts every unlabeled case flipped along W and keeps a
//!   case for that round only if the two predictions' foreground Dice exceeds it (the paper's
//!   optional filter); the Dice of every case is written to the round's `agreement.json`.
//!
//! The paper re-predicts from the best model of the previous round, chosen on a validation set.
//! Our runs validate on the test cases, so choosing by that Dice would let the test set pick the
//! model: each round starts from the latest network instead.
//!
//! The rounds are a hook of the run loop ([`Training::before_iteration`]): a round boundary is a
//! checkpoint of the main run, and a round's pseudo-labels are read back from their files when the
//! run resumes inside it, so an interrupted run repeats the uninterrupted one.

use super::{FirstStage, Method, MethodKind, Setup, Stage, Streams, Training};
use crate::data;
use crate::eval::metrics;
use crate::nn::NetBackend;
use crate::train::batch::LoadedCase;
use crate::train::config::{ConfigError, TrainConfig};
use crate::train::network::{Heads, Learner};
use crate::train::pseudo_labels;
use crate::train::run::{self, io, predict_case, RunContext, RunData, RunError, RunPaths};
use crate::train::trainer::{
    slice_batch, step_log, supervised_loss, Context, DeviceBatch, StepLog, Trainer,
};
use metaseg_autograd::contrastive::MAX_ANCHORS;
use metaseg_autograd::{no_grad, Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Salt of the anchor draws, apart from the other streams of the run's seed.
const ANCHOR_SALT: u64 = 0x10ca_1c0e;

/// The `[local_contrastive]` keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalContrastiveConfig {
    /// Stage 1: supervised iterations on the labeled cases (a run in RUN_DIR/stage1).
    pub stage1_iterations: u64,
    /// Pseudo-label rounds the main run's `iterations` are split into (3 in the paper).
    pub rounds: u64,
    /// Weight of L_local (0.1).
    pub lambda: f64,
    /// Temperature of L_local (0.1).
    pub tau: f64,
    /// Anchor voxels drawn per foreground class and image (3).
    pub anchors: usize,
    /// Channels of the projection head's embeddings (not given in METHODS.md: ours).
    pub embedding: usize,
    /// Keep an unlabeled case in a round only if its predictions on the image and on the image
    /// flipped along W agree with foreground Dice above this (0: no filter).
    pub agreement: f64,
    /// Where the main run starts: "stage1" (the network of stage 1) or "scratch".
    pub init: String,
}

impl Default for LocalContrastiveConfig {
    fn default() -> Self {
        LocalContrastiveConfig {
            stage1_iterations: 3000,
            rounds: 3,
            lambda: 0.1,
            tau: 0.1,
            anchors: 3,
            embedding: 32,
            agreement: 0.0,
            init: "stage1".into(),
        }
    }
}

impl LocalContrastiveConfig {
    /// What the types cannot check; every message names its key.
    pub fn check(&self, config: &TrainConfig) -> std::result::Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if config.network.kind != "vnet" {
            return bad(
                "local-contrastive needs network.kind = \"vnet\" (the projection head is the \
                 V-Net's)"
                    .into(),
            );
        }
        let patches = config.batch.labeled + config.batch.unlabeled;
        if !patches.is_multiple_of(2) {
            return bad(format!(
                "local-contrastive pairs the batch's patches 2i and 2i + 1: batch.labeled + \
                 batch.unlabeled = {patches} must be even"
            ));
        }
        if self.stage1_iterations == 0 {
            return bad("local_contrastive.stage1_iterations must be at least 1".into());
        }
        if self.rounds == 0 || self.rounds > config.iterations {
            return bad(format!(
                "local_contrastive.rounds {} must be between 1 and iterations ({})",
                self.rounds, config.iterations
            ));
        }
        if !(self.lambda.is_finite() && self.lambda >= 0.0) {
            return bad(format!(
                "local_contrastive.lambda {} must be >= 0",
                self.lambda
            ));
        }
        if !(self.tau.is_finite() && self.tau > 0.0) {
            return bad(format!("local_contrastive.tau {} must be > 0", self.tau));
        }
        if self.anchors == 0 || self.embedding == 0 {
            return bad("local_contrastive.anchors and .embedding must be at least 1".into());
        }
        if self.anchors > MAX_ANCHORS {
            return bad(format!(
                "local_contrastive.anchors {} is more than the {MAX_ANCHORS} the sampler draws",
                self.anchors
            ));
        }
        if !(0.0..1.0).contains(&self.agreement) {
            return bad(format!(
                "local_contrastive.agreement {} must be in [0, 1) (0: no filter)",
                self.agreement
            ));
        }
        if !["stage1", "scratch"].contains(&self.init.as_str()) {
            return bad(format!(
                "local_contrastive.init '{}' is not one of stage1, scratch",
                self.init
            ));
        }
        Ok(())
    }

    /// The main run's iterations [begin, end) of round `r` (from 0).
    pub fn round(&self, r: u64, iterations: u64) -> (u64, u64) {
        (
            r * iterations / self.rounds,
            (r + 1) * iterations / self.rounds,
        )
    }
}

/// Stage 1: a supervised run on the labeled cases, with the run's optimiser, in RUN_DIR/stage1.
pub fn stage1(config: &TrainConfig) -> FirstStage {
    FirstStage {
        dir: "stage1",
        config: TrainConfig {
            method: Method::Supervised,
            iterations: config.local_contrastive.stage1_iterations,
            ..config.clone()
        },
        stage: Stage::Main,
        title: "stage 1: supervised",
        iterations_key: "local_contrastive.stage1_iterations",
        all_cases: false,
    }
}

/// Where round `r`'s (from 0) pseudo-labels are written.
pub fn pseudo_label_dir(paths: &RunPaths, r: u64) -> PathBuf {
    paths
        .dir
        .join("pseudo_labels")
        .join(format!("round-{}", r + 1))
}

/// The local contrastive method's kind: every patch with labels (the unlabeled ones the round's
/// pseudo-labels), the V-Net's projection head, stage 1 first.
pub struct Kind;

impl MethodKind for Kind {
    fn streams(&self, _: Stage) -> Streams {
        Streams {
            unlabeled: true,
            unlabeled_labels: true,
        }
    }

    fn heads(&self, config: &TrainConfig, _: Stage) -> Heads {
        Heads {
            projection: Some(config.local_contrastive.embedding),
            ..Heads::default()
        }
    }

    fn check(&self, config: &TrainConfig) -> std::result::Result<(), ConfigError> {
        config.local_contrastive.check(config)
    }

    fn needs_unlabeled_cases(&self) -> bool {
        true
    }

    fn first_stage(&self, config: &TrainConfig) -> Option<FirstStage> {
        Some(stage1(config))
    }

    fn build<B: NetBackend>(&self, _: &Setup<'_, B>) -> Result<Box<dyn Training<B>>> {
        Ok(Box::new(LocalContrastive))
    }
}

/// The method keeps nothing beside the student: its rounds are a function of the iteration.
pub struct LocalContrastive;

impl<B: NetBackend> Training<B> for LocalContrastive {
    fn step(
        &mut self,
        cx: &Context<'_>,
        student: &mut Learner<B>,
        batch: &DeviceBatch<B>,
        t: u64,
    ) -> Result<StepLog> {
        step(cx, student, batch, t)
    }

    /// The stage-1 network (the projection head, which stage 1 has not, at its initial values)
    /// or fresh weights, a fresh optimiser.
    fn start(
        &mut self,
        cx: &Context<'_>,
        student: &mut Learner<B>,
        run: &RunContext<'_, B>,
        resuming: bool,
    ) -> run::Result<Option<RunData>> {
        if !resuming && cx.config.local_contrastive.init == "stage1" {
            let stage1 = stage1(cx.config).restore(run.backend, run.channels(), run.paths)?;
            let w = &mut student.weights;
            w.params = w.params.with_matching(&stage1.student.weights.params)?;
            w.stats = w.stats.with_matching(&stage1.student.weights.stats)?;
        }
        Ok(None)
    }

    /// At the start of each round (or where a resumed run starts inside one): its cases.
    fn before_iteration(
        &self,
        trainer: &Trainer<B>,
        run: &RunContext<'_, B>,
        t: u64,
        first: bool,
    ) -> run::Result<Option<RunData>> {
        let config = &trainer.config;
        let lc = &config.local_contrastive;
        let round = |r| lc.round(r, config.iterations);
        let Some(r) = (0..lc.rounds).find(|&r| t < round(r).1) else {
            return Ok(None);
        };
        let (begin, _) = round(r);
        if t != begin && !first {
            return Ok(None);
        }
        let dir = pseudo_label_dir(run.paths, r);
        let labels = if t > begin {
            read_round(run.data, lc, &dir)?
        } else {
            run.say(format!(
                "round {} of {}: pseudo-labels of {} unlabeled cases, in {}",
                r + 1,
                lc.rounds,
                run.data.unlabeled.len(),
                dir.display()
            ));
            if r == 0 {
                let network = stage1(config).restore(run.backend, run.channels(), run.paths)?;
                predict_round(run.backend, &network, run.data, lc, &dir)?
            } else {
                predict_round(run.backend, trainer, run.data, lc, &dir)?
            }
        };
        let round_data = kept_cases(run.data, labels, lc.agreement)?;
        if round_data.unlabeled.len() < run.data.unlabeled.len() {
            run.say(format!(
                "round {}: {} of {} unlabeled cases agree above {}",
                r + 1,
                round_data.unlabeled.len(),
                run.data.unlabeled.len(),
                lc.agreement
            ));
        }
        Ok(Some(round_data))
    }

    /// The end of every round, so a resumed run starts a round as the uninterrupted one did.
    fn checkpoint_at(&self, config: &TrainConfig, done: u64) -> bool {
        let lc = &config.local_contrastive;
        (0..lc.rounds).any(|r| lc.round(r, config.iterations).1 == done)
    }
}

/// A round's labels: the predicted label map of every unlabeled case and, with the filter on,
/// the Dice of its prediction against its flipped prediction.
struct RoundLabels {
    labels: Vec<Vec<u8>>,
    agreement: Option<BTreeMap<String, f64>>,
}

fn agreement_path(dir: &Path) -> PathBuf {
    dir.join("agreement.json")
}

/// Predicts (and writes) round labels with `network`.
fn predict_round<B: NetBackend>(
    backend: &B,
    network: &Trainer<B>,
    data: &RunData,
    lc: &LocalContrastiveConfig,
    dir: &Path,
) -> run::Result<RoundLabels> {
    let labels = pseudo_labels::predict(backend, network, &data.unlabeled, dir)?;
    let agreement = if lc.agreement > 0.0 {
        let mut dice = BTreeMap::new();
        for (case, label) in data.unlabeled.iter().zip(&labels) {
            let flipped = predict_case(backend, network, &flip_w(case))?;
            let back = flip_labels_w(&flipped, case.image.dims);
            let d = metrics::overlap(label, &back, |v| v > 0).dice();
            dice.insert(case.name.clone(), d);
        }
        let path = agreement_path(dir);
        let text = serde_json::to_string_pretty(&dice).expect("a map of numbers serialises");
        std::fs::write(&path, text).map_err(io(&path))?;
        Some(dice)
    } else {
        None
    };
    Ok(RoundLabels { labels, agreement })
}

/// Round labels written by [`predict_round`], read back.
fn read_round(data: &RunData, lc: &LocalContrastiveConfig, dir: &Path) -> run::Result<RoundLabels> {
    let labels = pseudo_labels::read(&data.unlabeled, dir)?;
    let agreement = if lc.agreement > 0.0 {
        let path = agreement_path(dir);
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let dice = serde_json::from_str(&text).map_err(|e| {
            RunError::Resume(format!("{}: {e}; start the run again", path.display()))
        })?;
        Some(dice)
    } else {
        None
    };
    Ok(RoundLabels { labels, agreement })
}

/// The run's cases with the unlabeled ones carrying the round's labels, those whose predictions
/// do not agree above `threshold` left out (with the filter on).
fn kept_cases(data: &RunData, round: RoundLabels, threshold: f64) -> run::Result<RunData> {
    let mut kept = pseudo_labels::with_labels(data, round.labels);
    if let Some(dice) = round.agreement {
        kept.unlabeled
            .retain(|c| dice.get(&c.name).is_some_and(|&d| d > threshold));
        if kept.unlabeled.is_empty() {
            return Err(RunError::Data(data::DataError::invalid(
                "local_contrastive.agreement",
                format!(
                    "no unlabeled case's two predictions agree with Dice above {threshold}: \
                     lower it or set it to 0 (no filter)"
                ),
            )));
        }
    }
    Ok(kept)
}

/// The case with its image flipped along W.
fn flip_w(case: &LoadedCase) -> LoadedCase {
    let w = case.image.dims[2];
    let mut image = case.image.clone();
    for row in image.data.chunks_mut(w) {
        row.reverse();
    }
    LoadedCase {
        image,
        label: None,
        ..case.clone()
    }
}

fn flip_labels_w(labels: &[u8], dims: [usize; 3]) -> Vec<u8> {
    labels
        .chunks(dims[2])
        .flat_map(|row| row.iter().rev().copied())
        .collect()
}

fn no_embedding() -> Error {
    Error::InvalidArgument {
        op: Method::LocalContrastive.name(),
        message: "the network has no projection head: it was not made for local-contrastive".into(),
    }
}

/// One step at `t`: the supervised loss on the labeled patches plus lambda L_local on every patch
/// with the labels the batch carries (the unlabeled ones' are the round's pseudo-labels).
fn step<B: NetBackend>(
    cx: &Context<'_>,
    student: &mut Learner<B>,
    batch: &DeviceBatch<B>,
    t: u64,
) -> Result<StepLog> {
    let config = cx.config;
    let lc = &config.local_contrastive;
    let out = student.weights.run(cx.net, &batch.x, cx.train_mode(t))?;
    let (ce, dice) = supervised_loss(
        &slice_batch(&out.logits, 0, batch.labeled)?,
        &slice_batch(&batch.y, 0, batch.labeled)?,
    )?;
    let embedding = out.embedding.as_ref().ok_or_else(no_embedding)?;
    let anchor_seed = (config.seed ^ ANCHOR_SALT).wrapping_add(t << 32);
    let anchors = no_grad(|| batch.y.sample_anchors(lc.anchors, anchor_seed))?;
    let contrastive = embedding.local_contrastive(&batch.y, Some(&anchors), lc.tau)?;
    let total = ce
        .add(&dice)?
        .scale(0.5)?
        .add(&contrastive.scale(lc.lambda)?)?;
    let lr = cx.lr(t);
    student.descend(&total, &out.batch_stats, config.optimizer.clip, lr)?;
    let named = [
        ("loss", total),
        ("ce", ce),
        ("dice", dice),
        ("contrastive", contrastive),
    ];
    step_log(&named, lr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Volume;

    fn case(name: &str, dims: [usize; 3]) -> LoadedCase {
        let n: usize = dims.iter().product();
        let data: Vec<f32> = (0..n).map(|i| i as f32).collect();
        LoadedCase {
            name: name.into(),
            image: Volume::new(data, dims, [1.0; 3]).unwrap(),
            label: None,
        }
    }

    #[test]
    fn flipping_along_w_reverses_rows_and_undoes_itself() {
        let c = case("a", [2, 3, 4]);
        let flipped = flip_w(&c);
        assert_eq!(&flipped.image.data[..4], &[3.0, 2.0, 1.0, 0.0]);
        assert_eq!(&flipped.image.data[20..], &[23.0, 22.0, 21.0, 20.0]);
        let labels: Vec<u8> = (0..24).collect();
        assert_eq!(
            flip_labels_w(&flip_labels_w(&labels, [2, 3, 4]), [2, 3, 4]),
            labels
        );
        assert_eq!(&flip_labels_w(&labels, [2, 3, 4])[4..8], &[7, 6, 5, 4]);
    }

    #[test]
    fn the_filter_keeps_the_cases_that_agree_above_the_threshold() {
        let data = RunData {
            labeled: vec![case("l", [1, 1, 2])],
            unlabeled: ["u1", "u2", "u3"].map(|n| case(n, [1, 1, 2])).to_vec(),
            test: Vec::new(),
            validation: Vec::new(),
        };
        let labels = vec![vec![1, 0], vec![0, 1], vec![1, 1]];
        let dice = BTreeMap::from([("u1".to_string(), 0.9), ("u2".to_string(), 0.5)]);
        let round = |agreement| RoundLabels {
            labels: labels.clone(),
            agreement,
        };
        let kept = kept_cases(&data, round(Some(dice.clone())), 0.6).unwrap();
        let names: Vec<&str> = kept.unlabeled.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["u1"], "u2 below, u3 without a Dice");
        assert_eq!(kept.unlabeled[0].label, Some(vec![1, 0]));
        let all = kept_cases(&data, round(None), 0.6).unwrap();
        assert_eq!(all.unlabeled.len(), 3);
        assert_eq!(all.unlabeled[2].label, Some(vec![1, 1]));
        let Err(err) = kept_cases(&data, round(Some(dice)), 0.95) else {
            panic!("no case agrees above 0.95: an error");
        };
        assert!(
            err.to_string().contains("local_contrastive.agreement"),
            "{err}"
        );
    }
}
