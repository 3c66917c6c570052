//! Training runs on a tiny configuration: a resumed run continues exactly as an uninterrupted one,
//! a non-finite loss stops the run and keeps the last good checkpoint, the mean teacher follows the
//! student, the test figures reuse the last validation faithfully, and configuration mistakes are errors that name the key.

mod common;

use common::gpu;
use metaseg::train::augment::{warp_batch, RotateScale};
use metaseg::train::config::TrainConfig;
use metaseg::train::run::{self, RunError, RunOptions, RunPaths};
use metaseg::train::trainer::{DeviceBatch, Trainer};
use metaseg_autograd::{Cpu64, Tolerance, Var};

/// The default preset shrunk to seconds: 16^3 volumes, 8^3 patches, a 2-level V-Net of width 2.
fn tiny(method: &str, extra: &[&str]) -> TrainConfig {
    let mut sets: Vec<String> = [
        &format!("method={method}"),
        "iterations=4",
        "data.cases=5",
        "data.size=[16, 16, 16]",
        "data.labeled=2",
        "data.test=1",
        "network.base_width=2",
        "network.levels=2",
        "batch.patch=[8, 8, 8]",
        "log.validate_every=2",
        "log.checkpoint_every=2",
        "mean_teacher.rampup_unit=1",
        "mean_teacher.rampup=2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    sets.extend(extra.iter().map(|s| s.to_string()));
    TrainConfig::load("default", &sets).unwrap()
}

fn log_lines(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Everything of a log line but the wall-clock time.
fn without_time(mut v: serde_json::Value) -> serde_json::Value {
    v.as_object_mut().unwrap().remove("seconds");
    v
}

#[test]
fn a_resumed_run_repeats_the_uninterrupted_one_exactly() {
    let g = gpu();
    // With the device-side rotations and scalings on, whose draws must repeat too.
    let config = tiny("mean-teacher", &["batch.rotate=15", "batch.scale=0.1"]);
    let data = run::load_data(&config).unwrap();
    let whole = tempfile::tempdir().unwrap();
    let paths = RunPaths {
        dir: whole.path().to_path_buf(),
    };
    run::train(&g, &config, &data, &paths, RunOptions::default()).unwrap();

    let parts = tempfile::tempdir().unwrap();
    let paths = RunPaths {
        dir: parts.path().to_path_buf(),
    };
    let interrupted = RunOptions {
        stop_after: Some(2),
        ..RunOptions::default()
    };
    let resumed = RunOptions {
        resume: true,
        ..RunOptions::default()
    };
    run::train(&g, &config, &data, &paths, interrupted).unwrap();
    run::train(&g, &config, &data, &paths, resumed).unwrap();

    let a: Vec<_> = log_lines(whole.path())
        .into_iter()
        .map(without_time)
        .collect();
    let b: Vec<_> = log_lines(parts.path())
        .into_iter()
        .map(without_time)
        .collect();
    assert_eq!(a.len(), 4);
    assert_eq!(a, b);
}

/// Issue 25, item 2: a diverging run (lr 1e30) stops at the first non-finite loss or parameter,
/// naming the iteration and the quantity; the checkpoint it keeps is finite (a save of a
/// non-finite tensor is refused, and loading checks) and the message names it truly: with
/// checkpoints every 5 iterations and a stop before the 5th, it says none was written.
#[test]
fn a_non_finite_loss_or_parameter_stops_the_run_and_keeps_a_finite_checkpoint() {
    let g = gpu();
    for every in ["1", "5"] {
        let config = tiny(
            "supervised",
            &[
                "optimizer.lr=1e30",
                "iterations=12",
                &format!("log.checkpoint_every={every}"),
            ],
        );
        let data = run::load_data(&config).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let paths = RunPaths {
            dir: dir.path().to_path_buf(),
        };
        let err = run::train(&g, &config, &data, &paths, RunOptions::default()).unwrap_err();
        let RunError::NonFinite { step, quantity, .. } = &err else {
            panic!("expected a non-finite loss or parameter, got {err}");
        };
        let message = err.to_string();
        assert!(message.contains(&format!("{quantity} became")), "{message}");
        assert!(
            message.contains(&format!("at iteration {step}")),
            "{message}"
        );
        match metaseg::train::checkpoint::load(&paths.checkpoint()) {
            Ok((_, sidecar)) => {
                assert!(sidecar.step < *step, "{message}");
                let kept = format!("checkpoint.safetensors, step {}) is kept", sidecar.step);
                assert!(message.contains(&kept), "{message}");
            }
            Err(e) => {
                assert!(message.contains("No good checkpoint"), "{message} ({e})");
                assert!(every == "5" && *step < 5, "{message}");
            }
        }
        let tmp = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains("tmp")
            })
            .count();
        assert_eq!(tmp, 0, "a temporary file is left");
    }
}

#[test]
fn the_mean_teacher_moves_and_every_method_trains() {
    let g = gpu();
    for method in ["supervised", "full", "mean-teacher"] {
        let config = tiny(method, &[]);
        let data = run::load_data(&config).unwrap();
        if method == "full" {
            assert_eq!((data.labeled.len(), data.unlabeled.len()), (4, 0));
        }
        let dir = tempfile::tempdir().unwrap();
        let paths = RunPaths {
            dir: dir.path().to_path_buf(),
        };
        let summary = run::train(&g, &config, &data, &paths, RunOptions::default()).unwrap();
        assert!(summary.final_loss.is_finite(), "{method}");
        let dice = summary.validation_dice.unwrap();
        assert!((0.0..=1.0).contains(&dice), "{method}: {dice}");
        let (tensors, _) = metaseg::train::checkpoint::load(&paths.checkpoint()).unwrap();
        let teacher = tensors.get("teacher/params/head.weight");
        assert_eq!(teacher.is_some(), method == "mean-teacher");
        if let Some(t) = teacher {
            // The teacher started as a copy of the student and follows it by EMA with decay
            // below 1, so after a few steps it lags behind: it differs from the student.
            let student = &tensors["params/head.weight"];
            assert_ne!(t.data, student.data);
        }
    }
}

/// The test figures reuse the last validation's predictions; they must be what the checkpoint
/// predicts, or the shortcut would report another network than the one saved.
#[test]
fn test_figures_from_the_last_validation_equal_those_from_the_checkpoint() {
    let g = gpu();
    let config = tiny("supervised", &["data.test=2"]);
    let data = run::load_data(&config).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let paths = RunPaths {
        dir: dir.path().to_path_buf(),
    };
    let summary = run::train(&g, &config, &data, &paths, RunOptions::default()).unwrap();
    assert_eq!(summary.final_predictions.as_ref().map(Vec::len), Some(2));
    let mut reused = Vec::new();
    let a = run::test_results(&g, &config, &data, &paths, &summary, |_, p| {
        reused.push(p.to_vec())
    })
    .unwrap();
    let restored = run::Summary {
        final_predictions: None,
        ..summary.clone()
    };
    let mut predicted = Vec::new();
    let b = run::test_results(&g, &config, &data, &paths, &restored, |_, p| {
        predicted.push(p.to_vec())
    })
    .unwrap();
    assert_eq!(reused, predicted);
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
}

#[test]
fn configuration_mistakes_name_the_key() {
    let err = TrainConfig::load("default", &["optimizer.lrr=0.1".into()]).unwrap_err();
    assert!(err.to_string().contains("optimizer.lrr"), "{err}");
    let err = TrainConfig::load("default", &["method=magic".into()]).unwrap_err();
    assert!(err.to_string().contains("magic"), "{err}");
    let levels = TrainConfig::load("default", &[]).unwrap().network.levels;
    let err = TrainConfig::load("default", &["batch.patch=[1, 30, 32]".into()]).unwrap_err();
    // The V-Net pools levels - 1 times.
    let factor = 1 << (levels - 1);
    assert!(
        err.to_string().contains(&format!("divide by {factor}")),
        "{err}"
    );
    let err = TrainConfig::load("default", &["batch.scale=1.5".into()]).unwrap_err();
    assert!(err.to_string().contains("batch.scale"), "{err}");
    let err = TrainConfig::load("nope", &[]).unwrap_err();
    assert!(err.to_string().contains("la-vnet"), "{err}");
    // Both presets read and check.
    for preset in ["default", "la-vnet"] {
        TrainConfig::load(preset, &[]).unwrap();
    }
}

#[test]
fn rotations_and_scalings_warp_the_batch_on_the_device_and_keep_labels_one_hot() {
    let g = gpu();
    let on = tiny("mean-teacher", &["batch.rotate=20", "batch.scale=0.15"]);
    let off = tiny("mean-teacher", &[]);
    let data = run::load_data(&on).unwrap();
    let channels = data.labeled[0].image.channels;
    let mut trainer = Trainer::new(&g, &on, channels).unwrap();
    let plain_trainer = Trainer::new(&g, &off, channels).unwrap();
    let t = 3;
    let warped = run::device_batch(&g, &trainer, &data, t).unwrap();
    let plain = run::device_batch(&g, &plain_trainer, &data, t).unwrap();
    let (x, y) = (warped.x.to_f64().unwrap(), warped.y.to_f64().unwrap());
    assert_eq!(warped.x.shape(), plain.x.shape());
    assert_ne!(x, plain.x.to_f64().unwrap(), "the warp changes the images");

    // Every voxel of every labeled sample has exactly one class (the warp brings background in).
    let dims = warped.y.shape().dims().to_vec();
    let volume: usize = dims[2..].iter().product();
    for n in 0..dims[0] {
        for v in 0..volume {
            let column: Vec<f64> = (0..dims[1])
                .map(|c| y[(n * dims[1] + c) * volume + v])
                .collect();
            assert!(column.iter().all(|&p| p == 0.0 || p == 1.0), "{column:?}");
            assert_eq!(column.iter().sum::<f64>(), 1.0, "sample {n}, voxel {v}");
        }
    }

    // The same warps of the same host batch on the reference backend.
    let r = RotateScale {
        rotate: 20.0,
        scale: 0.15,
    };
    let samples = warped.x.shape().dims()[0];
    let warps: Vec<_> = (0..samples)
        .map(|slot| r.warp(on.batch.patch, on.seed, t, slot))
        .collect();
    let host = |v: &Var<metaseg::gpu::Gpu>| {
        Var::from_f64(&Cpu64, &v.to_f64().unwrap(), v.shape(), false).unwrap()
    };
    let reference = warp_batch(
        DeviceBatch {
            x: host(&plain.x),
            y: host(&plain.y),
            labeled: plain.labeled,
        },
        &warps,
    )
    .unwrap();
    Tolerance::F32.assert("warped images", &x, &reference.x.to_f64().unwrap());
    Tolerance::F32.assert("warped labels", &y, &reference.y.to_f64().unwrap());

    let log = trainer.step(&warped, t).unwrap();
    assert!(log.iter().all(|(_, v)| v.is_finite()), "{log:?}");
}
