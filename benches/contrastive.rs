//! Dense InfoNCE at IDEAL's pre-training scale on a small patch: queries and keys
//! [N, E, D, H, W] = [2, 32, 16, 16, 16], so M = 8192 locations and an M x M similarity matrix of
//! 268 MB in f32 that the kernels never store. Reported in FLOP/s as a fraction of the FMA ceiling
//! measured in the same run, counting 2 E FLOP per similarity (the dot product) and, in the
//! backward, 2 E more per similarity for the weighted sum, in each of its two passes. Every output
//! is checked in full against Cpu64 before it is timed (the reference takes a while: it loops over
//! all 67M pairs in f64). Before timing, the buffer pool's peak during one whole loss + gradient
//! is printed next to the size of the matrix: the proof that it is never whole.

mod common;

use common::{Bench, Work};
use criterion::{criterion_group, criterion_main, Criterion};
use metaseg::gpu::Gpu;
use metaseg_autograd::{grad, Backend, ContrastiveBackend, Cpu64, Result, Shape, Tolerance, Var};

const TAU: f64 = 0.1;

/// The gradient of the dense InfoNCE loss with respect to the queries, through the tape.
fn loss_gradient<B: ContrastiveBackend>(
    backend: &B,
    q: &B::Tensor,
    k: &B::Tensor,
) -> Result<B::Tensor> {
    let q = Var::parameter(backend, q.clone());
    let k = Var::parameter(backend, k.clone());
    let loss = q.dense_infonce(&k, TAU)?;
    Ok(grad(&loss, &[&q, &k], None, false)?
        .remove(0)
        .value()
        .clone())
}

/// Normalised along the channels, as the loss feeds the primitive.
fn normalized<B: Backend>(backend: &B, x: &B::Tensor) -> B::Tensor {
    Var::constant(backend, x.clone())
        .l2_normalize(1)
        .expect("normalise")
        .value()
        .clone()
}

/// Prints the pool's peak bytes during one loss + gradient against the matrix it would need.
fn print_peak_memory(
    gpu: &Gpu,
    q: &<Gpu as Backend>::Tensor,
    k: &<Gpu as Backend>::Tensor,
    m: usize,
) {
    let ctx = gpu.context();
    ctx.synchronize().expect("device");
    let before = ctx.pool_stats().in_use_bytes;
    ctx.reset_pool_peak();
    let d_q = loss_gradient(gpu, q, k).expect("dense_infonce gradient");
    gpu.to_f64(&d_q).expect("read back");
    let peak = ctx.pool_stats().peak_bytes - before;
    let matrix = 4 * m * m;
    println!(
        "dense_infonce loss + gradients: buffer pool peak {:.2} MB above the inputs, against \
         {:.1} MB for the M x M similarity matrix (M = {m}); ratio {:.4}",
        peak as f64 / 1e6,
        matrix as f64 / 1e6,
        peak as f64 / matrix as f64
    );
}

fn contrastive(c: &mut Criterion) {
    let bench = Bench::new(c);
    let gpu = &bench.gpu;
    let shape = Shape::from([2, 32, 16, 16, 16]);
    let label = "2x32x16^3";
    let (e, m) = (32u64, 2 * 16 * 16 * 16u64);
    let (q, q_ref) = bench.inputs(&shape, 1);
    let (k, k_ref) = bench.inputs(&shape, 2);
    let (qn, qn_ref) = (normalized(gpu, &q), normalized(&Cpu64, &q_ref));
    let (kn, kn_ref) = (normalized(gpu, &k), normalized(&Cpu64, &k_ref));
    let (g, g_ref) = bench.inputs(&shape.reduced(&[1]), 3);
    let tol = Tolerance::F32_ACCUMULATED;
    print_peak_memory(gpu, &q, &k, m as usize);

    let lse_ref = Cpu64
        .infonce_logsumexp(&qn_ref, &kn_ref, TAU)
        .expect("reference forward");
    let lse = gpu.infonce_logsumexp(&qn, &kn, TAU).expect("forward");
    bench.op(
        c,
        "infonce_logsumexp",
        label,
        Work {
            bytes: 0,
            flop: 2 * e * m * m,
        },
        Ok(lse_ref.clone()),
        tol,
        || gpu.infonce_logsumexp(&qn, &kn, TAU),
    );

    // Both passes of the backward; d qn checked here, d kn by the timed launch's own check.
    let backward_ref = Cpu64.infonce_logsumexp_backward(&qn_ref, &kn_ref, &lse_ref, &g_ref, TAU);
    let (d_q_ref, d_k_ref) = backward_ref.expect("reference backward");
    let backward = || gpu.infonce_logsumexp_backward(&qn, &kn, &lse, &g, TAU);
    bench.verify(
        "infonce_logsumexp_backward d qn",
        backward().map(|d| d.0),
        Ok(d_q_ref),
        tol,
    );
    bench.op(
        c,
        "infonce_logsumexp_backward",
        label,
        Work {
            bytes: 0,
            flop: 2 * 4 * e * m * m,
        },
        Ok(d_k_ref),
        tol,
        || backward().map(|d| d.1),
    );

    // The whole loss with its gradient: normalisation, both primitives and the small ops.
    bench.op(
        c,
        "dense_infonce, loss + d q",
        label,
        Work {
            bytes: 0,
            flop: 2 * 5 * e * m * m,
        },
        loss_gradient(&Cpu64, &q_ref, &k_ref),
        tol,
        || loss_gradient(gpu, &q, &k),
    );
}

criterion_group! {
    name = benches;
    config = common::config();
    targets = contrastive
}
criterion_main!(benches);
