//! `Var`: a tensor with the record of how it was computed, and reverse mode over that record.
//!
//! Each op appends a node that holds its inputs and its backward rule; node ids grow with creation,
//! so sorting by id is a topological order. Backward rules are written with the same differentiable
//! ops (see `ops.rs`), so with `create_graph` the gradient is itself a `Var` that can be
//! differentiated again.

use crate::backend::{Backend, TensorShape};
use crate::{Error, Result, Shape};
use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static RECORDING: Cell<bool> = const { Cell::new(true) };
}

/// Runs `f` with recording switched on or off, restoring the previous state afterwards.
pub fn with_recording<T>(on: bool, f: impl FnOnce() -> T) -> T {
    let before = RECORDING.with(|r| r.replace(on));
    let out = f();
    RECORDING.with(|r| r.set(before));
    out
}

/// Runs `f` without recording: its results are constants (inference, optimiser updates).
pub fn no_grad<T>(f: impl FnOnce() -> T) -> T {
    with_recording(false, f)
}

/// Backward rule written in differentiable ops: `(inputs, output, d_output) -> d_inputs`.
/// `None` for an input means its gradient is zero.
pub type GradFn<B> = Box<dyn Fn(&[Var<B>], &Var<B>, &Var<B>) -> Result<Vec<Option<Var<B>>>>>;

/// Backward rule on raw tensors (a fused kernel without a rule of its own): first order only.
pub type TensorGradFn<B> = Box<
    dyn Fn(
        &B,
        &[&<B as Backend>::Tensor],
        &<B as Backend>::Tensor,
        &<B as Backend>::Tensor,
    ) -> Result<Vec<Option<<B as Backend>::Tensor>>>,
>;

/// Forward-mode rule: the output's tangent from its inputs, itself and the inputs' tangents (`None`
/// for an input that does not move; at least one moves), written in differentiable ops.
pub type JvpFn<B> = Box<dyn Fn(&[Var<B>], &Var<B>, &[Option<Var<B>>]) -> Result<Var<B>>>;

pub enum Rule<B: Backend> {
    /// Differentiable at any order.
    Differentiable(GradFn<B>),
    /// First order only: differentiating it with `create_graph` is `Error::NoSecondOrder`.
    FirstOrder(TensorGradFn<B>),
    /// No gradient at all: reaching it in backward is `Error::NoGradient`.
    None,
}

struct Origin<B: Backend> {
    op: &'static str,
    inputs: Vec<Var<B>>,
    rule: Rule<B>,
    jvp: Option<JvpFn<B>>,
}

struct Node<B: Backend> {
    id: u64,
    value: B::Tensor,
    backend: B,
    requires_grad: bool,
    origin: Option<Origin<B>>,
}

/// A tensor on backend `B` that takes part in automatic differentiation. Cloning is cheap.
pub struct Var<B: Backend>(Rc<Node<B>>);

impl<B: Backend> Clone for Var<B> {
    fn clone(&self) -> Self {
        Var(self.0.clone())
    }
}

impl<B: Backend> Var<B> {
    fn leaf(backend: &B, value: B::Tensor, requires_grad: bool) -> Self {
        Var(Rc::new(Node {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            value,
            backend: backend.clone(),
            requires_grad,
            origin: None,
        }))
    }

    /// A value gradients do not flow into.
    pub fn constant(backend: &B, value: B::Tensor) -> Self {
        Self::leaf(backend, value, false)
    }

    /// A leaf that gradients are taken with respect to.
    pub fn parameter(backend: &B, value: B::Tensor) -> Self {
        Self::leaf(backend, value, true)
    }

    pub fn from_f64(
        backend: &B,
        values: &[f64],
        shape: &Shape,
        requires_grad: bool,
    ) -> Result<Self> {
        Ok(Self::leaf(
            backend,
            backend.tensor(values, shape)?,
            requires_grad,
        ))
    }

    /// The result of an op. Recorded (with its inputs and rule) only when recording is on and some
    /// input requires a gradient; otherwise a constant.
    pub fn from_op(op: &'static str, value: B::Tensor, inputs: &[&Var<B>], rule: Rule<B>) -> Self {
        Self::recorded(op, value, inputs, rule, None)
    }

    /// [`Var::from_op`] with a forward-mode rule as well, so [`jvp`] can pass through it.
    pub fn from_op_with_jvp(
        op: &'static str,
        value: B::Tensor,
        inputs: &[&Var<B>],
        rule: Rule<B>,
        jvp: JvpFn<B>,
    ) -> Self {
        Self::recorded(op, value, inputs, rule, Some(jvp))
    }

    fn recorded(
        op: &'static str,
        value: B::Tensor,
        inputs: &[&Var<B>],
        rule: Rule<B>,
        jvp: Option<JvpFn<B>>,
    ) -> Self {
        let backend = inputs
            .first()
            .expect("an op has at least one input")
            .backend()
            .clone();
        let record = RECORDING.with(|r| r.get()) && inputs.iter().any(|v| v.requires_grad());
        if !record {
            return Self::constant(&backend, value);
        }
        Var(Rc::new(Node {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            value,
            backend,
            requires_grad: true,
            origin: Some(Origin {
                op,
                inputs: inputs.iter().map(|&v| v.clone()).collect(),
                rule,
                jvp,
            }),
        }))
    }

    pub fn value(&self) -> &B::Tensor {
        &self.0.value
    }

    pub fn backend(&self) -> &B {
        &self.0.backend
    }

    pub fn shape(&self) -> &Shape {
        self.0.value.shape()
    }

    pub fn requires_grad(&self) -> bool {
        self.0.requires_grad
    }

    /// The op that produced this value, if it was recorded.
    pub fn op_name(&self) -> Option<&'static str> {
        self.0.origin.as_ref().map(|o| o.op)
    }

    /// The same value, cut from the graph.
    pub fn detach(&self) -> Self {
        Self::constant(self.backend(), self.value().clone())
    }

    /// Reads the value back as f64 (waits for the device).
    pub fn to_f64(&self) -> Result<Vec<f64>> {
        self.backend().to_f64(self.value())
    }

    /// The single value of a one-element tensor.
    pub fn item(&self) -> Result<f64> {
        let v = self.to_f64()?;
        match v.as_slice() {
            [x] => Ok(*x),
            _ => Err(Error::InvalidArgument {
                op: "item",
                message: format!("tensor of shape {} is not a single value", self.shape()),
            }),
        }
    }

    fn id(&self) -> u64 {
        self.0.id
    }

    fn inputs(&self) -> &[Var<B>] {
        self.0.origin.as_ref().map_or(&[], |o| &o.inputs)
    }
}

/// Reverse mode: the gradients of `output` (weighted by `d_output`, default all ones) with respect to
/// each of `wrt`. With `create_graph` the gradients are recorded and can be differentiated again.
/// An input that `output` does not depend on gets a zero gradient.
pub fn grad<B: Backend>(
    output: &Var<B>,
    wrt: &[&Var<B>],
    d_output: Option<&Var<B>>,
    create_graph: bool,
) -> Result<Vec<Var<B>>> {
    let backend = output.backend().clone();
    let seed = match d_output {
        Some(d) if d.shape() != output.shape() => {
            return Err(Error::Shape {
                op: "grad",
                lhs: output.shape().clone(),
                rhs: d.shape().clone(),
                reason: "d_output must have the output's shape".into(),
            })
        }
        Some(d) => d.clone(),
        None => Var::constant(&backend, backend.fill(output.shape(), 1.0)?),
    };

    let order = nodes_leading_to(output, wrt);
    let targets: HashSet<u64> = wrt.iter().map(|v| v.id()).collect();
    let needed: HashSet<u64> = order.iter().map(|v| v.id()).collect();
    let mut grads: HashMap<u64, Var<B>> = HashMap::new();
    grads.insert(output.id(), seed);

    with_recording(create_graph, || -> Result<()> {
        for node in order.iter().rev() {
            let Some(origin) = node.0.origin.as_ref() else {
                continue;
            };
            let g = if targets.contains(&node.id()) {
                grads.get(&node.id()).cloned()
            } else {
                grads.remove(&node.id())
            };
            let Some(g) = g else { continue };
            let d_inputs = apply_rule(origin, node, &g, create_graph)?;
            for (input, d) in origin.inputs.iter().zip(d_inputs) {
                let Some(d) = d else { continue };
                if !needed.contains(&input.id()) {
                    continue;
                }
                if d.shape() != input.shape() {
                    return Err(Error::Shape {
                        op: origin.op,
                        lhs: input.shape().clone(),
                        rhs: d.shape().clone(),
                        reason: "backward rule returned a gradient of the wrong shape".into(),
                    });
                }
                let sum = match grads.remove(&input.id()) {
                    Some(acc) => acc.add(&d)?,
                    None => d,
                };
                grads.insert(input.id(), sum);
            }
        }
        Ok(())
    })?;

    wrt.iter()
        .map(|v| match grads.get(&v.id()) {
            Some(g) if create_graph => Ok(g.clone()),
            Some(g) => Ok(g.detach()),
            None => Ok(Var::constant(&backend, backend.fill(v.shape(), 0.0)?)),
        })
        .collect()
}

/// Forward mode: the tangent of `output` when each variable `x` of `tangents` moves along its
/// `dx` (same shape), through the recorded graph, one rule per op in creation order. An op on the
/// way without a forward-mode rule is `Error::NoForwardMode`. With `create_graph` the tangent is
/// recorded and can be differentiated. Unlike reverse over reverse, nothing of a backward pass is
/// computed or kept: the cost is about one more forward pass.
pub fn jvp<B: Backend>(
    output: &Var<B>,
    tangents: &[(&Var<B>, &Var<B>)],
    create_graph: bool,
) -> Result<Var<B>> {
    let mut moving: HashMap<u64, Var<B>> = HashMap::new();
    for (x, dx) in tangents {
        if x.shape() != dx.shape() {
            return Err(Error::Shape {
                op: "jvp",
                lhs: x.shape().clone(),
                rhs: dx.shape().clone(),
                reason: "a tangent must have its variable's shape".into(),
            });
        }
        moving.insert(x.id(), (*dx).clone());
    }
    let sources: Vec<&Var<B>> = tangents.iter().map(|t| t.0).collect();
    let order = nodes_leading_to(output, &sources);
    // A tangent is dropped after the last op that reads it.
    let mut last_use: HashMap<u64, usize> = HashMap::new();
    for (k, node) in order.iter().enumerate() {
        for input in node.inputs() {
            last_use.insert(input.id(), k);
        }
    }
    with_recording(create_graph, || -> Result<()> {
        for (k, node) in order.iter().enumerate() {
            let Some(origin) = node.0.origin.as_ref() else {
                continue;
            };
            if moving.contains_key(&node.id()) {
                continue;
            }
            let d: Vec<Option<Var<B>>> = origin
                .inputs
                .iter()
                .map(|i| moving.get(&i.id()).cloned())
                .collect();
            if d.iter().all(Option::is_none) {
                continue;
            }
            let rule = origin
                .jvp
                .as_ref()
                .ok_or(Error::NoForwardMode { op: origin.op })?;
            moving.insert(node.id(), rule(&origin.inputs, node, &d)?);
            for input in &origin.inputs {
                if last_use.get(&input.id()) == Some(&k) && input.id() != output.id() {
                    moving.remove(&input.id());
                }
            }
        }
        Ok(())
    })?;
    let backend = output.backend();
    match moving.remove(&output.id()) {
        Some(t) if create_graph => Ok(t),
        Some(t) => Ok(t.detach()),
        None => Ok(Var::constant(backend, backend.fill(output.shape(), 0.0)?)),
    }
}

/// The sum of the tangents that are present, or zeros of `shape` if none is.
pub fn sum_tangents<B: Backend>(
    backend: &B,
    shape: &Shape,
    terms: impl IntoIterator<Item = Result<Option<Var<B>>>>,
) -> Result<Var<B>> {
    let mut total: Option<Var<B>> = None;
    for term in terms {
        if let Some(t) = term? {
            total = Some(match total {
                Some(s) => s.add(&t)?,
                None => t,
            });
        }
    }
    match total {
        Some(t) if t.shape() == shape => Ok(t),
        Some(t) => t.broadcast_to(shape),
        None => Var::zeros(backend, shape),
    }
}

fn apply_rule<B: Backend>(
    origin: &Origin<B>,
    node: &Var<B>,
    g: &Var<B>,
    create_graph: bool,
) -> Result<Vec<Option<Var<B>>>> {
    let d = match &origin.rule {
        Rule::Differentiable(f) => f(&origin.inputs, node, g)?,
        Rule::FirstOrder(_) if create_graph => return Err(Error::NoSecondOrder { op: origin.op }),
        Rule::FirstOrder(f) => {
            let backend = node.backend();
            let inputs: Vec<&B::Tensor> = origin.inputs.iter().map(|v| v.value()).collect();
            f(backend, &inputs, node.value(), g.value())?
                .into_iter()
                .map(|t| t.map(|t| Var::constant(backend, t)))
                .collect()
        }
        Rule::None => return Err(Error::NoGradient { op: origin.op }),
    };
    if d.len() != origin.inputs.len() {
        return Err(Error::InvalidArgument {
            op: origin.op,
            message: format!(
                "backward rule returned {} gradients for {} inputs",
                d.len(),
                origin.inputs.len()
            ),
        });
    }
    Ok(d)
}

/// The recorded nodes on some path from a `wrt` variable to `output`, in creation (topological) order.
fn nodes_leading_to<B: Backend>(output: &Var<B>, wrt: &[&Var<B>]) -> Vec<Var<B>> {
    let mut seen = HashSet::new();
    let mut reachable = Vec::new();
    let mut stack = vec![output.clone()];
    while let Some(v) = stack.pop() {
        if !v.requires_grad() || !seen.insert(v.id()) {
            continue;
        }
        stack.extend(v.inputs().iter().cloned());
        reachable.push(v);
    }
    reachable.sort_by_key(|v| v.id());
    // A node is needed if it is a target or one of its inputs is needed; inputs come first in id order.
    let mut needed: HashSet<u64> = wrt.iter().map(|v| v.id()).collect();
    let mut order = Vec::new();
    for v in reachable {
        if needed.contains(&v.id()) || v.inputs().iter().any(|i| needed.contains(&i.id())) {
            needed.insert(v.id());
            order.push(v);
        }
    }
    order
}
