//! The kernel runner fed random calls (issue 25): shapes with zero-length axes, wrong ranks and
//! sizes, NaN and infinite values, settings from sensible to absurd (0, huge, negative, NaN), for
//! every op of the table on both backends. Each call must return a result or an error: never a
//! panic, a stack overflow or an aborted allocation. Seeded, so a failure repeats; set
//! METASEG_FUZZ_TRACE=1 to print every call before it runs (to find one that kills the process).

mod common;

use common::examples::{example_inputs, example_settings, Input};
use common::gpu;
use metaseg::runner::{op_names, op_spec, Call, OpBackend, Settings};
use metaseg_autograd::random::uniform;
use metaseg_autograd::{Cpu64, Shape};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Calls per op and backend: enough to reach every kind of mutation below for every op while the
/// whole test stays within seconds once the pipelines are compiled.
const CALLS_PER_OP: u64 = 8;

/// A size far beyond any memory, so shapes built from it must be refused before allocating.
const HUGE: u64 = 1 << 50;

/// Draws from the counter-based generator of the framework, so every run makes the same calls.
struct Draw {
    seed: u64,
    counter: u64,
}

impl Draw {
    fn unit(&mut self) -> f64 {
        self.counter += 1;
        uniform(self.seed, self.counter)
    }

    fn below(&mut self, n: usize) -> usize {
        ((self.unit() * n as f64) as usize).min(n - 1)
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

const NUMBERS: &[&str] = &[
    "0", "1", "0.5", "-1", "2", "1e-6", "1e30", "NaN", "inf", "-inf",
];
const SIZES: &[u64] = &[0, 1, 2, 3, HUGE];

/// A random value for setting `key`, of the kind the setting takes (or sometimes not).
fn setting_value(draw: &mut Draw, key: &str) -> String {
    let mut triple = |items: &[u64]| {
        let v: Vec<String> = (0..3).map(|_| draw.pick(items).to_string()).collect();
        v.join(",")
    };
    match key {
        "axes" => {
            let n = draw.below(4);
            let axes: Vec<String> = (0..n).map(|_| draw.below(6).to_string()).collect();
            axes.join(",")
        }
        "keepdim" | "trans_a" | "trans_b" | "squared" | "include_background" => {
            draw.pick(&["true", "false"]).into()
        }
        "reduction" => draw.pick(&["none", "sum", "mean"]).into(),
        "interp" => draw.pick(&["trilinear", "nearest"]).into(),
        "path" => draw.pick(&["reverse", "fast"]).into(),
        "normalization" => draw.pick(&["clip", "softmax", "sigmoid", "hard"]).into(),
        "kernel" | "stride" | "scale" | "padding" | "dilation" | "output_padding" | "output"
        | "input" => triple(SIZES),
        "start" | "len" | "per_class" | "seed" | "step" => draw.pick(SIZES).to_string(),
        "spacing" => {
            let v: Vec<&str> = (0..3)
                .map(|_| draw.pick(&["1", "0.5", "0", "-1", "NaN"]))
                .collect();
            v.join(",")
        }
        "matrix" => {
            let v: Vec<String> = (0..12)
                .map(|_| match draw.below(8) {
                    0 => "NaN".to_string(),
                    1 => "1e30".to_string(),
                    _ => format!("{:.3}", 4.0 * draw.unit() - 2.0),
                })
                .collect();
            v.join(",")
        }
        _ => draw.pick(NUMBERS).into(),
    }
}

/// The op's example settings, each of its settings redrawn with probability one half.
fn random_settings(draw: &mut Draw, op: &str) -> Vec<String> {
    let mut settings: Vec<String> = example_settings(op).iter().map(|s| s.to_string()).collect();
    for key in op_spec(op).unwrap().settings {
        if draw.chance(0.5) {
            settings.retain(|s| !s.starts_with(&format!("{key}=")));
            settings.push(format!("{key}={}", setting_value(draw, key)));
        }
    }
    settings
}

/// A shape near `shape`: an axis set to 0, every axis redrawn in 0..=3, or an axis added or
/// dropped; often unchanged.
fn random_shape(draw: &mut Draw, shape: &Shape) -> Shape {
    let mut dims = shape.dims().to_vec();
    match draw.below(5) {
        0 if !dims.is_empty() => {
            let axis = draw.below(dims.len());
            dims[axis] = 0;
        }
        1 => dims.iter_mut().for_each(|d| *d = draw.below(4)),
        2 if !dims.is_empty() => {
            dims.remove(draw.below(dims.len()));
        }
        3 => dims.insert(draw.below(dims.len() + 1), 1 + draw.below(2)),
        _ => {}
    }
    Shape(dims)
}

/// Values for `shape`: the example's where it has them, else uniform in (-1, 2); about one in
/// five replaced by NaN, +infinity or -infinity.
fn random_values(draw: &mut Draw, example: &[f64], shape: &Shape) -> Vec<f64> {
    (0..shape.numel())
        .map(|i| match draw.below(15) {
            0 => f64::NAN,
            1 => f64::INFINITY,
            2 => f64::NEG_INFINITY,
            _ => example
                .get(i)
                .copied()
                .unwrap_or_else(|| 3.0 * draw.unit() - 1.0),
        })
        .collect()
}

fn random_call(op: &str, trial: u64) -> (Vec<Input>, Vec<String>, bool) {
    let mut draw = Draw {
        seed: 0xf022 + trial,
        counter: op
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64))
            << 16,
    };
    let inputs = example_inputs(op)
        .into_iter()
        .map(|(name, values, shape)| {
            let shape = random_shape(&mut draw, &shape);
            let values = random_values(&mut draw, &values, &shape);
            (name, values, shape)
        })
        .collect();
    (inputs, random_settings(&mut draw, op), draw.chance(0.5))
}

/// One call: the forward and, if `backward`, every gradient for an output gradient of ones.
/// Returns whether it gave a result (an error is as good an answer as a result here).
fn call<B: OpBackend>(
    backend: &B,
    op: &str,
    inputs: &[Input],
    settings: &[String],
    backward: bool,
) -> bool {
    let run = || -> metaseg::error::Result<()> {
        let settings = Settings::parse(settings)?;
        let call = Call::new(backend, op, inputs.to_vec(), &settings)?;
        let out = call.forward()?;
        let shape = out.shape().clone();
        let grad_output = backward.then(|| (vec![1.0; shape.numel()], shape));
        call.finish(&out, grad_output)?;
        Ok(())
    };
    run().is_ok()
}

#[test]
fn every_op_answers_random_calls_with_a_result_or_an_error_on_both_backends() {
    let trace = std::env::var_os("METASEG_FUZZ_TRACE").is_some();
    let gpu = gpu();
    let mut panics = Vec::new();
    let mut answered = [0usize; 2];
    for &op in op_names() {
        for trial in 0..CALLS_PER_OP {
            let (inputs, settings, backward) = random_call(op, trial);
            let shapes: Vec<String> = inputs.iter().map(|i| format!("{}: {}", i.0, i.2)).collect();
            let case = format!(
                "{op} ({}) --set {} backward {backward}",
                shapes.join(", "),
                settings.join(" ")
            );
            for (b, name) in ["cpu64", "gpu"].iter().enumerate() {
                if trace {
                    eprintln!("{name}: {case}");
                }
                let outcome = catch_unwind(AssertUnwindSafe(|| match b {
                    0 => call(&Cpu64, op, &inputs, &settings, backward),
                    _ => call(&gpu, op, &inputs, &settings, backward),
                }));
                match outcome {
                    Ok(ok) => answered[b] += usize::from(ok),
                    Err(_) => panics.push(format!("{name}: {case}")),
                }
            }
        }
    }
    assert!(
        panics.is_empty(),
        "{} panics:\n{}",
        panics.len(),
        panics.join("\n")
    );
    // The calls are not all refused: the fuzzing reaches the kernels.
    let calls = op_names().len() * CALLS_PER_OP as usize;
    assert!(
        answered.iter().all(|&n| n > calls / 4),
        "results of {calls} calls: {answered:?}"
    );
}

/// The calls of issue 25 that crashed: a sum over a 0-length axis recursed until the stack
/// overflowed, and ops on 0-size inputs divided by zero. A sum over nothing is 0 (numpy's).
#[test]
fn zero_length_axes_give_results_or_errors() {
    let empty = |name: &str, dims: &[usize]| (name.to_string(), Vec::new(), Shape::new(dims));
    let settings = Settings::parse(["axes=1"]).unwrap();
    let sum = |r: metaseg::error::Result<metaseg::runner::RunOutput>| r.ok().map(|r| r.output.0);
    let x = vec![empty("x", &[2, 0])];
    let on_cpu = metaseg::runner::run(&Cpu64, "sum", x.clone(), &settings, None);
    let on_gpu = metaseg::runner::run(&gpu(), "sum", x, &settings, None);
    assert_eq!(sum(on_cpu), Some(vec![0.0, 0.0]));
    assert_eq!(sum(on_gpu), Some(vec![0.0, 0.0]));
    let calls: [(&str, Vec<Input>); 3] = [
        ("entropy", vec![empty("p", &[1, 2, 0, 1, 1])]),
        (
            "local_contrastive",
            vec![
                empty("emb", &[2, 2, 0, 1, 1]),
                empty("labels", &[2, 2, 0, 1, 1]),
            ],
        ),
        (
            "dense_infonce",
            vec![empty("q", &[2, 2, 0, 1, 1]), empty("k", &[2, 2, 0, 1, 1])],
        ),
    ];
    for (op, inputs) in calls {
        for backward in [false, true] {
            let settings: [String; 0] = [];
            call(&Cpu64, op, &inputs, &settings, backward);
            call(&gpu(), op, &inputs, &settings, backward);
        }
    }
}
