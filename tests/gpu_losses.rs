//! The loss family on the GPU against the Cpu64 reference through the runner's table: forward
//! values, gradients and Hessian-vector products, on seeded inputs at odd sizes (not multiples of 4
//! or of the workgroup size), with soft targets and one-hot targets that leave a class empty, and a
//! softmax-Dice large enough to span several workgroups. Cpu64's derivatives are checked against
//! finite differences in autograd/tests/losses.rs, so agreement here carries that check to the
//! kernels.

mod common;

use common::{
    assert_gpu_matches_cpu64, assert_matches_cpu64_on, assert_split, derivatives, gpu, seeded,
    small_binding_gpu,
};
use metaseg::gpu::Gpu;
use metaseg_autograd::{
    Backend, Cpu64, DiceOptions, LossBackend, Reduction, Shape, Tolerance, Var,
};

/// f32 kernels against f64, including sums over a few thousand voxels.
const TOL: Tolerance = Tolerance::F32_ACCUMULATED;

/// [2, 3, 3, 5, 7]: 105 voxels per sample, 630 elements.
fn odd_shape() -> Shape {
    Shape::from([2, 3, 3, 5, 7])
}

/// [2, 3, 2, 5, 6]: 60 voxels per sample, a multiple of 4, so the kernels' aligned vec4 path runs.
fn aligned_shape() -> Shape {
    Shape::from([2, 3, 2, 5, 6])
}

/// The unaligned (gathering) and the aligned variants of every kernel.
fn shapes() -> [Shape; 2] {
    [odd_shape(), aligned_shape()]
}

fn input(seed: u64, shape: &Shape, lo: f64, hi: f64) -> (Vec<f64>, Shape) {
    (seeded(shape.numel(), seed, lo, hi), shape.clone())
}

/// One-hot over axis 1 (see `check::one_hot`), with its shape.
fn one_hot(shape: &Shape, seed: u64, empty: Option<usize>) -> (Vec<f64>, Shape) {
    (
        metaseg_autograd::check::one_hot(shape, seed, empty),
        shape.clone(),
    )
}

#[test]
fn softmax_and_log_softmax_match_the_reference() {
    for shape in [
        odd_shape(),
        aligned_shape(),
        Shape::from([3, 1, 2, 3, 5]),
        Shape::from([1, 17, 37]),
    ] {
        for op in ["softmax", "log_softmax"] {
            assert_gpu_matches_cpu64(op, &[], &[input(1, &shape, -4.0, 4.0)], TOL);
        }
    }
}

#[test]
fn cross_entropy_matches_the_reference_with_weight_and_every_reduction() {
    for s in shapes() {
        let w = input(2, &s.reduced(&[1]), 0.0, 2.0);
        for op in ["cross_entropy", "binary_cross_entropy"] {
            for reduction in ["reduction=none", "reduction=sum", "reduction=mean"] {
                let z = input(3, &s, -3.0, 3.0);
                assert_gpu_matches_cpu64(
                    op,
                    &[reduction],
                    &[z.clone(), input(4, &s, 0.0, 1.0)],
                    TOL,
                );
                let y = one_hot(&s, 5, Some(1));
                assert_gpu_matches_cpu64(op, &[reduction], &[z, y, w.clone()], TOL);
            }
        }
    }
}

#[test]
fn softmax_mse_matches_the_reference() {
    for s in shapes() {
        let (a, b) = (input(6, &s, -3.0, 3.0), input(7, &s, -3.0, 3.0));
        assert_gpu_matches_cpu64("softmax_mse", &[], &[a, b], TOL);
    }
}

#[test]
fn softmax_dice_matches_the_reference_on_small_and_strided_shapes() {
    for shape in shapes() {
        for settings in [
            &["squared=true"][..],
            &["squared=false"],
            &["include_background=false", "smooth=0.1"],
        ] {
            let z = input(8, &shape, -3.0, 3.0);
            assert_gpu_matches_cpu64(
                "softmax_dice",
                settings,
                &[z.clone(), input(9, &shape, 0.0, 1.0)],
                TOL,
            );
            let empty = one_hot(&shape, 10, Some(shape.dims()[1] - 1));
            assert_gpu_matches_cpu64("softmax_dice", settings, &[z, empty], TOL);
        }
    }
    // [1, 2, 8, 128, 130]: 133120 voxels, more than the 128 x 256 invocations x 4 voxels of the
    // sums kernel, so some invocations sum two quads and others one.
    let shape = Shape::from([1, 2, 8, 128, 130]);
    let z = input(8, &shape, -3.0, 3.0);
    let y = one_hot(&shape, 10, None);
    assert_gpu_matches_cpu64("softmax_dice", &[], &[z, y], TOL);
}

#[test]
fn the_fused_softmax_dice_backward_matches_the_reference_at_first_and_second_order() {
    for s in shapes() {
        for squared in [true, false] {
            let inputs = [
                input(20, &s, -3.0, 3.0),
                one_hot(&s, 21, Some(0)),
                input(22, &Shape::from([3, 3]), -1.0, 1.0),
            ];
            let f = |xs: &[Var<Cpu64>]| {
                xs[0]
                    .softmax_dice_backward(&xs[1], &xs[2], squared)
                    .unwrap()
            };
            let cpu = derivatives(&Cpu64, f, &inputs);
            let f = |xs: &[Var<Gpu>]| {
                xs[0]
                    .softmax_dice_backward(&xs[1], &xs[2], squared)
                    .unwrap()
            };
            let gpu = derivatives(&gpu(), f, &inputs);
            TOL.assert("softmax_dice_backward", &gpu.out, &cpu.out);
            for k in 0..3 {
                TOL.assert(&format!("gradient {k}"), &gpu.grads[k], &cpu.grads[k]);
                TOL.assert(&format!("H v {k}"), &gpu.hvps[k], &cpu.hvps[k]);
            }
        }
    }
}

#[test]
fn the_fused_cross_entropy_backward_matches_the_reference_at_first_and_second_order() {
    for s in shapes() {
        // The incoming gradient per voxel, and as one value for all voxels (a summed loss).
        for g_shape in [s.reduced(&[1]), Shape::from([1, 1, 1, 1, 1])] {
            let inputs = [
                input(23, &s, -3.0, 3.0),
                input(24, &s, 0.0, 1.0),
                input(25, &g_shape, -1.0, 1.0),
            ];
            let f = |xs: &[Var<Cpu64>]| xs[0].cross_entropy_backward(&xs[1], &xs[2]).unwrap();
            let cpu = derivatives(&Cpu64, f, &inputs);
            let f = |xs: &[Var<Gpu>]| xs[0].cross_entropy_backward(&xs[1], &xs[2]).unwrap();
            let gpu = derivatives(&gpu(), f, &inputs);
            TOL.assert("cross_entropy_backward", &gpu.out, &cpu.out);
            for k in 0..3 {
                TOL.assert(&format!("gradient {k}"), &gpu.grads[k], &cpu.grads[k]);
                TOL.assert(&format!("H v {k}"), &gpu.hvps[k], &cpu.hvps[k]);
            }
        }
    }
}

#[test]
fn sigmoid_dice_matches_the_reference() {
    let s = Shape::from([2, 1, 3, 5, 7]);
    for settings in [&["squared=true"][..], &["squared=false"]] {
        let z = input(11, &s, -3.0, 3.0);
        let y = one_hot(&Shape::from([2, 1, 3, 5, 7]), 12, None);
        assert_gpu_matches_cpu64("sigmoid_dice", settings, &[z.clone(), y], TOL);
        assert_gpu_matches_cpu64("sigmoid_dice", settings, &[z, input(13, &s, 0.0, 1.0)], TOL);
    }
}

#[test]
fn sharpen_entropy_and_ema_match_the_reference() {
    let s = odd_shape();
    let p = input(14, &s, 0.05, 0.95);
    assert_gpu_matches_cpu64(
        "sharpen",
        &["temperature=0.5"],
        std::slice::from_ref(&p),
        TOL,
    );
    assert_gpu_matches_cpu64("entropy", &[], &[p], TOL);
    // 70001 parameters: several workgroups and a partial last one.
    let flat = Shape::from([70_001]);
    let (t, st) = (input(15, &flat, -1.0, 1.0), input(16, &flat, -1.0, 1.0));
    assert_gpu_matches_cpu64("ema", &["decay=0.99"], &[t, st], Tolerance::F32);
}

#[test]
fn closed_forms_on_the_gpu() {
    let g = gpu();
    let s = odd_shape();
    let voxels = s.numel() / 3;
    // Equal logits: cross-entropy of a one-hot target is log C per voxel.
    let z = Var::from_f64(&g, &vec![0.3; s.numel()], &s, false).unwrap();
    let (y, _) = one_hot(&s, 17, None);
    let y = Var::from_f64(&g, &y, &s, false).unwrap();
    let ce = z.cross_entropy(&y, None, Reduction::None).unwrap();
    Tolerance::F32.assert(
        "ce uniform",
        &ce.to_f64().unwrap(),
        &vec![3f64.ln(); voxels],
    );
    // A one-hot prediction (logits 40 y) with itself: every dice is 1, the loss 0.
    let z40 = y.scale(40.0).unwrap();
    let loss = z40.softmax_dice(&y, DiceOptions::default()).unwrap();
    Tolerance::F32.assert("dice of y with y", &[loss.item().unwrap()], &[0.0]);
    // Extreme logits stay finite: log-softmax of (100, -100) and BCE at +-100.
    let x = g
        .tensor(&[100.0, -100.0, -100.0, 100.0], &Shape::from([2, 2]))
        .unwrap();
    let log_p = g.to_f64(&g.softmax_channels(&x, true).unwrap()).unwrap();
    Tolerance::F32.assert("log_softmax", &log_p, &[0.0, -200.0, -200.0, 0.0]);
    let t = g
        .tensor(&[1.0, 0.0, 0.0, 1.0], &Shape::from([2, 2]))
        .unwrap();
    let ce = g.to_f64(&g.cross_entropy_voxels(&x, &t).unwrap()).unwrap();
    Tolerance::F32.assert("ce at +-100", &ce, &[0.0, 0.0]);
    let bce = g
        .to_f64(&g.bce_with_logits_voxels(&x, &t).unwrap())
        .unwrap();
    Tolerance::F32.assert("bce at +-100", &bce, &[0.0, 0.0]);
}

#[test]
fn too_many_classes_and_empty_tensors() {
    let g = gpu();
    let s = Shape::from([1, 17, 3]);
    let z = g.tensor(&vec![0.0; 51], &s).unwrap();
    let Err(err) = g.softmax_dice_sums(&z, &z, true) else {
        panic!("17 classes accepted by the GPU softmax-Dice");
    };
    assert!(err.to_string().contains("at most 16"), "{err}");
    // No voxels: the sums are zero, as in the reference.
    let e = Shape::from([2, 3, 0]);
    let z = g.tensor(&[], &e).unwrap();
    let sums = g
        .to_f64(&g.softmax_dice_sums(&z, &z, true).unwrap())
        .unwrap();
    let reference = Cpu64
        .softmax_dice_sums(
            &Cpu64.tensor(&[], &e).unwrap(),
            &Cpu64.tensor(&[], &e).unwrap(),
            true,
        )
        .unwrap();
    assert_eq!(sums, *reference.data);
}

/// Issue 24 item 4: the per-voxel losses with the binding limit forced down to 8 KiB (2048
/// elements), on four samples of 630 elements that together exceed it: run in ranges of samples
/// (the Dice sums added up over them), against Cpu64.
#[test]
fn losses_with_a_small_binding_limit_match_the_reference() {
    let g = small_binding_gpu();
    let s = Shape::from([4, 2, 5, 7, 9]);
    let z = input(1, &s, -3.0, 3.0);
    let y = one_hot(&s, 5, None);
    let w = input(2, &s.reduced(&[1]), 0.0, 2.0);
    for op in ["softmax", "log_softmax"] {
        assert_matches_cpu64_on(&g, op, &[], std::slice::from_ref(&z), TOL);
    }
    for op in ["cross_entropy", "binary_cross_entropy"] {
        for reduction in ["reduction=none", "reduction=mean"] {
            let inputs = [z.clone(), y.clone(), w.clone()];
            assert_matches_cpu64_on(&g, op, &[reduction], &inputs, TOL);
        }
    }
    assert_matches_cpu64_on(&g, "softmax_dice", &[], &[z.clone(), y], TOL);
    // The mean teacher's update over a flat store of 2520 elements, in ranges of elements.
    let flat = Shape::from([s.numel()]);
    let (teacher, student) = ((z.0.clone(), flat.clone()), input(3, &flat, -1.0, 1.0));
    assert_matches_cpu64_on(&g, "ema", &["decay=0.99"], &[teacher, student], TOL);
    assert_split(
        &g,
        &[
            "softmax_channels",
            "cross_entropy",
            "binary_cross_entropy",
            "softmax_dice",
            "ema",
        ],
    );
}
