//! Sliding-window inference over whole volumes: windows of the training patch size at a
//! configurable stride (the last window of each axis flush with the end), the class probabilities
//! of overlapping windows averaged per voxel, then argmax; and the largest connected component.

use crate::nn::{Mode, NetBackend, Network, ParamStore};
use metaseg_autograd::{Error, Result, Shape, Var};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlidingWindow {
    pub patch: [usize; 3],
    pub stride: [usize; 3],
}

impl SlidingWindow {
    /// Windows of `patch` at a stride of `fraction` of it (rounded, at least 1 voxel).
    pub fn with_stride_fraction(patch: [usize; 3], fraction: f64) -> SlidingWindow {
        SlidingWindow {
            patch,
            stride: patch.map(|p| ((p as f64 * fraction).round() as usize).max(1)),
        }
    }
}

/// Window starts along an axis of `size`: every `stride` from 0, and one flush with the end. An
/// axis shorter than the patch has one window (the volume is zero-padded to the patch).
pub fn window_starts(size: usize, patch: usize, stride: usize) -> Vec<usize> {
    if size <= patch {
        return vec![0];
    }
    let last = size - patch;
    let mut starts: Vec<usize> = (0..last).step_by(stride.max(1)).collect();
    starts.push(last);
    starts
}

/// A volume [C, D, H, W] on the host.
pub struct HostVolume<'a> {
    pub data: &'a [f32],
    pub channels: usize,
    pub dims: [usize; 3],
}

/// The averaged class probabilities [K, D, H, W] of `net` over `volume` in eval mode (softmax
/// over the classes; sigmoid for a single-output network).
pub fn predict_probabilities<B: NetBackend, N: Network>(
    backend: &B,
    net: &N,
    params: &ParamStore<B>,
    stats: &ParamStore<B>,
    volume: &HostVolume,
    window: SlidingWindow,
) -> Result<Vec<f32>> {
    let [d, h, w] = volume.dims;
    let c = volume.channels;
    if volume.data.len() != c * d * h * w || window.patch.contains(&0) {
        return Err(Error::InvalidArgument {
            op: "sliding_window",
            message: format!(
                "{} values for {c} channels of {d}x{h}x{w}, patch {:?}",
                volume.data.len(),
                window.patch
            ),
        });
    }
    let padded = [0, 1, 2].map(|a| volume.dims[a].max(window.patch[a]));
    let [pd, ph, pw] = window.patch;
    let mut sum: Vec<f64> = Vec::new();
    let mut count = vec![0u32; padded.iter().product()];
    let starts: Vec<Vec<usize>> = (0..3)
        .map(|a| window_starts(padded[a], window.patch[a], window.stride[a]))
        .collect();
    for &z in &starts[0] {
        for &y in &starts[1] {
            for &x in &starts[2] {
                let patch = crop(volume, [z, y, x], window.patch);
                let shape = Shape::from([1, c, pd, ph, pw]);
                let input = Var::from_f64(backend, &patch, &shape, false)?;
                let logits = net.run(params, stats, &input, Mode::Eval)?.logits;
                let probs = if logits.shape().dims()[1] == 1 {
                    logits.sigmoid()?
                } else {
                    logits.softmax_channels()?
                };
                let k = probs.shape().dims()[1];
                if sum.is_empty() {
                    sum = vec![0.0; k * count.len()];
                }
                let p = probs.to_f64()?;
                accumulate(&mut sum, &mut count, &p, k, padded, [z, y, x], window.patch);
            }
        }
    }
    let k = sum.len() / count.len();
    let mut out = Vec::with_capacity(k * d * h * w);
    for class in 0..k {
        for i in 0..d * h * w {
            let j = padded_index(i, volume.dims, padded);
            out.push((sum[class * count.len() + j] / f64::from(count[j])) as f32);
        }
    }
    Ok(out)
}

/// Index in the padded grid of voxel `i` of the volume grid.
fn padded_index(i: usize, dims: [usize; 3], padded: [usize; 3]) -> usize {
    let (z, y, x) = (i / (dims[1] * dims[2]), i / dims[2] % dims[1], i % dims[2]);
    (z * padded[1] + y) * padded[2] + x
}

/// The patch at `start` of every channel, zero outside the volume.
fn crop(volume: &HostVolume, start: [usize; 3], patch: [usize; 3]) -> Vec<f64> {
    let [d, h, w] = volume.dims;
    let mut out = Vec::with_capacity(volume.channels * patch.iter().product::<usize>());
    for ch in 0..volume.channels {
        for z in start[0]..start[0] + patch[0] {
            for y in start[1]..start[1] + patch[1] {
                for x in start[2]..start[2] + patch[2] {
                    let inside = z < d && y < h && x < w;
                    let v = if inside {
                        volume.data[((ch * d + z) * h + y) * w + x]
                    } else {
                        0.0
                    };
                    out.push(f64::from(v));
                }
            }
        }
    }
    out
}

fn accumulate(
    sum: &mut [f64],
    count: &mut [u32],
    probs: &[f64],
    classes: usize,
    grid: [usize; 3],
    start: [usize; 3],
    patch: [usize; 3],
) {
    let voxels = count.len();
    let mut k = 0;
    for class in 0..classes {
        for z in 0..patch[0] {
            for y in 0..patch[1] {
                for x in 0..patch[2] {
                    let j = ((start[0] + z) * grid[1] + start[1] + y) * grid[2] + start[2] + x;
                    sum[class * voxels + j] += probs[k];
                    if class == 0 {
                        count[j] += 1;
                    }
                    k += 1;
                }
            }
        }
    }
}

/// Per voxel, the most probable class of probabilities [K, voxels] (for one class: p > 0.5).
pub fn argmax(probs: &[f32], classes: usize) -> Vec<u8> {
    let voxels = probs.len() / classes.max(1);
    (0..voxels)
        .map(|v| {
            if classes == 1 {
                return u8::from(probs[v] > 0.5);
            }
            let mut best = 0;
            for c in 1..classes {
                if probs[c * voxels + v] > probs[best * voxels + v] {
                    best = c;
                }
            }
            best as u8
        })
        .collect()
}

/// The largest 26-connected component of `mask` (scikit-image's default connectivity in 3D, as
/// the SSL4MIS post-processing uses); all false if the mask is empty.
pub fn largest_component(mask: &[bool], dims: [usize; 3]) -> Vec<bool> {
    let [d, h, w] = dims;
    let mut label = vec![0u32; mask.len()];
    let mut sizes = vec![0usize];
    let mut stack = Vec::new();
    for seed in 0..mask.len() {
        if !mask[seed] || label[seed] != 0 {
            continue;
        }
        let id = sizes.len() as u32;
        sizes.push(0);
        label[seed] = id;
        stack.push(seed);
        while let Some(v) = stack.pop() {
            sizes[id as usize] += 1;
            let (z, y, x) = (v / (h * w), v / w % h, v % w);
            for dz in -1i64..=1 {
                for dy in -1i64..=1 {
                    for dx in -1i64..=1 {
                        let (nz, ny, nx) = (z as i64 + dz, y as i64 + dy, x as i64 + dx);
                        if nz < 0 || ny < 0 || nx < 0 {
                            continue;
                        }
                        let (nz, ny, nx) = (nz as usize, ny as usize, nx as usize);
                        if nz >= d || ny >= h || nx >= w {
                            continue;
                        }
                        let n = (nz * h + ny) * w + nx;
                        if mask[n] && label[n] == 0 {
                            label[n] = id;
                            stack.push(n);
                        }
                    }
                }
            }
        }
    }
    let Some(best) = (1..sizes.len()).max_by_key(|&i| (sizes[i], std::cmp::Reverse(i))) else {
        return vec![false; mask.len()];
    };
    label.iter().map(|&l| l == best as u32).collect()
}

/// Per foreground class (1 to `classes` - 1), all but the largest 26-connected component set to
/// background (nnU-Net's "remove all but the largest component" post-processing, class by class).
pub fn keep_largest_components(labels: &mut [u8], dims: [usize; 3], classes: usize) {
    for class in 1..classes.max(2) {
        let mask: Vec<bool> = labels.iter().map(|&v| usize::from(v) == class).collect();
        let keep = largest_component(&mask, dims);
        for ((label, &m), &k) in labels.iter_mut().zip(&mask).zip(&keep) {
            if m && !k {
                *label = 0;
            }
        }
    }
}
