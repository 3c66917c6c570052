//! Slice overlays: three orthogonal slices of a case through the centre of its foreground, the
//! image in grey with the reference's and the prediction's outlines drawn over it.

use super::{draw_error, font, write_png, ReportError, Result, Rgb, FAMILY};
use crate::data::Volume;
use plotters::prelude::*;
use std::path::Path;

/// Outline colours: the reference only, the prediction only, and both where they coincide.
pub const REFERENCE: [u8; 3] = [0, 220, 0];
pub const PREDICTION: [u8; 3] = [255, 40, 40];
pub const BOTH: [u8; 3] = [255, 220, 0];
/// Height of the two text lines above the slices.
const TITLE_HEIGHT: usize = 48;
const GAP: usize = 8;
/// Small volumes are scaled up (nearest neighbour, an integer factor) to at least this.
const MIN_PANEL: usize = 256;
/// ... but not beyond this (a thin volume would otherwise make a very long picture).
const MAX_PANEL: usize = 2048;
const BACKGROUND: [u8; 3] = [0, 0, 0];

/// One slice's place in the picture: which volume axis runs down its rows and which across its
/// columns, the third held at the centre.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Panel {
    pub x: usize,
    pub y: usize,
    pub rows: usize,
    pub cols: usize,
    /// Volume axes (0 = D, 1 = H, 2 = W) of the rows and the columns.
    pub row_axis: usize,
    pub col_axis: usize,
}

/// Where everything is in an overlay of a volume of `dims`.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    pub width: usize,
    pub height: usize,
    /// Pixels per voxel.
    pub scale: usize,
    /// The voxel the three slices pass through.
    pub centre: [usize; 3],
    /// Axial (D fixed), coronal (H fixed), sagittal (W fixed); of a 2D image (depth 1) the
    /// axial one alone.
    pub panels: Vec<Panel>,
}

impl Layout {
    /// The voxel shown at pixel (`x`, `y`) of the picture, if any. Rows run from the highest
    /// index at the top down to 0, as viewers show the superior or anterior side up.
    pub fn voxel_at(&self, x: usize, y: usize) -> Option<[usize; 3]> {
        self.panels.iter().enumerate().find_map(|(fixed, p)| {
            let (px, py) = (x.checked_sub(p.x)?, y.checked_sub(p.y)?);
            let (r, c) = (py / self.scale, px / self.scale);
            if r >= p.rows || c >= p.cols {
                return None;
            }
            let mut v = self.centre;
            v[p.row_axis] = p.rows - 1 - r;
            v[p.col_axis] = c;
            debug_assert!(fixed != p.row_axis && fixed != p.col_axis);
            Some(v)
        })
    }
}

/// The layout of an overlay of a volume of `dims` whose slices pass through `centre`.
pub fn layout(dims: [usize; 3], centre: [usize; 3]) -> Layout {
    // Every slice holds the largest or the second largest axis: scaling by the second, each is
    // at least MIN_PANEL pixels long, unless the largest would pass MAX_PANEL.
    let mut sorted = dims.map(|d| d.max(1));
    sorted.sort_unstable();
    let scale = MIN_PANEL
        .div_ceil(sorted[1])
        .min(MAX_PANEL / sorted[2])
        .max(1);
    let axes = [(1, 2), (0, 2), (0, 1)];
    let shown = if dims[0] == 1 { 1 } else { 3 };
    let mut x = 0;
    let panels: Vec<Panel> = axes[..shown]
        .iter()
        .map(|&(row_axis, col_axis)| {
            let p = Panel {
                x,
                y: TITLE_HEIGHT,
                rows: dims[row_axis],
                cols: dims[col_axis],
                row_axis,
                col_axis,
            };
            x += p.cols * scale + GAP;
            p
        })
        .collect();
    let height = TITLE_HEIGHT + panels.iter().map(|p| p.rows).max().unwrap_or(0) * scale;
    Layout {
        width: x - GAP,
        height,
        scale,
        centre,
        panels,
    }
}

fn index(dims: [usize; 3], v: [usize; 3]) -> usize {
    (v[0] * dims[1] + v[1]) * dims[2] + v[2]
}

/// The rounded mean position of the voxels where `mask` is foreground (> 0), if any.
fn centroid(mask: &[u8], dims: [usize; 3]) -> Option<[usize; 3]> {
    let (mut sum, mut n) = ([0.0f64; 3], 0usize);
    for (i, _) in mask.iter().enumerate().filter(|(_, &m)| m > 0) {
        let v = [
            i / (dims[1] * dims[2]),
            (i / dims[2]) % dims[1],
            i % dims[2],
        ];
        for a in 0..3 {
            sum[a] += v[a] as f64;
        }
        n += 1;
    }
    (n > 0).then(|| [0, 1, 2].map(|a| (sum[a] / n as f64).round() as usize))
}

/// The 1st and 99th percentiles of the finite values (an intensity window robust to outliers).
fn window(values: &[f32]) -> (f32, f32) {
    let mut v: Vec<f32> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return (0.0, 1.0);
    }
    v.sort_unstable_by(f32::total_cmp);
    let at = |q: usize| v[(v.len() - 1) * q / 100];
    let (lo, hi) = (at(1), at(99));
    (lo, if hi > lo { hi } else { lo + 1.0 })
}

/// The foreground of `mask` on one panel's slice, row-major as drawn.
fn slice_mask(mask: &[u8], dims: [usize; 3], layout: &Layout, p: &Panel) -> Vec<bool> {
    let mut out = Vec::with_capacity(p.rows * p.cols);
    for r in 0..p.rows {
        for c in 0..p.cols {
            let mut v = layout.centre;
            v[p.row_axis] = p.rows - 1 - r;
            v[p.col_axis] = c;
            out.push(mask[index(dims, v)] > 0);
        }
    }
    out
}

/// Whether pixel (`px`, `py`) of a panel lies on the outline of `inside` (a slice mask scaled up):
/// inside, with a pixel `t` away that is outside the mask or the panel.
fn on_outline(inside: &[bool], p: &Panel, scale: usize, px: usize, py: usize, t: usize) -> bool {
    let at = |x: Option<usize>, y: Option<usize>| match (x, y) {
        (Some(x), Some(y)) if x < p.cols * scale && y < p.rows * scale => {
            inside[(y / scale) * p.cols + x / scale]
        }
        _ => false,
    };
    at(Some(px), Some(py))
        && !(at(px.checked_sub(t), Some(py))
            && at(Some(px + t), Some(py))
            && at(Some(px), py.checked_sub(t))
            && at(Some(px), Some(py + t)))
}

/// The overlay picture of a case (see [`overlay`]), without the text.
pub fn overlay_rgb(image: &Volume, label: Option<&[u8]>, pred: &[u8]) -> Result<(Rgb, Layout)> {
    let dims = image.dims;
    let voxels = dims.iter().product::<usize>();
    if image.data.len() != image.channels.max(1) * voxels || voxels == 0 {
        return Err(ReportError::Shape(format!(
            "the image has {} values for {} channel(s) of {dims:?}",
            image.data.len(),
            image.channels
        )));
    }
    for (what, len) in [
        ("prediction", Some(pred.len())),
        ("label", label.map(<[u8]>::len)),
    ] {
        if let Some(len) = len.filter(|&l| l != voxels) {
            return Err(ReportError::Shape(format!(
                "the {what} has {len} voxels, the image {dims:?} = {voxels}"
            )));
        }
    }
    let centre = label
        .and_then(|l| centroid(l, dims))
        .or_else(|| centroid(pred, dims))
        .unwrap_or(dims.map(|d| d / 2));
    let layout = layout(dims, centre);
    let mut picture = Rgb::new(layout.width, layout.height, BACKGROUND);
    // The first channel (modality) is the one shown.
    let grey = &image.data[..voxels];
    let (lo, hi) = window(grey);
    let thickness = if layout.scale >= 3 { 2 } else { 1 };
    for p in &layout.panels {
        let reference = label.map(|l| slice_mask(l, dims, &layout, p));
        let predicted = slice_mask(pred, dims, &layout, p);
        for py in 0..p.rows * layout.scale {
            for px in 0..p.cols * layout.scale {
                let (x, y) = (p.x + px, p.y + py);
                let v = layout.voxel_at(x, y).expect("a pixel of a panel");
                let g = ((grey[index(dims, v)] - lo) / (hi - lo)).clamp(0.0, 1.0);
                let mut colour = [(g * 255.0).round() as u8; 3];
                let on = |m: &[bool]| on_outline(m, p, layout.scale, px, py, thickness);
                let r = reference.as_deref().is_some_and(on);
                match (r, on(&predicted)) {
                    (true, true) => colour = BOTH,
                    (true, false) => colour = REFERENCE,
                    (false, true) => colour = PREDICTION,
                    (false, false) => {}
                }
                picture.set(x, y, colour);
            }
        }
    }
    Ok((picture, layout))
}

/// Writes `out`: three orthogonal slices of `image` (its first channel, grey between its 1st and
/// 99th percentiles) through the centre of the reference's foreground (the prediction's without
/// one), with the outline of the reference (`label > 0`) in green, of the prediction in red and
/// yellow where they coincide; `title` (the case, its Dice) above. Small volumes are scaled up by
/// nearest neighbour so each slice is at least 256 pixels long.
pub fn overlay(
    image: &Volume,
    label: Option<&[u8]>,
    pred: &[u8],
    title: &str,
    out: &Path,
) -> Result<()> {
    let (mut picture, layout) = overlay_rgb(image, label, pred)?;
    font().map_err(draw_error(out))?;
    let size = (layout.width as u32, layout.height as u32);
    draw_text(&mut picture.data, size, title, &layout, label.is_some())
        .map_err(|e| draw_error(out)(e.to_string()))?;
    write_png(out, &picture)
}

fn draw_text(
    buffer: &mut [u8],
    size: (u32, u32),
    title: &str,
    layout: &Layout,
    has_reference: bool,
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::with_buffer(buffer, size).into_drawing_area();
    let style = |c: [u8; 3]| (FAMILY, 17).into_font().color(&RGBColor(c[0], c[1], c[2]));
    root.draw(&Text::new(title.to_string(), (6, 4), style([255; 3])))?;
    let [d, h, w] = layout.centre;
    let slices = match layout.panels.len() {
        1 => "the 2D image   ".to_string(),
        _ => format!("slices at d={d}, h={h}, w={w} (axial, coronal, sagittal)   "),
    };
    let mut line = vec![(slices, [200; 3])];
    if has_reference {
        line.push(("reference  ".into(), REFERENCE));
    }
    line.push(("prediction  ".into(), PREDICTION));
    if has_reference {
        line.push(("both".into(), BOTH));
    }
    let mut x = 6;
    for (text, colour) in line {
        let style = style(colour);
        root.draw(&Text::new(text.clone(), (x, 25), style.clone()))?;
        x += root.estimate_text_size(&text, &style)?.0 as i32;
    }
    root.present()?;
    Ok(())
}
