//! Training runs on a tiny configuration: a resumed run continues exactly as an uninterrupted one,
//! a non-finite loss stops the run and keeps the last good checkpoint, the mean teacher follows the
//! student, the test figures reuse the last validation faithfully, and configuration mistakes are errors that name the key.

mod common;

use common::{gpu, log_lines};
use metaseg::nn::NetBackend;
use metaseg::train::augment::{warp_batch, RotateScale};
use metaseg::train::checkpoint::Parts;
use metaseg::train::config::TrainConfig;
use metaseg::train::methods::{Method, Stage, Training};
use metaseg::train::network::{Guarded, Learner, Weights};
use metaseg::train::run::{self, RunError, RunOptions, RunPaths};
use metaseg::train::trainer::{step_log, supervised_loss, Context, DeviceBatch, StepLog, Trainer};
use metaseg_autograd::{grad, Cpu64, Tolerance, Var};
use std::collections::BTreeSet;

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

    let a: Vec<_> = log_lines(&whole.path().join("log.jsonl"));
    let b: Vec<_> = log_lines(&parts.path().join("log.jsonl"));
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

/// Where [`Poisoned`] puts a NaN at its iteration.
#[derive(Clone, Copy, PartialEq)]
enum Fault {
    /// One element of the student's gradient, the loss staying finite.
    Gradient,
    /// One parameter of a network kept beside the student (a teacher that follows it).
    Teacher,
}

/// A supervised step with a teacher beside the student (saved and guarded as a method's
/// network), with a fault injected at iteration `at` (from 0).
struct Poisoned<B: NetBackend> {
    at: u64,
    fault: Fault,
    teacher: Weights<B>,
}

/// `v` with element 0 replaced by NaN (added on the device, so the rest is untouched).
fn with_nan<B: NetBackend>(v: &Var<B>) -> metaseg_autograd::Result<Var<B>> {
    let backend = v.backend();
    let mut nan = vec![0.0; v.shape().numel()];
    nan[0] = f64::NAN;
    v.add(&Var::constant(backend, backend.tensor(&nan, v.shape())?))
}

impl<B: NetBackend> Training<B> for Poisoned<B> {
    fn step(
        &mut self,
        cx: &Context<'_>,
        student: &mut Learner<B>,
        batch: &DeviceBatch<B>,
        t: u64,
    ) -> metaseg_autograd::Result<StepLog> {
        let out = student.weights.run(cx.net, &batch.x, cx.train_mode(t))?;
        let (ce, dice) = supervised_loss(&out.logits, &batch.y)?;
        let total = ce.add(&dice)?.scale(0.5)?;
        let wrt: Vec<&Var<B>> = student.weights.params.values().iter().collect();
        let mut grads = grad(&total, &wrt, None, false)?;
        if t == self.at && self.fault == Fault::Gradient {
            grads[0] = with_nan(&grads[0])?;
        }
        student.weights.keep_stats(&out.batch_stats)?;
        let lr = cx.lr(t);
        student.update(grads, cx.config.optimizer.clip, lr)?;
        self.teacher.follow_params(&student.weights, 0.9)?;
        if t == self.at && self.fault == Fault::Teacher {
            let mut values: Vec<_> = self
                .teacher
                .params
                .values()
                .iter()
                .map(|v| v.value().clone())
                .collect();
            values[1] = with_nan(&self.teacher.params.values()[1])?.value().clone();
            self.teacher.params = self.teacher.params.with_values(values)?;
        }
        step_log(&[("loss", total)], lr)
    }

    fn save(&self, parts: &mut Parts) -> run::Result<()> {
        parts.put_weights("teacher", &self.teacher)
    }

    fn networks(&mut self) -> Vec<(&'static str, Guarded<'_, B>)> {
        vec![("teacher", Guarded::Weights(&self.teacher))]
    }
}

/// Issue 25: the guard after every update. A NaN in one gradient element (the loss finite) or in
/// a teacher's parameter stops the run at that very iteration, naming the gradient norm or the
/// tensor, with the checkpoint of the iteration before kept; before the guard checked the
/// updates, the first was found one iteration later (a NaN loss) and the second only at the
/// next checkpoint save.
#[test]
fn a_non_finite_gradient_or_teacher_stops_the_run_at_that_iteration() {
    let g = gpu();
    let config = tiny("supervised", &["iterations=8", "log.checkpoint_every=2"]);
    let data = run::load_data(&config).unwrap();
    let channels = data.labeled[0].image.channels;
    for fault in [Fault::Gradient, Fault::Teacher] {
        let mut trainer = Trainer::new(&g, &config, channels).unwrap();
        let expected = match fault {
            Fault::Gradient => "the gradient norm of the student's update became NaN".to_string(),
            Fault::Teacher => format!(
                "the tensor 'teacher/params/{}' (element 0) of the teacher network became NaN",
                trainer.student.weights.params.specs()[1].name
            ),
        };
        let teacher = trainer.student.weights.clone();
        trainer.method = Box::new(Poisoned {
            at: 2,
            fault,
            teacher,
        });
        let dir = tempfile::tempdir().unwrap();
        let paths = RunPaths {
            dir: dir.path().to_path_buf(),
        };
        let err = run::train_from(&g, trainer, &data, &paths, RunOptions::default()).unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(err, RunError::NonFinite { step: 3, .. }),
            "{message}"
        );
        assert!(message.contains(&expected), "{message}");
        assert!(message.contains("at iteration 3"), "{message}");
        assert!(message.contains("step 2) is kept"), "{message}");
        let (_, sidecar) = metaseg::train::checkpoint::load(&paths.checkpoint()).unwrap();
        assert_eq!(sidecar.step, 2);
        assert_eq!(
            log_lines(&dir.path().join("log.jsonl")).len(),
            2,
            "{message}"
        );
    }
}

/// The guard sees every network a method keeps: the networks it lists are the ones its
/// checkpoint holds beside the student, for every method and stage.
#[test]
fn every_network_a_method_saves_is_guarded() {
    let g = gpu();
    for &method in Method::ALL {
        let config = tiny(method.name(), &[]);
        let mut stages = vec![(config.clone(), Stage::Main)];
        stages.extend(
            method
                .kind()
                .first_stage(&config)
                .map(|f| (f.config, f.stage)),
        );
        for (config, stage) in stages {
            let mut trainer = Trainer::at(&g, &config, stage, 1).unwrap();
            let mut parts = Parts::default();
            trainer.method.save(&mut parts).unwrap();
            let saved: BTreeSet<String> = parts
                .tensors
                .keys()
                .map(|k| k.split('/').next().unwrap().to_string())
                .collect();
            let guarded: BTreeSet<String> = trainer
                .method
                .networks()
                .into_iter()
                .map(|(name, _)| name.to_string())
                .collect();
            assert_eq!(saved, guarded, "{method} ({stage:?})");
        }
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
