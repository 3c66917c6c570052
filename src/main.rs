//! The `metaseg` command: run any op on `.npy` arrays (`kernel`), describe the GPU (`info`), write the
//! embedded data set (`dataset default`), train, predict with a trained network, evaluate
//! predictions.

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use metaseg::data::synthetic::{self, SyntheticConfig};
use metaseg::gpu::{Context, Gpu};
use metaseg::npy::{self, Dtype};
use metaseg::runner::{self, Call, Settings};
use metaseg_autograd::{Cpu64, Var};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

#[derive(Parser)]
#[command(
    version,
    about = "GPU kernels and semi-supervised medical image segmentation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one op on .npy arrays, and its backward if --grad-output is given.
    Kernel(KernelArgs),
    /// Describe the GPU.
    Info,
    /// Data sets.
    #[command(subcommand)]
    Dataset(DatasetCommand),
    /// Train a segmentation network (a preset, with any key overridden by --set).
    Train(metaseg::cli::train::TrainArgs),
    /// Segment volumes with a trained network: label volumes (uint8) on each input's grid.
    Predict(metaseg::cli::predict::PredictArgs),
    /// Dice, Jaccard, HD95, ASD and ASSD of predicted labels against reference labels.
    Evaluate(metaseg::cli::evaluate::EvaluateArgs),
}

#[derive(Subcommand)]
enum DatasetCommand {
    /// Write the embedded procedural data set (synthetic atria with exact labels) as a Medical
    /// Segmentation Decathlon folder: imagesTr/, labelsTr/, dataset.json and split.json.
    Default(DefaultDatasetArgs),
}

#[derive(clap::Args)]
struct DefaultDatasetArgs {
    /// The folder to write (created if needed).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Number of cases.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    cases: u64,
    /// The seed every case is made from.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Volume size in voxels.
    #[arg(long, value_name = "D,H,W", default_value = "48,48,48", value_parser = parse_size)]
    size: [usize; 3],
    /// The first N cases are labeled (split.json).
    #[arg(long, default_value_t = 4)]
    labeled: usize,
    /// The last N cases are the test set; the rest are unlabeled (split.json).
    #[arg(long, default_value_t = 8)]
    test: usize,
}

fn parse_size(text: &str) -> Result<[usize; 3], String> {
    let sizes: Vec<usize> = text
        .split(',')
        .map(|s| s.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("expected D,H,W (three integers): {e}"))?;
    sizes
        .try_into()
        .map_err(|_| "expected D,H,W (three integers)".to_string())
}

#[derive(clap::Args)]
struct KernelArgs {
    /// The op to run (listed below).
    op: String,
    /// An input array, by the name the op gives it.
    #[arg(long = "in", value_name = "NAME=FILE.npy", value_parser = parse_input)]
    inputs: Vec<(String, PathBuf)>,
    /// Settings of the op (`--set stride=2,2,2 padding=0,0,0`, or one --set per setting).
    #[arg(long = "set", value_name = "KEY=VALUE", num_args = 1..)]
    settings: Vec<String>,
    /// The gradient of the output: writes grad_NAME.npy for every input.
    #[arg(long, value_name = "FILE.npy")]
    grad_output: Option<PathBuf>,
    /// Directory for out.npy (and the gradients); created if needed.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Where to run: gpu (results written as float32) or cpu64 (the f64 reference).
    #[arg(long, value_enum, default_value_t = BackendKind::Gpu)]
    backend: BackendKind,
    /// Run the forward this many times, printing the time of each run.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendKind {
    Gpu,
    Cpu64,
}

fn parse_input(text: &str) -> Result<(String, PathBuf), String> {
    match text.split_once('=') {
        Some((name, file)) if !name.is_empty() && !file.is_empty() => {
            Ok((name.to_string(), PathBuf::from(file)))
        }
        _ => Err("expected NAME=FILE.npy".into()),
    }
}

/// The ops with their inputs and settings, for `metaseg kernel --help`.
fn ops_help() -> String {
    let mut help = String::from("Ops (inputs; settings):\n");
    for spec in runner::op_names().iter().filter_map(|n| runner::op_spec(n)) {
        help += &format!("  {:<22}{}", spec.name, spec.inputs.join(", "));
        if !spec.settings.is_empty() {
            help += &format!("; {}", spec.settings.join(", "));
        }
        help.push('\n');
    }
    help
}

fn main() -> ExitCode {
    let command = Cli::command().mut_subcommand("kernel", |c| c.after_help(ops_help()));
    // Usage errors exit with clap's code 2; errors while running exit with 1.
    let cli = Cli::from_arg_matches(&command.get_matches()).unwrap_or_else(|e| e.exit());
    let result = match cli.command {
        Command::Kernel(args) => kernel(&args),
        Command::Info => info(),
        Command::Dataset(DatasetCommand::Default(args)) => default_dataset(&args),
        Command::Train(args) => metaseg::cli::train::run(&args),
        Command::Predict(args) => metaseg::cli::predict::run(&args).map_err(Into::into),
        Command::Evaluate(args) => metaseg::cli::evaluate::run(&args).map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn kernel(args: &KernelArgs) -> AnyResult<()> {
    match args.backend {
        BackendKind::Cpu64 => run_kernel(&Cpu64, args),
        BackendKind::Gpu => run_kernel(&Gpu::new()?, args),
    }
}

/// What `kernel` needs from a backend beyond `Backend`: the dtype its results are written in
/// (its own precision, so a file never claims digits that were not computed) and how a forward
/// pass is timed.
trait KernelBackend: runner::OpBackend {
    const DTYPE: Dtype;
    /// Runs `forward` to completion and measures it: the total, and what measured it (shown next
    /// to each time, so nobody compares wall-clock and device times unknowingly).
    fn time<T>(
        &self,
        forward: impl FnOnce() -> metaseg::error::Result<T>,
    ) -> AnyResult<(T, Timing)>;
}

struct Timing {
    total: Duration,
    clock: String,
    /// Per kernel, where the backend can tell.
    kernels: Vec<(String, Duration)>,
}

impl KernelBackend for Cpu64 {
    const DTYPE: Dtype = Dtype::F64;
    // Cpu64 computes synchronously, so the wall clock around the call is the time of the op.
    fn time<T>(
        &self,
        forward: impl FnOnce() -> metaseg::error::Result<T>,
    ) -> AnyResult<(T, Timing)> {
        let start = Instant::now();
        let value = forward()?;
        let total = start.elapsed();
        let clock = "wall clock".into();
        Ok((
            value,
            Timing {
                total,
                clock,
                kernels: Vec::new(),
            },
        ))
    }
}

impl KernelBackend for Gpu {
    const DTYPE: Dtype = Dtype::F32;
    // Each dispatch is timed on the device (timestamp queries) or, without them, from submit to
    // completion; the total is their sum, so it excludes host work between kernels.
    fn time<T>(
        &self,
        forward: impl FnOnce() -> metaseg::error::Result<T>,
    ) -> AnyResult<(T, Timing)> {
        let ctx = self.context();
        ctx.start_profiling();
        let value = forward();
        let (times, clock) = ctx.take_kernel_times()?;
        let kernels: Vec<(String, Duration)> =
            times.into_iter().map(|t| (t.kernel, t.time)).collect();
        let total = kernels.iter().map(|k| k.1).sum();
        Ok((
            value?,
            Timing {
                total,
                clock: clock.to_string(),
                kernels,
            },
        ))
    }
}

fn run_kernel<B: KernelBackend>(backend: &B, args: &KernelArgs) -> AnyResult<()> {
    let settings = Settings::parse(&args.settings)?;
    let inputs = args
        .inputs
        .iter()
        .map(|(name, file)| {
            let (values, shape) = npy::read(file)?;
            Ok((name.clone(), values, shape))
        })
        .collect::<AnyResult<_>>()?;
    let grad_output = args.grad_output.as_deref().map(npy::read).transpose()?;
    let call = Call::new(backend, &args.op, inputs, &settings)?;
    // After the call is checked but before the work, so an unwritable DIR does not cost a run.
    std::fs::create_dir_all(&args.out)
        .map_err(|e| format!("cannot create output directory {}: {e}", args.out.display()))?;

    let mut output = timed_forward(backend, &call, 1)?;
    for run in 2..=args.repeat {
        output = timed_forward(backend, &call, run)?;
    }
    let result = call.finish(&output, grad_output)?;

    let (values, shape) = &result.output;
    npy::write(&args.out.join("out.npy"), values, shape, B::DTYPE)?;
    for (name, values, shape) in &result.grads {
        let path = args.out.join(format!("grad_{name}.npy"));
        npy::write(&path, values, shape, B::DTYPE)?;
    }
    for (name, values, shape) in &result.extras {
        npy::write(
            &args.out.join(format!("{name}.npy")),
            values,
            shape,
            B::DTYPE,
        )?;
    }
    Ok(())
}

fn timed_forward<B: KernelBackend>(backend: &B, call: &Call<B>, run: u32) -> AnyResult<Var<B>> {
    let (output, timing) = backend.time(|| call.forward())?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("run {run}: {:.3} ms ({})", ms(timing.total), timing.clock);
    for (kernel, time) in &timing.kernels {
        println!("    {:.3} ms  {kernel}", ms(*time));
    }
    Ok(output)
}

fn default_dataset(args: &DefaultDatasetArgs) -> AnyResult<()> {
    let config = SyntheticConfig {
        seed: args.seed,
        cases: args.cases as usize,
        size: args.size,
        ..SyntheticConfig::default()
    };
    synthetic::write_msd(&args.out, &config, args.labeled, args.test)?;
    let [d, h, w] = args.size;
    println!(
        "wrote {} cases of {d}x{h}x{w} voxels ({} labeled, {} unlabeled, {} test) to {}",
        config.cases,
        args.labeled,
        config.cases - args.labeled - args.test,
        args.test,
        args.out.display()
    );
    Ok(())
}

/// `metaseg info`: the adapter, its backend and driver, the limits that bound kernel sizes, and
/// the features metaseg uses.
fn info() -> AnyResult<()> {
    let gpu = Gpu::new()?;
    let mut out = String::new();
    let ctx: &Context = gpu.context();
    let a = &ctx.adapter;
    let mib = |b: u64| format!("{} MiB", b >> 20);
    writeln!(out, "adapter        {}", a.info.name)?;
    writeln!(out, "backend        {:?}", a.info.backend)?;
    writeln!(out, "device type    {:?}", a.info.device_type)?;
    writeln!(
        out,
        "driver         {} {}",
        a.info.driver, a.info.driver_info
    )?;
    writeln!(out, "limits")?;
    writeln!(
        out,
        "  max_storage_buffer_binding_size    {}",
        mib(a.limits.max_storage_buffer_binding_size)
    )?;
    writeln!(
        out,
        "  max_buffer_size                    {}",
        mib(a.limits.max_buffer_size)
    )?;
    writeln!(
        out,
        "  max_storage_buffers_per_shader_stage {}",
        a.limits.max_storage_buffers_per_shader_stage
    )?;
    writeln!(
        out,
        "  max_compute_workgroup_storage_size {} bytes",
        a.limits.max_compute_workgroup_storage_size
    )?;
    writeln!(
        out,
        "  max_compute_invocations_per_workgroup {}",
        a.limits.max_compute_invocations_per_workgroup
    )?;
    writeln!(
        out,
        "  max_compute_workgroup_size         {} x {} x {}",
        a.limits.max_compute_workgroup_size_x,
        a.limits.max_compute_workgroup_size_y,
        a.limits.max_compute_workgroup_size_z
    )?;
    writeln!(
        out,
        "  max_compute_workgroups_per_dimension {}",
        a.limits.max_compute_workgroups_per_dimension
    )?;
    writeln!(out, "features")?;
    let used = [
        (
            wgpu::Features::TIMESTAMP_QUERY,
            "TIMESTAMP_QUERY (per-kernel GPU timing)",
        ),
        (wgpu::Features::SHADER_F16, "SHADER_F16"),
        (wgpu::Features::SUBGROUP, "SUBGROUP"),
    ];
    for (feature, name) in used {
        let mark = if a.features.contains(feature) {
            "yes"
        } else {
            "no "
        };
        writeln!(out, "  {mark} {name}")?;
    }
    writeln!(
        out,
        "kernel timing  {}",
        if ctx.has_timestamps() {
            "GPU timestamps"
        } else {
            "wall clock"
        }
    )?;
    // A closed pipe (`metaseg info | head`) is not an error.
    let _ = std::io::stdout().write_all(out.as_bytes());
    Ok(())
}
