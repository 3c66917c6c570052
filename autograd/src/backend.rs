//! The primitive operations every backend implements. Everything differentiable is built from these.

use crate::{Error, Result, Shape};

/// Elementwise functions of one tensor. The `*Mask`/`*Slope` ops are the piecewise-constant
/// derivatives of the piecewise-linear ops; their own derivative is zero almost everywhere.
/// Every one of them is NaN at NaN, so a NaN reaches the gradients too.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum UnaryOp {
    Neg,
    Exp,
    Log,
    Sqrt,
    Square,
    Relu,
    LeakyRelu {
        slope: f64,
    },
    Sigmoid,
    Tanh,
    Clamp {
        min: f64,
        max: f64,
    },
    /// x * factor
    Scale {
        factor: f64,
    },
    /// x + value
    AddScalar {
        value: f64,
    },
    /// 1 where x > 0, else 0 (the derivative of relu)
    ReluMask,
    /// 1 where x > 0, else slope (the derivative of leaky relu)
    LeakyReluSlope {
        slope: f64,
    },
    /// 1 where min <= x <= max, else 0 (the derivative of clamp, as PyTorch defines it)
    ClampMask {
        min: f64,
        max: f64,
    },
}

impl UnaryOp {
    pub fn name(&self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Square => "square",
            UnaryOp::Relu => "relu",
            UnaryOp::LeakyRelu { .. } => "leaky_relu",
            UnaryOp::Sigmoid => "sigmoid",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Clamp { .. } => "clamp",
            UnaryOp::Scale { .. } => "scale",
            UnaryOp::AddScalar { .. } => "add_scalar",
            UnaryOp::ReluMask => "relu_mask",
            UnaryOp::LeakyReluSlope { .. } => "leaky_relu_slope",
            UnaryOp::ClampMask { .. } => "clamp_mask",
        }
    }

    /// The two scalar parameters the op reads (unused ones are 0).
    pub fn params(&self) -> [f64; 2] {
        match *self {
            UnaryOp::LeakyRelu { slope } | UnaryOp::LeakyReluSlope { slope } => [slope, 0.0],
            UnaryOp::Clamp { min, max } | UnaryOp::ClampMask { min, max } => [min, max],
            UnaryOp::Scale { factor } => [factor, 0.0],
            UnaryOp::AddScalar { value } => [value, 0.0],
            _ => [0.0, 0.0],
        }
    }

    /// The op applied to one f64 value: the reference definition every kernel is checked against.
    /// NaN in, NaN out, as numpy and IEEE 754 have it: relu, clamp and the derivative masks of NaN
    /// are NaN (Rust's `f64::max` would return the other operand).
    pub fn apply(&self, x: f64) -> f64 {
        if x.is_nan() {
            return x;
        }
        match *self {
            UnaryOp::Neg => -x,
            UnaryOp::Exp => x.exp(),
            UnaryOp::Log => x.ln(),
            UnaryOp::Sqrt => x.sqrt(),
            UnaryOp::Square => x * x,
            UnaryOp::Relu => x.max(0.0),
            UnaryOp::LeakyRelu { slope } => {
                if x > 0.0 {
                    x
                } else {
                    slope * x
                }
            }
            UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            UnaryOp::Tanh => x.tanh(),
            UnaryOp::Clamp { min, max } => x.max(min).min(max),
            UnaryOp::Scale { factor } => x * factor,
            UnaryOp::AddScalar { value } => x + value,
            UnaryOp::ReluMask => f64::from(u8::from(x > 0.0)),
            UnaryOp::LeakyReluSlope { slope } => {
                if x > 0.0 {
                    1.0
                } else {
                    slope
                }
            }
            UnaryOp::ClampMask { min, max } => f64::from(u8::from(min <= x && x <= max)),
        }
    }
}

/// Elementwise functions of two tensors, with numpy broadcasting of either operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
}

impl BinaryOp {
    pub fn name(&self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
        }
    }

    pub fn apply(&self, a: f64, b: f64) -> f64 {
        match self {
            BinaryOp::Add => a + b,
            BinaryOp::Sub => a - b,
            BinaryOp::Mul => a * b,
            BinaryOp::Div => a / b,
        }
    }
}

/// Distributions of the counter-based random generator.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Distribution {
    /// Uniform on the open interval (0, 1).
    Uniform,
    /// Standard normal (Box-Muller on two uniforms).
    Normal,
}

/// What a matmul does to its operands: `out[b] = op(a[b]) @ op(b[b])`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MatmulSpec {
    pub trans_a: bool,
    pub trans_b: bool,
}

/// Shapes of a batched matmul, checked: operands are [M, K] or [batch, M, K] (before transposes);
/// a batch of 1 is broadcast.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatmulDims {
    pub batch: usize,
    pub batch_a: usize,
    pub batch_b: usize,
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

impl MatmulDims {
    pub fn new(a: &Shape, b: &Shape, spec: MatmulSpec) -> Result<(MatmulDims, Shape)> {
        let err = |reason: &str| Error::Shape {
            op: "matmul",
            lhs: a.clone(),
            rhs: b.clone(),
            reason: reason.into(),
        };
        let split = |s: &Shape| match s.dims() {
            [r, c] => Some((1, *r, *c)),
            [bt, r, c] => Some((*bt, *r, *c)),
            _ => None,
        };
        let (batch_a, ra, ca) = split(a).ok_or_else(|| err("operands must have rank 2 or 3"))?;
        let (batch_b, rb, cb) = split(b).ok_or_else(|| err("operands must have rank 2 or 3"))?;
        let (m, k) = if spec.trans_a { (ca, ra) } else { (ra, ca) };
        let (k2, n) = if spec.trans_b { (cb, rb) } else { (rb, cb) };
        if k != k2 {
            return Err(err(&format!("inner dimensions differ ({k} vs {k2})")));
        }
        if batch_a != batch_b && batch_a != 1 && batch_b != 1 {
            return Err(err("batch sizes differ and neither is 1"));
        }
        let batch = batch_a.max(batch_b);
        let out = if a.rank() == 3 || b.rank() == 3 {
            Shape::checked("matmul", &[batch, m, n])?
        } else {
            Shape::checked("matmul", &[m, n])?
        };
        let dims = MatmulDims {
            batch,
            batch_a,
            batch_b,
            m,
            k,
            n,
        };
        Ok((dims, out))
    }
}

/// Checks that `shapes` cover the `total` elements of a flat tensor exactly.
pub fn check_split(total: usize, shapes: &[Shape]) -> Result<()> {
    let covered: usize = shapes.iter().map(Shape::numel).sum();
    if covered != total {
        return Err(Error::InvalidArgument {
            op: "split_flat",
            message: format!("the shapes hold {covered} elements, the flat tensor {total}"),
        });
    }
    Ok(())
}

/// A tensor knows its shape; its storage is the backend's business.
pub trait TensorShape {
    fn shape(&self) -> &Shape;
}

/// One set of primitive operations. `Cpu64` implements them as plain f64 loops (the reference);
/// the GPU backend implements them with WGSL kernels. Networks, losses and tests are written once,
/// generic over this trait, through [`crate::Var`].
pub trait Backend: Clone + 'static {
    type Tensor: Clone + TensorShape;

    fn name(&self) -> &'static str;

    /// A tensor holding `values` (rounded to the backend's precision; an upload on a device).
    fn tensor(&self, values: &[f64], shape: &Shape) -> Result<Self::Tensor>;
    /// Reads values back (this waits for pending work on an asynchronous device).
    fn to_f64(&self, x: &Self::Tensor) -> Result<Vec<f64>>;

    fn fill(&self, shape: &Shape, value: f64) -> Result<Self::Tensor>;
    fn copy(&self, x: &Self::Tensor) -> Result<Self::Tensor>;
    /// Same data, another shape with the same number of elements (no copy).
    fn reshape(&self, x: &Self::Tensor, shape: &Shape) -> Result<Self::Tensor>;
    /// Materialises `x` broadcast to `shape`.
    fn broadcast_to(&self, x: &Self::Tensor, shape: &Shape) -> Result<Self::Tensor>;
    /// The elements of `parts`, one after another, as one tensor [total]: the flat form of a
    /// parameter store, so an optimiser or an EMA updates every parameter in one dispatch.
    fn concat_flat(&self, parts: &[&Self::Tensor]) -> Result<Self::Tensor>;
    /// The inverse of [`Backend::concat_flat`]: consecutive pieces of `flat` with these shapes,
    /// which must account for every element.
    fn split_flat(&self, flat: &Self::Tensor, shapes: &[Shape]) -> Result<Vec<Self::Tensor>>;

    fn unary(&self, op: UnaryOp, x: &Self::Tensor) -> Result<Self::Tensor>;
    fn binary(&self, op: BinaryOp, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;

    /// Sums over the given axes (sorted, distinct, in range), keeping them as size-1 dimensions.
    fn sum_axes(&self, x: &Self::Tensor, axes: &[usize]) -> Result<Self::Tensor>;

    fn matmul(&self, a: &Self::Tensor, b: &Self::Tensor, spec: MatmulSpec) -> Result<Self::Tensor>;

    /// Element i is drawn from `dist` with the counter-based generator keyed by (seed, counter + i).
    fn random(
        &self,
        shape: &Shape,
        dist: Distribution,
        seed: u64,
        counter: u64,
    ) -> Result<Self::Tensor>;
}
