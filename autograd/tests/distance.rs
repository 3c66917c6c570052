//! The distance family on the reference backend: the EDT against brute force over all voxel pairs
//! (anisotropic spacing, odd sizes, several volumes), the SDF against its definition evaluated on
//! brute-force distances and against its properties (negative inside, positive outside, in
//! [-1, 1], 0 on the boundary, the degenerate masks), the typed NoGradient error, and the
//! SDF-to-probability map's value and derivatives.

use metaseg_autograd::check::{assert_gradients, edt_brute_force, seeded, seeded_mask as mask};
use metaseg_autograd::{
    grad, Backend, Cpu64, CpuTensor, DistanceBackend, Error, Shape, Tolerance, Var,
};

const SPACING: [f64; 3] = [1.7, 0.6, 1.1];

/// The (d, h, w) of voxel i of a (D, H, W) volume.
fn coords(i: usize, [_, h, w]: [usize; 3]) -> [usize; 3] {
    [i / (h * w), i / w % h, i % w]
}

fn cpu(values: &[f64], shape: &Shape) -> CpuTensor {
    Cpu64.tensor(values, shape).unwrap()
}

fn edt(values: &[f64], shape: &Shape, spacing: [f64; 3]) -> Vec<f64> {
    Cpu64
        .edt(&cpu(values, shape), spacing)
        .unwrap()
        .data
        .to_vec()
}

fn sdf(values: &[f64], shape: &Shape, spacing: [f64; 3]) -> Vec<f64> {
    Cpu64
        .sdf(&cpu(values, shape), spacing)
        .unwrap()
        .data
        .to_vec()
}

#[test]
fn edt_matches_brute_force_with_anisotropic_spacing() {
    // Several volumes of odd sizes; dense foreground so distances span several voxels.
    let shape = Shape::from([2, 3, 5, 7, 9]);
    let dims = [5, 7, 9];
    for (seed, density) in [(1, 0.5), (2, 0.85), (3, 0.97)] {
        let m = mask(&shape, seed, density);
        for spacing in [[1.0; 3], SPACING] {
            let expected: Vec<f64> = m
                .chunks(5 * 7 * 9)
                .flat_map(|v| edt_brute_force(v, dims, spacing, false))
                .collect();
            let what = format!("edt, density {density}, spacing {spacing:?}");
            Tolerance::F64.assert(&what, &edt(&m, &shape, spacing), &expected);
        }
    }
}

#[test]
fn edt_of_lines_planes_and_single_voxels() {
    // Degenerate volumes: one axis or two of length 1, a single voxel.
    for dims in [
        [1, 1, 13],
        [1, 11, 1],
        [9, 1, 1],
        [1, 6, 7],
        [5, 1, 4],
        [1, 1, 1],
    ] {
        let shape = Shape::from(dims);
        let m = mask(&shape, 4, 0.7);
        let expected = edt_brute_force(&m, dims, SPACING, false);
        // A volume without background is +infinity, which brute force also gives (min of none).
        let actual = edt(&m, &shape, SPACING);
        assert_eq!(
            actual.iter().map(|v| v.is_infinite()).collect::<Vec<_>>(),
            expected.iter().map(|v| v.is_infinite()).collect::<Vec<_>>(),
            "{dims:?}"
        );
        let finite = |x: &[f64]| {
            x.iter()
                .map(|v| if v.is_finite() { *v } else { 0.0 })
                .collect::<Vec<_>>()
        };
        Tolerance::F64.assert(
            &format!("edt {dims:?}"),
            &finite(&actual),
            &finite(&expected),
        );
    }
}

#[test]
fn edt_of_a_single_background_voxel_is_the_distance_to_it() {
    // Closed form: with background only at (0, 0, 0), voxel (d, h, w) is at
    // sqrt((1.7 d)^2 + (0.6 h)^2 + (1.1 w)^2).
    let dims = [4, 5, 6];
    let shape = Shape::from(dims);
    let mut m = vec![1.0; shape.numel()];
    m[0] = 0.0;
    let expected: Vec<f64> = (0..shape.numel())
        .map(|i| {
            let c = coords(i, dims);
            (0..3)
                .map(|k| (SPACING[k] * c[k] as f64).powi(2))
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    Tolerance::F64.assert("one background voxel", &edt(&m, &shape, SPACING), &expected);
}

#[test]
fn edt_of_empty_and_full_volumes() {
    let shape = Shape::from([2, 3, 4, 5]);
    let per_volume = 3 * 4 * 5;
    // Volume 0 empty, volume 1 all foreground: 0 and +infinity, each volume on its own.
    let mut m = vec![0.0; per_volume];
    m.extend(vec![-2.5; per_volume]); // any nonzero value is foreground
    let out = edt(&m, &shape, SPACING);
    assert!(out[..per_volume].iter().all(|&v| v == 0.0));
    assert!(out[per_volume..].iter().all(|&v| v == f64::INFINITY));
}

#[test]
fn bad_shapes_and_spacings_are_errors_naming_the_op() {
    let x = cpu(&[1.0; 4], &Shape::from([2, 2]));
    let err = Cpu64.edt(&x, [1.0; 3]).unwrap_err().to_string();
    assert!(
        err.starts_with("edt:") && err.contains("rank >= 3"),
        "{err}"
    );
    let x = cpu(&[1.0; 8], &Shape::from([1, 2, 2, 2, 1]));
    let err = Cpu64.sdf(&x, [1.0; 3]).unwrap_err().to_string();
    assert!(
        err.starts_with("sdf:") && err.contains("[N, 1, D, H, W]"),
        "{err}"
    );
    let x = cpu(&[1.0; 8], &Shape::from([2, 2, 2]));
    for bad in [
        [0.0, 1.0, 1.0],
        [1.0, -1.0, 1.0],
        [1.0, 1.0, f64::NAN],
        [f64::INFINITY, 1.0, 1.0],
    ] {
        let err = Cpu64.edt(&x, bad).unwrap_err().to_string();
        assert!(
            err.contains("spacing must be three positive finite"),
            "{err}"
        );
    }
}

/// The SDF's definition on brute-force distances, written out independently of the library.
fn sdf_by_definition(m: &[f64], dims: [usize; 3], spacing: [f64; 3]) -> Vec<f64> {
    let pos = edt_brute_force(m, dims, spacing, false);
    let neg = edt_brute_force(m, dims, spacing, true);
    let (pmin, pmax) = min_max(&pos);
    let (nmin, nmax) = min_max(&neg);
    (0..m.len())
        .map(|i| {
            if boundary(m, dims, i) {
                0.0
            } else {
                (neg[i] - nmin) / (nmax - nmin) - (pos[i] - pmin) / (pmax - pmin)
            }
        })
        .collect()
}

fn min_max(x: &[f64]) -> (f64, f64) {
    let min = x.iter().copied().fold(f64::INFINITY, f64::min);
    let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

/// Foreground with a background face neighbour inside the volume, by trying all six offsets.
fn boundary(m: &[f64], dims: [usize; 3], i: usize) -> bool {
    let c = coords(i, dims).map(|v| v as i64);
    let at = |d: i64, h: i64, w: i64| {
        let inside = d >= 0 && h >= 0 && w >= 0;
        let inside = inside && d < dims[0] as i64 && h < dims[1] as i64 && w < dims[2] as i64;
        inside.then(|| m[((d as usize) * dims[1] + h as usize) * dims[2] + w as usize])
    };
    let offsets = [
        [-1, 0, 0],
        [1, 0, 0],
        [0, -1, 0],
        [0, 1, 0],
        [0, 0, -1],
        [0, 0, 1],
    ];
    m[i] != 0.0
        && offsets
            .iter()
            .any(|o| at(c[0] + o[0], c[1] + o[1], c[2] + o[2]) == Some(0.0))
}

#[test]
fn sdf_matches_its_definition_on_brute_force_distances() {
    let dims = [5, 7, 9];
    let shape = Shape::from([2, 1, 5, 7, 9]);
    for (seed, density) in [(5, 0.6), (6, 0.9)] {
        let m = mask(&shape, seed, density);
        let expected: Vec<f64> = m
            .chunks(5 * 7 * 9)
            .flat_map(|v| sdf_by_definition(v, dims, SPACING))
            .collect();
        Tolerance::F64.assert("sdf", &sdf(&m, &shape, SPACING), &expected);
    }
}

#[test]
fn sdf_is_negative_inside_positive_outside_zero_on_the_boundary_within_minus_one_one() {
    // A ball of radius 3 in a 9 x 11 x 13 volume: it has interior voxels, boundary and outside.
    let dims = [9, 11, 13];
    let shape = Shape::from([1, 1, 9, 11, 13]);
    let m: Vec<f64> = (0..shape.numel())
        .map(|i| {
            let c = coords(i, dims);
            let r2: f64 = (0..3)
                .map(|k| (c[k] as f64 - (dims[k] / 2) as f64).powi(2))
                .sum();
            f64::from(u8::from(r2 <= 9.0))
        })
        .collect();
    let s = sdf(&m, &shape, [1.0; 3]);
    for (i, &v) in s.iter().enumerate() {
        assert!((-1.0..=1.0).contains(&v), "voxel {i}: {v} outside [-1, 1]");
        match (m[i] != 0.0, boundary(&m, dims, i)) {
            (true, true) => assert_eq!(v, 0.0, "boundary voxel {i}"),
            (true, false) => assert!(v < 0.0, "interior voxel {i}: {v}"),
            (false, _) => assert!(v > 0.0, "outside voxel {i}: {v}"),
        }
    }
    // The extremes are attained: the centre (deepest inside) is -1, the farthest corner is 1.
    let (min, max) = min_max(&s);
    assert_eq!((min, max), (-1.0, 1.0));
    let centre = (4 * 11 + 5) * 13 + 6;
    assert_eq!(s[centre], -1.0);
}

#[test]
fn sdf_of_empty_and_full_samples() {
    // Sample 0 empty (all 0), sample 1 without background (all -1), sample 2 ordinary.
    let dims = [3, 5, 7];
    let per_sample = 3 * 5 * 7;
    let shape = Shape::from([3, 1, 3, 5, 7]);
    let mut m = vec![0.0; per_sample];
    m.extend(vec![1.0; per_sample]);
    let ordinary = mask(&Shape::from(dims), 7, 0.5);
    m.extend(&ordinary);
    let s = sdf(&m, &shape, SPACING);
    assert!(s[..per_sample].iter().all(|&v| v == 0.0));
    assert!(s[per_sample..2 * per_sample].iter().all(|&v| v == -1.0));
    let expected = sdf_by_definition(&ordinary, dims, SPACING);
    Tolerance::F64.assert("ordinary sample", &s[2 * per_sample..], &expected);
}

#[test]
fn asking_for_a_gradient_through_edt_or_sdf_is_the_typed_no_gradient_error() {
    let shape = Shape::from([1, 1, 3, 4, 5]);
    let x = Var::from_f64(&Cpu64, &mask(&shape, 8, 0.5), &shape, true).unwrap();
    for (op, y) in [
        ("edt", x.edt(SPACING).unwrap()),
        ("sdf", x.sdf(SPACING).unwrap()),
    ] {
        let loss = y.sum().unwrap();
        match grad(&loss, &[&x], None, false) {
            Err(Error::NoGradient { op: o }) => assert_eq!(o, op),
            Err(e) => panic!("{op}: wrong error {e}"),
            Ok(_) => panic!("{op}: a gradient came out of a mask function"),
        }
    }
}

#[test]
fn sdf_probability_is_sigmoid_of_minus_k_x_with_its_derivatives() {
    // Closed forms: 1/2 at x = 0; sigmoid(-k x) = 1 / (1 + exp(k x)) elsewhere.
    let xs = [0.0, -0.002, 0.001, 0.5, -1.0];
    let x = Var::from_f64(&Cpu64, &xs, &Shape::from([5]), false).unwrap();
    let p = x.sdf_probability(1500.0).unwrap().to_f64().unwrap();
    let expected: Vec<f64> = xs
        .iter()
        .map(|x| 1.0 / (1.0 + (1500.0 * x).exp()))
        .collect();
    Tolerance::F64.assert("sigmoid(-k x)", &p, &expected);
    assert_eq!(p[0], 0.5);
    // First and second derivatives against finite differences (small k keeps them well scaled).
    let shape = Shape::from([2, 1, 3]);
    let inputs = [(seeded(6, 9, -1.0, 1.0), shape)];
    assert_gradients(
        "sdf_probability",
        &|x| x[0].sdf_probability(3.0),
        &inputs,
        &seeded(6, 10, -1.0, 1.0),
        &[seeded(6, 11, -1.0, 1.0)],
        Tolerance::FINITE_DIFFERENCE,
    );
}
