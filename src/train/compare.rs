//! Several methods and seeds trained on the same data and split, and their test results side by
//! side: what `metaseg train` does when given more than one method or seed.

use super::methods::Method;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The baselines `metaseg train` compares when no method is named.
pub const BASELINES: [Method; 3] = [Method::Supervised, Method::MeanTeacher, Method::Full];

/// One run of a comparison: a method, a seed and the directory it writes.
#[derive(Clone, Debug, PartialEq)]
pub struct RunSpec {
    pub method: Method,
    pub seed: u64,
    pub dir: PathBuf,
}

/// Every method for `seeds` consecutive seeds from `first_seed`, method-major. A single run writes
/// straight into `out`; otherwise each gets `out/METHOD` or, with several seeds,
/// `out/METHOD/seed-S`.
pub fn plan(methods: &[Method], first_seed: u64, seeds: u64, out: &Path) -> Vec<RunSpec> {
    let single = methods.len() == 1 && seeds == 1;
    let mut runs = Vec::new();
    for &method in methods {
        for seed in first_seed..first_seed + seeds {
            let dir = match (single, seeds) {
                (true, _) => out.to_path_buf(),
                (false, 1) => out.join(method.name()),
                (false, _) => out.join(method.name()).join(format!("seed-{seed}")),
            };
            runs.push(RunSpec { method, seed, dir });
        }
    }
    runs
}

/// A finished run's figures on the test cases.
#[derive(Clone, Debug, PartialEq)]
pub struct RunResult {
    pub method: String,
    pub seed: u64,
    /// Means over the test cases (foreground classes): Dice, Jaccard, HD95 and ASD. A distance is
    /// `None` when it is undefined for every case (empty predictions).
    pub dice: f64,
    pub jaccard: f64,
    pub hd95: Option<f64>,
    pub asd: Option<f64>,
    /// Wall time per training iteration.
    pub seconds_per_iteration: f64,
}

/// Mean, sample standard deviation (0 for a single value) and count of the values that are
/// defined.
pub fn mean_std(values: impl IntoIterator<Item = Option<f64>>) -> Option<(f64, f64, usize)> {
    let v: Vec<f64> = values.into_iter().flatten().collect();
    if v.is_empty() {
        return None;
    }
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (v.len() - 1) as f64
    } else {
        0.0
    };
    Some((mean, var.sqrt(), v.len()))
}

/// The methods in the order they were first run, with their runs.
fn by_method(results: &[RunResult]) -> Vec<(&str, Vec<&RunResult>)> {
    let mut groups: Vec<(&str, Vec<&RunResult>)> = Vec::new();
    for r in results {
        match groups.iter_mut().find(|(m, _)| *m == r.method) {
            Some((_, runs)) => runs.push(r),
            None => groups.push((&r.method, vec![r])),
        }
    }
    groups
}

type Column = (&'static str, fn(&RunResult) -> Option<f64>);

const COLUMNS: [Column; 5] = [
    ("Dice", |r| Some(r.dice)),
    ("Jaccard", |r| Some(r.jaccard)),
    ("HD95", |r| r.hd95),
    ("ASD", |r| r.asd),
    ("s/iteration", |r| Some(r.seconds_per_iteration)),
];

fn cell(summary: Option<(f64, f64, usize)>, runs: usize) -> String {
    match summary {
        Some((m, s, n)) if n == runs && n > 1 => format!("{m:.3} ± {s:.3}"),
        Some((m, s, n)) if n > 1 => format!("{m:.3} ± {s:.3} ({n} of {runs} defined)"),
        Some((m, _, n)) if n < runs => format!("{m:.3} ({n} of {runs} defined)"),
        Some((m, _, _)) => format!("{m:.3}"),
        None => "undefined".into(),
    }
}

/// A Markdown table: one row per method, each figure the mean ± standard deviation over seeds.
pub fn markdown(results: &[RunResult]) -> String {
    let mut out = String::from("| method | seeds |");
    let mut rule = String::from("|---|---|");
    for (name, _) in COLUMNS {
        let _ = write!(out, " {name} |");
        rule.push_str("---|");
    }
    let _ = writeln!(out, "\n{rule}");
    for (method, runs) in by_method(results) {
        let _ = write!(out, "| {method} | {} |", runs.len());
        for (_, get) in COLUMNS {
            let summary = mean_std(runs.iter().map(|r| get(r)));
            let _ = write!(out, " {} |", cell(summary, runs.len()));
        }
        out.push('\n');
    }
    out
}

/// One CSV line per run, for plots and statistics elsewhere.
pub fn csv(results: &[RunResult]) -> String {
    let mut out = String::from("method,seed,dice,jaccard,hd95,asd,seconds_per_iteration\n");
    let opt = |v: Option<f64>| v.map_or(String::new(), |x| format!("{x}"));
    for r in results {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{}",
            r.method,
            r.seed,
            r.dice,
            r.jaccard,
            opt(r.hd95),
            opt(r.asd),
            r.seconds_per_iteration
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(method: &str, seed: u64, dice: f64, hd95: Option<f64>) -> RunResult {
        RunResult {
            method: method.into(),
            seed,
            dice,
            jaccard: dice / (2.0 - dice),
            hd95,
            asd: None,
            seconds_per_iteration: 1.0,
        }
    }

    #[test]
    fn plan_nests_directories_only_when_there_are_several_runs() {
        let out = Path::new("runs/x");
        let one = plan(&[Method::Full], 7, 1, out);
        assert_eq!(one[0].dir, out);
        let three = plan(&BASELINES, 7, 1, out);
        assert_eq!(three[2].dir, out.join("full"));
        let seeds = plan(&BASELINES[..1], 7, 2, out);
        assert_eq!(seeds[1].dir, out.join("supervised/seed-8"));
        assert_eq!(seeds[1].seed, 8);
    }

    #[test]
    fn mean_std_skips_undefined_values_and_uses_the_sample_deviation() {
        assert_eq!(mean_std([None, None]), None);
        assert_eq!(mean_std([Some(2.0)]), Some((2.0, 0.0, 1)));
        let summary = mean_std([Some(1.0), None, Some(3.0)]);
        assert_eq!(summary, Some((2.0, 2f64.sqrt(), 2)));
    }

    #[test]
    fn markdown_has_one_row_per_method_with_spread_over_seeds() {
        let results = [
            result("supervised", 1, 0.5, Some(4.0)),
            result("supervised", 2, 0.7, None),
            result("full", 1, 0.9, None),
        ];
        let table = markdown(&results);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(
            lines[2].starts_with("| supervised | 2 | 0.600 ± 0.141 |"),
            "{table}"
        );
        assert!(lines[2].contains("| 4.000 (1 of 2 defined) |"), "{table}");
        assert!(lines[3].contains("| undefined |"), "{table}");
        assert_eq!(csv(&results).lines().count(), 4);
    }
}
