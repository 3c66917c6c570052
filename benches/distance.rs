//! The distance family at the DTML patch size, a mask [N, 1, D, H, W] = [2, 1, 112, 112, 80]
//! (1.0M voxels per sample) holding an ellipsoid (an atrium-sized blob, so distances reach tens of
//! voxels, unlike a noise mask's few): the EDT (three line passes) and the SDF (two EDTs, the
//! per-sample extrema, the normalisation). Memory bound: bytes are what the op must move at least
//! (the mask read once, the output written once: 8 bytes per voxel), as a fraction of the copy
//! ceiling measured in the same run; the passes move more (the EDT reads and writes its buffer in
//! each of its three passes, 24 bytes per voxel). Voxels/s is printed beside. Every output is
//! checked in full against Cpu64 before it is timed.

mod common;

use common::{Bench, Work};
use criterion::{criterion_group, criterion_main, Criterion};
use metaseg_autograd::{Backend, Cpu64, DistanceBackend, Shape, Tolerance};

/// 1 inside the ellipsoid centred in the volume with semi-axes 0.35 of each size, else 0.
fn ellipsoid(shape: &Shape) -> Vec<f64> {
    let dims = shape.dims();
    let [d, h, w] = [dims[2], dims[3], dims[4]];
    (0..shape.numel())
        .map(|i| {
            let v = i % (d * h * w);
            let at = [v / (h * w), v / w % h, v % w];
            let r2: f64 = (0..3)
                .map(|k| {
                    let n = [d, h, w][k] as f64;
                    ((at[k] as f64 - n / 2.0) / (0.35 * n)).powi(2)
                })
                .sum();
            f64::from(u8::from(r2 <= 1.0))
        })
        .collect()
}

fn distance(c: &mut Criterion) {
    let bench = Bench::new(c);
    let gpu = &bench.gpu;
    let shape = Shape::from([2, 1, 112, 112, 80]);
    let label = "2x1x112x112x80";
    let voxels = shape.numel() as u64;
    let m = ellipsoid(&shape);
    let mask = gpu.tensor(&m, &shape).expect("upload");
    let mask_ref = Cpu64.tensor(&m, &shape).expect("reference input");
    let spacing = [1.0; 3];
    let work = Work::bytes(8 * voxels);
    let per_second = |name: &str, seconds: Option<f64>| {
        if let Some(s) = seconds {
            println!("{name} {label}: {:.1} Mvoxel/s", voxels as f64 / s / 1e6);
        }
    };
    let seconds = bench.op(
        c,
        "edt",
        label,
        work,
        Cpu64.edt(&mask_ref, spacing),
        Tolerance::F32,
        || gpu.edt(&mask, spacing),
    );
    per_second("edt", seconds);
    let seconds = bench.op(
        c,
        "sdf",
        label,
        work,
        Cpu64.sdf(&mask_ref, spacing),
        Tolerance::F32,
        || gpu.sdf(&mask, spacing),
    );
    per_second("sdf", seconds);
}

criterion_group! {
    name = benches;
    config = common::config();
    targets = distance
}
criterion_main!(benches);
