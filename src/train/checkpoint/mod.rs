//! Checkpoints: every tensor of a run (parameters, running statistics, the teacher, optimiser
//! moments) in one safetensors file, and a JSON sidecar with what is not a tensor (format, step,
//! seed, configuration and stage, counters). Both are written to a temporary file and renamed
//! into place, tensors first, so a crash leaves the previous checkpoint whole; the sidecar names
//! the step the tensors were saved at, and loading checks the two agree. [`parts`] is what a
//! trainer writes into them and reads back.
//!
//! Tensors are stored as f32, the GPU's precision, so a GPU run resumes bit for bit.
//!
//! Formats: 1 (no `format` key) named the first stages of online-pl and IDEAL as methods of their
//! own ("online-pl-teacher", "ideal-pretrain"); 2 names the method and, apart, its [`Stage`]. The
//! tensors' names are the same in both.

pub mod parts;

pub use parts::Parts;

use super::methods::Stage;
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("writing checkpoint {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading checkpoint {path}: {message}")]
    Read { path: PathBuf, message: String },
}

pub type Result<T> = std::result::Result<T, CheckpointError>;

/// The format this version writes (see the top).
pub const FORMAT: u32 = 2;

/// What a checkpoint holds besides its tensors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sidecar {
    /// Its layout's version; absent in format 1.
    #[serde(default = "format_1")]
    pub format: u32,
    /// Iterations completed when it was written.
    pub step: u64,
    pub seed: u64,
    /// The run's configuration, as the run read it.
    pub config: serde_json::Value,
    /// The stage of its method's run (format 1 has none: see the top).
    #[serde(default)]
    pub stage: Stage,
    /// Any further counters (optimiser steps, the method's state).
    pub counters: BTreeMap<String, u64>,
}

/// Sidecars without a `format` key were written before it existed.
fn format_1() -> u32 {
    1
}

/// A named tensor on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// `<stem>.safetensors` and `<stem>.json`.
pub fn paths(stem: &Path) -> (PathBuf, PathBuf) {
    (
        stem.with_extension("safetensors"),
        stem.with_extension("json"),
    )
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let err = |source| CheckpointError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    fs::write(&tmp, bytes).map_err(err)?;
    fs::rename(&tmp, path).map_err(err)
}

/// Writes the tensors and the sidecar at `stem` (see [`paths`]).
pub fn save(stem: &Path, tensors: &BTreeMap<String, HostTensor>, sidecar: &Sidecar) -> Result<()> {
    let (tensor_path, json_path) = paths(stem);
    let bytes: BTreeMap<&String, Vec<u8>> = tensors
        .iter()
        .map(|(k, t)| (k, bytemuck::cast_slice::<f32, u8>(&t.data).to_vec()))
        .collect();
    let views = tensors
        .iter()
        .map(|(k, t)| {
            let view = TensorView::new(Dtype::F32, t.shape.clone(), &bytes[k]).map_err(|e| {
                CheckpointError::Write {
                    path: tensor_path.clone(),
                    source: std::io::Error::other(format!("tensor {k}: {e}")),
                }
            })?;
            Ok((k.clone(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = Some(std::collections::HashMap::from([(
        "step".to_string(),
        sidecar.step.to_string(),
    )]));
    let serialized =
        safetensors::serialize(views, metadata).map_err(|e| CheckpointError::Write {
            path: tensor_path.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
    write_atomically(&tensor_path, &serialized)?;
    let json = serde_json::to_vec_pretty(sidecar).expect("a sidecar serialises");
    write_atomically(&json_path, &json)
}

/// Reads the tensors and the sidecar written by [`save`] at `stem`.
pub fn load(stem: &Path) -> Result<(BTreeMap<String, HostTensor>, Sidecar)> {
    let (tensor_path, json_path) = paths(stem);
    let bad = |path: &Path, message: String| CheckpointError::Read {
        path: path.to_path_buf(),
        message,
    };
    let json = fs::read(&json_path).map_err(|e| bad(&json_path, e.to_string()))?;
    let sidecar: Sidecar =
        serde_json::from_slice(&json).map_err(|e| bad(&json_path, e.to_string()))?;
    let bytes = fs::read(&tensor_path).map_err(|e| bad(&tensor_path, e.to_string()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(&tensor_path, e.to_string()))?;
    let step = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("step").cloned());
    if step != Some(sidecar.step.to_string()) {
        return Err(bad(
            &tensor_path,
            format!(
                "its tensors are from step {}, its sidecar from step {}: an interrupted save",
                step.unwrap_or_else(|| "?".into()),
                sidecar.step
            ),
        ));
    }
    let file = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(&tensor_path, e.to_string()))?;
    let mut tensors = BTreeMap::new();
    for (name, view) in file.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(bad(&tensor_path, format!("tensor {name} is not f32")));
        }
        let data = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let shape = view.shape().to_vec();
        tensors.insert(name, HostTensor { shape, data });
    }
    Ok((tensors, sidecar))
}
