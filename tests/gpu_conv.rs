//! The convolution family on the GPU against the Cpu64 reference: every variant of each primitive
//! (forward, grad-input, grad-weight) on its own, then conv3d and conv_transpose3d through the tape
//! (forward, gradients, Hessian-vector products), at every stride/padding combination V-Net and
//! U-Net use, on odd sizes. Cpu64's derivatives are checked against finite differences in
//! autograd/tests/conv.rs, so agreement here carries that check to the kernels.

mod common;

use common::{derivatives, gpu, seeded};
use metaseg::gpu::{ConvPlan, ConvVariant, Gpu};
use metaseg_autograd::{
    Backend, Conv3dGeometry, ConvBackend, ConvSpec, Cpu64, Shape, TensorShape, Tolerance, Var,
};

/// f32 sums of up to a few hundred products of values of order one.
const TOL: Tolerance = Tolerance::new(1e-4, 1e-4);
/// Second order: products of such sums.
const TOL_HVP: Tolerance = Tolerance::new(5e-4, 5e-4);

fn spec(stride: [usize; 3], padding: [usize; 3]) -> ConvSpec {
    ConvSpec::new(stride, padding)
}

/// x [N, C, D, H, W], weight [K, C, kd, kh, kw], spec.
type Case = (&'static str, [usize; 5], [usize; 5], ConvSpec);

/// The geometries of V-Net and U-Net and the general cases (per-axis stride and padding, dilation,
/// kernels up to 7), each at an odd width (where the blocked variant runs the direct kernel) and
/// at a width that is a multiple of 4 but not of the 16 positions a forward invocation computes
/// (20 takes one whole and one partial part of 8 in its last block). Channel counts are not
/// multiples of the 8 channels an invocation computes either.
fn cases() -> Vec<Case> {
    let dilated = ConvSpec {
        stride: [1, 2, 1],
        padding: [2, 1, 3],
        dilation: [2, 1, 3],
    };
    let pad1 = spec([1; 3], [1; 3]);
    vec![
        ("3x3x3 pad 1", [2, 3, 5, 6, 7], [5, 3, 3, 3, 3], pad1),
        ("3x3x3 pad 1", [2, 3, 3, 5, 12], [5, 3, 3, 3, 3], pad1),
        ("3x3x3 pad 1", [1, 4, 3, 5, 16], [8, 4, 3, 3, 3], pad1),
        (
            "3x3x3 pad 1, 1 -> 9",
            [1, 1, 4, 3, 20],
            [9, 1, 3, 3, 3],
            pad1,
        ),
        // Kernel 3 tall with no padding, and with more padding than the kernel reaches, along H.
        (
            "3x3x3, H padding 0",
            [1, 3, 3, 6, 8],
            [5, 3, 3, 3, 3],
            spec([1; 3], [1, 0, 1]),
        ),
        (
            "3x3x3, H padding 3",
            [2, 2, 2, 3, 4],
            [6, 2, 3, 3, 3],
            spec([1; 3], [1, 3, 1]),
        ),
        (
            "1x1x1",
            [2, 6, 3, 5, 7],
            [3, 6, 1, 1, 1],
            ConvSpec::default(),
        ),
        (
            "1x1x1",
            [2, 6, 3, 5, 8],
            [3, 6, 1, 1, 1],
            ConvSpec::default(),
        ),
        (
            "k2 s2 down",
            [2, 3, 6, 7, 9],
            [5, 3, 2, 2, 2],
            spec([2; 3], [0; 3]),
        ),
        (
            "k2 s2 down",
            [2, 3, 6, 7, 24],
            [5, 3, 2, 2, 2],
            spec([2; 3], [0; 3]),
        ),
        // Stride = kernel tiling the input exactly, Wo a multiple of 8: the patch grad-input
        // (input channels fewer than, and more than, one block of 8; kernel 3 as well as 2).
        (
            "k2 s2 down, patches",
            [2, 3, 6, 4, 16],
            [5, 3, 2, 2, 2],
            spec([2; 3], [0; 3]),
        ),
        (
            "k2 s2 down, patches",
            [1, 9, 2, 4, 32],
            [5, 9, 2, 2, 2],
            spec([2; 3], [0; 3]),
        ),
        (
            "k3 s3, patches",
            [1, 2, 3, 3, 24],
            [3, 2, 3, 3, 3],
            spec([3; 3], [0; 3]),
        ),
        // Just outside its conditions: H = 2 Ho + 1, and Wo = 4.
        (
            "k2 s2 down, not patches",
            [1, 3, 4, 5, 16],
            [5, 3, 2, 2, 2],
            spec([2; 3], [0; 3]),
        ),
        (
            "k2 s2 down, not patches",
            [1, 3, 2, 4, 8],
            [5, 3, 2, 2, 2],
            spec([2; 3], [0; 3]),
        ),
        (
            "2D 3x3 pad 1",
            [2, 3, 1, 9, 11],
            [4, 3, 1, 3, 3],
            spec([1; 3], [0, 1, 1]),
        ),
        (
            "2D 3x3 pad 1",
            [2, 3, 1, 9, 12],
            [4, 3, 1, 3, 3],
            spec([1; 3], [0, 1, 1]),
        ),
        (
            "5x5x7, per-axis stride",
            [1, 2, 5, 9, 13],
            [3, 2, 5, 5, 7],
            spec([2, 1, 3], [2, 2, 3]),
        ),
        (
            "5x5x7, per-axis stride",
            [1, 2, 5, 9, 24],
            [3, 2, 5, 5, 7],
            spec([2, 1, 3], [2, 2, 3]),
        ),
        (
            "7x7x7 pad 3",
            [1, 2, 7, 7, 12],
            [3, 2, 7, 7, 7],
            spec([1; 3], [3; 3]),
        ),
        // Wider than the forward's weight registers and grad-weight's accumulators hold at 8
        // channels (direct kernels there).
        (
            "1x1x17",
            [1, 2, 1, 2, 32],
            [9, 2, 1, 1, 17],
            spec([1; 3], [0, 0, 8]),
        ),
        ("dilated", [1, 2, 7, 8, 9], [3, 2, 3, 2, 3], dilated),
        ("dilated", [1, 2, 7, 8, 12], [3, 2, 3, 2, 3], dilated),
    ]
}

fn input(shape: &Shape, seed: u64) -> (Vec<f64>, Shape) {
    (seeded(shape.numel(), seed, -1.0, 1.0), shape.clone())
}

#[test]
fn every_variant_of_each_primitive_matches_the_reference() {
    let g = gpu();
    for (name, x, w, s) in cases() {
        let (x, w) = (Shape::from(x), Shape::from(w));
        let geo = Conv3dGeometry::new(&x, &w, s).unwrap();
        let b_out = Shape::from([geo.c_out]);
        let b_in = Shape::from([geo.c_in]);
        let values = [
            input(&x, 1),
            input(&w, 2),
            input(&geo.output_shape(), 3),
            input(&b_out, 4),
            input(&b_in, 5),
        ];
        let cpu: Vec<_> = values
            .iter()
            .map(|(v, s)| Cpu64.tensor(v, s).unwrap())
            .collect();
        let dev: Vec<_> = values
            .iter()
            .map(|(v, s)| g.tensor(v, s).unwrap())
            .collect();
        let expected = [
            Cpu64.conv3d(&cpu[0], &cpu[1], Some(&cpu[3]), &geo).unwrap(),
            Cpu64.conv3d(&cpu[0], &cpu[1], None, &geo).unwrap(),
            Cpu64
                .conv3d_grad_input(&cpu[2], &cpu[1], Some(&cpu[4]), &geo)
                .unwrap(),
            Cpu64.conv3d_grad_weight(&cpu[0], &cpu[2], &geo).unwrap(),
        ];
        for variant in ConvVariant::ALL {
            let actual = [
                g.conv3d_variant(variant, &dev[0], &dev[1], Some(&dev[3]), &geo),
                g.conv3d_variant(variant, &dev[0], &dev[1], None, &geo),
                g.conv3d_grad_input_variant(variant, &dev[2], &dev[1], Some(&dev[4]), &geo),
                g.conv3d_grad_weight_variant(variant, &dev[0], &dev[2], &geo),
            ];
            let what = [
                "forward + bias",
                "forward",
                "grad-input + bias",
                "grad-weight",
            ];
            for ((what, a), e) in what.iter().zip(actual).zip(&expected) {
                let a = a.unwrap_or_else(|e| panic!("{name} {variant:?} {what}: {e}"));
                assert_eq!(a.shape(), &e.shape, "{name} {variant:?} {what}");
                TOL.assert(
                    &format!("{name}, {variant:?} {what}"),
                    &g.to_f64(&a).unwrap(),
                    &e.data,
                );
            }
        }
    }
}

type ConvFn<B> = dyn Fn(&[Var<B>]) -> metaseg_autograd::Result<Var<B>>;

fn assert_gpu_matches_cpu64(
    what: &str,
    cpu_f: &ConvFn<Cpu64>,
    gpu_f: &ConvFn<Gpu>,
    inputs: &[(Vec<f64>, Shape)],
) {
    let cpu = derivatives(&Cpu64, |v| cpu_f(v).unwrap(), inputs);
    let gpu = derivatives(&gpu(), |v| gpu_f(v).unwrap(), inputs);
    TOL.assert(&format!("{what} forward"), &gpu.out, &cpu.out);
    for k in 0..inputs.len() {
        TOL.assert(
            &format!("{what} gradient {k}"),
            &gpu.grads[k],
            &cpu.grads[k],
        );
        TOL_HVP.assert(
            &format!("{what} Hessian-vector product {k}"),
            &gpu.hvps[k],
            &cpu.hvps[k],
        );
    }
}

#[test]
fn conv3d_forward_gradients_and_second_order_match_the_reference() {
    for (name, x, w, s) in cases() {
        let (x, w) = (Shape::from(x), Shape::from(w));
        let b = Shape::from([w.dims()[0]]);
        let inputs = [input(&x, 11), input(&w, 12), input(&b, 13)];
        assert_gpu_matches_cpu64(
            &format!("conv3d {name}"),
            &move |v| v[0].conv3d(&v[1], Some(&v[2]), s)?.square(),
            &move |v| v[0].conv3d(&v[1], Some(&v[2]), s)?.square(),
            &inputs,
        );
    }
}

#[test]
fn conv_transpose3d_matches_the_reference() {
    // V-Net's k2 s2 up-sampling, and a general one with padding and output_padding.
    let cases = [
        (
            "k2 s2 up",
            [2, 5, 3, 4, 5],
            [5, 3, 2, 2, 2],
            spec([2; 3], [0; 3]),
            [0; 3],
        ),
        (
            "k3 s2 p1 op1",
            [1, 3, 4, 3, 5],
            [3, 2, 3, 3, 3],
            spec([2, 1, 2], [1; 3]),
            [1, 0, 0],
        ),
        // Widths whose output is a multiple of 4: the blocked grad-input kernel computes these.
        (
            "k2 s2 up",
            [1, 5, 3, 2, 4],
            [5, 3, 2, 2, 2],
            spec([2; 3], [0; 3]),
            [0; 3],
        ),
        (
            "k3 s2 p1 op1",
            [1, 3, 3, 2, 4],
            [3, 2, 3, 3, 3],
            spec([2, 1, 2], [1; 3]),
            [1, 0, 1],
        ),
    ];
    for (name, x, w, s, op) in cases {
        let (x, w) = (Shape::from(x), Shape::from(w));
        let b = Shape::from([w.dims()[1]]);
        let inputs = [input(&x, 21), input(&w, 22), input(&b, 23)];
        assert_gpu_matches_cpu64(
            &format!("conv_transpose3d {name}"),
            &move |v| v[0].conv_transpose3d(&v[1], Some(&v[2]), s, op)?.square(),
            &move |v| v[0].conv_transpose3d(&v[1], Some(&v[2]), s, op)?.square(),
            &inputs,
        );
    }
}

/// Constant x = a and w = b without padding: every output is a b C kd kh kw (exact in f32 for
/// these values), for every variant.
#[test]
fn constant_input_and_kernel_give_the_closed_form_on_the_gpu() {
    let g = gpu();
    let (a, b) = (0.5, 0.25);
    let x = Shape::from([2, 5, 4, 6, 8]);
    let w = Shape::from([6, 5, 3, 3, 3]);
    let geo = Conv3dGeometry::new(&x, &w, ConvSpec::default()).unwrap();
    let (xt, wt) = (g.fill(&x, a).unwrap(), g.fill(&w, b).unwrap());
    for variant in ConvVariant::ALL {
        let y = g.conv3d_variant(variant, &xt, &wt, None, &geo).unwrap();
        let expected = vec![a * b * 5.0 * 27.0; geo.output_shape().numel()];
        Tolerance::new(0.0, 0.0).assert(&format!("{variant:?}"), &g.to_f64(&y).unwrap(), &expected);
    }
}

/// The plan picks the blocked kernels where their conditions hold (the table in the header of
/// kernels/conv.wgsl: W and Wo multiples of 4; grad-input at stride 1 by the flipped forward, by
/// the patch kernel where stride = kernel tiles the input, else by its own blocked kernel),
/// the direct ones elsewhere.
#[test]
fn the_plan_runs_the_blocked_kernels_where_their_conditions_hold() {
    let (direct, blocked) = (ConvVariant::Direct, ConvVariant::BLOCKED);
    let geo = |x: [usize; 5], w: [usize; 5], s: ConvSpec| {
        Conv3dGeometry::new(&Shape::from(x), &Shape::from(w), s).unwrap()
    };
    let entries = |x, w, s| ConvPlan::new(blocked, &geo(x, w, s)).entry_points();
    let pad1 = spec([1; 3], [1; 3]);
    // Forward, grad-input (the forward of the flipped weight) and grad-weight (sliding down H).
    let vnet = ([1, 2, 3, 4, 8], [3, 2, 3, 3, 3], pad1);
    let (rows, weight_blocked) = ("conv3d_grad_weight_rows", "conv3d_grad_weight_blocked");
    assert_eq!(
        entries(vnet.0, vnet.1, vnet.2),
        ["conv3d_blocked", "conv3d_blocked", rows]
    );
    // Stride 2: grad-input by the patch kernel (stride = kernel, exact tiling) or by its own
    // blocked kernel (H = 2 Ho + 1).
    let down = spec([2; 3], [0; 3]);
    assert_eq!(
        entries([1, 2, 4, 4, 16], [3, 2, 2, 2, 2], down),
        [
            "conv3d_blocked",
            "conv3d_grad_input_patches",
            weight_blocked
        ]
    );
    assert_eq!(
        entries([1, 2, 4, 5, 16], [3, 2, 2, 2, 2], down),
        [
            "conv3d_blocked",
            "conv3d_grad_input_blocked",
            weight_blocked
        ]
    );
    // Stride 3 along W: grad-input direct. An odd width: all direct.
    let s3 = spec([1, 1, 3], [0; 3]);
    assert_eq!(
        entries([1, 2, 3, 4, 24], [3, 2, 3, 3, 3], s3),
        ["conv3d_blocked", "conv3d_grad_input_direct", rows]
    );
    assert_eq!(
        entries([1, 2, 3, 4, 7], [3, 2, 3, 3, 3], pad1),
        [
            "conv3d_direct",
            "conv3d_grad_input_direct",
            "conv3d_grad_weight_direct"
        ]
    );
    // Variant 1 runs the direct kernels only.
    let vnet_geo = geo(vnet.0, vnet.1, vnet.2);
    assert_eq!(ConvPlan::new(direct, &vnet_geo).numbers(), [1; 3]);
    // Variant 3 stages the weights of the forward kernel only (the flipped forward of grad-input
    // included); grad-weight runs variant 2's. At 7x7x7 one input channel's weights for 8
    // output channels (686 vec4s) do not fit its 512: the forward runs direct, grad-input by
    // variant 2's kernel for other strides.
    let staged = ConvVariant::STAGED;
    assert_eq!(ConvPlan::new(staged, &vnet_geo).numbers(), [3, 3, 2]);
    let wide = geo([1, 2, 7, 7, 12], [3, 2, 7, 7, 7], pad1);
    let plan = ConvPlan::new(staged, &wide);
    assert_eq!(plan.numbers(), [1, 2, 2]);
    assert_eq!(
        plan.entry_points(),
        ["conv3d_direct", "conv3d_grad_input_blocked", weight_blocked]
    );
    assert_eq!(ConvPlan::new(blocked, &wide).numbers(), [2; 3]);
    // Kernels too wide for the forward's weight registers (KW x KB / 4 > 28 vec4s) and for
    // grad-weight's accumulators (> 32).
    let wide_15 = geo([1, 1, 1, 1, 32], [8, 1, 1, 1, 15], spec([1; 3], [0, 0, 7]));
    assert_eq!(ConvPlan::new(blocked, &wide_15).numbers(), [1, 2, 2]);
    let wide_17 = geo([1, 1, 1, 1, 32], [8, 1, 1, 1, 17], spec([1; 3], [0, 0, 8]));
    assert_eq!(ConvPlan::new(blocked, &wide_17).numbers(), [1, 2, 1]);

    // And the profile names the blocked kernels when they run.
    let g = gpu();
    let (x, w) = (Shape::from(vnet.0), Shape::from(vnet.1));
    let geo = vnet_geo;
    let (xt, wt) = (g.fill(&x, 1.0).unwrap(), g.fill(&w, 1.0).unwrap());
    let dy = g.fill(&geo.output_shape(), 1.0).unwrap();
    let w2 = Shape::from([3, 2, 2, 2, 2]);
    let geo2 = Conv3dGeometry::new(&Shape::from([1, 2, 4, 4, 16]), &w2, down).unwrap();
    let (xt2, wt2, dy2) = (
        g.fill(&geo2.input_shape(), 1.0).unwrap(),
        g.fill(&w2, 1.0).unwrap(),
        g.fill(&geo2.output_shape(), 1.0).unwrap(),
    );
    let geo3 = Conv3dGeometry::new(&Shape::from([1, 2, 4, 5, 16]), &w2, down).unwrap();
    let dy3 = g.fill(&geo3.output_shape(), 1.0).unwrap();
    g.context().start_profiling();
    g.conv3d_variant(blocked, &xt, &wt, None, &geo).unwrap();
    g.conv3d_grad_input_variant(blocked, &dy, &wt, None, &geo)
        .unwrap();
    g.conv3d_grad_weight_variant(blocked, &xt, &dy, &geo)
        .unwrap();
    g.conv3d_grad_input_variant(blocked, &dy2, &wt2, None, &geo2)
        .unwrap();
    g.conv3d_grad_weight_variant(blocked, &xt2, &dy2, &geo2)
        .unwrap();
    g.conv3d_grad_input_variant(blocked, &dy3, &wt2, None, &geo3)
        .unwrap();
    let (times, _) = g.context().take_kernel_times().unwrap();
    let names: Vec<String> = times.into_iter().map(|t| t.kernel).collect();
    for entry in [
        "conv3d_blocked",
        "conv3d_arrange_weight[FLIP=1]",
        "conv3d_grad_weight_rows",
        "conv3d_grad_weight_blocked",
        "conv3d_grad_input_patches",
        "conv3d_grad_input_blocked",
    ] {
        assert!(
            names.iter().any(|n| n.contains(entry)),
            "{entry} did not run: {names:?}"
        );
    }
}
