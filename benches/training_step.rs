//! Whole steps, each run a few times after a warm-up and timed with the device drained: a V-Net
//! training step (forward in training mode, mean cross-entropy + softmax-Dice, backward, SGD with
//! momentum and weight decay over the parameter store's flat form, as training takes it), and
//! MLB-Seg's meta step by both exact paths. Also the kernel launches of a step and the peak of
//! device memory held by tensors during it, from the buffer pool's accounting.
//!
//! A step of the LA-size V-Net (width 16, 2 x 64^3) takes tens of seconds on a software adapter,
//! too long for criterion's ten samples, so each configuration is timed over STEPS runs; the
//! networks' GPU results are checked against Cpu64 in tests/networks.rs and tests/meta.rs, and
//! here the smallest configuration's loss is checked against Cpu64 before anything is timed.
//!
//! The same steps with XLA on the CPU (benches/xla/steps.py, JAX) are the comparator: with `xla`
//! the bench runs that script first (it needs `pip install -r benches/xla/requirements.txt`), then
//! prints both sides and their ratio. Without it, results the script left in target/ earlier are
//! shown beside this run's, marked as another session's.
//!
//! `cargo bench --bench training_step` (add `-- no-la` to skip the LA-size network, `-- small` to
//! keep only the smallest configuration, `-- default` only the default preset's 2D network, `--
//! xla` to measure the comparator first, `-- profile` to print each step's kernels by time).

use metaseg::gpu::Gpu;
use metaseg::meta::{MetaPath, MetaStep};
use metaseg::nn::{Forward, Mode, Network, ParamStore, VNet, VNetConfig};
use metaseg::optim::{Optimizer, Rule, Sgd};
use metaseg_autograd::{
    check, grad, Backend, Cpu64, DiceOptions, Reduction, Shape, Tolerance, Var,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const STEPS: u32 = 3;

/// One network and batch: a V-Net of `width` and `levels` on `batch` patches of `patch` voxels;
/// with a patch of depth 1, the 2D V-Net (depth-1 kernels) without dropout, as the default preset.
#[derive(Clone, Copy)]
struct Config {
    width: usize,
    levels: usize,
    batch: usize,
    patch: [usize; 3],
}

impl Config {
    /// A 3D V-Net on 2 cubes of `side` voxels.
    fn cube(width: usize, levels: usize, side: usize) -> Config {
        Config {
            width,
            levels,
            batch: 2,
            patch: [side; 3],
        }
    }

    /// The default preset's step: the 2D V-Net of width 8 and 4 levels on 4 images of 64 x 64.
    fn default_2d() -> Config {
        Config {
            width: 8,
            levels: 4,
            batch: 4,
            patch: [1, 64, 64],
        }
    }

    fn two_d(&self) -> bool {
        self.patch[0] == 1
    }

    fn vnet(&self) -> VNet {
        let two_d = self.two_d();
        VNet::new(VNetConfig {
            base_width: self.width,
            levels: self.levels,
            two_d,
            dropout: if two_d { None } else { Some(0.5) },
            ..VNetConfig::default()
        })
        .expect("a valid V-Net")
    }

    /// The rows' label: the same in benches/xla/steps.py.
    fn label(&self, kind: &str) -> String {
        let (width, levels, batch) = (self.width, self.levels, self.batch);
        let size = if self.two_d() {
            format!("{}^2", self.patch[1])
        } else {
            format!("{}^3", self.patch[0])
        };
        format!("{kind}, width {width}, {levels} levels, {batch} x {size}")
    }
}

fn batch<B: Backend>(b: &B, config: &Config, seed: u64) -> (Var<B>, Var<B>) {
    let [d, h, w] = config.patch;
    let x = Shape::from([config.batch, 1, d, h, w]);
    let y = Shape::from([config.batch, 2, d, h, w]);
    let xs = check::seeded(x.numel(), seed, -1.0, 1.0);
    let ys = check::one_hot(&y, seed + 1, None);
    (
        Var::from_f64(b, &xs, &x, false).unwrap(),
        Var::from_f64(b, &ys, &y, false).unwrap(),
    )
}

/// One supervised step as training takes it: the loss before the update, and the parameters
/// after the optimiser's update over the store's flat form (its momentum carried in `optimizer`).
fn train_step<B: metaseg::nn::NetBackend>(
    net: &VNet,
    params: &ParamStore<B>,
    stats: &ParamStore<B>,
    optimizer: &mut Optimizer<B>,
    (x, y): &(Var<B>, Var<B>),
) -> (f64, ParamStore<B>) {
    let out = net
        .run(params, stats, x, Mode::Train { seed: 1, step: 0 })
        .unwrap();
    let ce = out.logits.cross_entropy(y, None, Reduction::Mean).unwrap();
    let dice = out.logits.softmax_dice(y, DiceOptions::default()).unwrap();
    let loss = ce.add(&dice).unwrap().scale(0.5).unwrap();
    let wrt: Vec<_> = params.values().iter().collect();
    let grads = grad(&loss, &wrt, None, false).unwrap();
    let next = optimizer.step(params, &grads, 0.01).unwrap();
    (loss.item().unwrap(), next)
}

/// SGD with momentum and weight decay, as the Rust and XLA steps both take it.
fn sgd<B: Backend>() -> Optimizer<B> {
    Optimizer::new(Rule::Sgd(Sgd {
        lr: 0.01,
        momentum: 0.9,
        weight_decay: 1e-4,
    }))
}

/// One timed step: seconds per step, kernel launches per step, peak tensor memory in MiB.
struct Row {
    label: String,
    parameters: usize,
    seconds: f64,
    dispatches: u64,
    peak_mib: f64,
}

/// Prints one step's kernels grouped by entry point, the most expensive first (GPU timestamps on
/// lavapipe), and how much of the step they are.
fn profile(gpu: &Gpu, label: &str, step: &mut impl FnMut()) {
    let ctx = gpu.context();
    ctx.start_profiling();
    let start = Instant::now();
    step();
    ctx.synchronize().unwrap();
    let wall = start.elapsed().as_secs_f64();
    let (times, clock) = ctx.take_kernel_times().unwrap();
    let mut by_entry: HashMap<String, (usize, f64)> = HashMap::new();
    for t in &times {
        let entry = t.kernel.split('[').next().unwrap_or(&t.kernel).to_string();
        let e = by_entry.entry(entry).or_default();
        e.0 += 1;
        e.1 += t.time.as_secs_f64();
    }
    let mut rows: Vec<_> = by_entry.into_iter().collect();
    rows.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
    let total: f64 = rows.iter().map(|r| r.1 .1).sum();
    println!(
        "profile of {label} ({clock}): {} launches, kernels {total:.3} s of {wall:.3} s",
        times.len()
    );
    for (entry, (count, seconds)) in rows.iter().take(24) {
        println!(
            "  {entry:<45} {count:>6} {seconds:>8.3} s {:>5.1}%",
            100.0 * seconds / total
        );
    }
}

fn report(gpu: &Gpu, label: String, parameters: usize, mut step: impl FnMut()) -> Row {
    let ctx = gpu.context();
    step(); // pipelines compiled, buffers pooled
    ctx.synchronize().unwrap();
    if std::env::args().any(|a| a == "profile") {
        profile(gpu, &label, &mut step);
    }
    ctx.reset_pool_peak();
    let launched = ctx.dispatch_count();
    let start = Instant::now();
    for _ in 0..STEPS {
        step();
        ctx.synchronize().unwrap();
    }
    let seconds = start.elapsed().as_secs_f64() / f64::from(STEPS);
    let dispatches = (ctx.dispatch_count() - launched) / u64::from(STEPS);
    let peak_mib = ctx.pool_stats().peak_bytes as f64 / (1 << 20) as f64;
    println!(
        "{label}: {seconds:.3} s per step (mean of {STEPS}), {dispatches} kernel launches, \
         peak tensor memory {peak_mib:.1} MiB"
    );
    Row {
        label,
        parameters,
        seconds,
        dispatches,
        peak_mib,
    }
}

fn parameters(store: &ParamStore<Gpu>) -> usize {
    store.values().iter().map(|v| v.shape().numel()).sum()
}

fn training(gpu: &Gpu, config: &Config) -> Row {
    let net = config.vnet();
    let mut params = net.init_params(gpu, 7).unwrap();
    let stats = net.init_stats(gpu).unwrap();
    let data = batch(gpu, config, 3);
    let label = config.label("V-Net training step");
    let mut optimizer = sgd();
    report(gpu, label, parameters(&params), || {
        params = train_step(&net, &params, &stats, &mut optimizer, &data).1;
    })
}

fn meta(gpu: &Gpu, config: &Config) -> Vec<Row> {
    let net = config.vnet();
    let params = net.init_params(gpu, 7).unwrap();
    let stats = net.init_stats(gpu).unwrap();
    let (x_u, y_u) = batch(gpu, config, 3);
    let (x_m, y_m) = batch(gpu, config, 5);
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
    [MetaPath::Reverse, MetaPath::Fast]
        .into_iter()
        .map(|path| {
            let label = config.label(&format!("meta step ({path:?})"));
            report(gpu, label, parameters(&params), || {
                let _ = step.meta_gradient(path).unwrap().to_f64().unwrap();
            })
        })
        .collect()
}

/// The smallest configuration's first loss on the GPU against Cpu64, before anything is timed.
fn verify(gpu: &Gpu) {
    let config = Config::cube(4, 3, 16);
    let net = config.vnet();
    let cpu_params = net.init_params(&Cpu64, 7).unwrap();
    let cpu_stats = net.init_stats(&Cpu64).unwrap();
    let cpu_data = batch(&Cpu64, &config, 3);
    let (cpu_loss, _) = train_step(&net, &cpu_params, &cpu_stats, &mut sgd(), &cpu_data);
    let params = cpu_params.transfer(gpu).unwrap();
    let stats = cpu_stats.transfer(gpu).unwrap();
    let (gpu_loss, _) = train_step(&net, &params, &stats, &mut sgd(), &batch(gpu, &config, 3));
    Tolerance::F32_ACCUMULATED.assert("training step loss", &[gpu_loss], &[cpu_loss]);
}

/// Where benches/xla/steps.py leaves its results.
fn xla_results_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/xla-steps.json")
}

/// Runs the comparator (JAX, XLA on the CPU) over the same configurations.
fn run_xla(small_only: bool, default_only: bool, skip_la: bool) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut command = Command::new("python3");
    command
        .arg(root.join("benches/xla/steps.py"))
        .arg("--out")
        .arg(xla_results_path());
    if small_only {
        command.arg("--small");
    } else if default_only {
        command.arg("--default");
    } else if skip_la {
        command.arg("--no-la");
    }
    println!("running {command:?}");
    let status = command.status().unwrap_or_else(|e| panic!("python3: {e}"));
    assert!(
        status.success(),
        "benches/xla/steps.py failed ({status}); pip install -r benches/xla/requirements.txt"
    );
}

/// Both sides and their ratio, from the comparator's results if there are any.
fn compare(rows: &[Row], this_session: bool) {
    let path = xla_results_path();
    let Ok(text) = std::fs::read_to_string(&path) else {
        println!(
            "no {} (run with `-- xla` to measure XLA first)",
            path.display()
        );
        return;
    };
    let results: serde_json::Value = serde_json::from_str(&text).expect("the comparator's JSON");
    let session = if this_session {
        "measured just before, in this invocation"
    } else {
        "from an earlier invocation: the ratios mix sessions"
    };
    println!(
        "\nXLA CPU: JAX {} on {}, {} ({session})",
        results["jax"], results["device"], results["measured"]
    );
    println!("| step | metaseg | launches | peak MiB | XLA CPU | XLA / metaseg |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for row in rows {
        let runs = results["seconds"][&row.label].as_array();
        let xla = runs.map(|r| r.iter().filter_map(|v| v.as_f64()).sum::<f64>() / r.len() as f64);
        if let Some(p) = results["parameters"][&row.label].as_u64() {
            assert_eq!(
                p as usize, row.parameters,
                "{}: parameters of the two networks",
                row.label
            );
        }
        let (xla, ratio) = match xla {
            Some(x) => (format!("{x:.3} s"), format!("{:.2}", x / row.seconds)),
            None => ("-".into(), "-".into()),
        };
        println!(
            "| {} | {:.3} s | {} | {:.1} | {xla} | {ratio} |",
            row.label, row.seconds, row.dispatches, row.peak_mib
        );
    }
}

fn main() {
    let arg = |name: &str| std::env::args().any(|a| a == name);
    let default_only = arg("default");
    let small_only = arg("small");
    let skip_la = small_only || default_only || arg("no-la");
    if arg("xla") {
        run_xla(small_only, default_only, skip_la);
    }
    let gpu = Gpu::new().unwrap_or_else(|e| panic!("{e}"));
    let info = &gpu.context().adapter.info;
    println!("adapter: {} ({:?})", info.name, info.backend);
    verify(&gpu);
    let mut configs = vec![Config::cube(4, 3, 16)];
    if default_only {
        configs = vec![Config::default_2d()];
    } else if !small_only {
        // The default preset's 2D network, the earlier 3D default, and one level deeper (the
        // figures on issue 5).
        configs.extend([
            Config::default_2d(),
            Config::cube(8, 3, 32),
            Config::cube(8, 4, 32),
        ]);
    }
    let mut rows = Vec::new();
    for config in &configs {
        rows.push(training(&gpu, config));
    }
    if !skip_la {
        rows.push(training(&gpu, &Config::cube(16, 5, 64)));
    }
    for config in &configs {
        rows.extend(meta(&gpu, config));
    }
    compare(&rows, arg("xla"));
}
