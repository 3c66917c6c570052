//! The layers of V-Net and U-Net at a realistic activation, [N, C, D, H, W] = [2, 16, 64, 64, 64]
//! (8.4M elements, 32 MiB): max and average pooling (kernel 2, stride 2) forward and backward,
//! nearest and trilinear up-sampling (scale 2, from 2 x 16 x 32^3) forward and backward, and batch
//! norm in training mode (composed of elementwise ops and per-channel sums). All are memory bound:
//! bytes are what the op must move at least (each input element read once, each output element
//! written once), as a fraction of the copy ceiling measured in the same run. Every output is
//! checked in full against Cpu64 before it is timed.

mod common;

use common::{Bench, Work};
use criterion::{criterion_group, criterion_main, Criterion};
use metaseg_autograd::{
    no_grad, Cpu64, LayerBackend, Result, Shape, Tolerance, Upsample, Var, Window3d,
};

fn layers(c: &mut Criterion) {
    let bench = Bench::new(c);
    let gpu = &bench.gpu;
    let full = Shape::from([2, 16, 64, 64, 64]);
    let half = Shape::from([2, 16, 32, 32, 32]);
    let (big, small) = (full.numel() as u64, half.numel() as u64);
    let (x, x_ref) = bench.inputs(&full, 1);
    let (g, g_ref) = bench.inputs(&half, 2);
    let window = Window3d {
        kernel: [2; 3],
        stride: [2; 3],
    };
    let label = "2x16x64^3 k2 s2";
    // Forward: read the full tensor, write the pooled one; backward the other way round
    // (max pool's backward also reads x to find the argmax).
    let down = Work::bytes(4 * (big + small));
    let max_back = Work::bytes(4 * (2 * big + small));
    let tol = Tolerance::F32;
    bench.op(
        c,
        "max_pool3d",
        label,
        down,
        Cpu64.max_pool3d(&x_ref, window),
        tol,
        || gpu.max_pool3d(&x, window),
    );
    let expected = Cpu64.max_pool3d_scatter(&x_ref, &g_ref, window);
    bench.op(
        c,
        "max_pool3d backward",
        label,
        max_back,
        expected,
        tol,
        || gpu.max_pool3d_scatter(&x, &g, window),
    );
    bench.op(
        c,
        "avg_pool3d",
        label,
        down,
        Cpu64.avg_pool3d(&x_ref, window),
        tol,
        || gpu.avg_pool3d(&x, window),
    );
    let expected = Cpu64.avg_pool3d_backward(&g_ref, window, &full);
    bench.op(c, "avg_pool3d backward", label, down, expected, tol, || {
        gpu.avg_pool3d_backward(&g, window, &full)
    });

    let label = "2x16x32^3 -> 64^3";
    for mode in [Upsample::Nearest, Upsample::Trilinear] {
        let expected = Cpu64.upsample3d(&g_ref, mode, [2; 3]);
        bench.op(c, mode.name(), label, down, expected, tol, || {
            gpu.upsample3d(&g, mode, [2; 3])
        });
        let name = format!("{} backward", mode.name());
        let expected = Cpu64.upsample3d_backward(&x_ref, mode, [2; 3], &half);
        bench.op(c, &name, label, down, expected, tol, || {
            gpu.upsample3d_backward(&x, mode, [2; 3], &half)
        });
    }

    // Batch norm, training statistics: at least one read of x and one write of y.
    let channels = Shape::from([16]);
    let (gamma, gamma_ref) = bench.inputs(&channels, 3);
    let (beta, beta_ref) = bench.inputs(&channels, 4);
    let eps = 1e-5;
    let cpu = |t| Var::constant(&Cpu64, t);
    let expected = batch_norm(&cpu(x_ref), &cpu(gamma_ref), &cpu(beta_ref), eps);
    let on_gpu = |t| Var::constant(gpu, t);
    let (xv, gv, bv) = (on_gpu(x), on_gpu(gamma), on_gpu(beta));
    bench.op(
        c,
        "batch_norm3d train",
        "2x16x64^3",
        Work::bytes(8 * big),
        expected,
        Tolerance::F32_ACCUMULATED,
        || batch_norm(&xv, &gv, &bv, eps),
    );
}

/// The training-mode output of batch norm, not recorded.
fn batch_norm<B: LayerBackend>(
    x: &Var<B>,
    gamma: &Var<B>,
    beta: &Var<B>,
    eps: f64,
) -> Result<B::Tensor> {
    no_grad(|| Ok(x.batch_norm3d_train(gamma, beta, eps)?.0.value().clone()))
}

criterion_group! {
    name = benches;
    config = common::config();
    targets = layers
}
criterion_main!(benches);
