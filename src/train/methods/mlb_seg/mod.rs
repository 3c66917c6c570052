//! MLB-Seg (Wei et al., MICCAI 2023; METHODS.md, section 1): meta-learning per-voxel weights of
//! two label sources for the unlabeled cases, their initial labels and labels enhanced by the
//! consistency of several views, through a one-step look-ahead on the labeled cases.
//!
//! - [`start`]: stage 0 (a supervised run, then the initial labels of every unlabeled case written
//!   as NIfTI), how the main stage starts from it, and the weight maps written at validation.
//! - [`views`]: the K = 5 views of pseudo-label enhancement, y_ple and L_cons.
//! - [`step`]: one iteration, phase by phase: the views and their terms, the meta step, the weighted
//!   real update, the supervised step on the meta batch, the teacher's EMA after each update.
//! - [`study`]: that iteration on given arrays with every intermediate (`kernel mlb_step`).
//! - [`passes`]: that iteration's parts against the passes it needs, timed (`train --profile`).

pub mod passes;
pub mod start;
pub mod step;
pub mod study;
pub mod views;

use super::{FirstStage, MethodKind, Setup, Stage, Streams, Training};
use crate::nn::NetBackend;
use crate::train::checkpoint::Parts;
use crate::train::config::{ConfigError, TrainConfig};
use crate::train::network::{Guarded, Learner, Weights};
use crate::train::run::{self, RunContext, RunData};
use crate::train::trainer::{Context, DeviceBatch, StepLog, Trainer};
use metaseg_autograd::{Normalization, Result};
use serde::{Deserialize, Serialize};

/// MLB-Seg (METHODS.md, section 1): the paper's intent by default, the released code's behaviour
/// behind flags.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlbSegConfig {
    /// Stage 0: supervised iterations on the labeled cases before the initial labels are
    /// predicted (a run of its own in RUN_DIR/stage0).
    pub stage0_iterations: u64,
    /// Where the main stage starts: "stage0" (the network trained on the labeled cases, as the
    /// paper describes) or "scratch" (fresh weights: the released code without --checkpoint).
    pub init: String,
    /// The zoom offsets p of the PLE views are drawn from the even numbers in this range (the
    /// released code's 4..30 voxels on 144-voxel slices), scaled by the patch's smallest axis
    /// (of more than one voxel) over `zoom_reference`.
    pub zoom_range: [u32; 2],
    pub zoom_reference: f64,
    /// "coverage": the views' predictions warped back are averaged where each covers the frame
    /// (a zoom-in view covers only its centre); "views": divided by the number of views, as the
    /// released code does.
    pub ple_average: String,
    /// The student pass the PLE labels come from: "train" (the pass the update differentiates,
    /// dropout and batch statistics included: the paper and the released code) or "eval" (an
    /// extra pass without gradient in evaluation mode, as stage 0 predicts the initial labels;
    /// ours, to test whether training mode's batch statistics bias the PLE labels). Absent from
    /// configurations written before it existed, which ran "train".
    #[serde(default = "train_mode")]
    pub ple_mode: String,
    /// Which exact meta-gradient: "fast" (forward mode) or "reverse" (reverse over reverse).
    pub meta_path: String,
    /// Weight normalisation: "clip" (max(-g, 0) / sum, the paper's), "softmax", "sigmoid" or
    /// "hard".
    pub weights: String,
    /// false: the meta loss is the CE on the meta batch itself (the paper); true: on its PLE views
    /// (the released code).
    pub meta_views: bool,
    /// Weight of L_cons and L_mt in both updates (1 in the paper and the released code).
    pub consistency: f64,
    /// false: the meta batch's losses (the meta loss and the supervised step) are mean CE, as in
    /// the paper and the released code; true: 0.5 (CE + Dice) as the baselines' supervised loss
    /// (in neither: it tests whether CE-only objectives drift to background on small structures).
    pub meta_batch_dice: bool,
    /// Ramp that weight up as the mean teacher's consistency (mean_teacher.rampup and
    /// rampup_unit); neither the paper nor the released code does.
    pub rampup: bool,
    /// Global L2 norm both updates clip their gradients to (0: none).
    pub clip: f64,
    /// The main stage's learning rate in place of `optimizer.lr` (its schedule still applies),
    /// in the look-ahead and both updates; stage 0 keeps `optimizer.lr`. 0: `optimizer.lr` for
    /// both stages, as before the key existed (configurations written then read as 0). Stage 0's
    /// configuration leaves it at 0, so runs that differ only here can share one stage 0
    /// (`--stop-after`, a copy of the run directory, `--resume`).
    #[serde(default)]
    pub lr: f64,
    /// An unlabeled case whose weight maps are written as NIfTI at every validation (empty:
    /// none).
    pub save_weights: String,
    /// The meta loss of the look-ahead: "ce" (mean CE over the meta batch's voxels: the paper and
    /// the released code) or "balanced" (the mean over the classes present of each class's mean
    /// CE, so a small foreground counts as much as the background; ours, issue 23). The
    /// supervised step on the meta batch keeps mean CE either way.
    #[serde(default = "mean_ce")]
    pub meta_loss: String,
    /// Over what the weights are normalised: "both_maps" (one normalisation over the initial
    /// labels' and the PLE labels' maps together: the paper and the released code) or "each_map"
    /// (each map on its own, to half the total each: the meta step then only chooses voxels
    /// within a map, never between the maps; ours, issue 23).
    #[serde(default = "both_maps")]
    pub normalise_over: String,
    /// The PLE labels are foreground where the views' average exceeds this (0.5: the paper and
    /// the released code).
    #[serde(default = "half")]
    pub ple_threshold: f64,
}

/// `meta_loss`'s default: the paper's mean CE.
fn mean_ce() -> String {
    "ce".into()
}

/// `normalise_over`'s default: the paper's one normalisation.
fn both_maps() -> String {
    "both_maps".into()
}

/// `ple_threshold`'s default.
fn half() -> f64 {
    0.5
}

/// `ple_mode`'s default: the paper's training-mode pass.
fn train_mode() -> String {
    "train".into()
}

/// The released code's 2D recipe where it applies to any network (METHODS.md, section 1.7).
impl Default for MlbSegConfig {
    fn default() -> Self {
        MlbSegConfig {
            stage0_iterations: 3000,
            init: "stage0".into(),
            zoom_range: [4, 30],
            zoom_reference: 144.0,
            ple_average: "coverage".into(),
            ple_mode: train_mode(),
            meta_path: "fast".into(),
            weights: "clip".into(),
            meta_views: false,
            consistency: 1.0,
            meta_batch_dice: false,
            rampup: false,
            clip: 0.2,
            lr: 0.0,
            save_weights: String::new(),
            meta_loss: mean_ce(),
            normalise_over: both_maps(),
            ple_threshold: half(),
        }
    }
}

impl MlbSegConfig {
    /// What the types cannot check; every message names its key.
    pub fn check(&self, config: &TrainConfig) -> std::result::Result<(), ConfigError> {
        let m = self;
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let one_of = |what: &str, v: &str, names: &[&str]| {
            if names.contains(&v) {
                Ok(())
            } else {
                bad(format!(
                    "mlb_seg.{what} '{v}' is not one of {}",
                    names.join(", ")
                ))
            }
        };
        one_of("init", &m.init, &["stage0", "scratch"])?;
        one_of("ple_average", &m.ple_average, &["coverage", "views"])?;
        one_of("ple_mode", &m.ple_mode, &["train", "eval"])?;
        one_of("meta_path", &m.meta_path, &["fast", "reverse"])?;
        one_of("weights", &m.weights, &Normalization::NAMES)?;
        one_of("meta_loss", &m.meta_loss, &["ce", "balanced"])?;
        one_of(
            "normalise_over",
            &m.normalise_over,
            &["both_maps", "each_map"],
        )?;
        if !(m.ple_threshold > 0.0 && m.ple_threshold < 1.0) {
            return bad(format!(
                "mlb_seg.ple_threshold {} must lie strictly between 0 and 1",
                m.ple_threshold
            ));
        }
        if config.optimizer.kind != "sgd" {
            return bad("mlb-seg's look-ahead step is SGD: set optimizer.kind = \"sgd\"".into());
        }
        if m.stage0_iterations == 0 {
            return bad(
                "mlb_seg.stage0_iterations must be at least 1: the initial labels come \
                        from the stage-0 network"
                    .into(),
            );
        }
        let [lo, hi] = m.zoom_range;
        let smallest = config.batch.patch.iter().filter(|&&n| n > 1).min().copied();
        let largest_p = f64::from(hi) * smallest.unwrap_or(1) as f64 / m.zoom_reference;
        let positive_reference = m.zoom_reference > 0.0;
        if lo == 0 || lo > hi || !positive_reference || smallest.is_none() {
            return bad(format!(
                "mlb_seg.zoom_range {:?} must be 1 <= low <= high, with zoom_reference > 0 and a \
                 patch of more than one voxel",
                m.zoom_range
            ));
        }
        if 4.0 * largest_p >= smallest.unwrap_or(1) as f64 {
            return bad(format!(
                "mlb_seg.zoom_range {:?}: a zoom-out by {largest_p:.1} voxels per side would leave \
                 less than half of a {}-voxel patch axis",
                m.zoom_range,
                smallest.unwrap_or(1)
            ));
        }
        let nonnegative = |v: f64| v >= 0.0;
        if !nonnegative(m.consistency) || !nonnegative(m.clip) {
            return bad("mlb_seg.consistency and mlb_seg.clip must be >= 0".into());
        }
        if !(m.lr >= 0.0 && m.lr.is_finite()) {
            return bad("mlb_seg.lr must be >= 0 (0: optimizer.lr)".into());
        }
        Ok(())
    }

    /// The main stage's learning rate at iteration `t`: `lr` (0: `optimizer.lr`) on the
    /// optimiser's schedule.
    pub fn lr_at(&self, cx: &Context<'_>, t: u64) -> f64 {
        let base = if self.lr > 0.0 {
            self.lr
        } else {
            cx.config.optimizer.lr
        };
        cx.schedule().lr(base, t)
    }
}

/// MLB-Seg's kind: batches whose unlabeled patches carry their initial labels, stage 0 first.
pub struct Kind;

impl MethodKind for Kind {
    fn streams(&self, _: Stage) -> Streams {
        Streams {
            unlabeled: true,
            unlabeled_labels: true,
        }
    }

    fn check(&self, config: &TrainConfig) -> std::result::Result<(), ConfigError> {
        config.mlb_seg.check(config)
    }

    fn needs_unlabeled_cases(&self) -> bool {
        true
    }

    fn first_stage(&self, config: &TrainConfig) -> Option<FirstStage> {
        Some(start::stage0(config))
    }

    fn build<B: NetBackend>(&self, setup: &Setup<'_, B>) -> Result<Box<dyn Training<B>>> {
        Ok(Box::new(MlbSeg {
            teacher: setup.student.clone(),
        }))
    }
}

/// MLB-Seg's state: the mean teacher of L_mt, a copy of the student when the main stage starts.
pub struct MlbSeg<B: NetBackend> {
    pub teacher: Weights<B>,
}

impl<B: NetBackend> Training<B> for MlbSeg<B> {
    fn step(
        &mut self,
        cx: &Context<'_>,
        student: &mut Learner<B>,
        batch: &DeviceBatch<B>,
        t: u64,
    ) -> Result<StepLog> {
        step::step(cx, student, &mut self.teacher, batch, t)
    }

    fn save(&self, parts: &mut Parts) -> run::Result<()> {
        parts.put_weights("teacher", &self.teacher)
    }

    fn networks(&mut self) -> Vec<(&'static str, Guarded<'_, B>)> {
        vec![("teacher", Guarded::Weights(&self.teacher))]
    }

    fn load(&mut self, backend: &B, parts: &Parts) -> run::Result<()> {
        self.teacher = parts.weights("teacher", &self.teacher, backend)?;
        Ok(())
    }

    fn start(
        &mut self,
        cx: &Context<'_>,
        student: &mut Learner<B>,
        run: &RunContext<'_, B>,
        resuming: bool,
    ) -> run::Result<Option<RunData>> {
        start::start(self, cx, student, run, resuming).map(Some)
    }

    fn at_validation(
        &self,
        trainer: &Trainer<B>,
        run: &RunContext<'_, B>,
        data: &RunData,
        batch: &DeviceBatch<B>,
        done: u64,
    ) -> run::Result<()> {
        start::save_weight_maps(self, trainer, run, data, batch, done)
    }
}
