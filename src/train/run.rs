//! A training run: the data of its configuration loaded and normalised, the loop over iterations
//! with a progress bar, a JSON-lines log of every step, periodic validation Dice, checkpoints
//! (atomic; `resume` continues from the last one exactly as an uninterrupted run would), and a stop
//! with a clear message at the first non-finite loss, keeping the last good checkpoint.

use super::augment::{warp_batch, RotateScale};
use super::batch::{sample, LoadedCase, Sampling};
use super::checkpoint::{self, HostTensor, Sidecar};
use super::compare::RunResult;
use super::config::TrainConfig;
use super::trainer::{DeviceBatch, Teacher, Trainer};
use crate::data::{self, preprocess, synthetic, Msd, SplitSpec, SyntheticConfig, Volume};
use crate::eval::inference::HostVolume;
use crate::eval::{argmax, metrics, predict_probabilities, SlidingWindow};
use crate::nn::{NetBackend, ParamStore};
use crate::optim::Optimizer;
use indicatif::{ProgressBar, ProgressStyle};
use metaseg_autograd::{Shape, Var, Warp};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Data(#[from] data::DataError),
    #[error(transparent)]
    Compute(#[from] metaseg_autograd::Error),
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the loss became {value} at iteration {step}; stopped. The last good checkpoint ({}) is \
         kept: lower optimizer.lr or enable optimizer.clip, then --resume",
        .checkpoint
    )]
    NonFinite {
        step: u64,
        value: f64,
        checkpoint: String,
    },
    #[error("--resume: {0}")]
    Resume(String),
}

pub type Result<T> = std::result::Result<T, RunError>;

/// The cases of a run, normalised (z-score per volume), in memory.
pub struct RunData {
    pub labeled: Vec<LoadedCase>,
    pub unlabeled: Vec<LoadedCase>,
    pub test: Vec<LoadedCase>,
}

/// A case as training sees it: the image z-scored per volume (each channel on its own), the label
/// rounded to class indices. Prediction prepares its inputs with this too.
pub fn normalised(name: String, mut image: Volume, label: Option<&Volume>) -> Result<LoadedCase> {
    preprocess::zscore(&mut image, preprocess::Clip::None)?;
    let label = label.map(|l| l.data.iter().map(|&v| v.round() as u8).collect());
    Ok(LoadedCase { name, image, label })
}

/// Loads the configuration's data: the embedded set, or an MSD folder with its split. `full`
/// labels every training case.
pub fn load_data(config: &TrainConfig) -> Result<RunData> {
    let d = &config.data;
    let full = config.method == "full";
    let cases = if d.source == "default" {
        let synth = SyntheticConfig {
            seed: config.seed,
            cases: d.cases,
            size: d.size,
            knobs: d.synthetic.clone(),
            ..SyntheticConfig::default()
        };
        let mut all = Vec::with_capacity(d.cases);
        for i in 0..d.cases {
            let c = synthetic::case(&synth, i)?;
            all.push(normalised(
                synthetic::case_name(i),
                c.image,
                Some(&c.label),
            )?);
        }
        if d.labeled + d.test > d.cases {
            return Err(RunError::Data(data::DataError::invalid(
                "split",
                format!(
                    "{} labeled + {} test of {} cases",
                    d.labeled, d.test, d.cases
                ),
            )));
        }
        let test = all.split_off(d.cases - d.test);
        let unlabeled = all.split_off(d.labeled);
        RunData {
            labeled: all,
            unlabeled,
            test,
        }
    } else {
        let msd = Msd::open(Path::new(&d.source))?;
        let spec = if d.split.is_empty() {
            SplitSpec::FirstN {
                labeled: d.labeled,
                test: Some(d.test),
            }
        } else {
            SplitSpec::File(PathBuf::from(&d.split))
        };
        // The ceiling trains on the unlabeled cases with their labels.
        let split = if full {
            msd.split_all_labeled(&spec)?
        } else {
            msd.split(&spec)?
        };
        let load = |cases: &[data::Case]| -> Result<Vec<LoadedCase>> {
            cases
                .iter()
                .map(|c| {
                    let (image, label) = msd.load(c)?;
                    normalised(c.name.clone(), image, label.as_ref())
                })
                .collect()
        };
        RunData {
            labeled: load(&split.labeled)?,
            unlabeled: load(&split.unlabeled)?,
            test: load(&split.test)?,
        }
    };
    if full {
        // The ceiling: the unlabeled cases with their labels (the embedded set has them all).
        let (mut labeled, unlabeled) = (cases.labeled, cases.unlabeled);
        if unlabeled.iter().any(|c| c.label.is_none()) {
            return Err(RunError::Resume(
                "method full needs labels for every training case".into(),
            ));
        }
        labeled.extend(unlabeled);
        return Ok(RunData {
            labeled,
            unlabeled: Vec::new(),
            test: cases.test,
        });
    }
    Ok(cases)
}

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

/// The label map of one case: sliding-window probabilities of the evaluated network (the student,
/// or its momentum copy: [`Trainer::evaluated`]) in eval mode (windows
/// of the training patch, overlapping by `log.stride_fraction`), then the argmax.
pub fn predict_case<B: NetBackend>(
    backend: &B,
    trainer: &Trainer<B>,
    case: &LoadedCase,
) -> Result<Vec<u8>> {
    let patch = trainer.config.batch.patch;
    let fraction = trainer.config.log.stride_fraction;
    let window = SlidingWindow::with_stride_fraction(patch, fraction);
    let volume = HostVolume {
        data: &case.image.data,
        channels: case.image.channels,
        dims: case.image.dims,
    };
    let (params, stats) = trainer.evaluated();
    let probs = predict_probabilities(backend, &trainer.net, params, stats, &volume, window)?;
    Ok(argmax(&probs, trainer.config.data.classes))
}

/// Mean foreground Dice over the cases (class >= 1 against background), and the predictions.
pub fn validation_dice<B: NetBackend>(
    backend: &B,
    trainer: &Trainer<B>,
    cases: &[LoadedCase],
) -> Result<(f64, Vec<Vec<u8>>)> {
    let mut total = 0.0;
    let mut predictions = Vec::with_capacity(cases.len());
    for case in cases {
        let pred = predict_case(backend, trainer, case)?;
        let label = case.label.as_ref().expect("test cases are labeled");
        total += metrics::overlap(&pred, label, |v| v > 0).dice();
        predictions.push(pred);
    }
    Ok((total / cases.len().max(1) as f64, predictions))
}

/// The trainer of a finished (or interrupted) run, restored from its checkpoint.
pub fn restore_trainer<B: NetBackend>(
    backend: &B,
    config: &TrainConfig,
    channels: usize,
    paths: &RunPaths,
) -> Result<Trainer<B>> {
    let mut trainer = Trainer::new(backend, config, channels)?;
    load_checkpoint(backend, &mut trainer, &paths.checkpoint())?;
    Ok(trainer)
}

pub(crate) fn host(
    store: &ParamStore<impl NetBackend>,
    prefix: &str,
    out: &mut BTreeMap<String, HostTensor>,
) -> Result<()> {
    for (spec, v) in store.specs().iter().zip(store.values()) {
        let data = v.to_f64()?.iter().map(|&x| x as f32).collect();
        out.insert(
            format!("{prefix}/{}", spec.name),
            HostTensor {
                shape: spec.shape.dims().to_vec(),
                data,
            },
        );
    }
    Ok(())
}

/// A store like `store` holding the tensors `prefix/NAME` of a checkpoint (an error if one is
/// missing or of another shape).
pub fn restore<B: NetBackend>(
    store: &ParamStore<B>,
    prefix: &str,
    tensors: &BTreeMap<String, HostTensor>,
    backend: &B,
) -> Result<ParamStore<B>> {
    let values = store
        .specs()
        .iter()
        .map(|spec| {
            let name = format!("{prefix}/{}", spec.name);
            let t = tensors
                .get(&name)
                .filter(|t| t.shape == spec.shape.dims())
                .ok_or_else(|| {
                    RunError::Resume(format!(
                        "the checkpoint has no tensor {name} of shape {}: it is from another \
                         network",
                        spec.shape
                    ))
                })?;
            let values: Vec<f64> = t.data.iter().map(|&x| f64::from(x)).collect();
            Ok(backend.tensor(&values, &spec.shape)?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(store.with_values(values)?)
}

/// Saves the trainer's whole state after `step` iterations.
pub fn save_checkpoint<B: NetBackend>(trainer: &Trainer<B>, step: u64, stem: &Path) -> Result<()> {
    let mut tensors = BTreeMap::new();
    host(&trainer.params, "params", &mut tensors)?;
    host(&trainer.stats, "stats", &mut tensors)?;
    if let Some(t) = &trainer.teacher {
        host(&t.params, "teacher/params", &mut tensors)?;
        host(&t.stats, "teacher/stats", &mut tensors)?;
    }
    if let Some(m) = &trainer.momentum {
        host(&m.params, "momentum/params", &mut tensors)?;
        host(&m.stats, "momentum/stats", &mut tensors)?;
    }
    host_optimizer(&trainer.optimizer, "optimizer", &mut tensors)?;
    let mut counters = BTreeMap::from([("optimizer_steps".to_string(), trainer.optimizer.steps)]);
    if let Some(net_b) = &trainer.dtml {
        super::dtml::save(net_b, &mut tensors, &mut counters)?;
    }
    let sidecar = Sidecar {
        step,
        seed: trainer.config.seed,
        config: serde_json::to_value(&trainer.config).expect("a configuration serialises"),
        counters,
    };
    Ok(checkpoint::save(stem, &tensors, &sidecar)?)
}

/// Restores a trainer saved by [`save_checkpoint`]; returns the step to continue from.
pub fn load_checkpoint<B: NetBackend>(
    backend: &B,
    trainer: &mut Trainer<B>,
    stem: &Path,
) -> Result<u64> {
    let (tensors, sidecar) = checkpoint::load(stem)?;
    let saved: TrainConfig = serde_json::from_value(sidecar.config.clone())
        .map_err(|e| RunError::Resume(format!("its configuration does not read: {e}")))?;
    let mut now = trainer.config.clone();
    now.iterations = saved.iterations;
    if saved != now {
        return Err(RunError::Resume(
            "the checkpoint was written with another configuration (only iterations may change)"
                .into(),
        ));
    }
    trainer.params = restore(&trainer.params, "params", &tensors, backend)?;
    trainer.stats = restore(&trainer.stats, "stats", &tensors, backend)?;
    if let Some(t) = trainer.teacher.as_ref() {
        trainer.teacher = Some(Teacher {
            params: restore(&t.params, "teacher/params", &tensors, backend)?,
            stats: restore(&t.stats, "teacher/stats", &tensors, backend)?,
        });
    }
    if let Some(m) = trainer.momentum.as_ref() {
        trainer.momentum = Some(Teacher {
            params: restore(&m.params, "momentum/params", &tensors, backend)?,
            stats: restore(&m.stats, "momentum/stats", &tensors, backend)?,
        });
    }
    trainer.optimizer.state = restore_optimizer("optimizer", &tensors, backend)?;
    trainer.optimizer.steps = sidecar
        .counters
        .get("optimizer_steps")
        .copied()
        .unwrap_or(0);
    if let Some(net_b) = trainer.dtml.as_mut() {
        super::dtml::load(backend, net_b, &tensors, &sidecar.counters)?;
    }
    Ok(sidecar.step)
}

/// An optimiser's moment buffers as the tensors `prefix/0`, `prefix/1`, ...
pub(crate) fn host_optimizer<B: NetBackend>(
    optimizer: &Optimizer<B>,
    prefix: &str,
    out: &mut BTreeMap<String, HostTensor>,
) -> Result<()> {
    for (k, m) in optimizer.state.iter().enumerate() {
        let data = m.to_f64()?.iter().map(|&x| x as f32).collect();
        out.insert(
            format!("{prefix}/{k}"),
            HostTensor {
                shape: m.shape().dims().to_vec(),
                data,
            },
        );
    }
    Ok(())
}

/// The moment buffers [`host_optimizer`] wrote under `prefix` (none before the first step).
pub(crate) fn restore_optimizer<B: NetBackend>(
    prefix: &str,
    tensors: &BTreeMap<String, HostTensor>,
    backend: &B,
) -> Result<Vec<Var<B>>> {
    let mut state = Vec::new();
    while let Some(t) = tensors.get(&format!("{prefix}/{}", state.len())) {
        let values: Vec<f64> = t.data.iter().map(|&x| f64::from(x)).collect();
        let shape = Shape(t.shape.clone());
        state.push(Var::constant(backend, backend.tensor(&values, &shape)?));
    }
    Ok(state)
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
        }
    }
}

/// The batch of iteration `t` on the device.
pub fn device_batch<B: NetBackend>(
    backend: &B,
    trainer: &Trainer<B>,
    data: &RunData,
    t: u64,
) -> Result<DeviceBatch<B>> {
    let c = &trainer.config;
    // Supervised and full see no unlabeled patch: not even through batch-norm statistics.
    let unlabeled = if data.unlabeled.is_empty() || !c.uses_unlabeled() {
        0
    } else {
        c.batch.unlabeled
    };
    let s = Sampling {
        patch: c.batch.patch,
        foreground: c.batch.foreground,
        rotate_flip: c.batch.rotate_flip,
        intensity: c.batch.intensity,
        noise: c.batch.noise,
        // MLB-Seg's initial labels, the local contrastive method's pseudo-labels.
        unlabeled_labels: ["mlb-seg", "local-contrastive"].contains(&c.method.as_str()),
    };
    let counts = (c.batch.labeled, unlabeled);
    let b = sample(
        &data.labeled,
        &data.unlabeled,
        counts,
        c.data.classes,
        &s,
        c.seed,
        t,
    );
    let channels = data.labeled[0].image.channels;
    let [d, h, w] = c.batch.patch;
    let x = Shape::from([b.labeled + b.unlabeled, channels, d, h, w]);
    let with_labels = b.labels.len() / (c.data.classes * d * h * w);
    let y = Shape::from([with_labels, c.data.classes, d, h, w]);
    let batch = DeviceBatch {
        x: Var::from_f64(backend, &b.images, &x, false)?,
        y: Var::from_f64(backend, &b.labels, &y, false)?,
        labeled: b.labeled,
    };
    let rotate_scale = RotateScale {
        rotate: c.batch.rotate,
        scale: c.batch.scale,
    };
    if rotate_scale.is_off() {
        return Ok(batch);
    }
    let warps: Vec<Warp> = (0..b.labeled + b.unlabeled)
        .map(|slot| rotate_scale.warp(c.batch.patch, c.seed, t, slot))
        .collect();
    Ok(warp_batch(batch, &warps)?)
}

/// Keeps the log's lines of steps up to `step` (a resumed run rewrites what came after).
fn truncate_log(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    std::fs::write(path, out).map_err(io(path))
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

/// Trains to the configured number of iterations, writing into `paths.dir` (MLB-Seg and
/// online-pl: their two stages, see [`super::stages`]).
pub fn train<B: NetBackend>(
    backend: &B,
    config: &TrainConfig,
    data: &RunData,
    paths: &RunPaths,
    options: RunOptions,
) -> Result<Summary> {
    if config.method == "mlb-seg" {
        return super::mlb_seg::stages::train(backend, config, data, paths, options);
    }
    if config.method == "online-pl" {
        return super::online_pl::train(backend, config, data, paths, options);
    }
    if config.method == "local-contrastive" {
        return super::local_contrastive::train(backend, config, data, paths, options);
    }
    if config.method == "ideal" {
        return super::ideal::train(backend, config, data, paths, options);
    }
    let trainer = Trainer::new(backend, config, data.labeled[0].image.channels)?;
    train_from(backend, trainer, data, paths, options)
}

/// Trains `trainer` (its configuration's run) from its state, or from the run's checkpoint with
/// `options.resume`.
pub fn train_from<B: NetBackend>(
    backend: &B,
    mut trainer: Trainer<B>,
    data: &RunData,
    paths: &RunPaths,
    options: RunOptions,
) -> Result<Summary> {
    let config = &trainer.config.clone();
    let (resume, show_progress) = (options.resume, options.progress);
    std::fs::create_dir_all(&paths.dir).map_err(io(&paths.dir))?;
    let start = if resume {
        let step = load_checkpoint(backend, &mut trainer, &paths.checkpoint())?;
        truncate_log(&paths.log(), step)?;
        step
    } else {
        let _ = std::fs::remove_file(paths.log());
        0
    };
    let config_text = toml::to_string_pretty(config).expect("a configuration serialises");
    std::fs::write(paths.config(), config_text).map_err(io(&paths.config()))?;
    let log_path = paths.log();
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io(&log_path))?;
    let bar = if show_progress {
        ProgressBar::new(config.iterations)
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
    let began = Instant::now();
    let mut summary = Summary::empty();
    for t in start..config.iterations {
        let step_began = Instant::now();
        let batch = device_batch(backend, &trainer, data, t)?;
        let terms = trainer.step(&batch, t)?;
        summary.step_seconds += step_began.elapsed().as_secs_f64();
        summary.iterations += 1;
        let loss = terms[0].1;
        if !loss.is_finite() {
            bar.abandon();
            return Err(RunError::NonFinite {
                step: t,
                value: loss,
                checkpoint: paths.checkpoint().display().to_string(),
            });
        }
        let done = t + 1;
        let mut line = serde_json::Map::new();
        line.insert("step".into(), done.into());
        for (name, v) in &terms {
            line.insert((*name).into(), (*v).into());
        }
        line.insert("seconds".into(), began.elapsed().as_secs_f64().into());
        let last = done == config.iterations;
        // IDEAL's pre-training trains no decoder: nothing to validate.
        let validates = !data.test.is_empty() && config.method != "ideal-pretrain";
        if (done % config.log.validate_every.max(1) == 0 || last) && validates {
            let (dice, predictions) = validation_dice(backend, &trainer, &data.test)?;
            line.insert("validation_dice".into(), dice.into());
            summary.validation_dice = Some(dice);
            summary.final_predictions = last.then_some(predictions);
        }
        if done % config.log.validate_every.max(1) == 0 || last {
            super::mlb_seg::stages::save_weight_maps(backend, &trainer, data, &batch, done, paths)?;
        }
        writeln!(log, "{}", serde_json::Value::Object(line)).map_err(io(&log_path))?;
        let stop = options.stop_after == Some(done);
        if done % config.log.checkpoint_every.max(1) == 0 || last || stop {
            save_checkpoint(&trainer, done, &paths.checkpoint())?;
        }
        let message: Vec<String> = terms.iter().map(|(n, v)| format!("{n} {v:.4}")).collect();
        bar.set_message(message.join(" "));
        bar.inc(1);
        summary.final_loss = loss;
        if stop {
            break;
        }
    }
    bar.finish();
    summary.seconds = began.elapsed().as_secs_f64();
    Ok(summary)
}

/// The test figures of a finished run: each test case predicted (from the checkpoint, unless the
/// run's last validation left its predictions) and scored per foreground class (physical units
/// from the case's spacing), then averaged. `each` sees every case with its prediction (for
/// pictures), so nothing is predicted twice.
pub fn test_results<B: NetBackend>(
    backend: &B,
    config: &TrainConfig,
    data: &RunData,
    paths: &RunPaths,
    summary: &Summary,
    mut each: impl FnMut(&LoadedCase, &[u8]),
) -> Result<RunResult> {
    let predictions = match &summary.final_predictions {
        Some(p) if p.len() == data.test.len() => p.clone(),
        _ => {
            let channels = data.test[0].image.channels;
            let trainer = restore_trainer(backend, config, channels, paths)?;
            data.test
                .iter()
                .map(|case| predict_case(backend, &trainer, case))
                .collect::<Result<_>>()?
        }
    };
    for (case, pred) in data.test.iter().zip(&predictions) {
        each(case, pred);
    }
    let mut result = score(config, &data.test, &predictions)?;
    result.seconds_per_iteration = summary.step_seconds / summary.iterations.max(1) as f64;
    Ok(result)
}

/// Test figures of `predictions` of the `test` cases (in order): every foreground class of every
/// case scored (physical units from the case's spacing), then averaged. No time per iteration.
pub fn score(
    config: &TrainConfig,
    test: &[LoadedCase],
    predictions: &[Vec<u8>],
) -> Result<RunResult> {
    let mut scores: Vec<metrics::Metrics> = Vec::new();
    for (case, pred) in test.iter().zip(predictions) {
        let label = case.label.as_ref().expect("test cases are labeled");
        let grid = metrics::Grid {
            dims: case.image.dims,
            spacing: case.image.spacing,
        };
        for class in 1..config.data.classes as u8 {
            scores.push(metrics::class_metrics(pred, label, class, grid)?);
        }
    }
    let mean = |get: fn(&metrics::Metrics) -> Option<f64>| {
        metrics::Stat::of(&scores.iter().map(get).collect::<Vec<_>>()).mean
    };
    Ok(RunResult {
        method: config.method.clone(),
        seed: config.seed,
        dice: mean(|m| Some(m.dice)).unwrap_or(f64::NAN),
        jaccard: mean(|m| Some(m.jaccard)).unwrap_or(f64::NAN),
        hd95: mean(|m| m.hd95),
        asd: mean(|m| m.asd),
        seconds_per_iteration: 0.0,
    })
}
