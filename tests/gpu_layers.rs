//! The layer family on the GPU against the Cpu64 reference through the runner's table: pooling,
//! up-sampling, batch and instance norm, channel dropout, concat and slice; forward values,
//! gradients and Hessian-vector products on seeded inputs at odd sizes (not multiples of 4 or of
//! the workgroup size). Cpu64's derivatives are checked against finite differences in
//! autograd/tests/layers.rs, so agreement here carries that check to the kernels.

mod common;

use common::{
    assert_gpu_matches_cpu64, assert_matches_cpu64_on, assert_split, derivatives, gpu, seeded,
    small_binding_gpu,
};
use metaseg_autograd::{second_order, Cpu64, Shape, Tolerance, Var};

/// [2, 3, 7, 5, 9]: 1890 elements, windows of kernel 2 do not tile it.
fn odd_shape() -> Shape {
    Shape::from([2, 3, 7, 5, 9])
}

fn input(seed: u64, shape: &Shape, lo: f64, hi: f64) -> (Vec<f64>, Shape) {
    (seeded(shape.numel(), seed, lo, hi), shape.clone())
}

#[test]
fn pooling_matches_the_reference() {
    let x = input(1, &odd_shape(), -1.0, 1.0);
    for (kernel, stride) in [
        ("kernel=2,2,2", "stride=2,2,2"),
        ("kernel=3,3,3", "stride=2,2,2"),
        ("kernel=2,2,2", "stride=1,1,1"),
        ("kernel=1,2,3", "stride=1,2,2"),
    ] {
        for op in ["max_pool3d", "avg_pool3d"] {
            assert_gpu_matches_cpu64(
                op,
                &[kernel, stride],
                std::slice::from_ref(&x),
                Tolerance::F32,
            );
        }
    }
}

#[test]
fn pooling_whose_windows_tile_the_input_matches_the_reference() {
    // kernel = stride and sizes that divide: the backward writes whole windows (the tiled entries).
    for (shape, k) in [([3, 3, 6, 2, 10], "2,2,2"), ([1, 3, 3, 6, 9], "3,3,3")] {
        let (values, shape) = input(14, &Shape::from(shape), -1.0, 1.0);
        // Quantised too, so ties decide the argmax in some windows.
        let ties = (
            values.iter().map(|v| (v * 1.5).round()).collect(),
            shape.clone(),
        );
        let settings = [format!("kernel={k}"), format!("stride={k}")];
        let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
        for x in [(values, shape), ties] {
            for op in ["max_pool3d", "avg_pool3d"] {
                assert_gpu_matches_cpu64(op, &settings, std::slice::from_ref(&x), Tolerance::F32);
            }
        }
    }
}

#[test]
fn max_pool_ties_go_to_the_first_maximum_on_both_backends() {
    // Three levels only: most windows hold several maxima, and the gradient shows which one won.
    let (values, shape) = input(10, &odd_shape(), -1.0, 1.0);
    let ties = (values.iter().map(|v| (v * 1.5).round()).collect(), shape);
    for (kernel, stride) in [
        ("kernel=2,2,2", "stride=2,2,2"),
        ("kernel=3,3,3", "stride=2,2,2"),
    ] {
        assert_gpu_matches_cpu64(
            "max_pool3d",
            &[kernel, stride],
            std::slice::from_ref(&ties),
            Tolerance::F32,
        );
    }
}

#[test]
fn max_pool_gather_and_scatter_match_the_reference_at_second_order() {
    // max_pool3d's HVP is zero; squaring the output makes H v run through scatter's own rule.
    let x = input(2, &odd_shape(), -1.0, 1.0);
    let window = metaseg_autograd::Window3d {
        kernel: [3, 2, 2],
        stride: [2, 1, 2],
    };
    let cpu = derivatives(
        &Cpu64,
        |xs| xs[0].max_pool3d(window).unwrap().square().unwrap(),
        std::slice::from_ref(&x),
    );
    let gpu = derivatives(
        &gpu(),
        |xs| xs[0].max_pool3d(window).unwrap().square().unwrap(),
        std::slice::from_ref(&x),
    );
    Tolerance::F32.assert("forward", &gpu.out, &cpu.out);
    Tolerance::F32.assert("gradient", &gpu.grads[0], &cpu.grads[0]);
    Tolerance::F32.assert("H v", &gpu.hvps[0], &cpu.hvps[0]);
}

#[test]
fn upsampling_matches_the_reference() {
    let x = input(3, &Shape::from([2, 3, 3, 5, 7]), -1.0, 1.0);
    for op in ["upsample_nearest", "upsample_trilinear"] {
        for scale in ["scale=2,2,2", "scale=1,3,2"] {
            assert_gpu_matches_cpu64(op, &[scale], std::slice::from_ref(&x), Tolerance::F32);
        }
    }
}

#[test]
fn norms_match_the_reference() {
    let x = input(4, &odd_shape(), -2.0, 3.0);
    let gamma = input(5, &Shape::from([3]), 0.5, 1.5);
    let beta = input(6, &Shape::from([3]), -1.0, 1.0);
    for op in ["batch_norm3d", "instance_norm3d"] {
        for eps in ["eps=1e-5", "eps=0.1"] {
            assert_gpu_matches_cpu64(
                op,
                &[eps],
                &[x.clone(), gamma.clone(), beta.clone()],
                Tolerance::new(2e-4, 2e-4),
            );
        }
    }
}

#[test]
fn channel_affine_matches_the_reference() {
    // Volumes 35 (lanes of a vec4 straddle channels) and 36 (the ALIGNED path).
    for spatial in [[1, 5, 7], [1, 4, 9]] {
        let x = input(
            11,
            &Shape::from([2, 3, spatial[0], spatial[1], spatial[2]]),
            -1.0,
            1.0,
        );
        for ab in [Shape::from([1, 3, 1, 1, 1]), Shape::from([2, 3, 1, 1, 1])] {
            let inputs = [
                x.clone(),
                input(12, &ab, 0.5, 1.5),
                input(13, &ab, -1.0, 1.0),
            ];
            let f = |v: &[Var<_>]| v[0].channel_affine(&v[1], &v[2]).unwrap().square().unwrap();
            let cpu = derivatives(&Cpu64, f, &inputs);
            let f = |v: &[Var<_>]| v[0].channel_affine(&v[1], &v[2]).unwrap().square().unwrap();
            let gpu = derivatives(&gpu(), f, &inputs);
            let tol = Tolerance::F32_ACCUMULATED;
            tol.assert("channel_affine forward", &gpu.out, &cpu.out);
            for k in 0..3 {
                tol.assert("channel_affine gradient", &gpu.grads[k], &cpu.grads[k]);
                tol.assert("channel_affine H v", &gpu.hvps[k], &cpu.hvps[k]);
            }
        }
    }
}

/// The fused primitives of a batch norm: channel_dots (of two tensors, and of one with itself,
/// which loads each value once) and channel_affine_relu, forward, gradients and Hessian-vector
/// products, at volumes that are and are not whole vec4s, and longer than one piece of
/// channel_dots' rows (the partial sums added up on the host).
#[test]
fn fused_channel_primitives_match_the_reference() {
    let tol = Tolerance::F32_ACCUMULATED;
    for spatial in [[1, 5, 7], [1, 4, 9], [3, 40, 48]] {
        let shape = Shape::from([2, 3, spatial[0], spatial[1], spatial[2]]);
        let x = input(21, &shape, -1.0, 1.0);
        let m = input(22, &shape, -1.0, 1.0);
        let ab = Shape::from([1, 3, 1, 1, 1]);
        let (a, b) = (input(23, &ab, 0.5, 1.5), input(24, &ab, -0.5, 0.5));
        let cases: [(&str, Vec<_>); 3] = [
            ("channel_dots", vec![x.clone(), m]),
            ("channel_dots of x with x", vec![x.clone()]),
            ("channel_affine_relu", vec![x, a, b]),
        ];
        for (what, inputs) in cases {
            let f = |v: &[Var<_>]| {
                match v.len() {
                    2 => v[0].channel_dots(&v[1]),
                    1 => v[0].channel_dots(&v[0]),
                    _ => v[0].channel_affine_relu(&v[1], &v[2]),
                }
                .unwrap()
                .square()
                .unwrap()
            };
            let cpu = derivatives(&Cpu64, f, &inputs);
            let f = |v: &[Var<_>]| {
                match v.len() {
                    2 => v[0].channel_dots(&v[1]),
                    1 => v[0].channel_dots(&v[0]),
                    _ => v[0].channel_affine_relu(&v[1], &v[2]),
                }
                .unwrap()
                .square()
                .unwrap()
            };
            let gpu = derivatives(&gpu(), f, &inputs);
            let what = format!("{what} {shape}");
            tol.assert(&format!("{what} forward"), &gpu.out, &cpu.out);
            for k in 0..inputs.len() {
                tol.assert(&format!("{what} gradient"), &gpu.grads[k], &cpu.grads[k]);
                tol.assert(&format!("{what} H v"), &gpu.hvps[k], &cpu.hvps[k]);
            }
        }
    }
}

/// relu(NaN) is NaN in the fused batch norm's last pass, as in the unfused ReLU.
#[test]
fn channel_affine_relu_keeps_nan() {
    use metaseg_autograd::{Backend, LayerBackend};
    let g = gpu();
    let x = g
        .tensor(
            &[f64::NAN, -1.0, 2.0, f64::NAN],
            &Shape::from([1, 1, 1, 1, 4]),
        )
        .unwrap();
    let one = g.tensor(&[1.0], &Shape::from([1, 1, 1, 1, 1])).unwrap();
    let zero = g.tensor(&[0.0], &Shape::from([1, 1, 1, 1, 1])).unwrap();
    let y = g
        .to_f64(&g.channel_affine_relu(&x, &one, &zero).unwrap())
        .unwrap();
    assert!(y[0].is_nan() && y[3].is_nan(), "{y:?}");
    assert_eq!(&y[1..3], &[0.0, 2.0]);
}

/// A batch norm's fused statistics (batch_statistic: forward, its fused backward kernels for the
/// gradients, the differentiable formulas for the Hessian-vector products) at channel counts
/// below and above one workgroup of channels.
#[test]
fn batch_statistics_match_the_reference() {
    use metaseg_autograd::{BatchStatistic, Statistic};
    let tol = Tolerance::F32_ACCUMULATED;
    for channels in [3, 67] {
        let shape = Shape::from([2, channels, 1, 5, 7]);
        let c = Shape::from([channels]);
        let inputs = [
            input(31, &shape, -1.0, 1.0),
            input(32, &c, 0.5, 1.5),
            input(33, &c, -0.5, 0.5),
        ];
        for statistic in [
            Statistic::Mean,
            Statistic::Variance,
            Statistic::Scale,
            Statistic::Shift,
        ] {
            let spec = BatchStatistic {
                statistic,
                count: 70,
                eps: 1e-3,
            };
            let f = |v: &[Var<_>]| {
                let moments = v[0].channel_dots(&v[0]).unwrap();
                let y = moments.batch_statistic(&v[1], &v[2], spec).unwrap();
                y.square().unwrap()
            };
            let cpu = derivatives(&Cpu64, f, &inputs);
            let f = |v: &[Var<_>]| {
                let moments = v[0].channel_dots(&v[0]).unwrap();
                let y = moments.batch_statistic(&v[1], &v[2], spec).unwrap();
                y.square().unwrap()
            };
            let gpu = derivatives(&gpu(), f, &inputs);
            let what = format!("batch_statistic {statistic:?}, {channels} channels");
            tol.assert(&format!("{what} forward"), &gpu.out, &cpu.out);
            for k in 0..inputs.len() {
                tol.assert(
                    &format!("{what} gradient {k}"),
                    &gpu.grads[k],
                    &cpu.grads[k],
                );
                tol.assert(&format!("{what} H v {k}"), &gpu.hvps[k], &cpu.hvps[k]);
            }
        }
    }
}

/// A channel whose moments are NaN (a NaN in its input) has NaN statistics, and NaN scale and
/// shift gradients, on the GPU as in Cpu64; the other channel keeps its values.
#[test]
fn batch_statistics_keep_nan() {
    use metaseg_autograd::{Backend, BatchStatistic, LayerBackend, Statistic};
    let moments = [f64::NAN, 5.0, f64::NAN, 2.0];
    let (m2, c) = (Shape::from([2, 2]), Shape::from([2]));
    let g = gpu();
    for statistic in [
        Statistic::Mean,
        Statistic::Variance,
        Statistic::Scale,
        Statistic::Shift,
    ] {
        let s = BatchStatistic {
            statistic,
            count: 4,
            eps: 1e-3,
        };
        let run = |m: Vec<f64>, wrt: Option<bool>| -> (Vec<f64>, Vec<f64>) {
            let (gm, go) = (
                g.tensor(&m, &m2).unwrap(),
                g.tensor(&[1.0, 1.0], &c).unwrap(),
            );
            let (cm, co) = (
                Cpu64.tensor(&m, &m2).unwrap(),
                Cpu64.tensor(&[1.0, 1.0], &c).unwrap(),
            );
            let (on_gpu, on_cpu) = match wrt {
                None => (
                    g.batch_statistic(&gm, &go, &go, s).unwrap(),
                    Cpu64.batch_statistic(&cm, &co, &co, s).unwrap(),
                ),
                Some(w) => (
                    g.batch_statistic_backward(&gm, &go, &go, s, w).unwrap(),
                    Cpu64.batch_statistic_backward(&cm, &co, &co, s, w).unwrap(),
                ),
            };
            (g.to_f64(&on_gpu).unwrap(), Cpu64.to_f64(&on_cpu).unwrap())
        };
        // The gradients of the mean and variance (never taken in training: a batch's statistics
        // are constants there) have compile-time zero terms that GL's compiler folds, NaN or not.
        let differentiated = matches!(statistic, Statistic::Scale | Statistic::Shift);
        let passes: &[Option<bool>] = if differentiated {
            &[None, Some(true), Some(false)]
        } else {
            &[None]
        };
        for &wrt in passes {
            let (out, reference) = run(moments.to_vec(), wrt);
            let what = format!("{statistic:?}, backward {wrt:?}: {out:?} against {reference:?}");
            for (k, (o, r)) in out.iter().zip(&reference).enumerate() {
                if k % 2 == 0 {
                    assert!(o.is_nan() && r.is_nan(), "{what}");
                } else {
                    Tolerance::F32.assert(&what, &[*o], &[*r]);
                }
            }
        }
    }
}

#[test]
fn dropout_draws_the_same_mask_on_both_backends() {
    let shape = Shape::from([3, 37, 1, 2, 3]);
    let x = input(7, &shape, 0.5, 1.5);
    for (p, seed, step) in [
        ("p=0.5", "seed=1", "step=0"),
        ("p=0.25", "seed=9", "step=7"),
    ] {
        assert_gpu_matches_cpu64(
            "dropout3d",
            &[p, seed, step],
            std::slice::from_ref(&x),
            Tolerance::F32,
        );
    }
    // Whole channels only, on the GPU too: every (n, c) block is all zero or all non-zero.
    let g = gpu();
    let xv = Var::from_f64(&g, &x.0, &shape, false).unwrap();
    let y = xv.dropout3d(0.5, 3, 4).unwrap().to_f64().unwrap();
    let zeroed = y
        .chunks(6)
        .filter(|block| block.iter().all(|&v| v == 0.0))
        .count();
    assert!(y
        .chunks(6)
        .all(|block| block.iter().all(|&v| v == 0.0) || block.iter().all(|&v| v != 0.0)));
    // 111 channels at p = 0.5: mean 55.5, standard deviation 5.3; allow about 4 of them.
    assert!(
        (34..=77).contains(&zeroed),
        "{zeroed} of 111 channels zeroed"
    );
}

#[test]
fn concat_and_slice_match_the_reference() {
    let a = input(8, &Shape::from([2, 3, 3, 5, 7]), -1.0, 1.0);
    let b = input(9, &Shape::from([2, 2, 3, 5, 7]), -1.0, 1.0);
    assert_gpu_matches_cpu64("concat", &[], &[a.clone(), b], Tolerance::F32);
    for (start, len) in [
        ("start=0", "len=2"),
        ("start=1", "len=2"),
        ("start=2", "len=1"),
    ] {
        assert_gpu_matches_cpu64(
            "slice",
            &[start, len],
            std::slice::from_ref(&a),
            Tolerance::F32,
        );
    }
}

/// An op of the runner's table, its settings and its input.
type LayerCase<'a> = (&'a str, &'a [&'a str], &'a (Vec<f64>, Shape));

/// Issue 24 item 4: the layers with the binding limit forced down to 8 KiB (2048 elements), on
/// samples that each fit but together do not: [3, 3, 7, 5, 9] has samples of 945 elements
/// (ranges that start off the binding alignment, copied out) and [5, 8, 4, 4, 4] of 512 (ranges
/// bound in place). Values, gradients and Hessian-vector products against Cpu64.
#[test]
fn layers_with_a_small_binding_limit_match_the_reference() {
    let g = small_binding_gpu();
    let odd = input(1, &Shape::from([3, 3, 7, 5, 9]), -1.0, 1.0);
    let even = input(2, &Shape::from([5, 8, 4, 4, 4]), -1.0, 1.0);
    let small = input(3, &Shape::from([4, 2, 2, 4, 5]), -1.0, 1.0);
    let tol = Tolerance::new(2e-4, 2e-4);
    let cases: [LayerCase; 9] = [
        ("max_pool3d", &["kernel=2,2,2", "stride=2,2,2"], &even),
        ("max_pool3d", &["kernel=3,3,3", "stride=2,2,2"], &odd),
        ("avg_pool3d", &["kernel=2,2,2", "stride=1,1,1"], &odd),
        ("avg_pool3d", &["kernel=2,2,2", "stride=2,2,2"], &even),
        ("upsample_nearest", &["scale=2,2,2"], &small),
        ("upsample_trilinear", &["scale=2,2,2"], &small),
        ("slice", &["start=1", "len=2"], &odd),
        ("dropout3d", &["p=0.5", "seed=1", "step=0"], &odd),
        ("sum", &["axes=0,2,3,4"], &odd),
    ];
    for (op, settings, x) in cases {
        assert_matches_cpu64_on(&g, op, settings, std::slice::from_ref(x), tol);
    }
    let (gamma, beta) = (
        input(5, &Shape::from([3]), 0.5, 1.5),
        input(6, &Shape::from([3]), -1.0, 1.0),
    );
    for op in ["batch_norm3d", "instance_norm3d"] {
        let inputs = [odd.clone(), gamma.clone(), beta.clone()];
        assert_matches_cpu64_on(&g, op, &["eps=1e-5"], &inputs, tol);
    }
    let b = input(9, &Shape::from([5, 1, 4, 4, 4]), -1.0, 1.0);
    assert_matches_cpu64_on(&g, "concat", &[], &[even, b], tol);
    let ab = Shape::from([1, 3, 1, 1, 1]);
    let inputs = [odd, input(12, &ab, 0.5, 1.5), input(13, &ab, -1.0, 1.0)];
    let f = |v: &[Var<_>]| {
        v[0].channel_affine_relu(&v[1], &v[2])
            .unwrap()
            .square()
            .unwrap()
    };
    let cpu = derivatives(&Cpu64, f, &inputs);
    let f = |v: &[Var<_>]| {
        v[0].channel_affine_relu(&v[1], &v[2])
            .unwrap()
            .square()
            .unwrap()
    };
    let on_gpu = derivatives(&g, f, &inputs);
    tol.assert("channel_affine_relu forward", &on_gpu.out, &cpu.out);
    for k in 0..3 {
        tol.assert(
            "channel_affine_relu gradient",
            &on_gpu.grads[k],
            &cpu.grads[k],
        );
        tol.assert("channel_affine_relu H v", &on_gpu.hvps[k], &cpu.hvps[k]);
    }
    assert_split(
        &g,
        &[
            "max_pool3d",
            "max_pool3d_gather",
            "avg_pool3d",
            "avg_pool3d_backward",
            "upsample_nearest",
            "upsample_nearest_backward",
            "upsample_trilinear",
            "upsample_trilinear_backward",
            "channel_window",
            "channel_affine",
            "channel_dots",
            "sum",
        ],
    );
}

/// A batch norm in training mode on `b`: its output and first-order gradients (the fused
/// backward) for an output weighting of seed 44, as f64.
fn batch_norm_first_order<B: metaseg_autograd::LayerBackend>(
    b: &B,
    inputs: &[(Vec<f64>, Shape)],
    relu: bool,
) -> Vec<Vec<f64>> {
    let v: Vec<Var<B>> = inputs
        .iter()
        .map(|(d, s)| Var::from_f64(b, d, s, true).unwrap())
        .collect();
    let (y, _) = if relu {
        v[0].batch_norm3d_train_relu(&v[1], &v[2], 1e-3).unwrap()
    } else {
        v[0].batch_norm3d_train(&v[1], &v[2], 1e-3).unwrap()
    };
    let weights = seeded(y.shape().numel(), 44, -1.0, 1.0);
    let w = Var::from_f64(b, &weights, y.shape(), false).unwrap();
    let loss = y.mul(&w).unwrap().sum().unwrap();
    let refs: Vec<&Var<B>> = v.iter().collect();
    let grads = metaseg_autograd::grad(&loss, &refs, None, false).unwrap();
    std::iter::once(&y)
        .chain(&grads)
        .map(|t| t.to_f64().unwrap())
        .collect()
}

/// A batch norm's fused first-order backward (batch_norm_backward: the masked incoming gradient,
/// its channel dots, one launch of per-channel coefficients, one pass for d x) against Cpu64's,
/// with and without the ReLU, at channel counts below and above one workgroup of channels and at
/// volumes that are and are not whole vec4s; and on a GPU whose tensors split by samples.
#[test]
fn fused_batch_norm_backward_matches_the_reference() {
    let cases = [
        (gpu(), Shape::from([2, 3, 1, 5, 7])),
        (gpu(), Shape::from([2, 67, 1, 4, 4])),
        (small_binding_gpu(), Shape::from([3, 3, 7, 5, 9])),
    ];
    for (g, shape) in &cases {
        let c = Shape::from([shape.dims()[1]]);
        let inputs = [
            input(41, shape, -1.0, 1.0),
            input(42, &c, 0.5, 1.5),
            input(43, &c, -0.5, 0.5),
        ];
        for relu in [false, true] {
            let on_gpu = batch_norm_first_order(g, &inputs, relu);
            let on_cpu = batch_norm_first_order(&Cpu64, &inputs, relu);
            for (k, (a, b)) in on_gpu.iter().zip(&on_cpu).enumerate() {
                let what = format!("batch norm {shape} (relu {relu}): output/gradient {k}");
                Tolerance::F32_ACCUMULATED.assert(&what, a, b);
            }
        }
    }
    assert_split(&small_binding_gpu(), &["batch_norm_dx"]);
}

/// A batch norm recorded for second order (its forward inside `second_order`, as MLB-Seg's
/// reverse meta step runs the costs): values, gradients and Hessian-vector products on the GPU
/// against Cpu64's, with and without the ReLU, at 3 and 67 channels and on a GPU whose tensors
/// split by samples.
#[test]
fn batch_norm_recorded_for_second_order_matches_the_reference() {
    fn bn<B: metaseg_autograd::LayerBackend>(v: &[Var<B>], relu: bool) -> Var<B> {
        let (y, _) = second_order(|| {
            if relu {
                v[0].batch_norm3d_train_relu(&v[1], &v[2], 1e-3)
            } else {
                v[0].batch_norm3d_train(&v[1], &v[2], 1e-3)
            }
        })
        .unwrap();
        assert_ne!(
            y.op_name(),
            Some("batch_norm3d"),
            "the composition is recorded"
        );
        y.square().unwrap()
    }
    let cases = [
        (gpu(), Shape::from([2, 3, 1, 5, 7])),
        (gpu(), Shape::from([2, 67, 1, 4, 4])),
        (small_binding_gpu(), Shape::from([3, 3, 7, 5, 9])),
    ];
    for (g, shape) in &cases {
        let c = Shape::from([shape.dims()[1]]);
        let inputs = [
            input(41, shape, -1.0, 1.0),
            input(42, &c, 0.5, 1.5),
            input(43, &c, -0.5, 0.5),
        ];
        for relu in [false, true] {
            let on_gpu = derivatives(g, |v| bn(v, relu), &inputs);
            let on_cpu = derivatives(&Cpu64, |v| bn(v, relu), &inputs);
            let what = format!("batch norm {shape} (relu {relu}) in second_order");
            let tol = Tolerance::F32_ACCUMULATED;
            tol.assert(&format!("{what}: output"), &on_gpu.out, &on_cpu.out);
            for k in 0..3 {
                let (g_gpu, g_cpu) = (&on_gpu.grads[k], &on_cpu.grads[k]);
                tol.assert(&format!("{what}: gradient {k}"), g_gpu, g_cpu);
                let (h_gpu, h_cpu) = (&on_gpu.hvps[k], &on_cpu.hvps[k]);
                tol.assert(&format!("{what}: H v {k}"), h_gpu, h_cpu);
            }
        }
    }
}

/// The ReLU's mask formed inside channel_dots and batch_norm_dx (MASKED) gives bit for bit what
/// the fused backward gives on the masked gradient g [y > 0] written by the elementwise kernels
/// first (what it did before the fusion), NaN included: a NaN in g where the ReLU is off still
/// poisons its channel (NaN times 0), one where it is on too. Aligned and unaligned volumes, and
/// a GPU whose tensors split by samples.
#[test]
fn relu_mask_folded_into_the_batch_norm_backward_is_bit_exact() {
    use metaseg_autograd::{Backend, BinaryOp, FusedBatchNorm, LayerBackend, UnaryOp};
    let cases = [
        (gpu(), Shape::from([2, 3, 1, 5, 7])),
        (gpu(), Shape::from([2, 5, 1, 4, 4])),
        (small_binding_gpu(), Shape::from([3, 3, 7, 5, 9])),
    ];
    for (b, shape) in &cases {
        let c = shape.dims()[1];
        let on = |v: &[f64], s: &Shape| Var::from_f64(b, v, s, false).unwrap();
        let x = on(&seeded(shape.numel(), 51, -1.0, 1.0), shape);
        let mut g_values = seeded(shape.numel(), 52, -1.0, 1.0);
        let (gamma, beta) = (on(&seeded(c, 53, 0.5, 1.5), &Shape::from([c])), {
            on(&seeded(c, 54, -0.5, 0.5), &Shape::from([c]))
        });
        let p = FusedBatchNorm {
            count: shape.numel() / c,
            eps: 1e-3,
            relu: true,
        };
        let moments = b.channel_dots(x.value(), x.value()).unwrap();
        let y = x.batch_norm3d_train_relu(&gamma, &beta, 1e-3).unwrap().0;
        let ys = y.to_f64().unwrap();
        // Poison channel 0 where the ReLU is off and the last channel where it is on.
        let volume = shape.numel() / (shape.dims()[0] * c);
        let off = (0..volume)
            .find(|&i| ys[i] <= 0.0)
            .expect("a voxel the ReLU zeroes");
        let last = (c - 1) * volume;
        let live = (last..last + volume)
            .find(|&i| ys[i] > 0.0)
            .expect("a live voxel");
        g_values[off] = f64::NAN;
        g_values[live] = f64::NAN;
        let g = on(&g_values, shape);
        let folded = b
            .batch_norm_backward(
                [x.value(), y.value(), g.value()],
                &moments,
                gamma.value(),
                p,
            )
            .unwrap();
        let mask = b.unary(UnaryOp::ReluMask, y.value()).unwrap();
        let masked = b.binary(BinaryOp::Mul, g.value(), &mask).unwrap();
        let plain_p = FusedBatchNorm { relu: false, ..p };
        let xyg = [x.value(), y.value(), &masked];
        let written = b
            .batch_norm_backward(xyg, &moments, gamma.value(), plain_p)
            .unwrap();
        for (k, (f, w)) in folded.iter().zip(&written).enumerate() {
            let (f, w) = (b.to_f64(f).unwrap(), b.to_f64(w).unwrap());
            let same = f
                .iter()
                .zip(&w)
                .all(|(a, r)| a.to_bits() == r.to_bits() || (a.is_nan() && r.is_nan()));
            assert!(same, "{shape}: output {k} differs: {f:?} vs {w:?}");
            assert!(
                f.iter().any(|v| v.is_nan()),
                "{shape}: output {k} lost the NaN"
            );
        }
    }
}
