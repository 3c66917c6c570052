//! Pictures of a run, as PNG files a person can look at: the loss and validation Dice curves of a
//! run's log, slice overlays of predictions on test cases, and the Dice of every method in a
//! comparison. Text is drawn with Noto Sans embedded in the binary, so nothing depends on the
//! fonts of the machine.

mod curves;
mod overlay;

pub use curves::{
    comparison_plot, loss_curves, read_log, smooth, Log, Series, COMPARISON_SIZE, DICE_COLOUR,
    LOSS_SIZE, TERM_COLOURS,
};
pub use overlay::{layout, overlay, overlay_rgb, Layout, BOTH, PREDICTION, REFERENCE};

use crate::eval::metrics;
use crate::train::batch::LoadedCase;
use plotters::style::FontStyle;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}, line {line}: {message}", .path.display())]
    Log {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("drawing {}: {message}", .path.display())]
    Draw { path: PathBuf, message: String },
    #[error("overlay: {0}")]
    Shape(String),
}

pub type Result<T> = std::result::Result<T, ReportError>;

/// An RGB picture, 8 bits per channel, rows top to bottom.
#[derive(Clone, Debug, PartialEq)]
pub struct Rgb {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl Rgb {
    pub fn new(width: usize, height: usize, fill: [u8; 3]) -> Self {
        let data = fill.repeat(width * height);
        Rgb {
            width,
            height,
            data,
        }
    }

    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let i = 3 * (y * self.width + x);
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }

    pub fn set(&mut self, x: usize, y: usize, c: [u8; 3]) {
        let i = 3 * (y * self.width + x);
        self.data[i..i + 3].copy_from_slice(&c);
    }
}

/// The family plotters looks text up by; registered once with the embedded font.
const FAMILY: &str = "sans-serif";

/// Registers the embedded font with plotters (once per process).
fn font() -> std::result::Result<(), String> {
    static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font(FAMILY, FontStyle::Normal, ttf_noto_sans::REGULAR)
                .map_err(|_| "the embedded Noto Sans font does not load".to_string())
        })
        .clone()
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ReportError + '_ {
    move |source| ReportError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn draw_error(path: &Path) -> impl FnOnce(String) -> ReportError + '_ {
    move |message| ReportError::Draw {
        path: path.to_path_buf(),
        message,
    }
}

/// Writes `picture` as an RGB PNG, through a temporary file renamed into place so a reader never
/// sees half a picture. Creates the parent directory.
pub fn write_png(path: &Path, picture: &Rgb) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let encode = |tmp: &Path| -> std::result::Result<(), png::EncodingError> {
        let mut writer = std::io::BufWriter::new(std::fs::File::create(tmp)?);
        let (w, h) = (picture.width as u32, picture.height as u32);
        let mut encoder = png::Encoder::new(&mut writer, w, h);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.write_header()?.write_image_data(&picture.data)?;
        writer.flush()?;
        Ok(())
    };
    let written = |tmp: &Path| {
        encode(tmp).map_err(|e| match e {
            png::EncodingError::IoError(source) => io(path)(source),
            other => draw_error(path)(other.to_string()),
        })
    };
    crate::atomic::write_file(path, ".png", written, io(path))
}

/// How many test cases of a run get an overlay.
pub const OVERLAY_CASES: usize = 3;

/// Writes `dir/CASE.png`, the overlay of a case's prediction titled with its name and
/// foreground Dice (when it has a label); returns the file's path.
pub fn case_overlay(dir: &Path, case: &LoadedCase, pred: &[u8]) -> Result<PathBuf> {
    let label = case.label.as_deref();
    let title = match label {
        Some(l) => {
            let dice = metrics::overlap(pred, l, |v| v > 0).dice();
            format!("{}   foreground Dice {dice:.3}", case.name)
        }
        None => case.name.clone(),
    };
    let path = dir.join(format!("{}.png", case.name));
    overlay(&case.image, label, pred, &title, &path)?;
    Ok(path)
}
