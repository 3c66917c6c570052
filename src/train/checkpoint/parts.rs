//! What a trainer keeps in a checkpoint: the student as `params/`, `stats/` and `optimizer/`
//! (with the counter `optimizer_steps`), then whatever its method adds under a name of its own
//! (`teacher/`, `momentum/`, `dtml/`), all through [`Parts`]; and the configuration with its stage
//! in the sidecar, which a resumed run must match.

use super::{HostTensor, Sidecar, FORMAT};
use crate::nn::{NetBackend, ParamStore};
use crate::train::config::TrainConfig;
use crate::train::methods::{Method, Stage};
use crate::train::network::{Learner, Weights};
use crate::train::run::{self, RunError};
use crate::train::trainer::Trainer;
use metaseg_autograd::{Shape, Var};
use std::collections::BTreeMap;
use std::path::Path;

/// A checkpoint's tensors and counters by name, in host memory.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Parts {
    pub tensors: BTreeMap<String, HostTensor>,
    pub counters: BTreeMap<String, u64>,
}

/// `prefix/name`, or `name` for the student's empty prefix.
fn key(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}/{name}")
    }
}

impl Parts {
    /// Every tensor of `store` as `name/TENSOR`.
    pub fn put_store(
        &mut self,
        name: &str,
        store: &ParamStore<impl NetBackend>,
    ) -> run::Result<()> {
        for (spec, v) in store.specs().iter().zip(store.values()) {
            let data = v.to_f64()?.iter().map(|&x| x as f32).collect();
            self.tensors.insert(
                format!("{name}/{}", spec.name),
                HostTensor {
                    shape: spec.shape.dims().to_vec(),
                    data,
                },
            );
        }
        Ok(())
    }

    /// A store like `like` holding the tensors `name/TENSOR` (an error if one is missing or of
    /// another shape).
    pub fn store<B: NetBackend>(
        &self,
        name: &str,
        like: &ParamStore<B>,
        backend: &B,
    ) -> run::Result<ParamStore<B>> {
        let values = like
            .specs()
            .iter()
            .map(|spec| {
                let name = format!("{name}/{}", spec.name);
                let t = self
                    .tensors
                    .get(&name)
                    .filter(|t| t.shape == spec.shape.dims())
                    .ok_or_else(|| {
                        RunError::Resume(format!(
                            "the checkpoint has no tensor {name} of shape {}: it is from another \
                             network",
                            spec.shape
                        ))
                    })?;
                let values: Vec<f64> = t.data.iter().map(|&x| f64::from(x)).collect();
                Ok(backend.tensor(&values, &spec.shape)?)
            })
            .collect::<run::Result<Vec<_>>>()?;
        Ok(like.with_values(values)?)
    }

    /// A network's weights as `prefix/params/...` and `prefix/stats/...`.
    pub fn put_weights(&mut self, prefix: &str, w: &Weights<impl NetBackend>) -> run::Result<()> {
        self.put_store(&key(prefix, "params"), &w.params)?;
        self.put_store(&key(prefix, "stats"), &w.stats)
    }

    /// The weights [`Parts::put_weights`] wrote under `prefix`, shaped like `like`.
    pub fn weights<B: NetBackend>(
        &self,
        prefix: &str,
        like: &Weights<B>,
        backend: &B,
    ) -> run::Result<Weights<B>> {
        Ok(Weights {
            params: self.store(&key(prefix, "params"), &like.params, backend)?,
            stats: self.store(&key(prefix, "stats"), &like.stats, backend)?,
        })
    }

    /// A learner: its weights, its optimiser's moment buffers as `prefix/optimizer/0`, `1`, ...
    /// and its step count as the counter `PREFIX_optimizer_steps` (`optimizer_steps` for the
    /// student).
    pub fn put_learner(&mut self, prefix: &str, l: &Learner<impl NetBackend>) -> run::Result<()> {
        self.put_weights(prefix, &l.weights)?;
        for (k, m) in l.optimizer.state.iter().enumerate() {
            let data = m.to_f64()?.iter().map(|&x| x as f32).collect();
            let shape = m.shape().dims().to_vec();
            let name = key(prefix, &format!("optimizer/{k}"));
            self.tensors.insert(name, HostTensor { shape, data });
        }
        self.counters
            .insert(steps_counter(prefix), l.optimizer.steps);
        Ok(())
    }

    /// Restores `l` from what [`Parts::put_learner`] wrote under `prefix`.
    pub fn learner<B: NetBackend>(
        &self,
        prefix: &str,
        l: &mut Learner<B>,
        backend: &B,
    ) -> run::Result<()> {
        l.weights = self.weights(prefix, &l.weights, backend)?;
        let mut state = Vec::new();
        while let Some(t) = self
            .tensors
            .get(&key(prefix, &format!("optimizer/{}", state.len())))
        {
            let values: Vec<f64> = t.data.iter().map(|&x| f64::from(x)).collect();
            let shape = Shape(t.shape.clone());
            state.push(Var::constant(backend, backend.tensor(&values, &shape)?));
        }
        l.optimizer.state = state;
        let counter = steps_counter(prefix);
        l.optimizer.steps = *self
            .counters
            .get(&counter)
            .ok_or_else(|| RunError::Resume(format!("the checkpoint has no counter {counter}")))?;
        Ok(())
    }
}

fn steps_counter(prefix: &str) -> String {
    match prefix {
        "" => "optimizer_steps".into(),
        p => format!("{}_optimizer_steps", p.replace('/', "_")),
    }
}

/// Saves the trainer's whole state after `step` iterations.
pub fn save_checkpoint<B: NetBackend>(
    trainer: &Trainer<B>,
    step: u64,
    stem: &Path,
) -> run::Result<()> {
    let mut parts = Parts::default();
    parts.put_learner("", &trainer.student)?;
    trainer.method.save(&mut parts)?;
    let sidecar = Sidecar {
        format: FORMAT,
        step,
        seed: trainer.config.seed,
        config: serde_json::to_value(&trainer.config).expect("a configuration serialises"),
        stage: trainer.stage,
        counters: parts.counters,
    };
    Ok(super::save(stem, &parts.tensors, &sidecar)?)
}

/// A checkpoint restored: the step it was saved at, and the settings the trainer's configuration
/// changes from the checkpoint's (see [`may_change_on_resume`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Restored {
    pub step: u64,
    pub changes: Vec<Change>,
}

/// A setting changed on resume: its dotted key, the checkpoint's value and the new one (null
/// when absent).
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub key: String,
    pub old: serde_json::Value,
    pub new: serde_json::Value,
}

/// Whether a run may continue with `key` changed: its length, and the learning rates and
/// gradient clipping (`optimizer.lr`, `optimizer.clip`, a method's own `lr`, `*_lr` or `clip`),
/// which the guard's advice after a divergence asks to lower. Everything else would make the
/// checkpoint's state mean something else.
pub fn may_change_on_resume(key: &str) -> bool {
    let last = key.rsplit('.').next().unwrap_or(key);
    key == "iterations"
        || (key.contains('.') && matches!(last, "lr" | "clip"))
        || (key.contains('.') && last.ends_with("_lr"))
}

/// The dotted keys whose values differ between two configurations as JSON, in key order.
pub fn config_changes(old: &serde_json::Value, new: &serde_json::Value) -> Vec<Change> {
    fn walk(prefix: &str, old: &serde_json::Value, new: &serde_json::Value, out: &mut Vec<Change>) {
        use serde_json::Value;
        if let (Value::Object(a), Value::Object(b)) = (old, new) {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                let (x, y) = (a.get(k), b.get(k));
                walk(
                    &key,
                    x.unwrap_or(&Value::Null),
                    y.unwrap_or(&Value::Null),
                    out,
                );
            }
        } else if old != new {
            out.push(Change {
                key: prefix.to_string(),
                old: old.clone(),
                new: new.clone(),
            });
        }
    }
    let mut out = Vec::new();
    walk("", old, new, &mut out);
    out
}

/// Restores a trainer saved by [`save_checkpoint`] at `stem`.
pub fn load_checkpoint<B: NetBackend>(
    backend: &B,
    trainer: &mut Trainer<B>,
    stem: &Path,
) -> run::Result<Restored> {
    let (tensors, sidecar) = super::load(stem)?;
    let parts = Parts {
        tensors,
        counters: sidecar.counters.clone(),
    };
    restore(backend, trainer, &parts, &sidecar)
}

/// Restores a trainer from a checkpoint's parts and sidecar: its stage must be the trainer's,
/// and its configuration too but for the settings that may change on resume (which it returns).
pub fn restore<B: NetBackend>(
    backend: &B,
    trainer: &mut Trainer<B>,
    parts: &Parts,
    sidecar: &Sidecar,
) -> run::Result<Restored> {
    let (saved, stage) = saved_config(sidecar)
        .map_err(|e| RunError::Resume(format!("its configuration does not read: {e}")))?;
    let json = |c: &TrainConfig| serde_json::to_value(c).expect("a configuration serialises");
    let changes = config_changes(&json(&saved), &json(&trainer.config));
    let refused: Vec<String> = changes
        .iter()
        .filter(|c| !may_change_on_resume(&c.key))
        .map(|c| format!("{} ({} there, {} now)", c.key, c.old, c.new))
        .collect();
    if !refused.is_empty() {
        return Err(RunError::Resume(format!(
            "the checkpoint was written with another configuration: {}. Only iterations, the \
             learning rates (optimizer.lr, a method's lr) and the clipping (optimizer.clip, a \
             method's clip) may change on resume",
            refused.join(", ")
        )));
    }
    if stage != trainer.stage {
        return Err(RunError::Resume(format!(
            "the checkpoint is of the {stage:?} stage, the run of the {:?} stage",
            trainer.stage
        )));
    }
    parts.learner("", &mut trainer.student, backend)?;
    trainer.method.load(backend, parts)?;
    Ok(Restored {
        step: sidecar.step,
        changes,
    })
}

/// The configuration and stage a sidecar records, from any format this version reads (see
/// [`super`]); an error names the format.
pub fn saved_config(sidecar: &Sidecar) -> Result<(TrainConfig, Stage), String> {
    let mut config = sidecar.config.clone();
    let stage = match sidecar.format {
        1 => {
            let name = config["method"].as_str().unwrap_or_default();
            match Method::FORMAT_1_STAGES.iter().find(|(n, _)| *n == name) {
                Some((_, method)) => {
                    config["method"] = serde_json::to_value(method).expect("a method serialises");
                    Stage::First
                }
                None => Stage::Main,
            }
        }
        FORMAT => sidecar.stage,
        other => {
            return Err(format!(
                "checkpoint format {other}: this metaseg reads formats 1 to {FORMAT}"
            ))
        }
    };
    let config = serde_json::from_value(config)
        .map_err(|e| format!("(checkpoint format {}) {e}", sidecar.format))?;
    Ok((config, stage))
}
