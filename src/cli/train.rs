//! `metaseg train`: one run, or several methods and seeds compared on the same split, with the test
//! figures, pictures and comparison table of each.

use crate::gpu::Gpu;
use crate::report;
use crate::train::config::TrainConfig;
use crate::train::methods::Method;
use crate::train::{compare, profile, run};
use std::path::PathBuf;
use std::time::Duration;

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

/// What `train --help` says after the options: the guard and how to resume after it.
const AFTER_HELP: &str = "\
The guard: after every iteration the loss, the global norm of the gradients of every update and
the parameters and running statistics of every network (the student, a teacher, DTML's net B...)
must be finite. Otherwise the run stops, naming the iteration, what became non-finite and the
last good checkpoint (no checkpoint is ever written with a non-finite tensor). Continue from it
with a lower learning rate or with clipping, e.g.
  metaseg train --out RUN --method supervised --resume --set optimizer.lr=0.005 optimizer.clip=1
--resume reads the run's own config.toml; --set may change only iterations, the learning rates
(optimizer.lr, dtml.lr) and the clipping (optimizer.clip, mlb_seg.clip). A change is recorded in
log.jsonl (an event line with the old and new values and the step) and config.toml (a comment
line; its values are the new ones, so a later --resume keeps them).";

#[derive(clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct TrainArgs {
    /// The method, or several separated by commas to compare them on the same split. Without it,
    /// the baselines are compared: supervised, mean-teacher and full.
    #[arg(long, value_delimiter = ',')]
    pub method: Vec<Method>,
    /// A preset shipped with metaseg (default, la-vnet, mlb-seg, online-pl, dtml, local-contrastive,
    /// ideal) or a .toml file.
    #[arg(long, default_value = "default")]
    pub preset: String,
    /// A Medical Segmentation Decathlon folder (imagesTr/, labelsTr/, dataset.json) to train on
    /// instead of the embedded data set.
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Override keys of the preset, like --set optimizer.lr=0.005 iterations=100 (or one --set
    /// per key).
    #[arg(long = "set", value_name = "KEY=VALUE", num_args = 1..)]
    pub overrides: Vec<String>,
    /// Run every method with this many seeds (the preset's and the next ones): a comparison then
    /// reports mean ± standard deviation over them.
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    pub seeds: u64,
    /// Directory for config.toml, log.jsonl and the checkpoint (one directory per method and
    /// seed inside it when there are several runs, with results.md and results.csv).
    #[arg(long, default_value = "runs/default")]
    pub out: PathBuf,
    /// Continue from the checkpoints in --out, with each run's own config.toml and the --set
    /// changes allowed on resume (see below); a resumed run repeats an uninterrupted one exactly
    /// when nothing changes.
    #[arg(long)]
    pub resume: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Stop after this many iterations (at least 1) with a checkpoint, and continue later with
    /// --resume. N counts from the start of the run, a method's first stage (mlb-seg's stage 0,
    /// online-pl's teacher...) first: an N within the first stage stops there. An N at or beyond
    /// the run's iterations runs it to its end; with --resume, an N the checkpoint has already
    /// reached is an error.
    #[arg(long, value_name = "N")]
    pub stop_after: Option<u64>,
    /// After one warm-up step, profile N steps and print every kernel's share of their time.
    /// With mlb-seg, then also N iterations split into their parts, each against the passes it
    /// needs timed alone (forward, backward, forward mode), taking turns in this process.
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    pub profile: Option<u64>,
}

/// A count of at least 1 (clap's own range message would show the range's end, u64::MAX).
fn at_least_one(text: &str) -> Result<u64, String> {
    match text.parse::<u64>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!(
            "'{text}' is not a whole number of at least 1 (1, 2, ...)"
        )),
    }
}

/// `metaseg train`: every run of the plan (methods x seeds), its test figures and, for several
/// runs, the comparison table and plot. A train that fails leaves none of the directories it
/// created empty behind (a run's own files are removed by the run when it fails before its
/// first step; what remains then is worth keeping).
pub fn run(args: &TrainArgs) -> AnyResult<()> {
    let created = missing_dirs(&args.out);
    let result = run_plan(args);
    if result.is_err() {
        // Deepest first; remove_dir leaves a directory that holds anything.
        for dir in &created {
            if std::fs::remove_dir(dir).is_err() {
                break;
            }
        }
    }
    result
}

/// `dir` and those of its ancestors that do not exist yet, deepest first.
fn missing_dirs(dir: &std::path::Path) -> Vec<PathBuf> {
    dir.ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .map(PathBuf::from)
        .collect()
}

fn run_plan(args: &TrainArgs) -> AnyResult<()> {
    if args.stop_after == Some(0) {
        return Err("--stop-after 0 would stop before the first iteration: give N >= 1".into());
    }
    let mut overrides = args.overrides.clone();
    if overrides
        .iter()
        .any(|o| o.trim_start().starts_with("method="))
    {
        return Err("choose the method with --method, not --set method=...".into());
    }
    if let Some(dir) = &args.data {
        let source = toml::Value::String(dir.display().to_string());
        overrides.push(format!("data.source={source}"));
    }
    let methods = if args.method.is_empty() {
        compare::BASELINES.to_vec()
    } else {
        args.method.clone()
    };
    // The overrides of one run: the user's, then its method (and seed).
    let for_run = |method: Method, seed: Option<u64>| {
        let mut o = overrides.clone();
        o.push(format!(
            "method={}",
            toml::Value::String(method.name().into())
        ));
        o.extend(seed.map(|s| format!("seed={s}")));
        o
    };
    // Read for its seed, checked as the first run will be (the preset's own method may not
    // accept the overrides, e.g. batch.unlabeled=0 with mean-teacher).
    let preset = TrainConfig::load(&args.preset, &for_run(methods[0], None))?;
    let runs = compare::plan(&methods, preset.seed, args.seeds, &args.out);
    if args.profile.is_some() && runs.len() > 1 {
        return Err("--profile runs one method with one seed: give --method NAME".into());
    }
    crate::cli::ensure_writable_dir(&args.out)
        .map_err(|e| format!("--out {}: cannot write there: {e}", args.out.display()))?;
    let gpu = Gpu::new()?;
    let info = &gpu.context().adapter.info;
    eprintln!("{} ({:?})", info.name, info.backend);
    let mut results = Vec::new();
    for (i, spec) in runs.iter().enumerate() {
        let config = run_config(args, &spec.dir, &for_run(spec.method, Some(spec.seed)))?;
        eprintln!(
            "[{}/{}] {}, seed {}: {} iterations, writing to {}",
            i + 1,
            runs.len(),
            config.method,
            config.seed,
            config.iterations,
            spec.dir.display()
        );
        let data = run::load_data(&config)?;
        let validation = match data.validation.len() {
            0 => String::new(),
            n => format!(", {n} validation"),
        };
        eprintln!(
            "data: {} labeled, {} unlabeled, {} test cases{validation}",
            data.labeled.len(),
            data.unlabeled.len(),
            data.test.len()
        );
        let paths = run::RunPaths {
            dir: spec.dir.clone(),
        };
        if let Some(steps) = args.profile {
            return profile(&gpu, &config, &data, &paths, steps);
        }
        let options = run::RunOptions {
            resume: args.resume,
            progress: !args.quiet,
            stop_after: args.stop_after,
        };
        let summary = run::train(&gpu, &config, &data, &paths, options);
        let peak = gpu.context().pool_stats().peak_bytes as f64 / (1u64 << 20) as f64;
        eprintln!("device memory: at most {peak:.0} MiB of tensors at once");
        // A run stopped by a non-finite loss has a log worth seeing too.
        if matches!(&summary, Ok(_) | Err(run::RunError::NonFinite { .. })) {
            warn_on(report::loss_curves(
                &paths.log(),
                &paths.dir.join("loss.png"),
            ));
        }
        let summary = summary?;
        let mut tested = None;
        if args.stop_after.is_none() && !data.test.is_empty() {
            let overlays = paths.dir.join("overlays");
            let mut shown = 0;
            let result =
                run::test_results(&gpu, &config, &data, &paths, &summary, |case, pred| {
                    if shown < report::OVERLAY_CASES {
                        warn_on(report::case_overlay(&overlays, case, pred));
                        shown += 1;
                    }
                })?;
            tested = Some(result.dice);
            results.push(result);
        }
        if summary.iterations == 0 {
            println!(
                "{}, seed {}: already trained; log in {}",
                config.method,
                config.seed,
                paths.log().display()
            );
        } else {
            // Validation scores the test cases only when there are no validation cases.
            let dice = match (tested, data.validation.is_empty()) {
                (Some(d), _) => format!("{d:.4}"),
                (None, true) => summary
                    .validation_dice
                    .map_or_else(|| not_validated(&data), |d| format!("{d:.4}")),
                (None, false) => "not measured (stopped early)".into(),
            };
            let kept = summary.best.map_or(String::new(), |b| {
                format!(
                    " (the network of step {}, validation Dice {:.4})",
                    b.step, b.dice
                )
            });
            println!(
                "{}, seed {}: done in {:.1} s, final loss {:.4}, test Dice {dice}{kept}; log in {}",
                config.method,
                config.seed,
                summary.seconds,
                summary.final_loss,
                paths.log().display()
            );
        }
    }
    if runs.len() > 1 && !results.is_empty() {
        let mut table = compare::markdown(&results);
        if let Some(note) = compare::missing_reference(&results) {
            table.push_str(&format!("\n{note}\n"));
        }
        println!(
            "\nTest cases, means over cases{}:\n{table}",
            if args.seeds > 1 {
                " (± std over seeds)"
            } else {
                ""
            }
        );
        let write = |name: &str, text: &str| -> AnyResult<()> {
            let path = args.out.join(name);
            std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(())
        };
        write("results.md", &table)?;
        write("results.csv", &compare::csv(&results))?;
        let json = serde_json::to_string_pretty(&compare::json(&results))
            .map_err(|e| format!("results.json: {e}"))?;
        write("results.json", &json)?;
        warn_on(report::comparison_plot(
            &results,
            &args.out.join("comparison.png"),
        ));
    }
    Ok(())
}

/// A run's configuration: the preset with the overrides, or when resuming the run's own
/// config.toml (what it last ran with) with the overrides, so that a resume changes only what
/// its --set flags change. A run stopped in its method's first stage has no config.toml of its
/// own yet: it resumes from the preset.
fn run_config(
    args: &TrainArgs,
    dir: &std::path::Path,
    overrides: &[String],
) -> Result<TrainConfig, crate::train::config::ConfigError> {
    let saved = dir.join("config.toml");
    if args.resume && saved.is_file() {
        TrainConfig::load(&saved.display().to_string(), overrides)
    } else {
        TrainConfig::load(&args.preset, overrides)
    }
}

/// Why a finished call has no test Dice: no test cases, or none validated at its last iteration
/// (a run stopped with --stop-after between validations).
fn not_validated(data: &run::RunData) -> String {
    if data.test.is_empty() {
        "none (no test cases)".into()
    } else {
        "not measured at this iteration".into()
    }
}

/// Pictures are extras: failing to draw one is reported, but never throws away a finished
/// training run (its checkpoint and log are already written).
fn warn_on<T>(picture: crate::report::Result<T>) {
    if let Err(e) = picture {
        eprintln!("warning: picture not written: {e}");
    }
}

/// `train --profile N`: one step compiles the pipelines, then N steps run with every dispatch
/// timed; the run stops there, with its checkpoint, so `--resume` can carry it on.
fn profile(
    gpu: &Gpu,
    config: &crate::train::config::TrainConfig,
    data: &crate::train::run::RunData,
    paths: &crate::train::run::RunPaths,
    steps: u64,
) -> AnyResult<()> {
    if steps + 1 > config.iterations {
        return Err(format!(
            "--profile {steps} needs {} iterations (one to warm up); the run has {}",
            steps + 1,
            config.iterations
        )
        .into());
    }
    let options = |resume, stop| run::RunOptions {
        resume,
        progress: false,
        stop_after: Some(stop),
    };
    // A method's first stage (MLB-Seg's stage 0, online-pl's teacher) runs first, unprofiled.
    let first = config.first_stage_iterations();
    run::train(gpu, config, data, paths, options(false, first + 1))?;
    gpu.context().start_profiling();
    let summary = run::train(gpu, config, data, paths, options(true, first + steps + 1));
    let (times, clock) = gpu.context().take_kernel_times()?;
    let summary = summary?;
    let wall = Duration::from_secs_f64(summary.step_seconds);
    print!(
        "{}",
        profile::table(&profile::rows(&times), steps, wall, clock)
    );
    if config.method == Method::MlbSeg {
        let channels = data.labeled[0].image.channels;
        let repeats = u32::try_from(steps).unwrap_or(u32::MAX);
        let comparison =
            crate::train::methods::mlb_seg::passes::compare(gpu, config, channels, repeats)?;
        print!("{}", comparison.table());
    }
    Ok(())
}
