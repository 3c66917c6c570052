//! The parameter store: every tensor of a network, named, in the one fixed order in which it was
//! declared. Optimisers, the mean teacher and checkpoints all walk this order, so a tensor's index
//! is its identity everywhere.
//!
//! A network keeps two stores: its trained parameters (conv weights and biases, norm affines) and
//! its carried statistics (batch-norm running means and variances), which are saved and restored
//! but never differentiated.

use metaseg_autograd::{Backend, Distribution, LossBackend, Result, Shape, Var};

/// How a tensor starts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Kaiming (He) normal for a ReLU network: N(0, 2 / fan_in), PyTorch's `kaiming_normal_`
    /// with its defaults (fan-in mode, gain sqrt(2)).
    KaimingNormal {
        fan_in: usize,
    },
    Constant(f64),
}

/// One declared tensor: its name (dotted, like `encoder.2.conv1.weight`), shape and start.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Shape,
    pub init: Init,
}

/// Declares tensors in order; each declaration returns the index it will have in the store.
#[derive(Clone, Debug, Default)]
pub struct Declarations {
    specs: Vec<ParamSpec>,
}

impl Declarations {
    pub fn declare(&mut self, name: String, shape: Shape, init: Init) -> usize {
        self.specs.push(ParamSpec { name, shape, init });
        self.specs.len() - 1
    }

    pub fn specs(&self) -> &[ParamSpec] {
        &self.specs
    }
}

/// The values of declared tensors, in declaration order.
#[derive(Clone)]
pub struct ParamStore<B: Backend> {
    backend: B,
    specs: Vec<ParamSpec>,
    values: Vec<Var<B>>,
}

/// Each tensor's random numbers start at its own counter, far from the next tensor's.
const COUNTER_STRIDE: u64 = 1 << 40;

impl<B: Backend> ParamStore<B> {
    /// Every declared tensor at its initial value, the random ones drawn from `seed` (tensor i
    /// from counters starting at i * 2^40, so adding a tensor does not change the others).
    pub fn init(backend: &B, declared: &Declarations, seed: u64) -> Result<Self> {
        let values = declared
            .specs()
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let value = match spec.init {
                    Init::Constant(c) => Var::full(backend, &spec.shape, c)?,
                    Init::KaimingNormal { fan_in } => Var::random(
                        backend,
                        &spec.shape,
                        Distribution::Normal,
                        seed,
                        i as u64 * COUNTER_STRIDE,
                    )?
                    .scale((2.0 / fan_in.max(1) as f64).sqrt())?,
                };
                Ok(Var::parameter(backend, value.value().clone()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ParamStore {
            backend: backend.clone(),
            specs: declared.specs().to_vec(),
            values,
        })
    }

    /// A store with the same declarations holding `values` (as leaves that take gradients).
    pub fn with_values(&self, values: Vec<B::Tensor>) -> Result<Self> {
        let backend = &self.backend;
        if values.len() != self.specs.len() {
            return Err(metaseg_autograd::Error::InvalidArgument {
                op: "ParamStore::with_values",
                message: format!("{} values for {} tensors", values.len(), self.specs.len()),
            });
        }
        Ok(ParamStore {
            backend: backend.clone(),
            specs: self.specs.clone(),
            values: values
                .into_iter()
                .map(|v| Var::parameter(backend, v))
                .collect(),
        })
    }

    pub fn specs(&self) -> &[ParamSpec] {
        &self.specs
    }

    /// This store with every tensor that `other` also declares (same name and shape) taken from
    /// `other`: how a network with an extra head starts from one trained without it.
    pub fn with_matching(&self, other: &ParamStore<B>) -> Result<Self> {
        let values = self
            .specs
            .iter()
            .zip(&self.values)
            .map(|(spec, own)| {
                let found = other
                    .specs
                    .iter()
                    .position(|o| o.name == spec.name && o.shape == spec.shape);
                found.map_or(own, |i| &other.values[i]).value().clone()
            })
            .collect();
        self.with_values(values)
    }

    /// The tensors as differentiable leaves, in order.
    pub fn values(&self) -> &[Var<B>] {
        &self.values
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Elements over all tensors.
    pub fn numel(&self) -> usize {
        self.specs.iter().map(|s| s.shape.numel()).sum()
    }

    /// Every tensor one after another in one [numel] tensor.
    pub fn flat(&self) -> Result<B::Tensor> {
        let parts: Vec<&B::Tensor> = self.values.iter().map(Var::value).collect();
        self.backend.concat_flat(&parts)
    }

    /// A store with the same declarations whose tensors are the pieces of `flat`.
    pub fn from_flat(&self, flat: &B::Tensor) -> Result<Self> {
        let shapes: Vec<Shape> = self.specs.iter().map(|s| s.shape.clone()).collect();
        self.with_values(self.backend.split_flat(flat, &shapes)?)
    }

    /// The same tensors on another backend (through the host).
    pub fn transfer<C: Backend>(&self, to: &C) -> Result<ParamStore<C>> {
        let values = self
            .values
            .iter()
            .map(|v| Ok(Var::parameter(to, to.tensor(&v.to_f64()?, v.shape())?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(ParamStore {
            backend: to.clone(),
            specs: self.specs.clone(),
            values,
        })
    }
}

impl<B: LossBackend> ParamStore<B> {
    /// The mean-teacher update `decay * self + (1 - decay) * student`, one fused dispatch over
    /// the whole store (the stores must come from the same declarations).
    pub fn ema(&self, student: &ParamStore<B>, decay: f64) -> Result<Self> {
        if self.specs != student.specs {
            return Err(metaseg_autograd::Error::InvalidArgument {
                op: "ema",
                message: "teacher and student were declared differently".into(),
            });
        }
        let mixed = self.backend.ema(&self.flat()?, &student.flat()?, decay)?;
        self.from_flat(&mixed)
    }
}

impl<B: Backend> std::fmt::Debug for ParamStore<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParamStore")
            .field("tensors", &self.specs.len())
            .field("elements", &self.numel())
            .finish()
    }
}
