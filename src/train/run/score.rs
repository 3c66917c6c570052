//! A run's figures: every case segmented by the evaluated network (sliding windows, argmax), the
//! validation Dice during training, and the test figures of a finished run.

use super::{restore_trainer, Result, RunData, RunPaths, Summary};
use crate::eval::inference::HostVolume;
use crate::eval::{argmax, metrics, predict_probabilities, SlidingWindow};
use crate::nn::NetBackend;
use crate::train::batch::LoadedCase;
use crate::train::compare::RunResult;
use crate::train::config::TrainConfig;
use crate::train::methods::Stage;
use crate::train::network::Weights;
use crate::train::trainer::Trainer;

/// The label map of one case: sliding-window probabilities of the evaluated network (the student,
/// or its momentum copy: [`Trainer::evaluated`]) in eval mode (windows
/// of the training patch, overlapping by `log.stride_fraction`), then the argmax.
pub fn predict_case<B: NetBackend>(
    backend: &B,
    trainer: &Trainer<B>,
    case: &LoadedCase,
) -> Result<Vec<u8>> {
    predict_with(backend, trainer, trainer.evaluated(), case)
}

/// The label map of one case as [`predict_case`] makes it, by the trainer's network with `w`.
pub fn predict_with<B: NetBackend>(
    backend: &B,
    trainer: &Trainer<B>,
    w: &Weights<B>,
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
    let probs = predict_probabilities(backend, &trainer.net, &w.params, &w.stats, &volume, window)?;
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
            let trainer = restore_trainer(backend, config, Stage::Main, channels, paths)?;
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
        method: config.method,
        seed: config.seed,
        dice: mean(|m| Some(m.dice)).unwrap_or(f64::NAN),
        jaccard: mean(|m| Some(m.jaccard)).unwrap_or(f64::NAN),
        hd95: mean(|m| m.hd95),
        asd: mean(|m| m.asd),
        seconds_per_iteration: 0.0,
    })
}
