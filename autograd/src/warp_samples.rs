//! One warp per sample as one differentiable op (MLB-Seg's views, issue 23 item 4). Warping
//! samples one by one through slices of the batch costs, in the backward pass, a gradient of the
//! whole batch per slice and the sum of them all; here the batch is split and joined by buffer
//! copies and each direction writes its result once.

use crate::backend::TensorShape;
use crate::ops::{rule, tangent};
use crate::var::Var;
use crate::warp::{Warp, WarpBackend};
use crate::{Error, Result, Shape};

/// A warp that reads every voxel where it is (any interpolation reads it exactly), so it copies.
fn is_identity(w: &Warp) -> bool {
    w.input == w.output && w.matrix == Warp::identity(w.input).matrix
}

/// Sample i of x [N, C, ...] through warps[i] (its adjoint if `adjoint`), joined along N.
fn warp_each<B: WarpBackend>(
    backend: &B,
    x: &B::Tensor,
    warps: &[Warp],
    adjoint: bool,
) -> Result<B::Tensor> {
    let op = if adjoint {
        "warp_samples_adjoint"
    } else {
        "warp_samples"
    };
    let dims = x.shape().dims().to_vec();
    if dims.len() != 5 || dims[0] != warps.len() || warps.is_empty() {
        return Err(Error::InvalidArgument {
            op,
            message: format!("{} warps for a batch of shape {}", warps.len(), x.shape()),
        });
    }
    let sample = Shape::from([1, dims[1], dims[2], dims[3], dims[4]]);
    let samples = backend.split_flat(x, &vec![sample; warps.len()])?;
    let warped = samples
        .iter()
        .zip(warps)
        .map(|(s, w)| match (is_identity(w), adjoint) {
            (true, _) => Ok(s.clone()),
            (false, false) => backend.warp(s, w),
            (false, true) => backend.warp_adjoint(s, w),
        })
        .collect::<Result<Vec<_>>>()?;
    let mut out = warped[0].shape().dims().to_vec();
    if let Some(other) = warped.iter().find(|t| t.shape().dims() != out.as_slice()) {
        return Err(Error::InvalidArgument {
            op,
            message: format!(
                "warps to shapes {} and {}",
                warped[0].shape(),
                other.shape()
            ),
        });
    }
    out[0] = warps.len();
    let joined = backend.concat_flat(&warped.iter().collect::<Vec<_>>())?;
    backend.reshape(&joined, &Shape(out))
}

impl<B: WarpBackend> Var<B> {
    /// [N, C, input...] -> [N, C, output...], sample i through `warps[i]` (all to one output
    /// size); a warp with the identity matrix copies its sample. d x = warp_samples_adjoint(g).
    pub fn warp_samples(&self, warps: &[Warp]) -> Result<Var<B>> {
        let value = warp_each(self.backend(), self.value(), warps, false)?;
        let (back, forward) = (warps.to_vec(), warps.to_vec());
        Ok(Var::from_op_with_jvp(
            "warp_samples",
            value,
            &[self],
            rule(move |_, _, g| Ok(vec![Some(g.warp_samples_adjoint(&back)?)])),
            tangent(move |_, _, d| d[0].as_ref().expect("moves").warp_samples(&forward)),
        ))
    }

    /// The transpose of [`Var::warp_samples`]; d g = warp_samples(h).
    pub fn warp_samples_adjoint(&self, warps: &[Warp]) -> Result<Var<B>> {
        let value = warp_each(self.backend(), self.value(), warps, true)?;
        let (back, forward) = (warps.to_vec(), warps.to_vec());
        Ok(Var::from_op_with_jvp(
            "warp_samples_adjoint",
            value,
            &[self],
            rule(move |_, _, h| Ok(vec![Some(h.warp_samples(&back)?)])),
            tangent(move |_, _, d| d[0].as_ref().expect("moves").warp_samples_adjoint(&forward)),
        ))
    }
}
