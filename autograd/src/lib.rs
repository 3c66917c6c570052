//! The mathematics of metaseg, independent of any GPU: the [`Backend`] trait of primitive operations,
//! the [`Cpu64`] reference backend, [`Var`] with reverse-mode differentiation at any order, and the
//! tools to check kernels and gradients ([`Tolerance`], [`check::assert_gradients`]).

pub mod backend;
pub mod check;
pub mod contrastive;
pub mod conv;
pub mod cpu64;
pub mod distance;
mod error;
pub mod layers;
pub mod losses;
pub mod meta;
pub mod norm;
mod ops;
pub mod random;
mod shape;
mod var;
pub mod warp;
mod warp_samples;

pub use backend::{Backend, BinaryOp, Distribution, MatmulDims, MatmulSpec, TensorShape, UnaryOp};
pub use check::Tolerance;
pub use contrastive::ContrastiveBackend;
pub use conv::{Conv3dGeometry, ConvBackend, ConvSpec};
pub use cpu64::{Cpu64, CpuTensor};
pub use distance::DistanceBackend;
pub use error::{Error, Result};
pub use layers::{FusedBatchNorm, LayerBackend, Upsample, Window3d};
pub use losses::{DiceOptions, LossBackend, Reduction};
pub use meta::{MetaBackend, Normalization};
pub use norm::{BatchStatistic, BatchStats, RunningStats, Statistic};
pub use shape::{normalize_axes, Shape};
pub use var::{
    grad, jvp, no_grad, second_order, sum_tangents, with_recording, GradFn, JvpFn, Rule,
    TensorGradFn, Var,
};
pub use warp::{Interp, Warp, WarpBackend};
