//! `Var`: a tensor with the record of how it was computed, and reverse mode over that record.
//!
//! Each op appends a node that holds its inputs and its backward rule; node ids grow with creation,
//! so sorting by id is a topological order. Backward rules are written with the same differentiable
//! ops (see `ops.rs`), so with `create_graph` the gradient is itself a `Var` that can be
//! differentiated again.
//!
//! Forward mode ([`jvp`]) needs no record: while it evaluates a function, each op's output carries
//! its tangent beside its value, computed by the op's forward-mode rule as the op runs, and both
//! are freed when the function drops the output.

use crate::backend::{Backend, TensorShape};
use crate::{Error, Result, Shape};
use std::cell::{Cell, OnceCell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static RECORDING: Cell<bool> = const { Cell::new(true) };
    /// On while [`jvp`] evaluates its function: ops then push tangents forward.
    static FORWARD_MODE: Cell<bool> = const { Cell::new(false) };
    /// The first error of a forward-mode rule during [`jvp`], reported when it returns.
    static FORWARD_ERROR: RefCell<Option<Error>> = const { RefCell::new(None) };
    /// On inside [`second_order`]: what is recorded will be differentiated twice.
    static SECOND_ORDER: Cell<bool> = const { Cell::new(false) };
}

fn with_forward_mode<T>(on: bool, f: impl FnOnce() -> T) -> T {
    let before = FORWARD_MODE.with(|m| m.replace(on));
    let out = f();
    FORWARD_MODE.with(|m| m.set(before));
    out
}

/// Runs `f` with recording switched on or off, restoring the previous state afterwards.
pub fn with_recording<T>(on: bool, f: impl FnOnce() -> T) -> T {
    let before = RECORDING.with(|r| r.replace(on));
    let out = f();
    RECORDING.with(|r| r.set(before));
    out
}

/// True when no derivative of what runs now can be wanted: nothing is recorded and no tangent
/// is pushed (a first-order backward, a `no_grad` block). A backward rule may then take fused
/// kernels that have no rules of their own.
pub(crate) fn plain() -> bool {
    !RECORDING.with(|r| r.get()) && !FORWARD_MODE.with(|m| m.get())
}

/// True while [`jvp`] evaluates its function (ops push tangents).
pub(crate) fn forward_mode() -> bool {
    FORWARD_MODE.with(|m| m.get())
}

/// Runs `f` telling the ops it records that their gradient will itself be differentiated
/// (reverse over reverse, as MLB-Seg's reverse meta step takes it). An op whose fused backward
/// is first order only then records its composition of differentiable ops in the forward, so
/// the backward with `create_graph` walks what the forward recorded instead of recomputing it.
/// Values are the same either way; outside this scope such an op still supports create_graph,
/// by recomputing.
pub fn second_order<T>(f: impl FnOnce() -> T) -> T {
    let before = SECOND_ORDER.with(|s| s.replace(true));
    let out = f();
    SECOND_ORDER.with(|s| s.set(before));
    out
}

/// True inside [`second_order`] while recording (not in forward mode).
pub(crate) fn second_order_coming() -> bool {
    SECOND_ORDER.with(|s| s.get()) && RECORDING.with(|r| r.get()) && !forward_mode()
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
}

/// What forward mode knows of a value's motion.
enum Tangent<B: Backend> {
    Moving(Var<B>),
    /// It depends on a moving value through this op, which has no forward-mode rule; an error
    /// only if the output of [`jvp`] is reached this way.
    Lost(&'static str),
}

struct Node<B: Backend> {
    id: u64,
    value: B::Tensor,
    backend: B,
    requires_grad: bool,
    origin: Option<Origin<B>>,
    /// Set in forward mode when the value moves (see [`jvp`]).
    tangent: OnceCell<Tangent<B>>,
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
            tangent: OnceCell::new(),
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
    /// input requires a gradient; otherwise a constant. In forward mode ([`jvp`]) never recorded:
    /// the forward-mode rule is applied at once, and neither rule is kept.
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
        let forward = FORWARD_MODE.with(|m| m.get());
        let record =
            !forward && RECORDING.with(|r| r.get()) && inputs.iter().any(|v| v.requires_grad());
        if !record {
            let out = Self::constant(&backend, value);
            if forward {
                out.push_tangent(op, inputs, jvp.as_ref());
            }
            return out;
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
            }),
            tangent: OnceCell::new(),
        }))
    }

    /// Forward mode: this output's tangent from its inputs' by the op's rule, if any input moves.
    fn push_tangent(&self, op: &'static str, inputs: &[&Var<B>], jvp: Option<&JvpFn<B>>) {
        let mut d = Vec::with_capacity(inputs.len());
        for input in inputs {
            match input.0.tangent.get() {
                Some(Tangent::Lost(why)) => {
                    let _ = self.0.tangent.set(Tangent::Lost(why));
                    return;
                }
                Some(Tangent::Moving(t)) => d.push(Some(t.clone())),
                None => d.push(None),
            }
        }
        if d.iter().all(Option::is_none) {
            return;
        }
        let Some(rule) = jvp else {
            let _ = self.0.tangent.set(Tangent::Lost(op));
            return;
        };
        let xs: Vec<Var<B>> = inputs.iter().map(|&v| v.clone()).collect();
        // The rule's own ops are plain: a tangent's tangent is not wanted.
        match with_forward_mode(false, || rule(&xs, self, &d)) {
            Ok(t) => {
                let _ = self.0.tangent.set(Tangent::Moving(t));
            }
            Err(e) => FORWARD_ERROR.with(|slot| {
                slot.borrow_mut().get_or_insert(e);
            }),
        }
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

/// Forward mode: `f` at `primals` and its tangent (the Jacobian-vector product) when each primal
/// moves along its tangent (same shape). `f` runs once, without a record: each op computes its
/// output's tangent by its forward-mode rule as it runs, and an intermediate and its tangent are
/// freed as soon as `f` drops them, so the memory is that of inference with twice the live
/// values. Both results are constants. An op without a forward-mode rule between a primal and the
/// output is `Error::NoForwardMode`; nested calls are an error.
pub fn jvp<B: Backend>(
    f: impl FnOnce(&[Var<B>]) -> Result<Var<B>>,
    primals: &[Var<B>],
    tangents: &[Var<B>],
) -> Result<(Var<B>, Var<B>)> {
    if FORWARD_MODE.with(|m| m.get()) {
        return Err(Error::InvalidArgument {
            op: "jvp",
            message: "forward mode inside forward mode is not supported".into(),
        });
    }
    if primals.len() != tangents.len() {
        return Err(Error::InvalidArgument {
            op: "jvp",
            message: format!("{} primals but {} tangents", primals.len(), tangents.len()),
        });
    }
    let mut duals = Vec::with_capacity(primals.len());
    for (x, dx) in primals.iter().zip(tangents) {
        if x.shape() != dx.shape() {
            return Err(Error::Shape {
                op: "jvp",
                lhs: x.shape().clone(),
                rhs: dx.shape().clone(),
                reason: "a tangent must have its primal's shape".into(),
            });
        }
        let dual = x.detach();
        let _ = dual.0.tangent.set(Tangent::Moving(dx.detach()));
        duals.push(dual);
    }
    let out = with_forward_mode(true, || with_recording(false, || f(&duals)));
    drop(duals);
    if let Some(e) = FORWARD_ERROR.with(|slot| slot.borrow_mut().take()) {
        return Err(e);
    }
    let out = out?;
    let tangent = match out.0.tangent.get() {
        Some(Tangent::Moving(t)) => t.clone(),
        Some(Tangent::Lost(op)) => return Err(Error::NoForwardMode { op }),
        None => Var::zeros(out.backend(), out.shape())?,
    };
    Ok((out.detach(), tangent))
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
