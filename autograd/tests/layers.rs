//! Pooling, up-sampling, channel windows, normalisation and dropout on the reference backend:
//! gradients and Hessian-vector products against central finite differences in f64, adjoint
//! identities, and closed forms.

use metaseg_autograd::check::{assert_gradients, CpuFn};
use metaseg_autograd::{
    grad, second_order, Backend, BatchStatistic, Cpu64, LayerBackend, RunningStats, Shape,
    Statistic, Tolerance, Upsample, Var, Window3d,
};

use metaseg_autograd::check::seeded;

fn var(values: &[f64], shape: &Shape) -> Var<Cpu64> {
    Var::from_f64(&Cpu64, values, shape, true).unwrap()
}

fn window(k: usize, s: usize) -> Window3d {
    Window3d {
        kernel: [k; 3],
        stride: [s; 3],
    }
}

/// Checks first and second derivatives of `f` at seeded inputs of the given shapes.
fn check(what: &str, f: &CpuFn, shapes: &[Shape], lo: f64, hi: f64) {
    let inputs: Vec<(Vec<f64>, Shape)> = shapes
        .iter()
        .enumerate()
        .map(|(k, s)| (seeded(s.numel(), 10 + k as u64, lo, hi), s.clone()))
        .collect();
    let out = f(&inputs.iter().map(|(v, s)| var(v, s)).collect::<Vec<_>>()).unwrap();
    let weights = seeded(out.shape().numel(), 3, -1.0, 1.0);
    let direction: Vec<Vec<f64>> = shapes
        .iter()
        .enumerate()
        .map(|(k, s)| seeded(s.numel(), 50 + k as u64, -1.0, 1.0))
        .collect();
    assert_gradients(
        what,
        f,
        &inputs,
        &weights,
        &direction,
        Tolerance::FINITE_DIFFERENCE,
    );
}

// Odd sizes: windows that do not tile the input, overlapping windows (kernel 3, stride 2).
fn odd() -> Shape {
    Shape::from([2, 3, 5, 4, 7])
}

#[test]
fn pooling_gradients_and_second_order_match_finite_differences() {
    for (k, s) in [(2, 2), (3, 2), (2, 1)] {
        let w = window(k, s);
        // Squared so the second derivative runs through the backward's own backward.
        check(
            &format!("max_pool3d k{k} s{s}"),
            &|x| x[0].max_pool3d(w)?.square(),
            &[odd()],
            -1.0,
            1.0,
        );
        check(
            &format!("avg_pool3d k{k} s{s}"),
            &|x| x[0].avg_pool3d(w)?.square(),
            &[odd()],
            -1.0,
            1.0,
        );
    }
    let anisotropic = Window3d {
        kernel: [1, 2, 3],
        stride: [1, 2, 2],
    };
    check(
        "max_pool3d anisotropic",
        &|x| x[0].max_pool3d(anisotropic)?.square(),
        &[odd()],
        -1.0,
        1.0,
    );
    // The gather is linear in v and the scatter linear in g; products exercise both rules.
    check(
        "max_pool3d_gather",
        &|xv| xv[0].max_pool3d_gather(&xv[1], window(2, 2))?.square(),
        &[odd(), odd()],
        -1.0,
        1.0,
    );
    let pooled = Shape::from([2, 3, 2, 2, 3]);
    check(
        "max_pool3d_scatter",
        &|xg| xg[0].max_pool3d_scatter(&xg[1], window(2, 2))?.square(),
        &[odd(), pooled],
        -1.0,
        1.0,
    );
}

#[test]
fn upsampling_gradients_and_second_order_match_finite_differences() {
    for mode in [Upsample::Nearest, Upsample::Trilinear] {
        for scale in [[2, 2, 2], [1, 2, 3]] {
            check(
                &format!("{} {scale:?}", mode.name()),
                &|x| x[0].upsample3d(mode, scale)?.square(),
                &[Shape::from([2, 3, 3, 2, 5])],
                -1.0,
                1.0,
            );
        }
    }
}

#[test]
fn channel_ops_gradients_and_second_order_match_finite_differences() {
    let a = Shape::from([2, 3, 2, 3, 5]);
    let b = Shape::from([2, 2, 2, 3, 5]);
    check(
        "slice_channels",
        &|x| x[0].slice_channels(1, 2)?.square(),
        std::slice::from_ref(&a),
        -1.0,
        1.0,
    );
    check(
        "concat_channels",
        &|x| Var::concat_channels(&[&x[0], &x[1]])?.square(),
        &[a, b],
        -1.0,
        1.0,
    );
}

#[test]
fn channel_affine_gradients_and_second_order_match_finite_differences() {
    let x = Shape::from([2, 3, 2, 3, 5]);
    for ab in [Shape::from([1, 3, 1, 1, 1]), Shape::from([2, 3, 1, 1, 1])] {
        // x a + b is bilinear in (x, a); squaring makes every second derivative non-zero.
        check(
            &format!("channel_affine {ab}"),
            &|v| v[0].channel_affine(&v[1], &v[2])?.square(),
            &[x.clone(), ab.clone(), ab],
            -1.0,
            1.0,
        );
    }
    let per_voxel = Var::zeros(&Cpu64, &Shape::from([2, 3, 2, 1, 1])).unwrap();
    let xs = Var::zeros(&Cpu64, &x).unwrap();
    assert!(xs.channel_affine(&per_voxel, &per_voxel).is_err());
}

#[test]
fn fused_channel_primitives_match_finite_differences() {
    let x = Shape::from([2, 3, 2, 3, 5]);
    let c = Shape::from([1, 3, 1, 1, 1]);
    // Values of x a + b spread over both sides of the ReLU's kink.
    check(
        "channel_affine_relu",
        &|v| v[0].channel_affine_relu(&v[1], &v[2])?.square(),
        &[x.clone(), c.clone(), c],
        -1.0,
        1.0,
    );
    check(
        "channel_dots",
        &|v| v[0].channel_dots(&v[1])?.square(),
        &[x.clone(), x.clone()],
        -1.0,
        1.0,
    );
    check(
        "channel_dots of a tensor with itself",
        &|v| v[0].channel_dots(&v[0])?.square(),
        std::slice::from_ref(&x),
        -1.0,
        1.0,
    );
    check(
        "batch_norm3d_train_relu",
        &|v| v[0].batch_norm3d_train_relu(&v[1], &v[2], 1e-5)?.0.square(),
        &[x, Shape::from([3]), Shape::from([3])],
        -1.0,
        1.0,
    );
}

/// Closed forms: constants x = p, m = q give [p q N S, q N S] per channel; the fused affine and
/// ReLU is relu of the affine map; the batch norm from channel_dots' moments is the two-pass
/// definition computed here in plain loops.
#[test]
fn fused_channel_primitives_meet_their_definitions() {
    let shape = Shape::from([2, 3, 2, 3, 5]);
    let (p, q) = (0.5, -1.25);
    let x = Var::full(&Cpu64, &shape, p).unwrap();
    let m = Var::full(&Cpu64, &shape, q).unwrap();
    let per_channel = 2.0 * 30.0;
    let expected: Vec<f64> = [p * q * per_channel, q * per_channel]
        .iter()
        .flat_map(|&v| [v; 3])
        .collect();
    let dots = x.channel_dots(&m).unwrap().to_f64().unwrap();
    Tolerance::new(1e-12, 1e-12).assert("channel_dots", &dots, &expected);

    let values = seeded(shape.numel(), 7, -2.0, 3.0);
    let xs = var(&values, &shape);
    let (gamma, beta) = (seeded(3, 8, 0.5, 1.5), seeded(3, 9, -1.0, 1.0));
    let ab = Shape::from([1, 3, 1, 1, 1]);
    let (a, b) = (var(&gamma, &ab), var(&beta, &ab));
    let fused = xs.channel_affine_relu(&a, &b).unwrap().to_f64().unwrap();
    let composed = xs.channel_affine(&a, &b).unwrap().relu().unwrap();
    Tolerance::new(0.0, 0.0).assert("channel_affine_relu", &fused, &composed.to_f64().unwrap());

    let eps = 1e-5;
    let (g, bt) = (
        var(&gamma, &Shape::from([3])),
        var(&beta, &Shape::from([3])),
    );
    let (y, stats) = xs.batch_norm3d_train(&g, &bt, eps).unwrap();
    let volume = 30;
    let mut reference = vec![0.0; values.len()];
    for c in 0..3 {
        let of_c = |n: usize| (n * 3 + c) * volume..(n * 3 + c + 1) * volume;
        let all: Vec<usize> = (0..2).flat_map(of_c).collect();
        let mean = all.iter().map(|&i| values[i]).sum::<f64>() / all.len() as f64;
        let var_c = all.iter().map(|&i| (values[i] - mean).powi(2)).sum::<f64>() / all.len() as f64;
        for &i in &all {
            reference[i] = (values[i] - mean) / (var_c + eps).sqrt() * gamma[c] + beta[c];
        }
        let tol = Tolerance::new(1e-12, 1e-12);
        tol.assert("batch mean", &[stats.mean.to_f64().unwrap()[c]], &[mean]);
        tol.assert(
            "batch variance",
            &[stats.var.to_f64().unwrap()[c]],
            &[var_c],
        );
    }
    Tolerance::new(1e-10, 1e-10).assert("batch_norm3d", &y.to_f64().unwrap(), &reference);
    let (relu, _) = xs.batch_norm3d_train_relu(&g, &bt, eps).unwrap();
    let clipped: Vec<f64> = reference.iter().map(|v| v.max(0.0)).collect();
    Tolerance::new(1e-10, 1e-10).assert(
        "batch_norm3d_train_relu",
        &relu.to_f64().unwrap(),
        &clipped,
    );
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn each_backward_primitive_is_the_adjoint_of_its_forward() {
    // <A x, y> = <x, A^T y> for random x, y: the definition of the adjoint.
    let x = Cpu64.tensor(&seeded(odd().numel(), 1, -1.0, 1.0), &odd());
    let x = x.unwrap();
    let close = |what: &str, l: f64, r: f64| Tolerance::F64.assert(what, &[l], &[r]);
    for (k, s) in [(2, 2), (3, 2), (2, 1)] {
        let w = window(k, s);
        let ax = Cpu64.avg_pool3d(&x, w).unwrap();
        let y = seeded(ax.shape.numel(), 2, -1.0, 1.0);
        let y = Cpu64.tensor(&y, &ax.shape).unwrap();
        let aty = Cpu64.avg_pool3d_backward(&y, w, &odd()).unwrap();
        close(
            "avg_pool3d adjoint",
            dot(&ax.data, &y.data),
            dot(&x.data, &aty.data),
        );
        let v = Cpu64
            .tensor(&seeded(odd().numel(), 4, -1.0, 1.0), &odd())
            .unwrap();
        let gv = Cpu64.max_pool3d_gather(&x, &v, w).unwrap();
        let sy = Cpu64.max_pool3d_scatter(&x, &y, w).unwrap();
        close(
            "max_pool3d adjoint",
            dot(&gv.data, &y.data),
            dot(&v.data, &sy.data),
        );
    }
    for mode in [Upsample::Nearest, Upsample::Trilinear] {
        let scale = [2, 3, 2];
        let ux = Cpu64.upsample3d(&x, mode, scale).unwrap();
        let y = Cpu64
            .tensor(&seeded(ux.shape.numel(), 5, -1.0, 1.0), &ux.shape)
            .unwrap();
        let uty = Cpu64.upsample3d_backward(&y, mode, scale, &odd()).unwrap();
        close(mode.name(), dot(&ux.data, &y.data), dot(&x.data, &uty.data));
    }
}

#[test]
fn pooling_closed_forms() {
    // avg pool of a constant is the constant; its adjoint of ones counts the windows holding each
    // position / |window|, which for kernel = stride is exactly 1 / |window| on covered positions.
    let s = Shape::from([1, 2, 4, 6, 5]);
    let c = Var::full(&Cpu64, &s, 2.5).unwrap();
    let pooled = c.avg_pool3d(window(2, 2)).unwrap();
    assert!(pooled.to_f64().unwrap().iter().all(|&v| v == 2.5));
    // Max pool of x[d, h, w] = increasing in flat order: the window's last element (d, h, w all
    // at the window's end).
    let iota: Vec<f64> = (0..s.numel()).map(|i| i as f64).collect();
    let x = var(&iota, &s);
    let m = x.max_pool3d(window(2, 2)).unwrap().to_f64().unwrap();
    // Output [1, 2, 2, 3, 2]; element (c, od, oh, ow) is the input at (c, 2od+1, 2oh+1, 2ow+1).
    let mut k = 0;
    for ch in 0..2 {
        for od in 0..2 {
            for oh in 0..3 {
                for ow in 0..2 {
                    let flat = (((ch * 4 + 2 * od + 1) * 6 + 2 * oh + 1) * 5) + 2 * ow + 1;
                    assert_eq!(m[k], flat as f64);
                    k += 1;
                }
            }
        }
    }
    // Ties: on a constant input the whole gradient goes to each window's first position.
    let cv = var(&vec![1.0; s.numel()], &s);
    let d = grad(&cv.max_pool3d(window(2, 2)).unwrap(), &[&cv], None, false).unwrap();
    let d = d[0].to_f64().unwrap();
    for (i, &v) in d.iter().enumerate() {
        let (w, h, dd) = (i % 5, (i / 5) % 6, (i / 30) % 4);
        let first = w % 2 == 0 && h % 2 == 0 && dd % 2 == 0 && w < 4;
        assert_eq!(v, f64::from(u8::from(first)), "index {i}");
    }
}

#[test]
fn upsampling_closed_forms() {
    let s = Shape::from([2, 3, 3, 4, 5]);
    let x = var(&seeded(s.numel(), 9, -1.0, 1.0), &s);
    // Nearest up-sampling then average pooling over the same blocks is the identity.
    let scale = [2, 3, 2];
    let back = x
        .upsample3d(Upsample::Nearest, scale)
        .unwrap()
        .avg_pool3d(Window3d {
            kernel: scale,
            stride: scale,
        })
        .unwrap();
    Tolerance::F64.assert(
        "avg_pool(nearest(x))",
        &back.to_f64().unwrap(),
        &x.to_f64().unwrap(),
    );
    // Trilinear of x[.., w] = w along W: the source coordinate itself, (o + 0.5) / s - 0.5,
    // clamped to [0, W - 1] (at the low end by the clamp, at the high end by the last neighbour).
    let (width, sw) = (5, 3);
    let ramp_shape = Shape::from([1, 1, 2, 2, width]);
    let ramp: Vec<f64> = (0..ramp_shape.numel())
        .map(|i| (i % width) as f64)
        .collect();
    let up = var(&ramp, &ramp_shape)
        .upsample3d(Upsample::Trilinear, [1, 2, sw])
        .unwrap()
        .to_f64()
        .unwrap();
    for (i, &v) in up.iter().enumerate() {
        let o = (i % (width * sw)) as f64;
        let expected = ((o + 0.5) / sw as f64 - 0.5).clamp(0.0, (width - 1) as f64);
        Tolerance::F64.assert(&format!("trilinear ramp at {i}"), &[v], &[expected]);
    }
    // Trilinear of a constant is the constant (the weights of every output sum to one).
    let c = Var::full(&Cpu64, &s, -1.5).unwrap();
    let up = c.upsample3d(Upsample::Trilinear, [3, 2, 2]).unwrap();
    Tolerance::F64.assert(
        "trilinear constant",
        &up.to_f64().unwrap(),
        &vec![-1.5; up.shape().numel()],
    );
}

#[test]
fn slice_and_concat_closed_forms() {
    let a = Shape::from([2, 3, 1, 2, 2]);
    let b = Shape::from([2, 1, 1, 2, 2]);
    let xa = var(&seeded(a.numel(), 1, -1.0, 1.0), &a);
    let xb = var(&seeded(b.numel(), 2, -1.0, 1.0), &b);
    let cat = Var::concat_channels(&[&xa, &xb]).unwrap();
    assert_eq!(cat.shape(), &Shape::from([2, 4, 1, 2, 2]));
    // Slicing the concatenation gives the parts back exactly.
    let back_a = cat.slice_channels(0, 3).unwrap().to_f64().unwrap();
    let back_b = cat.slice_channels(3, 1).unwrap().to_f64().unwrap();
    assert_eq!(back_a, xa.to_f64().unwrap());
    assert_eq!(back_b, xb.to_f64().unwrap());
    assert!(xa.slice_channels(2, 2).is_err());
    assert!(Var::concat_channels(&[&xa, &var(&[0.0; 2], &Shape::from([1, 2, 1, 1, 1]))]).is_err());
}

fn per_channel_moments(y: &[f64], shape: &Shape, per_sample: bool) -> Vec<(f64, f64)> {
    let d = shape.dims();
    let (n, c, volume) = (d[0], d[1], d[2] * d[3] * d[4]);
    let groups: Vec<Vec<usize>> = if per_sample {
        (0..n * c).map(|g| vec![g]).collect()
    } else {
        (0..c)
            .map(|ch| (0..n).map(|b| b * c + ch).collect())
            .collect()
    };
    groups
        .iter()
        .map(|g| {
            let vals: Vec<f64> = g
                .iter()
                .flat_map(|&k| y[k * volume..(k + 1) * volume].iter().copied())
                .collect();
            let mean = vals.iter().sum::<f64>() / vals.len() as f64;
            let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64;
            (mean, var)
        })
        .collect()
}

#[test]
fn norm_gradients_and_second_order_match_finite_differences() {
    let x = Shape::from([2, 3, 2, 3, 3]);
    let c = Shape::from([3]);
    let eps = 1e-3;
    check(
        "batch_norm3d",
        &|v| Ok(v[0].batch_norm3d_train(&v[1], &v[2], eps)?.0),
        &[x.clone(), c.clone(), c.clone()],
        -1.0,
        1.0,
    );
    check(
        "batch_norm3d relu",
        &|v| Ok(v[0].batch_norm3d_train_relu(&v[1], &v[2], eps)?.0),
        &[x.clone(), c.clone(), c.clone()],
        -1.0,
        1.0,
    );
    check(
        "instance_norm3d",
        &|v| v[0].instance_norm3d(&v[1], &v[2], eps),
        &[x.clone(), c.clone(), c.clone()],
        -1.0,
        1.0,
    );
    check(
        "batch_norm3d eval",
        &|v| {
            let running = RunningStats {
                mean: v[3].clone(),
                var: v[4].clone(),
            };
            v[0].batch_norm3d_eval(&v[1], &v[2], &running, eps)
        },
        &[x, c.clone(), c.clone(), c.clone(), c],
        0.2,
        1.0,
    );
}

#[test]
fn norms_give_zero_mean_and_unit_variance() {
    let s = Shape::from([3, 4, 2, 3, 5]);
    let x = var(&seeded(s.numel(), 21, -3.0, 5.0), &s);
    let ones = Var::ones(&Cpu64, &Shape::from([4])).unwrap();
    let zeros = Var::zeros(&Cpu64, &Shape::from([4])).unwrap();
    let eps = 1e-5;
    let (y, stats) = x.batch_norm3d_train(&ones, &zeros, eps).unwrap();
    // With unit gamma and zero beta: mean 0, variance var / (var + eps) per channel.
    let batch_var = stats.var.to_f64().unwrap();
    let moments = per_channel_moments(&y.to_f64().unwrap(), &s, false);
    for (ch, (m, v)) in moments.iter().enumerate() {
        let expected = batch_var[ch] / (batch_var[ch] + eps);
        Tolerance::F64.assert("batch norm mean", &[*m], &[0.0]);
        Tolerance::new(1e-12, 1e-9).assert("batch norm variance", &[*v], &[expected]);
    }
    // The batch statistics are those of the input per channel.
    let input_moments = per_channel_moments(&x.to_f64().unwrap(), &s, false);
    let means: Vec<f64> = input_moments.iter().map(|m| m.0).collect();
    let vars: Vec<f64> = input_moments.iter().map(|m| m.1).collect();
    Tolerance::F64.assert("batch mean", &stats.mean.to_f64().unwrap(), &means);
    Tolerance::F64.assert("batch var", &batch_var, &vars);
    // Running update from (0, 1) with momentum m: (m mean, (1 - m) + m var n / (n - 1)).
    let m = 0.1;
    let count = 3 * 2 * 3 * 5;
    let running = RunningStats::new(&Cpu64, 4)
        .unwrap()
        .update(&stats, m)
        .unwrap();
    let expect_mean: Vec<f64> = means.iter().map(|x| m * x).collect();
    let expect_var: Vec<f64> = vars
        .iter()
        .map(|v| (1.0 - m) + m * v * count as f64 / (count - 1) as f64)
        .collect();
    Tolerance::F64.assert(
        "running mean",
        &running.mean.to_f64().unwrap(),
        &expect_mean,
    );
    Tolerance::F64.assert("running var", &running.var.to_f64().unwrap(), &expect_var);
    // Eval mode with the batch's own (biased) statistics reproduces the training output.
    let own = RunningStats {
        mean: stats.mean.clone(),
        var: stats.var.clone(),
    };
    let eval = x.batch_norm3d_eval(&ones, &zeros, &own, eps).unwrap();
    Tolerance::F64.assert("eval", &eval.to_f64().unwrap(), &y.to_f64().unwrap());

    // Instance norm: mean 0 and variance var / (var + eps) per sample and channel; then the affine.
    let gamma = var(&[2.0, -1.0, 0.5, 3.0], &Shape::from([4]));
    let beta = var(&[0.5, 1.0, -2.0, 0.0], &Shape::from([4]));
    let y = x.instance_norm3d(&gamma, &beta, eps).unwrap();
    let moments = per_channel_moments(&y.to_f64().unwrap(), &s, true);
    let input_moments = per_channel_moments(&x.to_f64().unwrap(), &s, true);
    for (k, ((m, v), (_, xv))) in moments.iter().zip(&input_moments).enumerate() {
        let (g, b) = ([2.0, -1.0, 0.5, 3.0][k % 4], [0.5, 1.0, -2.0, 0.0][k % 4]);
        Tolerance::F64.assert("instance norm mean", &[*m], &[b]);
        Tolerance::new(1e-12, 1e-9).assert("instance norm var", &[*v], &[g * g * xv / (xv + eps)]);
    }
}

#[test]
fn dropout_zeroes_whole_channels_and_scales_the_rest() {
    let s = Shape::from([4, 50, 1, 2, 3]);
    let values = seeded(s.numel(), 31, 0.5, 1.5); // never zero
    let x = var(&values, &s);
    let p = 0.3;
    let y = x.dropout3d(p, 7, 11).unwrap().to_f64().unwrap();
    let mut kept = 0;
    for k in 0..200 {
        let block = &y[k * 6..(k + 1) * 6];
        let input = &values[k * 6..(k + 1) * 6];
        if block.iter().all(|&v| v == 0.0) {
            continue;
        }
        kept += 1;
        let scaled: Vec<f64> = input.iter().map(|v| v / (1.0 - p)).collect();
        Tolerance::F64.assert("kept channel", block, &scaled);
    }
    // 200 channels kept with probability 0.7: mean 140, standard deviation 6.5; allow 4 of them.
    assert!((114..=166).contains(&kept), "{kept} of 200 channels kept");
    // The mask is a function of (seed, step): the same again, another for the next step.
    let again = x.dropout3d(p, 7, 11).unwrap().to_f64().unwrap();
    assert_eq!(again, y);
    let next = x.dropout3d(p, 7, 12).unwrap().to_f64().unwrap();
    assert_ne!(next, y);
    // Linear in x: the gradient is the mask itself.
    let d = grad(&x.dropout3d(p, 7, 11).unwrap(), &[&x], None, false).unwrap();
    let mask: Vec<f64> = y.iter().zip(&values).map(|(y, x)| y / x).collect();
    Tolerance::F64.assert("dropout gradient", &d[0].to_f64().unwrap(), &mask);
    assert!(x.dropout3d(1.0, 7, 11).is_err());
}

const STATISTICS: [Statistic; 4] = [
    Statistic::Mean,
    Statistic::Variance,
    Statistic::Scale,
    Statistic::Shift,
];

/// A batch's statistic from the moments of x ([2, 3, 2, 3, 3]: 36 elements per channel).
fn statistic_of(v: &[Var<Cpu64>], statistic: Statistic) -> metaseg_autograd::Result<Var<Cpu64>> {
    let s = BatchStatistic {
        statistic,
        count: 36,
        eps: 1e-3,
    };
    v[0].channel_dots(&v[0])?.batch_statistic(&v[1], &v[2], s)
}

/// The fused statistics' gradients (first order: the fused backward; second order: the
/// differentiable formulas, differentiated again) against central differences.
#[test]
fn batch_statistics_match_finite_differences_at_both_orders() {
    let c = Shape::from([3]);
    for statistic in STATISTICS {
        check(
            &format!("batch_statistic {statistic:?}"),
            &|v| statistic_of(v, statistic)?.square(),
            &[Shape::from([2, 3, 2, 3, 3]), c.clone(), c.clone()],
            -1.0,
            1.0,
        );
    }
}

/// Closed forms: each statistic is its two-pass definition computed here in plain loops, and
/// the fused first-order gradient equals the differentiable formulas' (taken with create_graph).
#[test]
fn batch_statistics_meet_their_definitions() {
    let x = Shape::from([2, 3, 2, 3, 3]);
    let values = seeded(x.numel(), 5, -2.0, 3.0);
    let (gamma, beta) = (seeded(3, 6, 0.5, 1.5), seeded(3, 7, -1.0, 1.0));
    let c = Shape::from([3]);
    let v = [var(&values, &x), var(&gamma, &c), var(&beta, &c)];
    for statistic in STATISTICS {
        let out = statistic_of(&v, statistic).unwrap();
        let expected: Vec<f64> = (0..3)
            .map(|k| {
                let of_k: Vec<f64> = (0..2)
                    .flat_map(|n| values[(n * 3 + k) * 18..(n * 3 + k + 1) * 18].to_vec())
                    .collect();
                let mean = of_k.iter().sum::<f64>() / 36.0;
                let var = of_k.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 36.0;
                let scale = gamma[k] / (var + 1e-3).sqrt();
                match statistic {
                    Statistic::Mean => mean,
                    Statistic::Variance => var,
                    Statistic::Scale => scale,
                    Statistic::Shift => beta[k] - mean * scale,
                }
            })
            .collect();
        let what = format!("batch_statistic {statistic:?}");
        Tolerance::new(1e-12, 1e-12).assert(&what, &out.to_f64().unwrap(), &expected);

        let weights = var(&seeded(3, 8, -1.0, 1.0), &c);
        let loss = out.mul(&weights).unwrap().sum().unwrap();
        let refs: Vec<&Var<Cpu64>> = v.iter().collect();
        let fused = grad(&loss, &refs, None, false).unwrap();
        let formulas = grad(&loss, &refs, None, true).unwrap();
        for (k, (a, b)) in fused.iter().zip(&formulas).enumerate() {
            Tolerance::new(1e-12, 1e-12).assert(
                &format!("{what}: fused and differentiable gradient of input {k}"),
                &a.to_f64().unwrap(),
                &b.to_f64().unwrap(),
            );
        }
    }
}

/// A batch norm in training mode (with and without its ReLU) has one first-order backward of its
/// own (`batch_norm_backward`); with create_graph the composed ops' gradient is taken instead.
/// The two agree, and d beta is the masked incoming gradient summed per channel (a closed form).
#[test]
fn fused_batch_norm_backward_is_the_composed_gradient() {
    let x = Shape::from([2, 3, 2, 3, 3]);
    let c = Shape::from([3]);
    let v = [
        var(&seeded(x.numel(), 21, -2.0, 3.0), &x),
        var(&seeded(3, 22, 0.5, 1.5), &c),
        var(&seeded(3, 23, -1.0, 1.0), &c),
    ];
    let weights = var(&seeded(x.numel(), 24, -1.0, 1.0), &x);
    for relu in [false, true] {
        let y = if relu {
            v[0].batch_norm3d_train_relu(&v[1], &v[2], 1e-3).unwrap().0
        } else {
            v[0].batch_norm3d_train(&v[1], &v[2], 1e-3).unwrap().0
        };
        let loss = y.mul(&weights).unwrap().sum().unwrap();
        let refs: Vec<&Var<Cpu64>> = v.iter().collect();
        let fused = grad(&loss, &refs, None, false).unwrap();
        let composed = grad(&loss, &refs, None, true).unwrap();
        for (k, (a, b)) in fused.iter().zip(&composed).enumerate() {
            Tolerance::new(1e-12, 1e-12).assert(
                &format!("batch norm (relu {relu}): fused and composed gradient of input {k}"),
                &a.to_f64().unwrap(),
                &b.to_f64().unwrap(),
            );
        }
        let (out, w) = (y.to_f64().unwrap(), weights.to_f64().unwrap());
        let d_beta: Vec<f64> = (0..3)
            .map(|k| {
                (0..2)
                    .flat_map(|n| (n * 3 + k) * 18..(n * 3 + k + 1) * 18)
                    .filter(|&i| !relu || out[i] > 0.0)
                    .map(|i| w[i])
                    .sum()
            })
            .collect();
        let what = format!("batch norm (relu {relu}): d beta");
        Tolerance::new(1e-12, 1e-12).assert(&what, &fused[2].to_f64().unwrap(), &d_beta);
    }
}

/// A batch norm (with or without its ReLU) on Cpu64 with its forward run inside
/// [`second_order`] or not: the output's op name, and the output, the batch's mean and
/// variance, the first-order gradients, the gradients taken with create_graph, and H v of
/// <weights, y> for a seeded direction, as f64.
fn batch_norm_derivatives(
    v: &[Var<Cpu64>; 3],
    relu: bool,
    in_scope: bool,
) -> (&'static str, Vec<Vec<f64>>) {
    let forward = || {
        if relu {
            v[0].batch_norm3d_train_relu(&v[1], &v[2], 1e-3)
        } else {
            v[0].batch_norm3d_train(&v[1], &v[2], 1e-3)
        }
    };
    let (y, stats) = if in_scope {
        second_order(forward)
    } else {
        forward()
    }
    .unwrap();
    let weights = var(&seeded(y.shape().numel(), 24, -1.0, 1.0), y.shape());
    let loss = y.mul(&weights).unwrap().sum().unwrap();
    let refs: Vec<&Var<Cpu64>> = v.iter().collect();
    let first = grad(&loss, &refs, None, false).unwrap();
    let recorded = grad(&loss, &refs, None, true).unwrap();
    let mut dot = Var::zeros(&Cpu64, &Shape::scalar()).unwrap();
    for (k, g) in recorded.iter().enumerate() {
        let direction = var(
            &seeded(g.shape().numel(), 60 + k as u64, -1.0, 1.0),
            g.shape(),
        );
        dot = dot.add(&g.mul(&direction).unwrap().sum().unwrap()).unwrap();
    }
    let hvps = grad(&dot, &refs, None, false).unwrap();
    let values = [&y, &stats.mean, &stats.var]
        .into_iter()
        .chain(&first)
        .chain(&recorded)
        .chain(&hvps)
        .map(|t| t.to_f64().unwrap())
        .collect();
    (y.op_name().unwrap(), values)
}

/// Inside `second_order` a batch norm in training mode records its composition in the forward
/// (its output is the affine pass's, not the fused op's); its values, statistics, gradients at
/// first order and with create_graph, and Hessian-vector products agree with the fused op's
/// (whose create_graph backward recomputes the composition) to 1e-12.
#[test]
fn batch_norm_recorded_for_second_order_is_the_fused_op() {
    let x = Shape::from([2, 3, 2, 3, 3]);
    let c = Shape::from([3]);
    let v = [
        var(&seeded(x.numel(), 21, -2.0, 3.0), &x),
        var(&seeded(3, 22, 0.5, 1.5), &c),
        var(&seeded(3, 23, -1.0, 1.0), &c),
    ];
    for (relu, affine) in [(false, "channel_affine"), (true, "channel_affine_relu")] {
        let (fused_op, fused) = batch_norm_derivatives(&v, relu, false);
        let (recorded_op, recorded) = batch_norm_derivatives(&v, relu, true);
        assert_eq!(fused_op, "batch_norm3d");
        assert_eq!(
            recorded_op, affine,
            "second_order must record the composition"
        );
        for (k, (a, b)) in recorded.iter().zip(&fused).enumerate() {
            Tolerance::new(1e-12, 1e-12).assert(
                &format!("batch norm (relu {relu}) in second_order: value {k}"),
                a,
                b,
            );
        }
    }
    // The scope ends with its closure: a batch norm after it is the fused op again.
    let (after, _) = batch_norm_derivatives(&v, true, false);
    assert_eq!(after, "batch_norm3d");
}

/// The composition recorded inside `second_order`: gradients and Hessian-vector products
/// against central differences.
#[test]
fn batch_norm_recorded_for_second_order_matches_finite_differences() {
    let x = Shape::from([2, 3, 2, 3, 3]);
    let c = Shape::from([3]);
    let eps = 1e-3;
    check(
        "batch_norm3d in second_order",
        &|v| second_order(|| Ok(v[0].batch_norm3d_train(&v[1], &v[2], eps)?.0)),
        &[x.clone(), c.clone(), c.clone()],
        -1.0,
        1.0,
    );
    check(
        "batch_norm3d relu in second_order",
        &|v| second_order(|| v[0].batch_norm3d_train_relu(&v[1], &v[2], eps)?.0.square()),
        &[x, c.clone(), c],
        -1.0,
        1.0,
    );
}
