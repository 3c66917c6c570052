//! The guard between a method's first stage and its main stage (issue 23): the main stage takes
//! labels or weights from the first stage's network (MLB-Seg's initial labels, online-pl's
//! teacher, the local contrastive method's first pseudo-labels), which is useless if that network
//! predicts no foreground. A first stage that ends so stops the run with a message saying so,
//! before the main stage starts.

use super::{predict_with, restore_trainer, Result, RunData, RunError, RunPaths};
use crate::nn::NetBackend;
use crate::train::methods::FirstStage;

/// The least foreground a first stage's network must predict on its labeled cases, as a fraction
/// of the foreground of their labels. Below it the network predicts (almost) only background:
/// issue 23's stage 0 marked 0.02 % of the voxels where the labels mark 28 %.
pub const LEAST_FOREGROUND: f64 = 0.01;

/// Voxels a network predicts as foreground, and voxels its labels mark, over some cases.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Foreground {
    pub predicted: usize,
    pub labeled: usize,
    pub voxels: usize,
}

impl Foreground {
    /// Whether the prediction has foreground enough to hand on (see [`LEAST_FOREGROUND`]).
    pub fn enough(&self) -> bool {
        self.predicted > 0 && self.predicted as f64 >= LEAST_FOREGROUND * self.labeled as f64
    }

    fn percent(count: usize, voxels: usize) -> f64 {
        100.0 * count as f64 / voxels.max(1) as f64
    }
}

/// Checks the networks `first` left under `run` on the run's labeled cases (see the top): the one
/// it is evaluated by and, where that is another (online-pl's momentum copy), its student, since a
/// main stage may take either (online-pl's `teacher_start`, `student_init`). A first stage whose
/// network is not validated (IDEAL's pre-training trains an encoder and no decoder) hands on no
/// prediction and passes.
pub fn check<B: NetBackend>(
    backend: &B,
    first: &FirstStage,
    data: &RunData,
    run: &RunPaths,
) -> Result<()> {
    let channels = data.labeled[0].image.channels;
    let trainer = restore_trainer(
        backend,
        &first.config,
        first.stage,
        channels,
        &first.paths(run),
    )?;
    if !trainer.method.validates() {
        return Ok(());
    }
    let evaluated = trainer.evaluated();
    let student = &trainer.student.weights;
    let mut networks = vec![(evaluated, first.title.to_string())];
    if !std::ptr::eq(evaluated, student) {
        networks.push((student, format!("{} (its student)", first.title)));
    }
    for (weights, stage) in networks {
        let mut seen = Foreground::default();
        for case in &data.labeled {
            let predicted = predict_with(backend, &trainer, weights, case)?;
            let label = case.label.as_ref().expect("labeled cases are labeled");
            seen.predicted += predicted.iter().filter(|&&v| v > 0).count();
            seen.labeled += label.iter().filter(|&&v| v > 0).count();
            seen.voxels += predicted.len();
        }
        if !seen.enough() {
            return Err(RunError::NoForeground {
                stage,
                iterations: first.config.iterations,
                cases: data.labeled.len(),
                predicted: Foreground::percent(seen.predicted, seen.voxels),
                labeled: Foreground::percent(seen.labeled, seen.voxels),
                key: first.iterations_key,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prediction_without_foreground_or_with_too_little_is_not_enough() {
        let seen = |predicted, labeled| Foreground {
            predicted,
            labeled,
            voxels: 10_000,
        };
        assert!(!seen(0, 0).enough());
        assert!(!seen(0, 280).enough());
        // Issue 23's stage 0: 0.02 % of the voxels against 28 %.
        assert!(!seen(2, 2800).enough());
        assert!(seen(28, 2800).enough());
        assert!(seen(1, 0).enough());
    }
}
