//! Mean teacher (METHODS.md, Baselines): the supervised loss plus consistency * ramp(t) * mean
//! (softmax(student) - softmax(teacher(x + noise)))^2 on the unlabeled patches. After the update
//! the teacher's parameters follow the student by EMA (min(1 - 1/(t+1), decay)); its batch-norm
//! statistics follow its own training-mode passes, as in the SSL4MIS code. MLB-Seg keeps such a
//! teacher too ([`teacher_logits`]).

use super::supervised;
use super::{MethodKind, Setup, Stage, Streams, Training};
use crate::nn::NetBackend;
use crate::optim::teacher_decay;
use crate::train::checkpoint::Parts;
use crate::train::network::{Guarded, Learner, Weights};
use crate::train::run;
use crate::train::trainer::{slice_batch, step_log, Context, DeviceBatch, StepLog};
use metaseg_autograd::{no_grad, Distribution, Result, Var};

pub struct Kind;

impl MethodKind for Kind {
    fn streams(&self, _: Stage) -> Streams {
        Streams {
            unlabeled: true,
            unlabeled_labels: false,
        }
    }

    fn build<B: NetBackend>(&self, setup: &Setup<'_, B>) -> Result<Box<dyn Training<B>>> {
        Ok(Box::new(MeanTeacher {
            teacher: setup.student.clone(),
        }))
    }
}

/// The teacher, which starts as a copy of the student.
pub struct MeanTeacher<B: NetBackend> {
    pub teacher: Weights<B>,
}

/// The teacher's logits on `x` plus its input noise clamp(0.1 N(0, 1), -0.2, 0.2), drawn from a
/// stream of its own per iteration and `salt`, in training mode, and the teacher with the running
/// statistics of that pass.
pub fn teacher_logits<B: NetBackend>(
    cx: &Context<'_>,
    teacher: &Weights<B>,
    x: &Var<B>,
    salt: u64,
    t: u64,
) -> Result<(Var<B>, Weights<B>)> {
    let stream = cx.config.seed ^ 0x7eac_4e00 ^ salt;
    let noise = Var::random(
        x.backend(),
        x.shape(),
        Distribution::Normal,
        stream,
        t << 32,
    )?
    .scale(0.1)?
    .clamp(-0.2, 0.2)?;
    no_grad(|| {
        let out = teacher.run(cx.net, &x.add(&noise)?, cx.mode(stream, t))?;
        let mut moved = teacher.clone();
        moved.keep_stats(&out.batch_stats)?;
        Ok((out.logits.detach(), moved))
    })
}

impl<B: NetBackend> Training<B> for MeanTeacher<B> {
    fn step(
        &mut self,
        cx: &Context<'_>,
        student: &mut Learner<B>,
        batch: &DeviceBatch<B>,
        t: u64,
    ) -> Result<StepLog> {
        let (out, ce, dice) = supervised::forward(cx, student, batch, t)?;
        let unlabeled = batch.x.shape().dims()[0] - batch.labeled;
        let x_u = slice_batch(&batch.x, batch.labeled, unlabeled)?;
        let (logits_t, teacher) = teacher_logits(cx, &self.teacher, &x_u, 0, t)?;
        let student_u = slice_batch(&out.logits, batch.labeled, unlabeled)?;
        let consistency = student_u.softmax_mse(&logits_t)?;
        let mt = &cx.config.mean_teacher;
        let total = ce
            .add(&dice)?
            .scale(0.5)?
            .add(&consistency.scale(mt.rampup().at(t))?)?;
        self.teacher = teacher;
        let lr = cx.lr(t);
        student.descend(&total, &out.batch_stats, cx.config.optimizer.clip, lr)?;
        self.teacher
            .follow_params(&student.weights, teacher_decay(t, mt.ema_decay))?;
        let terms = [
            ("loss", total),
            ("ce", ce),
            ("dice", dice),
            ("consistency", consistency),
        ];
        step_log(&terms, lr)
    }

    fn save(&self, parts: &mut Parts) -> run::Result<()> {
        parts.put_weights("teacher", &self.teacher)
    }

    fn networks(&mut self) -> Vec<(&'static str, Guarded<'_, B>)> {
        vec![("teacher", Guarded::Weights(&self.teacher))]
    }

    fn load(&mut self, backend: &B, parts: &Parts) -> run::Result<()> {
        self.teacher = parts.weights("teacher", &self.teacher, backend)?;
        Ok(())
    }
}
