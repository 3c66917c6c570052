//! MLB-Seg's meta step: the meta-gradient g = dL_meta(theta'(eps))/d eps at eps = 0 by both exact
//! paths against f64 central finite differences (the runner's study network, and a V-Net with
//! batch norm, fixed dropout, momentum and weight decay), against a closed form for a per-voxel
//! softmax-regression model, and on the GPU against Cpu64; and the weight normalisation kernel.

mod common;

use common::{gpu, seeded};
use metaseg::meta::{MetaPath, MetaStep, Sgd};
use metaseg::nn::{Mode, Network, VNet, VNetConfig};
use metaseg::runner::{run, Settings};
use metaseg_autograd::check::one_hot;
use metaseg_autograd::{
    grad, Backend, ConvSpec, Cpu64, Error, MetaBackend, Normalization, Reduction, Shape, Tolerance,
    Var,
};

type Inputs = Vec<(String, Vec<f64>, Shape)>;

/// The runner's study network on 2 samples of 3x4x5 voxels, 2 input channels, 3 hidden, 3 classes.
fn study_inputs() -> Inputs {
    let x = Shape::from([2, 2, 3, 4, 5]);
    let y = Shape::from([2, 3, 3, 4, 5]);
    let named = |n: &str, v: Vec<f64>, s: &Shape| (n.to_string(), v, s.clone());
    vec![
        named("x_u", seeded(x.numel(), 1, -1.0, 1.0), &x),
        named("y_u", one_hot(&y, 2, None), &y),
        named("x_m", seeded(x.numel(), 3, -1.0, 1.0), &x),
        named("y_m", one_hot(&y, 4, None), &y),
        named(
            "w1",
            seeded(3 * 2 * 27, 5, -0.5, 0.5),
            &Shape::from([3, 2, 3, 3, 3]),
        ),
        named("b1", seeded(3, 6, -0.1, 0.1), &Shape::from([3])),
        named("w2", seeded(9, 7, -0.8, 0.8), &Shape::from([3, 3, 1, 1, 1])),
        named("b2", seeded(3, 8, -0.1, 0.1), &Shape::from([3])),
    ]
}

fn study_meta_gradient<B: metaseg::runner::OpBackend>(
    b: &B,
    path: &str,
    norm: &str,
) -> (Vec<f64>, Vec<f64>) {
    let settings = Settings::parse([
        "lr=0.1".to_string(),
        format!("path={path}"),
        format!("normalization={norm}"),
    ])
    .unwrap();
    let out = run(b, "meta_gradient", study_inputs(), &settings, None).unwrap();
    assert_eq!(out.output.1.dims(), [2, 1, 3, 4, 5]);
    (out.output.0, out.extras[0].1.clone())
}

/// L_meta(theta'(eps)) of the study network written out on its own: plain SGD with lr 0.1 on
/// sum(eps * c).
fn study_meta_loss(eps: &[f64]) -> f64 {
    let inputs = study_inputs();
    let var = |k: usize, p: bool| Var::from_f64(&Cpu64, &inputs[k].1, &inputs[k].2, p).unwrap();
    let theta: Vec<Var<Cpu64>> = (4..8).map(|k| var(k, true)).collect();
    let net = |t: &[Var<Cpu64>], x: &Var<Cpu64>| {
        let h = x.conv3d(&t[0], Some(&t[1]), ConvSpec::new([1; 3], [1; 3]));
        h.unwrap()
            .relu()
            .unwrap()
            .conv3d(&t[2], Some(&t[3]), ConvSpec::default())
            .unwrap()
    };
    let c = net(&theta, &var(0, false))
        .cross_entropy(&var(1, false), None, Reduction::None)
        .unwrap();
    let e = Var::from_f64(&Cpu64, eps, c.shape(), false).unwrap();
    let wrt: Vec<_> = theta.iter().collect();
    let g = grad(&c.mul(&e).unwrap().sum().unwrap(), &wrt, None, false).unwrap();
    let ahead: Vec<_> = theta
        .iter()
        .zip(&g)
        .map(|(t, g)| t.sub(&g.scale(0.1).unwrap()).unwrap())
        .collect();
    net(&ahead, &var(2, false))
        .cross_entropy(&var(3, false), None, Reduction::Mean)
        .unwrap()
        .item()
        .unwrap()
}

/// Central differences of `loss` at eps = 0 for the sampled entries, against `g` there, with the
/// error relative to the largest |g| (entries near zero have no relative error of their own).
fn assert_matches_finite_differences(g: &[f64], loss: impl Fn(&[f64]) -> f64, what: &str) {
    let h = 1e-4;
    let entries: Vec<usize> = (0..g.len()).step_by(g.len().div_ceil(10)).collect();
    let numeric: Vec<f64> = entries
        .iter()
        .map(|&i| {
            let mut e = vec![0.0; g.len()];
            e[i] = h;
            let up = loss(&e);
            e[i] = -h;
            (up - loss(&e)) / (2.0 * h)
        })
        .collect();
    let exact: Vec<f64> = entries.iter().map(|&i| g[i]).collect();
    let scale = g.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(scale > 0.0, "{what}: the meta-gradient is all zero");
    Tolerance::new(1e-6 * scale, 0.0).assert(what, &exact, &numeric);
}

#[test]
fn the_study_networks_meta_gradient_matches_finite_differences_on_both_paths() {
    for path in ["reverse", "fast"] {
        let (g, _) = study_meta_gradient(&Cpu64, path, "clip");
        assert_matches_finite_differences(&g, study_meta_loss, path);
    }
}

#[test]
fn both_paths_agree_on_the_gpu_and_with_cpu64_and_the_weights_are_a_distribution() {
    let g = gpu();
    let (reverse, _) = study_meta_gradient(&g, "reverse", "clip");
    let (fast, weights) = study_meta_gradient(&g, "fast", "clip");
    let (cpu, cpu_weights) = study_meta_gradient(&Cpu64, "fast", "clip");
    let scale = cpu.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    Tolerance::new(1e-4 * scale, 1e-4).assert("fast vs reverse (GPU)", &fast, &reverse);
    Tolerance::new(1e-3 * scale, 1e-3).assert("GPU vs Cpu64", &fast, &cpu);
    let total: f64 = weights.iter().sum();
    assert!((total - 1.0).abs() < 1e-5, "weights sum to {total}");
    assert!(weights.iter().all(|&w| w >= 0.0));
    // Where a weight is clearly nonzero (its g clearly negative), both devices give it.
    for ((w, c), g) in weights.iter().zip(&cpu_weights).zip(&cpu) {
        if *g < -1e-2 * scale {
            assert!((w - c).abs() <= 1e-3 * c, "weight {w} vs {c}");
        }
    }
}

#[test]
fn a_softmax_regression_model_has_the_hand_derived_meta_gradient() {
    // Per voxel z = w x + b (a 1x1x1 convolution, 1 channel in, K classes out), p = softmax(z),
    // c_v = -sum_k y_vk log p_vk, so grad_w c_v = (p_v - y_v) x_v and grad_b c_v = p_v - y_v.
    // Plain SGD at eps = 0 leaves theta' = theta, so v = grad L_meta(theta) with
    // v_w = mean_m (p_m - y_m) x_m, v_b = mean_m (p_m - y_m), and
    // g_v = -lr sum_k (p_vk - y_vk) (x_v v_wk + v_bk).
    let (k, lr) = (3usize, 0.5);
    let xs = Shape::from([2, 1, 2, 3, 3]);
    let ys = Shape::from([2, k, 2, 3, 3]);
    let (x_u, x_m) = (
        seeded(xs.numel(), 1, -2.0, 2.0),
        seeded(xs.numel(), 2, -2.0, 2.0),
    );
    let (y_u, y_m) = (one_hot(&ys, 3, None), one_hot(&ys, 4, None));
    let (w, b) = (seeded(k, 5, -1.0, 1.0), seeded(k, 6, -1.0, 1.0));
    let voxels = xs.numel();
    let per_class = |x: &[f64], y: &[f64], v: usize| {
        let (n, s) = (v / 18, v % 18);
        let z: Vec<f64> = (0..k).map(|c| w[c] * x[v] + b[c]).collect();
        let top = z.iter().fold(f64::NEG_INFINITY, |m, z| m.max(*z));
        let total: f64 = z.iter().map(|z| (z - top).exp()).sum();
        (0..k)
            .map(|c| (z[c] - top).exp() / total - y[(n * k + c) * 18 + s])
            .collect::<Vec<f64>>()
    };
    let (mut v_w, mut v_b) = (vec![0.0; k], vec![0.0; k]);
    for m in 0..voxels {
        for (c, r) in per_class(&x_m, &y_m, m).into_iter().enumerate() {
            v_w[c] += r * x_m[m] / voxels as f64;
            v_b[c] += r / voxels as f64;
        }
    }
    let expected: Vec<f64> = (0..voxels)
        .map(|v| {
            let r = per_class(&x_u, &y_u, v);
            -lr * (0..k)
                .map(|c| r[c] * (x_u[v] * v_w[c] + v_b[c]))
                .sum::<f64>()
        })
        .collect();

    let var = |v: &[f64], s: &Shape, p| Var::from_f64(&Cpu64, v, s, p).unwrap();
    let theta = vec![
        var(&w, &Shape::from([k, 1, 1, 1, 1]), true),
        var(&b, &Shape::from([k]), true),
    ];
    let net = |t: &[Var<Cpu64>], x: &[f64]| {
        var(x, &xs, false).conv3d(&t[0], Some(&t[1]), ConvSpec::default())
    };
    let costs = |t: &[Var<Cpu64>]| {
        net(t, &x_u)?.cross_entropy(&var(&y_u, &ys, false), None, Reduction::None)
    };
    let meta_loss = |t: &[Var<Cpu64>]| {
        net(t, &x_m)?.cross_entropy(&var(&y_m, &ys, false), None, Reduction::Mean)
    };
    let step = MetaStep {
        theta: &theta,
        buffers: None,
        sgd: Sgd {
            lr,
            momentum: 0.0,
            weight_decay: 0.0,
        },
        costs: &costs,
        other: None,
        meta_loss: &meta_loss,
    };
    for path in [MetaPath::Reverse, MetaPath::Fast] {
        let g = step.meta_gradient(path).unwrap().to_f64().unwrap();
        Tolerance::F64.assert(&format!("{path:?}"), &g, &expected);
    }
}

/// A V-Net meta step as MLB-Seg takes it: costs against two label sources stacked [N, 2, ...],
/// another loss term, SGD with momentum buffers and weight decay, batch norm on batch statistics
/// and dropout with a fixed draw.
#[test]
fn a_vnet_meta_step_with_momentum_matches_finite_differences_on_both_paths() {
    let net = VNet::new(VNetConfig {
        in_channels: 1,
        classes: 2,
        base_width: 2,
        levels: 2,
        dropout: Some(0.5),
        sdf_head: false,
        projection: None,
        ..VNetConfig::default()
    })
    .unwrap();
    let params = net.init_params(&Cpu64, 3).unwrap();
    let stats = net.init_stats(&Cpu64).unwrap();
    let theta = params.values();
    let buffers: Vec<Var<Cpu64>> = theta
        .iter()
        .enumerate()
        .map(|(k, t)| {
            let n = t.shape().numel();
            Var::from_f64(
                &Cpu64,
                &seeded(n, 50 + k as u64, -0.1, 0.1),
                t.shape(),
                false,
            )
            .unwrap()
        })
        .collect();
    let sgd = Sgd {
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 5e-4,
    };
    let (xs, ys) = (Shape::from([2, 1, 4, 4, 2]), Shape::from([2, 2, 4, 4, 2]));
    let constant = |v: Vec<f64>, s: &Shape| Var::from_f64(&Cpu64, &v, s, false).unwrap();
    let x_u = constant(seeded(xs.numel(), 1, -1.0, 1.0), &xs);
    let x_m = constant(seeded(xs.numel(), 2, -1.0, 1.0), &xs);
    let [y_init, y_ple, y_m] = [3, 4, 5].map(|s| constant(one_hot(&ys, s, None), &ys));
    let mode = Mode::Train { seed: 9, step: 1 };
    let logits = |t: &[Var<Cpu64>], x: &Var<Cpu64>| {
        let f = metaseg::nn::Forward::new(t, stats.values(), mode);
        net.forward(&f, x).map(|o| o.logits)
    };
    let costs = |t: &[Var<Cpu64>]| {
        let z = logits(t, &x_u)?;
        let c_init = z.cross_entropy(&y_init, None, Reduction::None)?;
        let c_ple = z.cross_entropy(&y_ple, None, Reduction::None)?;
        Var::concat_channels(&[&c_init, &c_ple])
    };
    let other = |t: &[Var<Cpu64>]| logits(t, &x_u)?.softmax_mse(&y_m.scale(3.0)?)?.scale(0.1);
    let meta_loss = |t: &[Var<Cpu64>]| logits(t, &x_m)?.cross_entropy(&y_m, None, Reduction::Mean);
    let step = MetaStep {
        theta,
        buffers: Some(&buffers),
        sgd,
        costs: &costs,
        other: Some(&other),
        meta_loss: &meta_loss,
    };
    // L_meta(theta'(eps)) written out: the real look-ahead on sum(eps c) + other.
    let loss_at = |eps: &[f64]| {
        let c = costs(theta).unwrap();
        let e = constant(eps.to_vec(), c.shape());
        let total = c
            .mul(&e)
            .unwrap()
            .sum()
            .unwrap()
            .add(&other(theta).unwrap())
            .unwrap();
        let g = grad(&total, &theta.iter().collect::<Vec<_>>(), None, false).unwrap();
        let (ahead, _) = sgd.step(theta, &g, Some(&buffers)).unwrap();
        meta_loss(&ahead).unwrap().item().unwrap()
    };
    let reverse = step
        .meta_gradient(MetaPath::Reverse)
        .unwrap()
        .to_f64()
        .unwrap();
    let fast = step
        .meta_gradient(MetaPath::Fast)
        .unwrap()
        .to_f64()
        .unwrap();
    assert_eq!(reverse.len(), 2 * 2 * 32);
    assert_matches_finite_differences(&reverse, loss_at, "reverse");
    let scale = reverse.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    Tolerance::new(1e-9 * scale, 1e-9).assert("fast vs reverse (f64)", &fast, &reverse);
}

#[test]
fn sgd_steps_as_pytorch() {
    // theta 1, grad 0.5, buffer 2, lr 0.1, momentum 0.9, wd 0.01:
    // d = 0.5 + 0.01 = 0.51; buf = 0.9 * 2 + 0.51 = 2.31; theta' = 1 - 0.231 = 0.769.
    let one = |v: f64| Var::from_f64(&Cpu64, &[v], &Shape::from([1]), false).unwrap();
    let sgd = Sgd {
        lr: 0.1,
        momentum: 0.9,
        weight_decay: 0.01,
    };
    let (next, bufs) = sgd
        .step(&[one(1.0)], &[one(0.5)], Some(&[one(2.0)]))
        .unwrap();
    Tolerance::F64.assert("theta'", &next[0].to_f64().unwrap(), &[0.769]);
    Tolerance::F64.assert("buffer", &bufs[0].to_f64().unwrap(), &[2.31]);
    // Without a buffer (the first step) the buffer is d itself.
    let (next, _) = sgd.step(&[one(1.0)], &[one(0.5)], None).unwrap();
    Tolerance::F64.assert("first step", &next[0].to_f64().unwrap(), &[1.0 - 0.051]);
}

#[test]
fn weight_normalisations_on_the_gpu_match_cpu64_and_sum_to_one() {
    let g = gpu();
    // More entries than one pass of the partial sums covers (256 x 256), and not a multiple of
    // the workgroup size; meta-gradients of both signs.
    let shape = Shape::from([3, 2, 11, 41, 37]);
    let values = seeded(shape.numel(), 12, -1e-3, 1e-3);
    for norm in Normalization::NAMES {
        let n = Normalization::parse(norm).unwrap();
        let t = g.tensor(&values, &shape).unwrap();
        let gpu_w = g.to_f64(&g.meta_weights(&t, n).unwrap()).unwrap();
        let cpu_w = Cpu64
            .meta_weights(&Cpu64.tensor(&values, &shape).unwrap(), n)
            .unwrap()
            .data
            .to_vec();
        let scale = cpu_w.iter().fold(0.0f64, |m, v| m.max(*v));
        Tolerance::new(1e-4 * scale, 1e-3).assert(norm, &gpu_w, &cpu_w);
        let total: f64 = gpu_w.iter().sum();
        assert!((total - 1.0).abs() < 1e-4, "{norm}: sum {total}");
        assert!(gpu_w.iter().all(|&w| w >= 0.0), "{norm}");
    }
}

#[test]
fn clip_weights_follow_their_formula_and_have_no_gradient() {
    let g = [0.3, -0.1, -0.3, 0.0];
    let v = Var::from_f64(&Cpu64, &g, &Shape::from([4]), true).unwrap();
    let w = v.meta_weights(Normalization::Clip).unwrap();
    let total = 0.4 + 1e-10;
    Tolerance::F64.assert(
        "clip",
        &w.to_f64().unwrap(),
        &[0.0, 0.1 / total, 0.3 / total, 0.0],
    );
    let err = grad(&w.sum().unwrap(), &[&v], None, false).err().unwrap();
    assert!(
        matches!(err, Error::NoGradient { op: "meta_weights" }),
        "{err}"
    );
}
