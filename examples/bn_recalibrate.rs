//! Does a run's test Dice depend on its batch-norm running statistics? (issue 23 item 3: MLB-Seg
//! gathers them over zoomed, zero-padded views). For each run directory (or checkpoint), the test
//! cases are segmented three ways with the same parameters:
//!
//! - `saved`: the running statistics of the checkpoint (what validation and test use);
//! - `recalibrated`: running statistics re-estimated over the run's training cases (labeled and
//!   unlabeled, tiled into patches without warps, batches of the run's batch size;
//!   [`metaseg::nn::recalibrate`]);
//! - `test batch`: every test patch in one training-mode pass (each batch norm normalises with the
//!   test patches' own statistics; only when every test case is one patch, like the Colin27 cubes).
//!
//! Each line: test Dice (mean over cases and foreground classes, as `train` reports it) and the
//! share of test voxels predicted foreground (against the labels' share).
//!
//! With `--write`, the recalibrated statistics then replace the student's (`stats/...`) in each
//! checkpoint (a study of its own: e.g. MLB-Seg's stage 0 recalibrated before its initial labels
//! are predicted, by a `--resume` of a copy of the run).
//!
//! `cargo run --release --example bn_recalibrate -- [--write] RUN_DIR [RUN_DIR ...]`

use metaseg::eval::inference::{window_starts, HostVolume};
use metaseg::eval::trained::{SavedRun, Trained};
use metaseg::eval::{argmax, predict_probabilities, SlidingWindow};
use metaseg::gpu::Gpu;
use metaseg::nn::recalibrate::recalibrated_stats;
use metaseg::nn::{Mode, Network, ParamStore};
use metaseg::train::batch::LoadedCase;
use metaseg::train::checkpoint::{self, HostTensor};
use metaseg::train::run::{load_data, score};
use metaseg_autograd::{Shape, Var};
use std::path::Path;

type AnyResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The patches tiling `case` (stride = patch; the last one shifted inside), flat [C, patch] each.
fn tiles(case: &LoadedCase, patch: [usize; 3]) -> Vec<Vec<f64>> {
    let img = &case.image;
    let [d, h, w] = img.dims;
    let starts: Vec<Vec<usize>> = (0..3)
        .map(|a| window_starts(img.dims[a].max(patch[a]), patch[a], patch[a]))
        .collect();
    let mut out = Vec::new();
    for &z0 in &starts[0] {
        for &y0 in &starts[1] {
            for &x0 in &starts[2] {
                let mut t = Vec::with_capacity(img.channels * patch.iter().product::<usize>());
                for ch in 0..img.channels {
                    for z in z0..z0 + patch[0] {
                        for y in y0..y0 + patch[1] {
                            for x in x0..x0 + patch[2] {
                                let inside = z < d && y < h && x < w;
                                let i = ((ch * d + z) * h + y) * w + x;
                                t.push(if inside { f64::from(img.data[i]) } else { 0.0 });
                            }
                        }
                    }
                }
                out.push(t);
            }
        }
    }
    out
}

/// Patches stacked into batches of `size` [n, C, patch].
fn batches(
    gpu: &Gpu,
    patches: &[Vec<f64>],
    c: usize,
    patch: [usize; 3],
    size: usize,
) -> AnyResult<Vec<Var<Gpu>>> {
    patches
        .chunks(size)
        .map(|chunk| {
            let data: Vec<f64> = chunk.concat();
            let shape = Shape::from([chunk.len(), c, patch[0], patch[1], patch[2]]);
            Ok(Var::from_f64(gpu, &data, &shape, false)?)
        })
        .collect()
}

/// Test Dice and predicted foreground share of `predictions`.
fn figures(
    t: &Trained<Gpu>,
    test: &[LoadedCase],
    predictions: &[Vec<u8>],
) -> AnyResult<(f64, f64)> {
    let dice = score(&t.config, test, predictions)?.dice;
    let voxels: usize = predictions.iter().map(Vec::len).sum();
    let fg: usize = predictions.iter().flatten().filter(|&&v| v > 0).count();
    Ok((dice, fg as f64 / voxels as f64))
}

/// Every test case segmented in eval mode with `stats`.
fn eval_predictions(
    gpu: &Gpu,
    t: &Trained<Gpu>,
    stats: &ParamStore<Gpu>,
    test: &[LoadedCase],
) -> AnyResult<Vec<Vec<u8>>> {
    let c = &t.config;
    let window = SlidingWindow::with_stride_fraction(c.batch.patch, c.log.stride_fraction);
    test.iter()
        .map(|case| {
            let volume = HostVolume {
                data: &case.image.data,
                channels: case.image.channels,
                dims: case.image.dims,
            };
            let probs = predict_probabilities(gpu, &t.net, &t.params, stats, &volume, window)?;
            Ok(argmax(&probs, c.data.classes))
        })
        .collect()
}

/// Every test case (one patch each) in one training-mode pass; None if a case is not one patch.
fn test_batch_predictions(
    gpu: &Gpu,
    t: &Trained<Gpu>,
    test: &[LoadedCase],
    mode: Mode,
) -> AnyResult<Option<Vec<Vec<u8>>>> {
    let patch = t.config.batch.patch;
    if test.iter().any(|case| case.image.dims != patch) {
        return Ok(None);
    }
    let patches: Vec<Vec<f64>> = test.iter().flat_map(|case| tiles(case, patch)).collect();
    let c = test[0].image.channels;
    let x = &batches(gpu, &patches, c, patch, patches.len())?[0];
    let probs = t
        .net
        .run(&t.params, &t.stats, x, mode)?
        .logits
        .softmax_channels()?
        .to_f64()?;
    let classes = t.config.data.classes;
    let voxels: usize = patch.iter().product();
    Ok(Some(
        (0..test.len())
            .map(|i| {
                let p: Vec<f32> = probs[i * classes * voxels..(i + 1) * classes * voxels]
                    .iter()
                    .map(|&v| v as f32)
                    .collect();
                argmax(&p, classes)
            })
            .collect(),
    ))
}

/// Replaces the student's running statistics in the checkpoint of `saved` by `stats`.
fn write_stats(saved: &SavedRun, stats: &ParamStore<Gpu>) -> AnyResult<()> {
    let (mut tensors, sidecar) = checkpoint::load(&saved.stem)?;
    for (spec, v) in stats.specs().iter().zip(stats.values()) {
        let key = format!("stats/{}", spec.name);
        let Some(old) = tensors.get(&key) else {
            return Err(format!("{} holds no {key}", saved.stem.display()).into());
        };
        let data: Vec<f32> = v.to_f64()?.iter().map(|&x| x as f32).collect();
        let shape = old.shape.clone();
        tensors.insert(key, HostTensor { shape, data });
    }
    checkpoint::save(&saved.stem, &tensors, &sidecar)?;
    println!(
        "  wrote the recalibrated statistics into {}",
        saved.stem.display()
    );
    Ok(())
}

fn report(gpu: &Gpu, dir: &Path, write: bool) -> AnyResult<()> {
    let saved = SavedRun::read(dir)?;
    let data = load_data(&saved.config)?;
    let c = data.test[0].image.channels;
    let t = saved.network(gpu, c)?;
    let patch = t.config.batch.patch;
    let mode = Mode::Train {
        seed: t.config.seed,
        step: 0,
    };
    let labels: Vec<Vec<u8>> = data
        .test
        .iter()
        .map(|case| case.label.clone().unwrap_or_default())
        .collect();
    let (_, truth) = figures(&t, &data.test, &labels)?;
    println!(
        "{} ({:?}; test foreground {:.4})",
        dir.display(),
        saved.stage,
        truth
    );
    let line = |name: &str, p: &[Vec<u8>]| -> AnyResult<()> {
        let (dice, fg) = figures(&t, &data.test, p)?;
        println!("  {name:<14} test Dice {dice:.4}  predicted foreground {fg:.4}");
        Ok(())
    };
    line("saved", &eval_predictions(gpu, &t, &t.stats, &data.test)?)?;
    let training: Vec<Vec<f64>> = data
        .labeled
        .iter()
        .chain(&data.unlabeled)
        .flat_map(|case| tiles(case, patch))
        .collect();
    let size = t.config.batch.labeled + t.config.batch.unlabeled;
    let xs = batches(gpu, &training, c, patch, size)?;
    let stats = recalibrated_stats(&t.net, &t.params, &t.stats, &xs, mode)?;
    line(
        "recalibrated",
        &eval_predictions(gpu, &t, &stats, &data.test)?,
    )?;
    if let Some(p) = test_batch_predictions(gpu, &t, &data.test, mode)? {
        line("test batch", &p)?;
    }
    if write {
        write_stats(&saved, &stats)?;
    }
    Ok(())
}

fn main() -> AnyResult<()> {
    let gpu = Gpu::new()?;
    let mut dirs: Vec<String> = std::env::args().skip(1).collect();
    let write = dirs.first().is_some_and(|a| a == "--write");
    if write {
        dirs.remove(0);
    }
    if dirs.is_empty() {
        return Err("usage: bn_recalibrate [--write] RUN_DIR [RUN_DIR ...]".into());
    }
    for dir in dirs {
        report(&gpu, Path::new(&dir), write)?;
    }
    Ok(())
}
