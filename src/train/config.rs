//! A training run's configuration: TOML presets shipped with the project (`presets/*.toml`), any
//! key overridable from the command line as `--set section.key=value` (the value in TOML syntax;
//! a bare word is taken as a string).

use super::methods::dtml::DtmlConfig;
use super::methods::ideal::IdealConfig;
use super::methods::local_contrastive::LocalContrastiveConfig;
use super::methods::mlb_seg::MlbSegConfig;
use super::methods::online_pl::OnlinePlConfig;
use super::methods::{Method, Stage};
use crate::optim::Rampup;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// One of the registry's methods ([`Method`]), by its kebab-case name.
    pub method: Method,
    pub seed: u64,
    pub iterations: u64,
    pub data: DataConfig,
    pub network: NetworkConfig,
    pub batch: BatchConfig,
    pub optimizer: OptimizerConfig,
    pub mean_teacher: MeanTeacherConfig,
    pub log: LogConfig,
    /// MLB-Seg's settings (METHODS.md, section 1); a preset without the section gets the
    /// defaults, so the other methods' presets need not name them.
    #[serde(default)]
    pub mlb_seg: MlbSegConfig,
    /// Online pseudo-labeling's settings (METHODS.md, section 5); defaults as `mlb_seg`.
    #[serde(default)]
    pub online_pl: OnlinePlConfig,
    /// DTML's settings (METHODS.md, section 3), defaults when the preset has no `[dtml]`.
    #[serde(default)]
    pub dtml: DtmlConfig,
    /// The local contrastive method's settings (METHODS.md, section 2), defaults as `mlb_seg`.
    #[serde(default)]
    pub local_contrastive: LocalContrastiveConfig,
    /// IDEAL's settings (METHODS.md, section 4), defaults as `mlb_seg`.
    #[serde(default)]
    pub ideal: IdealConfig,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// "default" for the embedded procedural data set, or a Medical Segmentation Decathlon folder.
    pub source: String,
    /// Cases of the embedded data set (training, test and validation together).
    pub cases: usize,
    /// Volume size [D, H, W] of the embedded data set.
    pub size: [usize; 3],
    /// The first `labeled` training cases are labeled (unless `split` names a split file).
    pub labeled: usize,
    /// Cases held out for testing (the last `test` training-free cases of the embedded set).
    pub test: usize,
    /// Labeled cases held out for model selection (`log.keep = "best_validation"`), apart from
    /// the test cases: the embedded set's last `validation` cases (after its test cases), or the
    /// last of a folder's unlabeled pool. 0: none, and validation during training scores the test
    /// cases, as a progress figure only.
    #[serde(default)]
    pub validation: usize,
    /// A JSON split file with lists `labeled`, `unlabeled`, `test` (empty: use the counts).
    pub split: String,
    /// How the embedded set's labeled cases are chosen among its training cases: "random" (the
    /// first `labeled`; the cases are a seeded random draw) or "stratified" (one per stratum of
    /// a label-free contrast key, `data::draw`).
    #[serde(default = "random_draw")]
    pub labeled_draw: String,
    pub classes: usize,
    /// The embedded data set's generator knobs (defaults when the preset has no
    /// `[data.synthetic]`); unused for a folder.
    #[serde(default)]
    pub synthetic: crate::data::synthetic::SyntheticKnobs,
}

fn random_draw() -> String {
    "random".into()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// vnet or unet.
    pub kind: String,
    pub base_width: usize,
    pub levels: usize,
    pub dropout: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    pub patch: [usize; 3],
    pub labeled: usize,
    pub unlabeled: usize,
    /// Probability that a labeled crop is centred on foreground.
    pub foreground: f64,
    pub rotate_flip: bool,
    pub intensity: f64,
    pub noise: f64,
    /// Small rotations on the device: angles uniform in +-rotate degrees about each axis (the
    /// H-W plane only for a 2D patch); 0: off.
    #[serde(default)]
    pub rotate: f64,
    /// Small scalings on the device: factor uniform in 1 +- scale; 0: off.
    #[serde(default)]
    pub scale: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    /// sgd or adam.
    pub kind: String,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// constant, step, poly or lambda.
    pub schedule: String,
    /// step: multiply by `gamma` every `step_every` iterations.
    pub step_every: u64,
    pub gamma: f64,
    /// poly: (1 - t / iterations)^power.
    pub power: f64,
    /// lambda: 20 / (epoch + 20) with epochs of this many iterations.
    pub epoch: u64,
    /// Global L2 norm the gradients are clipped to (0: no clipping).
    pub clip: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeanTeacherConfig {
    pub ema_decay: f64,
    /// Weight of the consistency term at the end of the ramp-up.
    pub consistency: f64,
    /// Ramp-up length in units of `rampup_unit` iterations (40 x 150 in the LA recipes).
    pub rampup: f64,
    pub rampup_unit: u64,
}

impl MeanTeacherConfig {
    /// The consistency weight's ramp-up.
    pub fn rampup(&self) -> Rampup {
        Rampup {
            weight: self.consistency,
            length: self.rampup,
            unit: self.rampup_unit,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Iterations between validations (Dice on the held-out cases) and checkpoints.
    pub validate_every: u64,
    pub checkpoint_every: u64,
    /// Sliding-window stride for validation, as a fraction of the patch.
    pub stride_fraction: f64,
    /// Which network a stage hands on and the test scores: "last" (its last iteration's) or
    /// "best_validation" (the one of the validation with the highest Dice on the validation cases,
    /// kept as `best.*` beside the checkpoint; needs `data.validation` cases).
    #[serde(default = "keep_last")]
    pub keep: String,
}

fn keep_last() -> String {
    KEEP[0].into()
}

/// The values of `log.keep`.
pub const KEEP: [&str; 2] = ["last", "best_validation"];

impl LogConfig {
    /// Whether a stage keeps the network of its best validation rather than its last.
    pub fn keeps_best(&self) -> bool {
        self.keep == KEEP[1]
    }
}

/// The presets shipped with metaseg, by name: the small default, the LA V-Net recipe, and each
/// method's paper-scale recipe under the method's name.
pub const PRESETS: [(&str, &str); 7] = [
    ("default", include_str!("../../presets/default.toml")),
    ("la-vnet", include_str!("../../presets/la-vnet.toml")),
    (
        Method::MlbSeg.name(),
        include_str!("../../presets/mlb-seg.toml"),
    ),
    (
        Method::OnlinePl.name(),
        include_str!("../../presets/online-pl.toml"),
    ),
    (Method::Dtml.name(), include_str!("../../presets/dtml.toml")),
    (
        Method::LocalContrastive.name(),
        include_str!("../../presets/local-contrastive.toml"),
    ),
    (
        Method::Ideal.name(),
        include_str!("../../presets/ideal.toml"),
    ),
];

/// The presets' names, for messages.
fn preset_names() -> String {
    PRESETS.map(|(name, _)| name).join(", ")
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "unknown preset '{0}'; the presets are {names} (or give a .toml file)",
        names = preset_names()
    )]
    UnknownPreset(String),
    #[error("reading {path}: {message}")]
    File { path: String, message: String },
    #[error("--set {0}: expected KEY=VALUE with a dotted key, like optimizer.lr=0.01")]
    Override(String),
    #[error("--set {key}: no such key in the configuration")]
    UnknownKey { key: String },
    #[error("the configuration is invalid: {0}")]
    Invalid(String),
}

impl TrainConfig {
    /// A preset by name, or a TOML file by path, with `overrides` applied in order.
    pub fn load(preset: &str, overrides: &[String]) -> Result<TrainConfig, ConfigError> {
        let text = match PRESETS.iter().find(|(n, _)| *n == preset) {
            Some((_, text)) => text.to_string(),
            None if preset.ends_with(".toml") => {
                std::fs::read_to_string(preset).map_err(|e| ConfigError::File {
                    path: preset.into(),
                    message: e.to_string(),
                })?
            }
            None => return Err(ConfigError::UnknownPreset(preset.into())),
        };
        let mut value: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::File {
                    path: preset.into(),
                    message: e.to_string(),
                })?;
        if !overrides.is_empty() {
            // Through the typed form and back, so every key with a default (absent from the
            // text) can be set too.
            let typed: TrainConfig = toml::Value::Table(value)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Invalid(e.to_string()))?;
            value = toml::Table::try_from(&typed).expect("a configuration serialises");
        }
        for o in overrides {
            apply_override(&mut value, o)?;
        }
        let config: TrainConfig = toml::Value::Table(value)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.to_string()))?;
        config.check()?;
        Ok(config)
    }

    /// Iterations a run spends before its main stage (its method's first stage), 0 for methods
    /// without one.
    pub fn first_stage_iterations(&self) -> u64 {
        self.method
            .kind()
            .first_stage(self)
            .map_or(0, |first| first.config.iterations)
    }

    /// Checks what the types cannot: names from their lists, sizes that fit together.
    pub fn check(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let one_of = |what: &str, v: &str, names: &[&str]| {
            if names.contains(&v) {
                Ok(())
            } else {
                bad(format!("{what} '{v}' is not one of {}", names.join(", ")))
            }
        };
        one_of("network.kind", &self.network.kind, &["vnet", "unet"])?;
        one_of(
            "data.labeled_draw",
            &self.data.labeled_draw,
            &crate::data::LabeledDraw::NAMES,
        )?;
        if self.data.labeled_draw == "stratified" && self.data.source != "default" {
            return bad(
                "data.labeled_draw = \"stratified\" draws from the embedded set only; a \
                 folder's labeled cases are the first ones or those its split file names"
                    .into(),
            );
        }
        one_of("log.keep", &self.log.keep, &KEEP)?;
        if self.log.keeps_best() && self.data.validation == 0 {
            return bad(
                "log.keep = \"best_validation\" selects on validation cases apart from the test \
                 cases: set data.validation to their number (selecting on the test cases would \
                 score the test cases with a network chosen by them)"
                    .into(),
            );
        }
        one_of("optimizer.kind", &self.optimizer.kind, &["sgd", "adam"])?;
        one_of(
            "optimizer.schedule",
            &self.optimizer.schedule,
            &["constant", "step", "poly", "lambda"],
        )?;
        let multiple = 1usize << self.network.levels.saturating_sub(1);
        // A network on a depth-1 patch is 2D: it pools H and W only.
        let two_d = self.batch.patch[0] == 1;
        let pooled = if two_d {
            &self.batch.patch[1..]
        } else {
            &self.batch.patch[..]
        };
        if self.batch.patch.contains(&0) || pooled.iter().any(|&p| p % multiple != 0) {
            return bad(format!(
                "batch.patch {:?} must divide by {multiple} (2^(levels - 1)){}",
                self.batch.patch,
                if two_d { " along H and W" } else { "" }
            ));
        }
        if self.iterations == 0 {
            return bad(
                "iterations must be at least 1: a run of 0 iterations trains nothing".into(),
            );
        }
        if self.batch.labeled == 0 || self.data.labeled == 0 {
            return bad("a run needs at least one labeled case and patch per batch".into());
        }
        let kind = self.method.kind();
        if kind.streams(Stage::Main).unlabeled && self.batch.unlabeled == 0 {
            return bad(format!(
                "{} needs unlabeled patches (batch.unlabeled > 0)",
                self.method
            ));
        }
        kind.check(self)?;
        let (rotate, scale) = (self.batch.rotate, self.batch.scale);
        if !(0.0..=180.0).contains(&rotate) || !(0.0..1.0).contains(&scale) {
            return bad(format!(
                "batch.rotate {rotate} must be in [0, 180] degrees and batch.scale {scale} in \
                 [0, 1)"
            ));
        }
        if !self.optimizer.lr.is_finite() || self.optimizer.lr <= 0.0 {
            return bad(format!(
                "optimizer.lr {} must be positive",
                self.optimizer.lr
            ));
        }
        Ok(())
    }
}

/// Sets `a.b.c=value` in the table; the key must already exist (so a typo is an error, not a
/// silently ignored setting).
fn apply_override(table: &mut toml::Table, text: &str) -> Result<(), ConfigError> {
    let (key, raw) = text
        .split_once('=')
        .ok_or_else(|| ConfigError::Override(text.into()))?;
    let value: toml::Value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let parts: Vec<&str> = key.split('.').collect();
    let unknown = || ConfigError::UnknownKey { key: key.into() };
    let mut current = table;
    for part in &parts[..parts.len() - 1] {
        current = current
            .get_mut(*part)
            .and_then(toml::Value::as_table_mut)
            .ok_or_else(unknown)?;
    }
    let last = parts[parts.len() - 1];
    if !current.contains_key(last) {
        return Err(unknown());
    }
    current.insert(last.to_string(), value);
    Ok(())
}
