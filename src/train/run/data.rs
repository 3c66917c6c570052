//! A run's data: the cases of its configuration loaded and normalised, and the two-stream batch of
//! each iteration on the device.

use super::{Result, RunError};
use crate::data::{self, draw, preprocess, synthetic, Msd, SplitSpec, SyntheticConfig, Volume};
use crate::nn::NetBackend;
use crate::train::augment::{warp_batch, RotateScale};
use crate::train::batch::{sample, LoadedCase, Sampling};
use crate::train::config::TrainConfig;
use crate::train::trainer::{DeviceBatch, Trainer};
use metaseg_autograd::{Shape, Var, Warp};
use std::path::{Path, PathBuf};

/// The cases of a run, normalised (z-score per volume), in memory.
#[derive(Clone)]
pub struct RunData {
    pub labeled: Vec<LoadedCase>,
    pub unlabeled: Vec<LoadedCase>,
    pub test: Vec<LoadedCase>,
    /// Labeled cases for model selection (`data.validation`), apart from every other list.
    pub validation: Vec<LoadedCase>,
}

impl RunData {
    /// The cases validation during training scores: the validation cases, or without them the
    /// test cases (a progress figure then, never a selection).
    pub fn validated(&self) -> &[LoadedCase] {
        if self.validation.is_empty() {
            &self.test
        } else {
            &self.validation
        }
    }
}

/// A case as training sees it: the image z-scored per volume (each channel on its own), the label
/// rounded to class indices. Prediction prepares its inputs with this too.
pub fn normalised(name: String, mut image: Volume, label: Option<&Volume>) -> Result<LoadedCase> {
    preprocess::zscore(&mut image, preprocess::Clip::None)?;
    let label = label.map(|l| l.data.iter().map(|&v| v.round() as u8).collect());
    Ok(LoadedCase { name, image, label })
}

/// Loads the configuration's data: the embedded set, or an MSD folder with its split. A method
/// that labels every case (`full`) has them all labeled.
pub fn load_data(config: &TrainConfig) -> Result<RunData> {
    let d = &config.data;
    let full = config.method.kind().labels_every_case();
    let cases = if d.source == "default" {
        let synth = SyntheticConfig {
            seed: config.seed,
            cases: d.cases,
            size: d.size,
            knobs: d.synthetic.clone(),
            ..SyntheticConfig::default()
        };
        let mut all = Vec::with_capacity(d.cases);
        for i in 0..d.cases {
            let c = synthetic::case(&synth, i)?;
            all.push(normalised(
                synthetic::case_name(i),
                c.image,
                Some(&c.label),
            )?);
        }
        if d.labeled + d.test + d.validation > d.cases {
            return Err(RunError::Data(data::DataError::invalid(
                "split",
                format!(
                    "{} labeled + {} test + {} validation of {} cases",
                    d.labeled, d.test, d.validation, d.cases
                ),
            )));
        }
        // After the test cases, so that adding validation cases leaves the others as they were.
        let validation = all.split_off(d.cases - d.validation);
        let test = all.split_off(all.len() - d.test);
        let draw = data::LabeledDraw::parse(&d.labeled_draw)?;
        // `full` labels every training case: which are "labeled" changes nothing but its order.
        if draw == data::LabeledDraw::Random || full {
            let unlabeled = all.split_off(d.labeled);
            RunData {
                labeled: all,
                unlabeled,
                test,
                validation,
            }
        } else {
            let keys: Vec<f64> = all.iter().map(|c| draw::contrast_key(&c.image)).collect();
            let picks = draw::stratified(&keys, d.labeled, config.seed)?;
            let (labeled, unlabeled) =
                (all.into_iter().enumerate()).partition::<Vec<_>, _>(|(i, _)| picks.contains(i));
            let cases = |v: Vec<(usize, LoadedCase)>| v.into_iter().map(|(_, c)| c).collect();
            RunData {
                labeled: cases(labeled),
                unlabeled: cases(unlabeled),
                test,
                validation,
            }
        }
    } else {
        // Labels must fit the classes trained on, not only those dataset.json declares.
        let msd = Msd::open(Path::new(&d.source))?.with_classes(d.classes);
        let spec = if d.split.is_empty() {
            SplitSpec::FirstN {
                labeled: d.labeled,
                test: Some(d.test),
            }
        } else {
            SplitSpec::File(PathBuf::from(&d.split))
        };
        // The ceiling trains on the unlabeled cases with their labels.
        let split = if full {
            msd.split_all_labeled(&spec)?
        } else {
            msd.split(&spec)?
        };
        let load = |cases: &[data::Case]| -> Result<Vec<LoadedCase>> {
            cases
                .iter()
                .map(|c| {
                    let (image, label) = msd.load(c)?;
                    normalised(c.name.clone(), image, label.as_ref())
                })
                .collect()
        };
        let mut unlabeled = split.unlabeled;
        if d.validation > unlabeled.len() {
            return Err(RunError::Data(data::DataError::invalid(
                "split",
                format!(
                    "data.validation {} of a folder comes from its unlabeled pool of {} cases",
                    d.validation,
                    unlabeled.len()
                ),
            )));
        }
        let validation = load(&unlabeled.split_off(unlabeled.len() - d.validation))?;
        if let Some(c) = validation.iter().find(|c| c.label.is_none()) {
            return Err(RunError::Data(data::DataError::invalid(
                "split",
                format!("validation case {} has no label", c.name),
            )));
        }
        RunData {
            labeled: load(&split.labeled)?,
            unlabeled: load(&unlabeled)?,
            test: load(&split.test)?,
            validation,
        }
    };
    if full {
        // The ceiling: the unlabeled cases with their labels (the embedded set has them all).
        let (mut labeled, unlabeled) = (cases.labeled, cases.unlabeled);
        if unlabeled.iter().any(|c| c.label.is_none()) {
            return Err(RunError::Resume(format!(
                "method {} needs labels for every training case",
                config.method
            )));
        }
        labeled.extend(unlabeled);
        return Ok(RunData {
            labeled,
            unlabeled: Vec::new(),
            test: cases.test,
            validation: cases.validation,
        });
    }
    Ok(cases)
}

/// The batch of iteration `t` on the device.
pub fn device_batch<B: NetBackend>(
    backend: &B,
    trainer: &Trainer<B>,
    data: &RunData,
    t: u64,
) -> Result<DeviceBatch<B>> {
    let c = &trainer.config;
    let streams = c.method.kind().streams(trainer.stage);
    // Supervised and full see no unlabeled patch: not even through batch-norm statistics.
    let unlabeled = if data.unlabeled.is_empty() || !streams.unlabeled {
        0
    } else {
        c.batch.unlabeled
    };
    let s = Sampling {
        patch: c.batch.patch,
        foreground: c.batch.foreground,
        rotate_flip: c.batch.rotate_flip,
        intensity: c.batch.intensity,
        noise: c.batch.noise,
        unlabeled_labels: streams.unlabeled_labels,
    };
    let counts = (c.batch.labeled, unlabeled);
    let b = sample(
        &data.labeled,
        &data.unlabeled,
        counts,
        c.data.classes,
        &s,
        c.seed,
        t,
    );
    let channels = data.labeled[0].image.channels;
    let [d, h, w] = c.batch.patch;
    let x = Shape::from([b.labeled + b.unlabeled, channels, d, h, w]);
    let with_labels = b.labels.len() / (c.data.classes * d * h * w);
    let y = Shape::from([with_labels, c.data.classes, d, h, w]);
    let batch = DeviceBatch {
        x: Var::from_f64(backend, &b.images, &x, false)?,
        y: Var::from_f64(backend, &b.labels, &y, false)?,
        labeled: b.labeled,
    };
    let rotate_scale = RotateScale {
        rotate: c.batch.rotate,
        scale: c.batch.scale,
    };
    if rotate_scale.is_off() {
        return Ok(batch);
    }
    let warps: Vec<Warp> = (0..b.labeled + b.unlabeled)
        .map(|slot| rotate_scale.warp(c.batch.patch, c.seed, t, slot))
        .collect();
    Ok(warp_batch(batch, &warps)?)
}
