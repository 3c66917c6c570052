//! The convolution family on the reference backend: output sizes as PyTorch computes them, first and
//! second order against central finite differences in f64 for every geometry V-Net and U-Net use,
//! and the analytic cases (a delta kernel shifts the input; constant input and kernel).

use metaseg_autograd::check::{assert_gradients, CpuFn};
use metaseg_autograd::{
    grad, Backend, Conv3dGeometry, ConvBackend, ConvSpec, Cpu64, Error, Shape, Tolerance, Var,
};

/// Values uniform in [-1, 1).
fn seeded(n: usize, seed: u64) -> Vec<f64> {
    metaseg_autograd::check::seeded(n, seed, -1.0, 1.0)
}

fn spec(stride: [usize; 3], padding: [usize; 3], dilation: [usize; 3]) -> ConvSpec {
    ConvSpec {
        stride,
        padding,
        dilation,
    }
}

/// One geometry to test: x [N, C, D, H, W], kernel (kd, kh, kw), K output channels.
struct Case {
    name: &'static str,
    x: [usize; 5],
    k_out: usize,
    kernel: [usize; 3],
    spec: ConvSpec,
}

/// Every stride/padding combination of V-Net and U-Net, at odd sizes, plus mixed per-axis settings
/// and dilation.
fn cases() -> Vec<Case> {
    let s1 = [1; 3];
    vec![
        Case {
            name: "3x3x3 pad 1",
            x: [2, 2, 3, 4, 5],
            k_out: 3,
            kernel: [3; 3],
            spec: spec(s1, [1; 3], s1),
        },
        Case {
            name: "1x1x1",
            x: [2, 3, 2, 3, 3],
            k_out: 2,
            kernel: [1; 3],
            spec: ConvSpec::default(),
        },
        Case {
            name: "k2 s2 down (odd size: the last row is dropped)",
            x: [1, 2, 4, 5, 3],
            k_out: 3,
            kernel: [2; 3],
            spec: spec([2; 3], [0; 3], s1),
        },
        Case {
            name: "2D 3x3 pad 1 (depth 1)",
            x: [2, 2, 1, 5, 4],
            k_out: 2,
            kernel: [1, 3, 3],
            spec: spec(s1, [0, 1, 1], s1),
        },
        Case {
            name: "mixed per-axis stride, padding, dilation; kernel 5 and 7",
            x: [1, 2, 3, 6, 9],
            k_out: 2,
            kernel: [2, 5, 7],
            spec: spec([2, 1, 3], [1, 2, 3], [1, 2, 1]),
        },
    ]
}

fn weights_and_direction(f: &CpuFn, inputs: &[(Vec<f64>, Shape)]) -> (Vec<f64>, Vec<Vec<f64>>) {
    let xs: Vec<Var<Cpu64>> = inputs
        .iter()
        .map(|(v, s)| Var::from_f64(&Cpu64, v, s, false).unwrap())
        .collect();
    let out = f(&xs).unwrap().shape().numel();
    let direction = inputs
        .iter()
        .enumerate()
        .map(|(k, (v, _))| seeded(v.len(), 200 + k as u64))
        .collect();
    (seeded(out, 100), direction)
}

fn check(what: &str, f: &CpuFn, inputs: &[(Vec<f64>, Shape)]) {
    let (weights, direction) = weights_and_direction(f, inputs);
    assert_gradients(
        what,
        f,
        inputs,
        &weights,
        &direction,
        Tolerance::FINITE_DIFFERENCE,
    );
}

#[test]
fn conv3d_first_and_second_order_finite_differences() {
    for case in cases() {
        let x = Shape::from(case.x);
        let [kd, kh, kw] = case.kernel;
        let w = Shape::from([case.k_out, case.x[1], kd, kh, kw]);
        let b = Shape::from([case.k_out]);
        let inputs = vec![
            (seeded(x.numel(), 1), x),
            (seeded(w.numel(), 2), w),
            (seeded(b.numel(), 3), b),
        ];
        let s = case.spec;
        // Squared, so the second derivative also runs through the rules of the backward ops.
        let f = move |v: &[Var<Cpu64>]| v[0].conv3d(&v[1], Some(&v[2]), s)?.square();
        check(&format!("conv3d {}", case.name), &f, &inputs);
    }
}

#[test]
fn grad_input_and_grad_weight_are_differentiable_primitives() {
    for case in cases() {
        let x = Shape::from(case.x);
        let [kd, kh, kw] = case.kernel;
        let w = Shape::from([case.k_out, case.x[1], kd, kh, kw]);
        let g = Conv3dGeometry::new(&x, &w, case.spec).unwrap();
        let dy = g.output_shape();
        let c = Shape::from([case.x[1]]);
        let grad_input = vec![
            (seeded(dy.numel(), 4), dy.clone()),
            (seeded(w.numel(), 5), w.clone()),
            (seeded(c.numel(), 6), c),
        ];
        let f = move |v: &[Var<Cpu64>]| v[0].conv3d_grad_input(&v[1], Some(&v[2]), g)?.square();
        check(&format!("conv3d_grad_input {}", case.name), &f, &grad_input);

        let grad_weight = vec![(seeded(x.numel(), 7), x), (seeded(dy.numel(), 8), dy)];
        let f = move |v: &[Var<Cpu64>]| v[0].conv3d_grad_weight(&v[1], g)?.square();
        check(
            &format!("conv3d_grad_weight {}", case.name),
            &f,
            &grad_weight,
        );
    }
}

#[test]
fn conv_transpose3d_first_and_second_order_finite_differences() {
    // V-Net's k2 s2 up-sampling, and a general one with padding and output_padding.
    let cases = [
        (
            [1, 3, 2, 3, 2],
            [3, 2, 2, 2, 2],
            spec([2; 3], [0; 3], [1; 3]),
            [0; 3],
        ),
        (
            [2, 2, 3, 2, 3],
            [2, 3, 3, 3, 2],
            spec([2, 1, 2], [1, 1, 0], [1; 3]),
            [1, 0, 1],
        ),
    ];
    for (x, w, s, output_padding) in cases {
        let (x, w) = (Shape::from(x), Shape::from(w));
        let b = Shape::from([w.dims()[1]]);
        let inputs = vec![
            (seeded(x.numel(), 9), x),
            (seeded(w.numel(), 10), w),
            (seeded(b.numel(), 11), b),
        ];
        let f = move |v: &[Var<Cpu64>]| {
            v[0].conv_transpose3d(&v[1], Some(&v[2]), s, output_padding)?
                .square()
        };
        check(&format!("conv_transpose3d {s:?}"), &f, &inputs);
    }
}

#[test]
fn output_sizes_follow_pytorch() {
    let geometry = |x: [usize; 5], w: [usize; 5], s: ConvSpec| {
        Conv3dGeometry::new(&Shape::from(x), &Shape::from(w), s)
            .unwrap()
            .output_shape()
    };
    // floor((in + 2p - d (k - 1) - 1) / s) + 1
    assert_eq!(
        geometry(
            [2, 16, 64, 64, 64],
            [32, 16, 2, 2, 2],
            spec([2; 3], [0; 3], [1; 3])
        ),
        Shape::from([2, 32, 32, 32, 32])
    );
    assert_eq!(
        geometry(
            [1, 1, 7, 7, 1],
            [4, 1, 3, 3, 1],
            spec([2, 2, 1], [1, 1, 0], [1; 3])
        ),
        Shape::from([1, 4, 4, 4, 1])
    );
    assert_eq!(
        geometry(
            [1, 1, 9, 9, 9],
            [1, 1, 3, 3, 3],
            spec([1; 3], [0; 3], [3, 2, 1])
        ),
        Shape::from([1, 1, 3, 5, 7])
    );
    // (in - 1) s - 2p + d (k - 1) + output_padding + 1
    let up = Conv3dGeometry::transposed(
        &Shape::from([2, 32, 32, 32, 32]),
        &Shape::from([32, 16, 2, 2, 2]),
        spec([2; 3], [0; 3], [1; 3]),
        [0; 3],
    )
    .unwrap();
    assert_eq!(up.input_shape(), Shape::from([2, 16, 64, 64, 64]));
    let odd = Conv3dGeometry::transposed(
        &Shape::from([1, 1, 4, 4, 4]),
        &Shape::from([1, 2, 3, 3, 3]),
        spec([2; 3], [1; 3], [1; 3]),
        [1, 0, 1],
    )
    .unwrap();
    assert_eq!(odd.input_shape(), Shape::from([1, 2, 8, 7, 8]));
}

#[test]
fn shape_errors_name_the_op_and_the_shapes() {
    let msg = |r: Result<Conv3dGeometry, Error>| r.err().unwrap().to_string();
    let x = Shape::from([1, 3, 4, 4, 4]);
    let m = msg(Conv3dGeometry::new(
        &x,
        &Shape::from([2, 4, 3, 3, 3]),
        ConvSpec::default(),
    ));
    assert!(
        m.contains("conv3d") && m.contains("[1, 3, 4, 4, 4]") && m.contains("channels"),
        "{m}"
    );
    let m = msg(Conv3dGeometry::new(
        &x,
        &Shape::from([2, 3, 5, 1, 1]),
        ConvSpec::default(),
    ));
    assert!(m.contains("axis 0"), "{m}");
    let m = msg(Conv3dGeometry::new(
        &Shape::from([3, 4, 4, 4]),
        &Shape::from([2, 3, 1, 1, 1]),
        ConvSpec::default(),
    ));
    assert!(m.contains("rank 5"), "{m}");
    let m = msg(Conv3dGeometry::transposed(
        &x,
        &Shape::from([3, 2, 2, 2, 2]),
        spec([2; 3], [0; 3], [1; 3]),
        [2, 0, 0],
    ));
    assert!(
        m.contains("conv_transpose3d") && m.contains("output_padding"),
        "{m}"
    );

    // A bias of the wrong length is refused by the primitive itself.
    let w = Shape::from([2, 3, 1, 1, 1]);
    let g = Conv3dGeometry::new(&x, &w, ConvSpec::default()).unwrap();
    let t = |s: &Shape| Cpu64.fill(s, 1.0).unwrap();
    let bad_bias = Cpu64.conv3d(&t(&x), &t(&w), Some(&t(&Shape::from([3]))), &g);
    assert!(bad_bias.err().unwrap().to_string().contains("bias"));
}

/// A kernel that is 1 at one tap (for each channel onto itself) and 0 elsewhere moves the input:
/// y[o] = x[o + t - padding], zero where that falls outside.
#[test]
fn a_delta_kernel_shifts_the_input() {
    let (n, c, dims) = (2, 2, [3, 4, 5]);
    let x_shape = Shape::from([n, c, dims[0], dims[1], dims[2]]);
    let x = Var::from_f64(&Cpu64, &seeded(x_shape.numel(), 12), &x_shape, false).unwrap();
    let kernel = [3, 3, 3];
    for (tap, padding) in [
        ([0, 1, 2], [1, 1, 1]),
        ([2, 0, 1], [1, 0, 2]),
        ([1, 1, 1], [1, 1, 1]),
    ] {
        let mut w = vec![0.0; c * c * 27];
        for ch in 0..c {
            w[((ch * c + ch) * 3 + tap[0]) * 9 + tap[1] * 3 + tap[2]] = 1.0;
        }
        let w = Var::from_f64(&Cpu64, &w, &Shape::from([c, c, 3, 3, 3]), false).unwrap();
        let s = spec([1; 3], padding, [1; 3]);
        let y = x.conv3d(&w, None, s).unwrap();
        let out: Vec<usize> = (0..3)
            .map(|a| dims[a] + 2 * padding[a] - kernel[a] + 1)
            .collect();
        let xv = x.to_f64().unwrap();
        let mut expected = Vec::new();
        for b in 0..n * c {
            for d in 0..out[0] {
                for h in 0..out[1] {
                    for wi in 0..out[2] {
                        let src = [d, h, wi]
                            .iter()
                            .enumerate()
                            .map(|(a, &o)| {
                                (o + tap[a])
                                    .checked_sub(padding[a])
                                    .filter(|&i| i < dims[a])
                            })
                            .collect::<Option<Vec<usize>>>();
                        expected.push(match src {
                            Some(i) => xv[((b * dims[0] + i[0]) * dims[1] + i[1]) * dims[2] + i[2]],
                            None => 0.0,
                        });
                    }
                }
            }
        }
        assert_eq!(
            y.to_f64().unwrap(),
            expected,
            "tap {tap:?} padding {padding:?}"
        );
    }
}

/// x = a everywhere and w = b everywhere, stride 1, no padding: every output is a b C kd kh kw,
/// and for L = sum(y), dL/dw = a N Do Ho Wo and dL/dx[i] = b K prod_axes(taps reading i), where
/// along an axis of input size n and output size m, position i is read by
/// min(i, k - 1) - max(0, i - m + 1) + 1 taps.
#[test]
fn constant_input_and_kernel_have_closed_forms() {
    let (a, b) = (0.75, -1.25);
    let (n, c, k) = (2, 3, 4);
    let dims = [4, 5, 6];
    let kernel = [2, 3, 3];
    let x_shape = Shape::from([n, c, dims[0], dims[1], dims[2]]);
    let w_shape = Shape::from([k, c, kernel[0], kernel[1], kernel[2]]);
    let x = Var::full(&Cpu64, &x_shape, a).unwrap();
    let w = Var::full(&Cpu64, &w_shape, b).unwrap();
    let (x, w) = (
        Var::parameter(&Cpu64, x.value().clone()),
        Var::parameter(&Cpu64, w.value().clone()),
    );
    let y = x.conv3d(&w, None, ConvSpec::default()).unwrap();
    let out: Vec<usize> = (0..3).map(|i| dims[i] - kernel[i] + 1).collect();
    let taps = (kernel[0] * kernel[1] * kernel[2]) as f64;
    let values = y.to_f64().unwrap();
    assert_eq!(values.len(), n * k * out.iter().product::<usize>());
    Tolerance::F64.assert("y", &values, &vec![a * b * c as f64 * taps; values.len()]);

    let g = grad(&y.sum().unwrap(), &[&x, &w], None, false).unwrap();
    let outputs = (n * out.iter().product::<usize>()) as f64;
    Tolerance::F64.assert(
        "dL/dw",
        &g[1].to_f64().unwrap(),
        &vec![a * outputs; w_shape.numel()],
    );
    let reads = |axis: usize, i: usize| {
        let (kk, m) = (kernel[axis], out[axis]);
        (i.min(kk - 1) + 1 - (i + 1).saturating_sub(m)) as f64
    };
    let mut expected = Vec::new();
    for _ in 0..n * c {
        for d in 0..dims[0] {
            for h in 0..dims[1] {
                for wi in 0..dims[2] {
                    expected.push(b * k as f64 * reads(0, d) * reads(1, h) * reads(2, wi));
                }
            }
        }
    }
    Tolerance::F64.assert("dL/dx", &g[0].to_f64().unwrap(), &expected);
}
