//! Convolutions at V-Net's shapes (issue 3): forward, grad-input and grad-weight of each layer kind,
//! in GFLOP/s (2 x the multiply-adds, counting the taps on the zero padding, as frameworks do) and
//! as a fraction of the FMA ceiling measured in the same run, for the default variant of
//! kernels/conv.wgsl; the direct variant 1 and the weights-in-workgroup-memory variant 3 are
//! measured against it at a smaller shape (variant 1 takes tens of seconds a launch at V-Net's). Every result is checked in full against Cpu64 before it is timed;
//! inputs are in (0, 1), so long sums have no cancellation.
//!
//! The transposed up-sampling is the convolution it transposes run backwards: its forward is that
//! convolution's grad-input, its grad-input that convolution's forward, and its grad-weight that
//! convolution's grad-weight with the roles of x and dy swapped.
//!
//! Run one layer with a filter, e.g. `cargo bench --bench conv -- 16-16`.

mod common;

use common::{Bench, Work};
use criterion::{criterion_group, criterion_main, Criterion};
use metaseg::gpu::{ConvPlan, ConvVariant, GpuTensor};
use metaseg_autograd::{
    Conv3dGeometry, ConvBackend, ConvSpec, Cpu64, CpuTensor, Result, Shape, Tolerance,
};

/// One layer: x [N, C, D, H, W], w [K, C, k, k, k] and its spec; `transposed` benches
/// conv_transpose3d with the same weight (x is then the convolution's output).
struct Layer {
    label: String,
    x: [usize; 5],
    w: [usize; 5],
    spec: ConvSpec,
    transposed: bool,
}

fn layers() -> Vec<Layer> {
    let pad1 = ConvSpec::new([1; 3], [1; 3]);
    let down = ConvSpec::new([2; 3], [0; 3]);
    let layer = |label: &str, x, w, spec, transposed| Layer {
        label: label.into(),
        x,
        w,
        spec,
        transposed,
    };
    vec![
        layer(
            "3x3x3 16-16 2x64^3",
            [2, 16, 64, 64, 64],
            [16, 16, 3, 3, 3],
            pad1,
            false,
        ),
        layer(
            "3x3x3 1-16 2x64^3",
            [2, 1, 64, 64, 64],
            [16, 1, 3, 3, 3],
            pad1,
            false,
        ),
        layer(
            "3x3x3 32-32 2x32^3",
            [2, 32, 32, 32, 32],
            [32, 32, 3, 3, 3],
            pad1,
            false,
        ),
        layer(
            "k2s2 down 16-32 2x64^3",
            [2, 16, 64, 64, 64],
            [32, 16, 2, 2, 2],
            down,
            false,
        ),
        layer(
            "k2s2 up 32-16 2x32^3 (transposed)",
            [2, 32, 32, 32, 32],
            [32, 16, 2, 2, 2],
            down,
            true,
        ),
    ]
    .into_iter()
    .chain(flat_layers())
    .collect()
}

/// The 2D V-Net's layers (the default preset: width 8, 4 levels, 64 x 64 images): depth-1 1x3x3
/// convolutions at each level's width and size, at batch 4 (the default's) and 8, the input layer,
/// and the 1x2x2 stride-(1, 2, 2) down/up convolutions between the first two levels.
fn flat_layers() -> Vec<Layer> {
    let pad1 = ConvSpec::new([1; 3], [0, 1, 1]);
    let down = ConvSpec::new([1, 2, 2], [0; 3]);
    let mut layers = Vec::new();
    for batch in [4, 8] {
        for (width, size) in [(8, 64), (16, 32), (32, 16), (64, 8)] {
            layers.push(Layer {
                label: format!("1x3x3 {width}-{width} {batch}x{size}^2"),
                x: [batch, width, 1, size, size],
                w: [width, width, 1, 3, 3],
                spec: pad1,
                transposed: false,
            });
        }
    }
    layers.extend([
        Layer {
            label: "1x3x3 1-8 4x64^2".into(),
            x: [4, 1, 1, 64, 64],
            w: [8, 1, 1, 3, 3],
            spec: pad1,
            transposed: false,
        },
        Layer {
            label: "1x2x2 down 8-16 4x64^2".into(),
            x: [4, 8, 1, 64, 64],
            w: [16, 8, 1, 2, 2],
            spec: down,
            transposed: false,
        },
        Layer {
            label: "1x2x2 up 16-8 4x32^2 (transposed)".into(),
            x: [4, 16, 1, 32, 32],
            w: [16, 8, 1, 2, 2],
            spec: down,
            transposed: true,
        },
    ]);
    layers
}

/// A tensor on both sides: the device's and the reference's.
struct Operand {
    gpu: GpuTensor,
    cpu: CpuTensor,
}

/// The three passes of one layer as launches of `variant`, each with its reference result.
fn passes(bench: &Bench, c: &mut Criterion, layer: &Layer, variant: ConvVariant, seed: u64) {
    let gpu = &bench.gpu;
    let (x_shape, w_shape) = (Shape::from(layer.x), Shape::from(layer.w));
    // The convolution that is run (for a transposed layer, the one it transposes).
    let g = if layer.transposed {
        Conv3dGeometry::transposed(&x_shape, &w_shape, layer.spec, [0; 3])
    } else {
        Conv3dGeometry::new(&x_shape, &w_shape, layer.spec)
    }
    .expect("layer geometry");
    let operand = |shape: &Shape, seed| {
        let (gpu, cpu) = bench.inputs(shape, seed);
        Operand { gpu, cpu }
    };
    let x = operand(&g.input_shape(), seed);
    let w = operand(&g.weight_shape(), seed + 1);
    let dy = operand(&g.output_shape(), seed + 2);
    let flop = 2 * g.multiply_adds();
    let bytes = |shapes: [Shape; 3]| 4 * shapes.iter().map(Shape::numel).sum::<usize>() as u64;
    let work = Work {
        bytes: bytes([g.input_shape(), g.weight_shape(), g.output_shape()]),
        flop,
    };
    let tol = Tolerance::new(1e-3, 2e-4);
    // (pass name as the layer sees it, reference, launch)
    type Launch<'a> = Box<dyn FnMut() -> Result<GpuTensor> + 'a>;
    let forward: (Result<CpuTensor>, Launch) = (
        Cpu64.conv3d(&x.cpu, &w.cpu, None, &g),
        Box::new(|| gpu.conv3d_variant(variant, &x.gpu, &w.gpu, None, &g)),
    );
    let grad_input: (Result<CpuTensor>, Launch) = (
        Cpu64.conv3d_grad_input(&dy.cpu, &w.cpu, None, &g),
        Box::new(|| gpu.conv3d_grad_input_variant(variant, &dy.gpu, &w.gpu, None, &g)),
    );
    let grad_weight: (Result<CpuTensor>, Launch) = (
        Cpu64.conv3d_grad_weight(&x.cpu, &dy.cpu, &g),
        Box::new(|| gpu.conv3d_grad_weight_variant(variant, &x.gpu, &dy.gpu, &g)),
    );
    let named = if layer.transposed {
        // The transposed layer's forward is the convolution's grad-input, and so on.
        [
            ("forward", grad_input),
            ("grad-input", forward),
            ("grad-weight", grad_weight),
        ]
    } else {
        [
            ("forward", forward),
            ("grad-input", grad_input),
            ("grad-weight", grad_weight),
        ]
    };
    // The variant that really runs each pass (variant 2 falls back to 1 where it does not apply,
    // variant 3 to 2 outside the forward kernel).
    let [f, i, w] = ConvPlan::new(variant, &g).numbers();
    let runs = if layer.transposed {
        [i, f, w]
    } else {
        [f, i, w]
    };
    for ((pass, (expected, mut launch)), run) in named.into_iter().zip(runs) {
        if run != variant.number() && run == variant.unstaged().number() {
            continue; // measured as that variant already
        }
        let name = format!("conv3d {pass} v{run}");
        bench.op(c, &name, &layer.label, work, expected, tol, &mut launch);
    }
}

fn conv(c: &mut Criterion) {
    let bench = Bench::new(c);
    for (i, layer) in layers().iter().enumerate() {
        passes(&bench, c, layer, ConvVariant::DEFAULT, 10 * i as u64);
    }
    // Every variant at a size variant 1 finishes in about a second.
    let small = Layer {
        label: "3x3x3 16-16 1x32^3".into(),
        x: [1, 16, 32, 32, 32],
        w: [16, 16, 3, 3, 3],
        spec: ConvSpec::new([1; 3], [1; 3]),
        transposed: false,
    };
    for variant in ConvVariant::ALL {
        passes(&bench, c, &small, variant, 100);
    }
}

criterion_group! {
    name = benches;
    config = common::config();
    targets = conv
}
criterion_main!(benches);
