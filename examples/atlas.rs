//! The image-free baseline of a training configuration's data: every test case predicted as the
//! voxelwise majority vote of the labeled cases' reference labels (a class where at least half of
//! them mark it), scored as a trained run's test cases are. A network that does no better than
//! this has learnt where the target usually lies, not how to find it in the image; a data set on
//! which it beats the trained networks cannot tell methods apart by what they see.
//!
//! Usage: cargo run --release --example atlas -- [--seeds N] [PRESET] [KEY=VALUE ...]
//! (default: the `default` preset, 1 seed from the preset's; KEY=VALUE as `train --set`, e.g.
//! `data.source=DIR`). Prints each seed's test Dice, then the mean ± standard deviation over the
//! seeds of each figure `metaseg train` reports.

use metaseg::train::compare::{mean_std, RunResult, COLUMNS};
use metaseg::train::config::TrainConfig;
use metaseg::train::run;

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut seeds = 1;
    if let Some(i) = args.iter().position(|a| a == "--seeds") {
        let n = args.get(i + 1).ok_or("--seeds needs a number")?;
        seeds = n.parse().map_err(|e| format!("--seeds {n}: {e}"))?;
        args.drain(i..i + 2);
    }
    let (preset, overrides) = match args.first() {
        Some(a) if !a.contains('=') => (a.clone(), args[1..].to_vec()),
        _ => ("default".to_string(), args),
    };
    let first = TrainConfig::load(&preset, &overrides)?.seed;
    let mut results = Vec::new();
    for seed in first..first + seeds {
        let mut sets = overrides.clone();
        sets.push(format!("seed={seed}"));
        let config = TrainConfig::load(&preset, &sets)?;
        let result = atlas_result(&config)?;
        println!("seed {seed}: test Dice {:.4}", result.dice);
        results.push(result);
    }
    // Every figure but the time per iteration: the vote trains nothing.
    for (name, get) in &COLUMNS[..4] {
        let summary = mean_std(results.iter().map(get));
        let text = summary.map_or("undefined".into(), |(m, s, n)| {
            format!("{m:.4} ± {s:.4} ({n} of {seeds} seeds defined)")
        });
        println!("atlas {name}: {text}");
    }
    Ok(())
}

/// The vote of `config`'s labeled cases scored on its test cases.
fn atlas_result(config: &TrainConfig) -> Result<RunResult, Box<dyn std::error::Error>> {
    let data = run::load_data(config)?;
    let labels: Vec<&Vec<u8>> = data
        .labeled
        .iter()
        .filter_map(|c| c.label.as_ref())
        .collect();
    let voxels = labels.first().ok_or("the split has no labeled case")?.len();
    let mut cases = data.labeled.iter().chain(&data.test);
    if let Some(c) = cases.find(|c| c.image.voxels() != voxels) {
        return Err(format!("case {} is not on the first labeled case's grid", c.name).into());
    }
    let classes = config.data.classes;
    let vote: Vec<u8> = (0..voxels)
        .map(|v| {
            let mut counts = vec![0usize; classes];
            for l in &labels {
                counts[usize::from(l[v])] += 1;
            }
            // The foreground class with most votes, if at least half the cases mark it.
            (1..classes)
                .max_by_key(|&c| counts[c])
                .filter(|&c| 2 * counts[c] >= labels.len())
                .map_or(0, |c| c as u8)
        })
        .collect();
    let predictions = vec![vote; data.test.len()];
    Ok(run::score(config, &data.test, &predictions)?)
}
