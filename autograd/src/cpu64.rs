//! The reference backend: plain f64 loops over contiguous row-major data, written to be obviously right.

use crate::backend::{
    Backend, BinaryOp, Distribution, MatmulDims, MatmulSpec, TensorShape, UnaryOp,
};
use crate::{random, Error, Result, Shape};
use std::sync::Arc;

#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu64;

#[derive(Clone, Debug)]
pub struct CpuTensor {
    pub data: Arc<Vec<f64>>,
    pub shape: Shape,
}

impl TensorShape for CpuTensor {
    fn shape(&self) -> &Shape {
        &self.shape
    }
}

/// An empty vector with room for `n` values, or an error when the memory cannot be had: a result
/// too large for the machine (from a huge padding, say) is the caller's mistake, not a reason to
/// abort the process.
pub fn reserved(op: &'static str, n: usize) -> Result<Vec<f64>> {
    let mut data = Vec::new();
    data.try_reserve_exact(n)
        .map_err(|_| Error::InvalidArgument {
            op,
            message: format!(
                "its result of {n} values ({:.3e} bytes) cannot be allocated",
                n as f64 * 8.0
            ),
        })?;
    Ok(data)
}

/// `n` copies of `value`, in memory reserved as [`reserved`] does.
pub fn filled(op: &'static str, n: usize, value: f64) -> Result<Vec<f64>> {
    let mut data = reserved(op, n)?;
    data.resize(n, value);
    Ok(data)
}

/// The `n` values of `values`, in memory reserved as [`reserved`] does.
pub fn collected(
    op: &'static str,
    n: usize,
    values: impl Iterator<Item = f64>,
) -> Result<Vec<f64>> {
    let mut data = reserved(op, n)?;
    data.extend(values);
    Ok(data)
}

fn tensor(data: Vec<f64>, shape: Shape) -> CpuTensor {
    CpuTensor {
        data: Arc::new(data),
        shape,
    }
}

/// The multi-index of flat position `i` in `shape`, dotted with `strides`.
fn strided_offset(mut i: usize, shape: &Shape, strides: &[usize]) -> usize {
    let mut offset = 0;
    for d in (0..shape.rank()).rev() {
        let n = shape.dims()[d];
        offset += (i % n) * strides[d];
        i /= n;
    }
    offset
}

impl Backend for Cpu64 {
    type Tensor = CpuTensor;

    fn name(&self) -> &'static str {
        "cpu64"
    }

    fn tensor(&self, values: &[f64], shape: &Shape) -> Result<CpuTensor> {
        if values.len() != shape.numel() {
            return Err(Error::InvalidArgument {
                op: "from_f64",
                message: format!("{} values for shape {shape}", values.len()),
            });
        }
        Ok(tensor(values.to_vec(), shape.clone()))
    }

    fn to_f64(&self, x: &CpuTensor) -> Result<Vec<f64>> {
        Ok(x.data.to_vec())
    }

    fn fill(&self, shape: &Shape, value: f64) -> Result<CpuTensor> {
        Ok(tensor(filled("fill", shape.numel(), value)?, shape.clone()))
    }

    fn copy(&self, x: &CpuTensor) -> Result<CpuTensor> {
        Ok(tensor(x.data.to_vec(), x.shape.clone()))
    }

    fn reshape(&self, x: &CpuTensor, shape: &Shape) -> Result<CpuTensor> {
        Ok(CpuTensor {
            data: x.data.clone(),
            shape: shape.clone(),
        })
    }

    fn concat_flat(&self, parts: &[&CpuTensor]) -> Result<CpuTensor> {
        let data: Vec<f64> = parts.iter().flat_map(|p| p.data.iter().copied()).collect();
        let n = data.len();
        Ok(tensor(data, Shape::from([n])))
    }

    fn split_flat(&self, flat: &CpuTensor, shapes: &[Shape]) -> Result<Vec<CpuTensor>> {
        crate::backend::check_split(flat.shape.numel(), shapes)?;
        let mut start = 0;
        Ok(shapes
            .iter()
            .map(|s| {
                let part = flat.data[start..start + s.numel()].to_vec();
                start += s.numel();
                tensor(part, s.clone())
            })
            .collect())
    }

    fn broadcast_to(&self, x: &CpuTensor, shape: &Shape) -> Result<CpuTensor> {
        let strides = x.shape.broadcast_strides(shape);
        let values = (0..shape.numel()).map(|i| x.data[strided_offset(i, shape, &strides)]);
        let data = collected("broadcast", shape.numel(), values)?;
        Ok(tensor(data, shape.clone()))
    }

    fn unary(&self, op: UnaryOp, x: &CpuTensor) -> Result<CpuTensor> {
        Ok(tensor(
            x.data.iter().map(|&v| op.apply(v)).collect(),
            x.shape.clone(),
        ))
    }

    fn binary(&self, op: BinaryOp, a: &CpuTensor, b: &CpuTensor) -> Result<CpuTensor> {
        let out = Shape::broadcast(op.name(), &a.shape, &b.shape)?;
        let sa = a.shape.broadcast_strides(&out);
        let sb = b.shape.broadcast_strides(&out);
        let values = (0..out.numel()).map(|i| {
            op.apply(
                a.data[strided_offset(i, &out, &sa)],
                b.data[strided_offset(i, &out, &sb)],
            )
        });
        let data = collected(op.name(), out.numel(), values)?;
        Ok(tensor(data, out))
    }

    fn sum_axes(&self, x: &CpuTensor, axes: &[usize]) -> Result<CpuTensor> {
        let out = x.shape.reduced(axes);
        let strides = out.broadcast_strides(&x.shape);
        let mut data = vec![0.0; out.numel()];
        for (i, &v) in x.data.iter().enumerate() {
            data[strided_offset(i, &x.shape, &strides)] += v;
        }
        Ok(tensor(data, out))
    }

    fn matmul(&self, a: &CpuTensor, b: &CpuTensor, spec: MatmulSpec) -> Result<CpuTensor> {
        let (d, out) = MatmulDims::new(&a.shape, &b.shape, spec)?;
        let a_at = |bt: usize, i: usize, p: usize| {
            let base = if d.batch_a == 1 { 0 } else { bt * d.m * d.k };
            a.data[base
                + if spec.trans_a {
                    p * d.m + i
                } else {
                    i * d.k + p
                }]
        };
        let b_at = |bt: usize, p: usize, j: usize| {
            let base = if d.batch_b == 1 { 0 } else { bt * d.k * d.n };
            b.data[base
                + if spec.trans_b {
                    j * d.k + p
                } else {
                    p * d.n + j
                }]
        };
        let mut data = filled("matmul", out.numel(), 0.0)?;
        for bt in 0..d.batch {
            for i in 0..d.m {
                for j in 0..d.n {
                    data[(bt * d.m + i) * d.n + j] =
                        (0..d.k).map(|p| a_at(bt, i, p) * b_at(bt, p, j)).sum();
                }
            }
        }
        Ok(tensor(data, out))
    }

    fn random(
        &self,
        shape: &Shape,
        dist: Distribution,
        seed: u64,
        counter: u64,
    ) -> Result<CpuTensor> {
        let draw = |i: usize| {
            let c = counter.wrapping_add(i as u64);
            match dist {
                Distribution::Uniform => random::uniform(seed, c),
                Distribution::Normal => random::normal(seed, c),
            }
        };
        let data = collected("random", shape.numel(), (0..shape.numel()).map(draw))?;
        Ok(tensor(data, shape.clone()))
    }
}
