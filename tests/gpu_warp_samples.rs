//! One warp per sample (`Var::warp_samples`, MLB-Seg's views) on the GPU against Cpu64: value,
//! gradient and Hessian-vector product of the op and of its adjoint, on odd sizes with an identity,
//! a zoom-in, a nearest zoom-out and a flip in one batch. Cpu64 is checked against each sample's
//! own warp and against finite differences in autograd/tests/warp_samples.rs.

mod common;

use common::{derivatives, gpu, seeded};
use metaseg_autograd::{Cpu64, Interp, Shape, Tolerance, Var, Warp, WarpBackend};

const SIZE: [usize; 3] = [5, 7, 9];

fn warps() -> Vec<Warp> {
    vec![
        Warp::identity(SIZE),
        Warp::zoom(SIZE, 2.0),
        Warp::zoom(SIZE, -1.5).with_interp(Interp::Nearest),
        Warp::flip(SIZE, 1),
    ]
}

/// The op (or its adjoint) squared, so the Hessian-vector product runs through the backward's
/// own backward.
fn squared<B: WarpBackend>(x: &Var<B>, ws: &[Warp], adjoint: bool) -> Var<B> {
    let y = if adjoint {
        x.warp_samples_adjoint(ws)
    } else {
        x.warp_samples(ws)
    };
    y.unwrap().square().unwrap()
}

#[test]
fn both_directions_match_the_reference() {
    let s = Shape::from([4, 3, SIZE[0], SIZE[1], SIZE[2]]);
    let inputs = [(seeded(s.numel(), 5, -1.0, 1.0), s)];
    let ws = warps();
    for adjoint in [false, true] {
        let cpu = derivatives(&Cpu64, |xs| squared(&xs[0], &ws, adjoint), &inputs);
        let gpu = derivatives(&gpu(), |xs| squared(&xs[0], &ws, adjoint), &inputs);
        let what = if adjoint {
            "warp_samples_adjoint"
        } else {
            "warp_samples"
        };
        let tol = Tolerance::F32_ACCUMULATED;
        tol.assert(&format!("{what} forward"), &gpu.out, &cpu.out);
        tol.assert(&format!("{what} gradient"), &gpu.grads[0], &cpu.grads[0]);
        tol.assert(&format!("{what} H v"), &gpu.hvps[0], &cpu.hvps[0]);
    }
}
