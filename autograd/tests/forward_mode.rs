//! Forward mode: every op with a forward-mode rule against central differences of the op and
//! against reverse mode (the adjoint identity), on seeded inputs at odd sizes; and the typed error
//! of an op without one.

use metaseg_autograd::check::{assert_jvp, one_hot, seeded, CpuFn};
use metaseg_autograd::{
    jvp, BatchStatistic, Conv3dGeometry, ConvSpec, Cpu64, DiceOptions, Error, MatmulSpec, Shape,
    Statistic, Tolerance, UnaryOp, Upsample, Var, Window3d,
};

fn check(what: &str, f: &CpuFn, shapes: &[Shape], lo: f64, hi: f64) {
    let inputs: Vec<(Vec<f64>, Shape)> = shapes
        .iter()
        .enumerate()
        .map(|(k, s)| (seeded(s.numel(), 20 + k as u64, lo, hi), s.clone()))
        .collect();
    let direction: Vec<Vec<f64>> = shapes
        .iter()
        .enumerate()
        .map(|(k, s)| seeded(s.numel(), 60 + k as u64, -1.0, 1.0))
        .collect();
    assert_jvp(what, f, &inputs, &direction, Tolerance::FINITE_DIFFERENCE);
}

fn s(dims: &[usize]) -> Shape {
    Shape(dims.to_vec())
}

#[test]
fn elementwise_ops() {
    let unary = [
        UnaryOp::Neg,
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Sqrt,
        UnaryOp::Square,
        UnaryOp::Relu,
        UnaryOp::LeakyRelu { slope: 0.1 },
        UnaryOp::Sigmoid,
        UnaryOp::Tanh,
        UnaryOp::Clamp { min: 0.3, max: 0.8 },
        UnaryOp::Scale { factor: -1.5 },
        UnaryOp::AddScalar { value: 2.0 },
    ];
    for op in unary {
        let f: &CpuFn = &move |x| x[0].unary(op);
        check(op.name(), f, &[s(&[3, 7])], 0.1, 1.0);
    }
    // Odd broadcasts on either side.
    let pairs = [(s(&[3, 1, 5]), s(&[4, 1])), (s(&[2]), s(&[3, 2]))];
    for (a, b) in pairs {
        check(
            "add",
            &|x| x[0].add(&x[1]),
            &[a.clone(), b.clone()],
            0.5,
            2.0,
        );
        check(
            "sub",
            &|x| x[0].sub(&x[1]),
            &[a.clone(), b.clone()],
            0.5,
            2.0,
        );
        check(
            "mul",
            &|x| x[0].mul(&x[1]),
            &[a.clone(), b.clone()],
            0.5,
            2.0,
        );
        check("div", &|x| x[0].div(&x[1]), &[a, b], 0.5, 2.0);
    }
}

#[test]
fn shape_ops_reductions_and_matmul() {
    check(
        "reshape",
        &|x| x[0].reshape(&s(&[5, 3])),
        &[s(&[3, 5])],
        -1.0,
        1.0,
    );
    check("copy", &|x| x[0].copy(), &[s(&[7])], -1.0, 1.0);
    check(
        "broadcast_to",
        &|x| x[0].broadcast_to(&s(&[2, 3, 5])),
        &[s(&[3, 1])],
        -1.0,
        1.0,
    );
    check(
        "sum",
        &|x| x[0].sum_axes(&[0, 2], false),
        &[s(&[2, 3, 5])],
        -1.0,
        1.0,
    );
    check(
        "mean",
        &|x| x[0].mean_axes(&[1], true),
        &[s(&[2, 3, 5])],
        -1.0,
        1.0,
    );
    for (trans_a, trans_b) in [(false, false), (true, false), (false, true), (true, true)] {
        let spec = MatmulSpec { trans_a, trans_b };
        let a = if trans_a {
            s(&[2, 5, 3])
        } else {
            s(&[2, 3, 5])
        };
        let b = if trans_b { s(&[4, 5]) } else { s(&[5, 4]) };
        check(
            "matmul",
            &move |x| x[0].matmul(&x[1], spec),
            &[a, b],
            -1.0,
            1.0,
        );
    }
}

#[test]
fn convolutions() {
    let x = s(&[2, 2, 3, 4, 5]);
    let w = s(&[3, 2, 3, 2, 3]);
    let spec = ConvSpec::new([1, 2, 1], [1, 0, 1]);
    check(
        "conv3d",
        &move |v| v[0].conv3d(&v[1], Some(&v[2]), spec),
        &[x.clone(), w.clone(), s(&[3])],
        -1.0,
        1.0,
    );
    let g = Conv3dGeometry::new(&x, &w, spec).unwrap();
    let y = g.output_shape();
    check(
        "conv3d_grad_input",
        &move |v| v[0].conv3d_grad_input(&v[1], Some(&v[2]), g),
        &[y.clone(), w, s(&[2])],
        -1.0,
        1.0,
    );
    check(
        "conv3d_grad_weight",
        &move |v| v[0].conv3d_grad_weight(&v[1], g),
        &[x, y],
        -1.0,
        1.0,
    );
}

#[test]
fn layers() {
    let x = s(&[2, 3, 4, 5, 3]);
    let pool = Window3d {
        kernel: [2, 2, 1],
        stride: [2, 1, 1],
    };
    check(
        "max_pool3d",
        &move |v| v[0].max_pool3d(pool),
        std::slice::from_ref(&x),
        -1.0,
        1.0,
    );
    let pooled = pool.output_shape("max_pool3d", &x).unwrap();
    check(
        "max_pool3d_scatter",
        &move |v| v[0].max_pool3d_scatter(&v[1], pool),
        &[x.clone(), pooled],
        -1.0,
        1.0,
    );
    check(
        "avg_pool3d",
        &move |v| v[0].avg_pool3d(pool),
        std::slice::from_ref(&x),
        -1.0,
        1.0,
    );
    for mode in [Upsample::Nearest, Upsample::Trilinear] {
        let f: &CpuFn = &move |v| v[0].upsample3d(mode, [2, 1, 3]);
        check(mode.name(), f, std::slice::from_ref(&x), -1.0, 1.0);
        let f: &CpuFn = &move |v| v[0].upsample3d_backward(mode, [2, 1, 2], &s(&[2, 3, 2, 5, 2]));
        check("upsample3d_backward", f, &[s(&[2, 3, 4, 5, 4])], -1.0, 1.0);
    }
    check(
        "concat",
        &|v| Var::concat_channels(&[&v[0], &v[1]]),
        &[x.clone(), x.clone()],
        -1.0,
        1.0,
    );
    let per_channel = s(&[1, 3, 1, 1, 1]);
    check(
        "channel_affine",
        &|v| v[0].channel_affine(&v[1], &v[2]),
        &[x.clone(), per_channel.clone(), per_channel.clone()],
        -1.0,
        1.0,
    );
    check(
        "channel_affine_relu",
        &|v| v[0].channel_affine_relu(&v[1], &v[2]),
        &[x.clone(), per_channel.clone(), per_channel.clone()],
        -1.0,
        1.0,
    );
    check(
        "channel_dots",
        &|v| v[0].channel_dots(&v[1]),
        &[x.clone(), x.clone()],
        -1.0,
        1.0,
    );
    check(
        "channel_dots of a tensor with itself",
        &|v| v[0].channel_dots(&v[0]),
        std::slice::from_ref(&x),
        -1.0,
        1.0,
    );
    check(
        "batch_norm3d_train_relu",
        &|v| Ok(v[0].batch_norm3d_train_relu(&v[1], &v[2], 1e-5)?.0),
        &[x.clone(), s(&[3]), s(&[3])],
        -1.0,
        1.0,
    );
    // Composed of the above: batch norm with batch statistics.
    check(
        "batch_norm3d",
        &|v| Ok(v[0].batch_norm3d_train(&v[1], &v[2], 1e-5)?.0),
        &[x.clone(), s(&[3]), s(&[3])],
        -1.0,
        1.0,
    );
    let count = x.numel() / 3;
    for statistic in [
        Statistic::Mean,
        Statistic::Variance,
        Statistic::Scale,
        Statistic::Shift,
    ] {
        let spec = BatchStatistic {
            statistic,
            count,
            eps: 1e-3,
        };
        check(
            &format!("batch_statistic {statistic:?}"),
            &|v| {
                v[0].channel_dots(&v[0])?
                    .batch_statistic(&v[1], &v[2], spec)
            },
            &[x.clone(), s(&[3]), s(&[3])],
            -1.0,
            1.0,
        );
    }
}

#[test]
fn classification_losses() {
    let z = s(&[2, 3, 3, 5]);
    let y = one_hot(&z, 4, Some(1));
    check(
        "softmax",
        &|v| v[0].softmax_channels(),
        std::slice::from_ref(&z),
        -3.0,
        3.0,
    );
    check(
        "log_softmax",
        &|v| v[0].log_softmax_channels(),
        std::slice::from_ref(&z),
        -3.0,
        3.0,
    );
    // Soft targets move too.
    check(
        "cross_entropy_voxels",
        &|v| v[0].cross_entropy_voxels(&v[1]),
        &[z.clone(), z.clone()],
        0.1,
        1.0,
    );
    let target = Var::from_f64(&Cpu64, &y, &z, false).unwrap();
    let f: &CpuFn = &move |v| v[0].cross_entropy_voxels(&target);
    check("cross_entropy_voxels, one-hot target", f, &[z], -3.0, 3.0);
}

#[test]
fn an_op_without_a_forward_mode_rule_is_a_typed_error() {
    let shape = s(&[1, 2, 3]);
    let z = Var::from_f64(&Cpu64, &seeded(6, 1, -1.0, 1.0), &shape, false).unwrap();
    let y = Var::from_f64(&Cpu64, &one_hot(&shape, 2, None), &shape, false).unwrap();
    let dz = Var::from_f64(&Cpu64, &[1.0; 6], &shape, false).unwrap();
    let dice = |z: &[Var<Cpu64>]| z[0].softmax_dice(&y, DiceOptions::default());
    let err = jvp(dice, &[z], &[dz]).err().unwrap();
    assert!(
        matches!(
            err,
            Error::NoForwardMode {
                op: "softmax_dice_sums"
            }
        ),
        "{err}"
    );
}

#[test]
fn an_op_without_a_forward_mode_rule_off_the_path_to_the_output_is_no_error() {
    // Forward mode runs every op of f, but only the output's dependence matters: y = 2 z, with
    // a Dice loss computed on the side and dropped.
    let shape = s(&[1, 2, 3]);
    let z = Var::from_f64(&Cpu64, &seeded(6, 1, -1.0, 1.0), &shape, false).unwrap();
    let y = Var::from_f64(&Cpu64, &one_hot(&shape, 2, None), &shape, false).unwrap();
    let dz = Var::from_f64(&Cpu64, &seeded(6, 2, -1.0, 1.0), &shape, false).unwrap();
    let f = |z: &[Var<Cpu64>]| {
        z[0].softmax_dice(&y, DiceOptions::default())?;
        z[0].scale(2.0)
    };
    let (_, t) = jvp(f, &[z], std::slice::from_ref(&dz)).unwrap();
    let twice: Vec<f64> = dz.to_f64().unwrap().iter().map(|d| 2.0 * d).collect();
    Tolerance::F64.assert("tangent of 2 z", &t.to_f64().unwrap(), &twice);
}
