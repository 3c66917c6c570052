//! Validation cases apart from the test cases (`data.validation`) and the network of the best
//! validation kept and handed on (`log.keep = "best_validation"`), on a tiny configuration.

mod common;

use common::{gpu, log_lines};
use metaseg::train::checkpoint;
use metaseg::train::config::TrainConfig;
use metaseg::train::methods::Stage;
use metaseg::train::run::{self, RunOptions, RunPaths};
use metaseg::train::trainer::Trainer;

/// The default preset shrunk to seconds (as tests/training.rs), validated every iteration.
fn tiny(method: &str, extra: &[&str]) -> TrainConfig {
    let mut sets: Vec<String> = [
        &format!("method={method}"),
        "iterations=6",
        "data.cases=8",
        "data.size=[16, 16, 16]",
        "data.labeled=2",
        "data.test=2",
        "data.validation=2",
        "network.base_width=2",
        "network.levels=2",
        "batch.patch=[8, 8, 8]",
        "log.validate_every=1",
        "log.checkpoint_every=3",
        "log.keep=\"best_validation\"",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    sets.extend(extra.iter().map(|s| s.to_string()));
    TrainConfig::load("default", &sets).unwrap()
}

fn names(cases: &[metaseg::train::batch::LoadedCase]) -> Vec<String> {
    cases.iter().map(|c| c.name.clone()).collect()
}

fn paths(dir: &tempfile::TempDir) -> RunPaths {
    RunPaths {
        dir: dir.path().to_path_buf(),
    }
}

#[test]
fn validation_cases_come_after_the_test_cases_and_leave_the_others_as_they_were() {
    let with = run::load_data(&tiny("supervised", &[])).unwrap();
    let without = run::load_data(&tiny(
        "supervised",
        &["data.cases=6", "data.validation=0", "log.keep=\"last\""],
    ))
    .unwrap();
    assert_eq!(names(&with.validation), ["synth_006", "synth_007"]);
    assert_eq!(names(&with.test), names(&without.test));
    assert_eq!(names(&with.labeled), names(&without.labeled));
    assert_eq!(names(&with.unlabeled), names(&without.unlabeled));
    assert!(without.validation.is_empty());
    // The same cases, not only the same names.
    assert_eq!(with.test[0].image.data, without.test[0].image.data);
    // `full` labels its training cases, never the validation cases.
    let full = run::load_data(&tiny("full", &[])).unwrap();
    assert_eq!(names(&full.labeled).len(), 4);
    assert_eq!(names(&full.validation), names(&with.validation));
    assert!(full.validation.iter().all(|c| c.label.is_some()));
}

#[test]
fn keeping_the_best_needs_validation_cases_and_every_defaulted_key_can_be_set() {
    let err = TrainConfig::load(
        "default",
        &[
            "data.validation=0".into(),
            "log.keep=\"best_validation\"".into(),
        ],
    )
    .unwrap_err();
    assert!(err.to_string().contains("data.validation"), "{err}");
    let err = TrainConfig::load("default", &["log.keep=\"first\"".into()]).unwrap_err();
    assert!(err.to_string().contains("log.keep"), "{err}");
    // la-vnet's text has neither key: both have defaults and can be set.
    let c = TrainConfig::load(
        "la-vnet",
        &[
            "data.validation=3".into(),
            "log.keep=\"best_validation\"".into(),
        ],
    )
    .unwrap();
    assert_eq!((c.data.validation, c.log.keeps_best()), (3, true));
    let split = tiny("supervised", &["data.validation=5"]);
    let err = run::load_data(&split).err().unwrap();
    assert!(err.to_string().contains("validation"), "{err}");
}

/// The run validates on the validation cases, marks each improvement in its log, keeps that
/// network as `best`, and scores the test cases with it.
#[test]
fn the_best_validation_is_kept_marked_and_tested() {
    let g = gpu();
    let config = tiny("supervised", &[]);
    let data = run::load_data(&config).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let paths = paths(&dir);
    let summary = run::train(&g, &config, &data, &paths, RunOptions::default()).unwrap();
    let lines = log_lines(&dir.path().join("log.jsonl"));
    let marked: Vec<(u64, f64)> = lines
        .iter()
        .filter(|l| l["best"] == serde_json::Value::Bool(true))
        .map(|l| {
            (
                l["step"].as_u64().unwrap(),
                l["validation_dice"].as_f64().unwrap(),
            )
        })
        .collect();
    let all: Vec<f64> = lines
        .iter()
        .map(|l| l["validation_dice"].as_f64().unwrap())
        .collect();
    assert_eq!(all.len(), 6, "validated every iteration");
    // Each mark beats every validation before it; the last mark is the maximum.
    for &(step, dice) in &marked {
        assert!(all[..step as usize - 1].iter().all(|&d| d < dice));
    }
    let (step, dice) = *marked.last().unwrap();
    assert_eq!(dice, all.iter().cloned().fold(f64::MIN, f64::max));
    let best = summary.best.unwrap();
    assert_eq!((best.step, best.dice), (step, dice));
    let (_, sidecar) = checkpoint::load(&paths.best()).unwrap();
    assert_eq!(sidecar.step, step);

    // The kept network, loaded by hand from `best`, scores the validation cases as logged...
    let mut trainer = Trainer::at(&g, &config, Stage::Main, 1).unwrap();
    run::load_checkpoint(&g, &mut trainer, &paths.best()).unwrap();
    let (again, _) = run::validation_dice(&g, &trainer, &data.validation).unwrap();
    assert!((again - dice).abs() < 1e-12, "{again} vs {dice}");
    // ...and the test figures are its figures on the test cases.
    let result = run::test_results(&g, &config, &data, &paths, &summary, |_, _| {}).unwrap();
    let predictions: Vec<Vec<u8>> = data
        .test
        .iter()
        .map(|c| run::predict_case(&g, &trainer, c).unwrap())
        .collect();
    let expected = run::score(&config, &data.test, &predictions).unwrap();
    assert_eq!(result.dice, expected.dice);
}

/// A resumed run keeps the same best as an uninterrupted one: interrupted anywhere, and
/// interrupted between the checkpoint and the best of the last iteration that improved.
#[test]
fn a_resumed_run_keeps_the_same_best() {
    let g = gpu();
    let config = tiny("supervised", &[]);
    let data = run::load_data(&config).unwrap();
    let whole = tempfile::tempdir().unwrap();
    run::train(&g, &config, &data, &paths(&whole), RunOptions::default()).unwrap();
    let last_mark = log_lines(&whole.path().join("log.jsonl"))
        .iter()
        .filter(|l| l["best"] == serde_json::Value::Bool(true))
        .map(|l| l["step"].as_u64().unwrap())
        .next_back()
        .unwrap();
    assert!(last_mark > 1, "an improvement after the first validation");
    let stop = |n| RunOptions {
        stop_after: Some(n),
        ..RunOptions::default()
    };
    let resume = RunOptions {
        resume: true,
        ..RunOptions::default()
    };
    let same_as_whole = |dir: &tempfile::TempDir| {
        let a: Vec<_> = log_lines(&whole.path().join("log.jsonl"));
        let b: Vec<_> = log_lines(&dir.path().join("log.jsonl"));
        assert_eq!(a, b);
        let (x, sx) = checkpoint::load(&paths(&whole).best()).unwrap();
        let (y, sy) = checkpoint::load(&paths(dir).best()).unwrap();
        assert_eq!(sx.step, sy.step);
        assert!(x == y, "the best checkpoints differ");
    };
    for k in [2, 4] {
        let parts = tempfile::tempdir().unwrap();
        run::train(&g, &config, &data, &paths(&parts), stop(k)).unwrap();
        let summary = run::train(&g, &config, &data, &paths(&parts), resume).unwrap();
        assert_eq!(summary.best.unwrap().step, last_mark);
        same_as_whole(&parts);
    }
    // Stopped at the last improvement with the best file of iteration 1 in place of its own: as
    // if interrupted after that iteration's checkpoint, before its best was written.
    let earlier = tempfile::tempdir().unwrap();
    run::train(&g, &config, &data, &paths(&earlier), stop(1)).unwrap();
    let parts = tempfile::tempdir().unwrap();
    run::train(&g, &config, &data, &paths(&parts), stop(last_mark)).unwrap();
    let from = checkpoint::paths(&paths(&earlier).best());
    let to = checkpoint::paths(&paths(&parts).best());
    std::fs::copy(&from.0, &to.0).unwrap();
    std::fs::copy(&from.1, &to.1).unwrap();
    assert_eq!(checkpoint::load(&paths(&parts).best()).unwrap().1.step, 1);
    run::train(&g, &config, &data, &paths(&parts), resume).unwrap();
    same_as_whole(&parts);
}
