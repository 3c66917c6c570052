//! Affine warps on the GPU against the Cpu64 reference through the runner's table: zoom-in and
//! zoom-out, flips, a rotation with scaling and a general affine map between grids of different
//! sizes, trilinear and nearest, the warp and its adjoint (value, gradient and Hessian-vector
//! product). Odd sizes throughout (not multiples of 4 or of the workgroup size). Cpu64 is checked
//! against finite differences and exact cases in autograd/tests/warp.rs.

mod common;

use common::{assert_gpu_matches_cpu64, gpu, seeded};
use metaseg::runner::matrix_setting;
use metaseg_autograd::{Backend, Cpu64, Interp, Shape, Tolerance, Var, Warp, WarpBackend};

/// A [2, 3] batch of volumes of spatial `size`.
fn input(seed: u64, size: [usize; 3]) -> (Vec<f64>, Shape) {
    let s = Shape::from([2, 3, size[0], size[1], size[2]]);
    (seeded(s.numel(), seed, -1.0, 1.0), s)
}

const SIZE: [usize; 3] = [5, 7, 9];

fn size_setting(key: &str, s: [usize; 3]) -> String {
    format!("{key}={},{},{}", s[0], s[1], s[2])
}

/// Both ops of one warp on the GPU against Cpu64.
fn assert_warp_matches(w: &Warp) {
    for interp in [Interp::Trilinear, Interp::Nearest] {
        let settings = |other: String| {
            vec![
                matrix_setting(w),
                other,
                format!("interp={}", interp.name()),
            ]
        };
        let forward = settings(size_setting("output", w.output));
        let forward: Vec<&str> = forward.iter().map(String::as_str).collect();
        assert_gpu_matches_cpu64("warp", &forward, &[input(1, w.input)], Tolerance::F32);
        let adjoint = settings(size_setting("input", w.input));
        let adjoint: Vec<&str> = adjoint.iter().map(String::as_str).collect();
        // The adjoint sums up to (2 reach + 1)^3 terms per voxel.
        let tol = Tolerance::F32_ACCUMULATED;
        assert_gpu_matches_cpu64("warp_adjoint", &adjoint, &[input(2, w.output)], tol);
    }
}

#[test]
fn zooms_match_the_reference() {
    for p in [2.0, 1.5, -1.0, -2.0] {
        assert_warp_matches(&Warp::zoom(SIZE, p));
    }
}

#[test]
fn flips_match_the_reference() {
    for axis in 0..3 {
        assert_warp_matches(&Warp::flip(SIZE, axis));
    }
}

#[test]
fn rotations_with_scaling_match_the_reference() {
    assert_warp_matches(&Warp::rotate_scale(SIZE, [0.3, -0.2, 0.25], 1.15));
    assert_warp_matches(&Warp::rotate_scale(SIZE, [-0.5, 0.0, 0.0], 0.8));
    // A 2D patch (depth 1) turned in its H-W plane.
    assert_warp_matches(&Warp::rotate_scale([1, 9, 7], [0.4, 0.0, 0.0], 1.1));
}

#[test]
fn a_general_map_between_grids_of_different_sizes_matches_the_reference() {
    let m = seeded(12, 9, -0.6, 0.6);
    let mut w = Warp {
        matrix: [[0.0; 4]; 3],
        input: [6, 5, 7],
        output: [3, 7, 5],
        interp: Interp::Trilinear,
    };
    for r in 0..3 {
        w.matrix[r].copy_from_slice(&m[4 * r..4 * r + 4]);
        w.matrix[r][r] += 1.0;
        w.matrix[r][3] += 1.5;
    }
    assert_warp_matches(&w);
    assert_warp_matches(&w.inverse());
}

#[test]
fn the_adjoint_is_the_transpose_on_the_gpu() {
    // <warp x, g> = <x, warp^T g> with both sides computed by the kernels.
    let gpu = gpu();
    let w = Warp::rotate_scale(SIZE, [0.2, 0.1, -0.3], 0.9);
    for interp in [Interp::Trilinear, Interp::Nearest] {
        let w = w.clone().with_interp(interp);
        let (x, xs) = input(3, w.input);
        let (g, gs) = input(4, w.output);
        let up = |v: &[f64], s: &Shape| gpu.tensor(v, s).unwrap();
        let wx = gpu.to_f64(&gpu.warp(&up(&x, &xs), &w).unwrap()).unwrap();
        let wt_g = gpu
            .to_f64(&gpu.warp_adjoint(&up(&g, &gs), &w).unwrap())
            .unwrap();
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(a, b)| a * b).sum::<f64>();
        Tolerance::F32_ACCUMULATED.assert("adjoint identity", &[dot(&wx, &g)], &[dot(&x, &wt_g)]);
    }
}

#[test]
fn a_singular_matrix_has_no_gpu_adjoint_and_bad_shapes_are_errors() {
    let gpu = gpu();
    let mut w = Warp::identity(SIZE);
    w.matrix[0] = [0.0; 4];
    let (g, s) = input(5, SIZE);
    let g = Var::from_f64(&gpu, &g, &s, false).unwrap();
    let err = g.warp_adjoint(&w).err().unwrap();
    assert!(err.to_string().contains("warp_adjoint"), "{err}");
    let wrong = Var::zeros(&gpu, &Shape::from([1, 1, 5, 7, 8])).unwrap();
    assert!(wrong.warp(&Warp::identity(SIZE)).is_err());
    // The same on the reference.
    let wrong = Var::zeros(&Cpu64, &Shape::from([1, 1, 5, 7, 8])).unwrap();
    assert!(wrong.warp(&Warp::identity(SIZE)).is_err());
}
