//! IDEAL on a tiny configuration: the key encoder is the momentum copy of the query encoder, the
//! hard labels of cross pseudo supervision are the argmax's one-hot, the fine-tuning loss is the
//! weighted sum of its logged terms, the pre-trained encoder is written on its own and loads into
//! the fine-tuning network (also from `ideal.encoder`, without pre-training), and a resumed run
//! repeats the uninterrupted one.

mod common;

use common::{gpu, log_lines, logged};
use metaseg::gpu::Gpu;
use metaseg::nn::{NetBackend, ParamStore};
use metaseg::train::checkpoint;
use metaseg::train::config::TrainConfig;
use metaseg::train::methods::ideal::{
    encoder_stem, hard_labels, is_encoder, load_encoder, pretraining, view_flips, Pretraining,
};
use metaseg::train::methods::{FirstStage, Method, Stage};
use metaseg::train::run::{self, RunOptions, RunPaths};
use metaseg::train::trainer::Trainer;
use metaseg_autograd::{Shape, Tolerance, Var};

/// 16^3 volumes, 8^3 patches, a 2-level V-Net of width 4; 2 labeled, 3 unlabeled, 1 test case; 2
/// iterations of pre-training and 3 of fine-tuning.
fn tiny(extra: &[&str]) -> TrainConfig {
    let mut sets: Vec<String> = [
        "method=ideal",
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
        "ideal.pretrain_iterations=2",
        "ideal.embedding=4",
        "ideal.rampup=0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    sets.extend(extra.iter().map(|s| s.to_string()));
    TrainConfig::load("default", &sets).unwrap()
}

fn pretraining_of(config: &TrainConfig) -> FirstStage {
    pretraining(config).expect("no ideal.encoder: a pre-training stage")
}

/// The fine-tuning network before its first step, its encoder from the file at `stem`.
fn fine_tuning_trainer(
    g: &Gpu,
    config: &TrainConfig,
    stem: &std::path::Path,
) -> run::Result<Trainer<Gpu>> {
    let mut trainer = Trainer::new(g, config, 1)?;
    load_encoder(g, &mut trainer.student.weights, stem)?;
    Ok(trainer)
}

fn flat<B: NetBackend>(store: &ParamStore<B>) -> Vec<f64> {
    let backend = store.values()[0].backend();
    Var::constant(backend, store.flat().unwrap())
        .to_f64()
        .unwrap()
}

#[test]
fn the_key_encoder_follows_the_query_encoder_by_its_momentum() {
    let g = gpu();
    let first = pretraining_of(&tiny(&["ideal.key_momentum=0.9"]));
    let config = first.config;
    let data = run::load_data(&config).unwrap();
    let mut trainer = Trainer::at(&g, &config, Stage::First, 1).unwrap();
    let key_encoder =
        |t: &Trainer<Gpu>| flat(&t.state::<Pretraining<Gpu>>().unwrap().key_encoder.params);
    let batch = run::device_batch(&g, &trainer, &data, 0).unwrap();
    assert_eq!(
        batch.x.shape().dims()[0],
        config.batch.labeled + config.batch.unlabeled,
        "labeled and unlabeled patches"
    );
    for t in 0..2 {
        let key = key_encoder(&trainer);
        let log = trainer.step(&batch, t).unwrap();
        let loss = logged(&log, "loss");
        assert!(loss.is_finite() && loss > 0.0, "{log:?}");
        let query = flat(&trainer.student.weights.params);
        let expected: Vec<f64> = key
            .iter()
            .zip(&query)
            .map(|(k, q)| 0.9 * k + 0.1 * q)
            .collect();
        let got = key_encoder(&trainer);
        Tolerance::new(1e-6, 1e-5).assert("key encoder", &got, &expected);
        assert_ne!(got, query, "the key encoder lags");
    }
    for t in 0..64 {
        let axes = view_flips(config.seed, t, [8, 8, 8]);
        assert!(!axes.is_empty() && axes.iter().all(|&a| a < 3), "{axes:?}");
        assert!(!view_flips(config.seed, t, [1, 8, 8]).contains(&0));
    }
}

#[test]
fn hard_labels_are_the_one_hot_of_the_argmax() {
    let g = gpu();
    let shape = Shape::from([2, 3, 2, 3, 5]);
    let values = metaseg_autograd::check::seeded(shape.numel(), 21, -2.0, 2.0);
    let logits = Var::from_f64(&g, &values, &shape, true).unwrap();
    let hard = hard_labels(&logits).unwrap().to_f64().unwrap();
    let s = 30;
    for n in 0..2 {
        for v in 0..s {
            let at = |c: usize| (n * 3 + c) * s + v;
            let best = (0..3)
                .max_by(|&a, &b| values[at(a)].total_cmp(&values[at(b)]))
                .unwrap();
            for c in 0..3 {
                assert_eq!(
                    hard[at(c)],
                    f64::from(u8::from(c == best)),
                    "n {n} v {v} c {c}"
                );
            }
        }
    }
}

#[test]
fn the_fine_tuning_loss_is_the_weighted_sum_of_its_logged_terms() {
    let g = gpu();
    let config = tiny(&["ideal.cps=0.5"]);
    let data = run::load_data(&config).unwrap();
    let mut trainer = Trainer::new(&g, &config, 1).unwrap();
    let batch = run::device_batch(&g, &trainer, &data, 0).unwrap();
    let log = trainer.step(&batch, 0).unwrap();
    assert_eq!(logged(&log, "cps_weight"), 0.5, "no ramp-up");
    let supervised = 0.5
        * (logged(&log, "ce")
            + logged(&log, "dice")
            + logged(&log, "ce_b")
            + logged(&log, "dice_b"));
    let expected = supervised + 0.5 * logged(&log, "cps");
    assert!((logged(&log, "loss") - expected).abs() < 1e-5, "{log:?}");
    assert!(logged(&log, "cps") > 0.0, "{log:?}");
}

#[test]
fn the_pretrained_encoder_is_saved_alone_and_loads_into_the_fine_tuning_network() {
    let g = gpu();
    let config = tiny(&[]);
    let data = run::load_data(&config).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let paths = RunPaths {
        dir: dir.path().to_path_buf(),
    };
    let summary = run::train(&g, &config, &data, &paths, RunOptions::default()).unwrap();
    assert_eq!(summary.iterations, 5, "2 of pre-training, 3 of fine-tuning");
    let pretrain_log = log_lines(&pretraining_of(&config).paths(&paths).log());
    assert_eq!(pretrain_log.len(), 2);
    assert!(pretrain_log
        .iter()
        .all(|l| l.get("validation_dice").is_none()));

    // The file holds the query encoder's tensors and nothing else.
    let stem = encoder_stem(&paths);
    let (file, sidecar) = checkpoint::load(&stem).unwrap();
    assert_eq!(sidecar.step, 2);
    let (pretrained, _) =
        checkpoint::load(&pretraining_of(&config).paths(&paths).checkpoint()).unwrap();
    assert!(!file.is_empty());
    for (name, tensor) in &file {
        let (_, bare) = name.split_once('/').unwrap();
        assert!(is_encoder(bare), "{name}");
        assert_eq!(Some(tensor), pretrained.get(name), "{name}");
    }
    let encoder_count = pretrained
        .keys()
        .filter(|k| k.starts_with("params/") && is_encoder(&k[7..]))
        .count();
    assert_eq!(
        file.keys().filter(|k| k.starts_with("params/")).count(),
        encoder_count
    );

    // Fine-tuning starts from it: encoder from the file, decoders as a fresh network's.
    let started = fine_tuning_trainer(&g, &config, &stem).unwrap();
    let started = &started.student.weights.params;
    let fresh = Trainer::new(&g, &config, 1).unwrap();
    let fresh = &fresh.student.weights.params;
    let mut second = 0;
    for (i, spec) in started.specs().iter().enumerate() {
        let got = started.values()[i].to_f64().unwrap();
        if is_encoder(&spec.name) {
            let want: Vec<f64> = file[&format!("params/{}", spec.name)]
                .data
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            assert_eq!(got, want, "{}", spec.name);
        } else {
            assert_eq!(got, fresh.values()[i].to_f64().unwrap(), "{}", spec.name);
            second += usize::from(spec.name.starts_with("b."));
        }
    }
    assert!(second > 0, "the fine-tuning network has a second decoder");

    // `ideal.encoder` fine-tunes from a saved encoder without pre-training.
    let given = tempfile::tempdir().unwrap();
    let paths_b = RunPaths {
        dir: given.path().to_path_buf(),
    };
    let encoder = format!(
        "ideal.encoder=\"{}\"",
        stem.with_extension("safetensors").display()
    );
    let config_b = tiny(&[&encoder]);
    assert_eq!(config_b.first_stage_iterations(), 0);
    let summary = run::train(&g, &config_b, &data, &paths_b, RunOptions::default()).unwrap();
    assert_eq!(summary.iterations, 3);
    assert!(!paths_b.sub("pretrain").dir.exists());
    assert_eq!(
        log_lines(&paths_b.log()),
        log_lines(&paths.log()),
        "the same fine-tuning"
    );

    let wrong = tiny(&[&encoder, "network.base_width=2"]);
    let Err(err) = fine_tuning_trainer(&g, &wrong, &stem) else {
        panic!("an encoder of another width loaded");
    };
    assert!(err.to_string().contains("encoder.safetensors"), "{err}");
}

#[test]
fn a_resumed_run_repeats_the_uninterrupted_one() {
    let g = gpu();
    let config = tiny(&[]);
    let data = run::load_data(&config).unwrap();
    let whole = tempfile::tempdir().unwrap();
    let paths = RunPaths {
        dir: whole.path().to_path_buf(),
    };
    run::train(&g, &config, &data, &paths, RunOptions::default()).unwrap();
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
    run::train(&g, &config, &data, &paths_b, stop(true, Some(4))).unwrap();
    run::train(&g, &config, &data, &paths_b, stop(true, None)).unwrap();
    assert_eq!(log_lines(&paths_b.log()), log_lines(&paths.log()));
    // A run that had not begun (a comparison's later seed) starts under `resume`.
    let unstarted = tempfile::tempdir().unwrap();
    let paths_c = RunPaths {
        dir: unstarted.path().join("seed-2"),
    };
    run::train(&g, &config, &data, &paths_c, stop(true, None)).unwrap();
    assert_eq!(log_lines(&paths_c.log()), log_lines(&paths.log()));
    let (a, _) = checkpoint::load(&paths.checkpoint()).unwrap();
    let (b, _) = checkpoint::load(&paths_b.checkpoint()).unwrap();
    assert_eq!(a, b, "the final checkpoints differ");
}

#[test]
fn ideal_configuration_mistakes_name_the_key() {
    let load = |sets: &[&str]| {
        let mut all = vec!["method=ideal".to_string()];
        all.extend(sets.iter().map(|s| s.to_string()));
        TrainConfig::load("default", &all).unwrap_err().to_string()
    };
    for (sets, key) in [
        (&["ideal.tau=0"][..], "ideal.tau"),
        (&["ideal.key_momentum=1.5"], "ideal.key_momentum"),
        (&["ideal.embedding=0"], "ideal.embedding"),
        (&["ideal.noise=-1"], "ideal.noise"),
        (&["ideal.cps=-0.1"], "ideal.cps"),
        (&["ideal.rampup_unit=0"], "ideal.rampup_unit"),
        (
            &["ideal.pretrain_iterations=0"],
            "ideal.pretrain_iterations",
        ),
        (&["network.kind=unet"], "network.kind"),
        (&["ideal.momentum=0.9"], "momentum"),
    ] {
        let err = load(sets);
        assert!(err.contains(key), "{sets:?}: {err}");
    }
    let config = TrainConfig::load("ideal", &[]).unwrap();
    assert_eq!(config.method, Method::Ideal);
    assert_eq!(config.ideal.cps, 0.1);
    assert_eq!(
        config.first_stage_iterations(),
        config.ideal.pretrain_iterations
    );
}
