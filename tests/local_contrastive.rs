//! The local contrastive method on a tiny configuration: its step is the supervised loss plus
//! lambda times L_local, training lowers L_local on a fixed batch, the main run starts from the
//! stage-1 network with a fresh projection head, every round writes its pseudo-labels, and a run
//! interrupted inside stage 1, at a round boundary and inside a round repeats the uninterrupted one.

mod common;

use common::{gpu, log_lines, logged};
use metaseg::nn::{Mode, NetBackend, ParamStore};
use metaseg::train::checkpoint;
use metaseg::train::config::TrainConfig;
use metaseg::train::methods::local_contrastive::{pseudo_label_dir, stage1};
use metaseg::train::methods::Method;
use metaseg::train::pseudo_labels;
use metaseg::train::run::{self, RunData, RunOptions, RunPaths};
use metaseg::train::trainer::{DeviceBatch, Trainer};
use metaseg_autograd::{no_grad, Var};

/// 16^3 volumes, 8^3 patches, a 2-level V-Net of width 4 with 4 embedding channels; 2 labeled, 3
/// unlabeled, 1 test case; 2 iterations of stage 1, then 6 in 3 rounds of 2.
fn tiny(extra: &[&str]) -> TrainConfig {
    let mut sets: Vec<String> = [
        "method=local-contrastive",
        "iterations=6",
        "data.cases=6",
        "data.size=[16, 16, 16]",
        "data.labeled=2",
        "data.test=1",
        "network.base_width=4",
        "network.levels=2",
        "batch.patch=[8, 8, 8]",
        "batch.foreground=1.0",
        "log.validate_every=2",
        "log.checkpoint_every=2",
        "local_contrastive.stage1_iterations=2",
        "local_contrastive.embedding=4",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    sets.extend(extra.iter().map(|s| s.to_string()));
    TrainConfig::load("default", &sets).unwrap()
}

/// The run's cases with the unlabeled ones carrying their reference labels as pseudo-labels.
fn with_reference_labels(data: &RunData) -> RunData {
    let labels = data
        .unlabeled
        .iter()
        .map(|c| c.label.clone().unwrap())
        .collect();
    pseudo_labels::with_labels(data, labels)
}

/// L_local of the trainer's embeddings of `batch` with fixed anchors and a fixed training-mode
/// pass (dropout and batch statistics of step 0).
fn contrastive<B: NetBackend>(
    trainer: &Trainer<B>,
    batch: &DeviceBatch<B>,
    anchors: &Var<B>,
) -> f64 {
    let mode = Mode::Train {
        seed: trainer.config.seed,
        step: 0,
    };
    let out = no_grad(|| trainer.student.weights.run(&trainer.net, &batch.x, mode)).unwrap();
    let tau = trainer.config.local_contrastive.tau;
    let loss = out
        .embedding
        .expect("a projection head")
        .local_contrastive(&batch.y, Some(anchors), tau)
        .unwrap();
    loss.to_f64().unwrap()[0]
}

#[test]
fn the_step_is_supervised_plus_lambda_local_and_training_lowers_l_local_on_a_fixed_batch() {
    let g = gpu();
    let config = tiny(&["local_contrastive.lambda=1.0", "network.dropout=0.0"]);
    let data = with_reference_labels(&run::load_data(&config).unwrap());
    let mut trainer = Trainer::new(&g, &config, 1).unwrap();
    let batch = run::device_batch(&g, &trainer, &data, 0).unwrap();
    let n = config.batch.labeled + config.batch.unlabeled;
    assert_eq!(batch.x.shape().dims()[0], n);
    assert_eq!(batch.y.shape().dims()[0], n, "every patch carries labels");
    let anchors = batch.y.sample_anchors(3, 11).unwrap();
    let before = contrastive(&trainer, &batch, &anchors);
    for t in 0..12 {
        let log = trainer.step(&batch, t).unwrap();
        let expected =
            0.5 * (logged(&log, "ce") + logged(&log, "dice")) + logged(&log, "contrastive");
        let loss = logged(&log, "loss");
        assert!(
            (loss - expected).abs() < 1e-5 * expected.abs().max(1.0),
            "{log:?}"
        );
    }
    let after = contrastive(&trainer, &batch, &anchors);
    assert!(before.is_finite() && before > 0.0, "{before}");
    assert!(after < 0.8 * before, "L_local {before} -> {after}");
    // With one foreground class the denominator holds only the two positives (background is no
    // term of it), so ln 2 is the floor: reached when both class means and the anchors align.
    assert!(after >= std::f64::consts::LN_2 - 1e-4, "{after} below ln 2");
}

fn host<B: NetBackend>(store: &ParamStore<B>) -> Vec<Vec<f64>> {
    store.values().iter().map(|v| v.to_f64().unwrap()).collect()
}

#[test]
fn rounds_write_pseudo_labels_and_resume_as_the_uninterrupted_run() {
    let g = gpu();
    let config = tiny(&[]);
    let data = run::load_data(&config).unwrap();
    let whole = tempfile::tempdir().unwrap();
    let paths = RunPaths {
        dir: whole.path().to_path_buf(),
    };
    let summary = run::train(&g, &config, &data, &paths, RunOptions::default()).unwrap();
    assert_eq!(summary.iterations, 8, "2 of stage 1, 6 of the rounds");
    let main = log_lines(&paths.log());
    assert_eq!(main.len(), 6);
    for line in &main {
        let c = line["contrastive"].as_f64().unwrap();
        assert!(c.is_finite() && c >= 0.0, "{line}");
    }
    for r in 0..3 {
        let read = pseudo_labels::read(&data.unlabeled, &pseudo_label_dir(&paths, r)).unwrap();
        assert_eq!(read.len(), data.unlabeled.len(), "round {}", r + 1);
    }
    // Round 1's labels are stage 1's predictions.
    let stage1 = stage1(&config).restore(&g, 1, &paths);
    let stage1 = stage1.unwrap();
    let predicted: Vec<Vec<u8>> = data
        .unlabeled
        .iter()
        .map(|c| run::predict_case(&g, &stage1, c).unwrap())
        .collect();
    let round1 = pseudo_labels::read(&data.unlabeled, &pseudo_label_dir(&paths, 0)).unwrap();
    assert_eq!(round1, predicted);

    // Interrupted inside stage 1, at the boundary of rounds 1 and 2, inside round 3.
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
    assert_eq!(log_lines(&paths_b.log()).len(), 2);
    assert!(
        !pseudo_label_dir(&paths_b, 1).exists(),
        "round 2 has not begun"
    );
    run::train(&g, &config, &data, &paths_b, stop(true, Some(7))).unwrap();
    assert_eq!(log_lines(&paths_b.log()).len(), 5);
    run::train(&g, &config, &data, &paths_b, stop(true, None)).unwrap();
    assert_eq!(log_lines(&paths_b.log()), main);
    // Resumed once more, the finished run trains nothing, as the other methods' runs.
    let again = run::train(&g, &config, &data, &paths_b, stop(true, None)).unwrap();
    assert_eq!(again.iterations, 0);
    assert_eq!(log_lines(&paths_b.log()), main);
    let (a, _) = checkpoint::load(&paths.checkpoint()).unwrap();
    let (b, _) = checkpoint::load(&paths_b.checkpoint()).unwrap();
    assert_eq!(a, b, "the final checkpoints differ");
    for r in 0..3 {
        assert_eq!(
            pseudo_labels::read(&data.unlabeled, &pseudo_label_dir(&paths, r)).unwrap(),
            pseudo_labels::read(&data.unlabeled, &pseudo_label_dir(&paths_b, r)).unwrap(),
            "round {}",
            r + 1
        );
    }
}

#[test]
fn the_agreement_filter_records_each_cases_flip_dice() {
    let g = gpu();
    let config = tiny(&[
        "iterations=2",
        "local_contrastive.rounds=1",
        "local_contrastive.agreement=0.001",
    ]);
    let data = run::load_data(&config).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let paths = RunPaths {
        dir: dir.path().to_path_buf(),
    };
    run::train(&g, &config, &data, &paths, RunOptions::default()).unwrap();
    let text = std::fs::read_to_string(pseudo_label_dir(&paths, 0).join("agreement.json")).unwrap();
    let recorded: std::collections::BTreeMap<String, f64> = serde_json::from_str(&text).unwrap();
    // Recomputed from stage 1's network: the prediction against the flipped image's, flipped back.
    let stage1 = stage1(&config).restore(&g, 1, &paths);
    let stage1 = stage1.unwrap();
    assert_eq!(recorded.len(), data.unlabeled.len());
    for case in &data.unlabeled {
        let plain = run::predict_case(&g, &stage1, case).unwrap();
        let mut flipped = case.clone();
        let w = case.image.dims[2];
        flipped
            .image
            .data
            .chunks_mut(w)
            .for_each(|row| row.reverse());
        let mut back = run::predict_case(&g, &stage1, &flipped).unwrap();
        back.chunks_mut(w).for_each(|row| row.reverse());
        let dice = metaseg::eval::metrics::overlap(&plain, &back, |v| v > 0).dice();
        assert_eq!(recorded[&case.name], dice, "{}", case.name);
    }
}

#[test]
fn the_network_starts_from_stage_1_with_a_fresh_projection_head() {
    let g = gpu();
    let config = tiny(&["iterations=3", "local_contrastive.rounds=1"]);
    let data = run::load_data(&config).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let paths = RunPaths {
        dir: dir.path().to_path_buf(),
    };
    let options = RunOptions {
        stop_after: Some(2),
        ..RunOptions::default()
    };
    run::train(&g, &config, &data, &paths, options).unwrap();
    let stage1 = stage1(&config).restore(&g, 1, &paths);
    let stage1 = stage1.unwrap();
    let fresh = Trainer::new(&g, &config, 1).unwrap();
    let (stage1, fresh) = (&stage1.student.weights, &fresh.student.weights);
    let started = fresh.params.with_matching(&stage1.params).unwrap();
    let (specs, values) = (started.specs(), host(&started));
    let (stage1_values, fresh_values) = (host(&stage1.params), host(&fresh.params));
    let mut head = 0;
    for (i, spec) in specs.iter().enumerate() {
        match stage1
            .params
            .specs()
            .iter()
            .position(|s| s.name == spec.name)
        {
            Some(j) => assert_eq!(values[i], stage1_values[j], "{}", spec.name),
            None => {
                assert!(spec.name.starts_with("projection."), "{}", spec.name);
                assert_eq!(values[i], fresh_values[i], "{}", spec.name);
                head += 1;
            }
        }
    }
    assert!(head > 0, "the main network has a projection head");
}

#[test]
fn local_contrastive_configuration_mistakes_name_the_key() {
    let load = |sets: &[&str]| {
        let mut all = vec!["method=local-contrastive".to_string()];
        all.extend(sets.iter().map(|s| s.to_string()));
        TrainConfig::load("default", &all).unwrap_err().to_string()
    };
    for (sets, key) in [
        (
            &["local_contrastive.rounds=0"][..],
            "local_contrastive.rounds",
        ),
        (
            &["local_contrastive.rounds=1000"],
            "local_contrastive.rounds",
        ),
        (&["local_contrastive.tau=0"], "local_contrastive.tau"),
        (&["local_contrastive.lambda=-1"], "local_contrastive.lambda"),
        (
            &["local_contrastive.anchors=0"],
            "local_contrastive.anchors",
        ),
        (
            &["local_contrastive.anchors=17"],
            "local_contrastive.anchors",
        ),
        (
            &["local_contrastive.agreement=1"],
            "local_contrastive.agreement",
        ),
        (&["local_contrastive.init=best"], "local_contrastive.init"),
        (
            &["local_contrastive.stage1_iterations=0"],
            "local_contrastive.stage1_iterations",
        ),
        (&["batch.unlabeled=1"], "batch.labeled + batch.unlabeled"),
        (&["network.kind=unet"], "network.kind"),
        (&["local_contrastive.temperature=1"], "temperature"),
    ] {
        let err = load(sets);
        assert!(err.contains(key), "{sets:?}: {err}");
    }
    let config = TrainConfig::load("local-contrastive", &[]).unwrap();
    assert_eq!(config.method, Method::LocalContrastive);
    assert_eq!(
        (
            config.local_contrastive.rounds,
            config.local_contrastive.lambda
        ),
        (3, 0.1)
    );
    assert_eq!(
        config.first_stage_iterations(),
        config.local_contrastive.stage1_iterations
    );
}
