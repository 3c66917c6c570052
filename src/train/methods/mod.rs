//! The training methods and their one registry.
//!
//! A method is a file here with two types. Its kind (a unit struct implementing [`MethodKind`])
//! says what the run needs to know before any network exists: the heads its network needs, which
//! patches its batches hold, its first stage if it has one, what its configuration section must
//! satisfy. Its state (implementing [`Training`]) owns whatever it keeps beside the student (a
//! teacher, momentum copies, a second network) and carries its step, its checkpoint parts, the
//! network it is evaluated by and its hooks into the run. The run loop, the log, checkpoints and
//! scoring ([`super::run`]) are written once and call into these.
//!
//! Adding a method: its file, and one line in the `registry!` table below (plus its `[section]`
//! field in [`TrainConfig`] if it has settings).

pub mod dtml;
pub mod ideal;
pub mod local_contrastive;
pub mod mean_teacher;
pub mod mlb_seg;
pub mod online_pl;
pub mod supervised;

use super::checkpoint::Parts;
use super::config::{ConfigError, TrainConfig};
use super::network::{Guarded, Heads, Learner, Net, Weights};
use super::run::{self, RunContext, RunData, RunPaths};
use super::trainer::{Context, DeviceBatch, StepLog, Trainer};
use crate::data::DataError;
use crate::nn::NetBackend;
use metaseg_autograd::Result;
use serde::{Deserialize, Serialize};
use std::any::Any;
use std::fmt;

/// Which run of a method a network belongs to. A two-stage method first trains in a run of its
/// own ([`FirstStage`], in a subdirectory), then its main stage starts from what that left.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// The run that comes before the main stage (online-pl's teacher, IDEAL's pre-training).
    First,
    /// The method's own stage, in the run's directory.
    #[default]
    Main,
}

/// A method's first stage: a run of its own with the shared loop, log and checkpoints, in
/// RUN_DIR/`dir`, before the main stage. Its configuration is the run's with its own method and
/// length (MLB-Seg's stage 0 is a supervised run; online-pl's is online-pl's first stage).
pub struct FirstStage {
    pub dir: &'static str,
    pub config: TrainConfig,
    pub stage: Stage,
    /// What it trains, for the line said when it starts ("stage 0: supervised").
    pub title: &'static str,
    /// The configuration key of its length (named when it ends predicting no foreground).
    pub iterations_key: &'static str,
    /// Whether it trains on every training case (else on the labeled ones).
    pub all_cases: bool,
}

impl FirstStage {
    pub fn paths(&self, run: &RunPaths) -> RunPaths {
        run.sub(self.dir)
    }

    /// The line said when it starts.
    pub fn message(&self, data: &RunData, run: &RunPaths) -> String {
        let (cases, which) = if self.all_cases {
            (data.labeled.len() + data.unlabeled.len(), "training")
        } else {
            (data.labeled.len(), "labeled")
        };
        format!(
            "{} on {cases} {which} cases for {} iterations, in {}",
            self.title,
            self.config.iterations,
            self.paths(run).dir.display()
        )
    }

    /// The network it left in its directory under `run`.
    pub fn restore<B: NetBackend>(
        &self,
        backend: &B,
        channels: usize,
        run: &RunPaths,
    ) -> run::Result<Trainer<B>> {
        run::restore_trainer(
            backend,
            &self.config,
            self.stage,
            channels,
            &self.paths(run),
        )
    }
}

/// The patches a method's batches hold besides the labeled ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Streams {
    /// Unlabeled patches (`batch.unlabeled` of them).
    pub unlabeled: bool,
    /// With labels: MLB-Seg's initial labels, the local contrastive method's pseudo-labels.
    pub unlabeled_labels: bool,
}

/// What the run knows of a method before any network exists. Object-safe but for `build`, which
/// the registry calls on the concrete type.
pub trait MethodKind: Sync {
    /// The patches of its batches at `stage`.
    fn streams(&self, stage: Stage) -> Streams;

    /// The heads its network needs at `stage`.
    fn heads(&self, _config: &TrainConfig, _stage: Stage) -> Heads {
        Heads::default()
    }

    /// What the types of its configuration section cannot check; every message names its key.
    fn check(&self, _config: &TrainConfig) -> std::result::Result<(), ConfigError> {
        Ok(())
    }

    /// Whether it trains on every training case with its label (the ceiling of the tables).
    fn labels_every_case(&self) -> bool {
        false
    }

    /// Whether it needs unlabeled training cases in the split (it learns from them, or from their
    /// pseudo-labels).
    fn needs_unlabeled_cases(&self) -> bool {
        false
    }

    /// The run before its main stage, if it has one.
    fn first_stage(&self, _config: &TrainConfig) -> Option<FirstStage> {
        None
    }

    /// Its state at `stage` beside a new student.
    fn build<B: NetBackend>(&self, setup: &Setup<'_, B>) -> Result<Box<dyn Training<B>>>
    where
        Self: Sized;
}

/// What a method's state is built from: the run's configuration and stage, its network and the
/// new student (a teacher starts as a copy of it).
pub struct Setup<'a, B: NetBackend> {
    pub backend: &'a B,
    pub config: &'a TrainConfig,
    pub stage: Stage,
    pub net: &'a Net,
    pub student: &'a Weights<B>,
}

/// A method's state during a run, with its step and its hooks into the run loop (which calls
/// them in this order: `start` once, then per iteration `before_iteration`, `step`,
/// `at_validation` at validation steps, `checkpoint_at`).
pub trait Training<B: NetBackend>: Any {
    /// One iteration at `t` over `batch`: the losses, every update (the student's through
    /// [`Learner::descend`] or [`Learner::update`], its own networks'), and the scalars to log,
    /// the total loss first (see [`super::trainer::step_log`]).
    fn step(
        &mut self,
        cx: &Context<'_>,
        student: &mut Learner<B>,
        batch: &DeviceBatch<B>,
        t: u64,
    ) -> Result<StepLog>;

    /// The network validated, tested and predicting: the student unless the method keeps a
    /// better one to read.
    fn evaluated<'a>(&'a self, student: &'a Weights<B>) -> &'a Weights<B> {
        student
    }

    /// Whether the run's validation reads this network (IDEAL's pre-training trains no decoder).
    fn validates(&self) -> bool {
        true
    }

    /// Adds what it keeps beside the student to a checkpoint.
    fn save(&self, _parts: &mut Parts) -> run::Result<()> {
        Ok(())
    }

    /// Restores what [`Training::save`] wrote.
    fn load(&mut self, _backend: &B, _parts: &Parts) -> run::Result<()> {
        Ok(())
    }

    /// The networks it keeps beside the student, under the names [`Training::save`] gives them,
    /// for the guard after every step: every one it saves.
    fn networks(&mut self) -> Vec<(&'static str, Guarded<'_, B>)> {
        Vec::new()
    }

    /// Before the first iteration of the main stage (with `resuming`, the checkpoint replaces the
    /// networks afterwards): starts from what the first stage left, and returns the data the stage
    /// trains on if it is not the run's own (MLB-Seg's unlabeled cases with initial labels).
    fn start(
        &mut self,
        _cx: &Context<'_>,
        _student: &mut Learner<B>,
        _run: &RunContext<'_, B>,
        _resuming: bool,
    ) -> run::Result<Option<RunData>> {
        Ok(None)
    }

    /// Before iteration `t` (`first`: the first of this call, maybe resumed): new data for the run
    /// from here on, if any (the local contrastive method's pseudo-label rounds).
    fn before_iteration(
        &self,
        _trainer: &Trainer<B>,
        _run: &RunContext<'_, B>,
        _t: u64,
        _first: bool,
    ) -> run::Result<Option<RunData>> {
        Ok(None)
    }

    /// At every validation step `done` (also without test cases), with the iteration's data and
    /// batch (MLB-Seg writes weight maps).
    fn at_validation(
        &self,
        _trainer: &Trainer<B>,
        _run: &RunContext<'_, B>,
        _data: &RunData,
        _batch: &DeviceBatch<B>,
        _done: u64,
    ) -> run::Result<()> {
        Ok(())
    }

    /// Whether to write a checkpoint after `done` iterations besides the configured ones (the
    /// local contrastive method's round boundaries).
    fn checkpoint_at(&self, _config: &TrainConfig, _done: u64) -> bool {
        false
    }
}

/// Refuses a split without unlabeled training cases for `method`.
pub fn require_unlabeled(data: &RunData, method: Method) -> run::Result<()> {
    if data.unlabeled.is_empty() {
        let reason = format!("{method} needs unlabeled training cases: the split has none");
        return Err(run::RunError::Data(DataError::invalid("split", reason)));
    }
    Ok(())
}

/// The registry: one line per method, its variant, its name (in configurations, checkpoints and
/// on the command line) and its kind.
macro_rules! registry {
    ($($(#[$doc:meta])* $variant:ident $name:literal => $kind:expr,)*) => {
        /// A training method (METHODS.md).
        #[derive(
            Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
        )]
        pub enum Method {
            $($(#[$doc])* #[serde(rename = $name)] #[value(name = $name)] $variant,)*
        }

        impl Method {
            /// Every method, in the registry's order.
            pub const ALL: &'static [Method] = &[$(Method::$variant),*];

            /// Its name, as configurations and the command line spell it.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Method::$variant => $name,)*
                }
            }

            /// What the run knows of the method before any network exists.
            pub fn kind(self) -> &'static dyn MethodKind {
                match self {
                    $(Method::$variant => &$kind,)*
                }
            }

            /// The method's state at the setup's stage.
            pub fn build<B: NetBackend>(self, setup: &Setup<'_, B>) -> Result<Box<dyn Training<B>>> {
                match self {
                    $(Method::$variant => $kind.build(setup),)*
                }
            }
        }
    };
}

registry! {
    /// 0.5 (CE + Dice) on the labeled patches: the floor of the tables.
    Supervised "supervised" => supervised::Kind { full: false },
    /// The supervised step with every training case labeled: the ceiling.
    Full "full" => supervised::Kind { full: true },
    /// Supervised plus a ramped consistency to an EMA teacher.
    MeanTeacher "mean-teacher" => mean_teacher::Kind,
    /// Meta-learned weights of initial and enhanced labels (the centre of the project).
    MlbSeg "mlb-seg" => mlb_seg::Kind,
    /// Online pseudo-labeling with momentum teachers.
    OnlinePl "online-pl" => online_pl::Kind,
    /// Dual-task mutual learning: segmentation and signed-distance networks.
    Dtml "dtml" => dtml::Kind,
    /// The local contrastive loss with pseudo-label rounds.
    LocalContrastive "local-contrastive" => local_contrastive::Kind,
    /// Dense contrastive pre-training, then two decoders supervising each other.
    Ideal "ideal" => ideal::Kind,
}

impl Method {
    /// Format-1 checkpoints (written before stages were values) named two first stages as methods
    /// of their own; they read as these methods' first stages.
    pub const FORMAT_1_STAGES: [(&'static str, Method); 2] = [
        ("online-pl-teacher", Method::OnlinePl),
        ("ideal-pretrain", Method::Ideal),
    ];
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn each_method_has_one_name_in_configurations_checkpoints_and_on_the_command_line() {
        assert_eq!(Method::ALL.len(), Method::value_variants().len());
        for &method in Method::ALL {
            let name = method.name();
            let json = serde_json::to_value(method).unwrap();
            assert_eq!(json, serde_json::Value::String(name.into()));
            assert_eq!(serde_json::from_value::<Method>(json).unwrap(), method);
            assert_eq!(Method::from_str(name, false), Ok(method));
            assert_eq!(method.to_string(), name);
        }
        // The format-1 stage names are no method's: they only read through the conversion.
        for (old, _) in Method::FORMAT_1_STAGES {
            assert!(
                serde_json::from_value::<Method>(old.into()).is_err(),
                "{old}"
            );
        }
    }
}
