//! Training runs on a tiny configuration: a resumed run continues exactly as an uninterrupted one,
//! a non-finite loss stops the run and keeps the last good checkpoint, the mean teacher follows the
//! student, the test figures reuse the last validation faithfully, and configuration mistakes are errors that name the key.

mod common;

use common::gpu;
use metaseg::train::config::TrainConfig;
use metaseg::train::run::{self, RunError, RunOptions, RunPaths};

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
    let config = tiny("mean-teacher", &[]);
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

#[test]
fn a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint() {
    let g = gpu();
    let config = tiny(
        "supervised",
        &[
            "optimizer.lr=1e30",
            "iterations=12",
            "log.checkpoint_every=1",
        ],
    );
    let data = run::load_data(&config).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let paths = RunPaths {
        dir: dir.path().to_path_buf(),
    };
    let err = run::train(&g, &config, &data, &paths, RunOptions::default()).unwrap_err();
    let RunError::NonFinite { step, .. } = err else {
        panic!("expected a non-finite loss, got {err}");
    };
    assert!(err.to_string().contains("last good checkpoint"), "{err}");
    let (_, sidecar) = metaseg::train::checkpoint::load(&paths.checkpoint()).unwrap();
    assert_eq!(sidecar.step, step, "the checkpoint is the last finite step");
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
    let err = TrainConfig::load("default", &["batch.patch=[30, 32, 32]".into()]).unwrap_err();
    // 3 levels pool twice.
    assert!(err.to_string().contains("divide by 4"), "{err}");
    let err = TrainConfig::load("nope", &[]).unwrap_err();
    assert!(err.to_string().contains("la-vnet"), "{err}");
    // Both presets read and check.
    for preset in ["default", "la-vnet"] {
        TrainConfig::load(preset, &[]).unwrap();
    }
}
