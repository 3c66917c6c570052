//! One MLB-Seg iteration over a two-stream batch (METHODS.md, section 1, steps 2-6). The batch's
//! labeled patches are the meta batch (x_m, y_m); its unlabeled patches x_u carry their initial
//! labels y_init, placed as their images are.
//!
//! 1. The K views of x_u and of y_init; the student's forward pass over all of them at theta
//!    (kept for the real update, which is taken at the same theta); y_ple from its probabilities;
//!    L_cons over the views' pairs and L_mt against the teacher on the noisy views.
//! 2. The meta step: the per-voxel costs [K * U, 2, patch] = (CE(p, y_init), CE(p, y_ple)), the
//!    look-ahead SGD step with the real learning rate and momentum buffers on
//!    sum(eps c) + L_cons + L_mt, the meta loss CE on the meta batch at theta', and
//!    g = dL_meta/d eps at eps = 0 (fast or reverse path); the weights w from g by the
//!    normalisation kernel.
//! 3. The real update: sum(w c) + L_cons + L_mt, clipped, an SGD step, the teacher's EMA.
//! 4. The supervised step on the meta batch's views: mean CE + L_cons + L_mt, clipped, SGD, EMA.
//!
//! The forward pass of 1 is kept alive through the meta step, so the step's peak memory is that
//! pass's record plus the meta step's largest phase (about two training steps); recomputing it
//! instead would cost a forward pass of all K * U views.

use super::views::{Average, Views};
use crate::meta::{MetaPath, MetaStep, Sgd};
use crate::nn::{Forward, Mode, NetBackend, Network, Outputs};
use crate::optim::teacher_decay;
use crate::optim::Rampup;
use crate::train::config::TrainConfig;
use crate::train::methods::mean_teacher::teacher_logits;
use crate::train::network::{Learner, Weights};
use crate::train::profile::part;
use crate::train::trainer::{
    slice_batch, step_log, supervised_loss, Context, DeviceBatch, StepLog,
};
use metaseg_autograd::{no_grad, Normalization, Reduction, Result, Shape, Var};

/// The parts of an iteration as `train --profile` splits it (marked with
/// [`crate::train::profile::part`]), in the order they run; the EMA and the logged terms run twice.
/// [`super::passes`] names the passes each needs.
pub mod parts {
    pub const BATCH: &str = "meta batch and x_u sliced out";
    pub const VIEWS_U: &str = "views of x_u and y_init";
    pub const TEACHER_U: &str = "teacher over the K U views";
    pub const STUDENT_U: &str = "student over the K U views";
    pub const TERMS_U: &str = "PLE labels, L_cons, L_mt";
    pub const VIEWS_M: &str = "views of the meta batch";
    pub const LOOK_AHEAD: &str = "look-ahead: grad of L_cons + L_mt, SGD";
    pub const META_LOSS: &str = "meta loss at theta': forward, backward";
    pub const FORWARD_MODE: &str = "costs in forward mode (meta-gradient)";
    pub const META_REVERSE: &str = "meta-gradient, reverse over reverse";
    pub const WEIGHTS: &str = "weights";
    pub const UPDATE: &str = "weighted update: costs, backward, clip, SGD";
    pub const EMA: &str = "teacher's EMA (both updates)";
    pub const LOGGED: &str = "logged terms";
    pub const TEACHER_M: &str = "supervised step: teacher over the K L views";
    pub const STUDENT_M: &str = "supervised step: student, CE, L_cons, L_mt";
    pub const BACKWARD_M: &str = "supervised step: backward, clip, SGD";
}

/// Salt of the meta batch's dropout and teacher-noise streams, apart from the unlabeled views'.
const META_SALT: u64 = 0x3e7a_0001;

/// What the unlabeled views give at theta: their student pass, targets and the other terms.
pub struct UnlabeledTerms<B: NetBackend> {
    pub views: Views,
    /// The views of x_u [K * U, C, patch] and their two targets, one-hot.
    pub x: Var<B>,
    pub y_init: Var<B>,
    pub y_ple: Var<B>,
    pub student: Outputs<B>,
    pub cons: Var<B>,
    pub mt: Var<B>,
}

/// The weight of L_cons and L_mt at iteration t.
fn consistency_weight(config: &TrainConfig, t: u64) -> f64 {
    let m = &config.mlb_seg;
    if !m.rampup {
        return m.consistency;
    }
    let ramp = config.mean_teacher.rampup();
    Rampup {
        weight: m.consistency,
        ..ramp
    }
    .at(t)
}

fn average(config: &TrainConfig) -> Average {
    match config.mlb_seg.ple_average.as_str() {
        "views" => Average::Views,
        _ => Average::Coverage,
    }
}

/// Per-voxel costs of logits against both targets, stacked [N, 2, patch].
pub fn costs<B: NetBackend>(logits: &Var<B>, y_init: &Var<B>, y_ple: &Var<B>) -> Result<Var<B>> {
    let c_init = logits.cross_entropy(y_init, None, Reduction::None)?;
    let c_ple = logits.cross_entropy(y_ple, None, Reduction::None)?;
    Var::concat_channels(&[&c_init, &c_ple])
}

/// The intermediates of one iteration by name, kept only when a study asks for them (the
/// `mlb_step` op, [`super::study`]).
pub struct Trace<B: NetBackend> {
    pub keep: bool,
    pub items: Vec<(&'static str, Var<B>)>,
}

impl<B: NetBackend> Trace<B> {
    pub fn new(keep: bool) -> Self {
        Trace {
            keep,
            items: Vec::new(),
        }
    }

    fn add(&mut self, name: &'static str, v: &Var<B>) {
        if self.keep {
            self.items.push((name, v.detach()));
        }
    }

    /// The student's parameters, momentum buffers and running statistics and the teacher's
    /// parameters and statistics, flat in store order, under `names` in that order.
    fn state(
        &mut self,
        names: [&'static str; 5],
        student: &Learner<B>,
        teacher: &Weights<B>,
    ) -> Result<()> {
        if !self.keep {
            return Ok(());
        }
        let flat = |store: &crate::nn::ParamStore<B>| -> Result<Var<B>> {
            Ok(Var::constant(store.values()[0].backend(), store.flat()?))
        };
        let momentum = student.optimizer.state.first().cloned();
        let values = [
            Some(flat(&student.weights.params)?),
            momentum,
            Some(flat(&student.weights.stats)?),
            Some(flat(&teacher.params)?),
            Some(flat(&teacher.stats)?),
        ];
        for (name, v) in names.iter().zip(values) {
            if let Some(v) = v {
                self.add(name, &v);
            }
        }
        Ok(())
    }
}

/// Step 1 for unlabeled patches x_u [U, C, patch] with one-hot initial labels, in batch slots
/// `first_slot ..`, the student at its current weights; also returns the teacher with the running
/// statistics of its pass.
pub fn unlabeled_terms<B: NetBackend>(
    cx: &Context<'_>,
    student: &Weights<B>,
    teacher: &Weights<B>,
    x_u: &Var<B>,
    y_init: &Var<B>,
    first_slot: usize,
    t: u64,
) -> Result<(UnlabeledTerms<B>, Weights<B>)> {
    let samples = x_u.shape().dims()[0];
    let views = Views::draw(cx.config, t, first_slot, samples);
    unlabeled_terms_in(cx, views, (student, teacher), x_u, y_init, t)
}

/// Step 1 with the views given.
pub fn unlabeled_terms_in<B: NetBackend>(
    cx: &Context<'_>,
    views: Views,
    (student, teacher): (&Weights<B>, &Weights<B>),
    x_u: &Var<B>,
    y_init: &Var<B>,
    t: u64,
) -> Result<(UnlabeledTerms<B>, Weights<B>)> {
    let config = cx.config;
    part(parts::VIEWS_U);
    let x = views.images(x_u)?;
    let y_init = views.labels(y_init)?;
    part(parts::TEACHER_U);
    let (teacher_logits, teacher) = teacher_logits(cx, teacher, &x, 0, t)?;
    part(parts::STUDENT_U);
    let pass = student.run(cx.net, &x, cx.train_mode(t))?;
    part(parts::TERMS_U);
    let probabilities = pass.logits.softmax_channels()?;
    let y_ple = no_grad(|| -> Result<_> {
        let p = if config.mlb_seg.ple_mode == "eval" {
            let eval = student.run(cx.net, &x, Mode::Eval)?;
            eval.logits.softmax_channels()?
        } else {
            probabilities.detach()
        };
        views.enhanced_labels_at(&p, average(config), config.mlb_seg.ple_threshold)
    })?;
    let cons = views.consistency(&probabilities)?;
    let mt = pass.logits.softmax_mse(&teacher_logits)?;
    let terms = UnlabeledTerms {
        views,
        x,
        y_init,
        y_ple,
        student: pass,
        cons,
        mt,
    };
    Ok((terms, teacher))
}

/// Step 2: the weights [K * U, 2, patch] of the costs of `u`, from a look-ahead of the student
/// (its parameters and SGD momentum buffers) with learning rate `lr`, and the meta loss on
/// (x_meta, y_meta).
pub fn meta_weights<B: NetBackend>(
    cx: &Context<'_>,
    student: &Learner<B>,
    u: &UnlabeledTerms<B>,
    meta: (&Var<B>, &Var<B>),
    lr: f64,
    t: u64,
) -> Result<Var<B>> {
    let g = meta_gradient(cx, student, u, meta, lr, t)?;
    normalised(cx.config, &g)
}

/// The weights of meta-gradient g [N, 2, patch] by `mlb_seg.weights`, over both maps together or
/// over each map to half the total (`mlb_seg.normalise_over`).
pub fn normalised<B: NetBackend>(config: &TrainConfig, g: &Var<B>) -> Result<Var<B>> {
    let m = &config.mlb_seg;
    let normalization = Normalization::parse(&m.weights).unwrap_or(Normalization::Clip);
    if m.normalise_over != "each_map" {
        return Ok(g.meta_weights(normalization)?.detach());
    }
    let map = |c| -> Result<Var<B>> {
        g.slice_channels(c, 1)?
            .detach()
            .meta_weights(normalization)?
            .scale(0.5)
    };
    Ok(Var::concat_channels(&[&map(0)?, &map(1)?])?.detach())
}

/// Per-voxel weights [N, 1, patch] of one-hot labels y [N, C, patch] that make the weighted mean
/// CE the mean, over the classes present in y, of each class's mean CE (`mlb_seg.meta_loss =
/// "balanced"`): a voxel of class c weighs N V / (classes present * voxels of c).
pub fn class_balance<B: NetBackend>(y: &Var<B>) -> Result<Var<B>> {
    let dims = y.shape().dims().to_vec();
    let (samples, classes) = (dims[0], dims[1]);
    let voxels: usize = dims[2..].iter().product();
    let values = y.to_f64()?;
    let row = |s: usize, c: usize| &values[(s * classes + c) * voxels..][..voxels];
    let counts: Vec<f64> = (0..classes)
        .map(|c| (0..samples).map(|s| row(s, c).iter().sum::<f64>()).sum())
        .collect();
    let present = counts.iter().filter(|&&n| n > 0.0).count().max(1) as f64;
    let total = (samples * voxels) as f64;
    let mut weights = vec![0.0; samples * voxels];
    for (c, &n) in counts.iter().enumerate().filter(|(_, &n)| n > 0.0) {
        let scale = total / (present * n);
        for s in 0..samples {
            let out = &mut weights[s * voxels..][..voxels];
            for (w, label) in out.iter_mut().zip(row(s, c)) {
                *w += label * scale;
            }
        }
    }
    let mut shape = dims;
    shape[1] = 1;
    Var::from_f64(y.backend(), &weights, &Shape(shape), false)
}

/// The meta-gradient g = dL_meta/d eps at eps = 0 [K * U, 2, patch] of step 2 (see
/// [`meta_weights`]).
pub fn meta_gradient<B: NetBackend>(
    cx: &Context<'_>,
    student: &Learner<B>,
    u: &UnlabeledTerms<B>,
    meta: (&Var<B>, &Var<B>),
    lr: f64,
    t: u64,
) -> Result<Var<B>> {
    let config = cx.config;
    let m = &config.mlb_seg;
    let path = MetaPath::parse(&m.meta_path).unwrap_or(MetaPath::Fast);
    // The fast path's phases run in this order, each beginning with its closure's first call.
    let fast = path == MetaPath::Fast;
    part(if fast {
        parts::LOOK_AHEAD
    } else {
        parts::META_REVERSE
    });
    let theta = student.weights.params.values();
    let stats = student.weights.stats.values();
    let mode = cx.train_mode(t);
    let costs_at = |p: &[Var<B>]| {
        if fast {
            part(parts::FORWARD_MODE);
        }
        let logits = cx.net.forward(&Forward::new(p, stats, mode), &u.x)?.logits;
        costs(&logits, &u.y_init, &u.y_ple)
    };
    let weight = consistency_weight(config, t);
    let other = u.cons.add(&u.mt)?.scale(weight)?;
    // Evaluated at theta only (MetaStep differentiates it there), so the pass of step 1 serves.
    let other_at = |_: &[Var<B>]| Ok(other.clone());
    let meta_mode = cx.mode(config.seed ^ META_SALT, t);
    let balance = match m.meta_loss.as_str() {
        "balanced" => Some(class_balance(meta.1)?),
        _ => None,
    };
    let meta_loss = |p: &[Var<B>]| {
        if fast {
            part(parts::META_LOSS);
        }
        let logits = cx
            .net
            .forward(&Forward::new(p, stats, meta_mode), meta.0)?
            .logits;
        weighted_meta_batch_loss(config, &logits, meta.1, balance.as_ref())
    };
    let buffers = momentum_buffers(student)?;
    let o = &config.optimizer;
    let step = MetaStep {
        theta,
        buffers: buffers.as_deref(),
        sgd: Sgd {
            lr,
            momentum: o.momentum,
            weight_decay: o.weight_decay,
        },
        costs: &costs_at,
        other: Some(&other_at),
        meta_loss: &meta_loss,
    };
    step.meta_gradient(path)
}

/// The optimiser's momentum buffers per parameter (it keeps them flat), None before its first
/// step.
fn momentum_buffers<B: NetBackend>(student: &Learner<B>) -> Result<Option<Vec<Var<B>>>> {
    let Some(flat) = student.optimizer.state.first() else {
        return Ok(None);
    };
    let backend = flat.backend();
    let shapes: Vec<_> = student
        .weights
        .params
        .values()
        .iter()
        .map(|p| p.shape().clone())
        .collect();
    let parts = backend.split_flat(flat.value(), &shapes)?;
    Ok(Some(
        parts
            .into_iter()
            .map(|t| Var::constant(backend, t))
            .collect(),
    ))
}

/// The loss of logits of the meta batch against one-hot labels y, in the meta loss and in the
/// supervised term of step 4: mean CE, or with `mlb_seg.meta_batch_dice` the baselines' 0.5 (CE +
/// Dice).
pub fn meta_batch_loss<B: NetBackend>(
    config: &TrainConfig,
    logits: &Var<B>,
    y: &Var<B>,
) -> Result<Var<B>> {
    weighted_meta_batch_loss(config, logits, y, None)
}

/// [`meta_batch_loss`] with its CE weighted per voxel by `balance` ([`class_balance`]).
pub fn weighted_meta_batch_loss<B: NetBackend>(
    config: &TrainConfig,
    logits: &Var<B>,
    y: &Var<B>,
    balance: Option<&Var<B>>,
) -> Result<Var<B>> {
    let ce = logits.cross_entropy(y, balance, Reduction::Mean)?;
    if config.mlb_seg.meta_batch_dice {
        let (_, dice) = supervised_loss(logits, y)?;
        ce.add(&dice)?.scale(0.5)
    } else {
        Ok(ce)
    }
}

/// An update of the student on `total` (its gradient clipped to `mlb_seg.clip`), then the teacher's
/// EMA towards it: how steps 3 and 4 end.
fn update<B: NetBackend>(
    cx: &Context<'_>,
    (student, teacher): (&mut Learner<B>, &mut Weights<B>),
    total: &Var<B>,
    pass: &Outputs<B>,
    lr: f64,
    t: u64,
) -> Result<()> {
    student.descend(total, &pass.batch_stats, cx.config.mlb_seg.clip, lr)?;
    part(parts::EMA);
    let decay = teacher_decay(t, cx.config.mean_teacher.ema_decay);
    teacher.follow_params(&student.weights, decay)
}

/// Step 4 on the meta batch's views (x, y): mean CE (or 0.5 (CE + Dice) with
/// `mlb_seg.meta_batch_dice`) + L_cons + L_mt, an update and the teacher's EMA. Returns the loss
/// and its three terms, detached.
fn supervised_step<B: NetBackend>(
    cx: &Context<'_>,
    (student, teacher): (&mut Learner<B>, &mut Weights<B>),
    views: &Views,
    (x, y): (&Var<B>, &Var<B>),
    lr: f64,
    t: u64,
) -> Result<[Var<B>; 4]> {
    let config = cx.config;
    part(parts::TEACHER_M);
    let (teacher_logits, moved) = teacher_logits(cx, teacher, x, META_SALT, t)?;
    part(parts::STUDENT_M);
    let out = student
        .weights
        .run(cx.net, x, cx.mode(config.seed ^ META_SALT ^ 1, t))?;
    let ce = meta_batch_loss(config, &out.logits, y)?;
    let cons = views.consistency(&out.logits.softmax_channels()?)?;
    let mt = out.logits.softmax_mse(&teacher_logits)?;
    let weight = consistency_weight(config, t);
    let total = ce.add(&cons.add(&mt)?.scale(weight)?)?;
    *teacher = moved;
    part(parts::BACKWARD_M);
    update(cx, (student, teacher), &total, &out, lr, t)?;
    Ok([total, ce, cons, mt].map(|v| v.detach()))
}

/// The share of voxels one-hot targets [N, C, patch] call foreground (any class but 0). Logged for
/// both targets of the unlabeled views: a PLE drifting to background shows there first.
fn foreground_share<B: NetBackend>(y: &Var<B>) -> Result<Var<B>> {
    let classes = y.shape().dims()[1];
    y.slice_channels(1, classes - 1)?
        .mean()?
        .scale((classes - 1) as f64)
}

/// The share of the total weight w [N, 2, patch] that map `map` puts on the voxels its one-hot
/// targets y call foreground (any class but 0): what the meta step teaches the foreground with.
fn foreground_weight<B: NetBackend>(w: &Var<B>, map: usize, y: &Var<B>) -> Result<Var<B>> {
    let w = w.slice_channels(map, 1)?;
    let on_background = w.mul(&y.slice_channels(0, 1)?)?.sum()?;
    w.sum()?.sub(&on_background)
}

/// One MLB-Seg iteration (see the top), with the views of the run's draws.
pub fn step<B: NetBackend>(
    cx: &Context<'_>,
    student: &mut Learner<B>,
    teacher: &mut Weights<B>,
    batch: &DeviceBatch<B>,
    t: u64,
) -> Result<StepLog> {
    let labeled = batch.labeled;
    let unlabeled = batch.x.shape().dims()[0] - labeled;
    let views = (
        Views::draw(cx.config, t, labeled, unlabeled),
        Views::draw(cx.config, t, 0, labeled),
    );
    step_in(
        cx,
        (student, teacher),
        batch,
        views,
        t,
        &mut Trace::new(false),
    )
}

/// One MLB-Seg iteration with the views of the unlabeled patches and of the meta batch given,
/// its intermediates kept in `trace` when it asks.
pub fn step_in<B: NetBackend>(
    cx: &Context<'_>,
    (student, teacher): (&mut Learner<B>, &mut Weights<B>),
    batch: &DeviceBatch<B>,
    (views_u, meta_views): (Views, Views),
    t: u64,
    trace: &mut Trace<B>,
) -> Result<StepLog> {
    part(parts::BATCH);
    let config = cx.config;
    let m = &config.mlb_seg;
    let labeled = batch.labeled;
    let unlabeled = batch.x.shape().dims()[0] - labeled;
    let (x_m, y_m) = (
        slice_batch(&batch.x, 0, labeled)?,
        slice_batch(&batch.y, 0, labeled)?,
    );
    let x_u = slice_batch(&batch.x, labeled, unlabeled)?;
    let y_u = slice_batch(&batch.y, labeled, unlabeled)?;
    let lr = m.lr_at(cx, t);
    let weight = consistency_weight(config, t);

    // 1-2: the unlabeled terms at theta, and the weights of their costs.
    let pair = (&student.weights, &*teacher);
    let (u, moved) = unlabeled_terms_in(cx, views_u, pair, &x_u, &y_u, t)?;
    *teacher = moved;
    part(parts::VIEWS_M);
    let (x_mv, y_mv) = (meta_views.images(&x_m)?, meta_views.labels(&y_m)?);
    let meta = if m.meta_views {
        (&x_mv, &y_mv)
    } else {
        (&x_m, &y_m)
    };
    let g = meta_gradient(cx, student, &u, meta, lr, t)?;
    part(parts::WEIGHTS);
    let w = normalised(config, &g)?;
    part(parts::UPDATE);
    let c = costs(&u.student.logits, &u.y_init, &u.y_ple)?;
    if trace.keep {
        for (name, v) in [
            ("views_x_u", &u.x),
            ("views_y_init", &u.y_init),
            ("p_student", &u.student.logits.softmax_channels()?),
            ("y_ple", &u.y_ple),
            ("l_cons", &u.cons),
            ("l_mt", &u.mt),
            ("costs", &c),
            ("g", &g),
            ("w", &w),
            ("views_x_m", &x_mv),
            ("views_y_m", &y_mv),
        ] {
            trace.add(name, v);
        }
    }

    // 3: the real update at theta, then the teacher's EMA.
    let weighted = c.mul(&w)?.sum()?;
    let total = weighted.add(&u.cons.add(&u.mt)?.scale(weight)?)?;
    update(cx, (student, teacher), &total, &u.student, lr, t)?;
    let after_1 = [
        "theta_1",
        "momentum_1",
        "stats_1",
        "teacher_1",
        "teacher_stats_1",
    ];
    trace.state(after_1, student, teacher)?;
    part(parts::LOGGED);
    // Only their values are logged: the record of step 1 goes before step 4 records its own.
    let (total, weighted) = (total.detach(), weighted.detach());
    let (cons, mt) = (u.cons.detach(), u.mt.detach());
    let (init_foreground, ple_foreground) =
        (foreground_share(&u.y_init)?, foreground_share(&u.y_ple)?);
    let (init_fg_weight, ple_fg_weight) = (
        foreground_weight(&w, 0, &u.y_init)?,
        foreground_weight(&w, 1, &u.y_ple)?,
    );
    drop(u);

    // 4: the supervised step on the meta batch's views, then the teacher's EMA.
    let [meta_total, meta_ce, meta_cons, meta_mt] =
        supervised_step(cx, (student, teacher), &meta_views, (&x_mv, &y_mv), lr, t)?;
    let after_2 = [
        "theta_2",
        "momentum_2",
        "stats_2",
        "teacher_2",
        "teacher_stats_2",
    ];
    trace.state(after_2, student, teacher)?;
    part(parts::LOGGED);

    // The shares of the total weight on the initial labels' and on the PLE labels' costs.
    let weight_init = w.slice_channels(0, 1)?.sum()?;
    let weight_ple = w.slice_channels(1, 1)?.sum()?;
    let terms = vec![
        ("loss", total.add(&meta_total)?),
        ("weighted_ce", weighted),
        ("cons", cons),
        ("mt", mt),
        ("meta_ce", meta_ce),
        ("meta_cons", meta_cons),
        ("meta_mt", meta_mt),
        ("weight_init", weight_init),
        ("weight_ple", weight_ple),
        ("init_foreground", init_foreground),
        ("ple_foreground", ple_foreground),
        ("weight_init_fg", init_fg_weight),
        ("weight_ple_fg", ple_fg_weight),
    ];
    step_log(&terms, lr)
}
