//! The label-geometry family: the exact Euclidean distance transform (EDT) of a binary mask and the
//! normalised signed distance map (SDF) of METHODS.md (DTC / DTML), and the SDF-to-probability map.
//!
//! A mask is any tensor whose nonzero elements are foreground. Distances are in physical units:
//! `spacing` is the voxel size along (D, H, W). Both are functions of a mask, so they have no
//! gradient: their ops are `Rule::None`, and asking for a gradient through them is
//! `Error::NoGradient`.
//!
//! What a volume without background gives (scipy's distance_transform_edt returns distances to a
//! point outside the volume there, which depend on the volume's size; we do not follow it):
//! - `edt`: +infinity at every voxel (the distance to the nearest of no background voxels);
//! - `sdf`: -1 at every voxel, the value of the deepest interior voxel of any other mask (the map is
//!   negative inside and normalised to [-1, 1]), so sigmoid(-k sdf) calls the whole volume
//!   foreground as it should. An empty mask gives 0 at every voxel (the DTC code's choice).

use crate::backend::Backend;
use crate::var::{Rule, Var};
use crate::{Cpu64, CpuTensor, Error, Result, Shape};
use std::sync::Arc;

/// The primitives of the family.
pub trait DistanceBackend: Backend {
    /// Per volume (the last three axes of a [..., D, H, W] tensor, each volume on its own): the
    /// Euclidean distance of every foreground (nonzero) voxel to the nearest background voxel, with
    /// voxel size `spacing` along (D, H, W); 0 on background, +infinity in a volume without any.
    fn edt(&self, mask: &Self::Tensor, spacing: [f64; 3]) -> Result<Self::Tensor>;
    /// Per sample of a [N, 1, D, H, W] mask: the normalised signed distance map (see the module
    /// documentation and [`sdf_of_distances`] for the definition and the degenerate masks).
    fn sdf(&self, mask: &Self::Tensor, spacing: [f64; 3]) -> Result<Self::Tensor>;
}

/// The number of volumes and their (D, H, W) of a [..., D, H, W] tensor (rank >= 3).
pub fn volume_dims(op: &'static str, shape: &Shape) -> Result<(usize, [usize; 3])> {
    match shape.dims() {
        [outer @ .., d, h, w] => Ok((outer.iter().product(), [*d, *h, *w])),
        _ => Err(Error::InvalidArgument {
            op,
            message: format!("expected [..., D, H, W] (rank >= 3), got shape {shape}"),
        }),
    }
}

/// N and (D, H, W) of a [N, 1, D, H, W] mask.
pub fn sample_dims(op: &'static str, shape: &Shape) -> Result<(usize, [usize; 3])> {
    match shape.dims() {
        [n, 1, d, h, w] => Ok((*n, [*d, *h, *w])),
        _ => Err(Error::InvalidArgument {
            op,
            message: format!("expected a one-channel mask [N, 1, D, H, W], got shape {shape}"),
        }),
    }
}

/// A voxel size must be three positive finite numbers.
pub fn check_spacing(op: &'static str, spacing: [f64; 3]) -> Result<()> {
    if spacing.iter().all(|s| s.is_finite() && *s > 0.0) {
        return Ok(());
    }
    Err(Error::InvalidArgument {
        op,
        message: format!("spacing must be three positive finite numbers, got {spacing:?}"),
    })
}

/// The signed distance map of one sample from its mask and its two distance maps, `posdis`
/// (edt of the mask) and `negdis` (edt of its complement), all of `dims` = (D, H, W):
/// sdf = (negdis - min negdis) / (max negdis - min negdis) - (posdis - min posdis) / (max posdis -
/// min posdis), 0 on the inner boundary (foreground voxels with a background face neighbour inside
/// the volume); 0 everywhere for an empty mask, -1 everywhere for a mask without background.
pub fn sdf_of_distances(
    mask: &[f64],
    posdis: &[f64],
    negdis: &[f64],
    dims: [usize; 3],
) -> Vec<f64> {
    let foreground = |i: usize| mask[i] != 0.0;
    let n = mask.len();
    if !(0..n).any(foreground) {
        return vec![0.0; n];
    }
    if (0..n).all(foreground) {
        return vec![-1.0; n];
    }
    let range = |x: &[f64]| {
        let min = x.iter().copied().fold(f64::INFINITY, f64::min);
        let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (min, max - min)
    };
    let (pos_min, pos_range) = range(posdis);
    let (neg_min, neg_range) = range(negdis);
    (0..n)
        .map(|i| {
            if on_inner_boundary(mask, dims, i) {
                0.0
            } else {
                (negdis[i] - neg_min) / neg_range - (posdis[i] - pos_min) / pos_range
            }
        })
        .collect()
}

/// Whether voxel `i` of a (D, H, W) mask is foreground with a background face neighbour inside it.
fn on_inner_boundary(mask: &[f64], [d, h, w]: [usize; 3], i: usize) -> bool {
    if mask[i] == 0.0 {
        return false;
    }
    let at = [i / (h * w), i / w % h, i % w];
    let strides = [h * w, w, 1];
    let sizes = [d, h, w];
    (0..3).any(|axis| {
        let below = at[axis] > 0 && mask[i - strides[axis]] == 0.0;
        let above = at[axis] + 1 < sizes[axis] && mask[i + strides[axis]] == 0.0;
        below || above
    })
}

/// As differentiable-graph ops: no gradient (a mask function), so `Rule::None`.
impl<B: DistanceBackend> Var<B> {
    /// [`DistanceBackend::edt`] of this mask.
    pub fn edt(&self, spacing: [f64; 3]) -> Result<Self> {
        let value = self.backend().edt(self.value(), spacing)?;
        Ok(Var::from_op("edt", value, &[self], Rule::None))
    }

    /// [`DistanceBackend::sdf`] of this [N, 1, D, H, W] mask.
    pub fn sdf(&self, spacing: [f64; 3]) -> Result<Self> {
        let value = self.backend().sdf(self.value(), spacing)?;
        Ok(Var::from_op("sdf", value, &[self], Rule::None))
    }
}

impl<B: Backend> Var<B> {
    /// sigmoid(-k x): a signed distance map (negative inside) to a foreground probability
    /// (METHODS.md, DTML: k = 1500). Composed of elementwise ops, so differentiable.
    pub fn sdf_probability(&self, k: f64) -> Result<Self> {
        self.scale(-k)?.sigmoid()
    }
}

/// The reference: the same separable transform as the GPU in plain f64 loops.
impl DistanceBackend for Cpu64 {
    fn edt(&self, mask: &CpuTensor, spacing: [f64; 3]) -> Result<CpuTensor> {
        check_spacing("edt", spacing)?;
        let (_, dims) = volume_dims("edt", &mask.shape)?;
        let data = per_volume(&mask.data, dims, |m| edt_volume(m, dims, spacing, false));
        Ok(cpu(data, mask.shape.clone()))
    }

    fn sdf(&self, mask: &CpuTensor, spacing: [f64; 3]) -> Result<CpuTensor> {
        check_spacing("sdf", spacing)?;
        let (_, dims) = sample_dims("sdf", &mask.shape)?;
        let data = per_volume(&mask.data, dims, |m| {
            let posdis = edt_volume(m, dims, spacing, false);
            let negdis = edt_volume(m, dims, spacing, true);
            sdf_of_distances(m, &posdis, &negdis, dims)
        });
        Ok(cpu(data, mask.shape.clone()))
    }
}

/// `f` applied to each consecutive volume of D H W values, concatenated.
fn per_volume(data: &[f64], [d, h, w]: [usize; 3], f: impl Fn(&[f64]) -> Vec<f64>) -> Vec<f64> {
    let voxels = d * h * w;
    if voxels == 0 {
        return Vec::new();
    }
    data.chunks(voxels).flat_map(f).collect()
}

/// The EDT of one volume: the squared transform along W, then H, then D (each the input of the
/// next), then the square root. With `invert`, the zero voxels are the foreground.
fn edt_volume(mask: &[f64], dims: [usize; 3], spacing: [f64; 3], invert: bool) -> Vec<f64> {
    let mut f: Vec<f64> = mask
        .iter()
        .map(|&m| {
            if (m != 0.0) != invert {
                f64::INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let [d, h, w] = dims;
    let strides = [h * w, w, 1];
    for axis in [2, 1, 0] {
        let weight = spacing[axis] * spacing[axis];
        let (len, step) = (dims[axis], strides[axis]);
        // Every line along `axis`: its first voxel is one with index 0 along it.
        for start in (0..d * h * w).filter(|&i| (i / step) % len == 0) {
            let line: Vec<f64> = (0..len).map(|q| f[start + q * step]).collect();
            for (q, value) in lower_envelope(&line, weight).into_iter().enumerate() {
                f[start + q * step] = value;
            }
        }
    }
    f.iter().map(|v| v.sqrt()).collect()
}

/// The 1D squared distance transform d(q) = min_p weight (q - p)^2 + f(p) (Felzenszwalb and
/// Huttenlocher): the lower envelope of the parabolas rooted at the points with finite f, then a
/// sweep that reads each q's value off the parabola lowest there. All +infinity if none is finite.
fn lower_envelope(f: &[f64], weight: f64) -> Vec<f64> {
    // v: roots of the envelope's parabolas, left to right; z[k]: where parabola k becomes lowest.
    let (mut v, mut z): (Vec<usize>, Vec<f64>) = (Vec::new(), Vec::new());
    for (q, &fq) in f.iter().enumerate().filter(|(_, fq)| fq.is_finite()) {
        let mut s = f64::NEG_INFINITY;
        while let Some(&p) = v.last() {
            s = intersection(p, f[p], q, fq, weight);
            if v.len() == 1 || s > z[z.len() - 1] {
                break;
            }
            v.pop();
            z.pop();
        }
        v.push(q);
        z.push(s);
    }
    if v.is_empty() {
        return vec![f64::INFINITY; f.len()];
    }
    let mut k = 0;
    (0..f.len())
        .map(|q| {
            while k + 1 < v.len() && z[k + 1] < q as f64 {
                k += 1;
            }
            let dq = q as f64 - v[k] as f64;
            weight * dq * dq + f[v[k]]
        })
        .collect()
}

/// Where the parabolas weight (x - p)^2 + fp and weight (x - q)^2 + fq (p < q) cross, written
/// without the large squares p^2, q^2 that would cancel.
fn intersection(p: usize, fp: f64, q: usize, fq: f64, weight: f64) -> f64 {
    let (p, q) = (p as f64, q as f64);
    (fq - fp) / (2.0 * weight * (q - p)) + (q + p) / 2.0
}

fn cpu(data: Vec<f64>, shape: Shape) -> CpuTensor {
    CpuTensor {
        data: Arc::new(data),
        shape,
    }
}
