//! The tape on the reference backend: closed-form derivatives, second order, typed errors,
//! and every op's gradients against central finite differences.

use metaseg_autograd::check::{assert_gradients, CpuFn};
use metaseg_autograd::{grad, Cpu64, Error, MatmulSpec, Result, Rule, Shape, Tolerance, Var};

use metaseg_autograd::check::seeded;

fn scalar(x: f64) -> Var<Cpu64> {
    Var::from_f64(&Cpu64, &[x], &Shape::scalar(), true).unwrap()
}

#[test]
fn second_derivatives_match_closed_forms() {
    // f(x) = x^3 via x * square(x): f' = 3x^2, f'' = 6x.
    let x = scalar(1.7);
    let f = x.mul(&x.square().unwrap()).unwrap();
    let d1 = grad(&f, &[&x], None, true).unwrap().remove(0);
    let d2 = grad(&d1, &[&x], None, false).unwrap().remove(0);
    Tolerance::F64.assert("x^3'", &d1.to_f64().unwrap(), &[3.0 * 1.7 * 1.7]);
    Tolerance::F64.assert("x^3''", &d2.to_f64().unwrap(), &[6.0 * 1.7]);

    // sigmoid'' = s (1 - s) (1 - 2 s); tanh'' = -2 t (1 - t^2); exp'' = exp; log'' = -1/x^2;
    // sqrt'' = -x^(-3/2) / 4.
    let x0 = 0.6_f64;
    let s = 1.0 / (1.0 + (-x0).exp());
    let t = x0.tanh();
    type ScalarFn = fn(&Var<Cpu64>) -> Result<Var<Cpu64>>;
    let cases: Vec<(&str, ScalarFn, f64)> = vec![
        ("sigmoid", |x| x.sigmoid(), s * (1.0 - s) * (1.0 - 2.0 * s)),
        ("tanh", |x| x.tanh(), -2.0 * t * (1.0 - t * t)),
        ("exp", |x| x.exp(), x0.exp()),
        ("log", |x| x.log(), -1.0 / (x0 * x0)),
        ("sqrt", |x| x.sqrt(), -0.25 * x0.powf(-1.5)),
        (
            "div",
            |x| Var::ones(&Cpu64, x.shape())?.div(x),
            2.0 / x0.powi(3),
        ),
    ];
    for (name, f, expected) in cases {
        let x = scalar(x0);
        let d1 = grad(&f(&x).unwrap(), &[&x], None, true).unwrap().remove(0);
        let d2 = grad(&d1, &[&x], None, false).unwrap().remove(0);
        Tolerance::F64.assert(name, &d2.to_f64().unwrap(), &[expected]);
    }
}

#[test]
fn third_derivative_through_two_levels_of_create_graph() {
    // f = exp(2x): f''' = 8 exp(2x).
    let x = scalar(0.3);
    let f = x.scale(2.0).unwrap().exp().unwrap();
    let d1 = grad(&f, &[&x], None, true).unwrap().remove(0);
    let d2 = grad(&d1, &[&x], None, true).unwrap().remove(0);
    let d3 = grad(&d2, &[&x], None, false).unwrap().remove(0);
    Tolerance::F64.assert("exp(2x)'''", &d3.to_f64().unwrap(), &[8.0 * 0.6_f64.exp()]);
}

#[test]
fn gradient_without_create_graph_is_a_constant() {
    let x = scalar(2.0);
    let d1 = grad(&x.square().unwrap(), &[&x], None, false)
        .unwrap()
        .remove(0);
    assert!(!d1.requires_grad());
    let with_graph = grad(&x.square().unwrap(), &[&x], None, true)
        .unwrap()
        .remove(0);
    assert!(with_graph.requires_grad());
}

#[test]
fn unused_input_gets_zero_gradient_and_shared_input_accumulates() {
    let x = scalar(3.0);
    let unused = scalar(5.0);
    // y = x*x + x: dy/dx = 2x + 1 = 7 (x used three times).
    let y = x.mul(&x).unwrap().add(&x).unwrap();
    let g = grad(&y, &[&x, &unused], None, false).unwrap();
    assert_eq!(g[0].to_f64().unwrap(), vec![7.0]);
    assert_eq!(g[1].to_f64().unwrap(), vec![0.0]);
}

#[test]
fn an_op_without_rule_or_with_first_order_rule_is_a_typed_error() {
    let x = scalar(1.0);
    let no_rule = Var::from_op("round", x.value().clone(), &[&x], Rule::None);
    assert!(matches!(
        grad(&no_rule, &[&x], None, false),
        Err(Error::NoGradient { op: "round" })
    ));

    let first_order_only = Var::from_op(
        "fused_square",
        x.square().unwrap().value().clone(),
        &[&x],
        Rule::FirstOrder(Box::new(
            |_, inputs: &[&metaseg_autograd::CpuTensor], _, g: &metaseg_autograd::CpuTensor| {
                let x = inputs[0].data[0];
                Ok(vec![Some(metaseg_autograd::CpuTensor {
                    data: std::sync::Arc::new(vec![2.0 * x * g.data[0]]),
                    shape: Shape::scalar(),
                })])
            },
        )),
    );
    let d = grad(&first_order_only, &[&x], None, false)
        .unwrap()
        .remove(0);
    assert_eq!(d.to_f64().unwrap(), vec![2.0]);
    assert!(matches!(
        grad(&first_order_only, &[&x], None, true),
        Err(Error::NoSecondOrder { op: "fused_square" })
    ));
}

#[test]
fn shape_errors_name_the_op_and_both_shapes() {
    let a = Var::zeros(&Cpu64, &Shape::from([2, 3])).unwrap();
    let b = Var::zeros(&Cpu64, &Shape::from([4])).unwrap();
    let msg = a.add(&b).err().unwrap().to_string();
    assert!(
        msg.contains("add") && msg.contains("[2, 3]") && msg.contains("[4]"),
        "{msg}"
    );
    let msg = a
        .matmul(&a, MatmulSpec::default())
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("matmul") && msg.contains("inner"), "{msg}");
}

/// Every differentiable op through `assert_gradients`: reverse mode and Hessian-vector products
/// against central differences in f64.
#[test]
fn every_op_passes_first_and_second_order_finite_differences() {
    let x_shape = Shape::from([2, 3, 1, 2, 3]);
    let n = x_shape.numel();
    let c_shape = Shape::from([1, 3, 1, 1, 1]);
    let positive = |seed| seeded(n, seed, 0.5, 2.0);
    // Inputs kept away from the kinks of relu/clamp so the finite differences are smooth.
    let away_from_kinks: Vec<f64> = seeded(n, 3, 0.1, 0.9)
        .iter()
        .enumerate()
        .map(|(i, v)| if i % 2 == 0 { *v } else { -*v })
        .collect();

    type Case = (&'static str, Box<CpuFn<'static>>, Vec<(Vec<f64>, Shape)>);
    let one = |f: fn(&Var<Cpu64>) -> Result<Var<Cpu64>>| -> Box<CpuFn<'static>> {
        Box::new(move |v: &[Var<Cpu64>]| f(&v[0]))
    };
    let two = |f: fn(&Var<Cpu64>, &Var<Cpu64>) -> Result<Var<Cpu64>>| -> Box<CpuFn<'static>> {
        Box::new(move |v: &[Var<Cpu64>]| f(&v[0], &v[1]))
    };
    let signed = seeded(n, 1, -1.5, 1.5);
    let cases: Vec<Case> = vec![
        (
            "neg",
            one(|x| x.neg()),
            vec![(signed.clone(), x_shape.clone())],
        ),
        (
            "exp",
            one(|x| x.exp()),
            vec![(signed.clone(), x_shape.clone())],
        ),
        (
            "log",
            one(|x| x.log()),
            vec![(positive(2), x_shape.clone())],
        ),
        (
            "sqrt",
            one(|x| x.sqrt()),
            vec![(positive(4), x_shape.clone())],
        ),
        (
            "square",
            one(|x| x.square()),
            vec![(signed.clone(), x_shape.clone())],
        ),
        (
            "relu",
            one(|x| x.relu()?.square()),
            vec![(away_from_kinks.clone(), x_shape.clone())],
        ),
        (
            "leaky_relu",
            one(|x| x.leaky_relu(0.1)?.square()),
            vec![(away_from_kinks.clone(), x_shape.clone())],
        ),
        (
            "sigmoid",
            one(|x| x.sigmoid()),
            vec![(signed.clone(), x_shape.clone())],
        ),
        (
            "tanh",
            one(|x| x.tanh()),
            vec![(signed.clone(), x_shape.clone())],
        ),
        (
            "clamp",
            one(|x| x.clamp(-0.5, 0.5)?.exp()),
            vec![(
                away_from_kinks.iter().map(|v| v * 1.2).collect(),
                x_shape.clone(),
            )],
        ),
        (
            "sum_axes",
            one(|x| x.sum_axes(&[0, 2, 4], false)?.square()),
            vec![(signed.clone(), x_shape.clone())],
        ),
        (
            "mean",
            one(|x| x.square()?.mean()),
            vec![(signed.clone(), x_shape.clone())],
        ),
        (
            "add per-channel",
            two(|a, b| a.add(b)?.square()),
            vec![
                (signed.clone(), x_shape.clone()),
                (seeded(3, 5, -1.0, 1.0), c_shape.clone()),
            ],
        ),
        (
            "sub scalar",
            two(|a, b| b.sub(a)?.square()),
            vec![
                (signed.clone(), x_shape.clone()),
                (vec![0.3], Shape::scalar()),
            ],
        ),
        (
            "mul",
            two(|a, b| a.mul(b)),
            vec![
                (signed.clone(), x_shape.clone()),
                (seeded(n, 6, -1.0, 1.0), x_shape.clone()),
            ],
        ),
        (
            "mul per-channel",
            two(|a, b| a.mul(b)),
            vec![
                (signed.clone(), x_shape.clone()),
                (seeded(3, 7, -1.0, 1.0), c_shape.clone()),
            ],
        ),
        (
            "div",
            two(|a, b| a.div(b)),
            vec![
                (signed.clone(), x_shape.clone()),
                (positive(8), x_shape.clone()),
            ],
        ),
        (
            "div per-channel",
            two(|a, b| a.div(b)),
            vec![
                (signed.clone(), x_shape.clone()),
                (seeded(3, 9, 0.5, 2.0), c_shape.clone()),
            ],
        ),
    ];
    for (name, f, inputs) in &cases {
        let out_len = f(&inputs
            .iter()
            .map(|(v, s)| Var::from_f64(&Cpu64, v, s, false).unwrap())
            .collect::<Vec<_>>())
        .unwrap()
        .shape()
        .numel();
        let weights = seeded(out_len, 100, -1.0, 1.0);
        let direction: Vec<Vec<f64>> = inputs
            .iter()
            .enumerate()
            .map(|(k, (v, _))| seeded(v.len(), 200 + k as u64, -1.0, 1.0))
            .collect();
        assert_gradients(
            name,
            f.as_ref(),
            inputs,
            &weights,
            &direction,
            Tolerance::FINITE_DIFFERENCE,
        );
    }
}

#[test]
fn matmul_gradients_for_every_transpose_and_batch_broadcast() {
    for trans_a in [false, true] {
        for trans_b in [false, true] {
            let spec = MatmulSpec { trans_a, trans_b };
            let (m, k, n) = (3, 4, 2);
            let a_shape = if trans_a { [2, k, m] } else { [2, m, k] };
            // b is shared across the batch (rank 2), as a 1x1x1 head's weight is.
            let b_shape = if trans_b { [n, k] } else { [k, n] };
            let inputs = vec![
                (seeded(2 * m * k, 1, -1.0, 1.0), Shape::from(a_shape)),
                (seeded(k * n, 2, -1.0, 1.0), Shape::from(b_shape)),
            ];
            // Squared so the Hessian is not zero.
            let f = move |v: &[Var<Cpu64>]| v[0].matmul(&v[1], spec)?.square();
            let weights = seeded(2 * m * n, 3, -1.0, 1.0);
            let direction = vec![seeded(2 * m * k, 4, -1.0, 1.0), seeded(k * n, 5, -1.0, 1.0)];
            let name = format!("matmul {spec:?}");
            assert_gradients(
                &name,
                &f,
                &inputs,
                &weights,
                &direction,
                Tolerance::FINITE_DIFFERENCE,
            );
        }
    }
}

#[test]
fn matmul_gradient_has_closed_form() {
    // L = sum(A @ B): dL/dA = 1 @ B^T (row sums of B), dL/dB = A^T @ 1 (column sums of A).
    let a = Var::from_f64(
        &Cpu64,
        &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        &Shape::from([2, 3]),
        true,
    )
    .unwrap();
    let b = Var::from_f64(
        &Cpu64,
        &[1.0, -1.0, 2.0, 0.5, -3.0, 1.0],
        &Shape::from([3, 2]),
        true,
    )
    .unwrap();
    let l = a.matmul(&b, MatmulSpec::default()).unwrap().sum().unwrap();
    let g = grad(&l, &[&a, &b], None, false).unwrap();
    let row_sums_b = [0.0, 2.5, -2.0];
    let col_sums_a = [5.0, 5.0, 7.0, 7.0, 9.0, 9.0];
    Tolerance::F64.assert(
        "dA",
        &g[0].to_f64().unwrap(),
        &[row_sums_b, row_sums_b].concat(),
    );
    Tolerance::F64.assert("dB", &g[1].to_f64().unwrap(), &col_sums_a);
}

#[test]
fn tolerance_reports_the_worst_element_and_rejects_nan() {
    let t = Tolerance::new(0.0, 0.1);
    let m = t.check(&[1.0, 2.5, 3.0], &[1.0, 2.0, 3.0]).unwrap_err();
    assert_eq!(
        (m.index, m.actual, m.reference, m.failures),
        (1, 2.5, 2.0, 1)
    );
    assert!(t.check(&[f64::NAN], &[1.0]).is_err());
    assert!(t.check(&[1.05], &[1.0]).is_ok());
    let exact = Tolerance::new(0.0, 0.0);
    assert!(exact.check(&[0.0, 2.0], &[0.0, 2.0]).is_ok());
    assert!(exact.check(&[1e-300], &[0.0]).is_err());
}
