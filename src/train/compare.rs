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
    pub method: Method,
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
fn by_method(results: &[RunResult]) -> Vec<(Method, Vec<&RunResult>)> {
    let mut groups: Vec<(Method, Vec<&RunResult>)> = Vec::new();
    for r in results {
        match groups.iter_mut().find(|(m, _)| *m == r.method) {
            Some((_, runs)) => runs.push(r),
            None => groups.push((r.method, vec![r])),
        }
    }
    groups
}

/// A figure of the comparison's tables: its name and how to read it from a run.
pub type Column = (&'static str, fn(&RunResult) -> Option<f64>);

/// The figures of a run's test results, then its time per iteration.
pub const COLUMNS: [Column; 5] = [
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
/// With supervised and another method, each other method's row also has its paired difference
/// to supervised (mean ± std over seeds) and the seeds on which it is ahead, and a second table
/// lists the difference of every seed.
pub fn markdown(results: &[RunResult]) -> String {
    let paired = paired_differences(results).filter(|p| !p.is_empty());
    let mut out = String::from("| method | seeds |");
    let mut rule = String::from("|---|---|");
    let paired_columns = paired.as_ref().map_or(&[][..], |_| &PAIRED_COLUMNS[..]);
    for name in COLUMNS
        .iter()
        .map(|c| c.0)
        .chain(paired_columns.iter().copied())
    {
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
        if let Some(paired) = &paired {
            let _ = match paired.iter().find(|p| p.method == method) {
                Some(p) => write!(
                    out,
                    " {} | {} of {} |",
                    difference_cell(p, runs.len()),
                    p.ahead(),
                    p.per_seed.len()
                ),
                None => write!(out, " (reference) | |"),
            };
        }
        out.push('\n');
    }
    if let Some(paired) = &paired {
        out.push('\n');
        out.push_str(&per_seed_markdown(results, paired));
    }
    out
}

const PAIRED_COLUMNS: [&str; 2] = ["Dice - supervised (paired)", "seeds ahead"];

/// Mean ± std of a method's paired differences, signed; how many seeds were paired if not all
/// of its `runs`.
fn difference_cell(p: &PairedDifference, runs: usize) -> String {
    match p.summary() {
        None => "undefined".into(),
        Some((m, s, n)) => {
            let spread = if n > 1 {
                format!(" ± {s:.3}")
            } else {
                String::new()
            };
            let count = if n < runs {
                format!(" ({n} of {runs} paired)")
            } else {
                String::new()
            };
            format!("{m:+.3}{spread}{count}")
        }
    }
}

/// Supervised's test Dice and every other method's difference to it, one row per seed.
fn per_seed_markdown(results: &[RunResult], paired: &[PairedDifference]) -> String {
    let reference = REFERENCE;
    let mut seeds: Vec<u64> = results.iter().map(|r| r.seed).collect();
    seeds.sort_unstable();
    seeds.dedup();
    let mut out = format!("| seed | {reference} |");
    for p in paired {
        let _ = write!(out, " {} - {reference} |", p.method);
    }
    let _ = writeln!(out, "\n|---|---|{}", "---|".repeat(paired.len()));
    for seed in seeds {
        let dice = (results.iter())
            .find(|r| r.method == reference && r.seed == seed)
            .map_or("-".into(), |r| format!("{:.3}", r.dice));
        let _ = write!(out, "| {seed} | {dice} |");
        for p in paired {
            let d = p.per_seed.iter().find(|&&(s, _)| s == seed);
            let _ = write!(
                out,
                " {} |",
                d.map_or("-".into(), |(_, d)| format!("{d:+.3}"))
            );
        }
        out.push('\n');
    }
    out
}

/// The method every paired difference is taken against: the floor of the tables.
pub const REFERENCE: Method = Method::Supervised;

/// A method's test Dice minus the reference's (supervised) on the same seed, which is the same
/// data and split: the comparison that the split's luck cancels out of.
#[derive(Clone, Debug, PartialEq)]
pub struct PairedDifference {
    pub method: Method,
    /// (seed, method's Dice - supervised's Dice) for every seed where both Dice are finite, in
    /// the order the method ran.
    pub per_seed: Vec<(u64, f64)>,
}

impl PairedDifference {
    /// Mean and sample standard deviation of the differences, and their count.
    pub fn summary(&self) -> Option<(f64, f64, usize)> {
        mean_std(self.per_seed.iter().map(|&(_, d)| Some(d)))
    }

    /// The seeds on which the method is strictly ahead of supervised.
    pub fn ahead(&self) -> usize {
        self.per_seed.iter().filter(|&&(_, d)| d > 0.0).count()
    }
}

/// Every other method's paired difference to supervised, in the order the methods first ran;
/// `None` when supervised is not among the results (there is then nothing to pair with).
pub fn paired_differences(results: &[RunResult]) -> Option<Vec<PairedDifference>> {
    let groups = by_method(results);
    let reference = groups.iter().find(|(m, _)| *m == REFERENCE)?;
    let reference_dice = |seed: u64| {
        (reference.1.iter())
            .find(|r| r.seed == seed && r.dice.is_finite())
            .map(|r| r.dice)
    };
    let paired = groups.iter().filter(|(m, _)| *m != REFERENCE);
    let differences = paired.map(|(method, runs)| PairedDifference {
        method: *method,
        per_seed: (runs.iter())
            .filter(|r| r.dice.is_finite())
            .filter_map(|r| reference_dice(r.seed).map(|s| (r.seed, r.dice - s)))
            .collect(),
    });
    Some(differences.collect())
}

/// Why a comparison has no paired differences although it has methods to pair: supervised was
/// not run. `None` when there is nothing to say.
pub fn missing_reference(results: &[RunResult]) -> Option<String> {
    let others = results.iter().any(|r| r.method != REFERENCE);
    (others && paired_differences(results).is_none()).then(|| {
        format!(
            "No paired differences: they are taken against {0} on the same seed, and {0} was \
             not run (add it to --method).",
            REFERENCE.name()
        )
    })
}

/// The comparison as JSON (`results.json`), for tables and plots built elsewhere: every run, and
/// per method the mean ± std of each figure over seeds and, when supervised ran, the paired
/// difference to it (per seed, mean, std, seeds ahead). Undefined figures are `null`.
pub fn json(results: &[RunResult]) -> serde_json::Value {
    let paired = paired_differences(results);
    let methods = by_method(results).into_iter().map(|(method, runs)| {
        let mut entry = serde_json::json!({ "method": method, "seeds": runs.len() });
        for (name, get) in COLUMNS {
            let summary = mean_std(runs.iter().map(|r| get(r)));
            entry[json_key(name)] = summary.map_or(
                serde_json::Value::Null,
                |(m, s, n)| serde_json::json!({ "mean": m, "std": s, "defined": n }),
            );
        }
        let difference = paired.iter().flatten().find(|p| p.method == method);
        entry["paired_to_supervised"] = difference.map_or(serde_json::Value::Null, |p| {
            let (mean, std, pairs) = p
                .summary()
                .map_or((None, None, 0), |(m, s, n)| (Some(m), Some(s), n));
            let per_seed: Vec<_> = (p.per_seed.iter())
                .map(|&(seed, d)| serde_json::json!({ "seed": seed, "difference": d }))
                .collect();
            serde_json::json!({
                "per_seed": per_seed, "mean": mean, "std": std, "pairs": pairs, "ahead": p.ahead(),
            })
        });
        entry
    });
    let runs: Vec<_> = (results.iter())
        .map(|r| {
            serde_json::json!({
                "method": r.method, "seed": r.seed, "dice": r.dice, "jaccard": r.jaccard,
                "hd95": r.hd95, "asd": r.asd, "seconds_per_iteration": r.seconds_per_iteration,
            })
        })
        .collect();
    serde_json::json!({
        "reference": paired.as_ref().map(|_| REFERENCE.name()),
        "methods": methods.collect::<Vec<_>>(),
        "runs": runs,
    })
}

/// A column's name as a JSON key: `s/iteration` -> `seconds_per_iteration`, others lower case.
fn json_key(column: &str) -> String {
    match column {
        "s/iteration" => "seconds_per_iteration".into(),
        name => name.to_lowercase(),
    }
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

    fn result(method: Method, seed: u64, dice: f64, hd95: Option<f64>) -> RunResult {
        RunResult {
            method,
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
            result(Method::Supervised, 1, 0.5, Some(4.0)),
            result(Method::Supervised, 2, 0.7, None),
            result(Method::Full, 1, 0.9, None),
        ];
        let table = markdown(&results);
        // The method table, then a blank line and the table of paired differences per seed.
        let lines: Vec<&str> = table.lines().take_while(|l| !l.is_empty()).collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(
            lines[2].starts_with("| supervised | 2 | 0.600 ± 0.141 |"),
            "{table}"
        );
        assert!(lines[2].contains("| 4.000 (1 of 2 defined) |"), "{table}");
        assert!(lines[3].contains("| undefined |"), "{table}");
        assert_eq!(csv(&results).lines().count(), 4);
    }

    /// Supervised 0.5, 0.6, 0.4 on seeds 1-3; full 0.8, 0.7, 0.6 (listed in another order), so
    /// full - supervised = 0.3, 0.1, 0.2: mean 0.2, deviations 0.1, -0.1, 0, sample variance
    /// (0.01 + 0.01 + 0) / 2 = 0.01, std 0.1, ahead on 3 of 3. Mean-teacher 0.4, 0.7 and a
    /// non-finite Dice on seed 3: -0.1 and +0.1 on two pairs, mean 0, std sqrt(0.02 / 1) =
    /// 0.1414, ahead on 1 of 2.
    fn paired_example() -> Vec<RunResult> {
        vec![
            result(Method::Supervised, 1, 0.5, None),
            result(Method::Supervised, 2, 0.6, None),
            result(Method::Supervised, 3, 0.4, None),
            result(Method::Full, 3, 0.6, None),
            result(Method::Full, 1, 0.8, None),
            result(Method::Full, 2, 0.7, None),
            result(Method::MeanTeacher, 1, 0.4, None),
            result(Method::MeanTeacher, 2, 0.7, None),
            result(Method::MeanTeacher, 3, f64::NAN, None),
        ]
    }

    #[test]
    fn paired_differences_match_the_hand_computed_ones() {
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        let paired = paired_differences(&paired_example()).unwrap();
        let names: Vec<&str> = paired.iter().map(|p| p.method.name()).collect();
        assert_eq!(names, ["full", "mean-teacher"]);
        let full = &paired[0];
        let seeds: Vec<u64> = full.per_seed.iter().map(|&(s, _)| s).collect();
        assert_eq!(seeds, [3, 1, 2]);
        for (&(_, got), want) in full.per_seed.iter().zip([0.2, 0.3, 0.1]) {
            assert!(close(got, want), "{:?}", full.per_seed);
        }
        let (mean, std, n) = full.summary().unwrap();
        assert!(
            close(mean, 0.2) && close(std, 0.1) && n == 3,
            "{mean} {std} {n}"
        );
        assert_eq!(full.ahead(), 3);
        let teacher = &paired[1];
        let (mean, std, n) = teacher.summary().unwrap();
        assert!(close(mean, 0.0) && close(std, 0.02f64.sqrt()) && n == 2);
        assert_eq!(teacher.ahead(), 1);
    }

    #[test]
    fn the_table_carries_the_paired_differences() {
        let table = markdown(&paired_example());
        let row = |method: &str| {
            let start = format!("| {method} |");
            let line = table.lines().find(|l| l.starts_with(&start));
            line.unwrap_or_else(|| panic!("no {method} row in\n{table}"))
        };
        assert!(table
            .lines()
            .next()
            .unwrap()
            .contains("| Dice - supervised (paired) | seeds ahead |"));
        assert!(
            row("full").ends_with("| +0.200 ± 0.100 | 3 of 3 |"),
            "{table}"
        );
        assert!(
            row("mean-teacher").ends_with("| +0.000 ± 0.141 (2 of 3 paired) | 1 of 2 |"),
            "{table}"
        );
        assert!(row("supervised").ends_with("| (reference) | |"), "{table}");
        // The per-seed table: supervised's Dice, then each method's difference.
        assert!(
            table.contains("| seed | supervised | full - supervised | mean-teacher - supervised |"),
            "{table}"
        );
        assert!(table.contains("| 1 | 0.500 | +0.300 | -0.100 |"), "{table}");
        assert!(table.contains("| 3 | 0.400 | +0.200 | - |"), "{table}");
        assert_eq!(missing_reference(&paired_example()), None);
    }

    #[test]
    fn the_json_summary_holds_the_same_figures() {
        let summary = json(&paired_example());
        assert_eq!(summary["reference"], "supervised");
        let full = &summary["methods"][1];
        assert_eq!(full["method"], "full");
        let paired = &full["paired_to_supervised"];
        assert!((paired["mean"].as_f64().unwrap() - 0.2).abs() < 1e-12);
        assert!((paired["std"].as_f64().unwrap() - 0.1).abs() < 1e-12);
        assert_eq!(
            (paired["ahead"].as_u64(), paired["pairs"].as_u64()),
            (Some(3), Some(3))
        );
        assert_eq!(paired["per_seed"][1]["seed"], 1);
        assert!((full["dice"]["mean"].as_f64().unwrap() - 0.7).abs() < 1e-12);
        assert!(summary["methods"][0]["paired_to_supervised"].is_null());
        // A NaN Dice is written as null, not as an invalid number.
        assert!(summary["runs"][8]["dice"].is_null());
        assert_eq!(summary["runs"].as_array().unwrap().len(), 9);
    }

    #[test]
    fn without_supervised_there_are_no_differences_and_a_note_says_why() {
        let results = [
            result(Method::Full, 1, 0.8, None),
            result(Method::MeanTeacher, 1, 0.6, None),
        ];
        assert_eq!(paired_differences(&results), None);
        let table = markdown(&results);
        assert!(!table.contains("paired"), "{table}");
        assert!(missing_reference(&results)
            .unwrap()
            .contains("supervised was not run"));
        assert!(json(&results)["reference"].is_null());
        // Supervised alone has nothing to be paired with, and nothing is missing.
        let alone = [
            result(Method::Supervised, 1, 0.5, None),
            result(Method::Supervised, 2, 0.6, None),
        ];
        assert_eq!(paired_differences(&alone), Some(vec![]));
        assert!(!markdown(&alone).contains("paired"));
        assert_eq!(missing_reference(&alone), None);
    }
}
