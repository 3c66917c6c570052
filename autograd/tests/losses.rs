//! The loss family on the reference backend: every loss's gradient against central finite
//! differences in f64 and its Hessian-vector product (second order) against differences of the
//! gradient, plus closed forms: cross-entropy of a uniform prediction is log C, Dice of a one-hot
//! prediction with itself is 1, the closed-form gradient of softmax-Dice, entropy of a uniform
//! distribution, shift invariance of softmax.

use metaseg_autograd::check::{analytic_gradient, assert_gradients, CpuFn};
use metaseg_autograd::{Cpu64, DiceOptions, Reduction, Shape, Tolerance, Var};

use metaseg_autograd::check::seeded;

/// [N, C, D, H, W] = [2, 3, 1, 2, 3]: small enough for finite differences of every element.
fn shape() -> Shape {
    Shape::from([2, 3, 1, 2, 3])
}

use metaseg_autograd::check::one_hot;

/// Checks f's first and second derivatives with respect to every input.
fn check(what: &str, f: &CpuFn, inputs: &[(Vec<f64>, Shape)], out_numel: usize) {
    let weights = seeded(out_numel, 11, -1.0, 1.0);
    let direction: Vec<Vec<f64>> = inputs
        .iter()
        .enumerate()
        .map(|(k, (v, _))| seeded(v.len(), 50 + k as u64, -1.0, 1.0))
        .collect();
    assert_gradients(
        what,
        f,
        inputs,
        &weights,
        &direction,
        Tolerance::FINITE_DIFFERENCE,
    );
}

fn logits(seed: u64) -> (Vec<f64>, Shape) {
    (seeded(shape().numel(), seed, -2.0, 2.0), shape())
}

fn soft(seed: u64) -> (Vec<f64>, Shape) {
    (seeded(shape().numel(), seed, 0.0, 1.0), shape())
}

fn voxels() -> usize {
    shape().numel() / 3
}

#[test]
fn softmax_and_log_softmax_gradients() {
    let n = shape().numel();
    check("softmax", &|x| x[0].softmax_channels(), &[logits(1)], n);
    check(
        "log_softmax",
        &|x| x[0].log_softmax_channels(),
        &[logits(2)],
        n,
    );
}

#[test]
fn softmax_sums_to_one_and_log_softmax_is_its_log_and_shift_invariant() {
    let (z, s) = logits(3);
    let x = Var::from_f64(&Cpu64, &z, &s, false).unwrap();
    let p = x.softmax_channels().unwrap();
    let sums = p.sum_axes(&[1], false).unwrap().to_f64().unwrap();
    Tolerance::F64.assert("sum_c softmax", &sums, &vec![1.0; voxels()]);
    let log_p = x.log_softmax_channels().unwrap().to_f64().unwrap();
    let p_log: Vec<f64> = p.to_f64().unwrap().iter().map(|v| v.ln()).collect();
    Tolerance::F64.assert("log_softmax = log softmax", &log_p, &p_log);
    // softmax(z + 1000) = softmax(z): the max is subtracted before exp.
    let shifted = x.add_scalar(1000.0).unwrap().softmax_channels().unwrap();
    Tolerance::F64.assert("shift", &shifted.to_f64().unwrap(), &p.to_f64().unwrap());
}

#[test]
fn cross_entropy_gradients_with_weight_and_every_reduction() {
    let w = (seeded(voxels(), 4, 0.0, 2.0), shape().reduced(&[1]));
    for (reduction, numel) in [
        (Reduction::None, voxels()),
        (Reduction::Sum, 1),
        (Reduction::Mean, 1),
    ] {
        check(
            &format!("cross_entropy {reduction:?}"),
            &move |x| x[0].cross_entropy(&x[1], None, reduction),
            &[logits(5), soft(6)],
            numel,
        );
        check(
            &format!("weighted cross_entropy {reduction:?}"),
            &move |x| x[0].cross_entropy(&x[1], Some(&x[2]), reduction),
            &[logits(7), soft(8), w.clone()],
            numel,
        );
    }
}

#[test]
fn cross_entropy_of_a_uniform_prediction_is_log_c() {
    // Equal logits give p = 1/C, so -sum_c y log p = log C for a one-hot target; mean keeps it.
    let s = shape();
    let z = Var::from_f64(&Cpu64, &vec![0.7; s.numel()], &s, false).unwrap();
    let y = Var::from_f64(&Cpu64, &one_hot(&s, 9, None), &s, false).unwrap();
    let ce = z.cross_entropy(&y, None, Reduction::Mean).unwrap();
    Tolerance::F64.assert("mean ce", &[ce.item().unwrap()], &[3f64.ln()]);
    let sum = z.cross_entropy(&y, None, Reduction::Sum).unwrap();
    let expected = voxels() as f64 * 3f64.ln();
    Tolerance::F64.assert("sum ce", &[sum.item().unwrap()], &[expected]);
    // The weight multiplies each voxel; mean still divides by N * voxels (not by the weights).
    let w = Var::from_f64(&Cpu64, &vec![2.0; voxels()], &s.reduced(&[1]), false).unwrap();
    let ce = z.cross_entropy(&y, Some(&w), Reduction::Mean).unwrap();
    Tolerance::F64.assert(
        "weighted mean ce",
        &[ce.item().unwrap()],
        &[2.0 * 3f64.ln()],
    );
}

#[test]
fn binary_cross_entropy_gradients_and_value_at_zero() {
    for (reduction, numel) in [(Reduction::None, voxels()), (Reduction::Mean, 1)] {
        check(
            &format!("bce {reduction:?}"),
            &move |x| x[0].binary_cross_entropy(&x[1], Some(&x[2]), reduction),
            &[
                logits(10),
                soft(11),
                (seeded(voxels(), 12, 0.0, 2.0), shape().reduced(&[1])),
            ],
            numel,
        );
    }
    // At z = 0 each element costs log 2 whatever y is: C log 2 per voxel.
    let s = shape();
    let z = Var::from_f64(&Cpu64, &vec![0.0; s.numel()], &s, false).unwrap();
    let y = Var::from_f64(&Cpu64, &soft(13).0, &s, false).unwrap();
    let bce = z.binary_cross_entropy(&y, None, Reduction::None).unwrap();
    let expected = vec![3.0 * 2f64.ln(); voxels()];
    Tolerance::F64.assert("bce(0)", &bce.to_f64().unwrap(), &expected);
    // Large logits do not overflow: bce(+-100, y) = 100 (1 - y) or 100 y, per element.
    let z = Var::from_f64(&Cpu64, &[100.0, -100.0], &Shape::from([1, 2]), false).unwrap();
    let y = Var::from_f64(&Cpu64, &[0.25, 0.25], &Shape::from([1, 2]), false).unwrap();
    let bce = z.binary_cross_entropy(&y, None, Reduction::Sum).unwrap();
    Tolerance::F64.assert("bce(+-100)", &[bce.item().unwrap()], &[75.0 + 25.0]);
}

#[test]
fn softmax_mse_gradients_and_invariance() {
    check(
        "softmax_mse",
        &|x| x[0].softmax_mse(&x[1]),
        &[logits(14), logits(15)],
        1,
    );
    let (a, s) = logits(16);
    let a = Var::from_f64(&Cpu64, &a, &s, false).unwrap();
    let b = a.add_scalar(3.0).unwrap();
    Tolerance::F64.assert(
        "mse(a, a + 3)",
        &[a.softmax_mse(&b).unwrap().item().unwrap()],
        &[0.0],
    );
}

fn dice_options() -> [DiceOptions; 3] {
    let d = DiceOptions::default();
    [
        d,
        DiceOptions {
            squared: false,
            ..d
        },
        DiceOptions {
            include_background: false,
            smooth: 0.1,
            ..d
        },
    ]
}

#[test]
fn softmax_dice_gradients_with_soft_and_one_hot_targets_and_an_empty_class() {
    let s = shape();
    for options in dice_options() {
        check(
            &format!("softmax_dice {options:?}, soft target"),
            &move |x| x[0].softmax_dice(&x[1], options),
            &[logits(17), soft(18)],
            1,
        );
        check(
            &format!("softmax_dice {options:?}, one-hot target with class 2 empty"),
            &move |x| x[0].softmax_dice(&x[1], options),
            &[logits(19), (one_hot(&s, 20, Some(2)), s.clone())],
            1,
        );
    }
}

#[test]
fn the_fused_cross_entropy_backward_is_differentiable() {
    // The incoming gradient per voxel, and as one value for all voxels (a summed loss).
    for g_shape in [shape().reduced(&[1]), Shape::from([1, 1, 1, 1, 1])] {
        check(
            &format!("cross_entropy_backward, gradient {g_shape}"),
            &|x| x[0].cross_entropy_backward(&x[1], &x[2]),
            &[
                logits(33),
                soft(34),
                (seeded(g_shape.numel(), 35, -1.0, 1.0), g_shape.clone()),
            ],
            shape().numel(),
        );
    }
}

#[test]
fn the_fused_softmax_dice_backward_is_differentiable() {
    // Its inputs (logits, target, the [3, C] gradient of the sums) all get first- and second-order
    // checks: this is the rule the meta-gradient goes through.
    for squared in [true, false] {
        check(
            &format!("softmax_dice_backward squared={squared}"),
            &move |x| x[0].softmax_dice_backward(&x[1], &x[2], squared),
            &[
                logits(30),
                soft(31),
                (seeded(9, 32, -1.0, 1.0), Shape::from([3, 3])),
            ],
            shape().numel(),
        );
    }
}

#[test]
fn dice_of_a_one_hot_prediction_with_itself_is_one() {
    // Logits 60 * y give p = y up to exp(-60); then I = P = Y per class and each dice is 1, also for
    // the class absent from both ((0 + s) / (0 + s)).
    let s = shape();
    let y = one_hot(&s, 21, Some(1));
    let z: Vec<f64> = y.iter().map(|v| 60.0 * v).collect();
    let z = Var::from_f64(&Cpu64, &z, &s, false).unwrap();
    let y = Var::from_f64(&Cpu64, &y, &s, false).unwrap();
    for options in dice_options() {
        let loss = z.softmax_dice(&y, options).unwrap().item().unwrap();
        Tolerance::new(1e-12, 0.0).assert("softmax dice loss", &[loss], &[0.0]);
    }
    let y1 = Var::from_f64(&Cpu64, &[1.0, 0.0, 1.0], &Shape::from([1, 1, 3]), false).unwrap();
    let z1 = y1.scale(80.0).unwrap().add_scalar(-40.0).unwrap();
    let loss = z1.sigmoid_dice(&y1, DiceOptions::default()).unwrap();
    Tolerance::new(1e-12, 0.0).assert("sigmoid dice loss", &[loss.item().unwrap()], &[0.0]);
}

#[test]
fn softmax_dice_gradient_matches_its_closed_form() {
    // Squared Dice, all classes: with A_c = 2 I_c + s and B_c = P_c + Y_c + s,
    // dL/dp_ci = -(1/C) (2 y_ci / B_c - 2 p_ci A_c / B_c^2), and dL/dz = p (dL/dp - sum_c p dL/dp).
    let s = shape();
    let (z, _) = logits(22);
    let y = one_hot(&s, 23, Some(0));
    let options = DiceOptions::default();
    let f = move |x: &[Var<Cpu64>]| x[0].softmax_dice(&x[1], options);
    let analytic = analytic_gradient(
        &f,
        &[(z.clone(), s.clone()), (y.clone(), s.clone())],
        &[1.0],
    )
    .unwrap()
    .remove(0);

    let (n, c, vox) = (2, 3, voxels() / 2);
    let at = |b: usize, k: usize, v: usize| (b * c + k) * vox + v;
    let mut p = vec![0.0; z.len()];
    for b in 0..n {
        for v in 0..vox {
            let total: f64 = (0..c).map(|k| z[at(b, k, v)].exp()).sum();
            for k in 0..c {
                p[at(b, k, v)] = z[at(b, k, v)].exp() / total;
            }
        }
    }
    let (mut a, mut bd) = (vec![options.smooth; c], vec![options.smooth; c]);
    for i in 0..z.len() {
        let k = (i / vox) % c;
        a[k] += 2.0 * p[i] * y[i];
        bd[k] += p[i] * p[i] + y[i] * y[i];
    }
    let d_p: Vec<f64> = (0..z.len())
        .map(|i| {
            let k = (i / vox) % c;
            -(2.0 * y[i] / bd[k] - 2.0 * p[i] * a[k] / (bd[k] * bd[k])) / c as f64
        })
        .collect();
    let mut expected = vec![0.0; z.len()];
    for b in 0..n {
        for v in 0..vox {
            let dot: f64 = (0..c).map(|k| p[at(b, k, v)] * d_p[at(b, k, v)]).sum();
            for k in 0..c {
                expected[at(b, k, v)] = p[at(b, k, v)] * (d_p[at(b, k, v)] - dot);
            }
        }
    }
    Tolerance::F64.assert("dL/dz", &analytic, &expected);
}

#[test]
fn sigmoid_dice_gradients() {
    let s = Shape::from([2, 1, 2, 2, 3]);
    for options in [DiceOptions::default(), dice_options()[1]] {
        check(
            &format!("sigmoid_dice {options:?}"),
            &move |x| x[0].sigmoid_dice(&x[1], options),
            &[
                (seeded(s.numel(), 24, -2.0, 2.0), s.clone()),
                (seeded(s.numel(), 25, 0.0, 1.0), s.clone()),
            ],
            1,
        );
    }
}

#[test]
fn sharpen_and_entropy_gradients_and_closed_forms() {
    let probs = (seeded(shape().numel(), 26, 0.05, 0.95), shape());
    check(
        "sharpen",
        &|x| x[0].sharpen(0.5),
        std::slice::from_ref(&probs),
        shape().numel(),
    );
    check(
        "entropy",
        &|x| x[0].entropy(1e-6),
        std::slice::from_ref(&probs),
        voxels(),
    );

    // sharpen(p, T) = p^(1/T) / (p^(1/T) + (1-p)^(1/T)), the definition, against the logit form.
    let p = Var::from_f64(&Cpu64, &probs.0, &probs.1, false).unwrap();
    for t in [0.5, 1.0, 2.0] {
        let expected: Vec<f64> = probs
            .0
            .iter()
            .map(|p| p.powf(1.0 / t) / (p.powf(1.0 / t) + (1.0 - p).powf(1.0 / t)))
            .collect();
        Tolerance::F64.assert(
            "sharpen",
            &p.sharpen(t).unwrap().to_f64().unwrap(),
            &expected,
        );
    }
    // A uniform distribution over C classes has entropy log C.
    let u = Var::from_f64(&Cpu64, &vec![1.0 / 3.0; shape().numel()], &shape(), false).unwrap();
    let h = u.entropy(0.0).unwrap().to_f64().unwrap();
    Tolerance::F64.assert("entropy", &h, &vec![3f64.ln(); voxels()]);
}

#[test]
fn ema_is_the_convex_combination_and_its_gradient() {
    let s = Shape::from([37]);
    let (t, st) = (seeded(37, 27, -1.0, 1.0), seeded(37, 28, -1.0, 1.0));
    check(
        "ema",
        &|x| x[0].ema(&x[1], 0.99),
        &[(t.clone(), s.clone()), (st.clone(), s.clone())],
        37,
    );
    let tv = Var::from_f64(&Cpu64, &t, &s, false).unwrap();
    let sv = Var::from_f64(&Cpu64, &st, &s, false).unwrap();
    let expected: Vec<f64> = t.iter().zip(&st).map(|(t, s)| 0.9 * t + 0.1 * s).collect();
    Tolerance::F64.assert(
        "ema",
        &tv.ema(&sv, 0.9).unwrap().to_f64().unwrap(),
        &expected,
    );
}

#[test]
fn shape_errors_name_the_op() {
    let a = Var::from_f64(&Cpu64, &[0.0; 6], &Shape::from([1, 2, 3]), false).unwrap();
    let b = Var::from_f64(&Cpu64, &[0.0; 6], &Shape::from([1, 3, 2]), false).unwrap();
    let Err(err) = a.cross_entropy(&b, None, Reduction::Mean) else {
        panic!("mismatched shapes accepted");
    };
    assert!(err.to_string().starts_with("cross_entropy: "), "{err}");
    let w = Var::from_f64(&Cpu64, &[1.0; 6], &Shape::from([1, 2, 3]), false).unwrap();
    let Err(err) = a.cross_entropy(&a, Some(&w), Reduction::Mean) else {
        panic!("a weight of the wrong shape accepted");
    };
    assert!(err.to_string().contains("weight"), "{err}");
    let one = Var::from_f64(&Cpu64, &[0.0; 3], &Shape::from([1, 1, 3]), false).unwrap();
    let options = DiceOptions {
        include_background: false,
        ..DiceOptions::default()
    };
    assert!(one.softmax_dice(&one, options).is_err());
}
