//! The guard after every step: the loss, the global norm of the gradients of every update the
//! step made (the student's and a second learner's, like DTML's net B) and every network's
//! weights (the student's, a teacher's, a momentum copy's) must be finite. The norms are computed
//! on the device as the updates are made ([`Learner::update`]) and each network's weights are
//! reduced there to one sum (finite exactly when every element is, unless the sum overflows):
//! one small readback per step. Only when a sum is not finite are that network's tensors read
//! to name the tensor and element (an overflow with every element finite passes).

use super::{kept_checkpoint, Result, RunError};
use crate::nn::NetBackend;
use crate::train::checkpoint::{first_non_finite, Parts};
use crate::train::network::{Guarded, Learner, Weights};
use crate::train::trainer::{StepLog, Trainer};
use std::path::Path;

/// What one scalar of the readback measures.
enum Probe {
    /// The squared gradient norm of a network's update `index` (from 0) of `count`.
    GradNorm {
        network: &'static str,
        index: usize,
        count: usize,
    },
    /// The sum of a network's parameters and running statistics.
    Weights { network: &'static str },
}

/// Checks iteration `t` (from 0) just finished: its loss (`terms[0]`), its updates' gradient
/// norms and every network's weights. A failure names the iteration, what became non-finite and
/// the checkpoint at `checkpoint` that is kept (the last good one: nothing of this iteration has
/// been written).
pub fn check<B: NetBackend>(
    trainer: &mut Trainer<B>,
    t: u64,
    terms: &StepLog,
    checkpoint: &Path,
) -> Result<()> {
    let stop = |quantity: String, value: f64| RunError::NonFinite {
        step: t + 1,
        quantity,
        value,
        kept: kept_checkpoint(checkpoint),
    };
    let loss = terms[0].1;
    if !loss.is_finite() {
        return Err(stop("loss".into(), loss));
    }
    let backend = trainer.student.weights.params.values()[0].backend().clone();
    let mut probes = Vec::new();
    let mut scalars = Vec::new();
    probe_learner(
        &backend,
        "",
        &mut trainer.student,
        &mut probes,
        &mut scalars,
    )?;
    for (name, network) in trainer.method.networks() {
        match network {
            Guarded::Learner(l) => probe_learner(&backend, name, l, &mut probes, &mut scalars)?,
            Guarded::Weights(w) => {
                scalars.push(weights_sum(&backend, w)?);
                probes.push(Probe::Weights { network: name });
            }
        }
    }
    let parts: Vec<&B::Tensor> = scalars.iter().collect();
    let values = backend.to_f64(&backend.concat_flat(&parts)?)?;
    for (probe, value) in probes.iter().zip(values) {
        if value.is_finite() {
            continue;
        }
        match *probe {
            Probe::GradNorm {
                network,
                index,
                count,
            } => {
                let which = if count > 1 {
                    format!(" {} of {count}", index + 1)
                } else {
                    String::new()
                };
                let quantity = format!("gradient norm of {}'s update{which}", owner(network));
                return Err(stop(quantity, value.sqrt()));
            }
            Probe::Weights { network } => {
                if let Some((quantity, value)) = non_finite_tensor(trainer, network)? {
                    return Err(stop(quantity, value));
                }
            }
        }
    }
    Ok(())
}

/// Takes a learner's gradient norms of this step (leaving none) and adds them and the sum of its
/// weights to the readback.
fn probe_learner<B: NetBackend>(
    backend: &B,
    name: &'static str,
    learner: &mut Learner<B>,
    probes: &mut Vec<Probe>,
    scalars: &mut Vec<B::Tensor>,
) -> Result<()> {
    let norms = std::mem::take(&mut learner.grad_norms);
    let count = norms.len();
    for (index, norm) in norms.into_iter().enumerate() {
        scalars.push(norm.value().clone());
        probes.push(Probe::GradNorm {
            network: name,
            index,
            count,
        });
    }
    scalars.push(weights_sum(backend, &learner.weights)?);
    probes.push(Probe::Weights { network: name });
    Ok(())
}

/// Every parameter and running statistic of `w` summed on the device.
fn weights_sum<B: NetBackend>(backend: &B, w: &Weights<B>) -> Result<B::Tensor> {
    let parts: Vec<&B::Tensor> = w
        .params
        .values()
        .iter()
        .chain(w.stats.values())
        .map(|v| v.value())
        .collect();
    Ok(backend.sum_axes(&backend.concat_flat(&parts)?, &[0])?)
}

/// The first non-finite tensor element of the network named `network` (the student: ""), read
/// back, as the error names it.
fn non_finite_tensor<B: NetBackend>(
    trainer: &mut Trainer<B>,
    network: &'static str,
) -> Result<Option<(String, f64)>> {
    let mut parts = Parts::default();
    if network.is_empty() {
        parts.put_weights("", &trainer.student.weights)?;
    }
    for (name, guarded) in trainer.method.networks() {
        if name == network {
            match guarded {
                Guarded::Learner(l) => parts.put_weights(name, &l.weights)?,
                Guarded::Weights(w) => parts.put_weights(name, w)?,
            }
        }
    }
    Ok(
        first_non_finite(&parts.tensors).map(|(tensor, index, value)| {
            (
                format!("tensor '{tensor}' (element {index}) of {}", owner(network)),
                value.into(),
            )
        }),
    )
}

/// The network's name in a message: the student's is empty.
fn owner(network: &str) -> String {
    if network.is_empty() {
        "the student".into()
    } else {
        format!("the {network} network")
    }
}
