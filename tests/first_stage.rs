//! Issue 23's guard between a first stage and the main stage, for every two-stage method: a first
//! stage whose network predicts no foreground on the labeled cases stops the run, naming the key
//! that lengthens it, before the main stage takes labels or weights from it; IDEAL's
//! pre-training, which trains an encoder and predicts nothing, hands on no prediction and passes.

mod common;

use common::gpu;
use metaseg::gpu::Gpu;
use metaseg::train::config::TrainConfig;
use metaseg::train::methods::FirstStage;
use metaseg::train::run::{self, RunData, RunError, RunOptions, RunPaths};
use metaseg_autograd::Backend;

/// 16^3 volumes, 8^3 patches, a 2-level V-Net of width 4; 2 labeled cases, 1 test case; 2
/// iterations of the first stage (`key`), 3 in all.
fn tiny(method: &str, key: &str, extra: &[&str]) -> TrainConfig {
    let mut sets: Vec<String> = [
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
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    sets.push(format!("method={method}"));
    sets.push(format!("{key}=2"));
    sets.extend(extra.iter().map(|s| s.to_string()));
    TrainConfig::load("default", &sets).unwrap()
}

/// The first stage of `config`, trained, and the run's data and directory.
fn trained_first_stage(
    g: &Gpu,
    config: &TrainConfig,
) -> (FirstStage, RunData, RunPaths, tempfile::TempDir) {
    let first = config.method.kind().first_stage(config).unwrap();
    let data = run::load_data(config).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let paths = RunPaths {
        dir: dir.path().to_path_buf(),
    };
    let first_only = RunOptions {
        stop_after: Some(first.config.iterations),
        ..RunOptions::default()
    };
    run::train(g, config, &data, &paths, first_only).unwrap();
    (first, data, paths, dir)
}

/// The first stage's network made to predict background everywhere (its head's weights 0, its
/// bias +-10), saved over its checkpoint.
fn silence(g: &Gpu, first: &FirstStage, paths: &RunPaths) {
    let mut network = first.restore(g, 1, paths).unwrap();
    let params = &network.student.weights.params;
    let silenced = params.specs().iter().zip(params.values()).map(|(spec, v)| {
        let mut values = v.to_f64().unwrap();
        match spec.name.as_str() {
            "head.weight" => values.fill(0.0),
            "head.bias" => values = vec![10.0, -10.0],
            _ => {}
        }
        g.tensor(&values, v.shape()).unwrap()
    });
    let silenced = params.with_values(silenced.collect()).unwrap();
    network.student.weights.params = silenced;
    let stem = first.paths(paths).checkpoint();
    run::save_checkpoint(&network, first.config.iterations, &stem).unwrap();
}

/// MLB-Seg's stage 0, online-pl's stage 1 and the local contrastive method's stage 1: each passes
/// the guard as trained, and stops the run once its student is silenced (online-pl's is the
/// network its main stage starts from with `student_init = "stage1"`; its momentum copy, which it
/// is evaluated by, is left as trained).
#[test]
fn a_first_stage_that_predicts_no_foreground_stops_every_two_stage_method() {
    let g = gpu();
    let resume = RunOptions {
        resume: true,
        ..RunOptions::default()
    };
    for (method, key, extra) in [
        ("mlb-seg", "mlb_seg.stage0_iterations", &[][..]),
        ("online-pl", "online_pl.stage1_iterations", &[][..]),
        (
            "local-contrastive",
            "local_contrastive.stage1_iterations",
            &["local_contrastive.embedding=4"][..],
        ),
    ] {
        let config = tiny(method, key, extra);
        let (first, data, paths, _dir) = trained_first_stage(&g, &config);
        assert_eq!(first.iterations_key, key);
        run::first_stage::check(&g, &first, &data, &paths)
            .unwrap_or_else(|e| panic!("{method}: trained, the guard passes: {e}"));
        silence(&g, &first, &paths);
        let after = run::first_stage::check(&g, &first, &data, &paths);
        assert!(after.is_err(), "{method}: silenced, the guard still passes");
        let Err(err) = run::train(&g, &config, &data, &paths, resume) else {
            panic!("{method}: the main stage ran after a silenced first stage");
        };
        let message = err.to_string();
        assert!(
            matches!(err, RunError::NoForeground { .. }),
            "{method}: {message}"
        );
        assert!(message.contains("at 0.000 %"), "{method}: {message}");
        assert!(message.contains(key), "{method}: {message}");
        assert!(!paths.log().exists(), "{method}: the main stage started");
    }
}

/// IDEAL's pre-training trains an encoder whose network is not validated: it hands on weights,
/// no prediction, and the guard lets it pass even silenced.
#[test]
fn ideal_pretraining_hands_on_no_prediction_and_passes_the_guard() {
    let g = gpu();
    let config = tiny("ideal", "ideal.pretrain_iterations", &[]);
    let (first, data, paths, _dir) = trained_first_stage(&g, &config);
    silence(&g, &first, &paths);
    run::first_stage::check(&g, &first, &data, &paths).unwrap();
}
