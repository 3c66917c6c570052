//! Online pseudo-labeling with momentum networks (Pham Van et al., 2022; METHODS.md, section 5).
//!
//! - Stage 1 (the first stage, a run of its own in RUN_DIR/stage1 for
//!   `online_pl.stage1_iterations`): the teacher is trained with Dice on the labeled patches and
//!   keeps a momentum copy, EMA with `teacher_momentum` (0.95) after every update.
//! - Stage 2 (the main stage, in RUN_DIR): the student minimises Dice(labeled) + beta
//!   Dice(unlabeled, the teacher's softmax probabilities), beta = 0.3, with its own momentum copy
//!   (`student_momentum`, 0.99). The teacher starts as the stage-1 network or its momentum copy
//!   (`teacher_start`) and, with `online = true`, follows the student by EMA (`teacher_ema`) after
//!   every update, its parameters and running statistics; with `online = false` it stays frozen
//!   (offline pseudo-labeling). It predicts in eval mode, without noise: its probabilities are the
//!   soft pseudo-labels. The student starts from the stage-1 network (`student_init = "stage1"`)
//!   or fresh weights, with a fresh optimiser and schedule.
//!
//! The network validated, tested and predicting is the student's momentum copy (stage 1: the
//! teacher's), as the paper infers with its momentum networks. Checkpoints add the copy under
//! `momentum/` and, in stage 2, the teacher under `teacher/`.

use super::{FirstStage, MethodKind, Setup, Stage, Streams, Training};
use crate::nn::{Mode, NetBackend, ParamStore};
use crate::train::checkpoint::Parts;
use crate::train::config::{ConfigError, TrainConfig};
use crate::train::network::{Guarded, Learner, Weights};
use crate::train::run::{self, RunContext, RunData};
use crate::train::trainer::{slice_batch, step_log, Context, DeviceBatch, StepLog};
use metaseg_autograd::{no_grad, DiceOptions, Result, Var};
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

/// Stage 1: the teacher on the labeled cases, with the run's optimiser, in RUN_DIR/stage1.
pub fn stage1(config: &TrainConfig) -> FirstStage {
    FirstStage {
        dir: "stage1",
        config: TrainConfig {
            iterations: config.online_pl.stage1_iterations,
            ..config.clone()
        },
        stage: Stage::First,
        title: "stage 1: the teacher",
        iterations_key: "online_pl.stage1_iterations",
        all_cases: false,
    }
}

/// Online-pl's kind: stage 1 on labeled patches, stage 2 with unlabeled ones for the teacher.
pub struct Kind;

impl MethodKind for Kind {
    fn streams(&self, stage: Stage) -> Streams {
        Streams {
            unlabeled: stage == Stage::Main,
            unlabeled_labels: false,
        }
    }

    fn check(&self, config: &TrainConfig) -> std::result::Result<(), ConfigError> {
        config.online_pl.check().map_err(ConfigError::Invalid)
    }

    fn needs_unlabeled_cases(&self) -> bool {
        true
    }

    fn first_stage(&self, config: &TrainConfig) -> Option<FirstStage> {
        Some(stage1(config))
    }

    fn build<B: NetBackend>(&self, setup: &Setup<'_, B>) -> Result<Box<dyn Training<B>>> {
        let copy = setup.student.clone();
        Ok(Box::new(OnlinePl {
            teacher: (setup.stage == Stage::Main).then(|| copy.clone()),
            momentum: copy,
        }))
    }
}

/// Online-pl's networks beside the student: the teacher of its pseudo-labels (stage 2 only) and
/// the momentum copy, which is what the method is evaluated by.
pub struct OnlinePl<B: NetBackend> {
    pub teacher: Option<Weights<B>>,
    pub momentum: Weights<B>,
}

impl<B: NetBackend> Training<B> for OnlinePl<B> {
    /// One iteration of either stage: stage 1 has no teacher (Dice on the labeled patches), stage
    /// 2 adds beta Dice to the teacher's probabilities on the unlabeled ones; then the update, the
    /// momentum copy's EMA and (stage 2, online) the teacher's.
    fn step(
        &mut self,
        cx: &Context<'_>,
        student: &mut Learner<B>,
        batch: &DeviceBatch<B>,
        t: u64,
    ) -> Result<StepLog> {
        let c = &cx.config.online_pl;
        let out = student.weights.run(cx.net, &batch.x, cx.train_mode(t))?;
        let labeled = dice(&slice_batch(&out.logits, 0, batch.labeled)?, &batch.y)?;
        let mut terms = vec![("dice", labeled.clone())];
        let mut total = labeled;
        if let Some(teacher) = &self.teacher {
            let unlabeled = batch.x.shape().dims()[0] - batch.labeled;
            let x_u = slice_batch(&batch.x, batch.labeled, unlabeled)?;
            let probs = no_grad(|| {
                teacher
                    .run(cx.net, &x_u, Mode::Eval)?
                    .logits
                    .softmax_channels()
            })?
            .detach();
            let student_u = slice_batch(&out.logits, batch.labeled, unlabeled)?;
            let pseudo = dice(&student_u, &probs)?;
            total = total.add(&pseudo.scale(c.beta)?)?;
            terms.push(("dice_unlabeled", pseudo));
        }
        let lr = cx.lr(t);
        student.descend(&total, &out.batch_stats, cx.config.optimizer.clip, lr)?;
        let stage2 = self.teacher.is_some();
        let m = if stage2 {
            c.student_momentum
        } else {
            c.teacher_momentum
        };
        self.momentum.follow(&student.weights, m)?;
        terms.insert(0, ("loss", total));
        if let Some(teacher) = self.teacher.as_mut() {
            let before = teacher.params.clone();
            // Offline, the change is measured too (it is 0): the log shows the teacher is frozen.
            if c.online {
                teacher.follow(&student.weights, c.teacher_ema)?;
            }
            terms.push(("teacher_change", change_norm(&before, &teacher.params)?));
        }
        step_log(&terms, lr)
    }

    fn evaluated<'a>(&'a self, _student: &'a Weights<B>) -> &'a Weights<B> {
        &self.momentum
    }

    fn save(&self, parts: &mut Parts) -> run::Result<()> {
        if let Some(teacher) = &self.teacher {
            parts.put_weights("teacher", teacher)?;
        }
        parts.put_weights("momentum", &self.momentum)
    }

    fn networks(&mut self) -> Vec<(&'static str, Guarded<'_, B>)> {
        let mut networks = vec![("momentum", Guarded::Weights(&self.momentum))];
        if let Some(teacher) = &self.teacher {
            networks.insert(0, ("teacher", Guarded::Weights(teacher)));
        }
        networks
    }

    fn load(&mut self, backend: &B, parts: &Parts) -> run::Result<()> {
        if let Some(teacher) = &self.teacher {
            self.teacher = Some(parts.weights("teacher", teacher, backend)?);
        }
        self.momentum = parts.weights("momentum", &self.momentum, backend)?;
        Ok(())
    }

    /// Stage 2 from stage 1 (see the top). Resuming replaces all of it anyway.
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
        let c = &cx.config.online_pl;
        let stage1 = stage1(cx.config).restore(run.backend, run.channels(), run.paths)?;
        let first: &OnlinePl<B> = stage1.state().expect("stage 1 is online-pl's");
        self.teacher = Some(match c.teacher_start.as_str() {
            "teacher" => stage1.student.weights.clone(),
            _ => first.momentum.clone(),
        });
        if c.student_init == "stage1" {
            student.weights = stage1.student.weights.clone();
        }
        self.momentum = student.weights.clone();
        Ok(None)
    }
}

/// Softmax Dice over the foreground classes of logits against (soft) targets.
fn dice<B: NetBackend>(logits: &Var<B>, target: &Var<B>) -> Result<Var<B>> {
    logits.softmax_dice(
        target,
        DiceOptions {
            include_background: false,
            ..DiceOptions::default()
        },
    )
}

/// The L2 norm of the change from `before` to `after`, over every parameter.
fn change_norm<B: NetBackend>(before: &ParamStore<B>, after: &ParamStore<B>) -> Result<Var<B>> {
    let backend = before.values()[0].backend();
    let a = Var::constant(backend, before.flat()?);
    let b = Var::constant(backend, after.flat()?);
    b.sub(&a)?.square()?.sum()?.sqrt()
}
