//! One MLB-Seg iteration on Cpu64 against the independent float64 reference of
//! `reference/mlb_step.py` (JAX, written from METHODS.md and the released code), intermediate by
//! intermediate, on the 2-level 2D U-Net with batch norm: the views, the PLE labels, L_cons,
//! L_mt, the costs, the look-ahead, the meta loss, the meta-gradient, the weights under every
//! normalisation and both paths, the weighted update with clipping, the teacher's EMA, and the
//! whole `step` (weighted update, supervised step on the meta batch, both EMAs) end to end.
//!
//! The intermediates inside `step` that it does not return (g, theta', L_meta, the state after
//! the weighted update) are recomputed here from the same public pieces; `step` itself is checked
//! through everything it leaves behind. Regenerate the fixtures as reference/README.md says.

use metaseg::meta::{MetaPath, MetaStep, Sgd};
use metaseg::nn::{Forward, Mode, Network, ParamStore};
use metaseg::optim::{clip_grad_norm, teacher_decay, Optimizer, Rule};
use metaseg::train::config::TrainConfig;
use metaseg::train::mlb_seg::step::{meta_weights, unlabeled_terms};
use metaseg::train::mlb_seg::views::{stack, Views, VIEWS};
use metaseg::train::trainer::{DeviceBatch, Teacher, Trainer};
use metaseg_autograd::{grad, Backend, Cpu64, CpuTensor, Reduction, Shape, Tolerance, Var};
use serde_json::Value;
use std::path::Path;

const FIXTURES: &str = "reference/fixtures";
/// Two f64 computations of the same iteration in different orders: relative to each array's
/// largest magnitude.
const RTOL: f64 = 1e-9;

fn fixture(name: &str) -> (Vec<f64>, Shape) {
    let path = Path::new(FIXTURES).join(format!("{name}.npy"));
    metaseg::npy::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn constant(name: &str) -> Var<Cpu64> {
    let (values, shape) = fixture(name);
    Var::from_f64(&Cpu64, &values, &shape, false).unwrap()
}

fn tensor(name: &str) -> CpuTensor {
    let (values, shape) = fixture(name);
    Cpu64.tensor(&values, &shape).unwrap()
}

fn manifest() -> Value {
    let text = std::fs::read_to_string(Path::new(FIXTURES).join("manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The metaseg configuration of the reference's problem (its manifest's `config`).
fn config(m: &Value) -> TrainConfig {
    let c = &m["config"];
    let sets = [
        "method=mlb-seg".to_string(),
        format!("seed={}", c["seed"]),
        "network.kind=\"unet\"".into(),
        format!("network.base_width={}", c["base_width"]),
        "network.levels=2".into(),
        "network.dropout=0.0".into(),
        format!("batch.patch={}", c["patch"]),
        format!("batch.labeled={}", c["labeled"]),
        format!("batch.unlabeled={}", c["unlabeled"]),
        "optimizer.schedule=\"constant\"".into(),
        format!("optimizer.lr={}", c["lr"]),
        format!("optimizer.momentum={}", c["momentum"]),
        format!("optimizer.weight_decay={}", c["weight_decay"]),
        format!("mean_teacher.ema_decay={}", c["ema_decay"]),
        format!("mlb_seg.clip={}", c["clip"]),
        format!("mlb_seg.consistency={}", c["consistency"]),
        "mlb_seg.rampup=false".into(),
        format!("mlb_seg.zoom_range={}", c["zoom_range"]),
        format!("mlb_seg.zoom_reference={}", c["zoom_reference"]),
    ];
    TrainConfig::load("default", &sets).unwrap()
}

/// A trainer holding the reference's student, momentum buffers and teacher.
fn trainer(config: &TrainConfig, m: &Value) -> Trainer<Cpu64> {
    let mut trainer = Trainer::new(&Cpu64, config, 1).unwrap();
    let names = |store: &ParamStore<Cpu64>| -> Vec<Value> {
        store
            .specs()
            .iter()
            .map(|s| s.name.clone().into())
            .collect()
    };
    assert_eq!(
        names(&trainer.params),
        m["param_names"].as_array().unwrap()[..]
    );
    assert_eq!(
        names(&trainer.stats),
        m["stat_names"].as_array().unwrap()[..]
    );
    trainer.params = trainer.params.from_flat(&tensor("theta")).unwrap();
    trainer.stats = trainer.stats.from_flat(&tensor("stats")).unwrap();
    trainer.optimizer.state = vec![constant("momentum")];
    trainer.teacher = Some(Teacher {
        params: trainer.params.from_flat(&tensor("teacher")).unwrap(),
        stats: trainer.stats.from_flat(&tensor("teacher_stats")).unwrap(),
    });
    trainer
}

fn values(vars: &[Var<Cpu64>]) -> Vec<f64> {
    vars.iter().flat_map(|v| v.to_f64().unwrap()).collect()
}

/// Every comparison's worst error relative to the reference array's largest magnitude, printed
/// as a table, then asserted (so one run shows every disagreement).
#[derive(Default)]
struct Report {
    rows: Vec<(String, f64, bool)>,
}

impl Report {
    fn compare(&mut self, what: &str, actual: &[f64], reference: &[f64]) {
        assert_eq!(actual.len(), reference.len(), "{what}: lengths");
        let scale = reference.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let worst = actual
            .iter()
            .zip(reference)
            .fold(0.0f64, |m, (a, r)| m.max((a - r).abs()));
        let relative = worst / scale.max(f64::MIN_POSITIVE);
        let tolerance = Tolerance::new(RTOL * scale, RTOL);
        let ok = tolerance.check(actual, reference).is_ok() && relative.is_finite();
        self.rows.push((what.to_string(), relative, ok));
    }

    fn fixture(&mut self, what: &str, actual: &Var<Cpu64>) {
        self.compare(what, &actual.to_f64().unwrap(), &fixture(what).0);
    }

    fn scalar(&mut self, what: &str, actual: f64, reference: &Value) {
        self.compare(what, &[actual], &[reference.as_f64().unwrap()]);
    }

    fn finish(self) {
        for (what, relative, ok) in &self.rows {
            let verdict = if *ok { "ok" } else { "DIFFERS" };
            eprintln!("{what:<28} max error / max |ref| = {relative:.2e}  {verdict}");
        }
        let failed: Vec<&str> = self
            .rows
            .iter()
            .filter(|r| !r.2)
            .map(|r| r.0.as_str())
            .collect();
        assert!(failed.is_empty(), "differ from the reference: {failed:?}");
    }
}

/// Per-voxel costs [N, 2, patch] against both targets (as the step stacks them).
fn costs(logits: &Var<Cpu64>, y_init: &Var<Cpu64>, y_ple: &Var<Cpu64>) -> Var<Cpu64> {
    let c_init = logits.cross_entropy(y_init, None, Reduction::None).unwrap();
    let c_ple = logits.cross_entropy(y_ple, None, Reduction::None).unwrap();
    Var::concat_channels(&[&c_init, &c_ple]).unwrap()
}

fn matrices(views: &Views) -> Vec<f64> {
    let rows = views.warps.iter().flatten().flat_map(|w| w.matrix.iter());
    rows.flatten().copied().collect()
}

fn table(v: &Value) -> Vec<f64> {
    let mut out = Vec::new();
    let mut walk = vec![v];
    while let Some(v) = walk.pop() {
        match v {
            Value::Array(a) => walk.extend(a.iter().rev()),
            _ => out.push(v.as_f64().unwrap()),
        }
    }
    out
}

#[test]
fn the_pieces_of_an_iteration_match_the_reference() {
    let m = manifest();
    let config = config(&m);
    let mut trainer = trainer(&config, &m);
    let t = m["config"]["t"].as_u64().unwrap();
    let (l, u) = (config.batch.labeled, config.batch.unlabeled);
    let (x_u, y_init) = (constant("x_u"), constant("y_init"));
    let (x_m, y_m) = (constant("x_m"), constant("y_m"));
    let lr = config.optimizer.lr;
    let mut report = Report::default();

    // The views metaseg draws are the reference's inputs (to rounding of their matrices).
    let draw_u = Views::draw(&config, t, l, u);
    let exact = Tolerance::new(1e-14, 1e-14);
    exact.assert("unlabeled views", &matrices(&draw_u), &table(&m["warps_u"]));
    let draw_m = Views::draw(&config, t, 0, l);
    exact.assert("meta views", &matrices(&draw_m), &table(&m["warps_m"]));

    // 1. The unlabeled terms: views, targets, the student's pass, PLE, L_cons, L_mt, statistics.
    let (terms, teacher_stats) = unlabeled_terms(&trainer, &x_u, &y_init, l, t).unwrap();
    report.fixture("views_x_u", &terms.x);
    report.fixture("views_y_init", &terms.y_init);
    report.fixture(
        "p_student",
        &terms.student.logits.softmax_channels().unwrap(),
    );
    report.fixture("y_ple", &terms.y_ple);
    report.scalar(
        "l_cons",
        terms.cons.item().unwrap(),
        &m["scalars"]["l_cons"],
    );
    report.scalar("l_mt", terms.mt.item().unwrap(), &m["scalars"]["l_mt"]);
    report.compare(
        "teacher_stats_1",
        &values(teacher_stats.values()),
        &fixture("teacher_stats_1").0,
    );
    let stats_1 = metaseg::nn::layers::updated_stats(
        trainer.stats.values(),
        &terms.student.batch_stats,
        metaseg::nn::layers::BN_MOMENTUM,
    )
    .unwrap();
    report.compare("stats_1", &values(&stats_1), &fixture("stats_1").0);
    let c = costs(&terms.student.logits, &terms.y_init, &terms.y_ple);
    report.fixture("costs", &c);

    // 2. The look-ahead at eps = 0, the meta loss there and the meta-gradient by both paths.
    let theta = trainer.params.values();
    let shapes: Vec<Shape> = theta.iter().map(|p| p.shape().clone()).collect();
    let buffers: Vec<Var<Cpu64>> = Cpu64
        .split_flat(&tensor("momentum"), &shapes)
        .unwrap()
        .into_iter()
        .map(|b| Var::constant(&Cpu64, b))
        .collect();
    let o = &config.optimizer;
    let sgd = Sgd {
        lr,
        momentum: o.momentum,
        weight_decay: o.weight_decay,
    };
    let weight = config.mlb_seg.consistency;
    let other = terms.cons.add(&terms.mt).unwrap().scale(weight).unwrap();
    let wrt: Vec<&Var<Cpu64>> = theta.iter().collect();
    let g_other = grad(&other, &wrt, None, false).unwrap();
    let (ahead, _) = sgd.step(theta, &g_other, Some(&buffers)).unwrap();
    report.compare("theta_ahead", &values(&ahead), &fixture("theta_ahead").0);
    let mode = Mode::Train {
        seed: config.seed,
        step: t as u32,
    };
    let stats = trainer.stats.values();
    let meta_loss = |p: &[Var<Cpu64>]| {
        let z = trainer.net.forward(&Forward::new(p, stats, mode), &x_m)?;
        z.logits.cross_entropy(&y_m, None, Reduction::Mean)
    };
    report.scalar(
        "l_meta",
        meta_loss(&ahead).unwrap().item().unwrap(),
        &m["scalars"]["l_meta"],
    );
    let costs_at = |p: &[Var<Cpu64>]| {
        let z = trainer
            .net
            .forward(&Forward::new(p, stats, mode), &terms.x)?;
        Ok(costs(&z.logits, &terms.y_init, &terms.y_ple))
    };
    let other_at = |_: &[Var<Cpu64>]| Ok(other.clone());
    let step = MetaStep {
        theta,
        buffers: Some(&buffers),
        sgd,
        costs: &costs_at,
        other: Some(&other_at),
        meta_loss: &meta_loss,
    };
    for (path, name) in [
        (MetaPath::Fast, "g (fast)"),
        (MetaPath::Reverse, "g (reverse)"),
    ] {
        let g = step.meta_gradient(path).unwrap();
        report.compare(name, &g.to_f64().unwrap(), &fixture("g").0);
    }

    // The weights as the step computes them, every normalisation on both paths.
    let meta = (&x_m, &y_m);
    for path in ["fast", "reverse"] {
        for normalization in ["clip", "softmax", "sigmoid", "hard"] {
            trainer.config.mlb_seg.meta_path = path.into();
            trainer.config.mlb_seg.weights = normalization.into();
            let w = meta_weights(&trainer, &terms, meta, lr, t).unwrap();
            let name = format!("w_{normalization}");
            report.compare(
                &format!("{name} ({path})"),
                &w.to_f64().unwrap(),
                &fixture(&name).0,
            );
        }
    }
    trainer.config.mlb_seg.weights = "clip".into();
    trainer.config.mlb_seg.meta_path = "fast".into();
    let w = meta_weights(&trainer, &terms, meta, lr, t).unwrap();

    // 3. The weighted update at theta, clipped, and the teacher's EMA.
    let total = c.mul(&w).unwrap().sum().unwrap().add(&other).unwrap();
    report.scalar(
        "weighted_ce",
        c.mul(&w).unwrap().sum().unwrap().item().unwrap(),
        &m["log"]["weighted_ce"],
    );
    let grads = clip_grad_norm(
        &grad(&total, &wrt, None, false).unwrap(),
        config.mlb_seg.clip,
    );
    let mut optimizer = Optimizer::new(Rule::Sgd(sgd));
    optimizer.state = vec![constant("momentum")];
    let theta_1 = optimizer
        .step(&trainer.params, &grads.unwrap(), lr)
        .unwrap();
    report.compare("theta_1", &values(theta_1.values()), &fixture("theta_1").0);
    report.fixture("momentum_1", &optimizer.state[0]);
    let teacher = trainer.teacher.as_ref().unwrap();
    let decay = teacher_decay(t, config.mean_teacher.ema_decay);
    let teacher_1 = teacher.params.ema(&theta_1, decay).unwrap();
    report.compare(
        "teacher_1",
        &values(teacher_1.values()),
        &fixture("teacher_1").0,
    );

    // The meta batch's views, and the released code's behaviours behind metaseg's flags: the
    // meta loss on those views, the PLE average divided by K.
    let (x_mv, y_mv) = (draw_m.images(&x_m).unwrap(), draw_m.labels(&y_m).unwrap());
    report.fixture("views_x_m", &x_mv);
    report.fixture("views_y_m", &y_mv);
    let w_views = meta_weights(&trainer, &terms, (&x_mv, &y_mv), lr, t).unwrap();
    report.fixture("w_meta_views", &w_views);
    trainer.config.mlb_seg.ple_average = "views".into();
    let (by_views, _) = unlabeled_terms(&trainer, &x_u, &y_init, l, t).unwrap();
    report.fixture("y_ple_views_average", &by_views.y_ple);
    assert_eq!(VIEWS * u, terms.x.shape().dims()[0]);
    report.finish();
}

#[test]
fn one_whole_step_matches_the_reference() {
    let m = manifest();
    let config = config(&m);
    let mut trainer = trainer(&config, &m);
    let t = m["config"]["t"].as_u64().unwrap();
    let batch = DeviceBatch {
        x: stack(&[constant("x_m"), constant("x_u")]).unwrap(),
        y: stack(&[constant("y_m"), constant("y_init")]).unwrap(),
        labeled: config.batch.labeled,
    };
    let log = trainer.step(&batch, t).unwrap();
    let mut report = Report::default();
    report.compare(
        "theta_2",
        &values(trainer.params.values()),
        &fixture("theta_2").0,
    );
    report.fixture("momentum_2", &trainer.optimizer.state[0]);
    report.compare(
        "stats_2",
        &values(trainer.stats.values()),
        &fixture("stats_2").0,
    );
    let teacher = trainer.teacher.as_ref().unwrap();
    report.compare(
        "teacher_2",
        &values(teacher.params.values()),
        &fixture("teacher_2").0,
    );
    report.compare(
        "teacher_stats_2",
        &values(teacher.stats.values()),
        &fixture("teacher_stats_2").0,
    );
    let logged = m["log"].as_object().unwrap();
    assert_eq!(log.len(), logged.len(), "{log:?}");
    for (name, value) in &log {
        report.scalar(&format!("log.{name}"), *value, &logged[*name]);
    }
    report.finish();
}
