//! Comparing values with a tolerance, and checking gradients against central finite differences in f64.

use crate::var::{grad, Var};
use crate::{Cpu64, Result, Shape};
use std::fmt;

/// `|x - reference| <= atol + rtol * |reference|`, elementwise.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    pub atol: f64,
    pub rtol: f64,
}

impl Tolerance {
    pub const fn new(atol: f64, rtol: f64) -> Self {
        Tolerance { atol, rtol }
    }
    /// Two f64 computations of the same thing in a different order.
    pub const F64: Tolerance = Tolerance::new(1e-12, 1e-9);
    /// An f32 kernel against the f64 reference, on values of order one.
    pub const F32: Tolerance = Tolerance::new(1e-5, 1e-4);
    /// An f32 kernel with long sums (reductions, matmul) against the f64 reference.
    pub const F32_ACCUMULATED: Tolerance = Tolerance::new(1e-4, 1e-4);
    /// Analytic gradients against central differences in f64 (eps ~ 1e-6, truncation ~ eps^2).
    pub const FINITE_DIFFERENCE: Tolerance = Tolerance::new(1e-7, 1e-5);

    /// Compares elementwise; on failure reports the worst element, both values and the count of misses.
    pub fn check(&self, actual: &[f64], reference: &[f64]) -> std::result::Result<(), Mismatch> {
        if actual.len() != reference.len() {
            return Err(Mismatch {
                len: (actual.len(), reference.len()),
                ..Mismatch::default()
            });
        }
        let mut failures = 0;
        // (index, error / allowed error); NaN counts as infinitely wrong so it can never pass.
        let mut worst = (0, -1.0_f64);
        for (i, (&x, &r)) in actual.iter().zip(reference).enumerate() {
            let allowed = self.atol + self.rtol * r.abs();
            let err = (x - r).abs();
            // Written so that NaN fails: every comparison with NaN is false.
            let ok = err <= allowed;
            let ratio = match (ok, allowed > 0.0) {
                (true, true) => err / allowed,
                (true, false) => 0.0,
                (false, _) if err.is_nan() => f64::INFINITY,
                (false, _) => (err / allowed).max(1.0),
            };
            if !ok {
                failures += 1;
            }
            if ratio > worst.1 {
                worst = (i, ratio);
            }
        }
        if failures == 0 {
            return Ok(());
        }
        let (i, _) = worst;
        Err(Mismatch {
            index: i,
            actual: actual[i],
            reference: reference[i],
            error: (actual[i] - reference[i]).abs(),
            failures,
            len: (actual.len(), reference.len()),
        })
    }

    /// Like `check`, but panics with a message naming what was compared.
    #[track_caller]
    pub fn assert(&self, what: &str, actual: &[f64], reference: &[f64]) {
        if let Err(m) = self.check(actual, reference) {
            panic!("{what}: {m} (tolerance {self:?})");
        }
    }
}

/// Where a comparison failed worst.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Mismatch {
    pub index: usize,
    pub actual: f64,
    pub reference: f64,
    pub error: f64,
    pub failures: usize,
    pub len: (usize, usize),
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.len.0 != self.len.1 {
            return write!(
                f,
                "lengths differ: {} vs reference {}",
                self.len.0, self.len.1
            );
        }
        write!(
            f,
            "{} of {} elements out of tolerance; worst at index {}: {} vs reference {} (error {:.3e})",
            self.failures, self.len.1, self.index, self.actual, self.reference, self.error
        )
    }
}

/// `n` values uniform in [lo, hi) from the project's counter-based generator: the seeded inputs
/// of the tests, the same on every machine.
pub fn seeded(n: usize, seed: u64, lo: f64, hi: f64) -> Vec<f64> {
    (0..n as u64)
        .map(|i| lo + (hi - lo) * crate::random::uniform(seed, i))
        .collect()
}

/// One-hot targets over axis 1 of `shape` ([N, C, ...]), each voxel's class drawn from the seeded
/// generator; class `empty`, if given, never occurs.
pub fn one_hot(shape: &Shape, seed: u64, empty: Option<usize>) -> Vec<f64> {
    let (n, c) = (shape.dims()[0], shape.dims()[1]);
    let s = shape.numel() / (n * c);
    let classes: Vec<usize> = (0..c).filter(|&k| Some(k) != empty).collect();
    let mut y = vec![0.0; shape.numel()];
    for b in 0..n {
        for v in 0..s {
            let u = crate::random::uniform(seed, (b * s + v) as u64);
            let k = classes[((u * classes.len() as f64) as usize).min(classes.len() - 1)];
            y[(b * c + k) * s + v] = 1.0;
        }
    }
    y
}

/// A function of several Cpu64 variables, as the gradient checks take it.
pub type CpuFn<'a> = dyn Fn(&[Var<Cpu64>]) -> Result<Var<Cpu64>> + 'a;

fn vars(inputs: &[(Vec<f64>, Shape)], requires_grad: bool) -> Result<Vec<Var<Cpu64>>> {
    inputs
        .iter()
        .map(|(v, s)| Var::from_f64(&Cpu64, v, s, requires_grad))
        .collect()
}

/// L(x) = sum(weights * f(x)): a scalar whose gradient exercises every output element.
fn weighted_sum(f: &CpuFn, xs: &[Var<Cpu64>], weights: &[f64]) -> Result<Var<Cpu64>> {
    let y = f(xs)?;
    let w = Var::from_f64(&Cpu64, weights, y.shape(), false)?;
    y.mul(&w)?.sum()
}

/// Central differences of `L(x) = sum(weights * f(x))` with respect to every input element.
pub fn numeric_gradient(
    f: &CpuFn,
    inputs: &[(Vec<f64>, Shape)],
    weights: &[f64],
    eps: f64,
) -> Result<Vec<Vec<f64>>> {
    let eval = |inputs: &[(Vec<f64>, Shape)]| -> Result<f64> {
        weighted_sum(f, &vars(inputs, false)?, weights)?.item()
    };
    let mut grads = Vec::new();
    for (k, (values, _)) in inputs.iter().enumerate() {
        let mut gk = Vec::with_capacity(values.len());
        for i in 0..values.len() {
            let mut plus = inputs.to_vec();
            plus[k].0[i] += eps;
            let mut minus = inputs.to_vec();
            minus[k].0[i] -= eps;
            gk.push((eval(&plus)? - eval(&minus)?) / (2.0 * eps));
        }
        grads.push(gk);
    }
    Ok(grads)
}

/// The reverse-mode gradient of `L(x) = sum(weights * f(x))` with respect to every input.
pub fn analytic_gradient(
    f: &CpuFn,
    inputs: &[(Vec<f64>, Shape)],
    weights: &[f64],
) -> Result<Vec<Vec<f64>>> {
    let xs = vars(inputs, true)?;
    let loss = weighted_sum(f, &xs, weights)?;
    let refs: Vec<&Var<Cpu64>> = xs.iter().collect();
    grad(&loss, &refs, None, false)?
        .iter()
        .map(|g| g.to_f64())
        .collect()
}

/// The Hessian-vector product H v of L(x) = sum(weights * f(x)), by differentiating
/// <grad L(x), v> again (reverse over reverse, with create_graph).
pub fn hessian_vector_product(
    f: &CpuFn,
    inputs: &[(Vec<f64>, Shape)],
    weights: &[f64],
    direction: &[Vec<f64>],
) -> Result<Vec<Vec<f64>>> {
    let xs = vars(inputs, true)?;
    let loss = weighted_sum(f, &xs, weights)?;
    let refs: Vec<&Var<Cpu64>> = xs.iter().collect();
    let grads = grad(&loss, &refs, None, true)?;
    let mut dot: Option<Var<Cpu64>> = None;
    for (g, v) in grads.iter().zip(direction) {
        let v = Var::from_f64(&Cpu64, v, g.shape(), false)?;
        let term = g.mul(&v)?.sum()?;
        dot = Some(match dot {
            Some(d) => d.add(&term)?,
            None => term,
        });
    }
    let dot = dot.expect("at least one input");
    grad(&dot, &refs, None, false)?
        .iter()
        .map(|g| g.to_f64())
        .collect()
}

/// Checks forward mode ([`crate::jvp`]) of `f` at `inputs` along `direction` against central
/// differences of f itself, element by element, and against reverse mode through the adjoint
/// identity <w, J v> = <J^T w, v> for seeded w. Panics with the worst element on failure.
#[track_caller]
pub fn assert_jvp(
    what: &str,
    f: &CpuFn,
    inputs: &[(Vec<f64>, Shape)],
    direction: &[Vec<f64>],
    tol: Tolerance,
) {
    let eps = 1e-6;
    let xs = vars(inputs, false).expect("inputs");
    let dirs: Vec<Var<Cpu64>> = direction
        .iter()
        .zip(inputs)
        .map(|(v, (_, s))| Var::from_f64(&Cpu64, v, s, false).expect("direction"))
        .collect();
    let (y, jv) = crate::jvp(f, &xs, &dirs).expect("forward mode");
    let jv = jv.to_f64().expect("tangent");
    let at = |sign: f64| -> Vec<f64> {
        let moved: Vec<(Vec<f64>, Shape)> = inputs
            .iter()
            .zip(direction)
            .map(|((x, s), v)| {
                let x = x.iter().zip(v).map(|(x, v)| x + sign * eps * v).collect();
                (x, s.clone())
            })
            .collect();
        f(&vars(&moved, false).expect("inputs"))
            .and_then(|y| y.to_f64())
            .expect("forward at a shifted point")
    };
    let (plus, minus) = (at(1.0), at(-1.0));
    let fd: Vec<f64> = plus
        .iter()
        .zip(&minus)
        .map(|(p, m)| (p - m) / (2.0 * eps))
        .collect();
    tol.assert(&format!("{what}: J v"), &jv, &fd);

    let w = seeded(y.shape().numel(), 91, -1.0, 1.0);
    let reverse = analytic_gradient(f, inputs, &w).expect("reverse mode");
    let forward: f64 = jv.iter().zip(&w).map(|(a, b)| a * b).sum();
    let adjoint: f64 = reverse
        .iter()
        .zip(direction)
        .flat_map(|(g, v)| g.iter().zip(v).map(|(a, b)| a * b))
        .sum();
    Tolerance::F64.assert(
        &format!("{what}: <w, J v> = <J^T w, v>"),
        &[forward],
        &[adjoint],
    );
}

/// Checks reverse mode against central differences (first order) and the Hessian-vector product
/// against central differences of the analytic gradient along `direction` (second order).
/// Panics with the worst element on failure.
#[track_caller]
pub fn assert_gradients(
    what: &str,
    f: &CpuFn,
    inputs: &[(Vec<f64>, Shape)],
    weights: &[f64],
    direction: &[Vec<f64>],
    tol: Tolerance,
) {
    let eps = 1e-6;
    let analytic = analytic_gradient(f, inputs, weights).expect("analytic gradient");
    let numeric = numeric_gradient(f, inputs, weights, eps).expect("numeric gradient");
    for (k, (a, n)) in analytic.iter().zip(&numeric).enumerate() {
        tol.assert(&format!("{what}: d/d input {k}"), a, n);
    }

    let hvp =
        hessian_vector_product(f, inputs, weights, direction).expect("Hessian-vector product");
    let shifted = |sign: f64| {
        let moved: Vec<(Vec<f64>, Shape)> = inputs
            .iter()
            .zip(direction)
            .map(|((x, s), v)| {
                (
                    x.iter().zip(v).map(|(x, v)| x + sign * eps * v).collect(),
                    s.clone(),
                )
            })
            .collect();
        analytic_gradient(f, &moved, weights).expect("gradient at a shifted point")
    };
    let (plus, minus) = (shifted(1.0), shifted(-1.0));
    for k in 0..inputs.len() {
        let fd: Vec<f64> = plus[k]
            .iter()
            .zip(&minus[k])
            .map(|(p, m)| (p - m) / (2.0 * eps))
            .collect();
        tol.assert(&format!("{what}: (H v) for input {k}"), &hvp[k], &fd);
    }
}

/// A mask of `shape`: 1 where the seeded uniform is below `density`, else 0.
pub fn seeded_mask(shape: &Shape, seed: u64, density: f64) -> Vec<f64> {
    seeded(shape.numel(), seed, 0.0, 1.0)
        .into_iter()
        .map(|u| f64::from(u8::from(u < density)))
        .collect()
}

/// The EDT of one (D, H, W) volume over all voxel pairs, the definition the fast transforms are
/// tested against: for each voxel whose mask is nonzero (zero, with `invert`), the least
/// Euclidean distance in physical units to a voxel that is not; 0 on those, +infinity if there
/// are none.
pub fn edt_brute_force(
    mask: &[f64],
    dims: [usize; 3],
    spacing: [f64; 3],
    invert: bool,
) -> Vec<f64> {
    let [_, h, w] = dims;
    let at = |i: usize| [i / (h * w), i / w % h, i % w];
    let inside = |i: usize| (mask[i] != 0.0) != invert;
    (0..mask.len())
        .map(|i| {
            if !inside(i) {
                return 0.0;
            }
            let a = at(i);
            (0..mask.len())
                .filter(|&j| !inside(j))
                .map(|j| {
                    let b = at(j);
                    (0..3)
                        .map(|k| (spacing[k] * (a[k] as f64 - b[k] as f64)).powi(2))
                        .sum::<f64>()
                        .sqrt()
                })
                .fold(f64::INFINITY, f64::min)
        })
        .collect()
}
