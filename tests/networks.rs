//! V-Net and U-Net: the parameter store's order and initialisation, a forward + backward on the GPU
//! against Cpu64 with the same parameters, and Cpu64's parameter gradients against f64 central
//! finite differences at sampled entries.

mod common;

use common::{assert_split, gpu, seeded, small_binding_gpu};
use metaseg::gpu::Gpu;
use metaseg::nn::layers::updated_stats;
use metaseg::nn::{Mode, Network, ParamStore, UNet, UNetConfig, VNet, VNetConfig};
use metaseg_autograd::{grad, Backend, Cpu64, Reduction, Shape, Tolerance, Upsample, Var};

/// A V-Net small enough for the software adapter: 3 levels of widths 2, 4, 8 on 8^3 patches, with
/// the optional heads and the second decoder, so every layer kind is exercised.
fn small_vnet() -> VNet {
    VNet::new(VNetConfig {
        in_channels: 1,
        classes: 2,
        base_width: 2,
        levels: 3,
        dropout: Some(0.5),
        sdf_head: true,
        projection: Some(3),
        second_decoder: true,
        encoder_projection: None,
        two_d: false,
    })
    .unwrap()
}

/// The same V-Net in 2D: kernels of depth 1, on [N, C, 1, H, W].
fn small_vnet_2d() -> VNet {
    let mut config = small_vnet().config().clone();
    config.two_d = true;
    VNet::new(config).unwrap()
}

fn small_unet(three_d: bool) -> UNet {
    UNet::new(UNetConfig {
        in_channels: 2,
        classes: 3,
        features: vec![2, 3, 4],
        three_d,
        upsample: Upsample::Trilinear,
        dropout: Some(0.5),
    })
    .unwrap()
}

/// A scalar of every output: mean cross-entropy of the logits against a one-hot target, plus
/// seeded weightings of the optional heads (so each head's gradient reaches the parameters).
fn loss<B: metaseg::nn::NetBackend>(
    net: &impl Network,
    params: &ParamStore<B>,
    stats: &ParamStore<B>,
    x: &Var<B>,
    mode: Mode,
) -> Var<B> {
    let out = net.run(params, stats, x, mode).unwrap();
    let b = x.backend();
    let target = metaseg_autograd::check::one_hot(out.logits.shape(), 5, None);
    let target = Var::from_f64(b, &target, out.logits.shape(), false).unwrap();
    let mut total = out
        .logits
        .cross_entropy(&target, None, Reduction::Mean)
        .unwrap();
    if let Some(b_logits) = &out.logits_b {
        let ce = b_logits.cross_entropy(&target, None, Reduction::Mean);
        total = total.add(&ce.unwrap().scale(0.5).unwrap()).unwrap();
    }
    for (k, head) in [out.sdf, out.embedding].into_iter().flatten().enumerate() {
        let n = head.shape().numel();
        let w = Var::from_f64(b, &seeded(n, 40 + k as u64, -1.0, 1.0), head.shape(), false);
        let term = head.mul(&w.unwrap()).unwrap().mean().unwrap();
        total = total.add(&term).unwrap();
    }
    total
}

fn input<B: Backend>(b: &B, shape: &Shape) -> Var<B> {
    Var::from_f64(b, &seeded(shape.numel(), 9, -1.0, 1.0), shape, false).unwrap()
}

/// Loss and parameter gradients of `net` on the GPU and on Cpu64 from the same initial values.
fn assert_gpu_matches_cpu64(net: &impl Network, x_shape: Shape, mode: Mode) {
    assert_matches_cpu64_on(&gpu(), net, x_shape, mode)
}

/// [`assert_gpu_matches_cpu64`] on the device `g`.
fn assert_matches_cpu64_on(g: &Gpu, net: &impl Network, x_shape: Shape, mode: Mode) {
    let cpu_params = net.init_params(&Cpu64, 3).unwrap();
    let cpu_stats = net.init_stats(&Cpu64).unwrap();
    let g = g.clone();
    let gpu_params = cpu_params.transfer(&g).unwrap();
    let gpu_stats = cpu_stats.transfer(&g).unwrap();
    let gradients = |l: Var<_>, p: &ParamStore<_>| {
        let wrt: Vec<_> = p.values().iter().collect();
        let gs = grad(&l, &wrt, None, false).unwrap();
        let gs: Vec<Vec<f64>> = gs.iter().map(|g| g.to_f64().unwrap()).collect();
        (l.item().unwrap(), gs)
    };
    let (cpu_loss, cpu_grads) = gradients(
        loss(net, &cpu_params, &cpu_stats, &input(&Cpu64, &x_shape), mode),
        &cpu_params,
    );
    let gl = loss(net, &gpu_params, &gpu_stats, &input(&g, &x_shape), mode);
    let wrt: Vec<_> = gpu_params.values().iter().collect();
    let gpu_grads: Vec<Vec<f64>> = grad(&gl, &wrt, None, false)
        .unwrap()
        .iter()
        .map(|g| g.to_f64().unwrap())
        .collect();
    Tolerance::F32_ACCUMULATED.assert("loss", &[gl.item().unwrap()], &[cpu_loss]);
    for (spec, (gg, cg)) in cpu_params
        .specs()
        .iter()
        .zip(gpu_grads.iter().zip(&cpu_grads))
    {
        // f32 through a dozen conv and batch-norm layers: the error scales with the largest
        // gradient of the tensor, not with each entry.
        let scale = cg.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        Tolerance::new(2e-3 * scale + 1e-6, 2e-3).assert(&spec.name, gg, cg);
    }
}

#[test]
fn vnet_forward_and_backward_on_the_gpu_match_cpu64() {
    let train = Mode::Train { seed: 11, step: 2 };
    assert_gpu_matches_cpu64(&small_vnet(), Shape::from([2, 1, 8, 8, 8]), train);
}

/// Issue 24 item 4: with the binding limit forced down to 8 KiB, every tensor of the step larger
/// than that (3 samples of up to 2048 elements) runs in ranges, and the step still matches Cpu64.
#[test]
fn vnet_and_unet_with_a_small_binding_limit_match_cpu64() {
    let train = Mode::Train { seed: 11, step: 2 };
    let g = small_binding_gpu();
    assert_matches_cpu64_on(&g, &small_vnet(), Shape::from([3, 1, 8, 8, 8]), train);
    assert_matches_cpu64_on(&g, &small_unet(true), Shape::from([3, 2, 8, 8, 8]), train);
    assert_split(
        &g,
        &[
            "conv3d",
            "conv3d_grad_input",
            "conv3d_grad_weight",
            "channel_dots",
        ],
    );
}

#[test]
fn vnet_2d_forward_and_backward_on_the_gpu_match_cpu64() {
    let train = Mode::Train { seed: 11, step: 2 };
    assert_gpu_matches_cpu64(&small_vnet_2d(), Shape::from([2, 1, 1, 8, 12]), train);
}

/// A 2D V-Net's kernels have depth 1 and it down-samples H and W only, so it takes a depth-1
/// patch, and on a deeper input each slice comes out as if it had been given alone.
#[test]
fn vnet_2d_has_depth_1_kernels_and_treats_each_slice_alone() {
    let net = small_vnet_2d();
    for spec in net.params().specs() {
        let dims = spec.shape.dims();
        if dims.len() == 5 {
            assert_eq!(dims[2], 1, "{} {:?}", spec.name, dims);
        }
    }
    let params = net.init_params(&Cpu64, 1).unwrap();
    let stats = net.init_stats(&Cpu64).unwrap();
    let slices = 3;
    let x = input(&Cpu64, &Shape::from([1, 1, slices, 4, 8]));
    let whole = net.run(&params, &stats, &x, Mode::Eval).unwrap().logits;
    let whole = whole.to_f64().unwrap();
    let xs = x.to_f64().unwrap();
    let (plane, out_plane) = (4 * 8, 4 * 8);
    for d in 0..slices {
        let one: Vec<f64> = xs[d * plane..(d + 1) * plane].to_vec();
        let one = Var::from_f64(&Cpu64, &one, &Shape::from([1, 1, 1, 4, 8]), false).unwrap();
        let alone = net.run(&params, &stats, &one, Mode::Eval).unwrap().logits;
        let alone = alone.to_f64().unwrap();
        // Logits [1, 2, D, 4, 8]: class k of slice d.
        let from_whole: Vec<f64> = (0..2)
            .flat_map(|k| {
                let start = (k * slices + d) * out_plane;
                whole[start..start + out_plane].to_vec()
            })
            .collect();
        Tolerance::F64.assert("slice", &from_whole, &alone);
    }
}

#[test]
fn unet_2d_and_3d_on_the_gpu_match_cpu64() {
    let train = Mode::Train { seed: 11, step: 2 };
    assert_gpu_matches_cpu64(&small_unet(false), Shape::from([2, 2, 1, 8, 12]), train);
    assert_gpu_matches_cpu64(&small_unet(true), Shape::from([2, 2, 4, 4, 8]), train);
}

/// Entries `(tensor, index)` of the parameters to check: first, middle and last of a spread of
/// tensors, so every layer kind is visited without differencing all of them.
fn sampled_entries(params: &ParamStore<Cpu64>) -> Vec<(usize, usize)> {
    let n = params.len();
    (0..n)
        .step_by(n.div_ceil(12))
        .chain([n - 1])
        .flat_map(|t| {
            let len = params.specs()[t].shape.numel();
            [(t, 0), (t, len / 2), (t, len - 1)]
        })
        .collect()
}

fn assert_finite_differences(net: &impl Network, x_shape: Shape) {
    // Training mode: batch statistics and a fixed dropout draw (same seed and step every call).
    let mode = Mode::Train { seed: 4, step: 1 };
    let params = net.init_params(&Cpu64, 8).unwrap();
    let stats = net.init_stats(&Cpu64).unwrap();
    let x = input(&Cpu64, &x_shape);
    let l = loss(net, &params, &stats, &x, mode);
    let wrt: Vec<_> = params.values().iter().collect();
    let analytic: Vec<Vec<f64>> = grad(&l, &wrt, None, false)
        .unwrap()
        .iter()
        .map(|g| g.to_f64().unwrap())
        .collect();
    let at = |t: usize, i: usize, delta: f64| {
        let mut values: Vec<_> = params.values().iter().map(|v| v.value().clone()).collect();
        let mut data = values[t].data.to_vec();
        data[i] += delta;
        values[t] = Cpu64.tensor(&data, &params.specs()[t].shape).unwrap();
        let moved = params.with_values(values).unwrap();
        loss(net, &moved, &stats, &x, mode).item().unwrap()
    };
    let eps = 1e-6;
    let (mut numeric, mut exact) = (Vec::new(), Vec::new());
    for (t, i) in sampled_entries(&params) {
        numeric.push((at(t, i, eps) - at(t, i, -eps)) / (2.0 * eps));
        exact.push(analytic[t][i]);
    }
    Tolerance::FINITE_DIFFERENCE.assert("parameter gradients", &exact, &numeric);
}

#[test]
fn vnet_parameter_gradients_match_finite_differences() {
    assert_finite_differences(&small_vnet(), Shape::from([2, 1, 4, 4, 8]));
}

#[test]
fn vnet_2d_parameter_gradients_match_finite_differences() {
    assert_finite_differences(&small_vnet_2d(), Shape::from([2, 1, 1, 4, 8]));
}

#[test]
fn unet_parameter_gradients_match_finite_differences() {
    assert_finite_differences(&small_unet(false), Shape::from([2, 2, 1, 4, 8]));
}

#[test]
fn the_la_vnet_has_the_parameters_of_its_specification() {
    // Counted from METHODS.md's description, layer by layer: a conv-BN-ReLU unit from a to b
    // channels with kernel k holds a b k^3 weights, b biases and 2 b BN affine entries.
    let unit = |a: usize, b: usize, k: usize| a * b * k.pow(3) + b + 2 * b;
    let widths = [16, 32, 64, 128, 256];
    let units = [1, 2, 3, 3, 3];
    let mut expected = 0;
    for l in 0..5 {
        let first_input = if l == 0 { 1 } else { widths[l] };
        // Encoder level l, and below the bottleneck its decoder twin.
        let level =
            unit(first_input, widths[l], 3) + (units[l] - 1) * unit(widths[l], widths[l], 3);
        expected += level;
        if l < 4 {
            expected += units[l] * unit(widths[l], widths[l], 3);
            // Down to and up from level l + 1.
            expected += unit(widths[l], widths[l + 1], 2) + unit(widths[l + 1], widths[l], 2);
        }
    }
    expected += 16 * 2 + 2; // the 1x1x1 head, no batch norm
    let net = VNet::new(VNetConfig::default()).unwrap();
    let count: usize = net.params().specs().iter().map(|s| s.shape.numel()).sum();
    assert_eq!(count, expected);
    let names: Vec<&str> = net
        .params()
        .specs()
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(names[0], "encoder.0.0.conv.weight");
    assert_eq!(names.last(), Some(&"head.bias"));
    // Running mean and variance per batch norm, one batch norm per conv unit.
    let units = names.iter().filter(|n| n.ends_with(".bn.weight")).count();
    assert_eq!(net.stats().specs().len(), 2 * units);
}

#[test]
fn initialisation_is_kaiming_normal_and_reproducible() {
    let net = small_vnet();
    let a = net.init_params(&Cpu64, 1).unwrap();
    let b = net.init_params(&Cpu64, 1).unwrap();
    let c = net.init_params(&Cpu64, 2).unwrap();
    let values = |s: &ParamStore<Cpu64>| s.flat().unwrap().data.to_vec();
    assert_eq!(values(&a), values(&b));
    assert_ne!(values(&a), values(&c));
    // The largest weight: 8 -> 8 channels, 27 taps, fan-in 216, 1728 draws; the sample standard
    // deviation of n normal draws has a relative spread of about 1/sqrt(2n) = 1.7%.
    let (t, spec) = a
        .specs()
        .iter()
        .enumerate()
        .max_by_key(|(_, s)| s.shape.numel())
        .unwrap();
    let w = a.values()[t].to_f64().unwrap();
    let n = w.len() as f64;
    let std = (w.iter().map(|v| v * v).sum::<f64>() / n).sqrt();
    let expected = (2.0 / 216.0f64).sqrt();
    assert_eq!(spec.shape.dims(), [8, 8, 3, 3, 3]);
    assert!(
        (std / expected - 1.0).abs() < 0.1,
        "std {std} vs {expected}"
    );
    for (spec, v) in a.specs().iter().zip(a.values()) {
        let v = v.to_f64().unwrap();
        if spec.name.ends_with(".bias") {
            assert!(v.iter().all(|&x| x == 0.0), "{}", spec.name);
        }
        if spec.name.ends_with(".bn.weight") {
            assert!(v.iter().all(|&x| x == 1.0), "{}", spec.name);
        }
    }
}

#[test]
fn the_flat_store_and_its_ema_on_the_gpu_match_the_per_tensor_formula() {
    let net = small_vnet();
    let g = gpu();
    let teacher = net.init_params(&Cpu64, 1).unwrap();
    let student = net.init_params(&Cpu64, 2).unwrap();
    let decay = 0.9;
    let mixed = teacher
        .transfer(&g)
        .unwrap()
        .ema(&student.transfer(&g).unwrap(), decay)
        .unwrap();
    assert_eq!(mixed.specs(), teacher.specs());
    for ((t, s), m) in teacher
        .values()
        .iter()
        .zip(student.values())
        .zip(mixed.values())
    {
        let (t, s) = (t.to_f64().unwrap(), s.to_f64().unwrap());
        let expected: Vec<f64> = t
            .iter()
            .zip(&s)
            .map(|(t, s)| decay * t + (1.0 - decay) * s)
            .collect();
        Tolerance::F32.assert("ema", &m.to_f64().unwrap(), &expected);
    }
}

#[test]
fn running_statistics_follow_pytorchs_momentum_update_and_drive_eval_mode() {
    let net = small_vnet();
    let params = net.init_params(&Cpu64, 1).unwrap();
    let stats = net.init_stats(&Cpu64).unwrap();
    let x = input(&Cpu64, &Shape::from([2, 1, 4, 4, 4]));
    let out = net
        .run(&params, &stats, &x, Mode::Train { seed: 0, step: 0 })
        .unwrap();
    assert_eq!(out.batch_stats.len(), stats.len() / 2);
    // The first batch norm sees the first conv's output: check its update by hand.
    let (i, first) = &out.batch_stats[0];
    assert_eq!(*i, 0);
    let new = updated_stats(stats.values(), &out.batch_stats, 0.1).unwrap();
    let mean = first.mean.to_f64().unwrap();
    let var = first.var.to_f64().unwrap();
    let n = first.count as f64;
    let expected_mean: Vec<f64> = mean.iter().map(|m| 0.1 * m).collect();
    let expected_var: Vec<f64> = var.iter().map(|v| 0.9 + 0.1 * v * n / (n - 1.0)).collect();
    Tolerance::F64.assert("running mean", &new[0].to_f64().unwrap(), &expected_mean);
    Tolerance::F64.assert("running var", &new[1].to_f64().unwrap(), &expected_var);
    // Eval mode reads the running statistics: with the updated ones the output changes.
    let stats_after = stats
        .with_values(new.iter().map(|v| v.value().clone()).collect())
        .unwrap();
    let before = net.run(&params, &stats, &x, Mode::Eval).unwrap().logits;
    let after = net
        .run(&params, &stats_after, &x, Mode::Eval)
        .unwrap()
        .logits;
    assert_ne!(before.to_f64().unwrap(), after.to_f64().unwrap());
}

#[test]
fn a_patch_that_does_not_divide_by_the_down_sampling_is_an_error() {
    let net = small_vnet();
    let params = net.init_params(&Cpu64, 1).unwrap();
    let stats = net.init_stats(&Cpu64).unwrap();
    let x = input(&Cpu64, &Shape::from([1, 1, 8, 6, 8]));
    let err = net
        .run(&params, &stats, &x, Mode::Eval)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("8x6x8") && err.contains("4x4x4"), "{err}");
    // In 2D the depth is not down-sampled: depth 1 is fine, H and W still divide by 4.
    let net = small_vnet_2d();
    let params = net.init_params(&Cpu64, 1).unwrap();
    let x = input(&Cpu64, &Shape::from([1, 1, 1, 6, 8]));
    let err = net.run(&params, &stats, &x, Mode::Eval).err().unwrap();
    assert!(err.to_string().contains("1x4x4"), "{err}");
    let x = input(&Cpu64, &Shape::from([1, 1, 1, 4, 8]));
    assert!(net.run(&params, &stats, &x, Mode::Eval).is_ok());
}

/// IDEAL's dense embedding (the encoder alone and its bottleneck projection): values and parameter
/// gradients of a seeded weighting on the GPU against Cpu64.
#[test]
fn vnet_dense_embedding_on_the_gpu_matches_cpu64() {
    let net = VNet::new(VNetConfig {
        base_width: 2,
        levels: 3,
        encoder_projection: Some(3),
        ..VNetConfig::default()
    })
    .unwrap();
    let x_shape = Shape::from([2, 1, 8, 8, 8]);
    let mode = Mode::Train { seed: 4, step: 1 };
    fn run<B: metaseg::nn::NetBackend>(
        net: &VNet,
        params: &ParamStore<B>,
        stats: &ParamStore<B>,
        x: &Var<B>,
        mode: Mode,
    ) -> (Vec<f64>, Vec<Vec<f64>>) {
        let f = metaseg::nn::Forward::new(params.values(), stats.values(), mode);
        let (e, _) = net.dense_embedding(&f, x).unwrap();
        assert_eq!(e.shape().dims(), &[2, 3, 2, 2, 2], "the bottleneck's grid");
        let n = e.shape().numel();
        let w = Var::from_f64(x.backend(), &seeded(n, 8, -1.0, 1.0), e.shape(), false).unwrap();
        let loss = e.mul(&w).unwrap().sum().unwrap();
        let wrt: Vec<_> = params.values().iter().collect();
        let grads = grad(&loss, &wrt, None, false).unwrap();
        let grads = grads.iter().map(|g| g.to_f64().unwrap()).collect();
        (e.to_f64().unwrap(), grads)
    }
    let cpu_params = net.init_params(&Cpu64, 3).unwrap();
    let cpu_stats = net.init_stats(&Cpu64).unwrap();
    let g = gpu();
    let (gpu_params, gpu_stats) = (
        cpu_params.transfer(&g).unwrap(),
        cpu_stats.transfer(&g).unwrap(),
    );
    let (ce, cg) = run(
        &net,
        &cpu_params,
        &cpu_stats,
        &input(&Cpu64, &x_shape),
        mode,
    );
    let (ge, gg) = run(&net, &gpu_params, &gpu_stats, &input(&g, &x_shape), mode);
    Tolerance::F32_ACCUMULATED.assert("embedding", &ge, &ce);
    let largest = |v: &[f64]| v.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    // A bias before batch norm has a zero gradient, which f32 gives as rounding noise of the
    // gradients around it: the tolerance floor follows the network's largest gradient.
    let floor = 1e-3 * cg.iter().map(|v| largest(v)).fold(0.0, f64::max);
    let mut decoder_grads = 0;
    for (spec, (gv, cv)) in cpu_params.specs().iter().zip(gg.iter().zip(&cg)) {
        Tolerance::new(2e-3 * largest(cv) + floor, 2e-3).assert(&spec.name, gv, cv);
        if !(spec.name.starts_with("encoder") || spec.name.starts_with("down")) {
            assert!(
                cv.iter().all(|&v| v == 0.0),
                "{} is not on the path",
                spec.name
            );
            decoder_grads += 1;
        }
    }
    assert!(decoder_grads > 0);
}
