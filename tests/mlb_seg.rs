//! MLB-Seg on a tiny configuration: the views' labels and enhanced labels, L_cons, the meta
//! weights (a distribution, the same on both meta paths, moving with the network), stage 0's
//! initial labels on disk, a trained run with finite losses and weight maps, and resumption
//! inside stage 0 and inside the main stage repeating the uninterrupted run.

mod common;

use common::{gpu, log_lines};
use metaseg::data::nifti;
use metaseg::gpu::Gpu;
use metaseg::nn::Mode;
use metaseg::train::config::TrainConfig;
use metaseg::train::methods::mlb_seg::start::{self, stage0};
use metaseg::train::methods::mlb_seg::step::{
    class_balance, meta_batch_loss, meta_weights, normalised, step_in, unlabeled_terms,
    weighted_meta_batch_loss, Trace,
};
use metaseg::train::methods::mlb_seg::views::{Average, Views, VIEWS};
use metaseg::train::methods::mlb_seg::MlbSeg;
use metaseg::train::methods::Method;
use metaseg::train::run::{self, RunError, RunOptions, RunPaths};
use metaseg::train::trainer::{slice_batch, supervised_loss, Context, Trainer};
use metaseg_autograd::{Backend, Cpu64, Shape, Tolerance, Var};

/// 16^3 volumes, 8^3 patches, a 2-level V-Net of width 4; 2 labeled, 3 unlabeled, 1 test case;
/// 2 stage-0 and 3 main iterations.
fn tiny(extra: &[&str]) -> TrainConfig {
    let mut sets: Vec<String> = [
        "method=mlb-seg",
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
        "mlb_seg.stage0_iterations=2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    sets.extend(extra.iter().map(|s| s.to_string()));
    TrainConfig::load("default", &sets).unwrap()
}

/// Views of 12^3 patches with every zoom offset 2 voxels (4 at a 24-voxel reference).
fn view_config() -> TrainConfig {
    tiny(&[
        "batch.patch=[12, 12, 12]",
        "mlb_seg.zoom_range=[4, 4]",
        "mlb_seg.zoom_reference=24.0",
    ])
}

/// Every view of every sample predicting `p` for the foreground everywhere: [K * S, 2, patch].
fn constant_prediction(samples: usize, patch: [usize; 3], p: f64) -> Var<Cpu64> {
    let voxels: usize = patch.iter().product();
    let mut values = Vec::new();
    for _ in 0..VIEWS * samples {
        values.extend(std::iter::repeat_n(1.0 - p, voxels));
        values.extend(std::iter::repeat_n(p, voxels));
    }
    let [d, h, w] = patch;
    Var::from_f64(
        &Cpu64,
        &values,
        &Shape::from([VIEWS * samples, 2, d, h, w]),
        false,
    )
    .unwrap()
}

/// Foreground voxels of row `row` of one-hot labels [N, 2, voxels].
fn foreground(labels: &[f64], row: usize, voxels: usize) -> usize {
    let fg = &labels[(2 * row + 1) * voxels..(2 * row + 2) * voxels];
    fg.iter().filter(|&&v| v == 1.0).count()
}

#[test]
fn view_labels_stay_one_hot_and_enhanced_labels_average_by_coverage() {
    let config = view_config();
    let patch = config.batch.patch;
    let voxels: usize = patch.iter().product();
    let views = Views::draw(&config, 3, 0, 2);
    assert_eq!(views, Views::draw(&config, 3, 0, 2), "the draws repeat");
    assert_ne!(
        views,
        Views::draw(&config, 4, 0, 2),
        "and depend on the iteration"
    );

    // One-hot labels of a random mask stay one-hot in every view (zoom-out padding: background).
    let [d, h, w] = patch;
    let fg: Vec<f64> = (0..2 * voxels)
        .map(|i| {
            f64::from(u8::from(
                metaseg_autograd::random::uniform(5, i as u64) < 0.3,
            ))
        })
        .collect();
    let mut y = Vec::new();
    for s in 0..2 {
        y.extend(fg[s * voxels..(s + 1) * voxels].iter().map(|v| 1.0 - v));
        y.extend_from_slice(&fg[s * voxels..(s + 1) * voxels]);
    }
    let y = Var::from_f64(&Cpu64, &y, &Shape::from([2, 2, d, h, w]), false).unwrap();
    let labels = views.labels(&y).unwrap().to_f64().unwrap();
    assert_eq!(labels.len(), VIEWS * 2 * 2 * voxels);
    for row in 0..VIEWS * 2 {
        for v in 0..voxels {
            let (bg, fg) = (
                labels[2 * row * voxels + v],
                labels[(2 * row + 1) * voxels + v],
            );
            assert!(
                bg + fg == 1.0 && bg * fg == 0.0,
                "row {row} voxel {v}: {bg}, {fg}"
            );
        }
    }

    // Every view predicts foreground 0.55. Averaged by coverage the original frame is 0.55
    // everywhere: the identity and flip views are all foreground, the zoom-outs background in
    // their padding only. Divided by K instead, the corners the zoom-in does not cover get
    // 4/5 of 0.55 = 0.44: background.
    let p = constant_prediction(2, patch, 0.55);
    let covered = views.enhanced_labels(&p, Average::Coverage).unwrap();
    let covered = covered.to_f64().unwrap();
    let by_views = views.enhanced_labels(&p, Average::Views).unwrap();
    let by_views = by_views.to_f64().unwrap();
    for s in 0..2 {
        // Rows are view-major: identity s, zoom-in 2 + s, zoom-outs 4 + s and 6 + s, flip 8 + s.
        assert_eq!(foreground(&covered, s, voxels), voxels);
        assert_eq!(foreground(&covered, 8 + s, voxels), voxels);
        let zoom_out = foreground(&covered, 4 + s, voxels);
        assert!(0 < zoom_out && zoom_out < voxels, "{zoom_out} of {voxels}");
        let identity = foreground(&by_views, s, voxels);
        assert!(0 < identity && identity < voxels, "{identity} of {voxels}");
        assert!(
            by_views[(2 * s + 1) * voxels] == 0.0,
            "a corner is background"
        );
    }
}

#[test]
fn unlabeled_patches_carry_their_initial_labels_placed_as_their_images() {
    use metaseg::data::Volume;
    use metaseg::train::batch::{sample, LoadedCase, Sampling};
    // Images equal to their labels (0 or 1): any misplacement shows.
    let case = |name: &str, seed: u64| {
        let dims = [6, 9, 8];
        let label: Vec<u8> = (0..6 * 9 * 8)
            .map(|i| u8::from(metaseg_autograd::random::uniform(seed, i) < 0.3))
            .collect();
        let image = label.iter().map(|&l| f32::from(l)).collect();
        LoadedCase {
            name: name.into(),
            image: Volume::new(image, dims, [1.0; 3]).unwrap(),
            label: Some(label),
        }
    };
    let (labeled, unlabeled) = ([case("a", 1)], [case("b", 2), case("c", 3)]);
    let s = Sampling {
        patch: [4, 5, 5],
        foreground: 0.5,
        rotate_flip: true,
        intensity: 0.0,
        noise: 0.0,
        unlabeled_labels: true,
    };
    let voxels = 100;
    for it in 0..10 {
        let b = sample(&labeled, &unlabeled, (1, 2), 2, &s, 7, it);
        assert_eq!(b.labels.len(), 3 * 2 * voxels);
        for n in 0..3 {
            let image = &b.images[n * voxels..(n + 1) * voxels];
            let fg = &b.labels[(2 * n + 1) * voxels..(2 * n + 2) * voxels];
            assert_eq!(image, fg, "iteration {it}, sample {n}");
        }
        // The images are those of the batch without labels for the unlabeled patches.
        let plain = Sampling {
            unlabeled_labels: false,
            ..s
        };
        let without = sample(&labeled, &unlabeled, (1, 2), 2, &plain, 7, it);
        assert_eq!(b.images, without.images);
        assert_eq!(without.labels.len(), 2 * voxels);
    }
}

#[test]
fn l_cons_is_zero_for_agreeing_views_and_positive_otherwise() {
    let config = view_config();
    let patch = config.batch.patch;
    let views = Views::draw(&config, 1, 0, 1);
    let constant = constant_prediction(1, patch, 0.3);
    let cons = views.consistency(&constant).unwrap().item().unwrap();
    assert!(
        cons.abs() < 1e-12,
        "constant predictions disagree by {cons}"
    );

    // A ramp along every axis is not symmetric under the flip, nor under the zooms.
    let [d, h, w] = patch;
    let mut values = Vec::new();
    for _ in 0..VIEWS {
        for c in 0..2 {
            for i in 0..d * h * w {
                let ramp = (i / (h * w) + i / w % h + i % w) as f64 / (d + h + w) as f64;
                values.push(if c == 1 { ramp } else { 1.0 - ramp });
            }
        }
    }
    let ramp = Var::from_f64(&Cpu64, &values, &Shape::from([VIEWS, 2, d, h, w]), true).unwrap();
    let cons = views.consistency(&ramp).unwrap();
    assert!(cons.item().unwrap() > 1e-4, "{}", cons.item().unwrap());
    // It is differentiable in every view.
    let g = metaseg_autograd::grad(&cons, &[&ramp], None, false).unwrap();
    let g = g[0].to_f64().unwrap();
    let per_view = g.len() / VIEWS;
    for k in 0..VIEWS {
        let norm: f64 = g[k * per_view..(k + 1) * per_view]
            .iter()
            .map(|v| v * v)
            .sum();
        assert!(norm > 0.0, "view {k} gets no gradient");
    }
}

#[test]
fn meta_weights_are_a_distribution_agree_on_both_paths_and_move_with_the_network() {
    let g = gpu();
    let config = tiny(&[]);
    // The embedded set labels its unlabeled cases too: here they serve as initial labels.
    let data = run::load_data(&config).unwrap();
    let channels = data.labeled[0].image.channels;
    let mut trainer = Trainer::new(&g, &config, channels).unwrap();
    let batch = run::device_batch(&g, &trainer, &data, 0).unwrap();
    let (l, u) = (config.batch.labeled, config.batch.unlabeled);
    assert_eq!(
        batch.y.shape().dims()[0],
        l + u,
        "unlabeled patches carry labels"
    );
    let slice = |x: &Var<_>, start, len| slice_batch(x, start, len).unwrap();
    let (x_m, y_m) = (slice(&batch.x, 0, l), slice(&batch.y, 0, l));
    let (x_u, y_u) = (slice(&batch.x, l, u), slice(&batch.y, l, u));
    let weights = |trainer: &Trainer<Gpu>| {
        let (cx, student) = (trainer.context(), &trainer.student);
        let teacher = &trainer.state::<MlbSeg<Gpu>>().unwrap().teacher;
        let (terms, _) = unlabeled_terms(&cx, &student.weights, teacher, &x_u, &y_u, l, 0).unwrap();
        let w = meta_weights(&cx, student, &terms, (&x_m, &y_m), 0.01, 0).unwrap();
        let [d, h, w3] = config.batch.patch;
        assert_eq!(w.shape(), &Shape::from([VIEWS * u, 2, d, h, w3]));
        w.to_f64().unwrap()
    };
    let fast = weights(&trainer);
    let total: f64 = fast.iter().sum();
    assert!((total - 1.0).abs() < 1e-4, "the weights sum to {total}");
    assert!(fast.iter().all(|&w| w >= 0.0));
    assert!(fast.contains(&0.0), "clip leaves some costs out");

    trainer.config.mlb_seg.meta_path = "reverse".into();
    let reverse = weights(&trainer);
    let scale = fast.iter().fold(0.0f64, |m, v| m.max(*v));
    Tolerance::new(1e-3 * scale, 1e-3).assert("fast vs reverse weights", &fast, &reverse);
    // With Dice in the meta loss (mlb_seg.meta_batch_dice) the paths agree too, on other weights.
    trainer.config.mlb_seg.meta_batch_dice = true;
    let dice_reverse = weights(&trainer);
    trainer.config.mlb_seg.meta_path = "fast".into();
    let dice_fast = weights(&trainer);
    let dice_scale = dice_fast.iter().fold(0.0f64, |m, v| m.max(*v));
    Tolerance::new(1e-3 * dice_scale, 1e-3).assert(
        "fast vs reverse weights, Dice meta loss",
        &dice_fast,
        &dice_reverse,
    );
    let changed = fast
        .iter()
        .zip(&dice_fast)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
    assert!(changed > 1e-2 * scale, "Dice left the weights as they were");
    trainer.config.mlb_seg.meta_batch_dice = false;

    let log = trainer.step(&batch, 0).unwrap();
    let value = |name: &str| log.iter().find(|(n, _)| *n == name).unwrap().1;
    assert!(log.iter().all(|(_, v)| v.is_finite()), "{log:?}");
    let shares = value("weight_init") + value("weight_ple");
    assert!((shares - 1.0).abs() < 1e-4, "{log:?}");
    // The logged foreground share of the initial labels' views, against the host's count. The
    // views depend on the step and batch slots only, so these are the step's.
    let y_views = Views::draw(&config, 0, l, u).labels(&y_u).unwrap();
    let y_init = y_views.to_f64().unwrap();
    let dims = y_views.shape().dims();
    let voxels: usize = dims[2..].iter().product();
    let foreground: f64 = y_init
        .chunks(voxels)
        .enumerate()
        .filter(|(row, _)| row % dims[1] != 0)
        .map(|(_, class)| class.iter().sum::<f64>())
        .sum();
    let expected = foreground / (dims[0] * voxels) as f64;
    assert!(
        expected > 0.0,
        "the tiny set's unlabeled patches hold foreground"
    );
    assert!(
        (value("init_foreground") - expected).abs() < 1e-5,
        "{log:?}"
    );
    assert!((0.0..=1.0).contains(&value("ple_foreground")), "{log:?}");
    let after = weights(&trainer);
    let moved = fast
        .iter()
        .zip(&after)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
    assert!(moved > 1e-2 * scale, "the weights did not change: {moved}");
}

#[test]
fn the_ple_mode_flag_takes_the_enhanced_labels_from_an_eval_mode_pass() {
    let g = gpu();
    let config = tiny(&[]);
    let data = run::load_data(&config).unwrap();
    let mut trainer = Trainer::new(&g, &config, data.labeled[0].image.channels).unwrap();
    let batch = run::device_batch(&g, &trainer, &data, 0).unwrap();
    let (l, u) = (config.batch.labeled, config.batch.unlabeled);
    let x_u = slice_batch(&batch.x, l, u).unwrap();
    let y_u = slice_batch(&batch.y, l, u).unwrap();
    let ple = |trainer: &Trainer<Gpu>| {
        let (cx, student) = (trainer.context(), &trainer.student.weights);
        let teacher = &trainer.state::<MlbSeg<Gpu>>().unwrap().teacher;
        let (terms, _) = unlabeled_terms(&cx, student, teacher, &x_u, &y_u, l, 0).unwrap();
        terms.y_ple.to_f64().unwrap()
    };
    let train = ple(&trainer);
    trainer.config.mlb_seg.ple_mode = "eval".into();
    let eval = ple(&trainer);
    // The same views through the network in evaluation mode (no dropout, running statistics).
    let views = Views::draw(&config, 0, l, u);
    let x = views.images(&x_u).unwrap();
    let out = (trainer.student.weights)
        .run(&trainer.net, &x, Mode::Eval)
        .unwrap();
    let p = out.logits.softmax_channels().unwrap();
    let expected = views.enhanced_labels(&p, Average::Coverage).unwrap();
    assert_eq!(eval, expected.to_f64().unwrap());
    // The preset's dropout and batch statistics make the training-mode pass's labels differ.
    let differ = train.iter().zip(&eval).filter(|(a, b)| a != b).count();
    assert!(differ > 0, "the two modes gave the same PLE labels");
}

#[test]
fn both_stages_write_initial_labels_train_and_resume_as_the_uninterrupted_run() {
    let g = gpu();
    let case = "synth_002";
    let config = tiny(&[&format!("mlb_seg.save_weights=\"{case}\"")]);
    let data = run::load_data(&config).unwrap();
    assert!(data.unlabeled.iter().any(|c| c.name == case));
    let whole = tempfile::tempdir().unwrap();
    let paths = RunPaths {
        dir: whole.path().to_path_buf(),
    };
    let summary = run::train(&g, &config, &data, &paths, RunOptions::default()).unwrap();
    assert!(summary.final_loss.is_finite());
    assert_eq!(summary.iterations, 5, "2 of stage 0, 3 of the main stage");

    // The initial labels on disk are the stage-0 network's predictions, on each case's grid.
    let network = stage0(&config).restore(&g, 1, &paths).unwrap();
    let read =
        metaseg::train::pseudo_labels::read(&data.unlabeled, &start::initial_labels_dir(&paths));
    let read = read.unwrap();
    for (c, labels) in data.unlabeled.iter().zip(&read) {
        let file = start::initial_labels_dir(&paths).join(format!("{}.nii.gz", c.name));
        assert_eq!(nifti::read(&file).unwrap().dims, c.image.dims);
        assert_eq!(labels, &run::predict_case(&g, &network, c).unwrap());
    }

    let main = log_lines(&paths.log());
    assert_eq!(main.len(), 3);
    assert_eq!(log_lines(&paths.dir.join("stage0/log.jsonl")).len(), 2);
    for line in &main {
        for key in [
            "loss",
            "weighted_ce",
            "cons",
            "mt",
            "meta_ce",
            "weight_init",
            "ple_foreground",
        ] {
            assert!(line[key].as_f64().unwrap().is_finite(), "{key}: {line}");
        }
    }
    // Weight maps at the validations (steps 2 and 3): nonnegative, relative to uniform.
    for step in [2, 3] {
        for source in ["init", "ple"] {
            let file = paths
                .dir
                .join(format!("weights/{case}_{step}_{source}.nii.gz"));
            let map = nifti::read(&file).unwrap();
            assert_eq!(map.dims, config.batch.patch);
            assert!(map.data.iter().all(|&w| w >= 0.0 && w.is_finite()));
        }
    }

    // Interrupted inside stage 0, then inside the main stage.
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
        log_lines(&paths_b.dir.join("stage0/log.jsonl")),
        log_lines(&paths.dir.join("stage0/log.jsonl"))
    );
    let (a, _) = metaseg::train::checkpoint::load(&paths.checkpoint()).unwrap();
    let (b, _) = metaseg::train::checkpoint::load(&paths_b.checkpoint()).unwrap();
    assert_eq!(a, b, "the final checkpoints differ");
}

#[test]
fn the_meta_batch_dice_flag_gives_the_meta_batch_the_baselines_loss() {
    // Zero logits (p = 1/2 for both classes) against labels with a quarter foreground: the CE is
    // ln 2 whatever the labels, the Dice term is not zero.
    let voxels = 4 * 4 * 4;
    let mut labels = Vec::new();
    for v in 0..voxels {
        labels.push(if v % 4 == 0 { 0.0 } else { 1.0 });
    }
    for v in 0..voxels {
        labels.push(if v % 4 == 0 { 1.0 } else { 0.0 });
    }
    let shape = Shape::from([1, 2, 4, 4, 4]);
    let y = Var::from_f64(&Cpu64, &labels, &shape, false).unwrap();
    let logits = Var::from_f64(&Cpu64, &vec![0.0; 2 * voxels], &shape, false).unwrap();
    let value = |v: Var<Cpu64>| v.value().data[0];

    let paper = meta_batch_loss(&tiny(&[]), &logits, &y).unwrap();
    Tolerance::F64.assert("CE", &[value(paper)], &[std::f64::consts::LN_2]);
    let flagged = meta_batch_loss(&tiny(&["mlb_seg.meta_batch_dice=true"]), &logits, &y).unwrap();
    let (ce, dice) = supervised_loss(&logits, &y).unwrap();
    let dice = value(dice);
    assert!(dice > 0.1, "Dice loss {dice}");
    Tolerance::F64.assert(
        "0.5 (CE + Dice)",
        &[value(flagged)],
        &[0.5 * (value(ce) + dice)],
    );
}

#[test]
fn mlb_seg_configuration_mistakes_name_the_key() {
    let err = TrainConfig::load(
        "default",
        &["method=mlb-seg".into(), "mlb_seg.weights=x".into()],
    )
    .unwrap_err();
    assert!(err.to_string().contains("mlb_seg.weights"), "{err}");
    let err = TrainConfig::load(
        "default",
        &["method=mlb-seg".into(), "mlb_seg.ple_mode=test".into()],
    )
    .unwrap_err();
    assert!(err.to_string().contains("mlb_seg.ple_mode"), "{err}");
    let err = TrainConfig::load(
        "default",
        &["method=mlb-seg".into(), "optimizer.kind=adam".into()],
    )
    .unwrap_err();
    assert!(err.to_string().contains("sgd"), "{err}");
    let err = TrainConfig::load(
        "default",
        &["method=mlb-seg".into(), "mlb_seg.zoom_range=[4, 60]".into()],
    )
    .unwrap_err();
    assert!(err.to_string().contains("zoom"), "{err}");
    let config = TrainConfig::load("mlb-seg", &[]).unwrap();
    assert_eq!(config.method, Method::MlbSeg);
    // A configuration written before ple_mode existed (a checkpoint's) reads as it ran.
    let text = std::fs::read_to_string("presets/mlb-seg.toml").unwrap();
    let old: String = text
        .lines()
        .filter(|l| !l.starts_with("ple_mode"))
        .map(|l| format!("{l}\n"))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.toml");
    std::fs::write(&path, old).unwrap();
    let config = TrainConfig::load(path.to_str().unwrap(), &[]).unwrap();
    assert_eq!(config.mlb_seg.ple_mode, "train");
    // And one written before mlb_seg.lr existed as the optimizer.lr it ran at.
    let old: String = text
        .lines()
        .filter(|l| *l != "lr = 0.0")
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(old, text);
    std::fs::write(&path, old).unwrap();
    let config = TrainConfig::load(path.to_str().unwrap(), &[]).unwrap();
    assert_eq!(config, TrainConfig::load("mlb-seg", &[]).unwrap());
}

/// Issue 23's guard: a stage 0 whose network predicts no foreground stops the run before the main
/// stage takes initial labels from it, with a message naming the key that lengthens stage 0.
#[test]
fn a_stage_0_that_predicts_no_foreground_stops_the_run() {
    let g = gpu();
    let config = tiny(&[]);
    let data = run::load_data(&config).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let paths = RunPaths {
        dir: dir.path().to_path_buf(),
    };
    let stage0_only = RunOptions {
        stop_after: Some(config.mlb_seg.stage0_iterations),
        ..RunOptions::default()
    };
    run::train(&g, &config, &data, &paths, stage0_only).unwrap();
    let first = stage0(&config);
    run::first_stage::check(&g, &first, &data, &paths).unwrap();

    // Its network made to predict background everywhere: the head's weights 0, its bias +-10.
    let mut network = first.restore(&g, 1, &paths).unwrap();
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
    let stem = first.paths(&paths).checkpoint();
    run::save_checkpoint(&network, config.mlb_seg.stage0_iterations, &stem).unwrap();

    let resume = RunOptions {
        resume: true,
        ..RunOptions::default()
    };
    let err = run::train(&g, &config, &data, &paths, resume).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, RunError::NoForeground { .. }), "{message}");
    assert!(message.contains("at 0.000 %"), "{message}");
    assert!(message.contains("mlb_seg.stage0_iterations"), "{message}");
    assert!(
        !start::initial_labels_dir(&paths).exists(),
        "no initial labels"
    );
    assert!(!paths.log().exists(), "the main stage did not start");
}

/// `mlb_seg.lr` sets the main stage's learning rate and nothing else: the first weighted update
/// scales with it while `optimizer.lr` (stage 0's) stays, a configuration naming it with
/// `optimizer.lr`'s value steps bit for bit as one without it, and stage 0's configuration (what
/// its checkpoint is compared with on resuming) leaves it out.
#[test]
fn the_main_stage_learning_rate_key_moves_the_main_stage_only() {
    let g = gpu();
    // No look-ahead movement at the first step (no momentum yet, no weight decay, no L_cons or
    // L_mt), so the weights do not depend on the rate and the first update is -lr clip(grad).
    let sets = ["optimizer.weight_decay=0", "mlb_seg.consistency=0"];
    let config = |extra: &[&str]| tiny(&[&sets[..], extra].concat());
    let data = run::load_data(&config(&[])).unwrap();
    let channels = data.labeled[0].image.channels;
    let flat = |store: &metaseg::nn::ParamStore<Gpu>| g.to_f64(&store.flat().unwrap()).unwrap();
    // theta before, theta after the weighted update, after the whole step, and the logged rate.
    let step = |config: &TrainConfig| {
        let mut trainer = Trainer::new(&g, config, channels).unwrap();
        let batch = run::device_batch(&g, &trainer, &data, 0).unwrap();
        let (l, u) = (config.batch.labeled, config.batch.unlabeled);
        let views = (Views::draw(config, 0, l, u), Views::draw(config, 0, 0, l));
        let mut teacher = trainer.student.weights.clone();
        let before = flat(&trainer.student.weights.params);
        let cx = Context {
            config: &trainer.config,
            net: &trainer.net,
        };
        let mut trace = Trace::new(true);
        let log = step_in(
            &cx,
            (&mut trainer.student, &mut teacher),
            &batch,
            views,
            0,
            &mut trace,
        )
        .unwrap();
        let theta_1 = trace.items.iter().find(|(n, _)| *n == "theta_1").unwrap();
        let theta_1 = theta_1.1.to_f64().unwrap();
        let after = flat(&trainer.student.weights.params);
        let lr = log.iter().find(|(n, _)| *n == "lr").unwrap().1;
        (before, theta_1, after, lr)
    };
    let plain = step(&config(&["optimizer.lr=0.01"]));
    let keyed = step(&config(&["optimizer.lr=0.05", "mlb_seg.lr=0.01"]));
    assert_eq!(
        plain.3, 0.01,
        "without the key the main stage runs at optimizer.lr"
    );
    assert_eq!((&plain.1, &plain.2, plain.3), (&keyed.1, &keyed.2, keyed.3));
    let slow = step(&config(&["optimizer.lr=0.01", "mlb_seg.lr=0.002"]));
    assert_eq!(slow.3, 0.002);
    assert_ne!(slow.2, plain.2);
    // The first update at a fifth of the rate is a fifth of the size, voxel for voxel.
    let moved = |s: &(Vec<f64>, Vec<f64>, Vec<f64>, f64)| -> Vec<f64> {
        s.0.iter().zip(&s.1).map(|(a, b)| b - a).collect()
    };
    let expected: Vec<f64> = moved(&plain).iter().map(|d| d / 5.0).collect();
    let scale = expected.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(scale > 0.0, "the first update moved nothing");
    // Each difference of two f32 parameters carries up to one rounding of theta's magnitude.
    let theta = plain.0.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let rounding = 2.0 * f64::from(f32::EPSILON) * theta;
    assert!(
        rounding < 1e-2 * scale,
        "{rounding} against updates of {scale}"
    );
    let tolerance = Tolerance::new(rounding + 1e-4 * scale, 1e-4);
    tolerance.assert("first update at lr / 5", &moved(&slow), &expected);

    // Stage 0 takes optimizer.lr whatever the key says, and its configuration is the same.
    let keyed = config(&["optimizer.lr=0.05", "mlb_seg.lr=0.01"]);
    let first = stage0(&keyed).config;
    assert_eq!(first, stage0(&config(&["optimizer.lr=0.05"])).config);
    assert_eq!((first.optimizer.lr, first.mlb_seg.lr), (0.05, 0.0));
    let err = TrainConfig::load(
        "default",
        &["method=mlb-seg".into(), "mlb_seg.lr=-1".into()],
    );
    assert!(err.unwrap_err().to_string().contains("mlb_seg.lr"));
}

/// A [N, 2, 2, 2, 2] tensor of values in [-1, 1) from stream `seed`.
fn random_maps(samples: usize, seed: u64) -> Var<Cpu64> {
    let n = samples * 2 * 8;
    let values: Vec<f64> = (0..n as u64)
        .map(|i| 2.0 * metaseg_autograd::random::uniform(seed, i) - 1.0)
        .collect();
    Var::from_f64(&Cpu64, &values, &Shape::from([samples, 2, 2, 2, 2]), false).unwrap()
}

#[test]
fn each_map_normalisation_gives_each_map_half_the_weight() {
    let (samples, voxels) = (3, 8);
    let g = random_maps(samples, 41);
    let values = g.to_f64().unwrap();
    // max(-g, 0) over the voxels selected by `keep`, divided by their total (+ clip's 1e-10).
    let clip = |keep: &dyn Fn(usize) -> bool, share: f64| -> Vec<f64> {
        let raw: Vec<f64> = (0..values.len())
            .map(|i| if keep(i) { (-values[i]).max(0.0) } else { 0.0 })
            .collect();
        let total: f64 = raw.iter().sum::<f64>() + 1e-10;
        raw.iter().map(|r| share * r / total).collect()
    };
    let map_of = |i: usize| (i / voxels) % 2;
    let both = normalised(&tiny(&[]), &g).unwrap().to_f64().unwrap();
    Tolerance::F64.assert("both maps", &both, &clip(&|_| true, 1.0));
    let each = tiny(&["mlb_seg.normalise_over=\"each_map\""]);
    let each = normalised(&each, &g).unwrap().to_f64().unwrap();
    let expected: Vec<f64> = (0..values.len())
        .map(|i| clip(&|j| map_of(j) == map_of(i), 0.5)[i])
        .collect();
    Tolerance::F64.assert("each map", &each, &expected);
    let init: f64 = (0..each.len())
        .filter(|&i| map_of(i) == 0)
        .map(|i| each[i])
        .sum();
    let split: f64 = (0..both.len())
        .filter(|&i| map_of(i) == 0)
        .map(|i| both[i])
        .sum();
    assert!(
        (init - 0.5).abs() < 1e-9,
        "the initial labels' map holds {init}"
    );
    assert!(
        (split - 0.5).abs() > 1e-3,
        "the test needs an uneven split, got {split}"
    );
}

#[test]
fn the_balanced_meta_loss_is_the_mean_of_each_classes_mean_ce() {
    // Random logits against labels with one voxel in eight foreground.
    let (samples, voxels) = (2, 8);
    let logits = random_maps(samples, 43);
    let z = logits.to_f64().unwrap();
    let fg = |s: usize, v: usize| (s * voxels + v) % 8 == 3;
    let mut labels = Vec::new();
    for s in 0..samples {
        labels.extend((0..voxels).map(|v| f64::from(u8::from(!fg(s, v)))));
        labels.extend((0..voxels).map(|v| f64::from(u8::from(fg(s, v)))));
    }
    let y = Var::from_f64(&Cpu64, &labels, &Shape::from([samples, 2, 2, 2, 2]), false).unwrap();
    // CE of one voxel: log(e^z0 + e^z1) - z_label.
    let (mut sums, mut counts) = ([0.0; 2], [0.0; 2]);
    for s in 0..samples {
        for v in 0..voxels {
            let (z0, z1) = (z[2 * s * voxels + v], z[(2 * s + 1) * voxels + v]);
            let c = usize::from(fg(s, v));
            sums[c] += (z0.exp() + z1.exp()).ln() - [z0, z1][c];
            counts[c] += 1.0;
        }
    }
    let balanced = 0.5 * (sums[0] / counts[0] + sums[1] / counts[1]);
    let mean = (sums[0] + sums[1]) / (counts[0] + counts[1]);
    let config = tiny(&["mlb_seg.meta_loss=\"balanced\""]);
    let weights = class_balance(&y).unwrap();
    let value = |v: Var<Cpu64>| v.value().data[0];
    let got = weighted_meta_batch_loss(&config, &logits, &y, Some(&weights)).unwrap();
    Tolerance::F64.assert("balanced CE", &[value(got)], &[balanced]);
    let plain = meta_batch_loss(&config, &logits, &y).unwrap();
    Tolerance::F64.assert("mean CE", &[value(plain)], &[mean]);
    assert!((balanced - mean).abs() > 1e-3, "{balanced} vs {mean}");
    // One class only: every voxel weighs 1, the plain mean.
    let background: Vec<f64> = (0..2 * samples * voxels)
        .map(|i| f64::from(u8::from((i / voxels) % 2 == 0)))
        .collect();
    let y = Var::from_f64(&Cpu64, &background, y.shape(), false).unwrap();
    let ones = class_balance(&y).unwrap().to_f64().unwrap();
    assert!(ones.iter().all(|&w| w == 1.0), "{ones:?}");
}

#[test]
fn the_ple_threshold_key_sets_where_the_enhanced_labels_turn_foreground() {
    let config = view_config();
    let patch = config.batch.patch;
    let voxels: usize = patch.iter().product();
    let views = Views::draw(&config, 3, 0, 2);
    // Every view predicts 0.4: the average by coverage is 0.4 wherever a view covers.
    let p = constant_prediction(2, patch, 0.4);
    let labels = |threshold| {
        let y = views.enhanced_labels_at(&p, Average::Coverage, threshold);
        y.unwrap().to_f64().unwrap()
    };
    let (paper, low) = (labels(0.5), labels(0.3));
    assert_eq!(
        paper,
        views
            .enhanced_labels(&p, Average::Coverage)
            .unwrap()
            .to_f64()
            .unwrap()
    );
    for s in 0..2 {
        assert_eq!(foreground(&paper, s, voxels), 0);
        assert_eq!(
            foreground(&low, s, voxels),
            voxels,
            "identity view of sample {s}"
        );
    }
    let err = TrainConfig::load(
        "default",
        &["method=mlb-seg".into(), "mlb_seg.ple_threshold=1".into()],
    );
    assert!(err
        .unwrap_err()
        .to_string()
        .contains("mlb_seg.ple_threshold"));
    for key in ["mlb_seg.meta_loss=\"x\"", "mlb_seg.normalise_over=\"x\""] {
        let err = TrainConfig::load("default", &["method=mlb-seg".into(), key.into()]);
        let name = key.split('=').next().unwrap();
        assert!(err.unwrap_err().to_string().contains(name), "{key}");
    }
}

/// Runs that differ only in the main stage's keys share one stage 0: its configuration holds
/// none of them (so `--resume --set` may change them at the stage boundary).
#[test]
fn stage_0_holds_no_main_stage_key() {
    let main = tiny(&[
        "mlb_seg.weights=\"softmax\"",
        "mlb_seg.meta_loss=\"balanced\"",
        "mlb_seg.normalise_over=\"each_map\"",
        "mlb_seg.ple_threshold=0.3",
        "mlb_seg.ple_mode=\"eval\"",
        "mlb_seg.clip=0",
        "mlb_seg.consistency=0",
    ]);
    assert_eq!(stage0(&main).config, stage0(&tiny(&[])).config);
    let longer = tiny(&["mlb_seg.stage0_iterations=5"]);
    assert_ne!(stage0(&longer).config, stage0(&tiny(&[])).config);
}
