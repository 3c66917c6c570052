//! The "small rotations and scalings" of METHODS.md (Augmentation), on the device: after a batch
//! is uploaded, each sample gets its own [`Warp::rotate_scale`] about the patch centre, trilinear
//! for the image and nearest for the one-hot labels (voxels the warp brings in from outside the
//! patch are background), so the labels stay one-hot.
//!
//! The angles and the scale of slot s at iteration t are drawn from the counter-based generator
//! keyed by the run's seed, t and s (the scheme of [`super::batch`]), so a resumed run warps its
//! batches exactly as the uninterrupted one.

use super::batch::stream;
use super::trainer::DeviceBatch;
use crate::nn::NetBackend;
use metaseg_autograd::random::uniform;
use metaseg_autograd::{Interp, Result, Shape, Var, Warp};

/// The purpose of the warp's draws among the streams of one batch slot.
const WARP_PURPOSE: u64 = 1;

/// How far the warps go: angles uniform in +-`rotate` degrees about each axis (about D only, the
/// H-W plane, for a 2D patch of depth 1), scale uniform in 1 +- `scale`. Both 0: off.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RotateScale {
    pub rotate: f64,
    pub scale: f64,
}

impl RotateScale {
    pub fn is_off(&self) -> bool {
        self.rotate == 0.0 && self.scale == 0.0
    }

    /// The warp of batch slot `slot` at `iteration`.
    pub fn warp(&self, patch: [usize; 3], seed: u64, iteration: u64, slot: usize) -> Warp {
        let k = stream(iteration, slot, WARP_PURPOSE);
        let symmetric = |j: u64| 2.0 * uniform(seed, k + j) - 1.0;
        let max = self.rotate.to_radians();
        let angles = if patch[0] == 1 {
            [max * symmetric(0), 0.0, 0.0]
        } else {
            [0, 1, 2].map(|a| max * symmetric(a))
        };
        Warp::rotate_scale(patch, angles, 1.0 + self.scale * symmetric(3))
    }
}

/// The batch with sample i of x (and of y, for a labeled one) warped by `warps[i]`.
pub fn warp_batch<B: NetBackend>(batch: DeviceBatch<B>, warps: &[Warp]) -> Result<DeviceBatch<B>> {
    let x = per_sample(&batch.x, |i, xi| xi.warp(&warps[i]))?;
    let y = per_sample(&batch.y, |i, yi| {
        let nearest = warps[i].clone().with_interp(Interp::Nearest);
        let y = yi.warp(&nearest)?;
        // Outside the patch nearest reads no class: make it background (class 0).
        let classes = y.shape().dims()[1];
        let missing = y.sum_axes(&[1], true)?.neg()?.add_scalar(1.0)?;
        y.add(&missing.channel_window(0, classes)?)
    })?;
    Ok(DeviceBatch {
        x,
        y,
        labeled: batch.labeled,
    })
}

/// `f(i, sample i as [1, ...])` for every sample of a rank-5 constant, stacked back.
fn per_sample<B: NetBackend>(
    x: &Var<B>,
    f: impl Fn(usize, Var<B>) -> Result<Var<B>>,
) -> Result<Var<B>> {
    let b = x.backend();
    let dims = x.shape().dims();
    let mut one = dims.to_vec();
    one[0] = 1;
    let samples = b.split_flat(x.value(), &vec![Shape(one); dims[0]])?;
    let warped = samples
        .into_iter()
        .enumerate()
        .map(|(i, s)| f(i, Var::constant(b, s)))
        .collect::<Result<Vec<_>>>()?;
    let values: Vec<&B::Tensor> = warped.iter().map(Var::value).collect();
    let stacked = b.reshape(&b.concat_flat(&values)?, x.shape())?;
    Ok(Var::constant(b, stacked))
}
