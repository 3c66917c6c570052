//! Segmentation metrics per class, with the definitions of METHODS.md (as medpy computes them), on
//! label volumes on the host: class indices (u8) on a [D, H, W] grid with a voxel size along each
//! axis (from the NIfTI header, or 1 for voxel units).
//!
//! With A the predicted voxels of a class and B the reference's:
//! - dice = 2 |A and B| / (|A| + |B|), jaccard = |A and B| / |A or B|; both 1 when A and B are
//!   empty (METHODS.md for dice; jaccard = dice / (2 - dice) everywhere, so it follows), 0 when
//!   exactly one is empty.
//! - surface S(X) = X xor erode(X), eroded with the face-connected (6-neighbour) structuring
//!   element; outside the volume counts as background (scipy's `binary_erosion` default
//!   `border_value = 0`, which medpy uses), so a voxel of X on a face of the volume is surface.
//! - d(x, S): the exact Euclidean distance, in physical units, from the centre of voxel x to the
//!   nearest voxel centre of S (an exact EDT). D_AB = [d(a, S(B)) for a in S(A)], D_BA likewise.
//! - hd95 = the 95th percentile of D_AB and D_BA together (one list of |S(A)| + |S(B)| values),
//!   with numpy's default (linear) interpolation, as `np.percentile` gives it.
//! - asd = mean of D_AB (prediction to reference, one direction: medpy's `asd(pred, ref)`).
//! - assd = the mean of D_AB and D_BA together (one list of |S(A)| + |S(B)| values): medpy 0.5's
//!   `assd`, so the larger surface weighs more. Not the mean of the two directed means, which
//!   older medpy versions returned and which differs when the surfaces differ in size (by 43 % for
//!   a whole-brain prediction of the cerebellum, issue 25).
//! - If A or B is empty, there is no surface to measure from or to: hd95, asd and assd are
//!   undefined (`None`), never a number standing in for one (medpy raises an error there).

use metaseg_autograd::distance::check_spacing;
use metaseg_autograd::{Backend, Cpu64, DistanceBackend, Error, Result, Shape};

/// A label volume's grid: sizes along [D, H, W] and the voxel size along each.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Grid {
    pub dims: [usize; 3],
    pub spacing: [f64; 3],
}

impl Grid {
    pub fn voxels(&self) -> usize {
        self.dims.iter().product()
    }
}

/// The metrics of one class in one case. `None`: undefined (an empty prediction or reference).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Metrics {
    pub dice: f64,
    pub jaccard: f64,
    pub hd95: Option<f64>,
    pub asd: Option<f64>,
    pub assd: Option<f64>,
    /// |A| and |B|, so an empty prediction or reference shows as such.
    pub pred_voxels: usize,
    pub reference_voxels: usize,
}

/// The names of the metrics, in the order of [`Metrics::values`].
pub const METRIC_NAMES: [&str; 5] = ["dice", "jaccard", "hd95", "asd", "assd"];

impl Metrics {
    /// Two empty masks: dice and jaccard 1, no distances.
    pub const BOTH_EMPTY: Metrics = Metrics {
        dice: 1.0,
        jaccard: 1.0,
        hd95: None,
        asd: None,
        assd: None,
        pred_voxels: 0,
        reference_voxels: 0,
    };

    /// The five metrics in the order of [`METRIC_NAMES`].
    pub fn values(&self) -> [Option<f64>; 5] {
        [
            Some(self.dice),
            Some(self.jaccard),
            self.hd95,
            self.asd,
            self.assd,
        ]
    }
}

/// Voxel counts of two masks and of their intersection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overlap {
    pub both: usize,
    pub pred: usize,
    pub reference: usize,
}

impl Overlap {
    /// 2 |A and B| / (|A| + |B|); 1 when both are empty.
    pub fn dice(&self) -> f64 {
        let sizes = self.pred + self.reference;
        if sizes == 0 {
            return 1.0;
        }
        2.0 * self.both as f64 / sizes as f64
    }

    /// |A and B| / |A or B|; 1 when both are empty.
    pub fn jaccard(&self) -> f64 {
        let union = self.pred + self.reference - self.both;
        if union == 0 {
            return 1.0;
        }
        self.both as f64 / union as f64
    }
}

/// The overlap of the voxels of `pred` and `reference` whose value is in the set `member`.
pub fn overlap(pred: &[u8], reference: &[u8], member: impl Fn(u8) -> bool) -> Overlap {
    let mut o = Overlap {
        both: 0,
        pred: 0,
        reference: 0,
    };
    for (&p, &r) in pred.iter().zip(reference) {
        let (p, r) = (member(p), member(r));
        o.both += usize::from(p && r);
        o.pred += usize::from(p);
        o.reference += usize::from(r);
    }
    o
}

/// The metrics of class `class` (voxels equal to it) of `pred` against `reference`.
pub fn class_metrics(pred: &[u8], reference: &[u8], class: u8, grid: Grid) -> Result<Metrics> {
    check_grid(pred.len(), reference.len(), grid)?;
    let a: Vec<bool> = pred.iter().map(|&v| v == class).collect();
    let b: Vec<bool> = reference.iter().map(|&v| v == class).collect();
    binary_metrics(&a, &b, grid)
}

/// The metrics of the binary masks `pred` (A) and `reference` (B).
pub fn binary_metrics(pred: &[bool], reference: &[bool], grid: Grid) -> Result<Metrics> {
    check_grid(pred.len(), reference.len(), grid)?;
    let as_u8 = |m: &[bool]| m.iter().map(|&v| u8::from(v)).collect::<Vec<u8>>();
    let o = overlap(&as_u8(pred), &as_u8(reference), |v| v == 1);
    let mut m = Metrics {
        dice: o.dice(),
        jaccard: o.jaccard(),
        hd95: None,
        asd: None,
        assd: None,
        pred_voxels: o.pred,
        reference_voxels: o.reference,
    };
    if let Some((ab, ba)) = surface_distances(pred, reference, grid)? {
        let all: Vec<f64> = ab.iter().chain(&ba).copied().collect();
        m.hd95 = Some(percentile(&all, 95.0));
        m.asd = Some(mean(&ab));
        m.assd = Some(mean(&all));
    }
    Ok(m)
}

fn check_grid(pred: usize, reference: usize, grid: Grid) -> Result<()> {
    check_spacing("metrics", grid.spacing)?;
    if pred != grid.voxels() || reference != grid.voxels() {
        return Err(Error::InvalidArgument {
            op: "metrics",
            message: format!(
                "prediction of {pred} and reference of {reference} voxels on a {:?} grid",
                grid.dims
            ),
        });
    }
    Ok(())
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

/// (D_AB, D_BA) of the module documentation, each in the voxel order of its surface; None if
/// either mask is empty.
///
/// Computed inside the bounding box of A or B: outside it both masks are background, so the
/// surfaces (outside counts as background) and the distances between their voxels are the same as
/// on the whole grid, and a small structure in a large volume costs little.
pub fn surface_distances(
    pred: &[bool],
    reference: &[bool],
    grid: Grid,
) -> Result<Option<(Vec<f64>, Vec<f64>)>> {
    check_grid(pred.len(), reference.len(), grid)?;
    if !pred.contains(&true) || !reference.contains(&true) {
        return Ok(None);
    }
    let union: Vec<bool> = pred.iter().zip(reference).map(|(&a, &b)| a || b).collect();
    let (start, dims) = bounding_box(&union, grid.dims);
    let boxed = Grid {
        dims,
        spacing: grid.spacing,
    };
    let sa = surface(&crop(pred, grid.dims, start, dims), dims);
    let sb = surface(&crop(reference, grid.dims, start, dims), dims);
    let to_b = distance_to(&sb, boxed)?;
    let to_a = distance_to(&sa, boxed)?;
    let pick = |from: &[bool], to: &[f64]| -> Vec<f64> {
        from.iter()
            .zip(to)
            .filter_map(|(&s, &d)| s.then_some(d))
            .collect()
    };
    Ok(Some((pick(&sa, &to_b), pick(&sb, &to_a))))
}

/// The smallest box holding every true voxel of a non-empty mask: its start and size.
fn bounding_box(mask: &[bool], [d, h, w]: [usize; 3]) -> ([usize; 3], [usize; 3]) {
    let (mut lo, mut hi) = ([usize::MAX; 3], [0; 3]);
    for (i, _) in mask.iter().enumerate().filter(|(_, &m)| m) {
        let at = [i / (h * w), i / w % h, i % w];
        for a in 0..3 {
            lo[a] = lo[a].min(at[a]);
            hi[a] = hi[a].max(at[a]);
        }
    }
    debug_assert!(d > 0 && lo[0] < d, "bounding_box of an empty mask");
    (lo, [0, 1, 2].map(|a| hi[a] + 1 - lo[a]))
}

/// The box of `size` at `start` of a [D, H, W] mask.
fn crop(mask: &[bool], [_, h, w]: [usize; 3], start: [usize; 3], size: [usize; 3]) -> Vec<bool> {
    let mut out = Vec::with_capacity(size.iter().product());
    for z in start[0]..start[0] + size[0] {
        for y in start[1]..start[1] + size[1] {
            let row = (z * h + y) * w;
            out.extend_from_slice(&mask[row + start[2]..row + start[2] + size[2]]);
        }
    }
    out
}

/// X xor erode(X) with the 6-neighbour structuring element, outside the volume background: the
/// voxels of X with a face neighbour that is background or outside.
pub fn surface(mask: &[bool], [d, h, w]: [usize; 3]) -> Vec<bool> {
    let strides = [h * w, w, 1];
    let sizes = [d, h, w];
    (0..mask.len())
        .map(|i| {
            if !mask[i] {
                return false;
            }
            let at = [i / (h * w), i / w % h, i % w];
            (0..3).any(|a| {
                let below = at[a] == 0 || !mask[i - strides[a]];
                let above = at[a] + 1 == sizes[a] || !mask[i + strides[a]];
                below || above
            })
        })
        .collect()
}

/// Per voxel, the Euclidean distance to the nearest voxel of `target` (0 on it): the exact EDT of
/// the Cpu64 reference (Felzenszwalb-Huttenlocher), of the mask that is background on `target`.
pub fn distance_to(target: &[bool], grid: Grid) -> Result<Vec<f64>> {
    let away: Vec<f64> = target.iter().map(|&t| if t { 0.0 } else { 1.0 }).collect();
    let mask = Cpu64.tensor(&away, &Shape::from(grid.dims))?;
    let distances = Cpu64.edt(&mask, grid.spacing)?;
    Ok(distances.data.to_vec())
}

/// The `q`-th percentile (0 to 100) of non-empty `values` as numpy's `np.percentile` computes it by
/// default ("linear"): sorted v, position t = q / 100 * (n - 1), v[floor t] interpolated towards
/// v[floor t + 1] (written from the upper end when the fraction is >= 0.5, as numpy does, so the
/// result is numpy's to the last bit).
pub fn percentile(values: &[f64], q: f64) -> f64 {
    assert!(!values.is_empty(), "percentile of no values");
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let position = q / 100.0 * (v.len() - 1) as f64;
    let below = (position.floor() as usize).min(v.len() - 1);
    let above = (below + 1).min(v.len() - 1);
    let t = position - below as f64;
    let (a, b) = (v[below], v[above]);
    if t >= 0.5 {
        b - (b - a) * (1.0 - t)
    } else {
        a + (b - a) * t
    }
}

/// Mean and standard deviation of one metric over cases, over the cases where it is defined.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stat {
    /// None when it is undefined in every case.
    pub mean: Option<f64>,
    /// The population standard deviation (numpy's `np.std` default, ddof = 0).
    pub std: Option<f64>,
    pub defined: usize,
    pub undefined: usize,
}

impl Stat {
    pub fn of(values: &[Option<f64>]) -> Stat {
        let defined: Vec<f64> = values.iter().flatten().copied().collect();
        let undefined = values.len() - defined.len();
        if defined.is_empty() {
            return Stat {
                mean: None,
                std: None,
                defined: 0,
                undefined,
            };
        }
        let m = mean(&defined);
        let var = defined.iter().map(|v| (v - m).powi(2)).sum::<f64>() / defined.len() as f64;
        Stat {
            mean: Some(m),
            std: Some(var.sqrt()),
            defined: defined.len(),
            undefined,
        }
    }
}

/// The five metrics of one class summarised over cases, in the order of [`METRIC_NAMES`].
pub fn summarize(cases: &[Metrics]) -> [Stat; 5] {
    let column = |k: usize| cases.iter().map(|m| m.values()[k]).collect::<Vec<_>>();
    [0, 1, 2, 3, 4].map(|k| Stat::of(&column(k)))
}
