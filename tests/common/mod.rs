//! Shared by the GPU test files: one device per test binary, seeded inputs, and the comparison of
//! an op of the runner's table on the GPU with Cpu64 (value, gradient, Hessian-vector product).

#![allow(dead_code)]

use metaseg::gpu::Gpu;
use metaseg::runner::{apply_op, Settings};
use metaseg_autograd::{grad, Backend, Cpu64, Shape, Tolerance, Var};
use std::sync::OnceLock;

/// The device every test in this binary shares (pipelines are compiled once per device).
pub fn gpu() -> Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| match Gpu::new() {
        Ok(g) => {
            let info = &g.context().adapter.info;
            eprintln!("testing on {} ({:?})", info.name, info.backend);
            g
        }
        Err(e) => panic!("{e}"),
    })
    .clone()
}

/// The binding limit of [`small_binding_gpu`]: 8 KiB (2048 elements), so that the tests' tensors of a few
/// thousand elements exceed it and run in ranges (of samples, or of elements whose boundaries fall
/// inside a sample), while one sample of each still fits.
pub const SMALL_BINDING: u64 = 8192;

/// A second device of this binary whose binding limit is forced down to SMALL_BINDING bytes.
pub fn small_binding_gpu() -> Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| Gpu::with_max_binding_bytes(SMALL_BINDING).unwrap_or_else(|e| panic!("{e}")))
        .clone()
}

/// Asserts that `op` (an op name, or a flat kernel's label) has run in ranges on `gpu`.
pub fn assert_split(gpu: &Gpu, ops: &[&str]) {
    let split = gpu.context().split_ops();
    for op in ops {
        assert!(
            split.iter().any(|s| s == op),
            "{op} did not split: {split:?}"
        );
    }
}

pub mod examples;

pub use metaseg_autograd::check::seeded;

/// A function's value, its gradient for a seeded output weighting, and a Hessian-vector product.
pub struct Derivatives {
    pub out: Vec<f64>,
    pub grads: Vec<Vec<f64>>,
    pub hvps: Vec<Vec<f64>>,
}

/// The derivatives of `f` at `inputs` on `backend` (f is generic-free so any op bound fits).
pub fn derivatives<B: Backend>(
    backend: &B,
    f: impl Fn(&[Var<B>]) -> Var<B>,
    inputs: &[(Vec<f64>, Shape)],
) -> Derivatives {
    let xs: Vec<Var<B>> = inputs
        .iter()
        .map(|(v, s)| Var::from_f64(backend, v, s, true).unwrap())
        .collect();
    let y = f(&xs);
    let w = Var::from_f64(
        backend,
        &seeded(y.shape().numel(), 77, -1.0, 1.0),
        y.shape(),
        false,
    )
    .unwrap();
    let refs: Vec<&Var<B>> = xs.iter().collect();
    let grads = grad(&y, &refs, Some(&w), true).unwrap();
    // <grad, v> differentiated again: H v for the direction v.
    let mut dot = Var::zeros(backend, &Shape::scalar()).unwrap();
    for (k, g) in grads.iter().enumerate() {
        let v = Var::from_f64(
            backend,
            &seeded(g.shape().numel(), 300 + k as u64, -1.0, 1.0),
            g.shape(),
            false,
        )
        .unwrap();
        dot = dot.add(&g.mul(&v).unwrap().sum().unwrap()).unwrap();
    }
    let hvps = grad(&dot, &refs, None, false).unwrap();
    Derivatives {
        out: y.to_f64().unwrap(),
        grads: grads.iter().map(|g| g.to_f64().unwrap()).collect(),
        hvps: hvps.iter().map(|g| g.to_f64().unwrap()).collect(),
    }
}

/// Op `op` of the runner's table on the GPU against Cpu64: value, gradients and H v of every input.
pub fn assert_gpu_matches_cpu64(
    op: &str,
    settings: &[&str],
    inputs: &[(Vec<f64>, Shape)],
    tol: Tolerance,
) {
    assert_matches_cpu64_on(&gpu(), op, settings, inputs, tol)
}

/// [`assert_gpu_matches_cpu64`] on the device `gpu`.
pub fn assert_matches_cpu64_on(
    gpu: &Gpu,
    op: &str,
    settings: &[&str],
    inputs: &[(Vec<f64>, Shape)],
    tol: Tolerance,
) {
    let settings = Settings::parse(settings).unwrap();
    let cpu = derivatives(&Cpu64, |xs| apply_op(op, xs, &settings).unwrap(), inputs);
    let gpu = derivatives(gpu, |xs| apply_op(op, xs, &settings).unwrap(), inputs);
    tol.assert(&format!("{op} forward"), &gpu.out, &cpu.out);
    for k in 0..inputs.len() {
        tol.assert(
            &format!("{op} gradient of input {k}"),
            &gpu.grads[k],
            &cpu.grads[k],
        );
        tol.assert(
            &format!("{op} Hessian-vector product, input {k}"),
            &gpu.hvps[k],
            &cpu.hvps[k],
        );
    }
}

/// Op `op` of the runner's table on the GPU against Cpu64, the value only: for ops without a
/// gradient (functions of masks). Infinite values must be at the same elements with the same sign
/// on both; the finite ones agree within `tol`.
pub fn assert_gpu_forward_matches_cpu64(
    op: &str,
    settings: &[&str],
    inputs: &[(Vec<f64>, Shape)],
    tol: Tolerance,
) {
    let settings = Settings::parse(settings).unwrap();
    let cpu = value(&Cpu64, |xs| apply_op(op, xs, &settings), inputs);
    let gpu = value(&gpu(), |xs| apply_op(op, xs, &settings), inputs);
    let infinities = |x: &[f64]| -> Vec<f64> {
        x.iter()
            .map(|v| if v.is_infinite() { v.signum() } else { 0.0 })
            .collect()
    };
    let exact = Tolerance::new(0.0, 0.0);
    exact.assert(
        &format!("{op} forward: where it is infinite"),
        &infinities(&gpu),
        &infinities(&cpu),
    );
    let finite = |x: &[f64]| -> Vec<f64> {
        x.iter()
            .map(|v| if v.is_infinite() { 0.0 } else { *v })
            .collect()
    };
    tol.assert(&format!("{op} forward"), &finite(&gpu), &finite(&cpu));
}

/// The value of `f` at `inputs` on `backend`, as constants (no graph recorded).
pub fn value<B: Backend>(
    backend: &B,
    f: impl Fn(&[Var<B>]) -> metaseg::error::Result<Var<B>>,
    inputs: &[(Vec<f64>, Shape)],
) -> Vec<f64> {
    let xs: Vec<Var<B>> = inputs
        .iter()
        .map(|(v, s)| Var::from_f64(backend, v, s, false).unwrap())
        .collect();
    f(&xs).unwrap().to_f64().unwrap()
}

/// Every line of a run's log.jsonl, without its wall-clock time: the part a resumed run must
/// repeat.
pub fn log_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("seconds");
            v
        })
        .collect()
}

/// The scalar `name` of a step's log.
pub fn logged(log: &[(&str, f64)], name: &str) -> f64 {
    log.iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no {name} in {log:?}"))
        .1
}
