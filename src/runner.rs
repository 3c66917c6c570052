//! Any op by name, on any backend: the table of ops with their inputs and settings, and a runner that
//! checks a call against it, runs the forward and, given a gradient of the output, the backward.
//! The command line, the GPU-vs-Cpu64 tests and the benches all go through this one table.

use crate::error::{Error, Result};
use metaseg_autograd::{grad, Backend, BinaryOp, MatmulSpec, Shape, UnaryOp, Var};
use std::collections::BTreeMap;
use std::sync::LazyLock;

/// An op as callers see it: what it is called, the inputs it takes (in order) and the settings
/// it accepts.
#[derive(Clone, Copy, Debug)]
pub struct OpSpec {
    pub name: &'static str,
    pub inputs: &'static [&'static str],
    pub settings: &'static [&'static str],
    forward: Forward,
}

/// How an op is computed; one variant per family, so `apply_op` covers the table exhaustively.
#[derive(Clone, Copy, Debug)]
enum Forward {
    Unary(UnaryOp),
    LeakyRelu,
    Clamp,
    Binary(BinaryOp),
    Sum,
    Mean,
    Matmul,
}

const X: &[&str] = &["x"];
const AB: &[&str] = &["a", "b"];
const NONE: &[&str] = &[];
const REDUCE: &[&str] = &["axes", "keepdim"];

const fn op(
    name: &'static str,
    inputs: &'static [&'static str],
    settings: &'static [&'static str],
    forward: Forward,
) -> OpSpec {
    OpSpec {
        name,
        inputs,
        settings,
        forward,
    }
}

/// Every op. A new kernel family adds its entries here and its `Forward` variant.
const OPS: &[OpSpec] = &[
    op("neg", X, NONE, Forward::Unary(UnaryOp::Neg)),
    op("exp", X, NONE, Forward::Unary(UnaryOp::Exp)),
    op("log", X, NONE, Forward::Unary(UnaryOp::Log)),
    op("sqrt", X, NONE, Forward::Unary(UnaryOp::Sqrt)),
    op("square", X, NONE, Forward::Unary(UnaryOp::Square)),
    op("relu", X, NONE, Forward::Unary(UnaryOp::Relu)),
    op("sigmoid", X, NONE, Forward::Unary(UnaryOp::Sigmoid)),
    op("tanh", X, NONE, Forward::Unary(UnaryOp::Tanh)),
    op("leaky_relu", X, &["slope"], Forward::LeakyRelu),
    op("clamp", X, &["min", "max"], Forward::Clamp),
    op("add", AB, NONE, Forward::Binary(BinaryOp::Add)),
    op("sub", AB, NONE, Forward::Binary(BinaryOp::Sub)),
    op("mul", AB, NONE, Forward::Binary(BinaryOp::Mul)),
    op("div", AB, NONE, Forward::Binary(BinaryOp::Div)),
    op("sum", X, REDUCE, Forward::Sum),
    op("mean", X, REDUCE, Forward::Mean),
    op("matmul", AB, &["trans_a", "trans_b"], Forward::Matmul),
];

/// PyTorch's default, so results compare with it unchanged.
const LEAKY_RELU_SLOPE: f64 = 0.01;

static NAMES: LazyLock<Vec<&'static str>> = LazyLock::new(|| OPS.iter().map(|o| o.name).collect());

pub fn op_names() -> &'static [&'static str] {
    &NAMES
}

pub fn op_spec(name: &str) -> Option<OpSpec> {
    OPS.iter().find(|o| o.name == name).copied()
}

fn lookup(name: &str) -> Result<OpSpec> {
    op_spec(name).ok_or_else(|| Error::UnknownOp { name: name.into() })
}

impl OpSpec {
    fn error(&self, message: String) -> Error {
        Error::Op {
            op: self.name,
            message,
        }
    }

    fn check_settings(&self, settings: &Settings) -> Result<()> {
        match settings.keys().find(|k| !self.settings.contains(k)) {
            None => Ok(()),
            Some(key) if self.settings.is_empty() => {
                Err(self.error(format!("unknown setting '{key}'; it takes no settings")))
            }
            Some(key) => Err(self.error(format!(
                "unknown setting '{key}'; it accepts {}",
                self.settings.join(", ")
            ))),
        }
    }

    fn missing_setting(&self, key: &str) -> Error {
        self.error(format!("setting '{key}' is required"))
    }
}

/// `KEY=VALUE` settings of an op, parsed to a type when the op reads them.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    values: BTreeMap<String, String>,
}

impl Settings {
    /// Parses `KEY=VALUE` strings; a key given twice is an error.
    pub fn parse<S: AsRef<str>>(pairs: impl IntoIterator<Item = S>) -> Result<Settings> {
        let mut values = BTreeMap::new();
        for pair in pairs {
            let pair = pair.as_ref();
            let bad = |message: &str| Error::Setting {
                setting: pair.into(),
                message: message.into(),
            };
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| bad("expected KEY=VALUE"))?;
            if key.is_empty() {
                return Err(bad("expected KEY=VALUE"));
            }
            if values.insert(key.to_string(), value.to_string()).is_some() {
                return Err(bad("this key is already set"));
            }
        }
        Ok(Settings { values })
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.values.keys().map(String::as_str)
    }

    pub fn f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key, "a number", |v| v.parse().ok())
    }

    /// `true` or `false`.
    pub fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key, "true or false", |v| v.parse().ok())
    }

    /// Comma-separated, like `1,2,3`.
    pub fn usize_list(&self, key: &str) -> Result<Option<Vec<usize>>> {
        self.get(
            key,
            "non-negative integers separated by commas, like 1,2",
            |v| v.split(',').map(|x| x.trim().parse().ok()).collect(),
        )
    }

    fn get<T>(
        &self,
        key: &str,
        expected: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<Option<T>> {
        let Some(value) = self.values.get(key) else {
            return Ok(None);
        };
        parse(value).map(Some).ok_or_else(|| Error::Setting {
            setting: format!("{key}={value}"),
            message: format!("expected {expected}"),
        })
    }
}

/// Applies op `name` to `inputs`, given in the order its spec names them.
pub fn apply_op<B: Backend>(name: &str, inputs: &[Var<B>], settings: &Settings) -> Result<Var<B>> {
    let spec = lookup(name)?;
    spec.check_settings(settings)?;
    if inputs.len() != spec.inputs.len() {
        return Err(spec.error(format!(
            "takes {} inputs ({}), got {}",
            spec.inputs.len(),
            spec.inputs.join(", "),
            inputs.len()
        )));
    }
    let x = &inputs[0];
    let y = match spec.forward {
        Forward::Unary(op) => x.unary(op)?,
        Forward::LeakyRelu => x.leaky_relu(settings.f64("slope")?.unwrap_or(LEAKY_RELU_SLOPE))?,
        Forward::Clamp => {
            let min = settings
                .f64("min")?
                .ok_or_else(|| spec.missing_setting("min"))?;
            let max = settings
                .f64("max")?
                .ok_or_else(|| spec.missing_setting("max"))?;
            x.clamp(min, max)?
        }
        Forward::Binary(op) => x.binary(op, &inputs[1])?,
        Forward::Sum => reduce(x, settings, Var::sum_axes)?,
        Forward::Mean => reduce(x, settings, Var::mean_axes)?,
        Forward::Matmul => {
            let transposes = MatmulSpec {
                trans_a: settings.bool("trans_a")?.unwrap_or(false),
                trans_b: settings.bool("trans_b")?.unwrap_or(false),
            };
            x.matmul(&inputs[1], transposes)?
        }
    };
    Ok(y)
}

/// A sum or mean over `axes` (default: all), dropping them unless `keepdim`.
fn reduce<B: Backend>(
    x: &Var<B>,
    settings: &Settings,
    f: impl Fn(&Var<B>, &[usize], bool) -> metaseg_autograd::Result<Var<B>>,
) -> Result<Var<B>> {
    let axes = settings.usize_list("axes")?;
    let axes = axes.unwrap_or_else(|| (0..x.shape().rank()).collect());
    let keepdim = settings.bool("keepdim")?.unwrap_or(false);
    Ok(f(x, &axes, keepdim)?)
}

/// What a run produced: the output and, when a gradient of the output was given, the gradient of
/// every input (in the spec's order).
#[derive(Clone, Debug)]
pub struct RunOutput {
    pub output: (Vec<f64>, Shape),
    pub grads: Vec<(String, Vec<f64>, Shape)>,
}

/// A checked call of one op with its inputs on a backend. The forward can be run repeatedly
/// (for timing); `finish` reads back the output and the gradients of the last forward.
pub struct Call<B: Backend> {
    spec: OpSpec,
    inputs: Vec<Var<B>>,
    settings: Settings,
}

impl<B: Backend> Call<B> {
    /// Checks the inputs by name (each one named by the spec, once) and uploads them in the
    /// spec's order.
    pub fn new(
        backend: &B,
        op: &str,
        inputs: Vec<(String, Vec<f64>, Shape)>,
        settings: &Settings,
    ) -> Result<Self> {
        let spec = lookup(op)?;
        spec.check_settings(settings)?;
        let mut by_name = BTreeMap::new();
        for (name, values, shape) in inputs {
            if !spec.inputs.contains(&name.as_str()) {
                return Err(spec.error(format!(
                    "unknown input '{name}'; its inputs are {}",
                    spec.inputs.join(", ")
                )));
            }
            if by_name.insert(name.clone(), (values, shape)).is_some() {
                return Err(spec.error(format!("input '{name}' is given twice")));
            }
        }
        let inputs = spec
            .inputs
            .iter()
            .map(|&name| {
                let (values, shape) = by_name.remove(name).ok_or_else(|| {
                    spec.error(format!(
                        "missing input '{name}'; its inputs are {}",
                        spec.inputs.join(", ")
                    ))
                })?;
                // Every input is a parameter, so any run can be differentiated.
                Ok(Var::from_f64(backend, &values, &shape, true)?)
            })
            .collect::<Result<_>>()?;
        Ok(Call {
            spec,
            inputs,
            settings: settings.clone(),
        })
    }

    pub fn forward(&self) -> Result<Var<B>> {
        apply_op(self.spec.name, &self.inputs, &self.settings)
    }

    /// Reads back `output` (a result of `forward`) and, given `grad_output` of the output's shape,
    /// the gradient of every input weighted by it.
    pub fn finish(
        &self,
        output: &Var<B>,
        grad_output: Option<(Vec<f64>, Shape)>,
    ) -> Result<RunOutput> {
        let grads = match grad_output {
            Some((values, shape)) => self.grads(output, &values, &shape)?,
            None => Vec::new(),
        };
        Ok(RunOutput {
            output: (output.to_f64()?, output.shape().clone()),
            grads,
        })
    }

    fn grads(
        &self,
        output: &Var<B>,
        values: &[f64],
        shape: &Shape,
    ) -> Result<Vec<(String, Vec<f64>, Shape)>> {
        if shape != output.shape() {
            return Err(self.spec.error(format!(
                "the output gradient has shape {shape} but the output has shape {}",
                output.shape()
            )));
        }
        let d_output = Var::from_f64(output.backend(), values, shape, false)?;
        let wrt: Vec<&Var<B>> = self.inputs.iter().collect();
        let grads = grad(output, &wrt, Some(&d_output), false)?;
        self.spec
            .inputs
            .iter()
            .zip(grads)
            .map(|(name, g)| Ok((name.to_string(), g.to_f64()?, g.shape().clone())))
            .collect()
    }
}

/// Runs op `op` once on `backend`: the output and, given `grad_output`, every input's gradient.
pub fn run<B: Backend>(
    backend: &B,
    op: &str,
    inputs: Vec<(String, Vec<f64>, Shape)>,
    settings: &Settings,
    grad_output: Option<(Vec<f64>, Shape)>,
) -> Result<RunOutput> {
    let call = Call::new(backend, op, inputs, settings)?;
    let output = call.forward()?;
    call.finish(&output, grad_output)
}

#[cfg(test)]
mod tests {
    use super::*;
    use metaseg_autograd::Cpu64;

    #[test]
    fn every_op_in_the_table_runs_with_its_default_settings() {
        let x = (vec![0.5, 1.0, 2.0, 4.0], Shape::from([2, 2]));
        for &name in op_names() {
            let spec = op_spec(name).unwrap();
            let inputs = spec
                .inputs
                .iter()
                .map(|n| (n.to_string(), x.0.clone(), x.1.clone()));
            let required = if name == "clamp" {
                &["min=0", "max=1"][..]
            } else {
                &[]
            };
            let settings = Settings::parse(required).unwrap();
            let g = (vec![1.0; 4], Shape::from([2, 2]));
            let grad_output = (spec.name != "sum" && spec.name != "mean").then_some(g);
            let out = run(&Cpu64, name, inputs.collect(), &settings, grad_output);
            let out = out.unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(out.output.0.iter().all(|v| v.is_finite()), "{name}");
        }
    }

    #[test]
    fn apply_op_checks_the_number_of_inputs() {
        let x = Var::from_f64(&Cpu64, &[1.0], &Shape::from([1]), false).unwrap();
        let Err(err) = apply_op("add", &[x], &Settings::default()) else {
            panic!("add of one input succeeded");
        };
        assert_eq!(err.to_string(), "add: takes 2 inputs (a, b), got 1");
    }
}
