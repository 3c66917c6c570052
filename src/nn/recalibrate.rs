//! Batch-norm recalibration: running statistics re-estimated over given inputs, as the batch-norm
//! literature does after training ("precise BN"): forward passes in training mode, no update of
//! the parameters, and each batch norm's running mean and variance replaced by the mean and the
//! unbiased variance of its inputs over all the batches together.
//!
//! A training run's running statistics are a momentum average over the passes it made; a method
//! whose passes see inputs unlike the evaluated ones (MLB-Seg's zoomed and zero-padded views) may
//! leave statistics that fit neither. Recalibrating over unwarped images separates that from what
//! the parameters predict.

use super::layers::Mode;
use super::{NetBackend, Network, ParamStore};
use metaseg_autograd::{no_grad, Error, Result, Var};

/// Per batch norm (by the index of its running mean): the element count and the sums over
/// batches of count * mean and count * (biased variance + mean^2).
struct Moments<B: NetBackend> {
    index: usize,
    count: usize,
    sum: Var<B>,
    sum_sq: Var<B>,
}

/// The running statistics of `net` with `params` re-estimated over `batches` (each [N, C,
/// patch]): every batch through a training-mode forward (`mode`, which must be
/// [`Mode::Train`]: its dropout applies), then per batch norm the mean and the unbiased variance
/// of its inputs over every element of every batch (the batches' statistics pooled exactly; a
/// deeper layer's inputs are normalised with each batch's own statistics, as in training).
/// Statistics of a batch norm that no pass reached keep their value from `stats`.
pub fn recalibrated_stats<B: NetBackend, N: Network>(
    net: &N,
    params: &ParamStore<B>,
    stats: &ParamStore<B>,
    batches: &[Var<B>],
    mode: Mode,
) -> Result<ParamStore<B>> {
    let bad = |message: &str| Error::InvalidArgument {
        op: "recalibrated_stats",
        message: message.into(),
    };
    if mode == Mode::Eval {
        return Err(bad("the passes need training mode (batch statistics)"));
    }
    if batches.is_empty() {
        return Err(bad("no batches to estimate the statistics over"));
    }
    no_grad(|| {
        let mut moments: Vec<Moments<B>> = Vec::new();
        for x in batches {
            for (index, b) in net.run(params, stats, x, mode)?.batch_stats {
                let n = b.count as f64;
                let sum = b.mean.scale(n)?;
                let sum_sq = b.var.add(&b.mean.square()?)?.scale(n)?;
                match moments.iter_mut().find(|m| m.index == index) {
                    Some(m) => {
                        m.count += b.count;
                        m.sum = m.sum.add(&sum)?;
                        m.sum_sq = m.sum_sq.add(&sum_sq)?;
                    }
                    None => moments.push(Moments {
                        index,
                        count: b.count,
                        sum,
                        sum_sq,
                    }),
                }
            }
        }
        let mut values: Vec<_> = stats.values().iter().map(|v| v.value().clone()).collect();
        for m in moments {
            if m.count < 2 {
                return Err(bad("a batch norm needs at least 2 elements per channel"));
            }
            let n = m.count as f64;
            let mean = m.sum.scale(1.0 / n)?;
            let biased = m.sum_sq.scale(1.0 / n)?.sub(&mean.square()?)?.relu()?;
            let var = biased.scale(n / (n - 1.0))?;
            values[m.index] = mean.value().clone();
            values[m.index + 1] = var.value().clone();
        }
        stats.with_values(values)
    })
}
