//! One MLB-Seg iteration against the independent float64 reference of `reference/mlb_step.py`
//! (JAX, written from METHODS.md and the released code), intermediate by intermediate, on the
//! 2-level 2D U-Net with batch norm: the views, the PLE labels, L_cons, L_mt, the costs, the
//! look-ahead, the meta loss, the meta-gradient, the weights under every normalisation and both
//! paths, the weighted update with clipping, the teacher's EMA, and the whole `step` (weighted
//! update, supervised step on the meta batch, both EMAs) end to end. On Cpu64 to 1e-9 and on the
//! default wgpu adapter (f32) to 1e-4, each relative to the reference array's largest magnitude.
//!
//! The intermediates inside `step` that it does not return (g, theta', L_meta, the state after
//! the weighted update) are recomputed here from the same public pieces; `step` itself is checked
//! through everything it leaves behind. A negative control runs the step with the released code's
//! behaviours and requires the comparison to fail. Regenerate the fixtures as
//! reference/README.md says.

mod common;

use common::gpu;
use metaseg::meta::{MetaPath, MetaStep, Sgd};
use metaseg::nn::layers::{updated_stats, BN_MOMENTUM};
use metaseg::nn::{Forward, Mode, NetBackend, Network, ParamStore};
use metaseg::optim::{clip_grad_norm, teacher_decay, Optimizer, Rule};
use metaseg::train::config::TrainConfig;
use metaseg::train::methods::mlb_seg::step::{self, meta_weights, unlabeled_terms};
use metaseg::train::methods::mlb_seg::views::{stack, Views, VIEWS};
use metaseg::train::network::{optimizer_rule, Heads, Learner, Net, Weights};
use metaseg::train::trainer::{Context, DeviceBatch};
use metaseg_autograd::{grad, Cpu64, Reduction, Shape, Tolerance, Var};
use serde_json::Value;
use std::path::Path;

const FIXTURES: &str = "reference/fixtures";
/// Two f64 computations of the same iteration in different orders: relative to each array's
/// largest magnitude.
const F64_RTOL: f64 = 1e-9;
/// The same iteration in f32 on the GPU (issue 23's tolerance).
const F32_RTOL: f64 = 1e-4;

fn fixture(name: &str) -> (Vec<f64>, Shape) {
    let path = Path::new(FIXTURES).join(format!("{name}.npy"));
    metaseg::npy::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn constant<B: NetBackend>(backend: &B, name: &str) -> Var<B> {
    let (values, shape) = fixture(name);
    Var::from_f64(backend, &values, &shape, false).unwrap()
}

fn tensor<B: NetBackend>(backend: &B, name: &str) -> B::Tensor {
    let (values, shape) = fixture(name);
    backend.tensor(&values, &shape).unwrap()
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

/// The reference's problem on `backend`: its configuration, network, student (parameters,
/// running statistics, momentum buffers) and teacher, at iteration t.
struct Problem<B: NetBackend> {
    m: Value,
    config: TrainConfig,
    net: Net,
    student: Learner<B>,
    teacher: Weights<B>,
    t: u64,
}

impl<B: NetBackend> Problem<B> {
    fn new(backend: &B) -> Self {
        let m = manifest();
        let config = config(&m);
        let net = Net::new(&config, Heads::default(), 1).unwrap();
        let names = |store: &ParamStore<B>| -> Vec<Value> {
            store
                .specs()
                .iter()
                .map(|s| s.name.clone().into())
                .collect()
        };
        let fresh = Weights::init(backend, &net, config.seed).unwrap();
        assert_eq!(
            names(&fresh.params),
            m["param_names"].as_array().unwrap()[..]
        );
        assert_eq!(names(&fresh.stats), m["stat_names"].as_array().unwrap()[..]);
        let weights = |params: &str, stats: &str| Weights {
            params: fresh.params.from_flat(&tensor(backend, params)).unwrap(),
            stats: fresh.stats.from_flat(&tensor(backend, stats)).unwrap(),
        };
        let mut student = Learner::new(weights("theta", "stats"), optimizer_rule(&config));
        student.optimizer.state = vec![constant(backend, "momentum")];
        let teacher = weights("teacher", "teacher_stats");
        let t = m["config"]["t"].as_u64().unwrap();
        Problem {
            m,
            config,
            net,
            student,
            teacher,
            t,
        }
    }

    fn context<'a>(&'a self, config: &'a TrainConfig) -> Context<'a> {
        Context {
            config,
            net: &self.net,
        }
    }
}

fn values<B: NetBackend>(vars: &[Var<B>]) -> Vec<f64> {
    vars.iter().flat_map(|v| v.to_f64().unwrap()).collect()
}

/// Every comparison's worst error relative to the reference array's largest magnitude, printed
/// as a table, then asserted (so one run shows every disagreement).
struct Report {
    rtol: f64,
    rows: Vec<(String, f64, bool)>,
}

impl Report {
    fn new(rtol: f64) -> Self {
        Report {
            rtol,
            rows: Vec::new(),
        }
    }

    fn compare(&mut self, what: &str, actual: &[f64], reference: &[f64]) {
        assert_eq!(actual.len(), reference.len(), "{what}: lengths");
        let scale = reference.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let worst = actual
            .iter()
            .zip(reference)
            .fold(0.0f64, |m, (a, r)| m.max((a - r).abs()));
        let relative = worst / scale.max(f64::MIN_POSITIVE);
        let tolerance = Tolerance::new(self.rtol * scale, self.rtol);
        let ok = tolerance.check(actual, reference).is_ok() && relative.is_finite();
        self.rows.push((what.to_string(), relative, ok));
    }

    fn fixture<B: NetBackend>(&mut self, what: &str, actual: &Var<B>) {
        self.compare(what, &actual.to_f64().unwrap(), &fixture(what).0);
    }

    fn scalar(&mut self, what: &str, actual: f64, reference: &Value) {
        self.compare(what, &[actual], &[reference.as_f64().unwrap()]);
    }

    /// Prints the table; returns the comparisons that failed.
    fn failures(&self) -> Vec<&str> {
        for (what, relative, ok) in &self.rows {
            let verdict = if *ok { "ok" } else { "DIFFERS" };
            eprintln!("{what:<28} max error / max |ref| = {relative:.2e}  {verdict}");
        }
        let failed = self.rows.iter().filter(|r| !r.2);
        failed.map(|r| r.0.as_str()).collect()
    }

    fn finish(self) {
        let failed = self.failures();
        assert!(failed.is_empty(), "differ from the reference: {failed:?}");
    }
}

/// Per-voxel costs [N, 2, patch] against both targets (as the step stacks them).
fn costs<B: NetBackend>(logits: &Var<B>, y_init: &Var<B>, y_ple: &Var<B>) -> Var<B> {
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

/// Every piece of the iteration on `backend`, compared at `rtol`.
fn pieces<B: NetBackend>(backend: &B, rtol: f64) -> Report {
    let p = Problem::new(backend);
    let (m, config, t) = (&p.m, &p.config, p.t);
    let cx = p.context(config);
    let (l, u) = (config.batch.labeled, config.batch.unlabeled);
    let (x_u, y_init) = (constant(backend, "x_u"), constant(backend, "y_init"));
    let (x_m, y_m) = (constant(backend, "x_m"), constant(backend, "y_m"));
    let lr = config.optimizer.lr;
    let mut report = Report::new(rtol);

    // The views metaseg draws are the reference's inputs (to rounding of their matrices).
    let draw_u = Views::draw(config, t, l, u);
    let exact = Tolerance::new(1e-14, 1e-14);
    exact.assert("unlabeled views", &matrices(&draw_u), &table(&m["warps_u"]));
    let draw_m = Views::draw(config, t, 0, l);
    exact.assert("meta views", &matrices(&draw_m), &table(&m["warps_m"]));

    // 1. The unlabeled terms: views, targets, the student's pass, PLE, L_cons, L_mt, statistics.
    let student = &p.student.weights;
    let (terms, teacher_1) =
        unlabeled_terms(&cx, student, &p.teacher, &x_u, &y_init, l, t).unwrap();
    report.fixture("views_x_u", &terms.x);
    report.fixture("views_y_init", &terms.y_init);
    let p_student = terms.student.logits.softmax_channels().unwrap();
    report.fixture("p_student", &p_student);
    report.fixture("y_ple", &terms.y_ple);
    let cons = terms.cons.item().unwrap();
    report.scalar("l_cons", cons, &m["scalars"]["l_cons"]);
    report.scalar("l_mt", terms.mt.item().unwrap(), &m["scalars"]["l_mt"]);
    let teacher_stats_1 = values(teacher_1.stats.values());
    report.compare(
        "teacher_stats_1",
        &teacher_stats_1,
        &fixture("teacher_stats_1").0,
    );
    let stats_1 = updated_stats(
        student.stats.values(),
        &terms.student.batch_stats,
        BN_MOMENTUM,
    );
    report.compare("stats_1", &values(&stats_1.unwrap()), &fixture("stats_1").0);
    let c = costs(&terms.student.logits, &terms.y_init, &terms.y_ple);
    report.fixture("costs", &c);

    // 2. The look-ahead at eps = 0, the meta loss there and the meta-gradient by both paths.
    let theta = student.params.values();
    let shapes: Vec<Shape> = theta.iter().map(|p| p.shape().clone()).collect();
    let buffers: Vec<Var<B>> = backend
        .split_flat(&tensor(backend, "momentum"), &shapes)
        .unwrap()
        .into_iter()
        .map(|b| Var::constant(backend, b))
        .collect();
    let o = &config.optimizer;
    let sgd = Sgd {
        lr,
        momentum: o.momentum,
        weight_decay: o.weight_decay,
    };
    let weight = config.mlb_seg.consistency;
    let other = terms.cons.add(&terms.mt).unwrap().scale(weight).unwrap();
    let wrt: Vec<&Var<B>> = theta.iter().collect();
    let g_other = grad(&other, &wrt, None, false).unwrap();
    let (ahead, _) = sgd.step(theta, &g_other, Some(&buffers)).unwrap();
    report.compare("theta_ahead", &values(&ahead), &fixture("theta_ahead").0);
    let mode = Mode::Train {
        seed: config.seed,
        step: t as u32,
    };
    let stats = student.stats.values();
    let meta_loss = |q: &[Var<B>]| {
        let z = p.net.forward(&Forward::new(q, stats, mode), &x_m)?;
        z.logits.cross_entropy(&y_m, None, Reduction::Mean)
    };
    let l_meta = meta_loss(&ahead).unwrap().item().unwrap();
    report.scalar("l_meta", l_meta, &m["scalars"]["l_meta"]);
    let costs_at = |q: &[Var<B>]| {
        let z = p.net.forward(&Forward::new(q, stats, mode), &terms.x)?;
        Ok(costs(&z.logits, &terms.y_init, &terms.y_ple))
    };
    let other_at = |_: &[Var<B>]| Ok(other.clone());
    let meta_step = MetaStep {
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
        let g = meta_step.meta_gradient(path).unwrap();
        report.compare(name, &g.to_f64().unwrap(), &fixture("g").0);
    }

    // The weights as the step computes them, every normalisation on both paths.
    let meta = (&x_m, &y_m);
    let mut variant = config.clone();
    for path in ["fast", "reverse"] {
        for normalization in ["clip", "softmax", "sigmoid", "hard"] {
            variant.mlb_seg.meta_path = path.into();
            variant.mlb_seg.weights = normalization.into();
            let cx = p.context(&variant);
            let w = meta_weights(&cx, &p.student, &terms, meta, lr, t).unwrap();
            let name = format!("w_{normalization}");
            let what = format!("{name} ({path})");
            report.compare(&what, &w.to_f64().unwrap(), &fixture(&name).0);
        }
    }
    let w = meta_weights(&cx, &p.student, &terms, meta, lr, t).unwrap();

    // 3. The weighted update at theta, clipped, and the teacher's EMA.
    let weighted = c.mul(&w).unwrap().sum().unwrap();
    report.scalar(
        "weighted_ce",
        weighted.item().unwrap(),
        &m["log"]["weighted_ce"],
    );
    let total = weighted.add(&other).unwrap();
    let grads = clip_grad_norm(
        &grad(&total, &wrt, None, false).unwrap(),
        config.mlb_seg.clip,
    );
    let mut optimizer = Optimizer::new(Rule::Sgd(sgd));
    optimizer.state = vec![constant(backend, "momentum")];
    let theta_1 = optimizer
        .step(&student.params, &grads.unwrap(), lr)
        .unwrap();
    report.compare("theta_1", &values(theta_1.values()), &fixture("theta_1").0);
    report.fixture("momentum_1", &optimizer.state[0]);
    let decay = teacher_decay(t, config.mean_teacher.ema_decay);
    let teacher_1 = p.teacher.params.ema(&theta_1, decay).unwrap();
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
    let w_views = meta_weights(&cx, &p.student, &terms, (&x_mv, &y_mv), lr, t).unwrap();
    report.fixture("w_meta_views", &w_views);
    let mut by_views = config.clone();
    by_views.mlb_seg.ple_average = "views".into();
    let cx = p.context(&by_views);
    let (terms, _) = unlabeled_terms(&cx, student, &p.teacher, &x_u, &y_init, l, t).unwrap();
    report.fixture("y_ple_views_average", &terms.y_ple);
    assert_eq!(VIEWS * u, terms.x.shape().dims()[0]);
    report
}

/// The whole `step` on `backend` with `config`'s edits applied, compared at `rtol` through
/// everything it leaves behind and its log.
fn whole_step<B: NetBackend>(backend: &B, rtol: f64, edit: impl Fn(&mut TrainConfig)) -> Report {
    let mut p = Problem::new(backend);
    let mut config = p.config.clone();
    edit(&mut config);
    let batch = DeviceBatch {
        x: stack(&[constant(backend, "x_m"), constant(backend, "x_u")]).unwrap(),
        y: stack(&[constant(backend, "y_m"), constant(backend, "y_init")]).unwrap(),
        labeled: config.batch.labeled,
    };
    let cx = Context {
        config: &config,
        net: &p.net,
    };
    let log = step::step(&cx, &mut p.student, &mut p.teacher, &batch, p.t).unwrap();
    let mut report = Report::new(rtol);
    let student = &p.student.weights;
    report.compare(
        "theta_2",
        &values(student.params.values()),
        &fixture("theta_2").0,
    );
    report.fixture("momentum_2", &p.student.optimizer.state[0]);
    report.compare(
        "stats_2",
        &values(student.stats.values()),
        &fixture("stats_2").0,
    );
    let teacher = &p.teacher;
    report.compare(
        "teacher_2",
        &values(teacher.params.values()),
        &fixture("teacher_2").0,
    );
    let teacher_stats = values(teacher.stats.values());
    report.compare(
        "teacher_stats_2",
        &teacher_stats,
        &fixture("teacher_stats_2").0,
    );
    let logged = p.m["log"].as_object().unwrap();
    let derived = weight_on_foreground();
    assert_eq!(log.len(), logged.len() + derived.len(), "{log:?}");
    for (name, value) in &log {
        match derived.iter().find(|(n, _)| n == name) {
            Some((_, expected)) => report.compare(&format!("log.{name}"), &[*value], &[*expected]),
            None => report.scalar(&format!("log.{name}"), *value, &logged[*name]),
        }
    }
    report
}

/// The logged shares of the total weight each map puts on its own targets' foreground, from the
/// reference's weights and targets (they postdate the fixtures' log): sum of w[:, m] where
/// target m's background channel is 0.
fn weight_on_foreground() -> [(&'static str, f64); 2] {
    let (w, shape) = fixture("w_clip");
    let voxels: usize = shape.dims()[2..].iter().product();
    let share = |map: usize, targets: &str| {
        let y = fixture(targets).0;
        let mut total = 0.0;
        for n in 0..shape.dims()[0] {
            let weights = &w[(2 * n + map) * voxels..][..voxels];
            let background = &y[2 * n * voxels..][..voxels];
            total += (weights.iter().zip(background))
                .filter(|(_, &b)| b == 0.0)
                .map(|(w, _)| w)
                .sum::<f64>();
        }
        total
    };
    [
        ("weight_init_fg", share(0, "views_y_init")),
        ("weight_ple_fg", share(1, "y_ple")),
    ]
}

#[test]
fn the_pieces_of_an_iteration_match_the_reference_on_cpu64() {
    pieces(&Cpu64, F64_RTOL).finish();
}

#[test]
fn one_whole_step_matches_the_reference_on_cpu64() {
    whole_step(&Cpu64, F64_RTOL, |_| {}).finish();
}

#[test]
fn the_pieces_of_an_iteration_match_the_reference_on_the_gpu() {
    pieces(&gpu(), F32_RTOL).finish();
}

#[test]
fn one_whole_step_matches_the_reference_on_the_gpu() {
    whole_step(&gpu(), F32_RTOL, |_| {}).finish();
}

/// The comparison can fail: the released code's meta loss on the meta batch's views and its PLE
/// average divided by K (each measured in reference/README.md) move every parameter the step
/// leaves behind beyond the tolerance.
#[test]
fn the_released_codes_behaviours_differ_from_the_reference() {
    let report = whole_step(&Cpu64, F64_RTOL, |c| {
        c.mlb_seg.meta_views = true;
        c.mlb_seg.ple_average = "views".into();
    });
    let failed = report.failures();
    for what in ["theta_2", "momentum_2", "teacher_2", "log.weighted_ce"] {
        assert!(failed.contains(&what), "{what} should differ: {failed:?}");
    }
}

/// `metaseg kernel mlb_step` on the fixtures' arrays: every array it writes against the
/// reference. `explicit`: the views' zoom offsets and flip axes given as settings (from the
/// manifest, in batch order: the meta batch's samples, then the unlabeled ones); else drawn as
/// the run draws them.
fn runner_op<B: metaseg::runner::OpBackend>(backend: &B, rtol: f64, explicit: bool) -> Report {
    let m = manifest();
    let inputs = metaseg::train::methods::mlb_seg::study::INPUTS.map(|name| {
        let (values, shape) = fixture(name);
        (name.to_string(), values, shape)
    });
    let mut sets = vec![format!("t={}", m["config"]["t"])];
    if explicit {
        let (meta, unlabeled) = (m["views_m"].as_array(), m["views_u"].as_array());
        let samples: Vec<&Vec<Value>> = (meta.unwrap().iter())
            .chain(unlabeled.unwrap())
            .map(|s| s.as_array().unwrap())
            .collect();
        let number = |v: &Value| v.as_f64().unwrap().to_string();
        let zooms: Vec<String> = samples
            .iter()
            .flat_map(|s| s[..3].iter().map(number))
            .collect();
        let axes: Vec<String> = samples
            .iter()
            .map(|s| s[3].as_u64().unwrap().to_string())
            .collect();
        sets.push(format!("zooms={}", zooms.join(",")));
        sets.push(format!("flip_axis={}", axes.join(",")));
    }
    let settings = metaseg::runner::Settings::parse(&sets).unwrap();
    let out = metaseg::runner::run(backend, "mlb_step", inputs.to_vec(), &settings, None).unwrap();
    let mut report = Report::new(rtol);
    report.compare("out (theta_2)", &out.output.0, &fixture("theta_2").0);
    for (name, values, _) in &out.extras {
        match name.as_str() {
            "w" => report.compare("w", values, &fixture("w_clip").0),
            "l_cons" | "l_mt" => report.scalar(name, values[0], &m["scalars"][name.as_str()]),
            "log" => {
                let names = metaseg::train::methods::mlb_seg::study::LOG;
                assert_eq!(names.len(), values.len());
                let derived = weight_on_foreground();
                for (what, v) in names.iter().zip(values) {
                    match derived.iter().find(|(n, _)| n == what) {
                        Some((_, expected)) => {
                            report.compare(&format!("log.{what}"), &[*v], &[*expected])
                        }
                        None => report.scalar(&format!("log.{what}"), *v, &m["log"][*what]),
                    }
                }
            }
            _ => report.compare(name, values, &fixture(name).0),
        }
    }
    assert_eq!(
        out.extras.len(),
        22,
        "{:?}",
        out.extras.iter().map(|e| &e.0)
    );
    report
}

#[test]
fn the_mlb_step_op_matches_the_reference_with_the_views_given_on_cpu64() {
    runner_op(&Cpu64, F64_RTOL, true).finish();
}

#[test]
fn the_mlb_step_op_matches_the_reference_with_the_views_drawn_on_the_gpu() {
    runner_op(&gpu(), F32_RTOL, false).finish();
}

/// The op's views follow its settings as documented: view 1 is `Warp::zoom(patch, p1)`, views 2
/// and 3 `Warp::zoom(patch, -p2)` and `Warp::zoom(patch, -p3)`, view 4 `Warp::flip(patch, axis)`.
#[test]
fn the_mlb_step_ops_views_follow_its_settings() {
    let inputs = metaseg::train::methods::mlb_seg::study::INPUTS.map(|name| {
        let (values, shape) = fixture(name);
        (name.to_string(), values, shape)
    });
    let settings = metaseg::runner::Settings::parse(["zooms=1,2,1.5", "flip_axis=2"]).unwrap();
    let out = metaseg::runner::run(&Cpu64, "mlb_step", inputs.to_vec(), &settings, None).unwrap();
    let written = |name: &str| {
        let found = out.extras.iter().find(|e| e.0 == name);
        found.unwrap().1.clone()
    };
    let patch = [1, 12, 12];
    let samples = |n| vec![metaseg_autograd::Warp::identity(patch); n];
    let views = |n: usize| {
        let mut warps = vec![samples(n)];
        for p in [1.0, -2.0, -1.5] {
            warps.push(vec![metaseg_autograd::Warp::zoom(patch, p); n]);
        }
        warps.push(vec![metaseg_autograd::Warp::flip(patch, 2); n]);
        Views { warps }
    };
    let x_u = constant(&Cpu64, "x_u");
    let expected = views(2).images(&x_u).unwrap().to_f64().unwrap();
    Tolerance::F64.assert("views_x_u", &written("views_x_u"), &expected);
    let x_m = constant(&Cpu64, "x_m");
    let expected = views(2).images(&x_m).unwrap().to_f64().unwrap();
    Tolerance::F64.assert("views_x_m", &written("views_x_m"), &expected);
    assert_ne!(written("views_x_u"), fixture("views_x_u").0);

    // Views the patch cannot make are errors that say why.
    for (bad, why) in [
        ("zooms=6,1,1", "below half the patch's smallest axis"),
        ("flip_axis=0", "not an axis of the patch"),
        ("zooms=1,1", "expected 3 for every sample"),
        ("width=2", "theta has 1682 values; the U-Net of width 2"),
    ] {
        let settings = metaseg::runner::Settings::parse([bad]).unwrap();
        let err = metaseg::runner::run(&Cpu64, "mlb_step", inputs.to_vec(), &settings, None);
        let message = err.unwrap_err().to_string();
        assert!(message.contains(why), "{bad}: {message}");
    }
}
