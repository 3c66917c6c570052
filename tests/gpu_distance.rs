//! The distance family on the GPU: the EDT and the SDF against the Cpu64 reference through the
//! runner's table (forward only: they have no gradient), and the EDT against brute force over all
//! voxel pairs too, on seeded masks with anisotropic spacing at odd sizes, lines longer than a
//! workgroup, several volumes and samples, empty and all-foreground ones. Cpu64 is itself checked
//! against brute force in autograd/tests/distance.rs. sdf_probability (differentiable) is checked
//! with its gradient and Hessian-vector product.

mod common;

use common::{assert_gpu_forward_matches_cpu64, assert_gpu_matches_cpu64, gpu, seeded, value};
use metaseg::gpu::MAX_LINE;
use metaseg::runner::{apply_op, Settings};
use metaseg_autograd::check::{edt_brute_force, seeded_mask};
use metaseg_autograd::{grad, Backend, DistanceBackend, Error, Shape, Tolerance, Var};

/// f32 squared distances (exact integers times spacing^2, rounded) and one square root.
const TOL: Tolerance = Tolerance::F32;
const SPACING: &str = "spacing=1.7,0.6,1.1";

fn mask(shape: &Shape, seed: u64, density: f64) -> (Vec<f64>, Shape) {
    (seeded_mask(shape, seed, density), shape.clone())
}

#[test]
fn edt_matches_the_reference_at_odd_sizes_and_any_rank() {
    for shape in [
        Shape::from([2, 3, 5, 7, 9]),
        Shape::from([7, 5, 9]),
        Shape::from([3, 1, 6, 11]),
    ] {
        for (seed, density) in [(1, 0.5), (2, 0.9), (3, 0.98)] {
            for spacing in ["spacing=1,1,1", SPACING] {
                let m = mask(&shape, seed, density);
                assert_gpu_forward_matches_cpu64("edt", &[spacing], &[m], TOL);
            }
        }
    }
}

#[test]
fn edt_matches_brute_force_with_lines_longer_than_a_workgroup() {
    // Each axis in turn 130 long (more than the 64 invocations of a workgroup, and than the
    // 64-line workgroups: more lines than one workgroup along the others).
    let spacing = [1.7, 0.6, 1.1];
    for dims in [[130, 3, 2], [2, 130, 3], [3, 2, 130], [9, 10, 11]] {
        let shape = Shape::from(dims);
        let (m, _) = mask(&shape, 4, 0.9);
        let out = value(
            &gpu(),
            |xs| apply_op("edt", xs, &Settings::parse([SPACING]).unwrap()),
            &[(m.clone(), shape)],
        );
        let expected = edt_brute_force(&m, dims, spacing, false);
        TOL.assert(
            &format!("edt {dims:?} against brute force"),
            &out,
            &expected,
        );
    }
}

#[test]
fn edt_of_empty_and_full_volumes_is_zero_and_infinite() {
    let shape = Shape::from([3, 4, 5, 6]);
    let per_volume = 4 * 5 * 6;
    let mut m = vec![0.0; per_volume];
    m.extend(vec![1.0; per_volume]);
    m.extend(seeded_mask(&Shape::from([4, 5, 6]), 5, 0.7));
    let out = value(
        &gpu(),
        |xs| apply_op("edt", xs, &Settings::default()),
        &[(m.clone(), shape.clone())],
    );
    assert!(out[..per_volume].iter().all(|&v| v == 0.0));
    assert!(out[per_volume..2 * per_volume]
        .iter()
        .all(|&v| v == f64::INFINITY));
    assert_gpu_forward_matches_cpu64("edt", &[], &[(m, shape)], TOL);
}

#[test]
fn sdf_matches_the_reference_with_empty_and_full_samples() {
    let shape = Shape::from([2, 1, 5, 7, 9]);
    let per_sample = 5 * 7 * 9;
    for (seed, density) in [(6, 0.5), (7, 0.85)] {
        for spacing in ["spacing=1,1,1", SPACING] {
            let m = mask(&shape, seed, density);
            assert_gpu_forward_matches_cpu64("sdf", &[spacing], std::slice::from_ref(&m), TOL);
            // N = 2 with sample 1 empty, then with sample 0 all foreground.
            let mut one_empty = m.clone();
            one_empty.0[per_sample..].fill(0.0);
            assert_gpu_forward_matches_cpu64("sdf", &[spacing], &[one_empty], TOL);
            let mut one_full = m;
            one_full.0[..per_sample].fill(1.0);
            assert_gpu_forward_matches_cpu64("sdf", &[spacing], &[one_full], TOL);
        }
    }
    // More voxels per sample than one workgroup of the extrema reduction reads in a sweep, and
    // long lines: several chunks per sample.
    let big = Shape::from([2, 1, 70, 33, 41]);
    assert_gpu_forward_matches_cpu64("sdf", &[SPACING], &[mask(&big, 8, 0.6)], TOL);
}

#[test]
fn sdf_probability_matches_the_reference_with_its_derivatives() {
    let shape = Shape::from([2, 1, 5, 7, 9]);
    // Around the SDF's zero, where sigmoid(-1500 x) is not saturated.
    let x = (seeded(shape.numel(), 9, -0.003, 0.003), shape.clone());
    assert_gpu_matches_cpu64("sdf_probability", &[], &[x], TOL);
    let x = (seeded(shape.numel(), 10, -1.0, 1.0), shape);
    assert_gpu_matches_cpu64("sdf_probability", &["k=3"], &[x], TOL);
}

#[test]
fn lines_longer_than_the_kernel_holds_are_an_error_naming_the_op() {
    let g = gpu();
    let long = MAX_LINE + 1;
    for (shape, axis) in [
        (Shape::from([long, 1, 2]), "along D"),
        (Shape::from([1, long, 2]), "along H"),
    ] {
        let x = g.tensor(&vec![1.0; shape.numel()], &shape).unwrap();
        let Err(err) = g.edt(&x, [1.0; 3]) else {
            panic!("edt of {shape} ran");
        };
        let err = err.to_string();
        assert!(err.starts_with("edt:") && err.contains(axis), "{err}");
    }
    // Along W any length works: the first pass needs no envelope arrays.
    let shape = Shape::from([1, 2, long]);
    let (m, _) = mask(&shape, 11, 0.9);
    assert_gpu_forward_matches_cpu64("edt", &[], &[(m, shape)], TOL);
}

#[test]
fn no_gradient_flows_through_edt_or_sdf_on_the_gpu() {
    let g = gpu();
    let shape = Shape::from([1, 1, 3, 4, 5]);
    let x = Var::from_f64(&g, &seeded_mask(&shape, 12, 0.5), &shape, true).unwrap();
    for (op, y) in [
        ("edt", x.edt([1.0; 3]).unwrap()),
        ("sdf", x.sdf([1.0; 3]).unwrap()),
    ] {
        match grad(&y.sum().unwrap(), &[&x], None, false) {
            Err(Error::NoGradient { op: o }) => assert_eq!(o, op),
            Err(e) => panic!("{op}: wrong error {e}"),
            Ok(_) => panic!("{op}: a gradient came out of a mask function"),
        }
    }
}
