//! Shapes of contiguous row-major tensors (NCDHW for images) and numpy-style broadcasting.

use crate::{Error, Result};
use std::fmt;

/// The dimensions of a contiguous tensor, outermost first. Rank 0 is a scalar.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Shape(pub Vec<usize>);

impl Shape {
    pub fn new(dims: &[usize]) -> Self {
        Shape(dims.to_vec())
    }

    pub fn scalar() -> Self {
        Shape(Vec::new())
    }

    pub fn dims(&self) -> &[usize] {
        &self.0
    }

    pub fn rank(&self) -> usize {
        self.0.len()
    }

    pub fn numel(&self) -> usize {
        self.0.iter().product()
    }

    /// The shape `dims` of an op's result, if its element count can be addressed: the count and
    /// its f64 bytes must fit an isize (what any allocation needs). Sizes computed from settings
    /// (a padding, a scale, a broadcast) go through here, so an absurd one is an error naming the
    /// op rather than an overflow or an aborted allocation.
    pub fn checked(op: &'static str, dims: &[usize]) -> Result<Shape> {
        let count = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        match count {
            Some(n) if n <= isize::MAX as usize / 8 => Ok(Shape(dims.to_vec())),
            _ => Err(Error::InvalidArgument {
                op,
                message: format!(
                    "a result of shape {dims:?} has more elements than memory can address"
                ),
            }),
        }
    }

    /// Row-major strides, in elements.
    pub fn strides(&self) -> Vec<usize> {
        let mut strides = vec![1; self.rank()];
        for i in (0..self.rank().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * self.0[i + 1];
        }
        strides
    }

    /// The numpy broadcast of two shapes (aligned at the innermost dimension).
    pub fn broadcast(op: &'static str, a: &Shape, b: &Shape) -> Result<Shape> {
        let rank = a.rank().max(b.rank());
        let mut out = vec![0; rank];
        for (i, o) in out.iter_mut().enumerate() {
            let da = a.dim_from_right(rank - 1 - i);
            let db = b.dim_from_right(rank - 1 - i);
            *o = match (da, db) {
                (x, y) if x == y => x,
                (1, y) => y,
                (x, 1) => x,
                _ => {
                    return Err(Error::Shape {
                        op,
                        lhs: a.clone(),
                        rhs: b.clone(),
                        reason: "the shapes do not broadcast".into(),
                    })
                }
            };
        }
        Shape::checked(op, &out)
    }

    /// Strides that read `self` as if broadcast to `out`: 0 along broadcast dimensions.
    pub fn broadcast_strides(&self, out: &Shape) -> Vec<usize> {
        let own = self.strides();
        let offset = out.rank() - self.rank();
        (0..out.rank())
            .map(|i| {
                if i < offset || self.0[i - offset] == 1 {
                    0
                } else {
                    own[i - offset]
                }
            })
            .collect()
    }

    /// The axes of `out` along which `self` was broadcast (the axes a gradient must be summed over).
    pub fn broadcast_axes(&self, out: &Shape) -> Vec<usize> {
        let offset = out.rank() - self.rank();
        (0..out.rank())
            .filter(|&i| i < offset || (self.0[i - offset] == 1 && out.0[i] != 1))
            .collect()
    }

    /// This shape with the given axes set to 1 (the keep-dims result of a reduction).
    pub fn reduced(&self, axes: &[usize]) -> Shape {
        let mut dims = self.0.clone();
        for &a in axes {
            dims[a] = 1;
        }
        Shape(dims)
    }

    fn dim_from_right(&self, i: usize) -> usize {
        if i < self.rank() {
            self.0[self.rank() - 1 - i]
        } else {
            1
        }
    }
}

impl From<&[usize]> for Shape {
    fn from(d: &[usize]) -> Self {
        Shape(d.to_vec())
    }
}

impl<const N: usize> From<[usize; N]> for Shape {
    fn from(d: [usize; N]) -> Self {
        Shape(d.to_vec())
    }
}

impl fmt::Debug for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// Checks the axes of a reduction and returns them sorted and deduplicated.
pub fn normalize_axes(op: &'static str, shape: &Shape, axes: &[usize]) -> Result<Vec<usize>> {
    let mut sorted = axes.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    if let Some(&bad) = sorted.iter().find(|&&a| a >= shape.rank()) {
        return Err(Error::InvalidArgument {
            op,
            message: format!("axis {bad} is out of range for shape {shape}"),
        });
    }
    Ok(sorted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_per_channel_and_scalar() {
        let x = Shape::from([2, 3, 4, 5, 6]);
        let c = Shape::from([1, 3, 1, 1, 1]);
        assert_eq!(Shape::broadcast("t", &x, &c).unwrap(), x);
        assert_eq!(c.broadcast_strides(&x), vec![0, 1, 0, 0, 0]);
        assert_eq!(c.broadcast_axes(&x), vec![0, 2, 3, 4]);
        let s = Shape::scalar();
        assert_eq!(Shape::broadcast("t", &s, &x).unwrap(), x);
        assert_eq!(s.broadcast_axes(&x), vec![0, 1, 2, 3, 4]);
        assert!(Shape::broadcast("t", &Shape::from([3]), &Shape::from([4])).is_err());
    }

    #[test]
    fn strides_are_row_major() {
        assert_eq!(Shape::from([2, 3, 4]).strides(), vec![12, 4, 1]);
        assert_eq!(Shape::scalar().numel(), 1);
    }
}
