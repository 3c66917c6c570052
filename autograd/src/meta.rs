//! The per-voxel weights of MLB-Seg's meta step (METHODS.md, step 5): from the meta-gradient g of
//! every cost (both label sources of every view together), one normalisation over all entries.
//! The weights scale the costs of the real update as constants, so they have no gradient.

use crate::backend::Backend;
use crate::var::{Rule, Var};
use crate::{Cpu64, CpuTensor, Result};
use std::sync::Arc;

/// Added to the total before dividing, as Ren et al. and MLB-Seg do, so all-zero weights stay 0.
pub const WEIGHT_EPS: f64 = 1e-10;

/// How meta-gradients become weights that sum to 1 over all entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Normalization {
    /// max(-g, 0) / (sum + 1e-10): the default of MLB-Seg and of Ren et al.
    Clip,
    /// exp(-g) / sum exp(-g), shifted by the maximum for stability.
    Softmax,
    /// sigmoid(-g) / (sum + 1e-10).
    Sigmoid,
    /// 1 where g < 0, else 0, / (count + 1e-10).
    Hard,
}

impl Normalization {
    pub fn parse(s: &str) -> Option<Normalization> {
        match s {
            "clip" => Some(Normalization::Clip),
            "softmax" => Some(Normalization::Softmax),
            "sigmoid" => Some(Normalization::Sigmoid),
            "hard" => Some(Normalization::Hard),
            _ => None,
        }
    }

    pub const NAMES: [&'static str; 4] = ["clip", "softmax", "sigmoid", "hard"];

    /// The unnormalised weight of one meta-gradient (softmax: relative to `shift`, the maximum
    /// of -g).
    pub fn raw(self, g: f64, shift: f64) -> f64 {
        match self {
            // NaN stays NaN (f64::max would drop it).
            Normalization::Clip if g.is_nan() => g,
            Normalization::Clip => (-g).max(0.0),
            Normalization::Softmax => (-g - shift).exp(),
            Normalization::Sigmoid => 1.0 / (1.0 + g.exp()),
            Normalization::Hard => f64::from(u8::from(g < 0.0)),
        }
    }

    /// What the total is increased by before dividing (none for softmax, whose total is >= 1).
    pub fn eps(self) -> f64 {
        match self {
            Normalization::Softmax => 0.0,
            _ => WEIGHT_EPS,
        }
    }
}

pub trait MetaBackend: Backend {
    /// The weights of meta-gradients `g` (any shape), normalised together: one fused reduction
    /// and one pass.
    fn meta_weights(&self, g: &Self::Tensor, normalization: Normalization) -> Result<Self::Tensor>;
}

impl<B: MetaBackend> Var<B> {
    /// The weights of these meta-gradients; they are constants of the real update, so asking for
    /// their gradient is an error.
    pub fn meta_weights(&self, normalization: Normalization) -> Result<Self> {
        let value = self.backend().meta_weights(self.value(), normalization)?;
        Ok(Var::from_op("meta_weights", value, &[self], Rule::None))
    }
}

impl MetaBackend for Cpu64 {
    fn meta_weights(&self, g: &CpuTensor, normalization: Normalization) -> Result<CpuTensor> {
        let shift = g.data.iter().fold(f64::NEG_INFINITY, |m, v| m.max(-v));
        let raw: Vec<f64> = g
            .data
            .iter()
            .map(|&v| normalization.raw(v, shift))
            .collect();
        let total = raw.iter().sum::<f64>() + normalization.eps();
        Ok(CpuTensor {
            data: Arc::new(raw.iter().map(|w| w / total).collect()),
            shape: g.shape.clone(),
        })
    }
}
