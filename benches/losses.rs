//! The loss kernels at the LA training shape, logits and target [N, C, D, H, W] =
//! [2, 2, 112, 112, 80] (4.0M elements, 16 MiB each), in bytes/s as a fraction of the copy ceiling
//! measured in the same run. Every output is checked in full against Cpu64 before it is timed.
//! Bytes are what the op must move at least: every input element read once, every output element
//! written once. Timed: each primitive on its own, then the whole loss with its gradient through
//! the tape (the primitives plus the small ops on [N, 1, ...] or [3, C] tensors around them).

mod common;

use common::{Bench, Work};
use criterion::{criterion_group, criterion_main, Criterion};
use metaseg::gpu::Gpu;
use metaseg_autograd::{
    grad, Cpu64, DiceOptions, LossBackend, Reduction, Result, Shape, Tolerance, Var,
};

/// The gradient of a loss with respect to the logits, through the tape.
fn loss_gradient<B: LossBackend>(
    backend: &B,
    z: &B::Tensor,
    y: &B::Tensor,
    loss: impl Fn(&Var<B>, &Var<B>) -> metaseg_autograd::Result<Var<B>>,
) -> Result<B::Tensor> {
    let z = Var::parameter(backend, z.clone());
    let y = Var::constant(backend, y.clone());
    let l = loss(&z, &y)?;
    Ok(grad(&l, &[&z], None, false)?.remove(0).value().clone())
}

fn losses(c: &mut Criterion) {
    let bench = Bench::new(c);
    let gpu = &bench.gpu;
    let shape = Shape::from([2, 2, 112, 112, 80]);
    let label = "2x2x112x112x80";
    let n = shape.numel() as u64;
    let voxels = n / 2;
    let (z, z_ref) = bench.inputs(&shape, 1);
    let (y, y_ref) = bench.inputs(&shape, 2);
    let (g, g_ref) = bench.inputs(&shape.reduced(&[1]), 3);
    let (d_sums, d_sums_ref) = bench.inputs(&Shape::from([3, 2]), 4);
    let tol = Tolerance::F32_ACCUMULATED;

    bench.op(
        c,
        "softmax",
        label,
        Work::bytes(8 * n),
        Cpu64.softmax_channels(&z_ref, false),
        tol,
        || gpu.softmax_channels(&z, false),
    );
    bench.op(
        c,
        "cross_entropy per-voxel",
        label,
        Work::bytes(8 * n + 4 * voxels),
        Cpu64.cross_entropy_voxels(&z_ref, &y_ref),
        tol,
        || gpu.cross_entropy_voxels(&z, &y),
    );
    bench.op(
        c,
        "cross_entropy_backward",
        label,
        Work::bytes(12 * n + 4 * voxels),
        Cpu64.cross_entropy_backward(&z_ref, &y_ref, &g_ref),
        tol,
        || gpu.cross_entropy_backward(&z, &y, &g),
    );
    // The class sums run in two passes (the fused kernel, then the sum of its per-workgroup
    // partials); the time covers both.
    bench.op(
        c,
        "softmax_dice sums",
        label,
        Work::bytes(8 * n),
        Cpu64.softmax_dice_sums(&z_ref, &y_ref, true),
        tol,
        || gpu.softmax_dice_sums(&z, &y, true),
    );
    bench.op(
        c,
        "softmax_dice_backward",
        label,
        Work::bytes(12 * n),
        Cpu64.softmax_dice_backward(&z_ref, &y_ref, &d_sums_ref, true),
        tol,
        || gpu.softmax_dice_backward(&z, &y, &d_sums, true),
    );

    // Whole losses with their gradient: the compulsory traffic of the forward and of d logits.
    let ce = |z: &Var<Gpu>, y: &Var<Gpu>| z.cross_entropy(y, None, Reduction::Mean);
    let ce_ref = |z: &Var<Cpu64>, y: &Var<Cpu64>| z.cross_entropy(y, None, Reduction::Mean);
    bench.op(
        c,
        "cross_entropy mean, loss + d logits",
        label,
        Work::bytes(8 * n + 12 * n),
        loss_gradient(&Cpu64, &z_ref, &y_ref, ce_ref),
        tol,
        || loss_gradient(gpu, &z, &y, ce),
    );
    let options = DiceOptions::default();
    let sd = move |z: &Var<Gpu>, y: &Var<Gpu>| z.softmax_dice(y, options);
    let sd_ref = move |z: &Var<Cpu64>, y: &Var<Cpu64>| z.softmax_dice(y, options);
    bench.op(
        c,
        "softmax_dice, loss + d logits",
        label,
        Work::bytes(8 * n + 12 * n),
        loss_gradient(&Cpu64, &z_ref, &y_ref, sd_ref),
        tol,
        || loss_gradient(gpu, &z, &y, sd),
    );
}

criterion_group! {
    name = benches;
    config = common::config();
    targets = losses
}
criterion_main!(benches);
