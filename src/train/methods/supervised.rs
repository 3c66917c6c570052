//! The baselines' supervised step (METHODS.md, Baselines): 0.5 (CE + Dice) of the student's logits
//! on the labeled patches, one descent step. `supervised` trains on the labeled cases only (the
//! floor of the tables), `full` on every training case with its label (the ceiling); neither sees
//! an unlabeled patch, not even through batch-norm statistics.

use super::{MethodKind, Setup, Stage, Streams, Training};
use crate::nn::{NetBackend, Outputs};
use crate::train::network::Learner;
use crate::train::trainer::{
    slice_batch, step_log, supervised_loss, Context, DeviceBatch, StepLog,
};
use metaseg_autograd::{Result, Var};

/// `supervised` (`full: false`) and `full`.
pub struct Kind {
    pub full: bool,
}

impl MethodKind for Kind {
    fn streams(&self, _: Stage) -> Streams {
        Streams::default()
    }

    fn labels_every_case(&self) -> bool {
        self.full
    }

    fn build<B: NetBackend>(&self, _: &Setup<'_, B>) -> Result<Box<dyn Training<B>>> {
        Ok(Box::new(Supervised))
    }
}

/// The supervised method keeps nothing beside the student.
pub struct Supervised;

/// The student's training pass over the batch, and the CE and Dice of its labeled patches.
pub fn forward<B: NetBackend>(
    cx: &Context<'_>,
    student: &Learner<B>,
    batch: &DeviceBatch<B>,
    t: u64,
) -> Result<(Outputs<B>, Var<B>, Var<B>)> {
    let out = student.weights.run(cx.net, &batch.x, cx.train_mode(t))?;
    let labeled = slice_batch(&out.logits, 0, batch.labeled)?;
    let (ce, dice) = supervised_loss(&labeled, &batch.y)?;
    Ok((out, ce, dice))
}

impl<B: NetBackend> Training<B> for Supervised {
    fn step(
        &mut self,
        cx: &Context<'_>,
        student: &mut Learner<B>,
        batch: &DeviceBatch<B>,
        t: u64,
    ) -> Result<StepLog> {
        let (out, ce, dice) = forward(cx, student, batch, t)?;
        let total = ce.add(&dice)?.scale(0.5)?;
        let lr = cx.lr(t);
        student.descend(&total, &out.batch_stats, cx.config.optimizer.clip, lr)?;
        step_log(&[("loss", total), ("ce", ce), ("dice", dice)], lr)
    }
}
