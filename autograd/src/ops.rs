//! The differentiable ops: each forward calls one backend primitive, and its backward rule, next to
//! it, is written in these same ops, so every rule can itself be differentiated.

use crate::backend::{Backend, BinaryOp, Distribution, MatmulSpec, UnaryOp};
use crate::shape::normalize_axes;
use crate::var::{sum_tangents, JvpFn, Rule, Var};
use crate::{Error, Result, Shape};

/// A forward-mode rule (see [`crate::jvp`]).
pub(crate) fn tangent<B: Backend>(
    f: impl Fn(&[Var<B>], &Var<B>, &[Option<Var<B>>]) -> Result<Var<B>> + 'static,
) -> JvpFn<B> {
    Box::new(f)
}

pub(crate) fn rule<B: Backend>(
    f: impl Fn(&[Var<B>], &Var<B>, &Var<B>) -> Result<Vec<Option<Var<B>>>> + 'static,
) -> Rule<B> {
    Rule::Differentiable(Box::new(f))
}

/// Constructors.
impl<B: Backend> Var<B> {
    pub fn full(backend: &B, shape: &Shape, value: f64) -> Result<Self> {
        Ok(Var::constant(backend, backend.fill(shape, value)?))
    }

    pub fn zeros(backend: &B, shape: &Shape) -> Result<Self> {
        Self::full(backend, shape, 0.0)
    }

    pub fn ones(backend: &B, shape: &Shape) -> Result<Self> {
        Self::full(backend, shape, 1.0)
    }

    /// Element i drawn with the counter-based generator at (seed, counter + i).
    pub fn random(
        backend: &B,
        shape: &Shape,
        dist: Distribution,
        seed: u64,
        counter: u64,
    ) -> Result<Self> {
        Ok(Var::constant(
            backend,
            backend.random(shape, dist, seed, counter)?,
        ))
    }
}

/// Elementwise functions of one tensor.
impl<B: Backend> Var<B> {
    pub fn unary(&self, op: UnaryOp) -> Result<Self> {
        let value = self.backend().unary(op, self.value())?;
        // Elementwise, so the Jacobian is diagonal: the tangent is the backward rule applied to dx.
        Ok(Var::from_op_with_jvp(
            op.name(),
            value,
            &[self],
            rule(move |x, y, g| Ok(vec![d_unary(op, &x[0], y, g)?])),
            tangent(move |x, y, d| {
                let dx = d[0].as_ref().expect("the only input moves");
                sum_tangents(y.backend(), y.shape(), [d_unary(op, &x[0], y, dx)])
            }),
        ))
    }

    pub fn neg(&self) -> Result<Self> {
        self.unary(UnaryOp::Neg)
    }
    pub fn exp(&self) -> Result<Self> {
        self.unary(UnaryOp::Exp)
    }
    pub fn log(&self) -> Result<Self> {
        self.unary(UnaryOp::Log)
    }
    pub fn sqrt(&self) -> Result<Self> {
        self.unary(UnaryOp::Sqrt)
    }
    pub fn square(&self) -> Result<Self> {
        self.unary(UnaryOp::Square)
    }
    pub fn relu(&self) -> Result<Self> {
        self.unary(UnaryOp::Relu)
    }
    pub fn leaky_relu(&self, slope: f64) -> Result<Self> {
        self.unary(UnaryOp::LeakyRelu { slope })
    }
    pub fn sigmoid(&self) -> Result<Self> {
        self.unary(UnaryOp::Sigmoid)
    }
    pub fn tanh(&self) -> Result<Self> {
        self.unary(UnaryOp::Tanh)
    }
    pub fn clamp(&self, min: f64, max: f64) -> Result<Self> {
        if min > max {
            return Err(Error::InvalidArgument {
                op: "clamp",
                message: format!("min {min} is greater than max {max}"),
            });
        }
        self.unary(UnaryOp::Clamp { min, max })
    }
    pub fn scale(&self, factor: f64) -> Result<Self> {
        self.unary(UnaryOp::Scale { factor })
    }
    pub fn add_scalar(&self, value: f64) -> Result<Self> {
        self.unary(UnaryOp::AddScalar { value })
    }
}

/// d(op(x)) given y = op(x) and the incoming gradient g.
fn d_unary<B: Backend>(op: UnaryOp, x: &Var<B>, y: &Var<B>, g: &Var<B>) -> Result<Option<Var<B>>> {
    use UnaryOp::*;
    let d = match op {
        Neg => g.neg()?,
        Exp => g.mul(y)?,
        Log => g.div(x)?,
        Sqrt => g.div(y)?.scale(0.5)?,
        Square => g.mul(x)?.scale(2.0)?,
        Relu => g.mul(&x.unary(ReluMask)?)?,
        LeakyRelu { slope } => g.mul(&x.unary(LeakyReluSlope { slope })?)?,
        Sigmoid => g.mul(&y.sub(&y.square()?)?)?,
        Tanh => g.mul(&y.square()?.neg()?.add_scalar(1.0)?)?,
        Clamp { min, max } => g.mul(&x.unary(ClampMask { min, max })?)?,
        Scale { factor } => g.scale(factor)?,
        AddScalar { .. } => g.clone(),
        // Piecewise constant: the derivative is zero wherever it exists.
        ReluMask | LeakyReluSlope { .. } | ClampMask { .. } => return Ok(None),
    };
    Ok(Some(d))
}

/// Elementwise functions of two tensors; either operand may be broadcast (numpy rules).
impl<B: Backend> Var<B> {
    pub fn binary(&self, op: BinaryOp, other: &Var<B>) -> Result<Self> {
        let value = self.backend().binary(op, self.value(), other.value())?;
        Ok(Var::from_op_with_jvp(
            op.name(),
            value,
            &[self, other],
            rule(move |ab, y, g| d_binary(op, &ab[0], &ab[1], y, g)),
            tangent(move |ab, y, d| t_binary(op, &ab[0], &ab[1], y, d)),
        ))
    }

    pub fn add(&self, other: &Var<B>) -> Result<Self> {
        self.binary(BinaryOp::Add, other)
    }
    pub fn sub(&self, other: &Var<B>) -> Result<Self> {
        self.binary(BinaryOp::Sub, other)
    }
    pub fn mul(&self, other: &Var<B>) -> Result<Self> {
        self.binary(BinaryOp::Mul, other)
    }
    pub fn div(&self, other: &Var<B>) -> Result<Self> {
        self.binary(BinaryOp::Div, other)
    }
}

fn d_binary<B: Backend>(
    op: BinaryOp,
    a: &Var<B>,
    b: &Var<B>,
    y: &Var<B>,
    g: &Var<B>,
) -> Result<Vec<Option<Var<B>>>> {
    let (da, db) = match op {
        BinaryOp::Add => (g.clone(), g.clone()),
        BinaryOp::Sub => (g.clone(), g.neg()?),
        BinaryOp::Mul => (g.mul(b)?, g.mul(a)?),
        // d(a/b)/db = -a/b^2 = -y/b
        BinaryOp::Div => (g.div(b)?, g.mul(y)?.div(b)?.neg()?),
    };
    Ok(vec![
        Some(da.sum_to(a.shape())?),
        Some(db.sum_to(b.shape())?),
    ])
}

/// The tangent of `a op b` (broadcast to y's shape by the ops themselves).
fn t_binary<B: Backend>(
    op: BinaryOp,
    a: &Var<B>,
    b: &Var<B>,
    y: &Var<B>,
    d: &[Option<Var<B>>],
) -> Result<Var<B>> {
    let (da, db) = (d[0].as_ref(), d[1].as_ref());
    let terms = match op {
        BinaryOp::Add => [da.map(|t| Ok(t.clone())), db.map(|t| Ok(t.clone()))],
        BinaryOp::Sub => [da.map(|t| Ok(t.clone())), db.map(Var::neg)],
        BinaryOp::Mul => [da.map(|t| t.mul(b)), db.map(|t| a.mul(t))],
        // d(a/b) = da/b - y db/b
        BinaryOp::Div => [da.map(|t| t.div(b)), db.map(|t| y.mul(t)?.div(b)?.neg())],
    };
    sum_tangents(y.backend(), y.shape(), terms.map(Option::transpose))
}

/// Shape ops and reductions.
impl<B: Backend> Var<B> {
    /// Same data, another shape with as many elements.
    pub fn reshape(&self, shape: &Shape) -> Result<Self> {
        if shape.numel() != self.shape().numel() {
            return Err(Error::Shape {
                op: "reshape",
                lhs: self.shape().clone(),
                rhs: shape.clone(),
                reason: "the element counts differ".into(),
            });
        }
        if shape == self.shape() {
            return Ok(self.clone());
        }
        let value = self.backend().reshape(self.value(), shape)?;
        Ok(Var::from_op_with_jvp(
            "reshape",
            value,
            &[self],
            rule(|x, _, g| Ok(vec![Some(g.reshape(x[0].shape())?)])),
            tangent(|_, y, d| d[0].as_ref().expect("moves").reshape(y.shape())),
        ))
    }

    /// A copy of the data (an identity in the math).
    pub fn copy(&self) -> Result<Self> {
        let value = self.backend().copy(self.value())?;
        Ok(Var::from_op_with_jvp(
            "copy",
            value,
            &[self],
            rule(|_, _, g| Ok(vec![Some(g.clone())])),
            tangent(|_, _, d| Ok(d[0].clone().expect("moves"))),
        ))
    }

    pub fn broadcast_to(&self, shape: &Shape) -> Result<Self> {
        if Shape::broadcast("broadcast_to", self.shape(), shape)? != *shape {
            return Err(Error::Shape {
                op: "broadcast_to",
                lhs: self.shape().clone(),
                rhs: shape.clone(),
                reason: "the first does not broadcast to the second".into(),
            });
        }
        if shape == self.shape() {
            return Ok(self.clone());
        }
        let value = self.backend().broadcast_to(self.value(), shape)?;
        Ok(Var::from_op_with_jvp(
            "broadcast_to",
            value,
            &[self],
            rule(|x, _, g| Ok(vec![Some(g.sum_to(x[0].shape())?)])),
            tangent(|_, y, d| d[0].as_ref().expect("moves").broadcast_to(y.shape())),
        ))
    }

    /// Sums over the axes along which `shape` was broadcast to this shape: the adjoint of broadcast_to.
    pub fn sum_to(&self, shape: &Shape) -> Result<Self> {
        if shape == self.shape() {
            return Ok(self.clone());
        }
        let axes = shape.broadcast_axes(self.shape());
        self.sum_axes(&axes, true)?.reshape(shape)
    }

    pub fn sum_axes(&self, axes: &[usize], keepdim: bool) -> Result<Self> {
        let axes = normalize_axes("sum", self.shape(), axes)?;
        let value = self.backend().sum_axes(self.value(), &axes)?;
        let summed = axes.clone();
        let kept = Var::from_op_with_jvp(
            "sum",
            value,
            &[self],
            rule(|x, _, g| Ok(vec![Some(g.broadcast_to(x[0].shape())?)])),
            tangent(move |_, _, d| d[0].as_ref().expect("moves").sum_axes(&summed, true)),
        );
        if keepdim {
            return Ok(kept);
        }
        let dims: Vec<usize> = (0..self.shape().rank())
            .filter(|a| !axes.contains(a))
            .map(|a| self.shape().dims()[a])
            .collect();
        kept.reshape(&Shape(dims))
    }

    /// The sum of all elements, as a scalar (rank 0).
    pub fn sum(&self) -> Result<Self> {
        let all: Vec<usize> = (0..self.shape().rank()).collect();
        self.sum_axes(&all, false)
    }

    pub fn mean_axes(&self, axes: &[usize], keepdim: bool) -> Result<Self> {
        let axes = normalize_axes("mean", self.shape(), axes)?;
        let count: usize = axes.iter().map(|&a| self.shape().dims()[a]).product();
        self.sum_axes(&axes, keepdim)?.scale(1.0 / count as f64)
    }

    pub fn mean(&self) -> Result<Self> {
        self.sum()?.scale(1.0 / self.shape().numel() as f64)
    }
}

/// Batched matrix product.
impl<B: Backend> Var<B> {
    /// `op(self) @ op(other)` per batch, where op transposes the last two axes when asked.
    /// Operands are [M, K] or [batch, M, K]; a batch of 1 is broadcast.
    pub fn matmul(&self, other: &Var<B>, spec: MatmulSpec) -> Result<Self> {
        let value = self.backend().matmul(self.value(), other.value(), spec)?;
        Ok(Var::from_op_with_jvp(
            "matmul",
            value,
            &[self, other],
            rule(move |ab, _, g| d_matmul(spec, &ab[0], &ab[1], g)),
            tangent(move |ab, y, d| {
                let terms = [
                    d[0].as_ref().map(|t| t.matmul(&ab[1], spec)),
                    d[1].as_ref().map(|t| ab[0].matmul(t, spec)),
                ];
                sum_tangents(y.backend(), y.shape(), terms.map(Option::transpose))
            }),
        ))
    }
}

fn d_matmul<B: Backend>(
    spec: MatmulSpec,
    a: &Var<B>,
    b: &Var<B>,
    g: &Var<B>,
) -> Result<Vec<Option<Var<B>>>> {
    let mm =
        |x: &Var<B>, y: &Var<B>, trans_a, trans_b| x.matmul(y, MatmulSpec { trans_a, trans_b });
    // C = op(A) op(B); each case is dC/dA and dC/dB written so the result has A's and B's layout.
    let (da, db) = match (spec.trans_a, spec.trans_b) {
        (false, false) => (mm(g, b, false, true)?, mm(a, g, true, false)?),
        (false, true) => (mm(g, b, false, false)?, mm(g, a, true, false)?),
        (true, false) => (mm(b, g, false, true)?, mm(a, g, false, false)?),
        (true, true) => (mm(b, g, true, true)?, mm(g, a, true, true)?),
    };
    Ok(vec![
        Some(da.sum_to(a.shape())?),
        Some(db.sum_to(b.shape())?),
    ])
}
