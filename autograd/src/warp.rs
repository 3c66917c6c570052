//! Affine resampling of volumes ("warps"): zoom, flip, rotation and scaling about the patch centre,
//! and their inverses, for the invertible geometric augmentations of METHODS.md (MLB-Seg's
//! pseudo-label enhancement warps each view's prediction back to the original frame; training
//! draws small rotations and scalings).
//!
//! A [`Warp`] maps every output voxel index o = (d, h, w) of a [N, C, output] tensor to a point
//! p = M (d, h, w, 1) in the input's voxel index space and reads the input there: trilinearly
//! (the input extended by zeros outside, so the result is continuous in p) or at the nearest voxel.
//! The op is linear in the data; its adjoint (the transpose, a scatter of each output voxel's value
//! to the voxels it read, with the same weights) is another primitive, and each is the other's
//! backward, so second order works.

use crate::backend::Backend;
use crate::cpu64::{filled, Cpu64, CpuTensor};
use crate::layers::dims5;
use crate::ops::{rule, tangent};
use crate::var::Var;
use crate::{Error, Result, Shape};
use std::sync::Arc;

/// How a warp reads the input at a point between voxel centres.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interp {
    /// The 8 surrounding voxels weighted by prod_k (1 - |p_k - i_k|); voxels outside read 0.
    Trilinear,
    /// The voxel round(p) (halves round up), 0 outside. For label maps: one-hot stays one-hot
    /// inside the input. In f32 (the GPU) a point within rounding (about 1e-5 voxel) of a
    /// half-way point may round the other way than in f64: a few voxels per million for a
    /// generic rotation; exact half-way points (zooms, flips, shifts) agree (see [`SNAP`]).
    Nearest,
}

impl Interp {
    pub fn name(self) -> &'static str {
        match self {
            Interp::Trilinear => "trilinear",
            Interp::Nearest => "nearest",
        }
    }

    pub fn parse(s: &str) -> Option<Interp> {
        match s {
            "trilinear" => Some(Interp::Trilinear),
            "nearest" => Some(Interp::Nearest),
            _ => None,
        }
    }
}

/// Nearest rounding snaps the point to 1/SNAP of a voxel first, so that points exactly half-way
/// between voxels (a zoom by a rational factor puts many there) round the same way in f32 on the
/// GPU as in f64 here; a power of two, so the snapped value is exact in both.
pub const SNAP: f64 = 1024.0;

/// The voxel nearest to coordinate `p` (after snapping to 1/SNAP), as a signed index.
pub fn nearest_index(p: f64) -> i64 {
    let k = (p * SNAP + 0.5).floor();
    ((k + SNAP / 2.0) / SNAP).floor() as i64
}

/// Maps every output voxel index (d, h, w) of a [N, C, output] tensor to a point in the input's
/// voxel index space: p_in = matrix * (d, h, w, 1). Samples outside the input read 0.
#[derive(Clone, Debug, PartialEq)]
pub struct Warp {
    pub matrix: [[f64; 4]; 3],
    pub input: [usize; 3],
    pub output: [usize; 3],
    pub interp: Interp,
}

type Mat3 = [[f64; 3]; 3];

fn mat_mul(a: &Mat3, b: &Mat3) -> Mat3 {
    let mut c = [[0.0; 3]; 3];
    for (r, row) in c.iter_mut().enumerate() {
        for (k, v) in row.iter_mut().enumerate() {
            *v = (0..3).map(|j| a[r][j] * b[j][k]).sum();
        }
    }
    c
}

/// The centre of a grid of `size` voxels, (n - 1) / 2 per axis.
fn centre(size: [usize; 3]) -> [f64; 3] {
    size.map(|n| (n as f64 - 1.0) / 2.0)
}

impl Warp {
    /// The map p = c + a (o - c) about centre `c` (a square matrix acting on offsets).
    fn about(size: [usize; 3], a: Mat3) -> Warp {
        let c = centre(size);
        let mut matrix = [[0.0; 4]; 3];
        for r in 0..3 {
            matrix[r][..3].copy_from_slice(&a[r]);
            matrix[r][3] = c[r] - (0..3).map(|j| a[r][j] * c[j]).sum::<f64>();
        }
        Warp {
            matrix,
            input: size,
            output: size,
            interp: Interp::Trilinear,
        }
    }

    pub fn identity(size: [usize; 3]) -> Warp {
        let mut matrix = [[0.0; 4]; 3];
        for (r, row) in matrix.iter_mut().enumerate() {
            row[r] = 1.0;
        }
        Warp {
            matrix,
            input: size,
            output: size,
            interp: Interp::Trilinear,
        }
    }

    /// The same map with another interpolation.
    pub fn with_interp(mut self, interp: Interp) -> Warp {
        self.interp = interp;
        self
    }

    /// Zoom about the centre keeping the size: p > 0 resizes up by 2p voxels along each axis of
    /// size > 1 and centre-crops (zoom-in); p < 0 resizes down by 2|p| and zero-pads (zoom-out).
    /// Resizing n voxels to m = n + 2p has align_corners = false semantics (voxel j of the
    /// resized grid reads input point (j + 0.5) n / m - 0.5), and both the crop and the padding
    /// put output voxel o at j = o + p, so p_in = (o + p + 0.5) n / (n + 2p) - 0.5.
    /// Panics unless n + 2p > 0 along every axis of size > 1 (p must be below half the patch).
    pub fn zoom(size: [usize; 3], p: f64) -> Warp {
        let mut warp = Warp::identity(size);
        for (a, &n) in size.iter().enumerate() {
            if n <= 1 {
                continue;
            }
            let m = n as f64 + 2.0 * p;
            assert!(
                m > 0.0 && p.is_finite(),
                "Warp::zoom: p = {p} would resize an axis of {n} voxels to {m}"
            );
            let r = n as f64 / m;
            warp.matrix[a][a] = r;
            warp.matrix[a][3] = (p + 0.5) * r - 0.5;
        }
        warp
    }

    /// Mirror along one axis (0 = D, 1 = H, 2 = W): p_in = n - 1 - o there.
    pub fn flip(size: [usize; 3], axis: usize) -> Warp {
        assert!(
            axis < 3,
            "Warp::flip: axis {axis} is not 0 (D), 1 (H) or 2 (W)"
        );
        let mut warp = Warp::identity(size);
        warp.matrix[axis][axis] = -1.0;
        warp.matrix[axis][3] = size[axis] as f64 - 1.0;
        warp
    }

    /// Rotation by the given angles (radians, about the D, H and W axes, applied in that order) and
    /// isotropic scale, about the patch centre c: the data point q moves to c + scale R (q - c)
    /// with R = R_W R_H R_D, so output voxel o reads p_in = c + R^T (o - c) / scale. A rotation
    /// about D turns the H-W plane (the only one a 2D patch of depth 1 should use); an axis of
    /// size 1 is not scaled, so such a patch maps onto itself.
    pub fn rotate_scale(size: [usize; 3], angles: [f64; 3], scale: f64) -> Warp {
        let (sd, cd) = angles[0].sin_cos();
        let (sh, ch) = angles[1].sin_cos();
        let (sw, cw) = angles[2].sin_cos();
        let r_d = [[1.0, 0.0, 0.0], [0.0, cd, -sd], [0.0, sd, cd]];
        let r_h = [[ch, 0.0, sh], [0.0, 1.0, 0.0], [-sh, 0.0, ch]];
        let r_w = [[cw, -sw, 0.0], [sw, cw, 0.0], [0.0, 0.0, 1.0]];
        let r = mat_mul(&r_w, &mat_mul(&r_h, &r_d));
        // R^T / scale, but an axis of size 1 (the depth of a 2D patch) is not scaled.
        let mut a = [0, 1, 2].map(|i| [0, 1, 2].map(|j| r[j][i] / scale));
        for k in (0..3).filter(|&k| size[k] == 1) {
            a[k][k] = r[k][k];
        }
        Warp::about(size, a)
    }

    fn linear(&self) -> Mat3 {
        [0, 1, 2].map(|r| [0, 1, 2].map(|c| self.matrix[r][c]))
    }

    /// The map back: output and input swapped, the matrix inverted (same interpolation), or an
    /// error if the matrix is singular.
    pub fn try_inverse(&self) -> Result<Warp> {
        let a = self.linear();
        let cof = |r: usize, c: usize| {
            let (r1, r2) = ((r + 1) % 3, (r + 2) % 3);
            let (c1, c2) = ((c + 1) % 3, (c + 2) % 3);
            a[r1][c1] * a[r2][c2] - a[r1][c2] * a[r2][c1]
        };
        let det: f64 = (0..3).map(|c| a[0][c] * cof(0, c)).sum();
        let scale = a.iter().flatten().fold(0.0f64, |m, v| m.max(v.abs()));
        if !det.is_finite() || det.abs() <= 1e-12 * scale.powi(3) {
            return Err(Error::InvalidArgument {
                op: "warp",
                message: format!("the matrix {:?} is singular", self.matrix),
            });
        }
        // inverse[r][c] = cofactor(c, r) / det.
        let inv = [0, 1, 2].map(|r| [0, 1, 2].map(|c| cof(c, r) / det));
        let mut matrix = [[0.0; 4]; 3];
        for r in 0..3 {
            matrix[r][..3].copy_from_slice(&inv[r]);
            matrix[r][3] = -(0..3).map(|j| inv[r][j] * self.matrix[j][3]).sum::<f64>();
        }
        Ok(Warp {
            matrix,
            input: self.output,
            output: self.input,
            interp: self.interp,
        })
    }

    /// The map back: output and input swapped, matrix inverted (same interp). Panics if the matrix
    /// is singular (none of the constructors makes one; see [`Warp::try_inverse`]).
    pub fn inverse(&self) -> Warp {
        self.try_inverse().unwrap_or_else(|e| panic!("{e}"))
    }

    /// `self` after `first` (first applied to the data first): one warp from first's input to
    /// self's output whose sample points are first's evaluated at self's (the coordinates compose
    /// exactly; resampling once is not the same as resampling twice). Self's interpolation.
    pub fn then(&self, first: &Warp) -> Warp {
        let f = first.linear();
        let matrix = [0, 1, 2].map(|r| {
            let through = [0, 1, 2, 3].map(|c| (0..3).map(|j| f[r][j] * self.matrix[j][c]).sum());
            [
                through[0],
                through[1],
                through[2],
                through[3] + first.matrix[r][3],
            ]
        });
        Warp {
            matrix,
            input: first.input,
            output: self.output,
            interp: self.interp,
        }
    }

    /// The input point output voxel `o` reads.
    pub fn point(&self, o: [usize; 3]) -> [f64; 3] {
        self.matrix
            .map(|row| row[0] * o[0] as f64 + row[1] * o[1] as f64 + row[2] * o[2] as f64 + row[3])
    }

    /// Calls f(input voxel, weight) for every input voxel output voxel `o` reads with a non-zero
    /// weight.
    pub fn for_each_source(&self, o: [usize; 3], mut f: impl FnMut([usize; 3], f64)) {
        let p = self.point(o);
        let inside = |i: i64, a: usize| (0..self.input[a] as i64).contains(&i);
        match self.interp {
            Interp::Nearest => {
                let i = p.map(nearest_index);
                if (0..3).all(|a| inside(i[a], a)) {
                    f(i.map(|v| v as usize), 1.0);
                }
            }
            Interp::Trilinear => {
                let base = p.map(|v| v.floor());
                let frac = [0, 1, 2].map(|a| p[a] - base[a]);
                for corner in 0..8 {
                    let step = [corner >> 2 & 1, corner >> 1 & 1, corner & 1];
                    let i = [0, 1, 2].map(|a| (base[a] as i64).saturating_add(step[a] as i64));
                    let weight: f64 = (0..3)
                        .map(|a| if step[a] == 1 { frac[a] } else { 1.0 - frac[a] })
                        .product();
                    if weight != 0.0 && (0..3).all(|a| inside(i[a], a)) {
                        f(i.map(|v| v as usize), weight);
                    }
                }
            }
        }
    }

    /// Checks that `x` is [N, C, spatial] with the given spatial size; returns [N, C].
    fn check(&self, op: &'static str, x: &Shape, spatial: [usize; 3]) -> Result<[usize; 2]> {
        let [n, c, d, h, w] = dims5(op, x)?;
        if [d, h, w] != spatial {
            let side = if op == "warp" { "input" } else { "output" };
            return Err(Error::Shape {
                op,
                lhs: x.clone(),
                rhs: Shape::from([n, c, spatial[0], spatial[1], spatial[2]]),
                reason: format!("the spatial size must be the warp's {side} size"),
            });
        }
        if !self.matrix.iter().flatten().all(|v| v.is_finite()) {
            return Err(Error::InvalidArgument {
                op,
                message: format!("the matrix {:?} is not finite", self.matrix),
            });
        }
        Ok([n, c])
    }

    /// The [N, C, output] shape of the warp of `x` [N, C, input], checked.
    pub fn output_shape(&self, x: &Shape) -> Result<Shape> {
        let [n, c] = self.check("warp", x, self.input)?;
        let [d, h, w] = self.output;
        Shape::checked("warp", &[n, c, d, h, w])
    }

    /// The [N, C, input] shape of the adjoint of `g` [N, C, output], checked.
    pub fn adjoint_shape(&self, g: &Shape) -> Result<Shape> {
        let [n, c] = self.check("warp_adjoint", g, self.output)?;
        let [d, h, w] = self.input;
        Shape::checked("warp_adjoint", &[n, c, d, h, w])
    }
}

/// The primitives of the warp family.
pub trait WarpBackend: Backend {
    /// x [N, C, input...] -> [N, C, output...]
    fn warp(&self, x: &Self::Tensor, warp: &Warp) -> Result<Self::Tensor>;
    /// The adjoint (transpose) of `warp` as a linear map: g [N, C, output...] -> [N, C, input...].
    fn warp_adjoint(&self, g: &Self::Tensor, warp: &Warp) -> Result<Self::Tensor>;
}

/// Calls f(volume, output voxel, flat output index) for every element of an [nc, size] tensor.
fn for_each_output(nc: usize, size: [usize; 3], mut f: impl FnMut(usize, [usize; 3], usize)) {
    if nc == 0 || size.contains(&0) {
        // No positions; an axis of 2^50 beside one of 0 would otherwise loop for ever.
        return;
    }
    let mut k = 0;
    for v in 0..nc {
        for d in 0..size[0] {
            for h in 0..size[1] {
                for w in 0..size[2] {
                    f(v, [d, h, w], k);
                    k += 1;
                }
            }
        }
    }
}

fn flat(v: usize, i: [usize; 3], size: [usize; 3]) -> usize {
    ((v * size[0] + i[0]) * size[1] + i[1]) * size[2] + i[2]
}

impl WarpBackend for Cpu64 {
    fn warp(&self, x: &CpuTensor, warp: &Warp) -> Result<CpuTensor> {
        let out = warp.output_shape(&x.shape)?;
        let nc = out.dims()[0] * out.dims()[1];
        let mut data = filled("warp", out.numel(), 0.0)?;
        for_each_output(nc, warp.output, |v, o, k| {
            warp.for_each_source(o, |i, weight| {
                data[k] += weight * x.data[flat(v, i, warp.input)];
            });
        });
        Ok(CpuTensor {
            data: Arc::new(data),
            shape: out,
        })
    }

    fn warp_adjoint(&self, g: &CpuTensor, warp: &Warp) -> Result<CpuTensor> {
        let out = warp.adjoint_shape(&g.shape)?;
        let nc = out.dims()[0] * out.dims()[1];
        let mut data = filled("warp_adjoint", out.numel(), 0.0)?;
        for_each_output(nc, warp.output, |v, o, k| {
            warp.for_each_source(o, |i, weight| {
                data[flat(v, i, warp.input)] += weight * g.data[k];
            });
        });
        Ok(CpuTensor {
            data: Arc::new(data),
            shape: out,
        })
    }
}

/// The differentiable warps: each is linear, and the other is its backward (and the forward-mode
/// rule is the op itself applied to the tangent).
impl<B: WarpBackend> Var<B> {
    /// [N, C, warp.input] -> [N, C, warp.output]; d x = warp_adjoint(g).
    pub fn warp(&self, warp: &Warp) -> Result<Var<B>> {
        let value = self.backend().warp(self.value(), warp)?;
        let (back, forward) = (warp.clone(), warp.clone());
        Ok(Var::from_op_with_jvp(
            "warp",
            value,
            &[self],
            rule(move |_, _, g| Ok(vec![Some(g.warp_adjoint(&back)?)])),
            tangent(move |_, _, d| d[0].as_ref().expect("moves").warp(&forward)),
        ))
    }

    /// The transpose of [`Var::warp`]: [N, C, warp.output] -> [N, C, warp.input]; d g = warp(h).
    pub fn warp_adjoint(&self, warp: &Warp) -> Result<Var<B>> {
        let value = self.backend().warp_adjoint(self.value(), warp)?;
        let (back, forward) = (warp.clone(), warp.clone());
        Ok(Var::from_op_with_jvp(
            "warp_adjoint",
            value,
            &[self],
            rule(move |_, _, h| Ok(vec![Some(h.warp(&back)?)])),
            tangent(move |_, _, d| d[0].as_ref().expect("moves").warp_adjoint(&forward)),
        ))
    }
}
