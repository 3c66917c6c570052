//! What an MLB-Seg iteration costs against the passes it needs (issue 23, item 4).
//!
//! On the preset's network and batch (`default`: a 2D V-Net of width 8 on 4 labeled + 4
//! unlabeled 64 x 64 images, K = 5 views), each pass the algorithm needs is timed alone, then a
//! whole supervised iteration and a whole MLB-Seg iteration, all in one process and taking turns
//! call by call, so the ratios share the machine's load. Kernel time is the sum of the profiled dispatches (GPU timestamps on
//! lavapipe); wall time is taken with the device drained.
//!
//! `cargo run --release --example mlb_passes [-- REPEATS [PRESET [KEY=VALUE ...]]]`

use metaseg::gpu::Gpu;
use metaseg::nn::{Forward, Mode, Network};
use metaseg::train::config::TrainConfig;
use metaseg::train::methods::mlb_seg::views::Views;
use metaseg::train::trainer::{slice_batch, DeviceBatch, Trainer};
use metaseg_autograd::{check, grad, jvp, no_grad, Distribution, Reduction, Shape, Var};
use std::collections::BTreeMap;
use std::time::Instant;

type AnyResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Milliseconds per kernel (entry point and constants) of one call.
type ByKernel = BTreeMap<String, f64>;

/// A row: its label, (kernel ms, wall ms, dispatches) per call, and the kernels' ms.
type Row = (&'static str, ((f64, f64, f64), ByKernel));

/// A row's label and the call it times.
type Call<'a> = (&'static str, Box<dyn FnMut() -> AnyResult<()> + 'a>);

/// Kernel and wall milliseconds per call of each row, the mean over `repeats` after a warm-up,
/// and its kernels' milliseconds by kernel. The rows take turns (one call of each per round), so
/// a machine whose load drifts during the measurement weighs on every row alike.
fn time_interleaved(gpu: &Gpu, repeats: u32, calls: &mut [Call<'_>]) -> AnyResult<Vec<Row>> {
    let ctx = gpu.context();
    let mut rows: Vec<Row> = calls
        .iter()
        .map(|(label, _)| (*label, ((0.0, 0.0, 0.0), ByKernel::new())))
        .collect();
    for (_, f) in calls.iter_mut() {
        f()?;
    }
    let n = f64::from(repeats);
    for _ in 0..repeats {
        for ((_, f), (_, ((kernel_ms, wall_ms, launches), by_kernel))) in
            calls.iter_mut().zip(&mut rows)
        {
            ctx.synchronize()?;
            ctx.start_profiling();
            let start = Instant::now();
            f()?;
            ctx.synchronize()?;
            *wall_ms += start.elapsed().as_secs_f64() * 1e3 / n;
            let (times, _) = ctx.take_kernel_times()?;
            *launches += times.len() as f64 / n;
            for t in &times {
                let ms = t.time.as_secs_f64() * 1e3 / n;
                *kernel_ms += ms;
                *by_kernel.entry(t.kernel.clone()).or_default() += ms;
            }
        }
    }
    Ok(rows)
}

fn batch(gpu: &Gpu, config: &TrainConfig) -> AnyResult<DeviceBatch<Gpu>> {
    let (labeled, unlabeled) = (config.batch.labeled, config.batch.unlabeled);
    let [d, h, w] = config.batch.patch;
    let n = labeled + unlabeled;
    let xs = Shape::from([n, 1, d, h, w]);
    let ys = Shape::from([n, config.data.classes, d, h, w]);
    Ok(DeviceBatch {
        x: Var::from_f64(gpu, &check::seeded(xs.numel(), 3, 0.0, 1.0), &xs, false)?,
        y: Var::from_f64(gpu, &check::one_hot(&ys, 4, None), &ys, false)?,
        labeled,
    })
}

fn main() -> AnyResult<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let repeats: u32 = args.first().map_or(Ok(3), |s| s.parse())?;
    let preset = args.get(1).map_or("default", String::as_str);
    let mut sets = vec!["method=mlb-seg".to_string()];
    sets.extend(args.iter().skip(2).cloned());
    let config = TrainConfig::load(preset, &sets)?;
    let gpu = Gpu::new()?;
    let data = batch(&gpu, &config)?;
    let labeled = data.labeled;
    let unlabeled = data.x.shape().dims()[0] - labeled;
    let mut mlb = Trainer::new(&gpu, &config, 1)?;
    let supervised_config = TrainConfig::load(preset, &[])?;
    let mut sup = Trainer::new(
        &gpu,
        &TrainConfig {
            method: metaseg::train::methods::Method::Supervised,
            ..supervised_config
        },
        1,
    )?;

    let x_m = slice_batch(&data.x, 0, labeled)?;
    let y_m = slice_batch(&data.y, 0, labeled)?;
    let x_u = slice_batch(&data.x, labeled, unlabeled)?;
    let views = Views::draw(&config, 1, labeled, unlabeled);
    let x_v = views.images(&x_u)?;
    let y_v = views.labels(&slice_batch(&data.y, labeled, unlabeled)?)?;
    let pieces = Trainer::new(&gpu, &config, 1)?;
    let net = &pieces.net;
    let weights = pieces.student.weights.clone();
    let mode = Mode::Train { seed: 1, step: 1 };
    let params: Vec<&Var<Gpu>> = weights.params.values().iter().collect();
    let fwd_bwd = |x: &Var<Gpu>, y: &Var<Gpu>| -> AnyResult<()> {
        let out = weights.run(net, x, mode)?;
        let loss = out.logits.cross_entropy(y, None, Reduction::Mean)?;
        grad(&loss, &params, None, false)?;
        Ok(())
    };
    let forward = |x: &Var<Gpu>| -> AnyResult<()> {
        weights.run(net, x, mode)?.logits.sum()?;
        Ok(())
    };
    let tangent: Vec<Var<Gpu>> = weights
        .params
        .values()
        .iter()
        .map(|p| Var::random(&gpu, p.shape(), Distribution::Normal, 9, 0))
        .collect::<Result<_, _>>()?;
    let stats = weights.stats.values();
    let costs = |p: &[Var<Gpu>]| {
        let logits = net.forward(&Forward::new(p, stats, mode), &x_v)?.logits;
        logits.cross_entropy(&y_v, None, Reduction::None)
    };

    let labeled_only = DeviceBatch {
        x: x_m.clone(),
        y: y_m.clone(),
        labeled,
    };
    let (mut t_sup, mut t_mlb) = (1, 1);
    let mut calls: Vec<Call<'_>> = vec![
        ("F(L): forward, meta batch", Box::new(|| forward(&x_m))),
        (
            "FB(L): forward + backward, meta batch",
            Box::new(|| fwd_bwd(&x_m, &y_m)),
        ),
        (
            "F(KU): forward, no record, K U views",
            Box::new(|| no_grad(|| forward(&x_v))),
        ),
        (
            "FB(KU): forward + backward, K U views",
            Box::new(|| fwd_bwd(&x_v, &y_v)),
        ),
        (
            "J(KU): forward mode (jvp) of the costs, K U views",
            Box::new(|| {
                jvp(costs, weights.params.values(), &tangent)?;
                Ok(())
            }),
        ),
        (
            "supervised iteration",
            Box::new(|| {
                t_sup += 1;
                sup.step(&labeled_only, t_sup).map(drop).map_err(Into::into)
            }),
        ),
        (
            "mlb-seg iteration",
            Box::new(|| {
                t_mlb += 1;
                mlb.step(&data, t_mlb).map(drop).map_err(Into::into)
            }),
        ),
    ];
    let rows = time_interleaved(&gpu, repeats, &mut calls)?;
    drop(calls);
    println!("{repeats} repeats after a warm-up; kernel ms, wall ms, dispatches per call");
    for (label, ((k, w, n), _)) in &rows {
        println!("{label:<52} {k:>9.1} {w:>9.1} {n:>7.0}");
    }
    // The passes of one iteration: the teacher over the unlabeled and the meta batch's views; the
    // student over the unlabeled views with two backward passes (the look-ahead's gradient of
    // L_cons + L_mt, the weighted update); the meta loss at theta' (forward and backward on the
    // meta batch); the costs in forward mode; the supervised step on the meta batch's views.
    let get = |i: usize| rows[i].1 .0;
    let (fb_l, f_ku, fb_ku, j_ku) = (get(1), get(2), get(3), get(4));
    let sum = |pick: fn((f64, f64, f64)) -> f64| {
        2.0 * pick(f_ku)
            + pick(fb_ku)
            + (pick(fb_ku) - pick(f_ku))
            + pick(fb_l)
            + pick(j_ku)
            + pick(fb_ku)
    };
    let (sk, sw, sn) = (sum(|p| p.0), sum(|p| p.1), sum(|p| p.2));
    let (sup_it, mlb_it) = (get(5), get(6));
    println!(
        "sum of the passes: kernels {sk:.1} ms ({:.1} supervised iterations), wall {sw:.1} ms \
         ({:.1}), {sn:.0} dispatches; the iteration: kernels {:.2}x the sum, wall {:.2}x, \
         dispatches {:.2}x",
        sk / sup_it.0,
        sw / sup_it.1,
        mlb_it.0 / sk,
        mlb_it.1 / sw,
        mlb_it.2 / sn
    );
    // Where the iteration spends more than its passes: kernel by kernel, the largest first.
    let weights = [(1.0, 2), (3.0, 3), (1.0, 1), (1.0, 4)];
    let mut excess = rows[6].1 .1.clone();
    for (c, i) in weights {
        for (k, ms) in &rows[i].1 .1 {
            *excess.entry(k.clone()).or_default() -= c * ms;
        }
    }
    let mut excess: Vec<_> = excess.into_iter().collect();
    excess.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()));
    println!("the iteration minus the sum of its passes, kernel ms per iteration:");
    for (k, ms) in excess.iter().take(20) {
        println!("  {k:<80} {ms:>9.1}");
    }
    Ok(())
}
