//! `metaseg evaluate`: the metrics of predicted label volumes against reference labels (files, or
//! folders paired by case name), per case and class, then mean +- std per class; as a table or as
//! JSON lines.

use crate::data::{nifti, DataError, Volume};
use crate::eval::metrics::{class_metrics, summarize, Grid, Metrics, Stat, METRIC_NAMES};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug, Clone)]
#[command(
    after_help = "Definitions (as medpy 0.5 computes them; METHODS.md): surface voxels = \
    X xor erode(X) (6-neighbour); HD95 = the 95th percentile of both directed surface-distance \
    sets together; ASD = the mean distance from the prediction's surface to the reference's; \
    ASSD = the mean over both directed sets together (so the larger surface weighs more, not the \
    mean of the two directed means)."
)]
pub struct EvaluateArgs {
    /// A predicted label volume (.nii or .nii.gz), or a folder of them.
    #[arg(long, value_name = "FILE_OR_DIR")]
    pub pred: PathBuf,
    /// The reference labels: a file, or a folder whose files pair with --pred's by case name (the
    /// file name without .nii / .nii.gz).
    #[arg(long, value_name = "FILE_OR_DIR")]
    pub label: PathBuf,
    /// Distances in voxels (spacing 1 along every axis) instead of the header's physical units.
    #[arg(long)]
    pub voxel_units: bool,
    /// One JSON object per line per case and class, then one per class with case "mean".
    #[arg(long)]
    pub json: bool,
    /// Evaluate these classes (default: every nonzero class present in any of the files).
    #[arg(long, value_name = "C,...", value_delimiter = ',',
          value_parser = clap::value_parser!(u8).range(1..))]
    pub classes: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum EvaluateError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Compute(#[from] metaseg_autograd::Error),
    #[error("{0}")]
    Input(String),
    #[error("{}: value {value} at voxel {index} is not a class index (an integer 0 to 255)", .path.display())]
    NotALabel {
        path: PathBuf,
        value: f32,
        index: usize,
    },
}

pub type Result<T> = std::result::Result<T, EvaluateError>;

/// A prediction and its reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pair {
    pub case: String,
    pub pred: PathBuf,
    pub label: PathBuf,
}

/// A file's case name: its name without `.nii.gz` or `.nii`; None for other files.
pub fn case_name(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    let case = name
        .strip_suffix(".nii.gz")
        .or_else(|| name.strip_suffix(".nii"))?;
    (!case.is_empty()).then(|| case.to_string())
}

/// The NIfTI files of a folder by case name (an error if two files have the same case name).
fn cases_in(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| DataError::Io {
        path: dir.to_path_buf(),
        source: e,
    })?;
    let mut cases = BTreeMap::new();
    for entry in entries {
        let path = entry
            .map_err(|e| DataError::Io {
                path: dir.to_path_buf(),
                source: e,
            })?
            .path();
        let Some(case) = case_name(&path).filter(|_| path.is_file()) else {
            continue;
        };
        if let Some(other) = cases.insert(case.clone(), path.clone()) {
            return Err(EvaluateError::Input(format!(
                "{} and {} are both case '{case}'",
                other.display(),
                path.display()
            )));
        }
    }
    Ok(cases)
}

/// The pairs to evaluate: two files, or the files of two folders by case name (every case must
/// be in both; the error lists those that are not).
pub fn pair(pred: &Path, label: &Path) -> Result<Vec<Pair>> {
    for path in [pred, label] {
        if !path.exists() {
            return Err(DataError::NotFound {
                path: path.to_path_buf(),
            }
            .into());
        }
    }
    match (pred.is_dir(), label.is_dir()) {
        (false, false) => Ok(vec![Pair {
            case: case_name(label).unwrap_or_else(|| label.display().to_string()),
            pred: pred.to_path_buf(),
            label: label.to_path_buf(),
        }]),
        (true, true) => pair_folders(pred, label),
        _ => Err(EvaluateError::Input(format!(
            "--pred {} and --label {} must both be files or both be folders",
            pred.display(),
            label.display()
        ))),
    }
}

fn pair_folders(pred: &Path, label: &Path) -> Result<Vec<Pair>> {
    let (preds, labels) = (cases_in(pred)?, cases_in(label)?);
    let only = |a: &BTreeMap<String, PathBuf>, b: &BTreeMap<String, PathBuf>| -> Vec<String> {
        a.keys().filter(|k| !b.contains_key(*k)).cloned().collect()
    };
    let (no_label, no_pred) = (only(&preds, &labels), only(&labels, &preds));
    let mut problems = Vec::new();
    if !no_label.is_empty() {
        let (n, list) = (no_label.len(), no_label.join(", "));
        problems.push(format!(
            "{n} prediction(s) without a label in {}: {list}",
            label.display()
        ));
    }
    if !no_pred.is_empty() {
        let (n, list) = (no_pred.len(), no_pred.join(", "));
        problems.push(format!(
            "{n} label(s) without a prediction in {}: {list}",
            pred.display()
        ));
    }
    if !problems.is_empty() {
        return Err(EvaluateError::Input(format!(
            "unpaired cases: {}",
            problems.join("; ")
        )));
    }
    if preds.is_empty() {
        return Err(EvaluateError::Input(format!(
            "no .nii or .nii.gz files in {} or {}",
            pred.display(),
            label.display()
        )));
    }
    Ok(preds
        .into_iter()
        .map(|(case, p)| Pair {
            label: labels[&case].clone(),
            case,
            pred: p,
        })
        .collect())
}

/// A label volume: one channel of integers 0 to 255.
fn read_labels(path: &Path) -> Result<(Volume, Vec<u8>)> {
    let volume = nifti::read(path)?;
    if volume.channels != 1 {
        return Err(DataError::Unsupported {
            path: path.to_path_buf(),
            reason: format!("{} channels; a label volume has one", volume.channels),
        }
        .into());
    }
    let labels = volume
        .data
        .iter()
        .enumerate()
        .map(|(index, &value)| {
            let ok = value.fract() == 0.0 && (0.0..=255.0).contains(&value);
            ok.then_some(value as u8)
                .ok_or_else(|| EvaluateError::NotALabel {
                    path: path.to_path_buf(),
                    value,
                    index,
                })
        })
        .collect::<Result<Vec<u8>>>()?;
    Ok((volume, labels))
}

/// The grid both volumes are on, or an error naming both files: same dims, same spacing (to 1e-4
/// relative, the digits float headers keep).
fn common_grid(pair: &Pair, pred: &Volume, label: &Volume) -> Result<Grid> {
    let mismatch = |reason: String| DataError::GridMismatch {
        image: pair.pred.clone(),
        label: pair.label.clone(),
        reason,
    };
    if pred.dims != label.dims {
        let reason = format!("dims [D, H, W] {:?} and {:?}", pred.dims, label.dims);
        return Err(mismatch(reason).into());
    }
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-4 * a.abs().max(b.abs());
    if !(0..3).all(|a| close(pred.spacing[a], label.spacing[a])) {
        let reason = format!(
            "voxel spacing [D, H, W] {:?} and {:?}",
            pred.spacing, label.spacing
        );
        return Err(mismatch(reason).into());
    }
    Ok(Grid {
        dims: label.dims,
        spacing: label.spacing,
    })
}

/// One row of the report.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub case: String,
    pub class: u8,
    pub metrics: Metrics,
}

/// Every case's metrics per class, classes ascending within a case.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub rows: Vec<Row>,
    pub classes: Vec<u8>,
    /// What the distances are measured in.
    pub unit: String,
}

impl Report {
    /// The rows of `class`, in case order.
    pub fn of_class(&self, class: u8) -> Vec<Metrics> {
        self.rows
            .iter()
            .filter(|r| r.class == class)
            .map(|r| r.metrics)
            .collect()
    }
}

/// The unit of a header's spacing (NIfTI `xyzt_units`).
fn spatial_unit(volume: &Volume) -> &'static str {
    match volume.header.xyzt_units & 0x07 {
        1 => "m",
        2 => "mm",
        3 => "um",
        _ => "the headers' spatial unit",
    }
}

/// Evaluates every pair. A class evaluated in some cases but absent from both files of another
/// gets a row there too (dice 1, no distances), so every class has a row in every case.
pub fn evaluate(pairs: &[Pair], voxel_units: bool, classes: &[u8]) -> Result<Report> {
    let mut per_case: Vec<BTreeMap<u8, Metrics>> = Vec::with_capacity(pairs.len());
    let mut unit = "voxels".to_string();
    for pair in pairs {
        let (pred_volume, pred) = read_labels(&pair.pred)?;
        let (label_volume, label) = read_labels(&pair.label)?;
        let mut grid = common_grid(pair, &pred_volume, &label_volume)?;
        if voxel_units {
            grid.spacing = [1.0; 3];
        } else {
            unit = spatial_unit(&label_volume).to_string();
        }
        let present: BTreeSet<u8> = pred.iter().chain(&label).copied().collect();
        let wanted: Vec<u8> = if classes.is_empty() {
            present.into_iter().filter(|&c| c != 0).collect()
        } else {
            classes.to_vec()
        };
        let mut row = BTreeMap::new();
        for class in wanted {
            row.insert(class, class_metrics(&pred, &label, class, grid)?);
        }
        per_case.push(row);
    }
    let all: BTreeSet<u8> = per_case.iter().flat_map(|r| r.keys().copied()).collect();
    let mut rows = Vec::new();
    for (pair, metrics) in pairs.iter().zip(&per_case) {
        for &class in &all {
            rows.push(Row {
                case: pair.case.clone(),
                class,
                metrics: metrics.get(&class).copied().unwrap_or(Metrics::BOTH_EMPTY),
            });
        }
    }
    Ok(Report {
        rows,
        classes: all.into_iter().collect(),
        unit,
    })
}

fn number(v: Option<f64>, decimals: usize) -> String {
    v.map_or("-".to_string(), |v| format!("{v:.decimals$}"))
}

/// Dice and Jaccard with 4 decimals, distances with 3.
fn decimals(metric: usize) -> usize {
    if metric < 2 {
        4
    } else {
        3
    }
}

fn note(m: &Metrics) -> &'static str {
    match (m.pred_voxels, m.reference_voxels) {
        (0, 0) => "both empty",
        (0, _) => "empty prediction",
        (_, 0) => "empty reference",
        _ => "",
    }
}

/// The report as a table per case and class, then mean +- std per class.
pub fn table(report: &Report) -> String {
    let width = report.rows.iter().map(|r| r.case.len()).max().unwrap_or(0);
    let width = width.max(4);
    let mut out = format!("distances in {} (\"-\": undefined)\n", report.unit);
    let mut line = format!("{:<width$}  class", "case");
    for name in METRIC_NAMES {
        let _ = write!(line, " {name:>9}");
    }
    line.push_str("  pred/label voxels");
    out.push_str(&line);
    out.push('\n');
    for r in &report.rows {
        let mut line = format!("{:<width$}  {:>5}", r.case, r.class);
        for (k, v) in r.metrics.values().into_iter().enumerate() {
            let _ = write!(line, " {:>9}", number(v, decimals(k)));
        }
        let m = &r.metrics;
        let voxels = format!("{}/{}", m.pred_voxels, m.reference_voxels);
        let _ = write!(line, "  {voxels:>17}  {}", note(m));
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out.push_str(&mean_table(report));
    out
}

/// Mean +- std per class; the distances are over the cases where they are defined.
fn mean_table(report: &Report) -> String {
    let cases = report.rows.len() / report.classes.len().max(1);
    let mut out = format!("\nmean ± std over {cases} case(s) (population std)\nclass");
    for name in METRIC_NAMES {
        let _ = write!(out, " {name:>16}");
    }
    out.push_str("  cases with distances\n");
    for &class in &report.classes {
        let stats = summarize(&report.of_class(class));
        let _ = write!(out, "{class:>5}");
        for (k, s) in stats.iter().enumerate() {
            let d = decimals(k);
            let text = match (s.mean, s.std) {
                (Some(m), Some(sd)) => format!("{m:.d$} ± {sd:.d$}"),
                _ => "-".to_string(),
            };
            let _ = write!(out, " {text:>16}");
        }
        let _ = writeln!(out, "  {} of {cases}", stats[2].defined);
    }
    out
}

/// A JSON line of one case and class.
#[derive(Serialize)]
struct CaseLine<'a> {
    case: &'a str,
    class: u8,
    dice: f64,
    jaccard: f64,
    hd95: Option<f64>,
    asd: Option<f64>,
    assd: Option<f64>,
    pred_voxels: usize,
    label_voxels: usize,
}

/// One value per metric.
#[derive(Serialize)]
struct PerMetric<T> {
    dice: T,
    jaccard: T,
    hd95: T,
    asd: T,
    assd: T,
}

impl<T: Copy> PerMetric<T> {
    fn from(values: [T; 5]) -> Self {
        let [dice, jaccard, hd95, asd, assd] = values;
        PerMetric {
            dice,
            jaccard,
            hd95,
            asd,
            assd,
        }
    }
}

/// The JSON line of a class's means: the means at the top level, their std and the number of
/// cases each is over beside them.
#[derive(Serialize)]
struct MeanLine {
    case: &'static str,
    class: u8,
    #[serde(flatten)]
    mean: PerMetric<Option<f64>>,
    std: PerMetric<Option<f64>>,
    n: PerMetric<usize>,
    cases: usize,
}

/// The report as JSON lines: one per case and class, then one per class with case "mean".
pub fn json_lines(report: &Report) -> String {
    let mut out = String::new();
    let mut line = |json: String| {
        out.push_str(&json);
        out.push('\n');
    };
    for r in &report.rows {
        let m = &r.metrics;
        line(to_json(&CaseLine {
            case: &r.case,
            class: r.class,
            dice: m.dice,
            jaccard: m.jaccard,
            hd95: m.hd95,
            asd: m.asd,
            assd: m.assd,
            pred_voxels: m.pred_voxels,
            label_voxels: m.reference_voxels,
        }));
    }
    for &class in &report.classes {
        let cases = report.of_class(class);
        let stats = summarize(&cases);
        line(to_json(&MeanLine {
            case: "mean",
            class,
            mean: PerMetric::from(stats.map(|s: Stat| s.mean)),
            std: PerMetric::from(stats.map(|s| s.std)),
            n: PerMetric::from(stats.map(|s| s.defined)),
            cases: cases.len(),
        }));
    }
    out
}

fn to_json(value: &impl Serialize) -> String {
    serde_json::to_string(value).expect("numbers and strings serialise")
}

/// `metaseg evaluate`: pairs, evaluates and prints.
pub fn run(args: &EvaluateArgs) -> Result<()> {
    let pairs = pair(&args.pred, &args.label)?;
    let report = evaluate(&pairs, args.voxel_units, &args.classes)?;
    if report.classes.is_empty() {
        return Err(EvaluateError::Input(format!(
            "no foreground class in any of the {} pair(s): every voxel is 0; name the classes to \
             evaluate with --classes",
            pairs.len()
        )));
    }
    let text = if args.json {
        json_lines(&report)
    } else {
        table(&report)
    };
    // A closed pipe (`metaseg evaluate ... | head`) is not an error.
    let _ = std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes());
    Ok(())
}
