//! The warp family at the LA patch size, an image [N, C, D, H, W] = [2, 1, 80, 112, 112] and its
//! one-hot labels [2, 2, 80, 112, 112]: the training step's augmentation (a 15 degree rotation
//! about each axis with scale 1.1) trilinear on the image, nearest on the labels (zoomed), and the
//! trilinear adjoint (the backward of a warp inside a loss, as MLB-Seg's views use it). Memory
//! bound: bytes are what the op must move at least (every input element read once, every output
//! element written once), as a fraction of the copy ceiling measured in the same run; the
//! trilinear forward reads 8 neighbours per output and the adjoint gathers over a box of about
//! 4^3 outputs per voxel, mostly from cache. Every output is checked in full against Cpu64 before
//! it is timed.

mod common;

use common::{Bench, Work};
use criterion::{criterion_group, criterion_main, Criterion};
use metaseg_autograd::{Cpu64, Interp, Shape, Tolerance, Warp, WarpBackend};

fn warp(c: &mut Criterion) {
    let bench = Bench::new(c);
    let gpu = &bench.gpu;
    let patch = [80, 112, 112];
    let angle = 15f64.to_radians();
    let w = Warp::rotate_scale(patch, [angle; 3], 1.1);
    // Nearest on labels as MLB-Seg's zoom-out view (p = -8) takes them: its sample points keep
    // well away from half-way points, where f32 and the f64 reference could round apart (a
    // generic rotation puts a few voxels per million within f32 rounding of one).
    let nearest = Warp::zoom(patch, -8.0).with_interp(Interp::Nearest);
    for (name, channels, warp) in [("warp trilinear", 1, &w), ("warp nearest", 2, &nearest)] {
        let shape = Shape::from([2, channels, 80, 112, 112]);
        let label = format!("2x{channels}x80x112x112");
        let (x, x_ref) = bench.inputs(&shape, 1);
        bench.op(
            c,
            name,
            &label,
            Work::bytes(8 * shape.numel() as u64),
            Cpu64.warp(&x_ref, warp),
            Tolerance::F32,
            || gpu.warp(&x, warp),
        );
    }
    let shape = Shape::from([2, 1, 80, 112, 112]);
    let (g, g_ref) = bench.inputs(&shape, 2);
    bench.op(
        c,
        "warp_adjoint trilinear",
        "2x1x80x112x112",
        Work::bytes(8 * shape.numel() as u64),
        Cpu64.warp_adjoint(&g_ref, &w),
        Tolerance::F32_ACCUMULATED,
        || gpu.warp_adjoint(&g, &w),
    );
}

criterion_group! {
    name = benches;
    config = common::config();
    targets = warp
}
criterion_main!(benches);
