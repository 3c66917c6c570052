//! How well a trained run fits the cases it learnt from: each run's mean Dice on its own labeled
//! training cases (for `full`, every training case) next to its mean Dice on the test cases, both
//! predicted from its checkpoint as validation predicts (sliding windows of the training patch).
//! A run whose training Dice is far above its test Dice has fitted its labeled cases; one whose
//! training Dice is no higher has not yet run out of what they teach.
//!
//! Usage: cargo run --release --example fit -- [--cases] [--test N] RUN_DIR [RUN_DIR ...]
//! (a run directory of `metaseg train`, e.g. runs/default/supervised/seed-1337). Prints one line
//! per run: method, seed, training cases, training Dice, test Dice; with `--cases`, then every
//! test case's Dice, lowest first. `--test N` (embedded data set only) scores the run on N test
//! cases in place of its own: a case depends only on the seed and its index, and the test cases
//! are the last ones, so the training cases stay the same and the first test cases too.

use metaseg::eval::inference::HostVolume;
use metaseg::eval::trained::SavedRun;
use metaseg::eval::{argmax, metrics, predict_probabilities, SlidingWindow};
use metaseg::gpu::Gpu;
use metaseg::train::batch::LoadedCase;
use metaseg::train::run;
use std::path::Path;

fn main() {
    if let Err(e) = fit_all() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn fit_all() -> Result<(), Box<dyn std::error::Error>> {
    let mut dirs: Vec<String> = std::env::args().skip(1).collect();
    let per_case = dirs.first().is_some_and(|a| a == "--cases");
    if per_case {
        dirs.remove(0);
    }
    let mut test_cases = None;
    if dirs.first().is_some_and(|a| a == "--test") {
        let n = dirs.get(1).ok_or("--test needs a number")?;
        test_cases = Some(n.parse::<usize>().map_err(|e| format!("--test {n}: {e}"))?);
        dirs.drain(..2);
    }
    if dirs.is_empty() {
        return Err("usage: fit [--cases] [--test N] RUN_DIR [RUN_DIR ...]".into());
    }
    let gpu = Gpu::new()?;
    println!("| run | method | seed | training cases | training Dice | test Dice |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for dir in &dirs {
        let saved = SavedRun::read(Path::new(dir))?;
        let mut config = saved.config.clone();
        if let Some(n) = test_cases {
            if config.data.source != "default" {
                return Err(format!("--test: {dir} is not on the embedded data set").into());
            }
            config.data.cases = config.data.cases - config.data.test + n;
            config.data.test = n;
        }
        let config = &config;
        let data = run::load_data(config)?;
        let channels = data.labeled[0].image.channels;
        let trained = saved.network(&gpu, channels)?;
        let window =
            SlidingWindow::with_stride_fraction(config.batch.patch, config.log.stride_fraction);
        let dice = |cases: &[LoadedCase]| -> Result<Vec<f64>, Box<dyn std::error::Error>> {
            let mut each = Vec::with_capacity(cases.len());
            for case in cases {
                let volume = HostVolume {
                    data: &case.image.data,
                    channels: case.image.channels,
                    dims: case.image.dims,
                };
                let probabilities = predict_probabilities(
                    &gpu,
                    &trained.net,
                    &trained.params,
                    &trained.stats,
                    &volume,
                    window,
                )?;
                let prediction = argmax(&probabilities, config.data.classes);
                let label = case.label.as_ref().ok_or("a case without a label")?;
                each.push(metrics::overlap(&prediction, label, |v| v > 0).dice());
            }
            Ok(each)
        };
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let (training, mut test) = (dice(&data.labeled)?, dice(&data.test)?);
        println!(
            "| {dir} | {} | {} | {} | {:.3} | {:.3} |",
            config.method,
            config.seed,
            data.labeled.len(),
            mean(&training),
            mean(&test)
        );
        if per_case {
            test.sort_by(f64::total_cmp);
            let cases: Vec<String> = test.iter().map(|d| format!("{d:.2}")).collect();
            println!("test cases: {}", cases.join(" "));
        }
    }
    Ok(())
}
