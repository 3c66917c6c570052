//! Whole steps, each run a few times after a warm-up and timed with the device drained: a V-Net
//! training step (forward in training mode, mean cross-entropy + softmax-Dice, backward, SGD with
//! momentum), and MLB-Seg's meta step by both exact paths. Also the peak of device memory held by
//! tensors during a step, from the buffer pool's accounting.
//!
//! A step of the LA-size V-Net (width 16, 2 x 64^3) takes tens of seconds on a software adapter,
//! too long for criterion's ten samples, so each configuration is timed over STEPS runs; the
//! networks' GPU results are checked against Cpu64 in tests/networks.rs and tests/meta.rs, and
//! here the smallest configuration's loss is checked against Cpu64 before anything is timed.
//!
//! `cargo bench --bench training_step` (add `-- no-la` to skip the LA-size network, `-- small` to
//! keep only the smallest configuration).

use metaseg::gpu::Gpu;
use metaseg::meta::{MetaPath, MetaStep, Sgd};
use metaseg::nn::{Forward, Mode, Network, ParamStore, VNet, VNetConfig};
use metaseg_autograd::{
    check, grad, no_grad, Backend, Cpu64, DiceOptions, Reduction, Shape, Tolerance, Var,
};
use std::time::Instant;

const STEPS: u32 = 3;

fn vnet(width: usize, levels: usize) -> VNet {
    VNet::new(VNetConfig {
        base_width: width,
        levels,
        ..VNetConfig::default()
    })
    .expect("a valid V-Net")
}

fn batch<B: Backend>(b: &B, patch: usize, seed: u64) -> (Var<B>, Var<B>) {
    let x = Shape::from([2, 1, patch, patch, patch]);
    let y = Shape::from([2, 2, patch, patch, patch]);
    let xs = check::seeded(x.numel(), seed, -1.0, 1.0);
    let ys = check::one_hot(&y, seed + 1, None);
    (
        Var::from_f64(b, &xs, &x, false).unwrap(),
        Var::from_f64(b, &ys, &y, false).unwrap(),
    )
}

/// One supervised step: the loss before the update, and the updated parameters and buffers.
fn train_step<B: metaseg::nn::NetBackend>(
    net: &VNet,
    params: &ParamStore<B>,
    stats: &ParamStore<B>,
    buffers: Option<&[Var<B>]>,
    (x, y): &(Var<B>, Var<B>),
) -> (f64, Vec<Var<B>>, Vec<Var<B>>) {
    let out = net
        .run(params, stats, x, Mode::Train { seed: 1, step: 0 })
        .unwrap();
    let ce = out.logits.cross_entropy(y, None, Reduction::Mean).unwrap();
    let dice = out.logits.softmax_dice(y, DiceOptions::default()).unwrap();
    let loss = ce.add(&dice).unwrap().scale(0.5).unwrap();
    let wrt: Vec<_> = params.values().iter().collect();
    let grads = grad(&loss, &wrt, None, false).unwrap();
    let sgd = Sgd {
        lr: 0.01,
        momentum: 0.9,
        weight_decay: 1e-4,
    };
    let (next, bufs) = no_grad(|| sgd.step(params.values(), &grads, buffers)).unwrap();
    (loss.item().unwrap(), next, bufs)
}

fn report(gpu: &Gpu, label: &str, mut step: impl FnMut()) {
    let ctx = gpu.context();
    step(); // pipelines compiled, buffers pooled
    ctx.synchronize().unwrap();
    ctx.reset_pool_peak();
    let start = Instant::now();
    for _ in 0..STEPS {
        step();
        ctx.synchronize().unwrap();
    }
    let seconds = start.elapsed().as_secs_f64() / f64::from(STEPS);
    let peak = ctx.pool_stats().peak_bytes as f64 / (1 << 20) as f64;
    println!(
        "{label}: {seconds:.3} s per step (mean of {STEPS}), peak tensor memory {peak:.1} MiB"
    );
}

fn training(gpu: &Gpu, width: usize, levels: usize, patch: usize) {
    let net = vnet(width, levels);
    let params = net.init_params(gpu, 7).unwrap();
    let stats = net.init_stats(gpu).unwrap();
    let data = batch(gpu, patch, 3);
    let label = format!("V-Net training step, width {width}, {levels} levels, 2 x {patch}^3");
    report(gpu, &label, || {
        let _ = train_step(&net, &params, &stats, None, &data);
    });
}

fn meta(gpu: &Gpu, width: usize, levels: usize, patch: usize) {
    let net = vnet(width, levels);
    let params = net.init_params(gpu, 7).unwrap();
    let stats = net.init_stats(gpu).unwrap();
    let (x_u, y_u) = batch(gpu, patch, 3);
    let (x_m, y_m) = batch(gpu, patch, 5);
    let mode = Mode::Train { seed: 2, step: 0 };
    let logits = |t: &[Var<Gpu>], x: &Var<Gpu>| {
        net.forward(&Forward::new(t, stats.values(), mode), x)
            .map(|o| o.logits)
    };
    let costs = |t: &[Var<Gpu>]| logits(t, &x_u)?.cross_entropy(&y_u, None, Reduction::None);
    let meta_loss = |t: &[Var<Gpu>]| logits(t, &x_m)?.cross_entropy(&y_m, None, Reduction::Mean);
    let step = MetaStep {
        theta: params.values(),
        buffers: None,
        sgd: Sgd {
            lr: 0.01,
            momentum: 0.9,
            weight_decay: 5e-4,
        },
        costs: &costs,
        other: None,
        meta_loss: &meta_loss,
    };
    for path in [MetaPath::Reverse, MetaPath::Fast] {
        let label = format!("meta step ({path:?}), width {width}, {levels} levels, 2 x {patch}^3");
        report(gpu, &label, || {
            let _ = step.meta_gradient(path).unwrap().to_f64().unwrap();
        });
    }
}

/// The smallest configuration's first loss on the GPU against Cpu64, before anything is timed.
fn verify(gpu: &Gpu) {
    let net = vnet(4, 3);
    let cpu_params = net.init_params(&Cpu64, 7).unwrap();
    let cpu_stats = net.init_stats(&Cpu64).unwrap();
    let (cpu_loss, ..) = train_step(&net, &cpu_params, &cpu_stats, None, &batch(&Cpu64, 16, 3));
    let params = cpu_params.transfer(gpu).unwrap();
    let stats = cpu_stats.transfer(gpu).unwrap();
    let (gpu_loss, ..) = train_step(&net, &params, &stats, None, &batch(gpu, 16, 3));
    Tolerance::F32_ACCUMULATED.assert("training step loss", &[gpu_loss], &[cpu_loss]);
}

fn main() {
    let arg = |name: &str| std::env::args().any(|a| a == name);
    let (small_only, skip_la) = (arg("small"), arg("small") || arg("no-la"));
    let gpu = Gpu::new().unwrap_or_else(|e| panic!("{e}"));
    let info = &gpu.context().adapter.info;
    println!("adapter: {} ({:?})", info.name, info.backend);
    verify(&gpu);
    training(&gpu, 4, 3, 16);
    meta(&gpu, 4, 3, 16);
    if !small_only {
        // The default preset's width and patch, one level deeper than its 3 (the figures on issue 5).
        training(&gpu, 8, 4, 32);
        meta(&gpu, 8, 4, 32);
    }
    if !skip_la {
        training(&gpu, 16, 5, 64);
    }
}
