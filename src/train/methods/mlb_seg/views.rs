//! PLE's views (METHODS.md, section 1.3): K = 5 views of every sample (identity, one zoom-in,
//! two zoom-outs, one flip) made with invertible warps on the device; the views' predictions
//! warped back to the original frame, averaged and re-warped into each view as the enhanced
//! labels y_ple; and L_cons, the views' disagreement in the original frame.
//!
//! A batch's views are stacked view-major: row k * S + s is view k of sample s, so view k of the
//! whole batch is one contiguous slice.
//!
//! A zoom-in view shows only the centre of the original frame: warped back, it covers that centre
//! (the warp reads zeros outside the view). So predictions are averaged with coverage weights (a
//! ones tensor warped back the same way) and a pair of views is compared only where both cover
//! the frame.

use crate::nn::NetBackend;
use crate::train::batch::stream;
use crate::train::config::TrainConfig;
use metaseg_autograd::random::uniform;
use metaseg_autograd::{Interp, Result, Shape, UnaryOp, Var, Warp};

/// The number of views: identity, zoom-in, two zoom-outs, flip.
pub const VIEWS: usize = 5;

/// Below this coverage a voxel counts as outside a view (its weight is at most this anyway).
const MIN_COVERAGE: f64 = 1e-6;

/// The purpose of PLE's draws among the random streams of one batch slot (0 is the crop, 1 the
/// device-side rotation and scaling).
const PLE_PURPOSE: u64 = 2;

/// How the views' predictions are averaged in the original frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Average {
    /// Each voxel over the views that cover it.
    Coverage,
    /// The sum divided by K, as the released code does (a zoom-in view adds zeros outside its
    /// centre).
    Views,
}

/// The views of a batch of samples: `warps[k][s]` makes view k of sample s.
#[derive(Clone, Debug, PartialEq)]
pub struct Views {
    pub warps: Vec<Vec<Warp>>,
}

/// The offsets the zooms draw from: the even numbers of the range (4, 6, ..., 30 by default),
/// scaled from `zoom_reference` voxels to the patch's smallest axis of more than one voxel.
fn zoom_offsets(config: &TrainConfig) -> Vec<f64> {
    let m = &config.mlb_seg;
    let [lo, hi] = m.zoom_range;
    let smallest = config
        .batch
        .patch
        .iter()
        .filter(|&&n| n > 1)
        .min()
        .copied()
        .unwrap_or(1);
    let scale = smallest as f64 / m.zoom_reference;
    (lo..=hi).step_by(2).map(|p| f64::from(p) * scale).collect()
}

impl Views {
    /// The views of `samples` samples in batch slots `first_slot ..` at iteration `t`: a zoom-in
    /// offset, two distinct zoom-out offsets (when the range has two) and a flip axis (one of
    /// the axes longer than a voxel) per sample, from the run's counter-based streams.
    pub fn draw(config: &TrainConfig, t: u64, first_slot: usize, samples: usize) -> Views {
        let patch = config.batch.patch;
        let offsets = zoom_offsets(config);
        let axes: Vec<usize> = (0..3).filter(|&a| patch[a] > 1).collect();
        let mut warps: Vec<Vec<Warp>> = (0..VIEWS).map(|_| Vec::with_capacity(samples)).collect();
        for s in 0..samples {
            let k = stream(t, first_slot + s, PLE_PURPOSE);
            let pick = |j: u64, n: usize| {
                ((uniform(config.seed, k + j) * n as f64) as usize).min(n.saturating_sub(1))
            };
            let zoom_in = offsets[pick(0, offsets.len())];
            let first_out = pick(1, offsets.len());
            // The second zoom-out from the others, so the two differ (the released code samples
            // both without replacement).
            let second_out = if offsets.len() > 1 {
                (first_out + 1 + pick(2, offsets.len() - 1)) % offsets.len()
            } else {
                first_out
            };
            let view_warps = [
                Warp::identity(patch),
                Warp::zoom(patch, zoom_in),
                Warp::zoom(patch, -offsets[first_out]),
                Warp::zoom(patch, -offsets[second_out]),
                Warp::flip(patch, axes[pick(3, axes.len())]),
            ];
            for (view, w) in warps.iter_mut().zip(view_warps) {
                view.push(w);
            }
        }
        Views { warps }
    }

    /// The warp of every row of a view-major batch [K * S, ...]: row k * S + s is view k of
    /// sample s.
    fn rows(&self) -> Vec<Warp> {
        self.warps.iter().flatten().cloned().collect()
    }

    /// The views of images x [S, C, patch]: [K * S, C, patch], trilinear.
    pub fn images<B: NetBackend>(&self, x: &Var<B>) -> Result<Var<B>> {
        tiled(x)?.warp_samples(&self.rows())
    }

    /// The views of one-hot labels y [S, classes, patch]: [K * S, classes, patch], nearest, and
    /// background where a view shows what lies outside the patch (the zoom-outs' padding), so
    /// they stay one-hot.
    pub fn labels<B: NetBackend>(&self, y: &Var<B>) -> Result<Var<B>> {
        let nearest: Vec<Warp> = self
            .rows()
            .into_iter()
            .map(|w| w.with_interp(Interp::Nearest))
            .collect();
        with_background(&tiled(y)?.warp_samples(&nearest)?)
    }

    /// View-major rows [K * S, ...] warped back to the original frame and, where a view covers
    /// only part of it (a zoom-in), divided by its coverage, with that coverage [K * S, 1, patch]
    /// (a ones tensor warped back the same way; ones for a view that covers the whole frame).
    /// Where the coverage is zero the value is zero.
    fn back<B: NetBackend>(&self, rows: &Var<B>) -> Result<(Var<B>, Var<B>)> {
        let warps = self.rows();
        let inverse = |w: &Warp| {
            if is_identity(w) {
                w.clone()
            } else {
                w.inverse()
            }
        };
        let back = rows.warp_samples(&warps.iter().map(inverse).collect::<Vec<_>>())?;
        let covering: Vec<Warp> = warps
            .iter()
            .map(|w| {
                if is_permutation(w) {
                    Warp::identity(w.input)
                } else {
                    w.inverse()
                }
            })
            .collect();
        let mut ones_shape = rows.shape().dims().to_vec();
        ones_shape[1] = 1;
        let coverage = Var::ones(rows.backend(), &Shape(ones_shape))?.warp_samples(&covering)?;
        // A view that covers the whole frame is divided by 1, exactly.
        let normalised = back.div(&coverage.clamp(MIN_COVERAGE, 2.0)?)?;
        Ok((normalised, coverage))
    }

    /// The enhanced labels of probabilities [K * S, classes, patch] (constants): each sample's
    /// views warped back and averaged, the average warped into every view and thresholded at
    /// 0.5, one-hot [K * S, classes, patch]. A voxel where no foreground class passes 0.5 is
    /// background (for two classes this is the argmax).
    pub fn enhanced_labels<B: NetBackend>(
        &self,
        probabilities: &Var<B>,
        average: Average,
    ) -> Result<Var<B>> {
        self.enhanced_labels_at(probabilities, average, 0.5)
    }

    /// [`Views::enhanced_labels`] with foreground where the average exceeds `threshold`.
    pub fn enhanced_labels_at<B: NetBackend>(
        &self,
        probabilities: &Var<B>,
        average: Average,
        threshold: f64,
    ) -> Result<Var<B>> {
        let (back, coverage) = self.back(probabilities)?;
        let over_views = |x: &Var<B>| -> Result<Var<B>> {
            let d = x.shape().dims().to_vec();
            let per_view = Shape::from([VIEWS, d[0] / VIEWS * d[1..].iter().product::<usize>()]);
            let mut sample_shape = d;
            sample_shape[0] /= VIEWS;
            x.reshape(&per_view)?
                .sum_axes(&[0], false)?
                .reshape(&Shape(sample_shape))
        };
        let sum = over_views(&back.mul(&coverage)?)?;
        let per_sample = match average {
            Average::Coverage => sum.div(&over_views(&coverage)?)?,
            Average::Views => sum.scale(1.0 / VIEWS as f64)?,
        };
        let in_views = tiled(&per_sample)?.warp_samples(&self.rows())?;
        above(&in_views, threshold)
    }

    /// L_cons of probabilities [K * S, classes, patch]: for every sample and every pair of its
    /// views, mean over the original frame of coverage_a coverage_b (p_a - p_b)^2 (both warped
    /// back), averaged over the K (K - 1) / 2 pairs and the samples (the released code's
    /// normalisation). Differentiable in both views of each pair. Each pair of views over all
    /// samples at once; a view whose every sample covers the whole frame is not weighted.
    pub fn consistency<B: NetBackend>(&self, probabilities: &Var<B>) -> Result<Var<B>> {
        let (back, coverage) = self.back(probabilities)?;
        let back = per_view(&back)?;
        let coverage: Vec<Option<Var<B>>> = per_view(&coverage)?
            .into_iter()
            .zip(&self.warps)
            .map(|(c, warps)| (!warps.iter().all(is_permutation)).then_some(c))
            .collect();
        let mut total: Option<Var<B>> = None;
        for a in 0..VIEWS {
            for b in a + 1..VIEWS {
                let mut d = back[a].sub(&back[b])?.square()?;
                for c in [&coverage[a], &coverage[b]].into_iter().flatten() {
                    d = d.mul(c)?;
                }
                let sum = d.sum()?;
                total = Some(match total {
                    Some(t) => t.add(&sum)?,
                    None => sum,
                });
            }
        }
        let count = VIEWS * (VIEWS - 1) / 2 * probabilities.shape().numel() / VIEWS;
        total.expect("at least two views").scale(1.0 / count as f64)
    }
}

/// View-major rows [K * S, C, ...] as K tensors [S, C, ...], one per view.
fn per_view<B: NetBackend>(rows: &Var<B>) -> Result<Vec<Var<B>>> {
    let mut view = rows.shape().dims().to_vec();
    view[0] /= VIEWS;
    let width = view.iter().product::<usize>();
    let flat = rows.reshape(&Shape::from([1, VIEWS, width, 1, 1]))?;
    (0..VIEWS)
        .map(|k| flat.slice_channels(k, 1)?.reshape(&Shape(view.clone())))
        .collect()
}

/// Samples [S, ...] repeated once per view: [K * S, ...], view-major (a constant).
fn tiled<B: NetBackend>(x: &Var<B>) -> Result<Var<B>> {
    stack(&vec![x.detach(); VIEWS])
}

fn is_identity(w: &Warp) -> bool {
    *w == Warp::identity(w.input)
}

/// A warp that moves every voxel onto another exactly (identity, flip): it covers the whole frame
/// and is its own inverse, so warping back needs no coverage.
fn is_permutation(w: &Warp) -> bool {
    (0..3).all(|r| {
        (0..3).all(|c| {
            let v = w.matrix[r][c];
            if r == c {
                v == 1.0 || v == -1.0
            } else {
                v == 0.0
            }
        })
    }) && w.matrix.iter().all(|row| row[3].fract() == 0.0)
}

/// Labels that lost their class where a warp read outside (all zeros there) made background.
fn with_background<B: NetBackend>(y: &Var<B>) -> Result<Var<B>> {
    let classes = y.shape().dims()[1];
    let missing = y.sum_axes(&[1], true)?.neg()?.add_scalar(1.0)?;
    y.add(&missing.channel_window(0, classes)?)
}

/// One-hot labels from probabilities [N, classes, ...]: each foreground class where it exceeds
/// `threshold`, background elsewhere.
fn above<B: NetBackend>(p: &Var<B>, threshold: f64) -> Result<Var<B>> {
    let classes = p.shape().dims()[1];
    let above = p.add_scalar(-threshold)?.unary(UnaryOp::ReluMask)?;
    let foreground = above.channel_window(1, classes - 1)?;
    let labels = foreground.channel_window(-1, classes)?;
    with_background(&labels)
}

/// Rank-5 constants [n_i, C, ...] with the same trailing shape stacked along the batch axis.
pub fn stack<B: NetBackend>(parts: &[Var<B>]) -> Result<Var<B>> {
    let first = &parts[0];
    let backend = first.backend();
    let mut dims = first.shape().dims().to_vec();
    dims[0] = parts.iter().map(|p| p.shape().dims()[0]).sum();
    let values: Vec<&B::Tensor> = parts.iter().map(Var::value).collect();
    let flat = backend.concat_flat(&values)?;
    Ok(Var::constant(
        backend,
        backend.reshape(&flat, &Shape(dims))?,
    ))
}
