//! Affine warps on the reference backend: exact cases (identity, flips, integer shifts, quarter
//! turns), trilinear resampling of a linear function (exact), the map constructors against each
//! other, the adjoint identity, and gradients and second order against central differences.

use metaseg_autograd::check::{assert_gradients, assert_jvp, one_hot, seeded, CpuFn};
use metaseg_autograd::{Cpu64, Error, Interp, Shape, Tolerance, Var, Warp, WarpBackend};
use std::f64::consts::FRAC_PI_2;

fn var(values: &[f64], shape: &Shape) -> Var<Cpu64> {
    Var::from_f64(&Cpu64, values, shape, true).unwrap()
}

fn shape(nc: [usize; 2], size: [usize; 3]) -> Shape {
    Shape::from([nc[0], nc[1], size[0], size[1], size[2]])
}

fn warped(x: &[f64], s: &Shape, w: &Warp) -> Vec<f64> {
    var(x, s).warp(w).unwrap().to_f64().unwrap()
}

/// x[v, d, h, w] at a (volume, voxel) position of a tensor of spatial `size`.
fn at(x: &[f64], size: [usize; 3], v: usize, p: [usize; 3]) -> f64 {
    x[((v * size[0] + p[0]) * size[1] + p[1]) * size[2] + p[2]]
}

fn voxels(size: [usize; 3]) -> impl Iterator<Item = [usize; 3]> {
    (0..size[0])
        .flat_map(move |d| (0..size[1]).flat_map(move |h| (0..size[2]).map(move |w| [d, h, w])))
}

const SIZE: [usize; 3] = [5, 6, 7];

fn both() -> [Interp; 2] {
    [Interp::Trilinear, Interp::Nearest]
}

#[test]
fn the_identity_and_a_double_flip_return_the_data_exactly() {
    let s = shape([2, 3], SIZE);
    let x = seeded(s.numel(), 1, -1.0, 1.0);
    for interp in both() {
        let id = Warp::identity(SIZE).with_interp(interp);
        assert_eq!(warped(&x, &s, &id), x, "identity, {interp:?}");
        for axis in 0..3 {
            let flip = Warp::flip(SIZE, axis).with_interp(interp);
            let once = warped(&x, &s, &flip);
            assert_ne!(once, x, "a flip along {axis} changes the data");
            // out[.., o] = x[.., o with axis mirrored].
            for v in 0..6 {
                for o in voxels(SIZE) {
                    let mut m = o;
                    m[axis] = SIZE[axis] - 1 - o[axis];
                    assert_eq!(at(&once, SIZE, v, o), at(&x, SIZE, v, m));
                }
            }
            assert_eq!(warped(&once, &s, &flip), x, "flip twice along {axis}");
            assert_eq!(flip.then(&flip).matrix, id.matrix);
        }
    }
}

#[test]
fn an_integer_translation_shifts_the_data_and_pads_with_zeros() {
    let s = shape([1, 2], SIZE);
    let x = seeded(s.numel(), 2, -1.0, 1.0);
    let shift = [1i64, -2, 3];
    for interp in both() {
        let mut w = Warp::identity(SIZE).with_interp(interp);
        for (row, t) in w.matrix.iter_mut().zip(shift) {
            row[3] = t as f64;
        }
        let y = warped(&x, &s, &w);
        for v in 0..2 {
            for o in voxels(SIZE) {
                let src: Vec<i64> = (0..3).map(|a| o[a] as i64 + shift[a]).collect();
                let inside = (0..3).all(|a| (0..SIZE[a] as i64).contains(&src[a]));
                let expected = if inside {
                    at(&x, SIZE, v, [0, 1, 2].map(|a| src[a] as usize))
                } else {
                    0.0
                };
                assert_eq!(at(&y, SIZE, v, o), expected, "{interp:?} at {o:?}");
            }
        }
    }
}

/// f(d, h, w) = 0.3 d - 0.7 h + 0.2 w + 1, which trilinear interpolation reproduces exactly
/// wherever all 8 neighbours are inside the grid.
fn linear(p: [f64; 3]) -> f64 {
    0.3 * p[0] - 0.7 * p[1] + 0.2 * p[2] + 1.0
}

fn linear_volume(size: [usize; 3]) -> Vec<f64> {
    voxels(size).map(|o| linear(o.map(|v| v as f64))).collect()
}

fn inside_grid(p: [f64; 3], size: [usize; 3]) -> bool {
    (0..3).all(|a| p[a] >= 0.0 && p[a] <= size[a] as f64 - 1.0)
}

#[test]
fn zoom_in_then_its_inverse_reproduces_a_linear_function_in_the_centre() {
    let size = [9, 11, 1];
    let s = shape([1, 1], size);
    let x = linear_volume(size);
    let tol = Tolerance::F64;
    for p in [1.0, 2.0, 3.5] {
        let zoom = Warp::zoom(size, p);
        // The formula of the doc: (o + p + 0.5) n / (n + 2p) - 0.5; a size-1 axis is left alone.
        for (a, &n) in size.iter().enumerate().take(2) {
            let n = n as f64;
            let expected = (p + 0.5) * n / (n + 2.0 * p) - 0.5;
            tol.assert("zoom offset", &[zoom.matrix[a][3]], &[expected]);
            tol.assert("zoom factor", &[zoom.matrix[a][a]], &[n / (n + 2.0 * p)]);
        }
        assert_eq!(zoom.matrix[2], [0.0, 0.0, 1.0, 0.0]);
        let zoomed = warped(&x, &s, &zoom);
        // A zoom-in samples inside the input only: the linear function at the sample points.
        let reference: Vec<f64> = voxels(size).map(|o| linear(zoom.point(o))).collect();
        tol.assert("zoom-in of a linear function", &zoomed, &reference);
        let back = warped(&zoomed, &s, &zoom.inverse());
        let mut centre = 0;
        for (k, i) in voxels(size).enumerate() {
            if inside_grid(zoom.inverse().point(i), size) {
                tol.assert("zoom-in and back", &[back[k]], &[x[k]]);
                centre += 1;
            }
        }
        assert!(
            centre > 0 && centre < x.len(),
            "p {p}: {centre} centre voxels"
        );
    }
}

#[test]
fn zoom_out_samples_the_centre_and_pads_the_border_with_zeros() {
    let size = [12, 12, 12];
    let s = shape([1, 1], size);
    let x = linear_volume(size);
    let p = -3.0;
    let y = warped(&x, &s, &Warp::zoom(size, p));
    for (k, o) in voxels(size).enumerate() {
        let border = o.iter().any(|v| !(3..9).contains(v));
        let expected = if border {
            0.0
        } else {
            linear(Warp::zoom(size, p).point(o))
        };
        Tolerance::F64.assert("zoom-out", &[y[k]], &[expected]);
    }
}

#[test]
fn a_zoom_is_a_scaling_about_the_centre_and_rotations_compose() {
    let size = [10, 10, 10];
    let tol = Tolerance::F64;
    for p in [-2.0, 3.0] {
        let s = (10.0 + 2.0 * p) / 10.0;
        let a = Warp::zoom(size, p);
        let b = Warp::rotate_scale(size, [0.0; 3], s);
        tol.assert("zoom = scale", &a.matrix.concat(), &b.matrix.concat());
    }
    let identity = Warp::identity(SIZE);
    let none = Warp::rotate_scale(SIZE, [0.0; 3], 1.0);
    tol.assert(
        "rotate_scale(0, 1)",
        &none.matrix.concat(),
        &identity.matrix.concat(),
    );
    let w = Warp::rotate_scale(SIZE, [0.3, -0.2, 0.5], 1.2);
    tol.assert(
        "a warp after its inverse",
        &w.then(&w.inverse()).matrix.concat(),
        &identity.matrix.concat(),
    );
    tol.assert(
        "the inverse of the inverse",
        &w.inverse().inverse().matrix.concat(),
        &w.matrix.concat(),
    );
    // Rotations about one axis add their angles.
    let (r1, r2) = (
        Warp::rotate_scale(SIZE, [0.3, 0.0, 0.0], 1.0),
        Warp::rotate_scale(SIZE, [0.4, 0.0, 0.0], 1.0),
    );
    let r = Warp::rotate_scale(SIZE, [0.7, 0.0, 0.0], 1.0);
    tol.assert(
        "r2 after r1",
        &r2.then(&r1).matrix.concat(),
        &r.matrix.concat(),
    );
    let singular = Warp::rotate_scale(SIZE, [0.0; 3], 1.0);
    let mut singular = singular;
    singular.matrix[1] = [0.0; 4];
    assert!(matches!(
        singular.try_inverse(),
        Err(Error::InvalidArgument { .. })
    ));
}

#[test]
fn a_quarter_turn_about_d_is_rot90_in_the_h_w_plane() {
    let size = [3, 5, 5];
    let s = shape([2, 1], size);
    let x = seeded(s.numel(), 3, -1.0, 1.0);
    for interp in both() {
        let w = Warp::rotate_scale(size, [FRAC_PI_2, 0.0, 0.0], 1.0).with_interp(interp);
        let y = warped(&x, &s, &w);
        // p = c + R_D^T (o - c): out[d, h, w] = x[d, w, 4 - h].
        for v in 0..2 {
            for o in voxels(size) {
                let expected = at(&x, size, v, [o[0], o[2], 4 - o[1]]);
                Tolerance::F64.assert("rot90", &[at(&y, size, v, o)], &[expected]);
            }
        }
    }
}

/// Warps whose input and output grids differ, including a general affine map.
fn warps() -> Vec<Warp> {
    let m = seeded(12, 9, -0.8, 0.8);
    let mut general = Warp {
        matrix: [[0.0; 4]; 3],
        input: [4, 5, 6],
        output: [3, 7, 5],
        interp: Interp::Trilinear,
    };
    for r in 0..3 {
        general.matrix[r].copy_from_slice(&m[4 * r..4 * r + 4]);
        general.matrix[r][r] += 1.0;
        general.matrix[r][3] += 1.0;
    }
    vec![
        Warp::zoom(SIZE, 1.5),
        Warp::zoom(SIZE, -1.0),
        Warp::flip(SIZE, 2),
        Warp::rotate_scale(SIZE, [0.2, -0.3, 0.4], 0.9),
        general.clone(),
        general.inverse(),
    ]
}

#[test]
fn the_adjoint_is_the_transpose() {
    for w in warps() {
        for interp in both() {
            let w = w.clone().with_interp(interp);
            let (xs, gs) = (shape([2, 2], w.input), shape([2, 2], w.output));
            let x = seeded(xs.numel(), 4, -1.0, 1.0);
            let g = seeded(gs.numel(), 5, -1.0, 1.0);
            let wx = warped(&x, &xs, &w);
            let wt_g = var(&g, &gs).warp_adjoint(&w).unwrap().to_f64().unwrap();
            let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(a, b)| a * b).sum::<f64>();
            Tolerance::F64.assert(
                &format!("<warp x, g> = <x, warp^T g>, {interp:?}"),
                &[dot(&wx, &g)],
                &[dot(&x, &wt_g)],
            );
        }
    }
}

#[test]
fn gradients_and_second_order_match_finite_differences() {
    for w in warps() {
        for interp in both() {
            let w = w.clone().with_interp(interp);
            // Squared, so the second derivative runs through the backward's own backward.
            let forward = |x: &[Var<Cpu64>]| x[0].warp(&w)?.square();
            let adjoint = |x: &[Var<Cpu64>]| x[0].warp_adjoint(&w)?.square();
            let cases: [(&str, &CpuFn, [usize; 3], [usize; 3]); 2] = [
                ("warp", &forward, w.input, w.output),
                ("warp_adjoint", &adjoint, w.output, w.input),
            ];
            for (what, f, from, to) in cases {
                let s = shape([1, 2], from);
                let inputs = vec![(seeded(s.numel(), 6, -1.0, 1.0), s.clone())];
                let weights = seeded(shape([1, 2], to).numel(), 7, -1.0, 1.0);
                let direction = vec![seeded(s.numel(), 8, -1.0, 1.0)];
                let what = format!("{what} {interp:?}");
                let tol = Tolerance::FINITE_DIFFERENCE;
                assert_gradients(&what, f, &inputs, &weights, &direction, tol);
                assert_jvp(&what, f, &inputs, &direction, tol);
            }
        }
    }
}

#[test]
fn nearest_keeps_one_hot_labels_one_hot_inside_the_input() {
    let size = [6, 7, 5];
    let s = shape([2, 3], size);
    let y = one_hot(&s, 11, None);
    let w = Warp::rotate_scale(size, [0.3, 0.2, -0.4], 1.1).with_interp(Interp::Nearest);
    let out = warped(&y, &s, &w);
    let volume: usize = size.iter().product();
    for n in 0..2 {
        for (k, o) in voxels(size).enumerate() {
            let column: Vec<f64> = (0..3).map(|c| out[(n * 3 + c) * volume + k]).collect();
            assert!(column.iter().all(|&v| v == 0.0 || v == 1.0), "{column:?}");
            let sum: f64 = column.iter().sum();
            let inside = w
                .point(o)
                .iter()
                .zip(size)
                .all(|(&p, n)| p > -0.5 && p < n as f64 - 0.5);
            assert_eq!(sum, f64::from(u8::from(inside)), "at {o:?}");
        }
    }
}

#[test]
fn bad_shapes_are_errors_naming_the_op() {
    let w = Warp::identity(SIZE);
    let rank4 = Shape::from([2, 5, 6, 7]);
    let err = Cpu64.warp(&Cpu64.fill_tensor(&rank4), &w).unwrap_err();
    assert!(err.to_string().starts_with("warp:"), "{err}");
    let wrong = shape([1, 1], [5, 6, 8]);
    let err = Cpu64.warp(&Cpu64.fill_tensor(&wrong), &w).unwrap_err();
    assert!(matches!(err, Error::Shape { op: "warp", .. }), "{err}");
    let err = Cpu64
        .warp_adjoint(&Cpu64.fill_tensor(&wrong), &w)
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Shape {
                op: "warp_adjoint",
                ..
            }
        ),
        "{err}"
    );
}

trait Fill {
    fn fill_tensor(&self, s: &Shape) -> metaseg_autograd::CpuTensor;
}

impl Fill for Cpu64 {
    fn fill_tensor(&self, s: &Shape) -> metaseg_autograd::CpuTensor {
        metaseg_autograd::Backend::fill(self, s, 1.0).unwrap()
    }
}
