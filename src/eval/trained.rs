//! A network trained by `metaseg train`, loaded from its checkpoint to segment whole volumes the
//! way the run's validation does: the input z-scored per volume as training normalises it, the
//! student's parameters and running statistics (validation predicts with the student, also in a
//! mean-teacher run), sliding windows of the training patch, argmax.

use super::inference::{argmax, keep_largest_components, HostVolume};
use super::{predict_probabilities, SlidingWindow};
use crate::data::{DataError, Volume};
use crate::nn::{NetBackend, Network, ParamStore};
use crate::train::checkpoint::{self, CheckpointError, HostTensor, Sidecar};
use crate::train::config::TrainConfig;
use crate::train::run::{self, RunError};
use crate::train::trainer::Net;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TrainedError {
    #[error("no checkpoint at {}: looked for {looked}", .path.display())]
    NotFound { path: PathBuf, looked: String },
    #[error("{}: its configuration does not read: {message}", .path.display())]
    Config { path: PathBuf, message: String },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(
        "{}: tensor '{tensor}' holds {value} at element {index}; a network with non-finite \
         weights cannot predict (the run diverged; train again, or from an earlier checkpoint)",
        .path.display()
    )]
    NonFinite {
        path: PathBuf,
        tensor: String,
        index: usize,
        value: f32,
    },
    #[error(
        "checkpoint {}: its network does not take this {channels}-channel input: {reason}",
        .path.display()
    )]
    Network {
        path: PathBuf,
        channels: usize,
        reason: String,
    },
    #[error("{}: {channels} channel(s), but the network was loaded for {expected}", .path.display())]
    Channels {
        path: PathBuf,
        channels: usize,
        expected: usize,
    },
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error(transparent)]
    Compute(#[from] metaseg_autograd::Error),
}

pub type Result<T> = std::result::Result<T, TrainedError>;

/// The checkpoint stem `path` names: a run directory (its `checkpoint`), a stem, or either file of
/// a checkpoint (`.safetensors`, `.json`). Both files must exist.
pub fn checkpoint_stem(path: &Path) -> Result<PathBuf> {
    let mut candidates = Vec::new();
    if path.is_dir() {
        candidates.push(path.join("checkpoint"));
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("safetensors" | "json") => candidates.push(path.with_extension("")),
        _ => candidates.push(path.to_path_buf()),
    }
    for stem in &candidates {
        let (tensors, sidecar) = checkpoint::paths(stem);
        if tensors.is_file() && sidecar.is_file() {
            return Ok(stem.clone());
        }
    }
    let looked: Vec<String> = candidates
        .iter()
        .map(|stem| {
            let (tensors, sidecar) = checkpoint::paths(stem);
            format!("{} and {}", tensors.display(), sidecar.display())
        })
        .collect();
    Err(TrainedError::NotFound {
        path: path.to_path_buf(),
        looked: looked.join(", or "),
    })
}

/// A checkpoint read into host memory with its configuration, before any device is opened.
pub struct SavedRun {
    pub stem: PathBuf,
    pub config: TrainConfig,
    pub sidecar: Sidecar,
    tensors: BTreeMap<String, HostTensor>,
}

impl SavedRun {
    /// Reads the checkpoint at `path` (see [`checkpoint_stem`]).
    pub fn read(path: &Path) -> Result<SavedRun> {
        let stem = checkpoint_stem(path)?;
        let (tensors, sidecar) = checkpoint::load(&stem)?;
        check_finite(&checkpoint::paths(&stem).0, &tensors)?;
        let config: TrainConfig =
            serde_json::from_value(sidecar.config.clone()).map_err(|e| TrainedError::Config {
                path: checkpoint::paths(&stem).1,
                message: e.to_string(),
            })?;
        Ok(SavedRun {
            stem,
            config,
            sidecar,
            tensors,
        })
    }

    /// The run's network for `in_channels`-channel inputs with the evaluated network's tensors
    /// (the student's, or its momentum copy's) on `backend`.
    pub fn network<B: NetBackend>(&self, backend: &B, in_channels: usize) -> Result<Trained<B>> {
        let net = Net::new(&self.config, in_channels)?;
        let restored = |store: ParamStore<B>, prefix: &str| {
            run::restore(&store, prefix, &self.tensors, backend).map_err(|e| match e {
                RunError::Resume(reason) => TrainedError::Network {
                    path: self.stem.clone(),
                    channels: in_channels,
                    reason,
                },
                other => other.into(),
            })
        };
        // The evaluated network (`Trainer::evaluated`): the momentum copy if the run keeps one.
        let prefix = if self.config.has_momentum_copy() {
            "momentum/"
        } else {
            ""
        };
        let params = restored(net.init_params(backend, 0)?, &format!("{prefix}params"))?;
        let stats = restored(net.init_stats(backend)?, &format!("{prefix}stats"))?;
        Ok(Trained {
            config: self.config.clone(),
            net,
            params,
            stats,
            in_channels,
        })
    }
}

/// Every tensor of a checkpoint must be finite: a NaN weight turns every prediction into
/// background without a word (issue 25).
fn check_finite(path: &Path, tensors: &BTreeMap<String, HostTensor>) -> Result<()> {
    for (name, tensor) in tensors {
        if let Some(index) = tensor.data.iter().position(|v| !v.is_finite()) {
            return Err(TrainedError::NonFinite {
                path: path.to_path_buf(),
                tensor: name.clone(),
                index,
                value: tensor.data[index],
            });
        }
    }
    Ok(())
}

/// A trained network ready to segment.
pub struct Trained<B: NetBackend> {
    pub config: TrainConfig,
    pub net: Net,
    pub params: ParamStore<B>,
    pub stats: ParamStore<B>,
    pub in_channels: usize,
}

/// How a volume is segmented.
#[derive(Clone, Copy, Debug)]
pub struct SegmentOptions {
    /// Sliding-window stride as a fraction of the patch.
    pub stride_fraction: f64,
    /// Keep only the largest connected component of each class.
    pub largest_component: bool,
}

/// A segmented volume: class indices [D, H, W] and the averaged probabilities [K, D, H, W].
pub struct Segmentation {
    pub labels: Vec<u8>,
    pub probabilities: Vec<f32>,
    pub classes: usize,
}

impl<B: NetBackend> Trained<B> {
    /// Segments `image` (read from `path`, named in errors), normalised as training does.
    pub fn segment(
        &self,
        backend: &B,
        path: &Path,
        image: Volume,
        options: SegmentOptions,
    ) -> Result<Segmentation> {
        if image.channels != self.in_channels {
            return Err(TrainedError::Channels {
                path: path.to_path_buf(),
                channels: image.channels,
                expected: self.in_channels,
            });
        }
        let dims = image.dims;
        let case = run::normalised(String::new(), image, None)?;
        let volume = HostVolume {
            data: &case.image.data,
            channels: case.image.channels,
            dims,
        };
        let window =
            SlidingWindow::with_stride_fraction(self.config.batch.patch, options.stride_fraction);
        let probabilities = predict_probabilities(
            backend,
            &self.net,
            &self.params,
            &self.stats,
            &volume,
            window,
        )?;
        let classes = probabilities.len() / case.image.voxels();
        let mut labels = argmax(&probabilities, classes);
        if options.largest_component {
            keep_largest_components(&mut labels, dims, classes);
        }
        Ok(Segmentation {
            labels,
            probabilities,
            classes,
        })
    }
}
