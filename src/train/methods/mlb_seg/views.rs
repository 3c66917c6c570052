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
use crate::train::trainer::slice_batch;
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

    fn samples(&self) -> usize {
        self.warps[0].len()
    }

    /// The views of images x [S, C, patch]: [K * S, C, patch], trilinear.
    pub fn images<B: NetBackend>(&self, x: &Var<B>) -> Result<Var<B>> {
        self.each_view(x, |w, xs| xs.warp(w))
    }

    /// The views of one-hot labels y [S, classes, patch]: [K * S, classes, patch], nearest, and
    /// background where a view shows what lies outside the patch (the zoom-outs' padding), so
    /// they stay one-hot.
    pub fn labels<B: NetBackend>(&self, y: &Var<B>) -> Result<Var<B>> {
        self.each_view(y, |w, ys| {
            let warped = ys.warp(&w.clone().with_interp(Interp::Nearest))?;
            with_background(&warped)
        })
    }

    /// `f(warp, sample)` for every view and sample of a constant [S, ...], stacked view-major.
    fn each_view<B: NetBackend>(
        &self,
        x: &Var<B>,
        f: impl Fn(&Warp, &Var<B>) -> Result<Var<B>>,
    ) -> Result<Var<B>> {
        let mut parts = Vec::with_capacity(VIEWS * self.samples());
        for view in &self.warps {
            for (s, w) in view.iter().enumerate() {
                let sample = slice_batch(x, s, 1)?;
                parts.push(if is_identity(w) {
                    sample
                } else {
                    f(w, &sample)?
                });
            }
        }
        stack(&parts)
    }

    /// Sample s of view k of view-major rows [K * S, ...] warped back to the original frame and,
    /// for a view that covers only part of it (a zoom-in), divided by its coverage [1, 1, patch]
    /// (a ones tensor warped back the same way), which is returned too (None: it covers all).
    /// Where the coverage is zero the value is zero.
    fn back<B: NetBackend>(
        &self,
        rows: &Var<B>,
        k: usize,
        s: usize,
    ) -> Result<(Var<B>, Option<Var<B>>)> {
        let row = slice_batch(rows, k * self.samples() + s, 1)?;
        let w = &self.warps[k][s];
        if is_identity(w) {
            return Ok((row, None));
        }
        let inverse = w.inverse();
        let back = row.warp(&inverse)?;
        if is_permutation(w) {
            return Ok((back, None));
        }
        let ones = Var::ones(row.backend(), &voxel_shape(&row))?;
        let coverage = ones.warp(&inverse)?;
        let normalised = back.div(&coverage.clamp(MIN_COVERAGE, 2.0)?)?;
        Ok((normalised, Some(coverage)))
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
        let mut per_sample = Vec::with_capacity(self.samples());
        for s in 0..self.samples() {
            let mut sum: Option<Var<B>> = None;
            let mut covered: Option<Var<B>> = None;
            for k in 0..VIEWS {
                let (p, coverage) = self.back(probabilities, k, s)?;
                let coverage = match coverage {
                    Some(c) => c,
                    None => Var::ones(probabilities.backend(), &voxel_shape(probabilities))?,
                };
                sum = Some(add_to(sum, p.mul(&coverage)?)?);
                covered = Some(add_to(covered, coverage)?);
            }
            let sum = sum.expect("K > 0 views");
            per_sample.push(match average {
                Average::Coverage => sum.div(&covered.expect("K > 0 views"))?,
                Average::Views => sum.scale(1.0 / VIEWS as f64)?,
            });
        }
        let mut parts = Vec::with_capacity(VIEWS * self.samples());
        for view in &self.warps {
            for (s, w) in view.iter().enumerate() {
                let average = &per_sample[s];
                let in_view = if is_identity(w) {
                    average.clone()
                } else {
                    average.warp(w)?
                };
                parts.push(above(&in_view, threshold)?);
            }
        }
        stack(&parts)
    }

    /// L_cons of probabilities [K * S, classes, patch]: for every sample and every pair of its
    /// views, mean over the original frame of coverage_a coverage_b (p_a - p_b)^2 (both warped
    /// back), averaged over the K (K - 1) / 2 pairs and the samples (the released code's
    /// normalisation). Differentiable in both views of each pair.
    pub fn consistency<B: NetBackend>(&self, probabilities: &Var<B>) -> Result<Var<B>> {
        let pairs = VIEWS * (VIEWS - 1) / 2;
        let mut total: Option<Var<B>> = None;
        for s in 0..self.samples() {
            let back: Vec<(Var<B>, Option<Var<B>>)> = (0..VIEWS)
                .map(|k| self.back(probabilities, k, s))
                .collect::<Result<_>>()?;
            for a in 0..VIEWS {
                for b in a + 1..VIEWS {
                    let mut d = back[a].0.sub(&back[b].0)?.square()?;
                    for coverage in [&back[a].1, &back[b].1].into_iter().flatten() {
                        d = d.mul(coverage)?;
                    }
                    total = Some(add_to(total, d.mean()?)?);
                }
            }
        }
        total
            .expect("at least one sample")
            .scale(1.0 / (pairs * self.samples()) as f64)
    }
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

fn voxel_shape<B: NetBackend>(x: &Var<B>) -> Shape {
    let d = x.shape().dims();
    Shape::from([1, 1, d[2], d[3], d[4]])
}

fn add_to<B: NetBackend>(sum: Option<Var<B>>, x: Var<B>) -> Result<Var<B>> {
    match sum {
        Some(s) => s.add(&x),
        None => Ok(x),
    }
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
