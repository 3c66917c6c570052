//! A training run's configuration: TOML presets shipped with the project (`presets/*.toml`), any
//! key overridable from the command line as `--set section.key=value` (the value in TOML syntax;
//! a bare word is taken as a string).

use super::dtml::DtmlConfig;
use metaseg_autograd::Normalization;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// supervised, full, mean-teacher, mlb-seg, online-pl (online-pl-teacher: its first stage),
    /// dtml, local-contrastive or ideal (ideal-pretrain: its first stage).
    pub method: String,
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
    pub online_pl: super::online_pl::OnlinePlConfig,
    /// DTML's settings (METHODS.md, section 3), defaults when the preset has no `[dtml]`.
    #[serde(default)]
    pub dtml: DtmlConfig,
    /// The local contrastive method's settings (METHODS.md, section 2), defaults as `mlb_seg`.
    #[serde(default)]
    pub local_contrastive: super::local_contrastive::LocalContrastiveConfig,
    /// IDEAL's settings (METHODS.md, section 4), defaults as `mlb_seg`.
    #[serde(default)]
    pub ideal: super::ideal::IdealConfig,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// "default" for the embedded procedural data set, or a Medical Segmentation Decathlon folder.
    pub source: String,
    /// Cases of the embedded data set (training and test together).
    pub cases: usize,
    /// Volume size [D, H, W] of the embedded data set.
    pub size: [usize; 3],
    /// The first `labeled` training cases are labeled (unless `split` names a split file).
    pub labeled: usize,
    /// Cases held out for validation and testing.
    pub test: usize,
    /// A JSON split file with lists `labeled`, `unlabeled`, `test` (empty: use the counts).
    pub split: String,
    pub classes: usize,
    /// The embedded data set's generator knobs (defaults when the preset has no
    /// `[data.synthetic]`); unused for a folder.
    #[serde(default)]
    pub synthetic: crate::data::synthetic::SyntheticKnobs,
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

/// MLB-Seg (METHODS.md, section 1): the paper's intent by default, the released code's behaviour
/// behind flags.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlbSegConfig {
    /// Stage 0: supervised iterations on the labeled cases before the initial labels are
    /// predicted (a run of its own in RUN_DIR/stage0).
    pub stage0_iterations: u64,
    /// Where the main stage starts: "stage0" (the network trained on the labeled cases, as the
    /// paper describes) or "scratch" (fresh weights: the released code without --checkpoint).
    pub init: String,
    /// The zoom offsets p of the PLE views are drawn from the even numbers in this range (the
    /// released code's 4..30 voxels on 144-voxel slices), scaled by the patch's smallest axis
    /// (of more than one voxel) over `zoom_reference`.
    pub zoom_range: [u32; 2],
    pub zoom_reference: f64,
    /// "coverage": the views' predictions warped back are averaged where each covers the frame
    /// (a zoom-in view covers only its centre); "views": divided by the number of views, as the
    /// released code does.
    pub ple_average: String,
    /// The student pass the PLE labels come from: "train" (the pass the update differentiates,
    /// dropout and batch statistics included: the paper and the released code) or "eval" (an
    /// extra pass without gradient in evaluation mode, as stage 0 predicts the initial labels;
    /// ours, to test whether training mode's batch statistics bias the PLE labels). Absent from
    /// configurations written before it existed, which ran "train".
    #[serde(default = "train_mode")]
    pub ple_mode: String,
    /// Which exact meta-gradient: "fast" (forward mode) or "reverse" (reverse over reverse).
    pub meta_path: String,
    /// Weight normalisation: "clip" (max(-g, 0) / sum, the paper's), "softmax", "sigmoid" or
    /// "hard".
    pub weights: String,
    /// false: the meta loss is the CE on the meta batch itself (the paper); true: on its PLE views
    /// (the released code).
    pub meta_views: bool,
    /// Weight of L_cons and L_mt in both updates (1 in the paper and the released code).
    pub consistency: f64,
    /// false: the meta batch's losses (the meta loss and the supervised step) are mean CE, as in
    /// the paper and the released code; true: 0.5 (CE + Dice) as the baselines' supervised loss
    /// (in neither: it tests whether CE-only objectives drift to background on small structures).
    pub meta_batch_dice: bool,
    /// Ramp that weight up as the mean teacher's consistency (mean_teacher.rampup and
    /// rampup_unit); neither the paper nor the released code does.
    pub rampup: bool,
    /// Global L2 norm both updates clip their gradients to (0: none).
    pub clip: f64,
    /// An unlabeled case whose weight maps are written as NIfTI at every validation (empty:
    /// none).
    pub save_weights: String,
}

/// `ple_mode`'s default: the paper's training-mode pass.
fn train_mode() -> String {
    "train".into()
}

/// The released code's 2D recipe where it applies to any network (METHODS.md, section 1.7).
impl Default for MlbSegConfig {
    fn default() -> Self {
        MlbSegConfig {
            stage0_iterations: 3000,
            init: "stage0".into(),
            zoom_range: [4, 30],
            zoom_reference: 144.0,
            ple_average: "coverage".into(),
            ple_mode: train_mode(),
            meta_path: "fast".into(),
            weights: "clip".into(),
            meta_views: false,
            consistency: 1.0,
            meta_batch_dice: false,
            rampup: false,
            clip: 0.2,
            save_weights: String::new(),
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
}

/// The presets shipped with metaseg, by name.
pub const PRESETS: [(&str, &str); 7] = [
    ("default", include_str!("../../presets/default.toml")),
    ("la-vnet", include_str!("../../presets/la-vnet.toml")),
    ("mlb-seg", include_str!("../../presets/mlb-seg.toml")),
    ("online-pl", include_str!("../../presets/online-pl.toml")),
    ("dtml", include_str!("../../presets/dtml.toml")),
    (
        "local-contrastive",
        include_str!("../../presets/local-contrastive.toml"),
    ),
    ("ideal", include_str!("../../presets/ideal.toml")),
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "unknown preset '{0}'; the presets are default, la-vnet, mlb-seg, online-pl, dtml, \
         local-contrastive, ideal (or give a .toml file)"
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
        for o in overrides {
            apply_override(&mut value, o)?;
        }
        let config: TrainConfig = toml::Value::Table(value)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.to_string()))?;
        config.check()?;
        Ok(config)
    }

    /// Whether the method trains on unlabeled patches.
    pub fn uses_unlabeled(&self) -> bool {
        self.has_teacher() || ["dtml", "local-contrastive", "ideal"].contains(&self.method.as_str())
    }

    /// Whether the method keeps a mean teacher (online-pl: the teacher of its pseudo-labels;
    /// ideal-pretrain: the momentum key encoder).
    pub fn has_teacher(&self) -> bool {
        ["mean-teacher", "mlb-seg", "online-pl", "ideal-pretrain"].contains(&self.method.as_str())
    }

    /// Whether the method keeps a momentum copy of its network (online-pl, both stages).
    pub fn has_momentum_copy(&self) -> bool {
        self.method.starts_with("online-pl")
    }

    /// Iterations a run spends before its main stage (MLB-Seg's stage 0, online-pl's teacher),
    /// 0 for other methods.
    pub fn stage0_iterations(&self) -> u64 {
        match self.method.as_str() {
            "mlb-seg" => self.mlb_seg.stage0_iterations,
            "online-pl" => self.online_pl.stage1_iterations,
            "local-contrastive" => self.local_contrastive.stage1_iterations,
            "ideal" if self.ideal.encoder.is_empty() => self.ideal.pretrain_iterations,
            _ => 0,
        }
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
        one_of(
            "method",
            &self.method,
            &[
                "supervised",
                "full",
                "mean-teacher",
                "mlb-seg",
                "online-pl",
                "online-pl-teacher",
                "dtml",
                "local-contrastive",
                "ideal",
                "ideal-pretrain",
            ],
        )?;
        one_of("network.kind", &self.network.kind, &["vnet", "unet"])?;
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
        if self.batch.labeled == 0 || self.data.labeled == 0 {
            return bad("a run needs at least one labeled case and patch per batch".into());
        }
        if self.uses_unlabeled() && self.batch.unlabeled == 0 {
            return bad(format!(
                "{} needs unlabeled patches (batch.unlabeled > 0)",
                self.method
            ));
        }
        if self.method == "mlb-seg" {
            self.check_mlb_seg()?;
        }
        if self.has_momentum_copy() {
            self.online_pl.check().map_err(ConfigError::Invalid)?;
        }
        if self.method == "dtml" {
            self.dtml.check(self)?;
        }
        if self.method == "local-contrastive" {
            self.local_contrastive.check(self)?;
        }
        if self.method.starts_with("ideal") {
            self.ideal.check(self)?;
        }
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

impl TrainConfig {
    fn check_mlb_seg(&self) -> Result<(), ConfigError> {
        let m = &self.mlb_seg;
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let one_of = |what: &str, v: &str, names: &[&str]| {
            if names.contains(&v) {
                Ok(())
            } else {
                bad(format!(
                    "mlb_seg.{what} '{v}' is not one of {}",
                    names.join(", ")
                ))
            }
        };
        one_of("init", &m.init, &["stage0", "scratch"])?;
        one_of("ple_average", &m.ple_average, &["coverage", "views"])?;
        one_of("ple_mode", &m.ple_mode, &["train", "eval"])?;
        one_of("meta_path", &m.meta_path, &["fast", "reverse"])?;
        one_of("weights", &m.weights, &Normalization::NAMES)?;
        if self.optimizer.kind != "sgd" {
            return bad("mlb-seg's look-ahead step is SGD: set optimizer.kind = \"sgd\"".into());
        }
        if m.stage0_iterations == 0 {
            return bad(
                "mlb_seg.stage0_iterations must be at least 1: the initial labels come \
                        from the stage-0 network"
                    .into(),
            );
        }
        let [lo, hi] = m.zoom_range;
        let smallest = self.batch.patch.iter().filter(|&&n| n > 1).min().copied();
        let largest_p = f64::from(hi) * smallest.unwrap_or(1) as f64 / m.zoom_reference;
        let positive_reference = m.zoom_reference > 0.0;
        if lo == 0 || lo > hi || !positive_reference || smallest.is_none() {
            return bad(format!(
                "mlb_seg.zoom_range {:?} must be 1 <= low <= high, with zoom_reference > 0 and a \
                 patch of more than one voxel",
                m.zoom_range
            ));
        }
        if 4.0 * largest_p >= smallest.unwrap_or(1) as f64 {
            return bad(format!(
                "mlb_seg.zoom_range {:?}: a zoom-out by {largest_p:.1} voxels per side would leave \
                 less than half of a {}-voxel patch axis",
                m.zoom_range,
                smallest.unwrap_or(1)
            ));
        }
        let nonnegative = |v: f64| v >= 0.0;
        if !nonnegative(m.consistency) || !nonnegative(m.clip) {
            return bad("mlb_seg.consistency and mlb_seg.clip must be >= 0".into());
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
