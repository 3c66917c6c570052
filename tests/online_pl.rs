//! Online pseudo-labeling on a tiny configuration: the momentum copies follow their networks by
//! their momenta, the teacher moves during student training when online and not at all offline
//! (the stage-2 teacher starting where `teacher_start` says), the loss is Dice plus beta times the
//! unlabeled Dice, and resumption inside stage 1 and inside stage 2 repeats the uninterrupted run.

mod common;

use common::{gpu, log_lines, logged};
use metaseg::eval::trained::SavedRun;
use metaseg::gpu::Gpu;
use metaseg::nn::NetBackend;
use metaseg::nn::ParamStore;
use metaseg::train::checkpoint::{self, HostTensor};
use metaseg::train::config::TrainConfig;
use metaseg::train::methods::online_pl::{stage1, OnlinePl};
use metaseg::train::methods::{Method, Stage};
use metaseg::train::run::{self, RunOptions, RunPaths};
use metaseg::train::trainer::Trainer;
use metaseg_autograd::{Tolerance, Var};
use std::collections::BTreeMap;
use std::path::Path;

/// 16^3 volumes, 8^3 patches, a 2-level V-Net of width 4; 2 labeled, 3 unlabeled, 1 test case;
/// 2 iterations of stage 1 and 3 of stage 2.
fn tiny(extra: &[&str]) -> TrainConfig {
    let mut sets: Vec<String> = [
        "method=online-pl",
        "iterations=3",
        "data.cases=6",
        "data.size=[16, 16, 16]",
        "data.labeled=2",
        "data.test=1",
        "network.base_width=4",
        "network.levels=2",
        "batch.patch=[8, 8, 8]",
        "log.validate_every=2",
        "log.checkpoint_every=2",
        "online_pl.stage1_iterations=2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    sets.extend(extra.iter().map(|s| s.to_string()));
    TrainConfig::load("default", &sets).unwrap()
}

fn host<B: NetBackend>(store: &ParamStore<B>) -> Vec<f64> {
    let backend = store.values()[0].backend();
    Var::constant(backend, store.flat().unwrap())
        .to_f64()
        .unwrap()
}

/// The trainer's online-pl state.
fn state(trainer: &Trainer<Gpu>) -> &OnlinePl<Gpu> {
    trainer.state().expect("an online-pl trainer")
}

/// m a + (1 - m) b, elementwise.
fn ema(a: &[f64], b: &[f64], m: f64) -> Vec<f64> {
    a.iter()
        .zip(b)
        .map(|(a, b)| m * a + (1.0 - m) * b)
        .collect()
}

#[test]
fn stage1_keeps_a_momentum_copy_of_the_teacher() {
    let g = gpu();
    let config = stage1(&tiny(&[])).config;
    let data = run::load_data(&config).unwrap();
    let mut trainer = Trainer::at(&g, &config, Stage::First, 1).unwrap();
    assert!(
        state(&trainer).teacher.is_none(),
        "stage 1 trains the teacher alone"
    );
    let batch = run::device_batch(&g, &trainer, &data, 0).unwrap();
    assert_eq!(
        batch.x.shape().dims()[0],
        config.batch.labeled,
        "labeled only"
    );
    // Two steps: after the first the copy still equals the initial weights' EMA exactly.
    for t in 0..2 {
        let copy = host(&state(&trainer).momentum.params);
        let log = trainer.step(&batch, t).unwrap();
        assert!(log.iter().all(|(_, v)| v.is_finite()), "{log:?}");
        assert_eq!(logged(&log, "loss"), logged(&log, "dice"));
        let student = host(&trainer.student.weights.params);
        let expected = ema(&copy, &student, 0.95);
        let got = host(&state(&trainer).momentum.params);
        Tolerance::new(1e-6, 1e-5).assert("momentum copy, m = 0.95", &got, &expected);
        assert_ne!(got, student, "the copy lags the teacher");
    }
}

/// One stage-2 step from a fresh trainer: the teacher's parameters before and after, the log.
fn stage2_step(extra: &[&str]) -> (Vec<f64>, Vec<f64>, Vec<(&'static str, f64)>) {
    let g = gpu();
    let config = tiny(extra);
    let data = run::load_data(&config).unwrap();
    let mut trainer = Trainer::new(&g, &config, 1).unwrap();
    let batch = run::device_batch(&g, &trainer, &data, 0).unwrap();
    let (l, u) = (config.batch.labeled, config.batch.unlabeled);
    assert_eq!(batch.x.shape().dims()[0], l + u);
    let before = host(&state(&trainer).teacher.as_ref().unwrap().params);
    let copy = host(&state(&trainer).momentum.params);
    let log = trainer.step(&batch, 0).unwrap();
    assert!(log.iter().all(|(_, v)| v.is_finite()), "{log:?}");
    let total = logged(&log, "dice") + 0.3 * logged(&log, "dice_unlabeled");
    assert!((logged(&log, "loss") - total).abs() < 1e-5, "{log:?}");
    let student = host(&trainer.student.weights.params);
    let got = host(&state(&trainer).momentum.params);
    Tolerance::new(1e-6, 1e-5).assert("momentum copy, m = 0.99", &got, &ema(&copy, &student, 0.99));
    let after = host(&state(&trainer).teacher.as_ref().unwrap().params);
    if config.online_pl.online {
        let expected = ema(&before, &student, config.online_pl.teacher_ema);
        Tolerance::new(1e-6, 1e-5).assert("online teacher", &after, &expected);
    }
    (before, after, log)
}

#[test]
fn the_teacher_moves_online_and_not_offline() {
    let (before, after, log) = stage2_step(&["online_pl.teacher_ema=0.9"]);
    let norm = before
        .iter()
        .zip(&after)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>()
        .sqrt();
    assert!(norm > 1e-4, "the teacher moved by {norm}");
    let change = logged(&log, "teacher_change");
    assert!((change - norm).abs() <= 1e-3 * norm, "{change} vs {norm}");

    let (before, after, log) = stage2_step(&["online_pl.online=false"]);
    assert_eq!(before, after, "the offline teacher moved");
    assert_eq!(logged(&log, "teacher_change"), 0.0);
}

/// The tensors `prefix/*` of a checkpoint, by their names without the prefix.
fn tensors(stem: &Path, prefix: &str) -> BTreeMap<String, HostTensor> {
    let (all, _) = checkpoint::load(stem).unwrap();
    let prefix = format!("{prefix}/");
    let picked: BTreeMap<String, HostTensor> = all
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|n| (n.to_string(), v)))
        .collect();
    assert!(!picked.is_empty(), "no {prefix} in {}", stem.display());
    picked
}

#[test]
fn both_stages_train_and_resume_as_the_uninterrupted_run() {
    let g = gpu();
    let config = tiny(&[]);
    let data = run::load_data(&config).unwrap();
    let whole = tempfile::tempdir().unwrap();
    let paths = RunPaths {
        dir: whole.path().to_path_buf(),
    };
    let summary = run::train(&g, &config, &data, &paths, RunOptions::default()).unwrap();
    assert!(summary.final_loss.is_finite());
    assert_eq!(summary.iterations, 5, "2 of stage 1, 3 of stage 2");
    let main = log_lines(&paths.log());
    assert_eq!(main.len(), 3);
    assert_eq!(log_lines(&paths.dir.join("stage1/log.jsonl")).len(), 2);
    for line in &main {
        for key in ["loss", "dice", "dice_unlabeled", "validation_dice"] {
            if key != "validation_dice" || line.get(key).is_some() {
                assert!(line[key].as_f64().unwrap().is_finite(), "{key}: {line}");
            }
        }
        assert!(line["teacher_change"].as_f64().unwrap() > 0.0, "{line}");
    }

    // Interrupted inside stage 1, then inside stage 2.
    let parts = tempfile::tempdir().unwrap();
    let paths_b = RunPaths {
        dir: parts.path().to_path_buf(),
    };
    let stop = |resume, at| RunOptions {
        resume,
        stop_after: at,
        ..RunOptions::default()
    };
    run::train(&g, &config, &data, &paths_b, stop(false, Some(1))).unwrap();
    assert!(!paths_b.checkpoint().with_extension("json").exists());
    run::train(&g, &config, &data, &paths_b, stop(true, Some(4))).unwrap();
    assert_eq!(log_lines(&paths_b.log()).len(), 2);
    run::train(&g, &config, &data, &paths_b, stop(true, None)).unwrap();
    assert_eq!(log_lines(&paths_b.log()), main);
    assert_eq!(
        log_lines(&paths_b.dir.join("stage1/log.jsonl")),
        log_lines(&paths.dir.join("stage1/log.jsonl"))
    );
    let (a, _) = checkpoint::load(&paths.checkpoint()).unwrap();
    let (b, _) = checkpoint::load(&paths_b.checkpoint()).unwrap();
    assert_eq!(a, b, "the final checkpoints differ");
    assert!(a.keys().any(|k| k.starts_with("teacher/params/")));

    // `metaseg predict` segments with the student's momentum copy, as validation does.
    let trainer = run::restore_trainer(&g, &config, Stage::Main, 1, &paths).unwrap();
    let trained = SavedRun::read(&paths.dir).unwrap().network(&g, 1).unwrap();
    let copy = host(&state(&trainer).momentum.params);
    assert_eq!(host(&trained.params), copy);
    let student = host(&trainer.student.weights.params);
    assert_ne!(student, copy, "the copy lags the student");
}

#[test]
fn the_offline_teacher_is_where_teacher_start_says_at_the_end() {
    let g = gpu();
    for (start, stage1_prefix) in [("momentum", "momentum/params"), ("teacher", "params")] {
        let config = tiny(&[
            "online_pl.online=false",
            &format!("online_pl.teacher_start=\"{start}\""),
            "iterations=2",
        ]);
        let data = run::load_data(&config).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let paths = RunPaths {
            dir: dir.path().to_path_buf(),
        };
        run::train(&g, &config, &data, &paths, RunOptions::default()).unwrap();
        let stage1 = tensors(&stage1(&config).paths(&paths).checkpoint(), stage1_prefix);
        let teacher = tensors(&paths.checkpoint(), "teacher/params");
        assert_eq!(teacher, stage1, "teacher_start = {start}");
        let student = tensors(&paths.checkpoint(), "params");
        assert_ne!(student, stage1, "the student trained");
    }
}

#[test]
fn online_pl_configuration_mistakes_name_the_key() {
    let load = |set: &str| {
        TrainConfig::load("default", &["method=online-pl".into(), set.into()]).unwrap_err()
    };
    for (set, key) in [
        ("online_pl.teacher_start=student", "online_pl.teacher_start"),
        ("online_pl.student_init=x", "online_pl.student_init"),
        (
            "online_pl.teacher_momentum=1.5",
            "online_pl.teacher_momentum",
        ),
        (
            "online_pl.student_momentum=-0.1",
            "online_pl.student_momentum",
        ),
        ("online_pl.teacher_ema=2", "online_pl.teacher_ema"),
        ("online_pl.beta=-1", "online_pl.beta"),
        (
            "online_pl.stage1_iterations=0",
            "online_pl.stage1_iterations",
        ),
        ("online_pl.momentum=0.9", "online_pl.momentum"),
        ("online_pl.online=3", "online_pl.online"),
    ] {
        let err = load(set);
        assert!(err.to_string().contains(key), "{set}: {err}");
    }
    let config = TrainConfig::load("online-pl", &[]).unwrap();
    assert_eq!(config.method, Method::OnlinePl);
    assert_eq!(config.online_pl.beta, 0.3);
    assert_eq!(
        config.first_stage_iterations(),
        config.online_pl.stage1_iterations
    );
}
