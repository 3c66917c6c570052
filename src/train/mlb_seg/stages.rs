//! MLB-Seg's two stages (METHODS.md, section 1, step 1).
//!
//! Stage 0 is a supervised run of its own in RUN_DIR/stage0 (the same run loop, log and
//! checkpoints as `--method supervised`, for `mlb_seg.stage0_iterations`). Its network predicts
//! the initial labels of every unlabeled training case by sliding-window inference; they are
//! written to RUN_DIR/initial_labels/CASE.nii.gz (uint8, on the case's grid) for inspection, and
//! the main stage's batches carry them for the unlabeled patches. The main stage starts from the
//! stage-0 network (the paper) or from scratch (`mlb_seg.init = "scratch"`: the released code
//! without its --checkpoint), with a fresh optimiser and schedule and the teacher a copy of the
//! student, as the released code's second script starts; it runs in RUN_DIR itself.
//!
//! Resumption (as every two-stage method, see [`super::super::stages`]): once the main stage has a
//! checkpoint, `--resume` continues it and reads the initial labels back from their files; before
//! that, it continues stage 0 (a finished stage 0 resumes with nothing left to do) and then starts
//! the main stage. `stop_after` counts stage 0's iterations first.

use super::super::config::TrainConfig;
use super::super::pseudo_labels;
use super::super::run::{
    self, io, restore_trainer, RunData, RunError, RunOptions, RunPaths, Summary,
};
use super::super::stages::{self, say, FirstStage};
use super::super::trainer::{DeviceBatch, Trainer};
use super::step::{meta_weights, unlabeled_terms};
use crate::data::{self, nifti, Dtype, Volume};
use crate::nn::NetBackend;
use metaseg_autograd::{Shape, Var};
use std::path::PathBuf;

/// The supervised run of stage 0: the run's configuration with its own method and length.
pub fn stage0_config(config: &TrainConfig) -> TrainConfig {
    stages::stage_config(config, "supervised", config.mlb_seg.stage0_iterations)
}

pub fn stage0_paths(paths: &RunPaths) -> RunPaths {
    paths.sub("stage0")
}

pub fn initial_labels_dir(paths: &RunPaths) -> PathBuf {
    paths.dir.join("initial_labels")
}

/// Both stages (see the top), through the shared two-stage run of [`super::super::stages`]. The
/// summary is the main stage's, with the iterations and times of stage 0 added when this call ran
/// it.
pub fn train<B: NetBackend>(
    backend: &B,
    config: &TrainConfig,
    data: &RunData,
    paths: &RunPaths,
    options: RunOptions,
) -> run::Result<Summary> {
    stages::require_unlabeled(data, "mlb-seg")?;
    let stage0 = stage0_config(config);
    let stage0_paths = stage0_paths(paths);
    let labels_dir = initial_labels_dir(paths);
    let first = FirstStage {
        config: &stage0,
        paths: &stage0_paths,
        message: format!(
            "stage 0: supervised on {} labeled cases for {} iterations, in {}",
            data.labeled.len(),
            stage0.iterations,
            stage0_paths.dir.display()
        ),
    };
    stages::train(
        backend,
        data,
        paths,
        options,
        first,
        |main_started, main_options| {
            let labels = if main_started {
                pseudo_labels::read(&data.unlabeled, &labels_dir)?
            } else {
                let channels = data.labeled[0].image.channels;
                let network = restore_trainer(backend, &stage0, channels, &stage0_paths)?;
                say(
                    options,
                    format!(
                        "initial labels of {} unlabeled cases, in {}",
                        data.unlabeled.len(),
                        labels_dir.display()
                    ),
                );
                pseudo_labels::predict(backend, &network, &data.unlabeled, &labels_dir)?
            };
            let main_data = pseudo_labels::with_labels(data, labels);
            check_weight_case(config, &main_data)?;
            let trainer = main_trainer(backend, config, &main_data, &stage0_paths, main_started)?;
            run::train_from(backend, trainer, &main_data, paths, main_options)
        },
    )
}

/// The main stage's trainer before its first step: the stage-0 network (or fresh weights), a
/// fresh optimiser, the teacher a copy of the student. Resuming replaces all of it anyway.
fn main_trainer<B: NetBackend>(
    backend: &B,
    config: &TrainConfig,
    data: &RunData,
    stage0_paths: &RunPaths,
    resuming: bool,
) -> run::Result<Trainer<B>> {
    let channels = data.labeled[0].image.channels;
    let mut trainer = Trainer::new(backend, config, channels)?;
    if resuming || config.mlb_seg.init == "scratch" {
        return Ok(trainer);
    }
    let stage0 = restore_trainer(backend, &stage0_config(config), channels, stage0_paths)?;
    trainer.params = stage0.params;
    trainer.stats = stage0.stats;
    if let Some(teacher) = trainer.teacher.as_mut() {
        teacher.params = trainer.params.clone();
        teacher.stats = trainer.stats.clone();
    }
    Ok(trainer)
}

fn check_weight_case(config: &TrainConfig, data: &RunData) -> run::Result<()> {
    let name = &config.mlb_seg.save_weights;
    if name.is_empty() || data.unlabeled.iter().any(|c| &c.name == name) {
        return Ok(());
    }
    let names: Vec<&str> = data.unlabeled.iter().map(|c| c.name.as_str()).collect();
    Err(RunError::Data(data::DataError::invalid(
        "mlb_seg.save_weights",
        format!(
            "'{name}' is not an unlabeled training case; they are {}",
            names.join(", ")
        ),
    )))
}

/// At a validation of an MLB-Seg run with `mlb_seg.save_weights = CASE`: the weights the current
/// network gives that case's costs, for its centre patch (with its initial labels) against the
/// meta batch of this iteration's batch, written as RUN_DIR/weights/CASE_STEP_{init,ple}.nii.gz:
/// the identity view's two maps, times the number of weighted voxels (1 is the uniform weight).
/// Nothing is updated. The identity view of the centre patch: the other views' maps are in their
/// own frames, and a whole volume would rarely fit one forward pass.
pub fn save_weight_maps<B: NetBackend>(
    backend: &B,
    trainer: &Trainer<B>,
    data: &RunData,
    batch: &DeviceBatch<B>,
    step: u64,
    paths: &RunPaths,
) -> run::Result<()> {
    let config = &trainer.config;
    let name = &config.mlb_seg.save_weights;
    if config.method != "mlb-seg" || name.is_empty() {
        return Ok(());
    }
    let Some(case) = data.unlabeled.iter().find(|c| &c.name == name) else {
        return Ok(());
    };
    let patch = config.batch.patch;
    let (images, labels, start) =
        super::super::batch::centre_patch(case, patch, config.data.classes);
    let voxels: usize = patch.iter().product();
    let [d, h, w] = patch;
    let x_u = Var::from_f64(
        backend,
        &images,
        &Shape::from([1, case.image.channels, d, h, w]),
        false,
    )?;
    let y_u = Var::from_f64(
        backend,
        &labels,
        &Shape::from([1, config.data.classes, d, h, w]),
        false,
    )?;
    let x_m = super::super::trainer::slice_batch(&batch.x, 0, batch.labeled)?;
    let y_m = super::super::trainer::slice_batch(&batch.y, 0, batch.labeled)?;
    let lr = trainer.schedule().lr(config.optimizer.lr, step);
    let (u, _) = unlabeled_terms(trainer, &x_u, &y_u, 0, step)?;
    let weights = meta_weights(trainer, &u, (&x_m, &y_m), lr, step)?.to_f64()?;
    let dir = paths.dir.join("weights");
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    // Rows are view-major with one sample: row 0 is the identity view, its channels init, PLE.
    let entries = weights.len() as f64;
    for (c, source) in ["init", "ple"].iter().enumerate() {
        let map: Vec<f32> = weights[c * voxels..(c + 1) * voxels]
            .iter()
            .map(|&v| (v * entries) as f32)
            .collect();
        let mut volume = Volume::new(map, patch, case.image.spacing)?;
        volume.header = pseudo_labels::geometry(case).header;
        volume.header.dim = nifti::header_dim(patch, 1);
        if let Some(start) = start {
            nifti::shift_origin(&mut volume.header, [start[2], start[1], start[0]]);
        }
        let path = dir.join(format!("{name}_{step}_{source}.nii.gz"));
        nifti::write(&path, &volume, Dtype::F32)?;
    }
    Ok(())
}
