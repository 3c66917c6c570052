//! A network trained by `metaseg train`, loaded from its checkpoint to segment whole volumes the
//! way the run's validation does: the input z-scored per volume as training normalises it, the
//! evaluated network's parameters and running statistics (the student's, also in a mean-teacher
//! run, or the momentum copy online-pl validates with), sliding windows of the training patch,
//! argmax.

use super::inference::{argmax, keep_largest_components, HostVolume};
use super::{predict_probabilities, SlidingWindow};
use crate::data::{DataError, Volume};
use crate::nn::{NetBackend, ParamStore};
use crate::train::checkpoint::{self, parts, CheckpointError, Parts, Sidecar};
use crate::train::config::TrainConfig;
use crate::train::methods::Stage;
use crate::train::network::Net;
use crate::train::run::{self, RunError};
use crate::train::trainer::Trainer;
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

/// The checkpoint stem `path` names: a run directory (its `best` when it kept its best validation,
/// else its `checkpoint`), a stem, or either file of
/// a checkpoint (`.safetensors`, `.json`). Both files must exist.
pub fn checkpoint_stem(path: &Path) -> Result<PathBuf> {
    let mut candidates = Vec::new();
    if path.is_dir() {
        // A run that keeps its best validation (`log.keep`) hands on `best`, as training does.
        candidates.push(path.join("best"));
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
    /// The stage of its method's run the checkpoint is from.
    pub stage: Stage,
    pub sidecar: Sidecar,
    parts: Parts,
}

impl SavedRun {
    /// Reads the checkpoint at `path` (see [`checkpoint_stem`]).
    pub fn read(path: &Path) -> Result<SavedRun> {
        let stem = checkpoint_stem(path)?;
        let (tensors, sidecar) = checkpoint::load(&stem)?;
        let (config, stage) =
            parts::saved_config(&sidecar).map_err(|message| TrainedError::Config {
                path: checkpoint::paths(&stem).1,
                message,
            })?;
        let parts = Parts {
            tensors,
            counters: sidecar.counters.clone(),
        };
        Ok(SavedRun {
            stem,
            config,
            stage,
            sidecar,
            parts,
        })
    }

    /// The run's network for `in_channels`-channel inputs with the evaluated network's tensors
    /// (the student's, or what its method evaluates in its place: [`Trainer::evaluated`]) on
    /// `backend`.
    pub fn network<B: NetBackend>(&self, backend: &B, in_channels: usize) -> Result<Trained<B>> {
        let mut trainer = Trainer::at(backend, &self.config, self.stage, in_channels)?;
        parts::restore(backend, &mut trainer, &self.parts, &self.sidecar).map_err(|e| match e {
            RunError::Resume(reason) => TrainedError::Network {
                path: self.stem.clone(),
                channels: in_channels,
                reason,
            },
            other => other.into(),
        })?;
        let weights = trainer.evaluated().clone();
        Ok(Trained {
            config: self.config.clone(),
            net: trainer.net,
            params: weights.params,
            stats: weights.stats,
            in_channels,
        })
    }
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
