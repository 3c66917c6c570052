//! Intensity normalisation and cropping to the foreground, as the LA recipes prepare volumes: z-score
//! over the whole volume, then a crop to the label's bounding box plus a margin. The crop box is kept
//! so a prediction on the crop can be pasted back onto the full grid.

use super::error::{DataError, Result};
use super::nifti::{self, Volume};
use serde::{Deserialize, Serialize};

/// Clipping applied before the z-score.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Clip {
    None,
    /// Percentiles in [0, 100], linearly interpolated as numpy's default (e.g. 0.5, 99.5).
    Percentiles(f64, f64),
    /// Fixed values (e.g. a CT window).
    Values(f32, f32),
}

/// Z-score of every channel separately: clip, then (x - mean) / std over all voxels (population std).
/// A constant channel is only centred, so it becomes zeros rather than NaN.
pub fn zscore(volume: &mut Volume, clip: Clip) -> Result<()> {
    let n = volume.voxels();
    for channel in volume.data.chunks_mut(n) {
        zscore_values(channel, clip)?;
    }
    Ok(())
}

pub fn zscore_values(values: &mut [f32], clip: Clip) -> Result<()> {
    if let Some((lo, hi)) = clip_bounds(values, clip)? {
        values.iter_mut().for_each(|v| *v = v.clamp(lo, hi));
    }
    let n = values.len().max(1) as f64;
    let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = values
        .iter()
        .map(|&v| (v as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    let std = var.sqrt();
    let scale = if std > 1e-12 * mean.abs().max(1.0) {
        1.0 / std
    } else {
        1.0
    };
    values
        .iter_mut()
        .for_each(|v| *v = ((*v as f64 - mean) * scale) as f32);
    Ok(())
}

fn clip_bounds(values: &[f32], clip: Clip) -> Result<Option<(f32, f32)>> {
    let (lo, hi) = match clip {
        Clip::None => return Ok(None),
        Clip::Values(lo, hi) => (lo, hi),
        Clip::Percentiles(p, q) => {
            if !(0.0..=100.0).contains(&p) || !(0.0..=100.0).contains(&q) {
                let reason = format!("percentiles {p}, {q} must lie in [0, 100]");
                return Err(DataError::invalid("clip", reason));
            }
            let mut sorted = values.to_vec();
            sorted.sort_unstable_by(f32::total_cmp);
            (percentile(&sorted, p), percentile(&sorted, q))
        }
    };
    if lo.is_nan() || hi.is_nan() || lo > hi {
        return Err(DataError::invalid("clip", format!("bounds {lo} > {hi}")));
    }
    Ok(Some((lo, hi)))
}

/// Percentile `p` of sorted values, interpolated between neighbours (numpy's "linear").
pub fn percentile(sorted: &[f32], p: f64) -> f32 {
    if sorted.is_empty() {
        return f32::NAN;
    }
    let position = p / 100.0 * (sorted.len() - 1) as f64;
    let (i, t) = (position.floor() as usize, position.fract());
    let next = sorted[(i + 1).min(sorted.len() - 1)] as f64;
    (sorted[i] as f64 * (1.0 - t) + next * t) as f32
}

/// A box of voxels [start, end) along [D, H, W].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CropBox {
    pub start: [usize; 3],
    pub end: [usize; 3],
}

impl CropBox {
    pub fn dims(&self) -> [usize; 3] {
        [0, 1, 2].map(|a| self.end[a] - self.start[a])
    }

    fn check(&self, dims: [usize; 3]) -> Result<()> {
        if (0..3).any(|a| self.start[a] >= self.end[a] || self.end[a] > dims[a]) {
            let reason = format!(
                "the box from {:?} to {:?} is empty or outside a volume of dims {dims:?}",
                self.start, self.end
            );
            return Err(DataError::invalid("crop box", reason));
        }
        Ok(())
    }
}

/// The bounding box of the voxels > 0 of `label` ([D, H, W], W fastest), grown by `margin` on each
/// side and then, centred, to at least `min_size`, clamped to the volume. None if the label is empty.
/// (UA-MT's LA preprocessing draws the margin at random, 10-20 voxels in-plane and 5-10 across
/// slices, with min_size the patch size; pass the drawn margin.)
pub fn foreground_box(
    label: &[f32],
    dims: [usize; 3],
    margin: [usize; 3],
    min_size: [usize; 3],
) -> Option<CropBox> {
    let (mut lo, mut hi) = ([usize::MAX; 3], [0usize; 3]);
    let [_, h, w] = dims;
    for (i, _) in label.iter().enumerate().filter(|(_, &v)| v > 0.0) {
        let at = [i / (h * w), i / w % h, i % w];
        for a in 0..3 {
            lo[a] = lo[a].min(at[a]);
            hi[a] = hi[a].max(at[a] + 1);
        }
    }
    if lo[0] == usize::MAX {
        return None;
    }
    let mut start = [0; 3];
    let mut end = [0; 3];
    for a in 0..3 {
        let grow = min_size[a].saturating_sub(hi[a] - lo[a] + 2 * margin[a]);
        start[a] = lo[a].saturating_sub(margin[a] + grow / 2);
        end[a] = (hi[a] + margin[a] + grow - grow / 2).min(dims[a]);
    }
    Some(CropBox { start, end })
}

/// The voxels of `volume` (every channel) inside `b`, with the header's origin moved so the crop
/// stays in place in world coordinates.
pub fn crop(volume: &Volume, b: &CropBox) -> Result<Volume> {
    b.check(volume.dims)?;
    let [_, h, w] = volume.dims;
    let [cd, ch, cw] = b.dims();
    let mut data = Vec::with_capacity(volume.channels * cd * ch * cw);
    for c in 0..volume.channels {
        let channel = volume.channel(c);
        for z in b.start[0]..b.end[0] {
            for y in b.start[1]..b.end[1] {
                let row = (z * h + y) * w;
                data.extend_from_slice(&channel[row + b.start[2]..row + b.end[2]]);
            }
        }
    }
    let mut header = volume.header.clone();
    nifti::shift_origin(&mut header, [b.start[2], b.start[1], b.start[0]]);
    header.dim = nifti::header_dim(b.dims(), volume.channels);
    Ok(Volume {
        data,
        channels: volume.channels,
        dims: b.dims(),
        spacing: volume.spacing,
        header,
    })
}

/// A single-channel `cropped` array ([D, H, W] of `b.dims()`) put back at `b` in a volume of `dims`
/// filled with `fill`.
pub fn paste(cropped: &[f32], b: &CropBox, dims: [usize; 3], fill: f32) -> Result<Vec<f32>> {
    b.check(dims)?;
    let [cd, ch, cw] = b.dims();
    if cropped.len() != cd * ch * cw {
        let reason = format!("{} values for a box of {:?}", cropped.len(), b.dims());
        return Err(DataError::invalid("paste", reason));
    }
    let [_, h, w] = dims;
    let mut full = vec![fill; dims.iter().product()];
    for (i, row) in cropped.chunks(cw).enumerate() {
        let (z, y) = (b.start[0] + i / ch, b.start[1] + i % ch);
        let at = (z * h + y) * w + b.start[2];
        full[at..at + cw].copy_from_slice(row);
    }
    Ok(full)
}

/// A prediction on a crop, pasted back onto `reference`'s grid and header (for writing).
pub fn uncrop(cropped: &[f32], b: &CropBox, reference: &Volume, fill: f32) -> Result<Volume> {
    reference.like(paste(cropped, b, reference.dims, fill)?)
}
