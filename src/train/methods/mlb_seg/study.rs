//! One MLB-Seg iteration on given arrays, for study (`metaseg kernel mlb_step`, issue 23): the
//! training run's own step ([`super::step::step_in`]) on a 2D or 3D U-Net with batch norm and no
//! dropout, its views given or drawn as a run draws them, every intermediate returned by name.

use super::step::{step_in, Trace};
use super::views::{Views, VIEWS};
use crate::nn::NetBackend;
use crate::optim::Rule;
use crate::train::config::TrainConfig;
use crate::train::methods::Method;
use crate::train::network::{optimizer_rule, Heads, Learner, Net, Weights};
use crate::train::trainer::{Context, DeviceBatch};
use metaseg_autograd::{Error, Result, Var, Warp};

/// The inputs of the study, in this order.
pub const INPUTS: [&str; 9] = [
    "x_u",
    "y_init",
    "x_m",
    "y_m",
    "theta",
    "stats",
    "momentum",
    "teacher",
    "teacher_stats",
];

/// The settings of the study besides the arrays.
#[derive(Clone, Debug, PartialEq)]
pub struct StudySettings {
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub clip: f64,
    pub ema: f64,
    /// Zoom offsets (zoom-in, first zoom-out, second zoom-out) in voxels: one triple for every
    /// sample, or one per sample in batch order (the meta batch's, then the unlabeled patches').
    /// None: drawn as a training run draws them from `seed` and `t` (the default
    /// `mlb_seg.zoom_range` scaled to the patch).
    pub zooms: Option<Vec<f64>>,
    /// The flip view's axis (0 = D, 1 = H, 2 = W): one for every sample or one per sample.
    pub flip_axis: Option<Vec<usize>>,
    /// `mlb_seg.weights` and `mlb_seg.meta_path`.
    pub weights: String,
    pub path: String,
    /// The iteration (the EMA's warm-up and the draws) and the seed of the draws.
    pub t: u64,
    pub seed: u64,
    /// The U-Net's first width and number of levels.
    pub width: usize,
    pub levels: usize,
}

impl Default for StudySettings {
    /// The reference's problem (reference/fixtures): metaseg's defaults but lr 0.01.
    fn default() -> Self {
        StudySettings {
            lr: 0.01,
            momentum: 0.9,
            weight_decay: 5e-4,
            clip: 0.2,
            ema: 0.99,
            zooms: None,
            flip_axis: None,
            weights: "clip".into(),
            path: "fast".into(),
            t: 5,
            seed: 1337,
            width: 4,
            levels: 2,
        }
    }
}

fn invalid(message: String) -> Error {
    Error::InvalidArgument {
        op: "mlb_step",
        message,
    }
}

/// The configuration of a run that would take this step.
fn config(s: &StudySettings, patch: [usize; 3], labeled: usize, unlabeled: usize) -> TrainConfig {
    let mut c = TrainConfig::load("default", &[]).expect("the default preset loads");
    c.method = Method::MlbSeg;
    c.seed = s.seed;
    c.network.kind = "unet".into();
    c.network.base_width = s.width;
    c.network.levels = s.levels;
    c.network.dropout = 0.0;
    (c.batch.patch, c.batch.labeled, c.batch.unlabeled) = (patch, labeled, unlabeled);
    let o = &mut c.optimizer;
    o.kind = "sgd".into();
    o.schedule = "constant".into();
    (o.lr, o.momentum, o.weight_decay) = (s.lr, s.momentum, s.weight_decay);
    c.mean_teacher.ema_decay = s.ema;
    let m = &mut c.mlb_seg;
    (m.clip, m.consistency, m.rampup) = (s.clip, 1.0, false);
    (m.weights, m.meta_path) = (s.weights.clone(), s.path.clone());
    c
}

/// The views of `samples` samples in slots `first ..` of `count`: given, or drawn.
fn views(
    s: &StudySettings,
    config: &TrainConfig,
    (first, samples, count): (usize, usize, usize),
) -> Result<Views> {
    let drawn = Views::draw(config, s.t, first, samples);
    let patch = config.batch.patch;
    let pick = |values: &[f64], per: usize, sample: usize| -> Result<Vec<f64>> {
        let n = values.len() / per;
        if !values.len().is_multiple_of(per) || (n != 1 && n != count) {
            return Err(invalid(format!(
                "{} values: expected {per} for every sample or {per} for each of {count}",
                values.len()
            )));
        }
        let at = if n == 1 { 0 } else { sample };
        Ok(values[at * per..(at + 1) * per].to_vec())
    };
    // Sample j's five warps: the drawn ones, replaced by the settings' where given.
    let sample = |j: usize| -> Result<Vec<Warp>> {
        let mut w: Vec<Warp> = drawn.warps.iter().map(|view| view[j].clone()).collect();
        if let Some(zooms) = &s.zooms {
            let p = pick(zooms, 3, first + j)?;
            let smallest = patch.iter().filter(|&&n| n > 1).min().copied().unwrap_or(1);
            if p.iter()
                .any(|v| !v.is_finite() || 2.0 * v.abs() >= smallest as f64)
            {
                return Err(invalid(format!(
                    "zooms {p:?}: each offset must be below half the patch's smallest axis \
                     ({smallest} voxels)"
                )));
            }
            w[1] = Warp::zoom(patch, p[0]);
            w[2] = Warp::zoom(patch, -p[1]);
            w[3] = Warp::zoom(patch, -p[2]);
        }
        if let Some(axes) = &s.flip_axis {
            let as_f64: Vec<f64> = axes.iter().map(|&a| a as f64).collect();
            let axis = pick(&as_f64, 1, first + j)?[0] as usize;
            if axis > 2 || patch[axis] < 2 {
                return Err(invalid(format!(
                    "flip_axis {axis} is not an axis of the patch {patch:?}"
                )));
            }
            w[4] = Warp::flip(patch, axis);
        }
        Ok(w)
    };
    let per_sample: Vec<Vec<Warp>> = (0..samples).map(sample).collect::<Result<_>>()?;
    let warps = (0..VIEWS)
        .map(|k| per_sample.iter().map(|w| w[k].clone()).collect())
        .collect();
    Ok(Views { warps })
}

/// One iteration on `inputs` (in the order of [`INPUTS`]; parameter-like arrays flat in the
/// U-Net's store order): the step's intermediates by name (see [`Trace`] and `step_in`), then the
/// step's log as `log` [terms].
pub fn mlb_step<B: NetBackend>(
    inputs: &[Var<B>],
    s: &StudySettings,
) -> Result<Vec<(&'static str, Var<B>)>> {
    let [x_u, y_init, x_m, y_m, theta, stats, momentum, teacher, teacher_stats] = inputs else {
        return Err(invalid(format!("takes {} inputs", INPUTS.len())));
    };
    let backend = x_u.backend();
    let dims = x_u.shape().dims().to_vec();
    if dims.len() != 5 || x_m.shape().dims().len() != 5 {
        return Err(invalid("x_u and x_m are [N, C, D, H, W]".into()));
    }
    let (unlabeled, labeled) = (dims[0], x_m.shape().dims()[0]);
    let patch = [dims[2], dims[3], dims[4]];
    let config = config(s, patch, labeled, unlabeled);
    config
        .mlb_seg
        .check(&config)
        .map_err(|e| invalid(e.to_string()))?;
    let net = Net::new(&config, Heads::default(), dims[1])?;
    let fresh = Weights::init(backend, &net, config.seed)?;
    let [params_size, stats_size] = [&fresh.params, &fresh.stats].map(|store| {
        store
            .values()
            .iter()
            .map(|v| v.shape().numel())
            .sum::<usize>()
    });
    for (name, v, size) in [
        ("theta", theta, params_size),
        ("momentum", momentum, params_size),
        ("teacher", teacher, params_size),
        ("stats", stats, stats_size),
        ("teacher_stats", teacher_stats, stats_size),
    ] {
        if v.shape().numel() != size {
            return Err(invalid(format!(
                "{name} has {} values; the U-Net of width {} and {} levels takes {size}",
                v.shape().numel(),
                s.width,
                s.levels
            )));
        }
    }
    let weights = |params: &Var<B>, stats: &Var<B>| -> Result<Weights<B>> {
        Ok(Weights {
            params: fresh.params.from_flat(params.value())?,
            stats: fresh.stats.from_flat(stats.value())?,
        })
    };
    let mut student = Learner::new(weights(theta, stats)?, optimizer_rule(&config));
    student.optimizer.state = vec![momentum.detach()];
    debug_assert!(matches!(student.optimizer.rule, Rule::Sgd(_)));
    let mut teacher = weights(teacher, teacher_stats)?;
    let batch = DeviceBatch {
        x: super::views::stack(&[x_m.detach(), x_u.detach()])?,
        y: super::views::stack(&[y_m.detach(), y_init.detach()])?,
        labeled,
    };
    let count = labeled + unlabeled;
    let all = (
        views(s, &config, (labeled, unlabeled, count))?,
        views(s, &config, (0, labeled, count))?,
    );
    let cx = Context {
        config: &config,
        net: &net,
    };
    let mut trace = Trace::new(true);
    let log = step_in(
        &cx,
        (&mut student, &mut teacher),
        &batch,
        all,
        s.t,
        &mut trace,
    )?;
    let values: Vec<f64> = log.iter().map(|(_, v)| *v).collect();
    let shape = metaseg_autograd::Shape::from([values.len()]);
    trace
        .items
        .push(("log", Var::from_f64(backend, &values, &shape, false)?));
    Ok(trace.items)
}

/// The names of the step's log, in the order of the `log` output.
pub const LOG: [&str; 14] = [
    "loss",
    "lr",
    "weighted_ce",
    "cons",
    "mt",
    "meta_ce",
    "meta_cons",
    "meta_mt",
    "weight_init",
    "weight_ple",
    "init_foreground",
    "ple_foreground",
    "weight_init_fg",
    "weight_ple_fg",
];
