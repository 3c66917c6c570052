//! Non-finite values follow IEEE and numpy on both backends (issue 25, DESIGN.md contract 8): a NaN
//! in an input comes out as NaN (relu(NaN) and clamp(NaN) are NaN, a NaN is the maximum of a
//! pooling window), and the GPU gives NaN and infinities at exactly the elements Cpu64 does, in
//! the forward and in the gradients, for every op of the runner's table.

mod common;

use common::examples::{example_inputs, example_settings, Input};
use common::gpu;
use metaseg::runner::{op_names, op_spec, Call, OpBackend, Settings};
use metaseg_autograd::{Cpu64, Shape};

/// What kind of number an element is: non-finite values must agree exactly.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Nan,
    PlusInfinity,
    MinusInfinity,
    Finite,
}

fn kind(v: f64) -> Kind {
    match v {
        v if v.is_nan() => Kind::Nan,
        f64::INFINITY => Kind::PlusInfinity,
        f64::NEG_INFINITY => Kind::MinusInfinity,
        _ => Kind::Finite,
    }
}

/// The (op, input) pairs where a NaN stops, in numpy too: a mask read as "nonzero is foreground"
/// (NaN is nonzero, so foreground: `scipy.ndimage.distance_transform_edt`) or a label read as
/// "above 0.5 is the class" (NaN > 0.5 is false).
const NAN_STOPS: &[(&str, &str)] = &[
    ("edt", "mask"),
    ("sdf", "mask"),
    ("sample_anchors", "labels"),
];

/// The forward output, the op's further outputs and, for an op with a gradient, every input's
/// gradient for an output gradient of ones (with `poison` at its element 1, if given); each named.
fn results<B: OpBackend>(
    backend: &B,
    op: &str,
    inputs: &[Input],
    poison: Option<f64>,
) -> Result<Vec<(String, Vec<f64>)>, String> {
    let settings = Settings::parse(example_settings(op)).unwrap();
    let call = Call::new(backend, op, inputs.to_vec(), &settings).map_err(|e| e.to_string())?;
    let out = call.forward().map_err(|e| e.to_string())?;
    let shape: Shape = out.shape().clone();
    let has_gradient = op_spec(op).unwrap().has_gradient();
    let grad_output = has_gradient.then(|| {
        let mut g = vec![1.0; shape.numel()];
        if let (Some(v), Some(at)) = (poison, g.get_mut(1)) {
            *at = v;
        }
        (g, shape)
    });
    let run = call.finish(&out, grad_output).map_err(|e| e.to_string())?;
    let mut named = vec![("forward".to_string(), run.output.0)];
    let extras = run.extras.into_iter().map(|(name, v, _)| (name, v));
    let grads = (run.grads.into_iter()).map(|(name, v, _)| (format!("gradient of {name}"), v));
    named.extend(extras.chain(grads));
    Ok(named)
}

/// Where the GPU's result differs from Cpu64's: a different kind of number at an element, or
/// finite values apart by more than f32 arithmetic explains.
fn difference(gpu: &[f64], cpu: &[f64]) -> Option<String> {
    if gpu.len() != cpu.len() {
        return Some(format!("{} values against {}", gpu.len(), cpu.len()));
    }
    let close = |g: f64, c: f64| (g - c).abs() <= 1e-3 + 1e-3 * c.abs();
    (0..cpu.len())
        .find(|&i| {
            kind(gpu[i]) != kind(cpu[i]) || (kind(cpu[i]) == Kind::Finite && !close(gpu[i], cpu[i]))
        })
        .map(|i| format!("element {i}: gpu {} against cpu64 {}", gpu[i], cpu[i]))
}

/// What went wrong when `op` ran on both backends, if anything; `must_propagate`: the inputs hold
/// a NaN that numpy would carry to the output.
fn check(op: &str, inputs: &[Input], poison: Option<f64>, must_propagate: bool) -> Vec<String> {
    let (cpu, on_gpu) = (
        results(&Cpu64, op, inputs, poison),
        results(&gpu(), op, inputs, poison),
    );
    let (cpu, on_gpu) = match (cpu, on_gpu) {
        (Ok(c), Ok(g)) => (c, g),
        (Err(c), Err(g)) if c == g => return Vec::new(),
        (c, g) => return vec![format!("cpu64 {:?}, gpu {:?}", c.err(), g.err())],
    };
    let mut failures = Vec::new();
    if must_propagate && !cpu[0].1.iter().any(|v| v.is_nan()) {
        failures.push(format!("no NaN in cpu64's output {:?}", cpu[0].1));
    }
    for ((what, c), (_, g)) in cpu.iter().zip(&on_gpu) {
        if let Some(d) = difference(g, c) {
            failures.push(format!("{what}: {d}"));
        }
    }
    failures
}

/// Runs every op with `value` at element 1 of each of its inputs in turn, then of its output
/// gradient, on both backends; returns what went wrong, one line per case.
fn check_every_op(value: f64) -> Vec<String> {
    let mut failures = Vec::new();
    for &op in op_names() {
        let clean = example_inputs(op);
        for k in 0..clean.len() {
            let mut inputs = clean.clone();
            inputs[k].1[1] = value;
            let name = inputs[k].0.as_str();
            let propagates = value.is_nan() && !NAN_STOPS.contains(&(op, name));
            let case = format!("{op} with {value} in {name}");
            let found = check(op, &inputs, None, propagates);
            failures.extend(found.into_iter().map(|f| format!("{case}: {f}")));
        }
        if op_spec(op).unwrap().has_gradient() {
            let case = format!("{op} with {value} in the output gradient");
            let found = check(op, &clean, Some(value), false);
            failures.extend(found.into_iter().map(|f| format!("{case}: {f}")));
        }
    }
    failures
}

#[test]
fn nan_in_gives_nan_out_at_the_same_elements_on_both_backends() {
    let failures = check_every_op(f64::NAN);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn infinities_give_the_same_results_on_both_backends() {
    let mut failures = check_every_op(f64::INFINITY);
    failures.extend(check_every_op(f64::NEG_INFINITY));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The forward of `op` on Cpu64 and on the GPU.
fn on_both_backends(op: &str, inputs: &[Input], settings: &[&str]) -> [Vec<f64>; 2] {
    let settings = Settings::parse(settings).unwrap();
    [
        forward(&Cpu64, op, inputs, &settings),
        forward(&gpu(), op, inputs, &settings),
    ]
}

fn forward<B: OpBackend>(backend: &B, op: &str, inputs: &[Input], settings: &Settings) -> Vec<f64> {
    let call = Call::new(backend, op, inputs.to_vec(), settings).unwrap();
    let out = call.forward().unwrap_or_else(|e| panic!("{op}: {e}"));
    out.to_f64().unwrap()
}

fn input(name: &str, values: &[f64], shape: &[usize]) -> Input {
    (name.into(), values.to_vec(), Shape::new(shape))
}

#[test]
fn relu_clamp_and_max_pooling_of_nan_are_nan() {
    let x = input("x", &[f64::NAN, -1.0, 2.0], &[3]);
    for out in on_both_backends("relu", std::slice::from_ref(&x), &[]) {
        assert!(out[0].is_nan() && out[1..] == [0.0, 2.0], "relu: {out:?}");
    }
    for out in on_both_backends("clamp", &[x], &["min=0", "max=1"]) {
        assert!(out[0].is_nan() && out[1..] == [0.0, 1.0], "clamp: {out:?}");
    }
    // Windows of 2 along W: (1, NaN) and (3, 2): numpy's max of each is NaN and 3.
    let x = input("x", &[1.0, f64::NAN, 3.0, 2.0], &[1, 1, 1, 1, 4]);
    let settings = ["kernel=1,1,2"];
    for out in on_both_backends("max_pool3d", &[x], &settings) {
        assert!(out[0].is_nan() && out[1] == 3.0, "max_pool3d: {out:?}");
    }
}

#[test]
fn softmax_of_an_infinite_logit_is_nan_in_every_class_as_in_numpy() {
    // numpy: e = exp(z - max z) = exp([inf - inf, -inf, -inf]) = [nan, 0, 0], and e / sum(e) is
    // [nan, nan, nan]; log-softmax likewise.
    let z = input("x", &[f64::INFINITY, f64::NEG_INFINITY, 0.0], &[1, 3, 1]);
    for op in ["softmax", "log_softmax"] {
        for out in on_both_backends(op, std::slice::from_ref(&z), &[]) {
            assert!(out.iter().all(|v| v.is_nan()), "{op}: {out:?}");
        }
    }
}

#[test]
fn edt_counts_a_nan_voxel_as_foreground_as_numpy_does() {
    // A line [NaN, 1, 0]: NaN is nonzero, so foreground (scipy's distance_transform_edt reads the
    // mask's truth values); the distances to the one background voxel are 2, 1 and 0.
    let mask = input("mask", &[f64::NAN, 1.0, 0.0], &[1, 1, 3]);
    for out in on_both_backends("edt", &[mask], &[]) {
        assert_eq!(out, [2.0, 1.0, 0.0]);
    }
}
