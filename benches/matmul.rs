//! Matrix products (FLOP/s = 2 M N K batch) as a fraction of the FMA ceiling measured in the same
//! run, and their compulsory traffic (operands read once, result written once) as a fraction of
//! the copy ceiling. Sizes are written M x K x N. Every output is checked in full against Cpu64
//! before it is timed; inputs are in (0, 1), so long sums have no cancellation.

mod common;

use common::{Bench, Work};
use criterion::{criterion_group, criterion_main, Criterion};
use metaseg_autograd::{Backend, Cpu64, MatmulDims, MatmulSpec, Shape, Tolerance};

fn matmul(c: &mut Criterion) {
    let bench = Bench::new(c);
    let gpu = &bench.gpu;
    let plain = MatmulSpec::default();
    let trans_a = MatmulSpec {
        trans_a: true,
        trans_b: false,
    };
    let trans_b = MatmulSpec {
        trans_a: false,
        trans_b: true,
    };
    let cases: [(&str, [usize; 2], [usize; 2], MatmulSpec); 5] = [
        ("256x256x256", [256, 256], [256, 256], plain),
        ("512x512x512", [512, 512], [512, 512], plain),
        ("512x512x512 A^T", [512, 512], [512, 512], trans_a),
        // A 1x1x1 convolution head, C_in = C_out = 16, on a 32^3 volume: W @ X.
        ("head W@X 16x16x32768", [16, 16], [16, 32768], plain),
        // Its weight gradient dY @ X^T: a 16x16 output, so a single workgroup.
        ("head dY@X^T 16x32768x16", [16, 32768], [16, 32768], trans_b),
    ];
    for (seed, (label, a, b, spec)) in cases.into_iter().enumerate() {
        let (a_shape, b_shape) = (Shape::from(a), Shape::from(b));
        let (d, _) = MatmulDims::new(&a_shape, &b_shape, spec).expect("matmul shapes");
        let (a, a_ref) = bench.inputs(&a_shape, 2 * seed as u64);
        let (b, b_ref) = bench.inputs(&b_shape, 2 * seed as u64 + 1);
        let work = Work {
            bytes: 4 * (d.batch_a * d.m * d.k + d.batch_b * d.k * d.n + d.batch * d.m * d.n) as u64,
            flop: 2 * (d.batch * d.m * d.n * d.k) as u64,
        };
        let expected = Cpu64.matmul(&a_ref, &b_ref, spec);
        bench.op(
            c,
            "matmul",
            label,
            work,
            expected,
            Tolerance::F32_ACCUMULATED,
            || gpu.matmul(&a, &b, spec),
        );
    }
}

criterion_group! {
    name = benches;
    config = common::config();
    targets = matmul
}
criterion_main!(benches);
