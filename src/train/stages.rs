//! Methods that train in two stages, each a run of its own with the same run loop, log and
//! checkpoints: a first stage in a subdirectory of the run (MLB-Seg's supervised stage 0,
//! online pseudo-labeling's teacher), then the main stage in the run's directory, started from
//! what the first stage left.
//!
//! Resumption: once the main stage has a checkpoint, `--resume` continues it; before that, it
//! continues the first stage (a finished first stage resumes with nothing left to do) and then
//! starts the main stage. `stop_after` counts the first stage's iterations first.

use super::checkpoint;
use super::config::TrainConfig;
use super::run::{self, RunData, RunError, RunOptions, RunPaths, Summary};
use crate::data::DataError;
use crate::nn::NetBackend;

/// The first stage: its run's configuration and directory, and what to say when it starts.
pub struct FirstStage<'a> {
    pub config: &'a TrainConfig,
    pub paths: &'a RunPaths,
    pub message: String,
}

/// Runs the first stage unless the main stage has a checkpoint to resume, then
/// `main(main_started, main_options)`. The summary is the main stage's, with the iterations and
/// times of the first stage added when this call ran it.
pub fn train<B: NetBackend>(
    backend: &B,
    data: &RunData,
    paths: &RunPaths,
    options: RunOptions,
    first: FirstStage,
    main: impl FnOnce(bool, RunOptions) -> run::Result<Summary>,
) -> run::Result<Summary> {
    let main_started = options.resume && checkpoint::paths(&paths.checkpoint()).1.exists();
    let mut before = None;
    if !main_started {
        say(options, first.message);
        let summary = run::train(backend, first.config, data, first.paths, options)?;
        if options
            .stop_after
            .is_some_and(|s| s <= first.config.iterations)
        {
            return Ok(summary);
        }
        before = Some(summary);
    }
    let main_options = RunOptions {
        resume: main_started,
        stop_after: options
            .stop_after
            .map(|s| s.saturating_sub(first.config.iterations)),
        ..options
    };
    let main = main(main_started, main_options)?;
    Ok(match before {
        Some(s0) => Summary {
            seconds: s0.seconds + main.seconds,
            iterations: s0.iterations + main.iterations,
            step_seconds: s0.step_seconds + main.step_seconds,
            ..main
        },
        None => main,
    })
}

/// The configuration of a first stage: `config` with its own method and length.
pub fn stage_config(config: &TrainConfig, method: &str, iterations: u64) -> TrainConfig {
    TrainConfig {
        method: method.into(),
        iterations,
        ..config.clone()
    }
}

/// Refuses a split without unlabeled training cases: `method` learns from them.
pub fn require_unlabeled(data: &RunData, method: &str) -> run::Result<()> {
    if data.unlabeled.is_empty() {
        let reason = format!("{method} needs unlabeled training cases: the split has none");
        return Err(RunError::Data(DataError::invalid("split", reason)));
    }
    Ok(())
}

/// A line on stderr when the run shows its progress.
pub fn say(options: RunOptions, message: String) {
    if options.progress {
        eprintln!("{message}");
    }
}
