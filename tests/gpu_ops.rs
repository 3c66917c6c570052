//! Every op of the runner's table on the GPU against the Cpu64 reference: forward values, gradients
//! and Hessian-vector products (second order through create_graph), on seeded inputs whose sizes are
//! not multiples of the workgroup size. The reference's own gradients are checked against finite
//! differences in autograd/tests/autograd.rs, so agreement here carries that check to the kernels.

mod common;

use common::{
    assert_gpu_matches_cpu64, assert_matches_cpu64_on, assert_split, gpu, seeded, small_binding_gpu,
};
use metaseg::runner::op_names;
use metaseg_autograd::{
    Backend, BinaryOp, Cpu64, Distribution, Shape, TensorShape, Tolerance, UnaryOp, Var,
};

/// [2, 3, 5, 7, 9]: 1890 elements, a multiple of neither 4 nor the workgroup size.
fn odd_shape() -> Shape {
    Shape::from([2, 3, 5, 7, 9])
}

fn input(seed: u64, shape: &Shape, lo: f64, hi: f64) -> (Vec<f64>, Shape) {
    (seeded(shape.numel(), seed, lo, hi), shape.clone())
}

#[test]
fn unary_ops_match_the_reference() {
    let s = odd_shape();
    for op in ["neg", "exp", "square", "relu", "sigmoid", "tanh"] {
        assert_gpu_matches_cpu64(op, &[], &[input(1, &s, -2.0, 2.0)], Tolerance::F32);
    }
    for op in ["log", "sqrt"] {
        assert_gpu_matches_cpu64(
            op,
            &[],
            &[input(2, &s, 0.5, 2.0)],
            Tolerance::F32_ACCUMULATED,
        );
    }
    assert_gpu_matches_cpu64(
        "leaky_relu",
        &["slope=0.2"],
        &[input(3, &s, -2.0, 2.0)],
        Tolerance::F32,
    );
    assert_gpu_matches_cpu64(
        "clamp",
        &["min=-0.5", "max=0.7"],
        &[input(4, &s, -2.0, 2.0)],
        Tolerance::F32,
    );
}

#[test]
fn binary_ops_match_the_reference_with_every_broadcast() {
    let s = odd_shape();
    let per_channel = Shape::from([1, 3, 1, 1, 1]);
    let per_voxel = Shape::from([2, 1, 5, 7, 9]);
    let seconds = [
        s.clone(),
        per_channel,
        per_voxel,
        Shape::scalar(),
        Shape::from([9]),
    ];
    for op in ["add", "sub", "mul", "div"] {
        for b in &seconds {
            let a = input(5, &s, -2.0, 2.0);
            let b = input(6, b, 0.5, 2.0);
            // Broadcast the other way round as well: the first operand is the small one.
            assert_gpu_matches_cpu64(op, &[], &[a.clone(), b.clone()], Tolerance::F32_ACCUMULATED);
            assert_gpu_matches_cpu64(op, &[], &[b, a.clone()], Tolerance::F32_ACCUMULATED);
        }
    }
}

#[test]
fn reductions_match_the_reference_over_any_axes() {
    let s = odd_shape();
    for op in ["sum", "mean"] {
        for axes in [
            "axes=0,1,2,3,4",
            "axes=1",
            "axes=0,2,3,4",
            "axes=4",
            "axes=0,2",
            "axes=1,3",
        ] {
            for keepdim in ["keepdim=true", "keepdim=false"] {
                let x = input(7, &s, -1.0, 1.0);
                assert_gpu_matches_cpu64(op, &[axes, keepdim], &[x], Tolerance::F32_ACCUMULATED);
            }
        }
    }
}

#[test]
fn broadcasts_along_whole_vec4_rows_match_the_reference() {
    // A sum's gradient broadcasts its result back. Over [.., 16] spatial rows (whole vec4s), a
    // per-channel sum (axes 0,2,3,4) and a per-(n, c) sum (axes 2,3,4) take the row kernel.
    let s = Shape::from([3, 5, 2, 2, 4]);
    for axes in ["axes=0,2,3,4", "axes=2,3,4", "axes=0,1,2,3,4"] {
        let x = input(9, &s, -1.0, 1.0);
        assert_gpu_matches_cpu64("sum", &[axes], &[x], Tolerance::F32_ACCUMULATED);
    }
}

#[test]
fn long_reductions_split_into_chunks_match_the_reference() {
    // 100_003 elements: the row kernel splits into chunks; a short column gets chunked too.
    // 140_000 (whole vec4s): sum_rows4's chunks, the last one short and not a whole step.
    for (shape, axes) in [
        (Shape::from([100_003]), "axes=0"),
        (Shape::from([2, 140_000]), "axes=1"),
        (Shape::from([3, 33_335]), "axes=1"),
        (Shape::from([33_335, 3]), "axes=0"),
    ] {
        let x = input(8, &shape, -1.0, 1.0);
        assert_gpu_matches_cpu64("sum", &[axes], &[x], Tolerance::new(1e-3, 1e-4));
    }
}

/// (M, K, N) of the matmul tests: ragged (scalar loads and stores), whole vec4s but not whole
/// register blocks (vec4 loads with clamped edge blocks, vec4 stores), ragged K with N in vec4s
/// (scalar loads, vec4 stores), and long K over a small C (split-K), ragged and in vec4s.
const MATMUL_SIZES: [(usize, usize, usize); 5] = [
    (67, 45, 130),
    (36, 44, 68),
    (7, 45, 12),
    (5, 1031, 7),
    (12, 1024, 20),
];

#[test]
fn matmul_matches_the_reference_for_every_transpose_and_batch() {
    for (m, k, n) in MATMUL_SIZES {
        matmul_matches_the_reference(m, k, n);
    }
}

fn matmul_matches_the_reference(m: usize, k: usize, n: usize) {
    for trans_a in [false, true] {
        for trans_b in [false, true] {
            for (batch_a, batch_b) in [(3, 3), (3, 1), (1, 3), (0, 0)] {
                let a_dims = if trans_a { [k, m] } else { [m, k] };
                let b_dims = if trans_b { [n, k] } else { [k, n] };
                let with_batch = |batch: usize, d: [usize; 2]| match batch {
                    0 => Shape::from(d),
                    b => Shape::from([b, d[0], d[1]]),
                };
                let a = input(9, &with_batch(batch_a, a_dims), -1.0, 1.0);
                let b = input(10, &with_batch(batch_b, b_dims), -1.0, 1.0);
                let settings = [format!("trans_a={trans_a}"), format!("trans_b={trans_b}")];
                let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
                assert_gpu_matches_cpu64("matmul", &settings, &[a, b], Tolerance::F32_ACCUMULATED);
            }
        }
    }
}

/// A NaN in A's row r (or B's column q) makes exactly C's row r (column q) NaN, as in Cpu64: on
/// the scalar and vec4 paths and across split-K, whose clamped edge loads must not leak.
#[test]
fn matmul_puts_nan_exactly_where_cpu64_does() {
    let gpu = gpu();
    for (m, k, n) in MATMUL_SIZES {
        for (trans_a, trans_b) in [(false, false), (true, false), (false, true), (true, true)] {
            let spec = metaseg_autograd::MatmulSpec { trans_a, trans_b };
            let a_dims = if trans_a { [k, m] } else { [m, k] };
            let b_dims = if trans_b { [n, k] } else { [k, n] };
            let (mut a, a_shape) = input(11, &Shape::from(a_dims), -1.0, 1.0);
            let (mut b, b_shape) = input(12, &Shape::from(b_dims), -1.0, 1.0);
            // The last row of op(A) and the last column of op(B), at the last k.
            a[if trans_a {
                (k - 1) * m + m - 1
            } else {
                m * k - 1
            }] = f64::NAN;
            b[if trans_b {
                n * k - 1
            } else {
                (k - 1) * n + n - 1
            }] = f64::NAN;
            let expected = {
                let (a, b) = (Cpu64.tensor(&a, &a_shape), Cpu64.tensor(&b, &b_shape));
                let c = Cpu64.matmul(&a.unwrap(), &b.unwrap(), spec).unwrap();
                Cpu64.to_f64(&c).unwrap()
            };
            let actual = {
                let (a, b) = (gpu.tensor(&a, &a_shape), gpu.tensor(&b, &b_shape));
                let c = gpu.matmul(&a.unwrap(), &b.unwrap(), spec).unwrap();
                gpu.to_f64(&c).unwrap()
            };
            let nan = |v: &[f64]| v.iter().map(|x| x.is_nan()).collect::<Vec<_>>();
            assert_eq!(expected.iter().filter(|x| x.is_nan()).count(), m + n - 1);
            assert_eq!(nan(&actual), nan(&expected), "{m}x{k}x{n} {spec:?}");
        }
    }
}

#[test]
fn every_op_of_the_runner_table_is_covered_here() {
    let covered = [
        "neg",
        "exp",
        "square",
        "relu",
        "sigmoid",
        "tanh",
        "log",
        "sqrt",
        "leaky_relu",
        "clamp",
        "add",
        "sub",
        "mul",
        "div",
        "sum",
        "mean",
        "matmul",
        // tests/gpu_conv.rs
        "conv3d",
        "conv_transpose3d",
        // tests/gpu_layers.rs
        "max_pool3d",
        "avg_pool3d",
        "upsample_nearest",
        "upsample_trilinear",
        "batch_norm3d",
        "instance_norm3d",
        "dropout3d",
        "concat",
        "slice",
        // tests/gpu_losses.rs
        "softmax",
        "log_softmax",
        "cross_entropy",
        "binary_cross_entropy",
        "softmax_mse",
        "softmax_dice",
        "sigmoid_dice",
        "sharpen",
        "entropy",
        "ema",
        // tests/meta.rs
        "meta_gradient",
        // tests/mlb_reference.rs (the GPU against the f64 reference, which Cpu64 matches)
        "mlb_step",
        // tests/gpu_contrastive.rs
        "local_contrastive",
        "dense_infonce",
        "sample_anchors",
        // tests/gpu_distance.rs
        "edt",
        "sdf",
        "sdf_probability",
        // tests/gpu_warp.rs
        "warp",
        "warp_adjoint",
    ];
    for op in op_names() {
        assert!(covered.contains(op), "op {op} has no GPU-vs-Cpu64 test");
    }
}

#[test]
fn random_numbers_match_the_reference_bit_for_bit() {
    let g = gpu();
    let shape = Shape::from([1001]);
    // A counter just below 2^32 checks the carry into the high word.
    for (seed, counter) in [
        (0u64, 0u64),
        (42, 1 << 20),
        (7, (1 << 32) - 500),
        (u64::MAX, 3),
    ] {
        let u_gpu = g
            .to_f64(
                &g.random(&shape, Distribution::Uniform, seed, counter)
                    .unwrap(),
            )
            .unwrap();
        let u_cpu = Cpu64
            .random(&shape, Distribution::Uniform, seed, counter)
            .unwrap();
        let what = format!("uniform, seed {seed}, counter {counter}");
        Tolerance::new(0.0, 0.0).assert(&what, &u_gpu, &u_cpu.data);
        let n_gpu = g
            .to_f64(
                &g.random(&shape, Distribution::Normal, seed, counter)
                    .unwrap(),
            )
            .unwrap();
        let n_cpu = Cpu64
            .random(&shape, Distribution::Normal, seed, counter)
            .unwrap();
        Tolerance::new(1e-4, 1e-4).assert("normal", &n_gpu, &n_cpu.data);
    }
}

#[test]
fn closed_forms_and_extreme_inputs() {
    let g = gpu();
    // sum of 0..n = n (n - 1) / 2, exact in f32 while every partial sum stays below 2^24.
    let n = 5000;
    let iota: Vec<f64> = (0..n).map(f64::from).collect();
    let x = Var::from_f64(&g, &iota, &Shape::from([n as usize]), false).unwrap();
    assert_eq!(x.sum().unwrap().item().unwrap(), f64::from(n * (n - 1) / 2));

    // sigmoid and tanh saturate without overflow; relu and clamp are exact.
    let extremes = [-100.0, -30.0, 0.0, 30.0, 100.0];
    let x = g.tensor(&extremes, &Shape::from([5])).unwrap();
    let sig = g.to_f64(&g.unary(UnaryOp::Sigmoid, &x).unwrap()).unwrap();
    let tanh = g.to_f64(&g.unary(UnaryOp::Tanh, &x).unwrap()).unwrap();
    Tolerance::new(1e-7, 0.0).assert("sigmoid", &sig, &[0.0, 0.0, 0.5, 1.0, 1.0]);
    Tolerance::new(1e-7, 0.0).assert("tanh", &tanh, &[-1.0, -1.0, 0.0, 1.0, 1.0]);
    let clamp = g
        .to_f64(
            &g.unary(
                UnaryOp::Clamp {
                    min: -1.0,
                    max: 2.0,
                },
                &x,
            )
            .unwrap(),
        )
        .unwrap();
    assert_eq!(clamp, vec![-1.0, -1.0, 0.0, 2.0, 2.0]);
}

#[test]
fn fill_copy_and_reshape() {
    let g = gpu();
    let s = Shape::from([3, 7]);
    let f = g.fill(&s, 2.5).unwrap();
    assert_eq!(g.to_f64(&f).unwrap(), vec![2.5; 21]);
    let x = g.tensor(&seeded(21, 1, -1.0, 1.0), &s).unwrap();
    let c = g.copy(&x).unwrap();
    assert_eq!(g.to_f64(&c).unwrap(), g.to_f64(&x).unwrap());
    let r = g.reshape(&x, &Shape::from([7, 3])).unwrap();
    assert_eq!(r.shape(), &Shape::from([7, 3]));
    assert!(g.reshape(&x, &Shape::from([5, 5])).is_err());
}

/// Mesa's CPU adapters flush f32 subnormals as GPUs do (src/gpu/denormals.rs: otherwise their
/// worker threads take a microcode assist per subnormal operation), and leave small normal values.
#[test]
fn cpu_adapters_flush_subnormals() {
    let g = gpu();
    if g.context().adapter.info.device_type != wgpu::DeviceType::Cpu {
        eprintln!("not a CPU adapter: subnormal handling is the hardware's");
        return;
    }
    let shape = Shape::from([2, 33]);
    let mut a = vec![1e-39; 33];
    a.extend(vec![1e-30; 33]);
    let a = g.tensor(&a, &shape).unwrap();
    let half = g.tensor(&[0.5; 66], &shape).unwrap();
    let product = g
        .to_f64(&g.binary(BinaryOp::Mul, &a, &half).unwrap())
        .unwrap();
    assert!(
        product[..33].iter().all(|&v| v == 0.0),
        "{:?}",
        &product[..3]
    );
    assert!(product[33..]
        .iter()
        .all(|&v| (v / 5e-31 - 1.0).abs() < 1e-6));
}

/// Issue 24 item 4: elementwise ops, broadcasts, sums and random draws with the binding limit
/// forced down to 8 KiB (2048 elements). Same-shaped operands run in ranges of 2048 elements
/// (boundaries inside a sample of 945), broadcasts in ranges of samples, a sum over 5000 values in
/// ranges whose sums add up.
#[test]
fn elementwise_broadcasts_and_sums_with_a_small_binding_limit_match_the_reference() {
    let g = small_binding_gpu();
    let s = Shape::from([3, 3, 7, 5, 9]);
    let tol = Tolerance::F32_ACCUMULATED;
    for op in ["exp", "relu", "square"] {
        assert_matches_cpu64_on(&g, op, &[], &[input(1, &s, -2.0, 2.0)], tol);
    }
    let (a, b) = (input(2, &s, -1.0, 1.0), input(3, &s, 0.5, 2.0));
    for op in ["add", "mul", "div"] {
        assert_matches_cpu64_on(&g, op, &[], &[a.clone(), b.clone()], tol);
    }
    let per_channel = input(4, &Shape::from([1, 3, 1, 1, 1]), 0.5, 2.0);
    let per_sample = input(5, &Shape::from([3, 1, 1, 1, 1]), 0.5, 2.0);
    for c in [per_channel, per_sample] {
        assert_matches_cpu64_on(&g, "mul", &[], &[a.clone(), c.clone()], tol);
        assert_matches_cpu64_on(&g, "sub", &[], &[c, a.clone()], tol);
    }
    for (shape, axes) in [
        (Shape::from([5000]), "axes=0"),
        (s.clone(), "axes=1"),
        (s.clone(), "axes=0,2,3,4"),
    ] {
        assert_matches_cpu64_on(&g, "sum", &[axes], &[input(6, &shape, -1.0, 1.0)], tol);
    }
    let draws = Shape::from([3001]);
    for dist in [Distribution::Uniform, Distribution::Normal] {
        let on_gpu = g.to_f64(&g.random(&draws, dist, 7, 40).unwrap()).unwrap();
        let on_cpu = Cpu64.random(&draws, dist, 7, 40).unwrap();
        Tolerance::new(1e-4, 1e-4).assert("random", &on_gpu, &on_cpu.data);
    }
    assert_split(
        &g,
        &[
            "elementwise.wgsl:unary[OP=1]",
            "elementwise.wgsl:binary[OP=0,X_FULL=1,Y_FULL=1,RANK=1]",
            "mul",
            "sub",
            "sum",
            "random_uniform",
            "random_normal",
        ],
    );
}

/// A kernel that does not split refuses a tensor larger than one binding, naming itself: never a
/// truncated binding.
#[test]
fn a_kernel_that_does_not_split_refuses_a_tensor_over_the_binding_limit() {
    let g = small_binding_gpu();
    let a = g.fill(&Shape::from([50, 50]), 1.0).unwrap();
    let err = g
        .matmul(&a, &a, Default::default())
        .err()
        .expect("a refusal")
        .to_string();
    assert!(
        err.contains("matmul.wgsl:matmul") && err.contains("does not split"),
        "{err}"
    );
}
