//! Memory-bound kernels (bytes/s) on a realistic activation, [N, C, D, H, W] = [2, 16, 64, 64, 64]
//! (8.4M elements, 32 MiB), each as a fraction of the copy ceiling measured in the same run. Every
//! output is checked in full against Cpu64 before it is timed. Bytes are what the op must move at
//! least: every input element read once and every output element written once.

mod common;

use common::{Bench, Work};
use criterion::{criterion_group, criterion_main, Criterion};
use metaseg_autograd::{Backend, BinaryOp, Cpu64, LayerBackend, Shape, Tolerance, UnaryOp};

fn elementwise(c: &mut Criterion) {
    let bench = Bench::new(c);
    let gpu = &bench.gpu;
    let shape = Shape::from([2, 16, 64, 64, 64]);
    let label = "2x16x64^3";
    let n = shape.numel() as u64;
    let (x, x_ref) = bench.inputs(&shape, 1);
    let (y, y_ref) = bench.inputs(&shape, 2);
    let (bias, bias_ref) = bench.inputs(&Shape::from([1, 16, 1, 1, 1]), 3);

    let exp = UnaryOp::Exp;
    bench.op(
        c,
        "exp",
        label,
        Work::bytes(8 * n),
        Cpu64.unary(exp, &x_ref),
        Tolerance::F32,
        || gpu.unary(exp, &x),
    );

    let add = BinaryOp::Add;
    let expected = Cpu64.binary(add, &x_ref, &y_ref);
    bench.op(
        c,
        "add same-shape",
        label,
        Work::bytes(12 * n),
        expected,
        Tolerance::F32,
        || gpu.binary(add, &x, &y),
    );

    // The per-channel bias of a convolution: [N, C, D, H, W] + [1, C, 1, 1, 1].
    let expected = Cpu64.binary(add, &x_ref, &bias_ref);
    let work = Work::bytes(8 * n + 4 * 16);
    bench.op(
        c,
        "add per-channel",
        label,
        work,
        expected,
        Tolerance::F32,
        || gpu.binary(add, &x, &bias),
    );

    // The per-channel value repeated over the volume (a bias gradient's adjoint, broadcast_to).
    let expected = Cpu64.broadcast_to(&bias_ref, &shape);
    bench.op(
        c,
        "broadcast per-channel",
        label,
        Work::bytes(4 * n + 4 * 16),
        expected,
        Tolerance::F32,
        || gpu.broadcast_to(&bias, &shape),
    );

    // x a + b per channel (batch norm's apply, channel dropout): channel_affine.wgsl.
    let (scale, scale_ref) = bench.inputs(&Shape::from([1, 16, 1, 1, 1]), 4);
    let expected = Cpu64.channel_affine(&x_ref, &scale_ref, &bias_ref);
    bench.op(
        c,
        "channel_affine",
        label,
        Work::bytes(8 * n + 8 * 16),
        expected,
        Tolerance::F32,
        || gpu.channel_affine(&x, &scale, &bias),
    );

    // Per channel, the sums of x y and of y over batch and volume (batch norm's moments and
    // backward): channel_dots reads both tensors once.
    let expected = Cpu64.channel_dots(&x_ref, &y_ref);
    bench.op(
        c,
        "channel_dots",
        label,
        Work::bytes(8 * n + 8 * 16),
        expected,
        Tolerance::F32_ACCUMULATED,
        || gpu.channel_dots(&x, &y),
    );

    // Sums run in several passes (chunks, then their partial sums); the time covers all of them.
    let all = [0, 1, 2, 3, 4];
    let expected = Cpu64.sum_axes(&x_ref, &all);
    let work = Work::bytes(4 * n + 4);
    bench.op(
        c,
        "sum all",
        label,
        work,
        expected,
        Tolerance::F32_ACCUMULATED,
        || gpu.sum_axes(&x, &all),
    );

    // Row sums: each (sample, channel)'s volume, axes (2, 3, 4) (instance norm's statistics).
    let rows = [2, 3, 4];
    let expected = Cpu64.sum_axes(&x_ref, &rows);
    bench.op(
        c,
        "sum rows",
        label,
        Work::bytes(4 * n + 4 * 32),
        expected,
        Tolerance::F32_ACCUMULATED,
        || gpu.sum_axes(&x, &rows),
    );

    // The per-channel sum of a bias gradient or of batch statistics: axes (0, 2, 3, 4).
    let channel = [0, 2, 3, 4];
    let expected = Cpu64.sum_axes(&x_ref, &channel);
    let work = Work::bytes(4 * n + 4 * 16);
    bench.op(
        c,
        "sum per-channel",
        label,
        work,
        expected,
        Tolerance::F32_ACCUMULATED,
        || gpu.sum_axes(&x, &channel),
    );
}

criterion_group! {
    name = benches;
    config = common::config();
    targets = elementwise
}
criterion_main!(benches);
