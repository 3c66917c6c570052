//! Line and dot plots: the loss terms and validation Dice of a run's log against the step, and
//! the test Dice of every method in a comparison.

use super::{draw_error, font, io, write_png, ReportError, Result, Rgb, FAMILY};
use crate::train::compare::{mean_std, paired_differences, RunResult, REFERENCE};
use crate::train::methods::Method;
use plotters::coord::ranged1d::{SegmentValue, SegmentedCoord};
use plotters::coord::types::{RangedCoordf64, RangedCoordi32};
use plotters::prelude::*;
use std::ops::Range;
use std::path::Path;

/// Width and height of `loss.png`.
pub const LOSS_SIZE: (u32, u32) = (960, 720);
/// Width and height of `comparison.png`.
pub const COMPARISON_SIZE: (u32, u32) = (1200, 480);
/// The loss terms' colours, in the order of [`Log::terms`] (repeating past the sixth).
pub const TERM_COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(188, 189, 34),
];
/// Validation Dice (and the comparison's points): used by nothing else, so a test can find it.
pub const DICE_COLOUR: RGBColor = RGBColor(44, 160, 44);

/// Keys of a log line that are not loss terms.
const NOT_TERMS: [&str; 4] = ["step", "lr", "seconds", "validation_dice"];

type Error = Box<dyn std::error::Error>;

/// One named curve: (step, value) points, finite values only.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// The curves of a run's `log.jsonl`.
#[derive(Clone, Debug, PartialEq)]
pub struct Log {
    /// Every loss term, `loss` (the total) first, then the others by name.
    pub terms: Vec<Series>,
    /// Validation Dice at the steps that have it.
    pub validation: Vec<(f64, f64)>,
    /// Steps of the log (lines), whatever their values.
    pub steps: usize,
}

/// Reads a log written by `run::train`. Non-finite values (written as `null`) are left out of
/// the curves; a line that is not a JSON object with a `step` is an error naming it.
pub fn read_log(path: &Path) -> Result<Log> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let mut log = Log {
        terms: Vec::new(),
        validation: Vec::new(),
        steps: 0,
    };
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| ReportError::Log {
            path: path.to_path_buf(),
            line: i + 1,
            message,
        };
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        let object = value
            .as_object()
            .ok_or_else(|| bad("not an object".into()))?;
        if object.contains_key("event") {
            // Not an iteration: a resume that changed settings, say.
            continue;
        }
        let step = object
            .get("step")
            .and_then(|s| s.as_f64())
            .ok_or_else(|| bad("no step".into()))?;
        log.steps += 1;
        let finite = |key: &str| {
            object
                .get(key)
                .and_then(|v| v.as_f64())
                .filter(|v| v.is_finite())
        };
        if let Some(dice) = finite("validation_dice") {
            log.validation.push((step, dice));
        }
        for key in object.keys().filter(|k| !NOT_TERMS.contains(&k.as_str())) {
            let index = match log.terms.iter().position(|s| &s.name == key) {
                Some(index) => index,
                None => {
                    log.terms.push(Series {
                        name: key.clone(),
                        points: Vec::new(),
                    });
                    log.terms.len() - 1
                }
            };
            if let Some(v) = finite(key) {
                log.terms[index].points.push((step, v));
            }
        }
    }
    log.terms
        .sort_by(|a, b| (a.name != "loss", &a.name).cmp(&(b.name != "loss", &b.name)));
    Ok(log)
}

/// A centred moving average over `window` points (fewer at the ends), in step order.
pub fn smooth(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let half = window / 2;
    (0..points.len())
        .map(|i| {
            let span = &points[i.saturating_sub(half)..(i + half + 1).min(points.len())];
            let mean = span.iter().map(|p| p.1).sum::<f64>() / span.len() as f64;
            (points[i].0, mean)
        })
        .collect()
}

/// A range holding every value with a 5% margin, widened when they are all equal (or absent).
fn padded(values: impl Iterator<Item = f64>) -> Range<f64> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if lo > hi {
        return 0.0..1.0;
    }
    let pad = if hi > lo {
        0.05 * (hi - lo)
    } else {
        0.5 * lo.abs().max(1.0)
    };
    lo - pad..hi + pad
}

/// Draws `loss.png` from `log`: every loss term against the step (its moving average over about
/// 5% of the steps, over the faint raw values) and, below, the validation Dice when the log has
/// any.
pub fn loss_curves(log: &Path, out: &Path) -> Result<()> {
    let curves = read_log(log)?;
    if curves.steps == 0 {
        return Err(ReportError::Log {
            path: log.to_path_buf(),
            line: 0,
            message: "no steps to plot".into(),
        });
    }
    font().map_err(draw_error(out))?;
    let (w, h) = LOSS_SIZE;
    let mut picture = Rgb::new(w as usize, h as usize, [255; 3]);
    draw_loss(&mut picture.data, &curves).map_err(|e| draw_error(out)(e.to_string()))?;
    write_png(out, &picture)
}

fn draw_loss(buffer: &mut [u8], curves: &Log) -> std::result::Result<(), Error> {
    let root = BitMapBackend::with_buffer(buffer, LOSS_SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let steps = curves
        .terms
        .iter()
        .flat_map(|s| s.points.iter())
        .chain(&curves.validation)
        .map(|p| p.0);
    let x = padded(steps);
    if curves.validation.is_empty() {
        loss_panel(&root, x, curves)?;
    } else {
        let (top, bottom) = root.split_vertically((60).percent_height());
        loss_panel(&top, x.clone(), curves)?;
        dice_panel(&bottom, x, &curves.validation)?;
    }
    root.present()?;
    Ok(())
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn loss_panel(area: &Area, x: Range<f64>, curves: &Log) -> std::result::Result<(), Error> {
    let values = curves
        .terms
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1));
    let mut chart = ChartBuilder::on(area)
        .caption("Training loss", (FAMILY, 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(x, padded(values))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .label_style((FAMILY, 14))
        .draw()?;
    for (k, series) in curves.terms.iter().enumerate() {
        let colour = TERM_COLOURS[k % TERM_COLOURS.len()];
        let raw = series.points.iter().copied();
        chart.draw_series(LineSeries::new(raw, colour.mix(0.25)))?;
        let window = (series.points.len() / 20).max(1);
        let smoothed = smooth(&series.points, window);
        let line = colour.stroke_width(2);
        chart
            .draw_series(LineSeries::new(smoothed, line))?
            .label(series.name.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], line));
        // A single point draws no line: mark it.
        if series.points.len() == 1 {
            let p = series.points[0];
            chart.draw_series([Circle::new(p, 4, colour.filled())])?;
        }
    }
    if !curves.terms.is_empty() {
        legend(&mut chart)?;
    }
    Ok(())
}

fn legend<'a, X, Y>(
    chart: &mut ChartContext<'a, BitMapBackend<'a>, Cartesian2d<X, Y>>,
) -> std::result::Result<(), Error>
where
    X: Ranged,
    Y: Ranged,
{
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FAMILY, 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

fn dice_panel(
    area: &Area,
    x: Range<f64>,
    validation: &[(f64, f64)],
) -> std::result::Result<(), Error> {
    let mut chart = ChartBuilder::on(area)
        .caption("Validation Dice (test cases)", (FAMILY, 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(x, 0.0..1.0)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("Dice")
        .label_style((FAMILY, 14))
        .draw()?;
    let line = DICE_COLOUR.stroke_width(2);
    chart
        .draw_series(LineSeries::new(validation.iter().copied(), line))?
        .label("foreground Dice")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], line));
    let dots = validation
        .iter()
        .map(|&p| Circle::new(p, 4, DICE_COLOUR.filled()));
    chart.draw_series(dots)?;
    legend(&mut chart)
}

/// Draws `comparison.png`, two panels. Left: for each method (in the order first run), the test
/// Dice of every seed as a hollow dot, beside their mean as a filled one with an error bar of ±
/// one standard deviation. Right, the same for each other method's paired difference to
/// supervised (its Dice minus supervised's on the same seed), around a line at zero; without
/// supervised among the runs, that panel says so and is otherwise empty. Non-finite Dice values
/// are left out.
pub fn comparison_plot(results: &[RunResult], out: &Path) -> Result<()> {
    font().map_err(draw_error(out))?;
    let (w, h) = COMPARISON_SIZE;
    let mut picture = Rgb::new(w as usize, h as usize, [255; 3]);
    draw_comparison(&mut picture.data, results).map_err(|e| draw_error(out)(e.to_string()))?;
    write_png(out, &picture)
}

/// The methods in the order first run, with the finite Dice of their runs.
fn dice_by_method(results: &[RunResult]) -> Vec<(Method, Vec<f64>)> {
    let mut groups: Vec<(Method, Vec<f64>)> = Vec::new();
    for r in results {
        let index = match groups.iter().position(|(m, _)| *m == r.method) {
            Some(index) => index,
            None => {
                groups.push((r.method, Vec::new()));
                groups.len() - 1
            }
        };
        if r.dice.is_finite() {
            groups[index].1.push(r.dice);
        }
    }
    groups
}

fn draw_comparison(buffer: &mut [u8], results: &[RunResult]) -> std::result::Result<(), Error> {
    let root = BitMapBackend::with_buffer(buffer, COMPARISON_SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(COMPARISON_SIZE.0 / 2);
    let groups = dice_by_method(results);
    let axes = Axes {
        caption: "Test Dice by method".into(),
        y_desc: "Dice (test cases)".into(),
        y: 0.0..1.0,
    };
    draw_points(&left, &axes, &groups)?;
    let y_desc = format!("Dice - {} (same seed)", REFERENCE.name());
    match paired_differences(results) {
        Some(paired) => {
            let groups: Vec<(Method, Vec<f64>)> = (paired.into_iter())
                .map(|p| (p.method, p.per_seed.into_iter().map(|(_, d)| d).collect()))
                .collect();
            let caption = format!("Paired difference to {}", REFERENCE.name());
            let y = symmetric_range(&groups);
            let chart = draw_points(&right, &Axes { caption, y_desc, y }, &groups)?;
            draw_zero_line(chart)?;
        }
        None => {
            let caption = format!(
                "Paired differences need {} among the methods",
                REFERENCE.name()
            );
            draw_points(
                &right,
                &Axes {
                    caption,
                    y_desc,
                    y: -1.0..1.0,
                },
                &[],
            )?;
        }
    }
    root.present()?;
    Ok(())
}

/// A panel's caption, y-axis title and y range.
struct Axes {
    caption: String,
    y_desc: String,
    y: Range<f64>,
}

type PointChart<'a> = ChartContext<
    'a,
    BitMapBackend<'a>,
    Cartesian2d<SegmentedCoord<RangedCoordi32>, RangedCoordf64>,
>;

/// One panel: per named group, its values as hollow dots beside their mean ± std (a filled dot
/// and an error bar), clipped to the y range.
fn draw_points<'a>(
    area: &DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>,
    axes: &Axes,
    groups: &[(Method, Vec<f64>)],
) -> std::result::Result<PointChart<'a>, Error> {
    let names: Vec<String> = groups.iter().map(|g| g.0.to_string()).collect();
    // An integer range holds its end too: 0..=n-1 gives one segment per group.
    let last = groups.len().max(1) as i32 - 1;
    let (low, high) = (axes.y.start, axes.y.end);
    let mut chart = ChartBuilder::on(area)
        .caption(&axes.caption, (FAMILY, 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d((0..last).into_segmented(), axes.y.clone())?;
    let label = |v: &SegmentValue<i32>| match v {
        SegmentValue::CenterOf(i) => names.get(*i as usize).cloned().unwrap_or_default(),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups.len().max(1))
        .x_label_formatter(&label)
        .y_desc(&axes.y_desc)
        .label_style((FAMILY, 15))
        .draw()?;
    for (i, (_, values)) in groups.iter().enumerate() {
        let at = SegmentValue::CenterOf(i as i32);
        // Seeds beside the error bar rather than under it.
        let seeds = values.iter().map(|&d| {
            EmptyElement::at((at.clone(), d))
                + Circle::new((-22, 0), 5, DICE_COLOUR.stroke_width(2))
        });
        chart.draw_series(seeds)?;
        if let Some((mean, std, _)) = mean_std(values.iter().map(|&d| Some(d))) {
            let bar = ErrorBar::new_vertical(
                at.clone(),
                (mean - std).max(low),
                mean,
                (mean + std).min(high),
                BLACK.stroke_width(2),
                16,
            );
            chart.draw_series([bar])?;
            chart.draw_series([Circle::new((at, mean), 6, DICE_COLOUR.filled())])?;
        }
    }
    Ok(chart)
}

/// A y range symmetric about zero that holds every value and every mean ± std, with a margin,
/// at least ± 0.1.
fn symmetric_range(groups: &[(Method, Vec<f64>)]) -> Range<f64> {
    let extent = groups.iter().fold(0.1f64, |e, (_, values)| {
        let spread = mean_std(values.iter().map(|&d| Some(d))).map_or(0.0, |(m, s, _)| m.abs() + s);
        values.iter().fold(e.max(spread), |e, d| e.max(d.abs()))
    });
    let extent = (extent * 1.1).min(1.0);
    -extent..extent
}

/// The line of no difference across the panel.
fn draw_zero_line(mut chart: PointChart) -> std::result::Result<(), Error> {
    let ends = [SegmentValue::Exact(0), SegmentValue::Last];
    chart.draw_series([PathElement::new(
        ends.map(|x| (x, 0.0)).to_vec(),
        BLACK.mix(0.6).stroke_width(1),
    )])?;
    Ok(())
}
