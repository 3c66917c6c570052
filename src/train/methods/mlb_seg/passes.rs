//! What an MLB-Seg iteration costs against the passes it needs (issue 23, item 4;
//! docs/mlb-seg.md): `train --method mlb-seg --profile N` and `examples/mlb_passes`.
//!
//! With F a forward pass, B a backward pass and J a forward-mode pass (a Jacobian-vector product),
//! an iteration needs: the teacher's F and the student's recorded F over the K U unlabeled views,
//! B of L_cons + L_mt for the look-ahead, F + B of the meta loss at theta', J of the views' costs,
//! B of the weighted update, and the supervised step's teacher F, student F and B over the K L
//! views of the meta batch. Each pass is timed alone, taking turns with whole iterations (split
//! into their parts by the marks of [`super::step::parts`]) and a supervised iteration, all in
//! one process on a batch of the run's shapes, so that the ratios share the machine's load.

use super::step::{costs, meta_batch_loss, parts};
use super::views::Views;
use crate::gpu::Gpu;
use crate::nn::{Forward, Mode, Network};
use crate::train::config::TrainConfig;
use crate::train::methods::Method;
use crate::train::profile::{time_in_turns, Call, Cost, Timed};
use crate::train::trainer::{slice_batch, DeviceBatch, Trainer};
use metaseg_autograd::{check, grad, jvp, no_grad, Distribution, Shape, Var};
use std::fmt::Write as _;

/// How a pass runs the student network over a batch of images.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Forward, recording nothing (the teacher's passes).
    F,
    /// Forward, recorded for a backward pass (the student's).
    Fr,
    /// Forward, the meta batch's loss (mean CE), backward to the parameters.
    Fb,
    /// The costs against two targets in forward mode, one tangent per parameter.
    J,
}

/// A pass over `images` images; `F(20)` and so on in the tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pass {
    pub kind: Kind,
    pub images: usize,
}

impl std::fmt::Display for Pass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}({})", self.kind, self.images)
    }
}

/// The batch sizes of the passes: the K U unlabeled views, the K L views of the meta batch, and
/// the batch the meta loss sees (the meta batch, or its views with `mlb_seg.meta_views`).
struct Sizes {
    ku: usize,
    kl: usize,
    meta: usize,
}

impl Sizes {
    fn of(config: &TrainConfig) -> Sizes {
        let (labeled, unlabeled) = (config.batch.labeled, config.batch.unlabeled);
        let k = super::views::VIEWS;
        Sizes {
            ku: k * unlabeled,
            kl: k * labeled,
            meta: if config.mlb_seg.meta_views {
                k * labeled
            } else {
                labeled
            },
        }
    }

    /// The passes a part of the iteration needs, with their signs (a backward pass B alone is
    /// FB - Fr; the CE's own few launches go with it). Parts that are terms of the method and no
    /// pass (views, PLE, L_cons, weights, EMA, logs), and the reverse path's meta-gradient, need
    /// none.
    fn passes(&self, part: &str) -> Vec<(f64, Pass)> {
        let pass = |kind, images| Pass { kind, images };
        let backward = |n| vec![(1.0, pass(Kind::Fb, n)), (-1.0, pass(Kind::Fr, n))];
        match part {
            parts::TEACHER_U => vec![(1.0, pass(Kind::F, self.ku))],
            parts::STUDENT_U => vec![(1.0, pass(Kind::Fr, self.ku))],
            parts::LOOK_AHEAD | parts::UPDATE => backward(self.ku),
            parts::META_LOSS => vec![(1.0, pass(Kind::Fb, self.meta))],
            parts::FORWARD_MODE => vec![(1.0, pass(Kind::J, self.ku))],
            parts::TEACHER_M => vec![(1.0, pass(Kind::F, self.kl))],
            parts::STUDENT_M => vec![(1.0, pass(Kind::Fr, self.kl))],
            parts::BACKWARD_M => backward(self.kl),
            _ => Vec::new(),
        }
    }
}

/// The iteration's parts and the passes alone, all timed in turns.
pub struct Comparison {
    pub repeats: u32,
    pub iteration: Timed,
    pub supervised: Timed,
    /// Each distinct pass once, timed alone.
    pub passes: Vec<(Pass, Timed)>,
    sizes: Sizes,
}

impl Comparison {
    /// The passes a part needs, their labels and their summed cost.
    pub fn part_passes(&self, part: &str) -> (String, Cost) {
        let needed = self.sizes.passes(part);
        let mut cost = Cost::default();
        let mut label = String::new();
        for (c, pass) in &needed {
            let timed = self.passes.iter().find(|(p, _)| p == pass);
            cost = cost.plus(*c, &timed.expect("every needed pass is timed").1.cost);
            let sign = if *c < 0.0 { " - " } else { " + " };
            label.push_str(if label.is_empty() && *c > 0.0 {
                ""
            } else {
                sign
            });
            label.push_str(&pass.to_string());
        }
        (label, cost)
    }

    /// The sum of the passes the whole iteration needs (each part's, added up).
    pub fn sum_of_passes(&self) -> Cost {
        let parts = self.iteration.parts.iter();
        parts.fold(Cost::default(), |sum, (name, _)| {
            sum.plus(1.0, &self.part_passes(name).1)
        })
    }

    /// The tables `--profile` prints after the per-kernel one.
    pub fn table(&self) -> String {
        let mut out = format!(
            "\nAn MLB-Seg iteration by its parts, against the passes each needs timed alone \
             (means over {} calls of each, taking turns, after a warm-up; per iteration; \
             F forward, Fr recorded forward, Fb forward + CE + backward, J forward mode; \
             in brackets the images):\n",
            self.repeats
        );
        let row = |out: &mut String, name: &str, c: &Cost, passes: &str, p: &Cost| {
            let _ = write!(
                out,
                "{name:<45} {:>8.0} {:>10.1} {:>10.1}",
                c.launches, c.kernel_ms, c.wall_ms
            );
            if !passes.is_empty() {
                let _ = write!(
                    out,
                    "   {passes:<16} {:>8.0} {:>10.1} {:>10.1}",
                    p.launches, p.kernel_ms, p.wall_ms
                );
            }
            out.push('\n');
        };
        let header = format!(
            "{:<45} {:>8} {:>10} {:>10}   {:<16} {:>8} {:>10} {:>10}\n",
            "part",
            "launches",
            "kernel ms",
            "wall ms",
            "its passes",
            "launches",
            "kernel ms",
            "wall ms"
        );
        out.push_str(&header);
        for (name, cost) in &self.iteration.parts {
            let (label, passes) = self.part_passes(name);
            row(&mut out, name, cost, &label, &passes);
        }
        let sum = self.sum_of_passes();
        let it = &self.iteration.cost;
        row(&mut out, "the iteration", it, "their sum", &sum);
        let _ = writeln!(
            out,
            "the iteration / the sum of its passes: kernels {:.2}x, wall {:.2}x, launches {:.2}x \
             ({:.0} launches beyond the passes)",
            it.kernel_ms / sum.kernel_ms,
            it.wall_ms / sum.wall_ms,
            it.launches / sum.launches,
            it.launches - sum.launches
        );
        let sup = &self.supervised.cost;
        let _ = writeln!(
            out,
            "a supervised iteration: {:.0} launches, {:.1} kernel ms, {:.1} wall ms; the MLB-Seg \
             iteration is {:.1}x that in kernel time, {:.1}x in wall time",
            sup.launches,
            sup.kernel_ms,
            sup.wall_ms,
            it.kernel_ms / sup.kernel_ms,
            it.wall_ms / sup.wall_ms
        );
        out.push_str("the passes alone:\n");
        for (pass, timed) in &self.passes {
            let c = &timed.cost;
            let _ = writeln!(
                out,
                "  {:<10} {:>8.0} {:>10.1} {:>10.1}",
                pass.to_string(),
                c.launches,
                c.kernel_ms,
                c.wall_ms
            );
        }
        out.push_str(&self.excess_by_kernel(12));
        out
    }

    /// Where the iteration spends more kernel time than its passes, kernel by kernel, the
    /// largest differences first.
    fn excess_by_kernel(&self, rows: usize) -> String {
        let excess = self.iteration.cost.plus(-1.0, &self.sum_of_passes());
        let mut by_kernel: Vec<_> = excess.by_kernel.into_iter().collect();
        by_kernel.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()));
        let mut out = "the iteration minus its passes, kernel ms by kernel:\n".to_string();
        for (kernel, ms) in by_kernel.iter().take(rows) {
            let _ = writeln!(out, "  {kernel:<80} {ms:>9.1}");
        }
        out
    }
}

/// A batch of the configuration's shapes: its labeled and unlabeled images uniform in [0, 1],
/// their labels one-hot at random. What the passes cost does not depend on the values.
pub fn synthetic_batch(
    gpu: &Gpu,
    config: &TrainConfig,
    channels: usize,
) -> metaseg_autograd::Result<DeviceBatch<Gpu>> {
    let (labeled, unlabeled) = (config.batch.labeled, config.batch.unlabeled);
    let [d, h, w] = config.batch.patch;
    let n = labeled + unlabeled;
    let xs = Shape::from([n, channels, d, h, w]);
    let ys = Shape::from([n, config.data.classes, d, h, w]);
    Ok(DeviceBatch {
        x: Var::from_f64(gpu, &check::seeded(xs.numel(), 3, 0.0, 1.0), &xs, false)?,
        y: Var::from_f64(gpu, &check::one_hot(&ys, 4, None), &ys, false)?,
        labeled,
    })
}

/// Times `repeats` MLB-Seg iterations of `config` (its main stage, from fresh weights) on images
/// of `channels` channels, split into their parts, a supervised iteration and each pass alone,
/// all taking turns.
pub fn compare(
    gpu: &Gpu,
    config: &TrainConfig,
    channels: usize,
    repeats: u32,
) -> Result<Comparison, String> {
    let text = |e: metaseg_autograd::Error| e.to_string();
    let data = synthetic_batch(gpu, config, channels).map_err(text)?;
    let labeled = data.labeled;
    let unlabeled = data.x.shape().dims()[0] - labeled;
    let mut mlb = Trainer::new(gpu, config, channels).map_err(text)?;
    let supervised = TrainConfig {
        method: Method::Supervised,
        ..config.clone()
    };
    let mut sup = Trainer::new(gpu, &supervised, channels).map_err(text)?;
    let slice = |v: &Var<Gpu>, from, n| slice_batch(v, from, n).map_err(text);
    let (x_m, y_m) = (slice(&data.x, 0, labeled)?, slice(&data.y, 0, labeled)?);
    let (x_u, y_u) = (
        slice(&data.x, labeled, unlabeled)?,
        slice(&data.y, labeled, unlabeled)?,
    );
    let views_u = Views::draw(config, 1, labeled, unlabeled);
    let views_m = Views::draw(config, 1, 0, labeled);
    let inputs = [
        (views_u.images(&x_u), views_u.labels(&y_u)),
        (views_m.images(&x_m), views_m.labels(&y_m)),
        (Ok(x_m.clone()), Ok(y_m.clone())),
    ];
    let mut batches = Vec::new();
    for (x, y) in inputs {
        batches.push((x.map_err(text)?, y.map_err(text)?));
    }
    let sizes = Sizes::of(config);
    // Each distinct pass once, over the first batch of its size.
    let mut passes: Vec<(Pass, &Images)> = Vec::new();
    for part_name in ALL_PARTS {
        for (_, pass) in sizes.passes(part_name) {
            let batch = batches
                .iter()
                .find(|(x, _)| x.shape().dims()[0] == pass.images);
            if !passes.iter().any(|(p, _)| *p == pass) {
                passes.push((pass, batch.expect("a batch of every pass's size")));
            }
        }
    }
    let pieces = Trainer::new(gpu, config, channels).map_err(text)?;
    let runner = PassRunner::new(gpu, config, &pieces).map_err(text)?;
    let labeled_only = DeviceBatch {
        x: x_m.clone(),
        y: y_m.clone(),
        labeled,
    };
    let (mut t_mlb, mut t_sup) = (1, 1);
    let mut calls: Vec<Call<'_>> = vec![
        (
            "mlb-seg iteration".into(),
            Box::new(|| {
                t_mlb += 1;
                mlb.step(&data, t_mlb).map(drop).map_err(text)
            }),
        ),
        (
            "supervised iteration".into(),
            Box::new(|| {
                t_sup += 1;
                sup.step(&labeled_only, t_sup).map(drop).map_err(text)
            }),
        ),
    ];
    for (pass, (x, y)) in &passes {
        let runner = &runner;
        let pass = *pass;
        calls.push((
            pass.to_string(),
            Box::new(move || runner.run(pass.kind, x, y).map_err(text)),
        ));
    }
    let mut timed = time_in_turns(gpu, repeats, &mut calls)?.into_iter();
    drop(calls);
    let (iteration, supervised) = (timed.next().unwrap(), timed.next().unwrap());
    Ok(Comparison {
        repeats,
        iteration,
        supervised,
        passes: passes.iter().map(|(p, _)| *p).zip(timed).collect(),
        sizes,
    })
}

/// Images and their one-hot labels.
type Images = (Var<Gpu>, Var<Gpu>);

/// Every part an iteration can have, for the passes to time.
const ALL_PARTS: [&str; 8] = [
    parts::TEACHER_U,
    parts::STUDENT_U,
    parts::LOOK_AHEAD,
    parts::META_LOSS,
    parts::FORWARD_MODE,
    parts::TEACHER_M,
    parts::STUDENT_M,
    parts::BACKWARD_M,
];

/// The student network at its initial weights, in training mode, and a tangent for J.
struct PassRunner<'a> {
    config: &'a TrainConfig,
    pieces: &'a Trainer<Gpu>,
    tangent: Vec<Var<Gpu>>,
}

impl<'a> PassRunner<'a> {
    fn new(
        gpu: &Gpu,
        config: &'a TrainConfig,
        pieces: &'a Trainer<Gpu>,
    ) -> metaseg_autograd::Result<Self> {
        let params = pieces.student.weights.params.values();
        let tangent = params
            .iter()
            .map(|p| Var::random(gpu, p.shape(), Distribution::Normal, 9, 0))
            .collect::<metaseg_autograd::Result<_>>()?;
        Ok(PassRunner {
            config,
            pieces,
            tangent,
        })
    }

    fn run(&self, kind: Kind, x: &Var<Gpu>, y: &Var<Gpu>) -> metaseg_autograd::Result<()> {
        let (net, weights) = (&self.pieces.net, &self.pieces.student.weights);
        let mode = Mode::Train { seed: 1, step: 1 };
        match kind {
            Kind::F => no_grad(|| weights.run(net, x, mode).map(drop)),
            Kind::Fr => weights.run(net, x, mode).map(drop),
            Kind::Fb => {
                let out = weights.run(net, x, mode)?;
                let loss = meta_batch_loss(self.config, &out.logits, y)?;
                let params: Vec<&Var<Gpu>> = weights.params.values().iter().collect();
                grad(&loss, &params, None, false).map(drop)
            }
            Kind::J => {
                let stats = weights.stats.values();
                let costs_at = |p: &[Var<Gpu>]| {
                    let logits = net.forward(&Forward::new(p, stats, mode), x)?.logits;
                    costs(&logits, y, y)
                };
                jvp(costs_at, weights.params.values(), &self.tangent).map(drop)
            }
        }
    }
}
