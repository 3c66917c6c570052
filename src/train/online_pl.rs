//! Online pseudo-labeling with momentum networks (Pham Van et al., 2022; METHODS.md, section 5).
//!
//! - Stage 1 (`online-pl-teacher`, a run of its own in RUN_DIR/stage1 for
//!   `online_pl.stage1_iterations`): the teacher is trained with Dice on the labeled patches and
//!   keeps a momentum copy, EMA with `teacher_momentum` (0.95) after every update.
//! - Stage 2 (`online-pl`, in RUN_DIR): the student minimises Dice(labeled) + beta
//!   Dice(unlabeled, the teacher's softmax probabilities), beta = 0.3, with its own momentum copy
//!   (`student_momentum`, 0.99). The teacher starts as the stage-1 network or its momentum copy
//!   (`teacher_start`) and, with `online = true`, follows the student by EMA (`teacher_ema`) after
//!   every update, its parameters and running statistics; with `online = false` it stays frozen
//!   (offline pseudo-labeling). It predicts in eval mode, without noise: its probabilities are the
//!   soft pseudo-labels. The student starts from the stage-1 network (`student_init = "stage1"`)
//!   or fresh weights, with a fresh optimiser and schedule.
//!
//! The network validated, tested and predicting is the student's momentum copy (stage 1: the
//! teacher's), as the paper infers with its momentum networks. The shared two-stage run
//! ([`super::stages`]) gives resumption across both stages.

use super::config::TrainConfig;
use super::run::{self, restore_trainer, RunData, RunOptions, RunPaths, Summary};
use super::stages::{self, FirstStage};
use super::trainer::{slice_batch, DeviceBatch, StepLog, Teacher, Trainer};
use crate::nn::{Mode, NetBackend, Network, ParamStore};
use crate::optim::clip_grad_norm;
use metaseg_autograd::{grad, no_grad, DiceOptions, Result, Var};
use serde::{Deserialize, Serialize};

/// The `[online_pl]` section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnlinePlConfig {
    /// Stage 1: iterations of the teacher on the labeled cases (a run in RUN_DIR/stage1).
    pub stage1_iterations: u64,
    /// Weight of the unlabeled Dice to the teacher's probabilities.
    pub beta: f64,
    /// Momentum of the teacher's momentum copy in stage 1.
    pub teacher_momentum: f64,
    /// Momentum of the student's momentum copy in stage 2.
    pub student_momentum: f64,
    /// Momentum of the online teacher's EMA towards the student (not given in METHODS.md: ours).
    pub teacher_ema: f64,
    /// Where the stage-2 teacher starts: "teacher" (the stage-1 network) or "momentum" (its
    /// momentum copy).
    pub teacher_start: String,
    /// true: the teacher follows the student during stage 2; false: frozen (offline).
    pub online: bool,
    /// Where the student starts: "stage1" (the stage-1 network) or "scratch".
    pub student_init: String,
}

impl Default for OnlinePlConfig {
    fn default() -> Self {
        OnlinePlConfig {
            stage1_iterations: 3000,
            beta: 0.3,
            teacher_momentum: 0.95,
            student_momentum: 0.99,
            teacher_ema: 0.99,
            teacher_start: "momentum".into(),
            online: true,
            student_init: "stage1".into(),
        }
    }
}

impl OnlinePlConfig {
    /// The checks the types cannot make, each message naming its key.
    pub fn check(&self) -> std::result::Result<(), String> {
        let one_of = |key: &str, v: &str, names: &[&str]| {
            if names.contains(&v) {
                Ok(())
            } else {
                Err(format!(
                    "online_pl.{key} '{v}' is not one of {}",
                    names.join(", ")
                ))
            }
        };
        one_of(
            "teacher_start",
            &self.teacher_start,
            &["teacher", "momentum"],
        )?;
        one_of("student_init", &self.student_init, &["stage1", "scratch"])?;
        if self.stage1_iterations == 0 {
            return Err(
                "online_pl.stage1_iterations must be at least 1: stage 1 trains the \
                        teacher"
                    .into(),
            );
        }
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            return Err(format!("online_pl.beta {} must be >= 0", self.beta));
        }
        for (key, m) in [
            ("teacher_momentum", self.teacher_momentum),
            ("student_momentum", self.student_momentum),
            ("teacher_ema", self.teacher_ema),
        ] {
            if !(0.0..=1.0).contains(&m) {
                return Err(format!("online_pl.{key} {m} must be in [0, 1]"));
            }
        }
        Ok(())
    }
}

/// Stage 1's run: the teacher on the labeled cases, with the run's optimiser.
pub fn stage1_config(config: &TrainConfig) -> TrainConfig {
    stages::stage_config(
        config,
        "online-pl-teacher",
        config.online_pl.stage1_iterations,
    )
}

pub fn stage1_paths(paths: &RunPaths) -> RunPaths {
    paths.sub("stage1")
}

/// Both stages (see the top).
pub fn train<B: NetBackend>(
    backend: &B,
    config: &TrainConfig,
    data: &RunData,
    paths: &RunPaths,
    options: RunOptions,
) -> run::Result<Summary> {
    stages::require_unlabeled(data, "online-pl")?;
    let stage1 = stage1_config(config);
    let stage1_paths = stage1_paths(paths);
    let first = FirstStage {
        config: &stage1,
        paths: &stage1_paths,
        message: format!(
            "stage 1: the teacher on {} labeled cases for {} iterations, in {}",
            data.labeled.len(),
            stage1.iterations,
            stage1_paths.dir.display()
        ),
    };
    stages::train(
        backend,
        data,
        paths,
        options,
        first,
        |started, main_options| {
            let trainer = student_trainer(backend, config, data, &stage1_paths, started)?;
            run::train_from(backend, trainer, data, paths, main_options)
        },
    )
}

/// Stage 2's trainer before its first step (see the top). Resuming replaces all of it anyway.
fn student_trainer<B: NetBackend>(
    backend: &B,
    config: &TrainConfig,
    data: &RunData,
    stage1_paths: &RunPaths,
    resuming: bool,
) -> run::Result<Trainer<B>> {
    let channels = data.labeled[0].image.channels;
    let mut trainer = Trainer::new(backend, config, channels)?;
    if resuming {
        return Ok(trainer);
    }
    let stage1 = restore_trainer(backend, &stage1_config(config), channels, stage1_paths)?;
    let momentum = stage1.momentum.expect("stage 1 keeps a momentum copy");
    let start = match config.online_pl.teacher_start.as_str() {
        "teacher" => Teacher {
            params: stage1.params.clone(),
            stats: stage1.stats.clone(),
        },
        _ => momentum,
    };
    trainer.teacher = Some(start);
    if config.online_pl.student_init == "stage1" {
        trainer.params = stage1.params;
        trainer.stats = stage1.stats;
    }
    trainer.momentum = Some(Teacher {
        params: trainer.params.clone(),
        stats: trainer.stats.clone(),
    });
    Ok(trainer)
}

/// One iteration of either stage: stage 1 has no teacher (Dice on the labeled patches), stage 2
/// adds beta Dice to the teacher's probabilities on the unlabeled ones; then the update, the
/// momentum copy's EMA and (stage 2, online) the teacher's.
pub fn step<B: NetBackend>(
    trainer: &mut Trainer<B>,
    batch: &DeviceBatch<B>,
    t: u64,
) -> Result<StepLog> {
    let c = trainer.config.online_pl.clone();
    let mode = Mode::Train {
        seed: trainer.config.seed,
        step: t as u32,
    };
    let out = trainer
        .net
        .run(&trainer.params, &trainer.stats, &batch.x, mode)?;
    let dice = |logits: &Var<B>, target: &Var<B>| {
        logits.softmax_dice(
            target,
            DiceOptions {
                include_background: false,
                ..DiceOptions::default()
            },
        )
    };
    let labeled = dice(&slice_batch(&out.logits, 0, batch.labeled)?, &batch.y)?;
    let mut terms = vec![("dice", labeled.clone())];
    let mut total = labeled;
    if let Some(teacher) = &trainer.teacher {
        let unlabeled = batch.x.shape().dims()[0] - batch.labeled;
        let x_u = slice_batch(&batch.x, batch.labeled, unlabeled)?;
        let probs = no_grad(|| {
            trainer
                .net
                .run(&teacher.params, &teacher.stats, &x_u, Mode::Eval)?
                .logits
                .softmax_channels()
        })?
        .detach();
        let student_u = slice_batch(&out.logits, batch.labeled, unlabeled)?;
        let pseudo = dice(&student_u, &probs)?;
        total = total.add(&pseudo.scale(c.beta)?)?;
        terms.push(("dice_unlabeled", pseudo));
    }
    let wrt: Vec<&Var<B>> = trainer.params.values().iter().collect();
    let mut grads = grad(&total, &wrt, None, false)?;
    let clip = trainer.config.optimizer.clip;
    if clip > 0.0 {
        grads = clip_grad_norm(&grads, clip)?;
    }
    let lr = trainer.schedule().lr(trainer.config.optimizer.lr, t);
    trainer.keep_stats(&out.batch_stats)?;
    trainer.params = trainer.optimizer.step(&trainer.params, &grads, lr)?;
    let stage2 = trainer.teacher.is_some();
    let m = if stage2 {
        c.student_momentum
    } else {
        c.teacher_momentum
    };
    let copy = trainer
        .momentum
        .take()
        .expect("online-pl keeps a momentum copy");
    trainer.momentum = Some(follow(&copy, &trainer.params, &trainer.stats, m)?);
    terms.insert(0, ("loss", total));
    if let Some(teacher) = trainer.teacher.take() {
        // Offline, the change is measured too (it is 0): the log shows the teacher is frozen.
        let moved = if c.online {
            follow(&teacher, &trainer.params, &trainer.stats, c.teacher_ema)?
        } else {
            teacher.clone()
        };
        terms.push((
            "teacher_change",
            change_norm(&teacher.params, &moved.params)?,
        ));
        trainer.teacher = Some(moved);
    }
    trainer.step_log(&terms, lr)
}

/// `network` moved towards (params, stats) by EMA with momentum `m`.
fn follow<B: NetBackend>(
    network: &Teacher<B>,
    params: &ParamStore<B>,
    stats: &ParamStore<B>,
    m: f64,
) -> Result<Teacher<B>> {
    Ok(Teacher {
        params: network.params.ema(params, m)?,
        stats: network.stats.ema(stats, m)?,
    })
}

/// The L2 norm of the change from `before` to `after`, over every parameter.
fn change_norm<B: NetBackend>(before: &ParamStore<B>, after: &ParamStore<B>) -> Result<Var<B>> {
    let backend = before.values()[0].backend();
    let a = Var::constant(backend, before.flat()?);
    let b = Var::constant(backend, after.flat()?);
    b.sub(&a)?.square()?.sum()?.sqrt()
}
