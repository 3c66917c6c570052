//! `metaseg predict`: segments volumes with a network trained by `metaseg train` and writes label
//! volumes (uint8) on each input's grid with its header geometry. Everything that can fail without
//! the GPU (the checkpoint, the inputs, the output folder) is checked before the device is opened;
//! each output is written to a temporary file and renamed into place, so no half-written file is
//! left under an output name.

use crate::data::{nifti, DataError, Dtype, Volume};
use crate::eval::trained::{SavedRun, SegmentOptions, TrainedError};
use crate::gpu::{DeviceError, Gpu};
use crate::nn::NetBackend;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug, Clone)]
pub struct PredictArgs {
    /// A run directory written by `metaseg train` (the network it kept: `best` when it kept its best
    /// validation, else its last checkpoint), or a checkpoint's stem or file.
    #[arg(long, value_name = "RUN_DIR")]
    pub checkpoint: PathBuf,
    /// An image volume (.nii or .nii.gz), or a folder of them.
    #[arg(long, value_name = "FILE_OR_DIR")]
    pub input: PathBuf,
    /// A .nii / .nii.gz file for one input, or a folder (created if needed) that receives one label
    /// volume per input under the input's file name.
    #[arg(long, value_name = "FILE_OR_DIR")]
    pub output: PathBuf,
    /// Sliding-window stride as a fraction of the patch (default: the run's log.stride_fraction).
    #[arg(long, value_name = "F")]
    pub stride_fraction: Option<f64>,
    /// Keep only the largest connected component of each class.
    #[arg(long)]
    pub largest_component: bool,
    /// Also write the averaged class probabilities (float32, one channel per class) to
    /// probabilities/ beside the label volumes.
    #[arg(long)]
    pub probabilities: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    #[error(transparent)]
    Trained(#[from] TrainedError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("cannot write predictions to {}: {reason}", .path.display())]
    Output { path: PathBuf, reason: String },
    #[error("{0}")]
    Usage(String),
}

pub type Result<T> = std::result::Result<T, PredictError>;

/// One input and where its prediction goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub input: PathBuf,
    pub output: PathBuf,
    pub probabilities: Option<PathBuf>,
}

fn is_nifti_name(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.ends_with(".nii") || name.ends_with(".nii.gz")
}

/// The NIfTI files of a folder, sorted by name.
fn inputs_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let io = |e| DataError::Io {
        path: dir.to_path_buf(),
        source: e,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if path.is_file() && is_nifti_name(&path) {
            files.push(path);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(PredictError::Usage(format!(
            "no .nii or .nii.gz files in {}",
            dir.display()
        )));
    }
    Ok(files)
}

/// The inputs and their outputs: a folder of inputs goes to a folder under the same file names;
/// one input goes to `output` if it is a .nii / .nii.gz name, else into the folder `output`.
pub fn plan_jobs(input: &Path, output: &Path, probabilities: bool) -> Result<Vec<Job>> {
    if !input.exists() {
        return Err(DataError::NotFound {
            path: input.to_path_buf(),
        }
        .into());
    }
    let (inputs, out_dir, single) = if input.is_dir() {
        if is_nifti_name(output) {
            return Err(PredictError::Usage(format!(
                "--input {} is a folder, so --output must be a folder, not {}",
                input.display(),
                output.display()
            )));
        }
        (inputs_in(input)?, output.to_path_buf(), None)
    } else if is_nifti_name(output) && !output.is_dir() {
        let parent = output.parent().filter(|p| !p.as_os_str().is_empty());
        let dir = parent.map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        (vec![input.to_path_buf()], dir, Some(output.to_path_buf()))
    } else {
        (vec![input.to_path_buf()], output.to_path_buf(), None)
    };
    inputs
        .into_iter()
        .map(|input| {
            let name = input
                .file_name()
                .expect("a listed file has a name")
                .to_owned();
            let output = single.clone().unwrap_or_else(|| out_dir.join(&name));
            let probabilities = probabilities.then(|| {
                let file = output.file_name().expect("an output file name").to_owned();
                out_dir.join("probabilities").join(file)
            });
            if same_file(&input, &output) {
                return Err(PredictError::Usage(format!(
                    "the prediction of {} would overwrite it; choose another --output",
                    input.display()
                )));
            }
            Ok(Job {
                input,
                output,
                probabilities,
            })
        })
        .collect()
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Creates the folders the jobs write to and checks a file can be created in each.
pub fn prepare_outputs(jobs: &[Job]) -> Result<()> {
    let mut dirs: Vec<&Path> = jobs
        .iter()
        .flat_map(|j| [Some(j.output.as_path()), j.probabilities.as_deref()])
        .flatten()
        .filter_map(Path::parent)
        .collect();
    dirs.sort();
    dirs.dedup();
    for dir in dirs {
        super::ensure_writable_dir(dir).map_err(|e| PredictError::Output {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    Ok(())
}

/// Segments every job's input and writes its outputs; returns the label files written.
pub fn predict_all<B: NetBackend>(
    backend: &B,
    saved: &SavedRun,
    jobs: &[Job],
    options: SegmentOptions,
    progress: bool,
) -> Result<Vec<PathBuf>> {
    let bar = if progress {
        ProgressBar::new(jobs.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}",
        )
        .expect("a valid template"),
    );
    let mut network = None;
    let mut written = Vec::with_capacity(jobs.len());
    for job in jobs {
        let name = job.input.file_name().unwrap_or_default();
        bar.set_message(name.to_string_lossy().into_owned());
        let image = nifti::read(&job.input)?;
        // The network is built for the first input's channel count; later inputs must match it.
        if network.is_none() {
            network = Some(saved.network(backend, image.channels)?);
        }
        let net = network.as_ref().expect("built above");
        // The input's grid and header, without its voxels, for the outputs.
        let mut geometry = Volume {
            data: Vec::new(),
            channels: 1,
            dims: image.dims,
            spacing: image.spacing,
            header: image.header.clone(),
        };
        // The image's display window means nothing for labels (0: unset).
        geometry.header.cal_min = 0.0;
        geometry.header.cal_max = 0.0;
        let seg = net.segment(backend, &job.input, image, options)?;
        let labels = seg.labels.iter().map(|&v| f32::from(v)).collect();
        nifti::write(&job.output, &geometry.like(labels)?, Dtype::U8)?;
        if let Some(path) = &job.probabilities {
            let probabilities = Volume {
                data: seg.probabilities,
                channels: seg.classes,
                ..geometry.clone()
            };
            nifti::write(path, &probabilities, Dtype::F32)?;
        }
        written.push(job.output.clone());
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(written)
}

/// `metaseg predict`.
pub fn run(args: &PredictArgs) -> Result<()> {
    let saved = SavedRun::read(&args.checkpoint)?;
    let fraction = args
        .stride_fraction
        .unwrap_or(saved.config.log.stride_fraction);
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(PredictError::Usage(format!(
            "--stride-fraction {fraction} must be in (0, 1]"
        )));
    }
    let jobs = plan_jobs(&args.input, &args.output, args.probabilities)?;
    prepare_outputs(&jobs)?;
    let gpu = Gpu::new()?;
    let options = SegmentOptions {
        stride_fraction: fraction,
        largest_component: args.largest_component,
    };
    let written = predict_all(&gpu, &saved, &jobs, options, !args.quiet)?;
    let step = saved.sidecar.step;
    let where_ = match written.as_slice() {
        [one] => one.display().to_string(),
        _ => args.output.display().to_string(),
    };
    println!(
        "wrote {} label volume(s) to {where_} (checkpoint {}, step {step})",
        written.len(),
        saved.stem.display()
    );
    Ok(())
}
