//! Tensors larger than one storage binding (issue 24 item 4). A tensor may fill a buffer up to the
//! adapter's max_buffer_size, but a kernel binds at most max_storage_buffer_binding_size bytes of
//! it (128 MiB on lavapipe and WebGPU's default). Each op states how it splits when an operand or
//! its result is larger than that:
//!
//! - flat: a kernel whose output element i reads element i of its operands (elementwise, fill,
//!   random) runs once per range of elements, binding the same range of every tensor
//!   ([`Gpu::flat_ranges`]);
//! - by samples: an op over [N, ...] whose samples are independent (convolutions, pooling, batch
//!   norm, the losses) runs on ranges of samples; the results are joined along N, or summed when
//!   the op reduces over N (conv grad-weight, batch-norm statistics, Dice sums)
//!   ([`Gpu::by_samples`]).
//!
//! A range starts where a binding may (a multiple of min_storage_buffer_offset_alignment) and is
//! bound in place; a range of samples whose start is not aligned is copied out first. Every launch
//! checks its bindings against the limit, so an op that does not split refuses with its kernel's
//! name rather than binding a truncated range.

use super::backend::{backend_error, Gpu, GpuTensor};
use super::context::BufferCopy;
use metaseg_autograd::{Backend, BinaryOp, Result, Shape, TensorShape};
use std::ops::Range;

/// How the results of the ranges of [`Gpu::by_samples`] make the op's result.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Join {
    /// Each range's result holds its samples: the result is their concatenation along axis 0.
    Samples,
    /// Each range's result is a partial sum over its samples: the result is their sum.
    Sum,
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// `shape` with `n` along axis 0.
pub(crate) fn with_samples(shape: &Shape, n: usize) -> Shape {
    let mut dims = shape.dims().to_vec();
    dims[0] = n;
    Shape::from(&dims[..])
}

impl Gpu {
    /// Whether every tensor fits one binding.
    pub(crate) fn fits(&self, tensors: &[&GpuTensor]) -> bool {
        let limit = self.context().max_binding_bytes();
        tensors.iter().all(|t| t.bound_bytes() <= limit)
    }

    /// Whether a tensor of `shape` fits one binding.
    pub(crate) fn shape_fits(&self, shape: &Shape) -> bool {
        4 * shape.numel().max(1).next_multiple_of(4) as u64 <= self.context().max_binding_bytes()
    }

    /// Ranges of `count` units with at most as many units each as keep `unit` elements per unit
    /// (the largest of the tensors split) within one binding; the range length is a multiple of
    /// the units that keep each start aligned when it can be (`units` lists every tensor's
    /// elements per unit). Empty when not one unit fits.
    fn unit_ranges(&self, count: usize, units: &[usize]) -> Vec<Range<usize>> {
        let ctx = self.context();
        let (limit, align) = (ctx.max_binding_bytes() / 4, ctx.binding_alignment().max(4));
        let largest = units.iter().copied().max().unwrap_or(1).max(1);
        let mut per_range = (limit as usize / largest).min(count.max(1));
        if per_range == 0 {
            return Vec::new();
        }
        let step = units.iter().fold(1u64, |step, &u| {
            let s = align / gcd(align, 4 * u.max(1) as u64);
            step / gcd(step, s) * s
        }) as usize;
        if per_range < count && step <= per_range {
            per_range -= per_range % step;
        }
        (0..count)
            .step_by(per_range)
            .map(|s| s..(s + per_range).min(count))
            .collect()
    }

    /// Elements `start..start + shape.numel()` of `t` as a tensor of `shape`: a view when the
    /// start is aligned for binding, a copy otherwise.
    fn part(&self, t: &GpuTensor, start: usize, shape: Shape) -> Result<GpuTensor> {
        let view = t.view(start, shape);
        if view
            .offset()
            .is_multiple_of(self.context().binding_alignment())
        {
            return Ok(view);
        }
        let copy = self.empty(view.shape())?;
        self.copy_into(&copy, 0, &view)?;
        Ok(copy)
    }

    /// Copies all of `from` into `to` from element `start` on.
    fn copy_into(&self, to: &GpuTensor, start: usize, from: &GpuTensor) -> Result<()> {
        let copy = BufferCopy {
            from: from.buffer(),
            from_offset: from.offset(),
            to: to.buffer(),
            to_offset: to.offset() + 4 * start as u64,
            bytes: 4 * from.shape().numel() as u64,
        };
        if copy.bytes == 0 {
            return Ok(());
        }
        self.context().copy_regions(&[copy]).map_err(backend_error)
    }

    /// Ranges of the `n` elements that flat kernels bind one at a time: one range when they fit,
    /// else ranges of whole aligned vec4s (every range but the last a multiple of the alignment).
    pub(crate) fn flat_ranges(&self, n: usize) -> Vec<Range<usize>> {
        if self.shape_fits(&Shape::from([n])) {
            return std::iter::once(0..n).collect();
        }
        self.unit_ranges(n, &[1])
    }

    /// Runs `op` on ranges of the samples (axis 0) of the `batched` tensors when a tensor of the
    /// op (a batched one, or `result` with `Join::Samples`) exceeds one binding: `f` gets the
    /// ranges' parts of `batched` and the range's number of samples, and returns the range's
    /// result, which `join` combines. `None` when everything fits (the caller launches as usual).
    /// With no batched tensor, the samples are those of `result`.
    pub(crate) fn by_samples(
        &self,
        op: &str,
        batched: &[&GpuTensor],
        result: (&Shape, Join),
        mut f: impl FnMut(&[GpuTensor], usize) -> Result<GpuTensor>,
    ) -> Result<Option<GpuTensor>> {
        let (shape, join) = result;
        let joined = join == Join::Samples;
        if self.fits(batched) && (!joined || self.shape_fits(shape)) {
            return Ok(None);
        }
        let samples = |s: &Shape| s.dims().first().copied().unwrap_or(1);
        let n = batched
            .first()
            .map_or(samples(shape), |t| samples(t.shape()));
        let per_sample = |s: &Shape| s.numel() / n.max(1);
        let mut units: Vec<usize> = batched.iter().map(|t| per_sample(t.shape())).collect();
        if joined {
            units.push(per_sample(shape));
        }
        let ranges = self.unit_ranges(n, &units);
        if ranges.len() < 2 {
            let bytes = 4 * units.iter().max().copied().unwrap_or(0);
            return Err(backend_error(format!(
                "{op}: one sample needs {bytes} bytes; the adapter binds at most {} bytes, and \
                 this op splits its tensors by samples only",
                self.context().max_binding_bytes()
            )));
        }
        self.context().note_split(op);
        let out = if joined {
            Some(self.empty(shape)?)
        } else {
            None
        };
        let mut sum: Option<GpuTensor> = None;
        for r in ranges {
            let parts = batched
                .iter()
                .map(|t| {
                    let u = per_sample(t.shape());
                    self.part(t, r.start * u, with_samples(t.shape(), r.len()))
                })
                .collect::<Result<Vec<_>>>()?;
            let y = f(&parts, r.len())?;
            match &out {
                Some(out) => self.copy_into(out, r.start * per_sample(shape), &y)?,
                None => {
                    sum = Some(match sum {
                        Some(s) => self.binary(BinaryOp::Add, &s, &y)?,
                        None => y,
                    })
                }
            }
        }
        Ok(Some(match out {
            Some(out) => out,
            None => self.reshape(&sum.expect("two ranges or more"), shape)?,
        }))
    }
}
