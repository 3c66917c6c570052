//! A training run: its data ([`data`]), the loop over iterations with its log, validation,
//! checkpoints and the hooks methods and checks attach to ([`train_loop`]), its figures
//! ([`score`]), and the stages of a method ([`train`]): a first stage in a subdirectory when the
//! method has one, then the main stage in the run's directory, started from what the first left,
//! unless the first stage's network predicts no foreground ([`first_stage`]).
//!
//! Resumption: `resume` continues from the last checkpoint exactly as an uninterrupted run
//! would. In a two-stage method, once the main stage has a checkpoint `--resume` continues it;
//! before that, it continues the first stage (a finished first stage resumes with nothing left to
//! do) and then starts the main stage. A run with no checkpoint of either stage has nothing to
//! resume and starts from the beginning: so `--resume` continues a comparison whose later runs
//! had not begun. `stop_after` counts the first stage's iterations first.

mod data;
pub mod first_stage;
pub mod guard;
mod score;
mod train_loop;

pub use data::{device_batch, load_data, normalised, RunData};
pub use score::{predict_case, predict_with, score, test_results, validation_dice};
pub use train_loop::train_from;

pub use super::checkpoint::parts::{load_checkpoint, save_checkpoint};
use super::checkpoint::{self, CheckpointError};
use super::config::TrainConfig;
use super::methods::{require_unlabeled, FirstStage, Stage};
use super::trainer::{Context, Trainer};
use crate::nn::NetBackend;
use indicatif::ProgressBar;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Compute(#[from] metaseg_autograd::Error),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the {quantity} became {value} at iteration {step}; stopped. {kept}. Train again with a \
         lower optimizer.lr or with optimizer.clip"
    )]
    NonFinite {
        /// The iteration, counted from 1 as the log counts them.
        step: u64,
        /// What became non-finite: the loss, or a parameter tensor and its element.
        quantity: String,
        value: f64,
        /// Which checkpoint is the last good one, if any (from [`kept_checkpoint`]).
        kept: String,
    },
    #[error("--resume: {0}")]
    Resume(String),
    #[error(
        "{stage} ended after {iterations} iterations predicting foreground at {predicted:.3} % of \
         the voxels of its {cases} labeled cases, against {labeled:.3} % in their labels: the \
         main stage would start from a network that sees only background. Stopped; raise {key} \
         (or optimizer.lr) and start the run again"
    )]
    NoForeground {
        stage: String,
        iterations: u64,
        cases: usize,
        predicted: f64,
        labeled: f64,
        key: &'static str,
    },
}

pub type Result<T> = std::result::Result<T, RunError>;

/// Where a run writes: its resolved configuration, log, checkpoint and summary.
pub struct RunPaths {
    pub dir: PathBuf,
}

impl RunPaths {
    pub fn log(&self) -> PathBuf {
        self.dir.join("log.jsonl")
    }
    pub fn checkpoint(&self) -> PathBuf {
        self.dir.join("checkpoint")
    }
    /// The checkpoint of the best validation (`log.keep = "best_validation"`).
    pub fn best(&self) -> PathBuf {
        self.dir.join("best")
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.toml")
    }
    /// The paths of a run kept in the subdirectory `name` (a first stage's).
    pub fn sub(&self, name: &str) -> RunPaths {
        RunPaths {
            dir: self.dir.join(name),
        }
    }
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RunError + '_ {
    move |source| RunError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How a run is carried out (not part of its configuration).
#[derive(Clone, Copy, Debug, Default)]
pub struct RunOptions {
    /// Continue from the checkpoint in the run's directory.
    pub resume: bool,
    pub progress: bool,
    /// Stop (with a checkpoint) after this many iterations, as an interruption would.
    pub stop_after: Option<u64>,
}

/// What a finished run reports.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub final_loss: f64,
    pub validation_dice: Option<f64>,
    pub seconds: f64,
    /// Iterations this call ran, and their time alone (no validation or checkpoints).
    pub iterations: u64,
    pub step_seconds: f64,
    /// The test cases' label maps at the last iteration, when it was validated: the test figures
    /// reuse them rather than predict every case again.
    pub final_predictions: Option<Vec<Vec<u8>>>,
    /// The best validation so far, when the run keeps the best (`log.keep`).
    pub best: Option<Best>,
}

/// A validation that selected the kept network: its iteration (counted from 1) and Dice.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Best {
    pub step: u64,
    pub dice: f64,
}

impl Summary {
    /// Before any iteration of this call (all of a finished run resumed).
    pub fn empty() -> Summary {
        Summary {
            final_loss: f64::NAN,
            validation_dice: None,
            seconds: 0.0,
            iterations: 0,
            step_seconds: 0.0,
            final_predictions: None,
            best: None,
        }
    }

    /// This summary after `before`, a first stage run by the same call: times and iterations
    /// added, the rest this one's.
    fn after(self, before: Summary) -> Summary {
        Summary {
            seconds: before.seconds + self.seconds,
            iterations: before.iterations + self.iterations,
            step_seconds: before.step_seconds + self.step_seconds,
            ..self
        }
    }
}

/// What a method's hooks see of the run: the device, the run's data and directory, its options,
/// and where to say things.
pub struct RunContext<'a, B: NetBackend> {
    pub backend: &'a B,
    pub data: &'a RunData,
    pub paths: &'a RunPaths,
    pub options: RunOptions,
    bar: ProgressBar,
}

impl<'a, B: NetBackend> RunContext<'a, B> {
    fn new(
        backend: &'a B,
        data: &'a RunData,
        paths: &'a RunPaths,
        options: RunOptions,
        bar: ProgressBar,
    ) -> Self {
        RunContext {
            backend,
            data,
            paths,
            options,
            bar,
        }
    }

    /// A line on stderr when the run shows its progress (above the progress bar).
    pub fn say(&self, message: String) {
        if self.options.progress {
            self.bar.suspend(|| eprintln!("{message}"));
        }
    }

    /// The number of image channels of the run's cases.
    pub fn channels(&self) -> usize {
        self.data.labeled[0].image.channels
    }
}

/// Trains the configuration's method to its number of iterations, writing into `paths.dir`: its
/// first stage if it has one, then its main stage (see the top).
/// Which checkpoint at `stem` a stopped run leaves as its last good one, as a sentence.
pub fn kept_checkpoint(stem: &Path) -> String {
    match checkpoint::load(stem) {
        Ok((_, sidecar)) => format!(
            "The last good checkpoint ({}, step {}) is kept",
            checkpoint::paths(stem).0.display(),
            sidecar.step
        ),
        Err(_) => "No good checkpoint had been written".to_string(),
    }
}

pub fn train<B: NetBackend>(
    backend: &B,
    config: &TrainConfig,
    data: &RunData,
    paths: &RunPaths,
    options: RunOptions,
) -> Result<Summary> {
    let kind = config.method.kind();
    if kind.needs_unlabeled_cases() {
        require_unlabeled(data, config.method)?;
    }
    let first = kind.first_stage(config);
    let started = has_checkpoint(paths, first.as_ref());
    if options.resume && !started && options.progress {
        eprintln!(
            "nothing to resume in {}: starting the run",
            paths.dir.display()
        );
    }
    let options = RunOptions {
        resume: options.resume && started,
        ..options
    };
    if let (true, Some(n)) = (options.resume, options.stop_after) {
        let done = iterations_done(paths, first.as_ref());
        if n <= done {
            return Err(RunError::Resume(format!(
                "--stop-after {n}: the run's checkpoint is already at iteration {done}, so there \
                 is nothing to do; give a larger N, or none to train to the end"
            )));
        }
    }
    let Some(first) = first else {
        return train_stage(backend, config, Stage::Main, data, paths, options);
    };
    let main_started = options.resume && checkpoint::paths(&paths.checkpoint()).1.exists();
    let mut before = None;
    if !main_started {
        if options.progress {
            eprintln!("{}", first.message(data, paths));
        }
        let first_paths = first.paths(paths);
        let summary = train_stage(
            backend,
            &first.config,
            first.stage,
            data,
            &first_paths,
            options,
        )?;
        if options
            .stop_after
            .is_some_and(|s| s <= first.config.iterations)
        {
            return Ok(summary);
        }
        before = Some(summary);
        first_stage::check(backend, &first, data, paths)?;
    }
    let main_options = RunOptions {
        resume: main_started,
        stop_after: options
            .stop_after
            .map(|s| s.saturating_sub(first.config.iterations)),
        ..options
    };
    let main = train_stage(backend, config, Stage::Main, data, paths, main_options)?;
    Ok(match before {
        Some(first) => main.after(first),
        None => main,
    })
}

/// Whether either stage of the run has written a checkpoint.
fn has_checkpoint(paths: &RunPaths, first: Option<&FirstStage>) -> bool {
    let written = |stem: &Path| checkpoint::paths(stem).1.exists();
    written(&paths.checkpoint()) || first.is_some_and(|f| written(&f.paths(paths).checkpoint()))
}

/// The iterations a run's checkpoints have done, counted as `--stop-after` counts them: the first
/// stage's, then the main stage's.
fn iterations_done(paths: &RunPaths, first: Option<&FirstStage>) -> u64 {
    let step = |stem: &Path| {
        let json = std::fs::read(checkpoint::paths(stem).1).ok()?;
        serde_json::from_slice::<checkpoint::Sidecar>(&json)
            .ok()
            .map(|s| s.step)
    };
    match (step(&paths.checkpoint()), first) {
        (Some(main), Some(first)) => first.config.iterations + main,
        (Some(main), None) => main,
        (None, Some(first)) => step(&first.paths(paths).checkpoint()).unwrap_or(0),
        (None, None) => 0,
    }
}

/// One stage's run: its trainer, started by the method when it is the main stage, through the
/// loop.
fn train_stage<B: NetBackend>(
    backend: &B,
    config: &TrainConfig,
    stage: Stage,
    data: &RunData,
    paths: &RunPaths,
    options: RunOptions,
) -> Result<Summary> {
    let channels = data.labeled[0].image.channels;
    let mut trainer = Trainer::at(backend, config, stage, channels)?;
    let own_data = if stage == Stage::Main {
        let run = RunContext::new(backend, data, paths, options, ProgressBar::hidden());
        let cx = Context {
            config: &trainer.config,
            net: &trainer.net,
        };
        trainer
            .method
            .start(&cx, &mut trainer.student, &run, options.resume)?
    } else {
        None
    };
    train_from(
        backend,
        trainer,
        own_data.as_ref().unwrap_or(data),
        paths,
        options,
    )
}

/// The trainer of a finished (or interrupted) run of `stage`, restored from the checkpoint it
/// keeps ([`kept`]).
pub fn restore_trainer<B: NetBackend>(
    backend: &B,
    config: &TrainConfig,
    stage: Stage,
    channels: usize,
    paths: &RunPaths,
) -> Result<Trainer<B>> {
    let mut trainer = Trainer::at(backend, config, stage, channels)?;
    load_checkpoint(backend, &mut trainer, &kept(config, paths))?;
    Ok(trainer)
}

/// The checkpoint a finished stage hands on and is tested with: its best validation's when it
/// keeps the best and has one (a stage that never validates, as IDEAL's pre-training, has none),
/// else its last.
pub fn kept(config: &TrainConfig, paths: &RunPaths) -> PathBuf {
    let best = paths.best();
    if config.log.keeps_best() && checkpoint::paths(&best).1.exists() {
        best
    } else {
        paths.checkpoint()
    }
}
