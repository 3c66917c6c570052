//! MLB-Seg's two stages (METHODS.md, section 1, step 1).
//!
//! Stage 0 is a supervised run of its own in RUN_DIR/stage0 (the same run loop, log and
//! checkpoints as `--method supervised`, for `mlb_seg.stage0_iterations`). Its network predicts
//! the initial labels of every unlabeled training case by sliding-window inference; they are
//! written to RUN_DIR/initial_labels/CASE.nii.gz (uint8, on the case's grid) for inspection, and
//! the main stage's batches carry them for the unlabeled patches. The main stage starts from the
//! stage-0 network (the paper) or from scratch (`mlb_seg.init = "scratch"`: the released code
//! without its --checkpoint), with a fresh optimiser and schedule and the teacher a copy of the
//! student, as the released code's second script starts; it runs in RUN_DIR itself. A resumed
//! main stage reads the initial labels back from their files (resumption across the stages:
//! [`crate::train::run`]).

use super::step::{meta_weights, unlabeled_terms};
use super::{MlbSeg, MlbSegConfig};
use crate::data::{self, nifti, Dtype, Volume};
use crate::nn::NetBackend;
use crate::train::config::TrainConfig;
use crate::train::methods::{FirstStage, Method, Stage};
use crate::train::network::Learner;
use crate::train::pseudo_labels;
use crate::train::run::{self, io, RunContext, RunData, RunError, RunPaths};
use crate::train::trainer::{slice_batch, Context, DeviceBatch, Trainer};
use metaseg_autograd::{Shape, Var};
use std::path::PathBuf;

/// Stage 0: a supervised run on the labeled cases in RUN_DIR/stage0.
pub fn stage0(config: &TrainConfig) -> FirstStage {
    FirstStage {
        dir: "stage0",
        config: TrainConfig {
            method: Method::Supervised,
            iterations: config.mlb_seg.stage0_iterations,
            // Stage 0 is supervised: no main-stage key is part of it, so runs that differ only
            // in those share one stage 0 (`--stop-after` at its end, a copy, `--resume --set`).
            mlb_seg: MlbSegConfig {
                stage0_iterations: config.mlb_seg.stage0_iterations,
                ..MlbSegConfig::default()
            },
            ..config.clone()
        },
        stage: Stage::Main,
        title: "stage 0: supervised",
        iterations_key: "mlb_seg.stage0_iterations",
        all_cases: false,
    }
}

pub fn initial_labels_dir(paths: &RunPaths) -> PathBuf {
    paths.dir.join("initial_labels")
}

/// The main stage's start (see the top): the run's cases with the unlabeled ones carrying their
/// initial labels, predicted by the stage-0 network (or read back when resuming), and the
/// student and teacher from that network unless `mlb_seg.init = "scratch"`.
pub fn start<B: NetBackend>(
    mlb_seg: &mut MlbSeg<B>,
    cx: &Context<'_>,
    student: &mut Learner<B>,
    run: &RunContext<'_, B>,
    resuming: bool,
) -> run::Result<RunData> {
    let config = cx.config;
    let labels_dir = initial_labels_dir(run.paths);
    let unlabeled = &run.data.unlabeled;
    let stage0 = if resuming {
        None
    } else {
        Some(stage0(config).restore(run.backend, run.channels(), run.paths)?)
    };
    let labels = match &stage0 {
        None => pseudo_labels::read(unlabeled, &labels_dir)?,
        Some(network) => {
            run.say(format!(
                "initial labels of {} unlabeled cases, in {}",
                unlabeled.len(),
                labels_dir.display()
            ));
            pseudo_labels::predict(run.backend, network, unlabeled, &labels_dir)?
        }
    };
    let main_data = pseudo_labels::with_labels(run.data, labels);
    check_weight_case(config, &main_data)?;
    if let Some(network) = stage0.filter(|_| config.mlb_seg.init != "scratch") {
        student.weights = network.student.weights;
        mlb_seg.teacher = student.weights.clone();
    }
    Ok(main_data)
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
    mlb_seg: &MlbSeg<B>,
    trainer: &Trainer<B>,
    run: &RunContext<'_, B>,
    data: &RunData,
    batch: &DeviceBatch<B>,
    step: u64,
) -> run::Result<()> {
    let (backend, config) = (run.backend, &trainer.config);
    let name = &config.mlb_seg.save_weights;
    let Some(case) = data.unlabeled.iter().find(|c| &c.name == name) else {
        return Ok(());
    };
    let patch = config.batch.patch;
    let (images, labels, start) =
        crate::train::batch::centre_patch(case, patch, config.data.classes);
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
    let x_m = slice_batch(&batch.x, 0, batch.labeled)?;
    let y_m = slice_batch(&batch.y, 0, batch.labeled)?;
    let cx = trainer.context();
    let lr = cx.config.mlb_seg.lr_at(&cx, step);
    let student = &trainer.student;
    let (u, _) = unlabeled_terms(&cx, &student.weights, &mlb_seg.teacher, &x_u, &y_u, 0, step)?;
    let weights = meta_weights(&cx, student, &u, (&x_m, &y_m), lr, step)?.to_f64()?;
    let dir = run.paths.dir.join("weights");
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
