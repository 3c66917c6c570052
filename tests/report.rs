//! The pictures of a run: the PNG files decode, have the documented size, and show what they
//! should (line colours where there are curves, outline colours exactly on the masks' edges and
//! grey elsewhere). CPU only.

use metaseg::data::Volume;
use metaseg::report::{self, Rgb, BOTH, DICE_COLOUR, PREDICTION, REFERENCE, TERM_COLOURS};
use metaseg::train::compare::RunResult;
use metaseg::train::methods::Method;
use plotters::style::RGBColor;
use std::path::{Path, PathBuf};

fn decode(path: &Path) -> Rgb {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .unwrap();
    let mut data = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut data).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    data.truncate(info.buffer_size());
    Rgb {
        width: info.width as usize,
        height: info.height as usize,
        data,
    }
}

fn count(picture: &Rgb, colour: [u8; 3]) -> usize {
    picture.data.chunks(3).filter(|p| *p == colour).count()
}

fn rgb(c: RGBColor) -> [u8; 3] {
    [c.0, c.1, c.2]
}

struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Self {
        Dir(tempfile::tempdir().unwrap())
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// A log like `run::train` writes: `steps` lines with the four loss terms of mean-teacher, lr,
/// seconds, and validation Dice every `validate_every` steps (never when 0).
fn log_text(steps: u64, validate_every: u64) -> String {
    let mut text = String::new();
    for s in 1..=steps {
        let t = s as f64;
        let (ce, dice) = (
            1.0 / (1.0 + 0.05 * t),
            0.8 - 0.002 * t + 0.05 * (t * 0.7).sin(),
        );
        let consistency = 0.01 * (t / steps as f64);
        let mut line = serde_json::json!({
            "step": s, "loss": 0.5 * (ce + dice) + consistency, "ce": ce, "dice": dice,
            "consistency": consistency, "lr": 0.01, "seconds": 0.1 * t,
        });
        if validate_every > 0 && s % validate_every == 0 {
            line["validation_dice"] = (t / steps as f64).into();
        }
        text += &format!("{line}\n");
    }
    text
}

#[test]
fn loss_curves_draw_every_term_and_the_validation_dice() {
    let dir = Dir::new();
    let log = dir.write("log.jsonl", &log_text(200, 25));
    let out = dir.path("loss.png");
    report::loss_curves(&log, &out).unwrap();
    let picture = decode(&out);
    assert_eq!((picture.width, picture.height), (960, 720));
    assert_eq!(report::LOSS_SIZE, (960, 720));
    // Four terms: the first four colours each draw a smoothed line in full colour.
    for (k, &colour) in TERM_COLOURS[..4].iter().enumerate() {
        assert!(count(&picture, rgb(colour)) > 50, "term {k} not drawn");
    }
    assert_eq!(count(&picture, rgb(TERM_COLOURS[4])), 0, "only four terms");
    assert!(count(&picture, rgb(DICE_COLOUR)) > 50, "validation Dice");
    // Nothing was left behind but the picture.
    let names: Vec<_> = std::fs::read_dir(dir.0.path()).unwrap().collect();
    assert_eq!(names.len(), 2);
}

#[test]
fn a_log_without_validation_has_no_dice_curve() {
    let dir = Dir::new();
    let log = dir.write("log.jsonl", &log_text(40, 0));
    let out = dir.path("loss.png");
    report::loss_curves(&log, &out).unwrap();
    let picture = decode(&out);
    assert_eq!((picture.width, picture.height), (960, 720));
    assert!(count(&picture, rgb(TERM_COLOURS[0])) > 50);
    assert_eq!(count(&picture, rgb(DICE_COLOUR)), 0);
}

#[test]
fn non_finite_values_are_left_out_and_the_rest_plotted() {
    let dir = Dir::new();
    // serde_json writes NaN and infinities as null; one term is never finite at all.
    let text = "{\"step\":1,\"loss\":1.0,\"ce\":null,\"validation_dice\":null}\n\
                {\"step\":2,\"loss\":null,\"ce\":null}\n\
                \n\
                {\"step\":3,\"loss\":0.5,\"ce\":null,\"validation_dice\":0.25}\n";
    let log = dir.write("log.jsonl", text);
    let curves = report::read_log(&log).unwrap();
    assert_eq!(curves.steps, 3);
    let names: Vec<&str> = curves.terms.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["loss", "ce"], "the total first, then by name");
    assert_eq!(curves.terms[0].points, [(1.0, 1.0), (3.0, 0.5)]);
    assert!(curves.terms[1].points.is_empty());
    assert_eq!(curves.validation, [(3.0, 0.25)]);
    let out = dir.path("loss.png");
    report::loss_curves(&log, &out).unwrap();
    let picture = decode(&out);
    assert!(count(&picture, rgb(TERM_COLOURS[0])) > 20);
    assert!(count(&picture, rgb(DICE_COLOUR)) > 0, "the one Dice point");
}

#[test]
fn a_one_step_log_marks_its_point() {
    let dir = Dir::new();
    let log = dir.write("log.jsonl", &log_text(1, 1));
    let out = dir.path("loss.png");
    report::loss_curves(&log, &out).unwrap();
    let picture = decode(&out);
    assert!(count(&picture, rgb(TERM_COLOURS[0])) > 10);
    assert!(count(&picture, rgb(DICE_COLOUR)) > 10);
}

#[test]
fn a_bad_log_line_is_named_and_nothing_is_written() {
    let dir = Dir::new();
    let log = dir.write("log.jsonl", "{\"step\":1,\"loss\":1.0}\n{\"loss\":2.0}\n");
    let out = dir.path("loss.png");
    let err = report::loss_curves(&log, &out).unwrap_err().to_string();
    assert!(err.contains("log.jsonl, line 2: no step"), "{err}");
    let empty = dir.write("empty.jsonl", "");
    let err = report::loss_curves(&empty, &out).unwrap_err().to_string();
    assert!(err.contains("no steps"), "{err}");
    assert!(!out.exists());
}

#[test]
fn smoothing_is_a_centred_moving_average() {
    let points: Vec<(f64, f64)> = (0..5).map(|i| (i as f64, (i * i) as f64)).collect();
    let s = report::smooth(&points, 3);
    // Window 3: the mean of each value with its neighbours (only those that exist at the ends).
    let expected = [
        (0.0 + 1.0) / 2.0,
        (0.0 + 1.0 + 4.0) / 3.0,
        14.0 / 3.0,
        29.0 / 3.0,
        12.5,
    ];
    for (i, (&(x, y), e)) in s.iter().zip(expected).enumerate() {
        assert_eq!(x, i as f64);
        assert!((y - e).abs() < 1e-12, "point {i}: {y} vs {e}");
    }
    assert_eq!(report::smooth(&points, 1), points);
}

const DIMS: [usize; 3] = [7, 11, 9];

/// A volume whose intensity rises along W (so the grey varies) with one hot outlier voxel the
/// 99th-percentile window must ignore.
fn image() -> Volume {
    let n = DIMS.iter().product();
    let mut data: Vec<f32> = (0..n).map(|i| (i % DIMS[2]) as f32).collect();
    data[0] = 1e6;
    Volume::new(data, DIMS, [1.0, 1.0, 1.0]).unwrap()
}

/// A box mask: voxels with every coordinate in [lo, hi).
fn cube(lo: [usize; 3], hi: [usize; 3]) -> Vec<u8> {
    let mut m = vec![0u8; DIMS.iter().product()];
    for d in lo[0]..hi[0] {
        for h in lo[1]..hi[1] {
            for w in lo[2]..hi[2] {
                m[(d * DIMS[1] + h) * DIMS[2] + w] = 1;
            }
        }
    }
    m
}

fn at(mask: &[u8], v: [usize; 3]) -> bool {
    mask[(v[0] * DIMS[1] + v[1]) * DIMS[2] + v[2]] > 0
}

/// Checks every panel pixel: outline colours only on voxels of their mask, plain grey on voxels
/// of neither. Returns the counts of (reference, prediction, both) pixels.
fn check_panels(picture: &Rgb, layout: &report::Layout, label: &[u8], pred: &[u8]) -> [usize; 3] {
    let mut counts = [0; 3];
    let mut greys = std::collections::BTreeSet::new();
    for y in 0..picture.height {
        for x in 0..picture.width {
            let Some(v) = layout.voxel_at(x, y) else {
                continue;
            };
            let c = picture.pixel(x, y);
            let (r, p) = (at(label, v), at(pred, v));
            if c == REFERENCE {
                assert!(r, "reference outline off the reference at {v:?}");
                counts[0] += 1;
            } else if c == PREDICTION {
                assert!(p, "prediction outline off the prediction at {v:?}");
                counts[1] += 1;
            } else if c == BOTH {
                assert!(r && p, "shared outline off the overlap at {v:?}");
                counts[2] += 1;
            } else {
                assert!(c[0] == c[1] && c[1] == c[2], "{c:?} at {v:?} is not grey");
                greys.insert(c[0]);
            }
            if !r && !p {
                assert!(
                    c[0] == c[1] && c[1] == c[2],
                    "{c:?} off both masks at {v:?}"
                );
            }
        }
    }
    // The window is the 1st to 99th percentile of a ramp 0..=8 along W: black to white.
    assert!(greys.contains(&0) && greys.contains(&255), "{greys:?}");
    assert!(greys.len() >= 5, "{greys:?}");
    counts
}

#[test]
fn overlay_outlines_reference_and_prediction_over_grey() {
    let dir = Dir::new();
    let label = cube([1, 2, 2], [6, 9, 7]);
    let pred = cube([2, 3, 3], [7, 10, 8]);
    let out = dir.path("overlays/case_000.png");
    report::overlay(&image(), Some(&label), &pred, "case_000", &out).unwrap();
    let picture = decode(&out);
    // The reference's centroid: the middle of each of its index ranges 1..=5, 2..=8, 2..=6.
    let centre = [3, 5, 4];
    let layout = report::layout(DIMS, centre);
    assert_eq!(
        (picture.width, picture.height),
        (layout.width, layout.height)
    );
    // The file is the picture overlay_rgb draws, with text added above the slices only.
    let (drawn, drawn_layout) = report::overlay_rgb(&image(), Some(&label), &pred).unwrap();
    assert_eq!(drawn_layout, layout);
    let below_text = 3 * picture.width * layout.panels[0].y;
    assert_eq!(picture.data[below_text..], drawn.data[below_text..]);
    // Every slice has the axis of 11 or of 9 voxels: scaled by ceil(256 / 9) = 29, each is at
    // least 256 pixels long.
    assert_eq!(layout.scale, 29);
    assert!(layout.panels.iter().all(|p| p.rows.max(p.cols) * 29 >= 256));
    let [reference, predicted, both] = check_panels(&picture, &layout, &label, &pred);
    assert!(
        reference > 100 && predicted > 100,
        "{reference} {predicted}"
    );
    // The boxes' edges cross: where outlines meet, both colours mix.
    assert!(both > 0);
}

#[test]
fn a_perfect_prediction_is_outlined_in_the_shared_colour_only() {
    let dir = Dir::new();
    let label = cube([2, 3, 1], [5, 8, 8]);
    let out = dir.path("same.png");
    report::overlay(&image(), Some(&label), &label, "same", &out).unwrap();
    let picture = decode(&out);
    let layout = report::layout(DIMS, [3, 5, 4]);
    let [reference, predicted, both] = check_panels(&picture, &layout, &label, &label);
    assert_eq!((reference, predicted), (0, 0));
    assert!(both > 100);
}

#[test]
fn an_empty_prediction_shows_the_reference_alone() {
    let dir = Dir::new();
    let label = cube([0, 0, 0], [3, 4, 5]);
    let pred = vec![0u8; label.len()];
    let out = dir.path("empty.png");
    report::overlay(&image(), Some(&label), &pred, "empty", &out).unwrap();
    let picture = decode(&out);
    let layout = report::layout(DIMS, [1, 2, 2]);
    assert_eq!(
        (picture.width, picture.height),
        (layout.width, layout.height)
    );
    let [reference, predicted, both] = check_panels(&picture, &layout, &label, &pred);
    assert!(reference > 100);
    assert_eq!((predicted, both), (0, 0));

    // No reference and an empty prediction: the volume's middle, grey only.
    let out = dir.path("nothing.png");
    report::overlay(&image(), None, &pred, "nothing", &out).unwrap();
    let picture = decode(&out);
    let layout = report::layout(DIMS, [3, 5, 4]);
    assert_eq!(check_panels(&picture, &layout, &pred, &pred), [0, 0, 0]);
}

#[test]
fn without_a_reference_the_slices_centre_on_the_prediction() {
    let pred = cube([4, 6, 6], [7, 11, 9]);
    let (picture, layout) = report::overlay_rgb(&image(), None, &pred).unwrap();
    assert_eq!(layout.centre, [5, 8, 7]);
    let none = vec![0u8; pred.len()];
    let [reference, predicted, both] = check_panels(&picture, &layout, &none, &pred);
    assert_eq!((reference, both), (0, 0));
    assert!(predicted > 100);
}

#[test]
fn overlay_refuses_masks_of_another_size() {
    let short = vec![0u8; 10];
    let full = cube([0, 0, 0], [1, 1, 1]);
    let err = report::overlay_rgb(&image(), None, &short).unwrap_err();
    assert!(
        err.to_string().contains("the prediction has 10 voxels"),
        "{err}"
    );
    let err = report::overlay_rgb(&image(), Some(&short), &full).unwrap_err();
    assert!(err.to_string().contains("the label has 10 voxels"), "{err}");
}

fn result(method: Method, seed: u64, dice: f64) -> RunResult {
    RunResult {
        method,
        seed,
        dice,
        jaccard: dice / (2.0 - dice),
        hd95: None,
        asd: None,
        seconds_per_iteration: 1.0,
    }
}

/// Pixels of `colour` in the left and the right half of a picture.
fn count_by_half(picture: &Rgb, colour: [u8; 3]) -> (usize, usize) {
    let pixels = picture.data.chunks(3).enumerate();
    let matching = pixels
        .filter(|(_, p)| *p == colour)
        .map(|(i, _)| i % picture.width);
    matching.fold((0, 0), |(l, r), x| {
        if x < picture.width / 2 {
            (l + 1, r)
        } else {
            (l, r + 1)
        }
    })
}

/// Left the Dice of every method, right the paired differences to supervised: with supervised
/// among the runs both panels have points; without it, the right one has none.
#[test]
fn comparison_plot_shows_every_seed_the_means_and_the_paired_differences() {
    let dir = Dir::new();
    let results = [
        result(Method::Supervised, 1, 0.5),
        result(Method::Supervised, 2, 0.6),
        result(Method::MeanTeacher, 1, 0.7),
        result(Method::MeanTeacher, 2, f64::NAN),
        result(Method::Full, 1, 0.9),
        result(Method::Full, 2, 0.85),
    ];
    let out = dir.path("comparison.png");
    report::comparison_plot(&results, &out).unwrap();
    let picture = decode(&out);
    assert_eq!((picture.width, picture.height), (1200, 480));
    assert_eq!(report::COMPARISON_SIZE, (1200, 480));
    let (left, right) = count_by_half(&picture, rgb(DICE_COLOUR));
    assert!(left > 100 && right > 100, "{left} {right}");
    // Without supervised: the Dice as before, no differences.
    report::comparison_plot(&results[2..], &out).unwrap();
    let (left, right) = count_by_half(&decode(&out), rgb(DICE_COLOUR));
    assert!(left > 100 && right == 0, "{left} {right}");
    // No runs: empty charts rather than an error.
    report::comparison_plot(&[], &out).unwrap();
    assert_eq!(count(&decode(&out), rgb(DICE_COLOUR)), 0);
}

/// A 2D image (depth 1) is shown as its one slice, scaled up to at least 256 pixels, with the
/// reference outlined where it is.
#[test]
fn a_2d_overlay_is_one_panel() {
    let dims = [1, 20, 30];
    let image = Volume::new((0..600).map(|i| (i % 30) as f32).collect(), dims, [1.0; 3]).unwrap();
    let label: Vec<u8> = (0..600)
        .map(|i| u8::from((5..15).contains(&(i / 30)) && (8..20).contains(&(i % 30))))
        .collect();
    let (picture, layout) = report::overlay_rgb(&image, Some(&label), &label).unwrap();
    assert_eq!(layout.panels.len(), 1);
    // ceil(256 / 20) = 13 pixels per voxel.
    assert_eq!(layout.scale, 13);
    assert_eq!((picture.width, layout.width), (30 * 13, 30 * 13));
    let inside = layout.voxel_at(10 * 13, layout.panels[0].y + 13).unwrap();
    assert_eq!(inside, [0, 18, 10], "rows run from the highest H down");
    assert!(count(&picture, BOTH) > 0);
}
