//! The loop over iterations, written once for every method: per iteration the method's
//! `before_iteration` hook, the batch, the method's step, the guard over the finished iteration
//! ([`super::guard`]), a line of the JSON-lines log, validation (with the method's `at_validation`
//! hook) and checkpoints (atomic; a resumed run continues exactly as an uninterrupted one would).
//! A failed check stops the run before anything of its iteration is written, so the last
//! checkpoint is the last good one.

use super::{
    device_batch, guard, io, kept_checkpoint, load_checkpoint, save_checkpoint, validation_dice,
    Best, Result, RunContext, RunData, RunError, RunOptions, RunPaths, Summary,
};
use crate::nn::NetBackend;
use crate::train::checkpoint::parts::Change;
use crate::train::checkpoint::{self, CheckpointError};
use crate::train::trainer::{StepLog, Trainer};
use indicatif::{ProgressBar, ProgressStyle};
use std::borrow::Cow;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// Saves the checkpoint of iteration `done`; a non-finite parameter (or other tensor) stops the
/// run as a non-finite loss does, with the earlier checkpoint kept (the save refuses it).
fn save_checked<B: NetBackend>(trainer: &Trainer<B>, done: u64, stem: &Path) -> Result<()> {
    match save_checkpoint(trainer, done, stem) {
        Err(RunError::Checkpoint(CheckpointError::NonFinite {
            tensor,
            index,
            value,
            ..
        })) => Err(RunError::NonFinite {
            step: done,
            quantity: format!("tensor '{tensor}' (element {index}) of the checkpoint"),
            value: value.into(),
            kept: kept_checkpoint(stem),
        }),
        other => other,
    }
}

/// Trains `trainer` (its configuration's run) from its state, or from the run's checkpoint with
/// `options.resume`, on `data` (which the method's hooks may replace as the run goes). A new run
/// that fails before its first step takes back what it wrote (its directory too, if it made it).
pub fn train_from<B: NetBackend>(
    backend: &B,
    mut trainer: Trainer<B>,
    data: &RunData,
    paths: &RunPaths,
    options: RunOptions,
) -> Result<Summary> {
    let created = !paths.dir.exists();
    let (start, log) = prepare(backend, &mut trainer, paths, options)?;
    let bar = progress_bar(options.progress, trainer.config.iterations, start);
    let run = RunContext::new(backend, data, paths, options, bar);
    let mut summary = Summary::empty();
    if options.resume && trainer.config.log.keeps_best() {
        summary.best = resumed_best(paths, start)?;
    }
    let result = iterate(&run, &mut trainer, start, log, &mut summary);
    if result.is_err() && summary.iterations == 0 && !options.resume {
        // Failed before its first step: the configuration and empty log it wrote say nothing.
        let _ = std::fs::remove_file(paths.config());
        let _ = std::fs::remove_file(paths.log());
        if created {
            let _ = std::fs::remove_dir(&paths.dir);
        }
    }
    result.map(|()| summary)
}

/// The iterations of `run` from `start` on, counted and timed in `summary` as they finish.
fn iterate<B: NetBackend>(
    run: &RunContext<'_, B>,
    trainer: &mut Trainer<B>,
    start: u64,
    mut log: std::fs::File,
    summary: &mut Summary,
) -> Result<()> {
    let (backend, data, paths, options) = (run.backend, run.data, run.paths, run.options);
    let config = trainer.config.clone();
    let log_path = paths.log();
    let bar = run.bar.clone();
    let mut current = Cow::Borrowed(data);
    let began = Instant::now();
    for t in start..config.iterations {
        if let Some(next) = trainer
            .method
            .before_iteration(trainer, run, t, t == start)?
        {
            current = Cow::Owned(next);
        }
        let step_began = Instant::now();
        let batch = device_batch(backend, trainer, &current, t)?;
        let terms = trainer.step(&batch, t)?;
        let checked = guard::check(trainer, t, &terms, &paths.checkpoint());
        summary.step_seconds += step_began.elapsed().as_secs_f64();
        summary.iterations += 1;
        if let Err(e) = checked {
            bar.abandon();
            return Err(e);
        }
        let done = t + 1;
        let mut line = log_line(done, &terms, began.elapsed().as_secs_f64());
        let last = done == config.iterations;
        let validating = done % config.log.validate_every.max(1) == 0 || last;
        let mut improved = false;
        if validating {
            let cases = current.validated();
            if trainer.method.validates() && !cases.is_empty() {
                let (dice, predictions) = validation_dice(backend, trainer, cases)?;
                line.insert("validation_dice".into(), dice.into());
                summary.validation_dice = Some(dice);
                // Reused as the test figures only when they are the test cases' of this network.
                let tested = current.validation.is_empty() && !config.log.keeps_best();
                summary.final_predictions = (last && tested).then_some(predictions);
                improved = config.log.keeps_best() && summary.best.is_none_or(|b| dice > b.dice);
                if improved {
                    summary.best = Some(Best { step: done, dice });
                    line.insert("best".into(), true.into());
                }
            }
            trainer
                .method
                .at_validation(trainer, run, &current, &batch, done)?;
        }
        writeln!(log, "{}", serde_json::Value::Object(line)).map_err(io(&log_path))?;
        let stop = options.stop_after == Some(done);
        let due = done % config.log.checkpoint_every.max(1) == 0 || last || stop;
        // Keeping the best: a checkpoint at every validation, so a resumed run never starts
        // before the best it has kept (the best is written after it: see `resumed_best`).
        let due = due || (validating && config.log.keeps_best());
        if due || trainer.method.checkpoint_at(&config, done) {
            if let Err(e) = save_checked(trainer, done, &paths.checkpoint()) {
                bar.abandon();
                return Err(e);
            }
        }
        if improved {
            if let Err(e) = save_checked(trainer, done, &paths.best()) {
                bar.abandon();
                return Err(e);
            }
        }
        let message: Vec<String> = terms.iter().map(|(n, v)| format!("{n} {v:.4}")).collect();
        bar.set_message(message.join(" "));
        bar.inc(1);
        summary.final_loss = terms[0].1;
        if stop {
            break;
        }
    }
    bar.finish();
    summary.seconds = began.elapsed().as_secs_f64();
    Ok(())
}

/// The run's directory with its configuration, the trainer restored from the checkpoint when
/// resuming, and the log opened for appending (truncated to the checkpoint's step, or new):
/// the step to start from and the log. Settings changed on resume are recorded in both: an
/// event line in the log, a comment line in config.toml (whose values are the new ones).
fn prepare<B: NetBackend>(
    backend: &B,
    trainer: &mut Trainer<B>,
    paths: &RunPaths,
    options: RunOptions,
) -> Result<(u64, std::fs::File)> {
    std::fs::create_dir_all(&paths.dir).map_err(io(&paths.dir))?;
    let (start, changes, mut history) = if options.resume {
        let restored = load_checkpoint(backend, trainer, &paths.checkpoint())?;
        truncate_log(&paths.log(), restored.step)?;
        let history = config_history(&paths.config(), restored.step);
        (restored.step, restored.changes, history)
    } else {
        let _ = std::fs::remove_file(paths.log());
        (0, Vec::new(), String::new())
    };
    if !changes.is_empty() {
        let said: Vec<String> = changes
            .iter()
            .map(|c| format!("{} {} -> {}", c.key, c.old, c.new))
            .collect();
        history.push_str(&format!(
            "# resumed at step {start} with {}\n",
            said.join(", ")
        ));
    }
    let config_text = toml::to_string_pretty(&trainer.config).expect("a configuration serialises");
    let config_path = paths.config();
    let text = format!("{history}{config_text}");
    let failed = |source| RunError::Io {
        path: config_path.clone(),
        source,
    };
    crate::atomic::write_with(&config_path, |f| f.write_all(text.as_bytes()), failed)?;
    let log_path = paths.log();
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io(&log_path))?;
    if !changes.is_empty() {
        writeln!(log, "{}", resume_event(start, &changes)).map_err(io(&log_path))?;
    }
    Ok((start, log))
}

/// The comment lines at the top of a run's config.toml: the changes of earlier resumes from
/// before `step` (a resume from `step` or later was abandoned when this one went back to `step`).
fn config_history(path: &Path, step: u64) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .take_while(|l| l.starts_with('#'))
        .filter(|l| {
            let at = l
                .strip_prefix("# resumed at step ")
                .and_then(|rest| rest.split(' ').next().and_then(|n| n.parse::<u64>().ok()));
            at.is_none_or(|at| at < step)
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The best validation of a run resumed at `start`, from its (truncated) log: the last line marked
/// `best`. The best checkpoint is written just after the checkpoint of the same iteration, so an
/// interruption between the two leaves that best only in the checkpoint resumed from: copied.
fn resumed_best(paths: &RunPaths, start: u64) -> Result<Option<Best>> {
    let text = std::fs::read_to_string(paths.log()).unwrap_or_default();
    let best = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["best"] == serde_json::Value::Bool(true))
        .filter_map(|v| {
            Some(Best {
                step: v["step"].as_u64()?,
                dice: v["validation_dice"].as_f64()?,
            })
        })
        .next_back();
    let Some(best) = best else {
        return Ok(None);
    };
    let kept_step = |stem: &Path| -> Option<u64> {
        let json = std::fs::read(checkpoint::paths(stem).1).ok()?;
        serde_json::from_slice::<checkpoint::Sidecar>(&json)
            .ok()
            .map(|s| s.step)
    };
    if kept_step(&paths.best()) != Some(best.step) && best.step == start {
        let (from, to) = (
            checkpoint::paths(&paths.checkpoint()),
            checkpoint::paths(&paths.best()),
        );
        for (a, b) in [(from.0, to.0), (from.1, to.1)] {
            std::fs::copy(&a, &b).map_err(io(&b))?;
        }
    }
    Ok(Some(best))
}

/// The log's line for a resume at `step` that changed settings:
/// `{"event": "resume", "step": N, "changed": {"optimizer.lr": {"old": .., "new": ..}}}`.
fn resume_event(step: u64, changes: &[Change]) -> serde_json::Value {
    let changed: serde_json::Map<String, serde_json::Value> = changes
        .iter()
        .map(|c| {
            let values = serde_json::json!({ "old": c.old, "new": c.new });
            (c.key.clone(), values)
        })
        .collect();
    serde_json::json!({ "event": "resume", "step": step, "changed": changed })
}

/// The log's line of iteration `done` (counted from 1): its terms and the wall time so far.
fn log_line(
    done: u64,
    terms: &StepLog,
    seconds: f64,
) -> serde_json::Map<String, serde_json::Value> {
    let mut line = serde_json::Map::new();
    line.insert("step".into(), done.into());
    for (name, v) in terms {
        line.insert((*name).into(), (*v).into());
    }
    line.insert("seconds".into(), seconds.into());
    line
}

fn progress_bar(show: bool, iterations: u64, start: u64) -> ProgressBar {
    let bar = if show {
        ProgressBar::new(iterations)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}, {per_sec}] {msg}",
        )
        .expect("a valid template"),
    );
    bar.set_position(start);
    bar
}

/// Keeps the log's lines of steps up to `step` (a resumed run rewrites what came after), and the
/// resume events from before `step` (one at `step` or later belongs to an abandoned attempt).
fn truncate_log(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|line| {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                return false;
            };
            let is_event = v["event"].is_string();
            v["step"]
                .as_u64()
                .is_some_and(|s| s < step || (s == step && !is_event))
        })
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    std::fs::write(path, out).map_err(io(path))
}
