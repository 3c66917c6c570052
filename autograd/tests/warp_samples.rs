//! One warp per sample (`Var::warp_samples`) on the reference backend: each sample equals its own
//! warp exactly, the adjoint identity, gradients and second order against central differences,
//! forward mode, and the errors. The GPU against Cpu64: tests/gpu_warp_samples.rs.

use metaseg_autograd::check::{assert_gradients, assert_jvp, seeded};
use metaseg_autograd::{Cpu64, Interp, Shape, Tolerance, Var, Warp};

const SIZE: [usize; 3] = [3, 6, 5];

/// A batch of four samples: the identity, a zoom-in, a zoom-out (nearest) and a flip.
fn warps() -> Vec<Warp> {
    vec![
        Warp::identity(SIZE),
        Warp::zoom(SIZE, 1.5),
        Warp::zoom(SIZE, -1.0).with_interp(Interp::Nearest),
        Warp::flip(SIZE, 2),
    ]
}

fn batch(seed: u64) -> (Vec<f64>, Shape) {
    let s = Shape::from([4, 2, SIZE[0], SIZE[1], SIZE[2]]);
    (seeded(s.numel(), seed, -1.0, 1.0), s)
}

fn var(values: &[f64], s: &Shape) -> Var<Cpu64> {
    Var::from_f64(&Cpu64, values, s, true).unwrap()
}

/// Each sample through its warp alone, joined.
fn one_by_one(x: &[f64], warps: &[Warp], adjoint: bool) -> Vec<f64> {
    let per = x.len() / warps.len();
    let sample = Shape::from([1, 2, SIZE[0], SIZE[1], SIZE[2]]);
    let mut out = Vec::new();
    for (i, w) in warps.iter().enumerate() {
        let v = var(&x[i * per..(i + 1) * per], &sample);
        let y = if adjoint {
            v.warp_adjoint(w)
        } else {
            v.warp(w)
        };
        out.extend(y.unwrap().to_f64().unwrap());
    }
    out
}

#[test]
fn each_sample_is_its_own_warp_exactly() {
    let (x, s) = batch(1);
    let ws = warps();
    let forward = var(&x, &s).warp_samples(&ws).unwrap().to_f64().unwrap();
    assert_eq!(forward, one_by_one(&x, &ws, false));
    let adjoint = var(&x, &s).warp_samples_adjoint(&ws).unwrap();
    assert_eq!(adjoint.to_f64().unwrap(), one_by_one(&x, &ws, true));
    // The identity's sample is copied as it is.
    let per = x.len() / 4;
    assert_eq!(forward[..per], x[..per]);
}

#[test]
fn the_adjoint_is_the_transpose() {
    let (x, s) = batch(2);
    let (g, _) = batch(3);
    let ws = warps();
    let wx = var(&x, &s).warp_samples(&ws).unwrap().to_f64().unwrap();
    let wt_g = var(&g, &s).warp_samples_adjoint(&ws).unwrap();
    let wt_g = wt_g.to_f64().unwrap();
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(a, b)| a * b).sum::<f64>();
    Tolerance::F64.assert("<W x, g> = <x, W^T g>", &[dot(&wx, &g)], &[dot(&x, &wt_g)]);
}

#[test]
fn gradients_second_order_and_forward_mode_match_finite_differences() {
    let ws = warps();
    // Squared, so the second derivative runs through the backward's own backward.
    let forward = |x: &[Var<Cpu64>]| x[0].warp_samples(&ws)?.square();
    let adjoint = |x: &[Var<Cpu64>]| x[0].warp_samples_adjoint(&ws)?.square();
    let cases: [(&str, &metaseg_autograd::check::CpuFn); 2] = [
        ("warp_samples", &forward),
        ("warp_samples_adjoint", &adjoint),
    ];
    for (what, f) in cases {
        let inputs = vec![batch(6)];
        let weights = batch(7).0;
        let direction = vec![batch(8).0];
        let tol = Tolerance::FINITE_DIFFERENCE;
        assert_gradients(what, f, &inputs, &weights, &direction, tol);
        assert_jvp(what, f, &inputs, &direction, tol);
    }
}

#[test]
fn a_warp_count_other_than_the_batch_is_an_error() {
    let (x, s) = batch(4);
    let three = &warps()[..3];
    assert!(var(&x, &s).warp_samples(three).is_err());
    assert!(var(&x, &s).warp_samples_adjoint(&[]).is_err());
}
