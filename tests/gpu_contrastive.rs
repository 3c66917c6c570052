//! The contrastive family on the GPU against the Cpu64 reference through the runner's table, on
//! seeded inputs at odd sizes. The local contrastive loss (composed from existing kernels) is
//! compared in value, gradients and Hessian-vector products, with classes absent from one image of
//! a pair. Dense InfoNCE's streamed kernels are compared in value and gradient (their backward is
//! first order only) at sizes that span several tiles, a partial last tile, several column chunks
//! and row blocks, channel counts that are and are not multiples of 4, and an uneven weighting of
//! the per-location log-sum-exp. Cpu64 is checked against finite differences and closed forms in
//! autograd/tests/contrastive.rs. Also: the buffer pool's peak shows the M x M matrix is never
//! allocated, and the anchor sampler gives the same mask on both backends.

mod common;

use common::{assert_gpu_matches_cpu64, gpu, seeded};
use metaseg::runner::{apply_op, Settings};
use metaseg_autograd::check::one_hot;
use metaseg_autograd::{grad, Backend, ContrastiveBackend, Cpu64, Error, Shape, Tolerance, Var};

/// f32 kernels against f64, with logits scaled by 1 / tau = 10 and sums over hundreds of locations.
const TOL: Tolerance = Tolerance::F32_ACCUMULATED;

/// One-hot labels [N, C, ...] drawn per image, image x never using class `absent[x]`.
fn labels(shape: &Shape, absent: &[Option<usize>], seed: u64) -> (Vec<f64>, Shape) {
    let mut one = shape.dims().to_vec();
    one[0] = 1;
    let values = absent
        .iter()
        .enumerate()
        .flat_map(|(x, &empty)| one_hot(&Shape(one.clone()), seed + x as u64, empty))
        .collect();
    (values, shape.clone())
}

fn input(seed: u64, shape: &Shape) -> (Vec<f64>, Shape) {
    (seeded(shape.numel(), seed, -1.0, 1.0), shape.clone())
}

fn with_channels(shape: &Shape, c: usize) -> Shape {
    let mut dims = shape.dims().to_vec();
    dims[1] = c;
    Shape(dims)
}

#[test]
fn local_contrastive_matches_the_reference() {
    for (emb, classes, absent) in [
        (Shape::from([2, 5, 3, 5, 7]), 3, vec![Some(1), None]),
        (
            Shape::from([4, 3, 1, 7, 9]),
            4,
            vec![None, Some(2), Some(3), Some(1)],
        ),
    ] {
        let y = labels(&with_channels(&emb, classes), &absent, 7);
        let anchors = metaseg_autograd::contrastive::sample_anchors(&y.0, &y.1, 3, 5).unwrap();
        let anchors = (anchors, with_channels(&emb, 1));
        for tau in ["tau=0.1", "tau=0.5"] {
            let x = input(1, &emb);
            assert_gpu_matches_cpu64("local_contrastive", &[tau], &[x.clone(), y.clone()], TOL);
            assert_gpu_matches_cpu64(
                "local_contrastive",
                &[tau],
                &[x, y.clone(), anchors.clone()],
                TOL,
            );
        }
    }
}

/// The value and the first-order gradients of op `op` for a seeded weighting of its output.
fn first_order<B: metaseg::runner::OpBackend>(
    backend: &B,
    op: &str,
    settings: &Settings,
    inputs: &[(Vec<f64>, Shape)],
) -> (Vec<f64>, Vec<Vec<f64>>) {
    let xs: Vec<Var<B>> = inputs
        .iter()
        .map(|(v, s)| Var::from_f64(backend, v, s, true).unwrap())
        .collect();
    let y = apply_op(op, &xs, settings).unwrap();
    let w = seeded(y.shape().numel(), 77, -1.0, 1.0);
    let w = Var::from_f64(backend, &w, y.shape(), false).unwrap();
    let refs: Vec<&Var<B>> = xs.iter().collect();
    let grads = grad(&y, &refs, Some(&w), false).unwrap();
    (
        y.to_f64().unwrap(),
        grads.iter().map(|g| g.to_f64().unwrap()).collect(),
    )
}

fn assert_infonce_matches(shape: &Shape, tau: &str) {
    let settings = Settings::parse([tau]).unwrap();
    let inputs = [input(2, shape), input(3, shape)];
    let cpu = first_order(&Cpu64, "dense_infonce", &settings, &inputs);
    let gpu = first_order(&gpu(), "dense_infonce", &settings, &inputs);
    let what = format!("dense_infonce {shape} {tau}");
    TOL.assert(&format!("{what} forward"), &gpu.0, &cpu.0);
    for k in 0..2 {
        TOL.assert(&format!("{what} gradient {k}"), &gpu.1[k], &cpu.1[k]);
    }
}

/// The streamed log-sum-exp alone on `backend` and its gradients for an uneven weighting of its
/// per-location outputs (the loss weights them all alike).
fn logsumexp_derivatives<B: ContrastiveBackend>(
    backend: &B,
    inputs: &[(Vec<f64>, Shape)],
    tau: f64,
) -> (Vec<f64>, Vec<Vec<f64>>) {
    let xs: Vec<Var<B>> = inputs
        .iter()
        .map(|(v, s)| Var::from_f64(backend, v, s, true).unwrap())
        .collect();
    let y = xs[0].infonce_logsumexp(&xs[1], tau).unwrap();
    let w = seeded(y.shape().numel(), 9, -1.0, 1.0);
    let w = Var::from_f64(backend, &w, y.shape(), false).unwrap();
    let grads = grad(&y, &[&xs[0], &xs[1]], Some(&w), false).unwrap();
    (
        y.to_f64().unwrap(),
        grads.iter().map(|g| g.to_f64().unwrap()).collect(),
    )
}

fn assert_logsumexp_matches(shape: &Shape, tau: f64) {
    let inputs = [input(4, shape), input(5, shape)];
    let cpu = logsumexp_derivatives(&Cpu64, &inputs, tau);
    let gpu = logsumexp_derivatives(&gpu(), &inputs, tau);
    let what = format!("infonce_logsumexp {shape} tau={tau}");
    TOL.assert(&what, &gpu.0, &cpu.0);
    for k in 0..2 {
        TOL.assert(&format!("{what} gradient {k}"), &gpu.1[k], &cpu.1[k]);
    }
}

#[test]
fn dense_infonce_matches_the_reference_across_tiles_and_chunks() {
    // M = 315 locations: two row blocks of 256, two column chunks of 192 (3 and 2 tiles of 64,
    // the last partial); E = 5 pads the channels' last vec4.
    assert_infonce_matches(&Shape::from([3, 5, 3, 5, 7]), "tau=0.1");
    // M = 105 in one chunk; E = 4, one whole vec4.
    assert_infonce_matches(&Shape::from([1, 4, 1, 5, 21]), "tau=0.3");
    // E = 33: 9 vec4s, 3 rows per invocation forward and 1 backward.
    assert_infonce_matches(&Shape::from([2, 33, 2, 3, 5]), "tau=0.1");
    for (shape, tau) in [
        (Shape::from([3, 5, 3, 5, 7]), 0.1),
        (Shape::from([2, 32, 1, 8, 9]), 0.07),
    ] {
        assert_logsumexp_matches(&shape, tau);
    }
}

#[test]
fn dense_infonce_with_too_many_channels_for_the_kernel_is_an_error_that_says_so() {
    let shape = Shape::from([1, 130, 3]);
    let q = Var::from_f64(&gpu(), &seeded(390, 1, -1.0, 1.0), &shape, false).unwrap();
    let message = q.dense_infonce(&q, 0.1).err().unwrap().to_string();
    assert!(
        message.contains("dense_infonce") && message.contains("130"),
        "{message}"
    );
}

#[test]
fn dense_infonce_never_allocates_the_similarity_matrix() {
    // M = 2 x 1024 locations: the M x M matrix in f32 would be 16.8 MB.
    let shape = Shape::from([2, 8, 4, 16, 16]);
    let m = 2 * 1024;
    let matrix = 4 * m * m;
    let g = gpu();
    let q = Var::from_f64(&g, &seeded(shape.numel(), 1, -1.0, 1.0), &shape, true).unwrap();
    let k = Var::from_f64(&g, &seeded(shape.numel(), 2, -1.0, 1.0), &shape, true).unwrap();
    g.context().synchronize().unwrap();
    let before = g.context().pool_stats().in_use_bytes;
    g.context().reset_pool_peak();
    let loss = q.dense_infonce(&k, 0.1).unwrap();
    let grads = grad(&loss, &[&q, &k], None, false).unwrap();
    g.to_f64(grads[1].value()).unwrap();
    let peak = g.context().pool_stats().peak_bytes - before;
    // Other tests of this binary may allocate meanwhile; their tensors are a few hundred KB.
    assert!(
        (peak as usize) < matrix / 4,
        "dense_infonce needed {peak} bytes at its peak; the matrix alone is {matrix}"
    );
}

/// The anchors mask of `labels` on `backend`, and what asking for its gradient gives.
fn anchors_on<B: metaseg::runner::OpBackend>(
    backend: &B,
    labels: &(Vec<f64>, Shape),
) -> (Vec<f64>, metaseg_autograd::Result<Vec<Var<B>>>) {
    let settings = Settings::parse(["per_class=3", "seed=11"]).unwrap();
    let y = Var::from_f64(backend, &labels.0, &labels.1, true).unwrap();
    let anchors = apply_op("sample_anchors", std::slice::from_ref(&y), &settings).unwrap();
    let d = grad(&anchors.sum().unwrap(), &[&y], None, false);
    (anchors.to_f64().unwrap(), d)
}

/// The kernel against the reference where each invocation scans many voxels and the merge
/// matters: 16^3 voxels per image, 1 to 16 anchors, classes absent, a class with a single voxel.
#[test]
fn the_anchor_kernel_draws_the_reference_mask() {
    let g = gpu();
    let shape = Shape::from([3, 4, 16, 16, 16]);
    let (mut values, _) = labels(&shape, &[Some(2), None, Some(3)], 17);
    let s = 16 * 16 * 16;
    // Image 1 keeps one voxel of class 3; the rest of that class becomes background.
    let mut kept = false;
    for v in 0..s {
        if values[(4 + 3) * s + v] == 1.0 {
            if kept {
                values[(4 + 3) * s + v] = 0.0;
                values[4 * s + v] = 1.0;
            }
            kept = true;
        }
    }
    for (per_class, seed) in [(1, 3), (3, 4), (16, 5)] {
        let reference =
            metaseg_autograd::contrastive::sample_anchors(&values, &shape, per_class, seed)
                .unwrap();
        let y = g.tensor(&values, &shape).unwrap();
        let on_gpu = g.sample_anchors(&y, per_class, seed).unwrap();
        assert_eq!(
            g.to_f64(&on_gpu).unwrap(),
            reference,
            "{per_class} per class, seed {seed}"
        );
        // 2 + 3 + 2 present foreground classes, one of them with a single voxel.
        let expected = (7 * per_class - (per_class - 1)) as f64;
        assert_eq!(reference.iter().sum::<f64>(), expected);
    }
    let Err(e) = g.sample_anchors(&g.tensor(&values, &shape).unwrap(), 17, 0) else {
        panic!("17 anchors per class: an error");
    };
    assert!(e.to_string().contains("at most 16"), "{e}");
}

#[test]
fn sampled_anchors_are_the_same_on_both_backends_and_have_no_gradient() {
    let y = labels(
        &Shape::from([4, 3, 2, 5, 7]),
        &[None, Some(1), Some(2), None],
        3,
    );
    let (cpu, cpu_d) = anchors_on(&Cpu64, &y);
    let (on_gpu, gpu_d) = anchors_on(&gpu(), &y);
    assert_eq!(on_gpu, cpu);
    // 70 voxels per image over 2 or 3 classes leave each present class at least 3 voxels:
    // 3 anchors for each of the 2 + 1 + 1 + 2 foreground classes present.
    assert_eq!(cpu.iter().sum::<f64>(), 18.0);
    assert!(matches!(
        cpu_d,
        Err(Error::NoGradient {
            op: "sample_anchors"
        })
    ));
    assert!(matches!(
        gpu_d,
        Err(Error::NoGradient {
            op: "sample_anchors"
        })
    ));
}
