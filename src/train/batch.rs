//! Two-stream batches: a fixed number of labeled and unlabeled patches per batch, each a random
//! crop (optionally centred on a foreground voxel) with the LA recipes' augmentation (rot90 in the
//! H-W plane and a flip along a random axis) and optional intensity jitter and noise.
//!
//! Every random choice is drawn from the counter-based generator keyed by the run's seed and the
//! iteration, so the batch of iteration t is the same in a resumed run as in an uninterrupted one.
//! Crops and flips are gathers done once per patch on the host while the device trains.

use crate::data::Volume;
use metaseg_autograd::random::{normal, uniform};

/// One case in memory: its image (normalised) and, if labeled, its class per voxel [D, H, W].
#[derive(Clone, Debug)]
pub struct LoadedCase {
    pub name: String,
    pub image: Volume,
    pub label: Option<Vec<u8>>,
}

/// How patches are drawn and augmented.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    pub patch: [usize; 3],
    /// Probability that a labeled crop is centred on a random foreground voxel.
    pub foreground: f64,
    /// rot90 in the H-W plane (square patches only) and a flip along a random axis.
    pub rotate_flip: bool,
    /// Intensity x (1 + U(-a, a)) + U(-a, a).
    pub intensity: f64,
    /// Gaussian noise sigma added to the image.
    pub noise: f64,
    /// Unlabeled patches carry their case's labels too (MLB-Seg's initial labels), placed as
    /// their images are.
    pub unlabeled_labels: bool,
}

/// A batch: images [N, C, patch] and, for the first `labeled` samples (all N with
/// `Sampling::unlabeled_labels`), one-hot labels [labeled, classes, patch], as f64 ready to
/// upload.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub images: Vec<f64>,
    pub labels: Vec<f64>,
    pub labeled: usize,
    pub unlabeled: usize,
}

/// Random-number streams of one draw: (iteration, slot in the batch, purpose).
fn key(iteration: u64, slot: usize, purpose: u64) -> u64 {
    (iteration << 24) ^ ((slot as u64) << 8) ^ purpose
}

/// The first counter of the draws for (iteration, slot, purpose); a purpose's draws use the next
/// 16 counters (and noise streams above 2^32). Purpose 0 is this module's crop, flip and
/// intensity, 1 the device-side warp of [`super::augment`].
pub fn stream(iteration: u64, slot: usize, purpose: u64) -> u64 {
    key(iteration, slot, purpose) << 4
}

/// A random index below `n` from stream (seed, counter).
fn below(seed: u64, counter: u64, n: usize) -> usize {
    ((uniform(seed, counter) * n as f64) as usize).min(n.saturating_sub(1))
}

/// The patch of one case: crop start (negative: zero-padding), rot90 count, flip axis (3: none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Placement {
    start: [isize; 3],
    turns: usize,
    flip: usize,
}

fn place(case: &LoadedCase, s: &Sampling, seed: u64, k: u64, labeled: bool) -> Placement {
    let dims = case.image.dims;
    let centre = labeled
        .then_some(())
        .filter(|_| uniform(seed, k + 1) < s.foreground)
        .and_then(|_| {
            let label = case.label.as_ref()?;
            let fg: Vec<usize> = (0..label.len()).filter(|&i| label[i] > 0).collect();
            let v = *fg.get(below(seed, k + 2, fg.len()))?;
            Some([v / (dims[1] * dims[2]), v / dims[2] % dims[1], v % dims[2]])
        });
    let start = [0, 1, 2].map(|a| {
        let (size, p) = (dims[a] as isize, s.patch[a] as isize);
        match centre {
            Some(c) => (c[a] as isize - p / 2).clamp(0.min(size - p), 0.max(size - p)),
            None if size <= p => (size - p) / 2,
            None => below(seed, k + 3 + a as u64, (size - p + 1) as usize) as isize,
        }
    });
    let square = s.patch[1] == s.patch[2];
    let turns = if s.rotate_flip && square {
        below(seed, k + 6, 4)
    } else {
        0
    };
    let flip = if s.rotate_flip {
        below(seed, k + 7, 3)
    } else {
        3
    };
    Placement { start, turns, flip }
}

/// Source voxel of patch voxel (z, y, x) under the placement, or None outside the volume.
fn source(p: &Placement, patch: [usize; 3], dims: [usize; 3], at: [usize; 3]) -> Option<usize> {
    let mut q = at;
    if p.flip < 3 {
        q[p.flip] = patch[p.flip] - 1 - q[p.flip];
    }
    // rot90 by `turns` quarter turns in the (H, W) plane of a square patch.
    let n = patch[2] - 1;
    for _ in 0..p.turns {
        q = [q[0], q[2], n - q[1]];
    }
    let mut index = 0usize;
    for a in 0..3 {
        let c = p.start[a] + q[a] as isize;
        if c < 0 || c >= dims[a] as isize {
            return None;
        }
        index = index * dims[a] + c as usize;
    }
    Some(index)
}

/// The batch of `iteration`: `labeled` patches from labeled cases (with one-hot labels of
/// `classes`) then `unlabeled` from unlabeled ones, cases drawn with replacement.
pub fn sample(
    labeled_cases: &[LoadedCase],
    unlabeled_cases: &[LoadedCase],
    counts: (usize, usize),
    classes: usize,
    s: &Sampling,
    seed: u64,
    iteration: u64,
) -> Batch {
    let voxels: usize = s.patch.iter().product();
    let mut images = Vec::new();
    let mut labels = Vec::new();
    let slots = (0..counts.0)
        .map(|i| (true, i))
        .chain((0..counts.1).map(|i| (false, counts.0 + i)));
    for (is_labeled, slot) in slots {
        let pool = if is_labeled {
            labeled_cases
        } else {
            unlabeled_cases
        };
        let k = stream(iteration, slot, 0);
        let case = &pool[below(seed, k, pool.len())];
        let p = place(case, s, seed, k, is_labeled);
        let gain = 1.0 + s.intensity * (2.0 * uniform(seed, k + 8) - 1.0);
        let shift = s.intensity * (2.0 * uniform(seed, k + 9) - 1.0);
        let case_voxels: usize = case.image.dims.iter().product();
        let sources: Vec<Option<usize>> = (0..voxels)
            .map(|v| {
                let at = [
                    v / (s.patch[1] * s.patch[2]),
                    v / s.patch[2] % s.patch[1],
                    v % s.patch[2],
                ];
                source(&p, s.patch, case.image.dims, at)
            })
            .collect();
        for c in 0..case.image.channels {
            let noise_stream = (k + 10 + c as u64) << 32;
            for (v, src) in sources.iter().enumerate() {
                let value = src.map_or(0.0, |i| f64::from(case.image.data[c * case_voxels + i]));
                let noise = if s.noise > 0.0 {
                    s.noise * normal(seed, noise_stream + v as u64)
                } else {
                    0.0
                };
                images.push(value * gain + shift + noise);
            }
        }
        if is_labeled || s.unlabeled_labels {
            let label = case
                .label
                .as_ref()
                .expect("cases sampled with labels have them");
            for class in 0..classes {
                labels.extend(
                    sources.iter().map(|src| {
                        f64::from(u8::from(src.map_or(0, |i| label[i]) as usize == class))
                    }),
                );
            }
        }
    }
    Batch {
        images,
        labels,
        labeled: counts.0,
        unlabeled: counts.1,
    }
}

/// The centre patch of a case without augmentation: images [C, patch] and one-hot labels
/// [classes, patch] (zeros if the case has none) as f64, and the patch's start in the volume
/// [D, H, W] when it lies inside (None when the patch is larger and pads).
pub fn centre_patch(
    case: &LoadedCase,
    patch: [usize; 3],
    classes: usize,
) -> (Vec<f64>, Vec<f64>, Option<[usize; 3]>) {
    let dims = case.image.dims;
    let start = [0, 1, 2].map(|a| (dims[a] as isize - patch[a] as isize) / 2);
    let p = Placement {
        start,
        turns: 0,
        flip: 3,
    };
    let voxels: usize = patch.iter().product();
    let sources: Vec<Option<usize>> = (0..voxels)
        .map(|v| {
            let at = [
                v / (patch[1] * patch[2]),
                v / patch[2] % patch[1],
                v % patch[2],
            ];
            source(&p, patch, dims, at)
        })
        .collect();
    let case_voxels: usize = dims.iter().product();
    let mut images = Vec::with_capacity(case.image.channels * voxels);
    for c in 0..case.image.channels {
        let channel = &case.image.data[c * case_voxels..(c + 1) * case_voxels];
        images.extend(
            sources
                .iter()
                .map(|s| s.map_or(0.0, |i| f64::from(channel[i]))),
        );
    }
    let mut labels = Vec::with_capacity(classes * voxels);
    for class in 0..classes {
        labels.extend(sources.iter().map(|s| {
            let label = s.and_then(|i| case.label.as_ref().map(|l| l[i]));
            f64::from(u8::from(label.map_or(0, usize::from) == class))
        }));
    }
    let inside = start.iter().all(|&s| s >= 0);
    (images, labels, inside.then(|| start.map(|s| s as usize)))
}
