//! The building blocks of V-Net and U-Net: a layer holds the indices of its tensors in the
//! network's stores (declared once, in order) and applies itself given the stores' values, so the
//! same network runs with its own parameters, a teacher's, or a look-ahead step's.

use super::params::{Declarations, Init};
use super::NetBackend;
use metaseg_autograd::{BatchStats, ConvSpec, Result, RunningStats, Shape, Var};
use std::cell::RefCell;

/// PyTorch's defaults for BatchNorm3d.
pub const BN_EPS: f64 = 1e-5;
pub const BN_MOMENTUM: f64 = 0.1;
/// PyTorch's default slope of LeakyReLU.
pub const LEAKY_SLOPE: f64 = 0.01;

/// Training (batch statistics, dropout keyed by `seed` and `step`) or evaluation (running
/// statistics, no dropout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Train { seed: u64, step: u32 },
    Eval,
}

/// What one forward pass reads: the parameters and running statistics (in store order), the mode,
/// and where batch norms in training mode leave their batch statistics.
pub struct Forward<'a, B: NetBackend> {
    pub params: &'a [Var<B>],
    pub stats: &'a [Var<B>],
    pub mode: Mode,
    /// (index of the running mean in the stats store, the batch's statistics).
    pub batch_stats: RefCell<Vec<(usize, BatchStats<B>)>>,
}

impl<'a, B: NetBackend> Forward<'a, B> {
    pub fn new(params: &'a [Var<B>], stats: &'a [Var<B>], mode: Mode) -> Self {
        Forward {
            params,
            stats,
            mode,
            batch_stats: RefCell::new(Vec::new()),
        }
    }
}

/// A 3D convolution (or its transpose) with a bias.
#[derive(Clone, Debug)]
pub struct Conv {
    weight: usize,
    bias: usize,
    spec: ConvSpec,
    transposed: bool,
}

impl Conv {
    /// conv3d from `c_in` to `c_out` channels; Kaiming-normal weight, zero bias.
    pub fn new(
        d: &mut Declarations,
        name: &str,
        channels: [usize; 2],
        kernel: [usize; 3],
        spec: ConvSpec,
    ) -> Conv {
        Self::declare(d, name, channels, kernel, spec, false)
    }

    /// conv_transpose3d from `c_in` to `c_out` channels (weight [c_in, c_out, k], whose fan-in
    /// PyTorch counts as c_out * taps).
    pub fn transposed(
        d: &mut Declarations,
        name: &str,
        channels: [usize; 2],
        kernel: [usize; 3],
        spec: ConvSpec,
    ) -> Conv {
        Self::declare(d, name, channels, kernel, spec, true)
    }

    fn declare(
        d: &mut Declarations,
        name: &str,
        channels: [usize; 2],
        kernel: [usize; 3],
        spec: ConvSpec,
        transposed: bool,
    ) -> Conv {
        let [c_in, c_out] = channels;
        let taps: usize = kernel.iter().product();
        // PyTorch's fan-in is the weight's dimension 1 times the taps.
        let (rows, cols) = if transposed {
            (c_in, c_out)
        } else {
            (c_out, c_in)
        };
        let weight = d.declare(
            format!("{name}.weight"),
            Shape::from([rows, cols, kernel[0], kernel[1], kernel[2]]),
            Init::KaimingNormal {
                fan_in: cols * taps,
            },
        );
        let bias = d.declare(
            format!("{name}.bias"),
            Shape::from([c_out]),
            Init::Constant(0.0),
        );
        Conv {
            weight,
            bias,
            spec,
            transposed,
        }
    }

    pub fn apply<B: NetBackend>(&self, f: &Forward<B>, x: &Var<B>) -> Result<Var<B>> {
        let (w, b) = (&f.params[self.weight], &f.params[self.bias]);
        if self.transposed {
            x.conv_transpose3d(w, Some(b), self.spec, [0; 3])
        } else {
            x.conv3d(w, Some(b), self.spec)
        }
    }
}

/// Batch norm with a learnable affine and running statistics.
#[derive(Clone, Debug)]
pub struct BatchNorm {
    gamma: usize,
    beta: usize,
    /// Index of the running mean in the stats store; the variance follows it.
    running: usize,
}

impl BatchNorm {
    pub fn new(params: &mut Declarations, stats: &mut Declarations, name: &str, c: usize) -> Self {
        let shape = Shape::from([c]);
        let gamma = params.declare(format!("{name}.weight"), shape.clone(), Init::Constant(1.0));
        let beta = params.declare(format!("{name}.bias"), shape.clone(), Init::Constant(0.0));
        let running = stats.declare(
            format!("{name}.running_mean"),
            shape.clone(),
            Init::Constant(0.0),
        );
        stats.declare(format!("{name}.running_var"), shape, Init::Constant(1.0));
        BatchNorm {
            gamma,
            beta,
            running,
        }
    }

    pub fn apply<B: NetBackend>(&self, f: &Forward<B>, x: &Var<B>) -> Result<Var<B>> {
        self.apply_then(f, x, false)
    }

    /// relu(apply), in one pass over the tensor.
    pub fn apply_relu<B: NetBackend>(&self, f: &Forward<B>, x: &Var<B>) -> Result<Var<B>> {
        self.apply_then(f, x, true)
    }

    fn apply_then<B: NetBackend>(&self, f: &Forward<B>, x: &Var<B>, relu: bool) -> Result<Var<B>> {
        let (gamma, beta) = (&f.params[self.gamma], &f.params[self.beta]);
        match f.mode {
            Mode::Train { .. } => {
                let (y, stats) = if relu {
                    x.batch_norm3d_train_relu(gamma, beta, BN_EPS)?
                } else {
                    x.batch_norm3d_train(gamma, beta, BN_EPS)?
                };
                f.batch_stats.borrow_mut().push((self.running, stats));
                Ok(y)
            }
            Mode::Eval => {
                let running = RunningStats {
                    mean: f.stats[self.running].clone(),
                    var: f.stats[self.running + 1].clone(),
                };
                if relu {
                    x.batch_norm3d_eval_relu(gamma, beta, &running, BN_EPS)
                } else {
                    x.batch_norm3d_eval(gamma, beta, &running, BN_EPS)
                }
            }
        }
    }
}

/// The nonlinearity after a normalisation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    Relu,
    LeakyRelu,
}

impl Activation {
    pub fn apply<B: NetBackend>(self, x: &Var<B>) -> Result<Var<B>> {
        match self {
            Activation::Relu => x.relu(),
            Activation::LeakyRelu => x.leaky_relu(LEAKY_SLOPE),
        }
    }
}

/// conv - batch norm - activation, the unit both networks are made of.
#[derive(Clone, Debug)]
pub struct ConvNormAct {
    conv: Conv,
    norm: BatchNorm,
    act: Activation,
}

impl ConvNormAct {
    pub fn new(
        params: &mut Declarations,
        stats: &mut Declarations,
        name: &str,
        conv: impl FnOnce(&mut Declarations, &str) -> Conv,
        channels_out: usize,
        act: Activation,
    ) -> Self {
        let conv = conv(params, &format!("{name}.conv"));
        let norm = BatchNorm::new(params, stats, &format!("{name}.bn"), channels_out);
        ConvNormAct { conv, norm, act }
    }

    pub fn apply<B: NetBackend>(&self, f: &Forward<B>, x: &Var<B>) -> Result<Var<B>> {
        let y = self.conv.apply(f, x)?;
        match self.act {
            Activation::Relu => self.norm.apply_relu(f, &y),
            act => act.apply(&self.norm.apply(f, &y)?),
        }
    }
}

/// Channel dropout in training mode, keyed by the forward's seed and step and by `layer`, so two
/// dropout layers of one step draw different masks and a repeated forward draws the same ones.
pub fn dropout<B: NetBackend>(f: &Forward<B>, x: &Var<B>, p: f64, layer: u64) -> Result<Var<B>> {
    match f.mode {
        Mode::Train { seed, step } => x.dropout3d(p, seed ^ (layer << 56), step),
        Mode::Eval => Ok(x.clone()),
    }
}

/// Applies the batch statistics of a training forward to the running statistics (PyTorch's
/// momentum update), giving the new stats store values.
pub fn updated_stats<B: NetBackend>(
    stats: &[Var<B>],
    batch: &[(usize, BatchStats<B>)],
    momentum: f64,
) -> Result<Vec<Var<B>>> {
    let mut out = stats.to_vec();
    for (i, b) in batch {
        let running = RunningStats {
            mean: stats[*i].clone(),
            var: stats[*i + 1].clone(),
        }
        .update(b, momentum)?;
        out[*i] = running.mean;
        out[*i + 1] = running.var;
    }
    Ok(out)
}
