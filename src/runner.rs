//! Any op by name, on any backend: the table of ops with their inputs and settings, and a runner that
//! checks a call against it, runs the forward and, given a gradient of the output, the backward.
//! The command line, the GPU-vs-Cpu64 tests and the benches all go through this one table.

use crate::error::{Error, Result};
use crate::meta::{study, MetaPath};
use metaseg_autograd::contrastive::DEFAULT_TAU;
use metaseg_autograd::{
    grad, Backend, BinaryOp, ContrastiveBackend, ConvBackend, ConvSpec, DiceOptions,
    DistanceBackend, Interp, LayerBackend, LossBackend, MatmulSpec, MetaBackend, Normalization,
    Reduction, Shape, UnaryOp, Upsample, Var, Warp, WarpBackend, Window3d,
};
use std::collections::BTreeMap;
use std::sync::LazyLock;

/// An op as callers see it: what it is called, the inputs it takes (in order) and the settings
/// it accepts. An input whose name ends in `?` is optional; optional inputs come last.
#[derive(Clone, Copy, Debug)]
pub struct OpSpec {
    pub name: &'static str,
    pub inputs: &'static [&'static str],
    pub settings: &'static [&'static str],
    forward: Forward,
}

/// How an op is computed; one variant per family, so `apply_op` covers the table exhaustively.
#[derive(Clone, Copy, Debug)]
enum Forward {
    Unary(UnaryOp),
    LeakyRelu,
    Clamp,
    Binary(BinaryOp),
    Sum,
    Mean,
    Matmul,
    Softmax { log: bool },
    CrossEntropy { binary: bool },
    SoftmaxMse,
    Dice { softmax: bool },
    Sharpen,
    Entropy,
    Ema,
    MaxPool,
    AvgPool,
    Nearest,
    Trilinear,
    BatchNorm,
    InstanceNorm,
    Dropout,
    Concat,
    Slice,
    Conv3d,
    ConvTranspose3d,
    MetaGradient,
    LocalContrastive,
    DenseInfonce,
    SampleAnchors,
    Edt,
    Sdf,
    SdfProbability,
    Warp { adjoint: bool },
}

const X: &[&str] = &["x"];
const AB: &[&str] = &["a", "b"];
const NONE: &[&str] = &[];
const REDUCE: &[&str] = &["axes", "keepdim"];
const POOL: &[&str] = &["kernel", "stride"];
const SCALE: &[&str] = &["scale"];
const NORM: &[&str] = &["x", "gamma", "beta"];
const LOGITS_TARGET: &[&str] = &["logits", "target"];
const WEIGHTED: &[&str] = &["logits", "target", "weight?"];
const DICE: &[&str] = &["squared", "smooth", "include_background"];
const CONV: &[&str] = &["x", "w", "b?"];
const MASK: &[&str] = &["mask"];
const SPACING: &[&str] = &["spacing"];

const fn op(
    name: &'static str,
    inputs: &'static [&'static str],
    settings: &'static [&'static str],
    forward: Forward,
) -> OpSpec {
    OpSpec {
        name,
        inputs,
        settings,
        forward,
    }
}

/// Every op. A new kernel family adds its entries here and its `Forward` variant.
const OPS: &[OpSpec] = &[
    op("neg", X, NONE, Forward::Unary(UnaryOp::Neg)),
    op("exp", X, NONE, Forward::Unary(UnaryOp::Exp)),
    op("log", X, NONE, Forward::Unary(UnaryOp::Log)),
    op("sqrt", X, NONE, Forward::Unary(UnaryOp::Sqrt)),
    op("square", X, NONE, Forward::Unary(UnaryOp::Square)),
    op("relu", X, NONE, Forward::Unary(UnaryOp::Relu)),
    op("sigmoid", X, NONE, Forward::Unary(UnaryOp::Sigmoid)),
    op("tanh", X, NONE, Forward::Unary(UnaryOp::Tanh)),
    op("leaky_relu", X, &["slope"], Forward::LeakyRelu),
    op("clamp", X, &["min", "max"], Forward::Clamp),
    op("add", AB, NONE, Forward::Binary(BinaryOp::Add)),
    op("sub", AB, NONE, Forward::Binary(BinaryOp::Sub)),
    op("mul", AB, NONE, Forward::Binary(BinaryOp::Mul)),
    op("div", AB, NONE, Forward::Binary(BinaryOp::Div)),
    op("sum", X, REDUCE, Forward::Sum),
    op("mean", X, REDUCE, Forward::Mean),
    op("matmul", AB, &["trans_a", "trans_b"], Forward::Matmul),
    op("softmax", X, NONE, Forward::Softmax { log: false }),
    op("log_softmax", X, NONE, Forward::Softmax { log: true }),
    op(
        "cross_entropy",
        WEIGHTED,
        &["reduction"],
        Forward::CrossEntropy { binary: false },
    ),
    op(
        "binary_cross_entropy",
        WEIGHTED,
        &["reduction"],
        Forward::CrossEntropy { binary: true },
    ),
    op("softmax_mse", AB, NONE, Forward::SoftmaxMse),
    op(
        "softmax_dice",
        LOGITS_TARGET,
        DICE,
        Forward::Dice { softmax: true },
    ),
    op(
        "sigmoid_dice",
        LOGITS_TARGET,
        &["squared", "smooth"],
        Forward::Dice { softmax: false },
    ),
    op("sharpen", &["p"], &["temperature"], Forward::Sharpen),
    op("entropy", &["p"], &["eps"], Forward::Entropy),
    op("ema", &["teacher", "student"], &["decay"], Forward::Ema),
    op("max_pool3d", X, POOL, Forward::MaxPool),
    op("avg_pool3d", X, POOL, Forward::AvgPool),
    op("upsample_nearest", X, SCALE, Forward::Nearest),
    op("upsample_trilinear", X, SCALE, Forward::Trilinear),
    op("batch_norm3d", NORM, &["eps"], Forward::BatchNorm),
    op("instance_norm3d", NORM, &["eps"], Forward::InstanceNorm),
    op("dropout3d", X, &["p", "seed", "step"], Forward::Dropout),
    op("concat", AB, NONE, Forward::Concat),
    op("slice", X, &["start", "len"], Forward::Slice),
    op(
        "conv3d",
        CONV,
        &["stride", "padding", "dilation"],
        Forward::Conv3d,
    ),
    op(
        "conv_transpose3d",
        CONV,
        &["stride", "padding", "dilation", "output_padding"],
        Forward::ConvTranspose3d,
    ),
    op(
        "meta_gradient",
        &["x_u", "y_u", "x_m", "y_m", "w1", "b1", "w2", "b2"],
        &["lr", "path", "normalization"],
        Forward::MetaGradient,
    ),
    op(
        "local_contrastive",
        &["emb", "labels", "anchors?"],
        &["tau"],
        Forward::LocalContrastive,
    ),
    op(
        "dense_infonce",
        &["q", "k"],
        &["tau"],
        Forward::DenseInfonce,
    ),
    op(
        "sample_anchors",
        &["labels"],
        &["per_class", "seed"],
        Forward::SampleAnchors,
    ),
    op("edt", MASK, SPACING, Forward::Edt),
    op("sdf", MASK, SPACING, Forward::Sdf),
    op("sdf_probability", X, &["k"], Forward::SdfProbability),
    op(
        "warp",
        X,
        &["matrix", "output", "interp"],
        Forward::Warp { adjoint: false },
    ),
    op(
        "warp_adjoint",
        &["g"],
        &["matrix", "input", "interp"],
        Forward::Warp { adjoint: true },
    ),
];

/// What every op of the table needs of a backend.
pub trait OpBackend:
    Backend
    + LossBackend
    + LayerBackend
    + ConvBackend
    + ContrastiveBackend
    + DistanceBackend
    + MetaBackend
    + WarpBackend
{
}
impl<B> OpBackend for B where
    B: Backend
        + LossBackend
        + LayerBackend
        + ConvBackend
        + ContrastiveBackend
        + DistanceBackend
        + MetaBackend
        + WarpBackend
{
}

/// PyTorch's default, so results compare with it unchanged.
const LEAKY_RELU_SLOPE: f64 = 0.01;
/// PyTorch's default eps of BatchNorm3d and InstanceNorm3d.
const NORM_EPS: f64 = 1e-5;
/// PyTorch's default p of Dropout3d.
const DROPOUT_P: f64 = 0.5;
/// MixMatch's sharpening temperature.
const SHARPEN_TEMPERATURE: f64 = 0.5;
/// UA-MT's guard against log(0) in the entropy.
const ENTROPY_EPS: f64 = 1e-6;
/// The mean-teacher decay of METHODS.md.
const EMA_DECAY: f64 = 0.99;
/// Anchors per foreground class of the local contrastive loss (Chaitanya et al.).
const ANCHORS_PER_CLASS: u64 = 3;
/// DTML's sharpness of the SDF-to-probability map sigmoid(-k sdf) (METHODS.md).
const SDF_PROBABILITY_K: f64 = 1500.0;

static NAMES: LazyLock<Vec<&'static str>> = LazyLock::new(|| OPS.iter().map(|o| o.name).collect());

pub fn op_names() -> &'static [&'static str] {
    &NAMES
}

pub fn op_spec(name: &str) -> Option<OpSpec> {
    OPS.iter().find(|o| o.name == name).copied()
}

fn lookup(name: &str) -> Result<OpSpec> {
    op_spec(name).ok_or_else(|| Error::UnknownOp { name: name.into() })
}

impl OpSpec {
    fn error(&self, message: String) -> Error {
        Error::Op {
            op: self.name,
            message,
        }
    }

    fn check_settings(&self, settings: &Settings) -> Result<()> {
        match settings.keys().find(|k| !self.settings.contains(k)) {
            None => Ok(()),
            Some(key) if self.settings.is_empty() => {
                Err(self.error(format!("unknown setting '{key}'; it takes no settings")))
            }
            Some(key) => Err(self.error(format!(
                "unknown setting '{key}'; it accepts {}",
                self.settings.join(", ")
            ))),
        }
    }

    fn missing_setting(&self, key: &str) -> Error {
        self.error(format!("setting '{key}' is required"))
    }

    /// Whether a gradient can flow through the op (ops of masks have none: asking for one is
    /// the typed NoGradient error).
    pub fn has_gradient(&self) -> bool {
        !matches!(
            self.forward,
            Forward::Edt | Forward::Sdf | Forward::SampleAnchors | Forward::MetaGradient
        )
    }

    /// Inputs that must be given (those before the optional ones).
    fn required_inputs(&self) -> usize {
        self.inputs.iter().filter(|n| !n.ends_with('?')).count()
    }
}

/// An input's name without the `?` that marks it optional.
pub fn input_name(spec_name: &str) -> &str {
    spec_name.trim_end_matches('?')
}

/// `KEY=VALUE` settings of an op, parsed to a type when the op reads them.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    values: BTreeMap<String, String>,
}

impl Settings {
    /// Parses `KEY=VALUE` strings; a key given twice is an error.
    pub fn parse<S: AsRef<str>>(pairs: impl IntoIterator<Item = S>) -> Result<Settings> {
        let mut values = BTreeMap::new();
        for pair in pairs {
            let pair = pair.as_ref();
            let bad = |message: &str| Error::Setting {
                setting: pair.into(),
                message: message.into(),
            };
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| bad("expected KEY=VALUE"))?;
            if key.is_empty() {
                return Err(bad("expected KEY=VALUE"));
            }
            if values.insert(key.to_string(), value.to_string()).is_some() {
                return Err(bad("this key is already set"));
            }
        }
        Ok(Settings { values })
    }

    /// A string value, checked against the accepted ones.
    pub fn choice(&self, key: &str, accepted: &[&str]) -> Result<Option<String>> {
        let expected = format!("one of {}", accepted.join(", "));
        self.get(key, &expected, |v| {
            accepted.contains(&v).then(|| v.to_string())
        })
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.values.keys().map(String::as_str)
    }

    pub fn f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key, "a number", |v| v.parse().ok())
    }

    /// `true` or `false`.
    pub fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key, "true or false", |v| v.parse().ok())
    }

    /// Comma-separated, like `1,2,3`.
    pub fn usize_list(&self, key: &str) -> Result<Option<Vec<usize>>> {
        self.get(
            key,
            "non-negative integers separated by commas, like 1,2",
            |v| v.split(',').map(|x| x.trim().parse().ok()).collect(),
        )
    }

    /// Comma-separated numbers, like `1.5,0.8,0.8`.
    pub fn f64_list(&self, key: &str) -> Result<Option<Vec<f64>>> {
        self.get(key, "numbers separated by commas, like 1.5,0.8,0.8", |v| {
            v.split(',').map(|x| x.trim().parse().ok()).collect()
        })
    }

    fn get<T>(
        &self,
        key: &str,
        expected: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<Option<T>> {
        let Some(value) = self.values.get(key) else {
            return Ok(None);
        };
        parse(value).map(Some).ok_or_else(|| Error::Setting {
            setting: format!("{key}={value}"),
            message: format!("expected {expected}"),
        })
    }
}

/// Applies op `name` to `inputs`, given in the order its spec names them.
pub fn apply_op<B: OpBackend>(
    name: &str,
    inputs: &[Var<B>],
    settings: &Settings,
) -> Result<Var<B>> {
    let spec = lookup(name)?;
    spec.check_settings(settings)?;
    if inputs.len() < spec.required_inputs() || inputs.len() > spec.inputs.len() {
        return Err(spec.error(format!(
            "takes {} inputs ({}), got {}",
            spec.inputs.len(),
            spec.inputs.join(", "),
            inputs.len()
        )));
    }
    let x = &inputs[0];
    let y = match spec.forward {
        Forward::Unary(op) => x.unary(op)?,
        Forward::LeakyRelu => x.leaky_relu(settings.f64("slope")?.unwrap_or(LEAKY_RELU_SLOPE))?,
        Forward::Clamp => {
            let min = settings
                .f64("min")?
                .ok_or_else(|| spec.missing_setting("min"))?;
            let max = settings
                .f64("max")?
                .ok_or_else(|| spec.missing_setting("max"))?;
            x.clamp(min, max)?
        }
        Forward::Binary(op) => x.binary(op, &inputs[1])?,
        Forward::Sum => reduce(x, settings, Var::sum_axes)?,
        Forward::Mean => reduce(x, settings, Var::mean_axes)?,
        Forward::Matmul => {
            let transposes = MatmulSpec {
                trans_a: settings.bool("trans_a")?.unwrap_or(false),
                trans_b: settings.bool("trans_b")?.unwrap_or(false),
            };
            x.matmul(&inputs[1], transposes)?
        }
        Forward::Softmax { log: false } => x.softmax_channels()?,
        Forward::Softmax { log: true } => x.log_softmax_channels()?,
        Forward::CrossEntropy { binary } => {
            let reduction = settings.choice("reduction", &["none", "sum", "mean"])?;
            let reduction = Reduction::parse(reduction.as_deref().unwrap_or("mean"))
                .expect("choice() accepted only known reductions");
            let weight = inputs.get(2);
            if binary {
                x.binary_cross_entropy(&inputs[1], weight, reduction)?
            } else {
                x.cross_entropy(&inputs[1], weight, reduction)?
            }
        }
        Forward::SoftmaxMse => x.softmax_mse(&inputs[1])?,
        Forward::Dice { softmax } => {
            let d = DiceOptions::default();
            let options = DiceOptions {
                squared: settings.bool("squared")?.unwrap_or(d.squared),
                smooth: settings.f64("smooth")?.unwrap_or(d.smooth),
                include_background: settings
                    .bool("include_background")?
                    .unwrap_or(d.include_background),
            };
            if softmax {
                x.softmax_dice(&inputs[1], options)?
            } else {
                x.sigmoid_dice(&inputs[1], options)?
            }
        }
        Forward::Sharpen => {
            x.sharpen(settings.f64("temperature")?.unwrap_or(SHARPEN_TEMPERATURE))?
        }
        Forward::Entropy => x.entropy(settings.f64("eps")?.unwrap_or(ENTROPY_EPS))?,
        Forward::Ema => x.ema(&inputs[1], settings.f64("decay")?.unwrap_or(EMA_DECAY))?,
        Forward::MaxPool => x.max_pool3d(pool_window(&spec, settings)?)?,
        Forward::AvgPool => x.avg_pool3d(pool_window(&spec, settings)?)?,
        Forward::Nearest => x.upsample3d(Upsample::Nearest, upsample_scale(&spec, settings)?)?,
        Forward::Trilinear => {
            x.upsample3d(Upsample::Trilinear, upsample_scale(&spec, settings)?)?
        }
        Forward::BatchNorm => {
            let eps = settings.f64("eps")?.unwrap_or(NORM_EPS);
            x.batch_norm3d_train(&inputs[1], &inputs[2], eps)?.0
        }
        Forward::InstanceNorm => {
            let eps = settings.f64("eps")?.unwrap_or(NORM_EPS);
            x.instance_norm3d(&inputs[1], &inputs[2], eps)?
        }
        Forward::Dropout => {
            let p = settings.f64("p")?.unwrap_or(DROPOUT_P);
            let seed = whole(&spec, settings, "seed")?.unwrap_or(0);
            let step = whole(&spec, settings, "step")?.unwrap_or(0);
            let step = u32::try_from(step)
                .map_err(|_| spec.error("setting 'step' must be below 2^32".into()))?;
            x.dropout3d(p, seed, step)?
        }
        Forward::Concat => Var::concat_channels(&[x, &inputs[1]])?,
        Forward::Slice => {
            let start = whole(&spec, settings, "start")?.unwrap_or(0) as usize;
            let len = whole(&spec, settings, "len")?.ok_or_else(|| spec.missing_setting("len"))?;
            x.slice_channels(start, len as usize)?
        }
        Forward::Conv3d => x.conv3d(&inputs[1], inputs.get(2), conv_spec(&spec, settings)?)?,
        Forward::ConvTranspose3d => {
            let output_padding = triple(&spec, settings, "output_padding")?.unwrap_or([0; 3]);
            let s = conv_spec(&spec, settings)?;
            x.conv_transpose3d(&inputs[1], inputs.get(2), s, output_padding)?
        }
        Forward::MetaGradient => meta_gradient(&spec, inputs, settings)?,
        Forward::LocalContrastive => {
            let tau = settings.f64("tau")?.unwrap_or(DEFAULT_TAU);
            x.local_contrastive(&inputs[1], inputs.get(2), tau)?
        }
        Forward::DenseInfonce => {
            x.dense_infonce(&inputs[1], settings.f64("tau")?.unwrap_or(DEFAULT_TAU))?
        }
        Forward::SampleAnchors => {
            let per_class = whole(&spec, settings, "per_class")?.unwrap_or(ANCHORS_PER_CLASS);
            let seed = whole(&spec, settings, "seed")?.unwrap_or(0);
            x.sample_anchors(per_class as usize, seed)?
        }
        Forward::Edt => x.edt(spacing(&spec, settings)?)?,
        Forward::Sdf => x.sdf(spacing(&spec, settings)?)?,
        Forward::SdfProbability => {
            x.sdf_probability(settings.f64("k")?.unwrap_or(SDF_PROBABILITY_K))?
        }
        Forward::Warp { adjoint: false } => x.warp(&warp_setting(&spec, settings, x, false)?)?,
        Forward::Warp { adjoint: true } => {
            x.warp_adjoint(&warp_setting(&spec, settings, x, true)?)?
        }
    };
    Ok(y)
}

/// The meta-gradient of the study network of [`crate::meta::study`], with the op's settings.
fn meta_gradient<B: OpBackend>(
    spec: &OpSpec,
    inputs: &[Var<B>],
    settings: &Settings,
) -> Result<Var<B>> {
    let lr = settings.f64("lr")?.unwrap_or(study::LR);
    let path = settings.choice("path", &["reverse", "fast"])?;
    let path = MetaPath::parse(path.as_deref().unwrap_or("fast")).expect("a checked choice");
    study::meta_gradient(inputs, lr, path).map_err(|e| spec.error(e.to_string()))
}

/// The outputs an op writes besides `out`: the normalised weights of `meta_gradient`.
pub fn extra_outputs<B: OpBackend>(
    op: &str,
    output: &Var<B>,
    settings: &Settings,
) -> Result<Vec<(&'static str, Var<B>)>> {
    if op != "meta_gradient" {
        return Ok(Vec::new());
    }
    let norm = settings.choice("normalization", &Normalization::NAMES)?;
    let norm = Normalization::parse(norm.as_deref().unwrap_or("clip")).expect("a checked choice");
    Ok(vec![("weights", output.detach().meta_weights(norm)?)])
}

/// A sum or mean over `axes` (default: all), dropping them unless `keepdim`.
fn reduce<B: Backend>(
    x: &Var<B>,
    settings: &Settings,
    f: impl Fn(&Var<B>, &[usize], bool) -> metaseg_autograd::Result<Var<B>>,
) -> Result<Var<B>> {
    let axes = settings.usize_list("axes")?;
    let axes = axes.unwrap_or_else(|| (0..x.shape().rank()).collect());
    let keepdim = settings.bool("keepdim")?.unwrap_or(false);
    Ok(f(x, &axes, keepdim)?)
}

/// A per-axis (D, H, W) setting like `kernel=2,2,2`, if given.
fn triple(spec: &OpSpec, settings: &Settings, key: &str) -> Result<Option<[usize; 3]>> {
    match settings.usize_list(key)? {
        None => Ok(None),
        Some(v) => <[usize; 3]>::try_from(v.as_slice())
            .map(Some)
            .map_err(|_| spec.error(format!("setting '{key}' takes three values (D, H, W)"))),
    }
}

/// `kernel` (default 2,2,2) and `stride` (default: the kernel).
fn pool_window(spec: &OpSpec, settings: &Settings) -> Result<Window3d> {
    let kernel = triple(spec, settings, "kernel")?.unwrap_or([2; 3]);
    let stride = triple(spec, settings, "stride")?.unwrap_or(kernel);
    Ok(Window3d { kernel, stride })
}

/// `scale` per axis, default 2,2,2.
fn upsample_scale(spec: &OpSpec, settings: &Settings) -> Result<[usize; 3]> {
    Ok(triple(spec, settings, "scale")?.unwrap_or([2; 3]))
}

/// `stride` (default 1,1,1), `padding` (0,0,0) and `dilation` (1,1,1) of a convolution.
fn conv_spec(spec: &OpSpec, settings: &Settings) -> Result<ConvSpec> {
    let d = ConvSpec::default();
    Ok(ConvSpec {
        stride: triple(spec, settings, "stride")?.unwrap_or(d.stride),
        padding: triple(spec, settings, "padding")?.unwrap_or(d.padding),
        dilation: triple(spec, settings, "dilation")?.unwrap_or(d.dilation),
    })
}

/// The voxel size along (D, H, W), `spacing=1.5,0.8,0.8`; default 1,1,1 (voxel units).
/// Three positive finite values (the ops check the values).
fn spacing(spec: &OpSpec, settings: &Settings) -> Result<[f64; 3]> {
    match settings.f64_list("spacing")? {
        None => Ok([1.0; 3]),
        Some(v) => <[f64; 3]>::try_from(v.as_slice())
            .map_err(|_| spec.error("setting 'spacing' takes three values (D, H, W)".into())),
    }
}

/// The warp of `warp` (x is its input) or `warp_adjoint` (x is the warp's output): `matrix` the
/// 12 numbers of the 3x4 map from output voxel index to input point, row by row (default: the
/// identity); the other grid's size `output` (warp) or `input` (warp_adjoint), default x's;
/// `interp` trilinear (default) or nearest.
fn warp_setting<B: Backend>(
    spec: &OpSpec,
    settings: &Settings,
    x: &Var<B>,
    adjoint: bool,
) -> Result<Warp> {
    let dims = x.shape().dims();
    if dims.len() != 5 {
        return Err(spec.error(format!(
            "expected an [N, C, D, H, W] tensor, got shape {}",
            x.shape()
        )));
    }
    let own = [dims[2], dims[3], dims[4]];
    let other_key = if adjoint { "input" } else { "output" };
    let other = triple(spec, settings, other_key)?.unwrap_or(own);
    let mut warp = Warp::identity(own);
    if let Some(m) = settings.f64_list("matrix")? {
        let m = <[f64; 12]>::try_from(m.as_slice())
            .map_err(|_| spec.error("setting 'matrix' takes 12 numbers (3 rows of 4)".into()))?;
        for (r, row) in warp.matrix.iter_mut().enumerate() {
            row.copy_from_slice(&m[4 * r..4 * r + 4]);
        }
    }
    let interp = settings.choice("interp", &["trilinear", "nearest"])?;
    warp.interp =
        Interp::parse(interp.as_deref().unwrap_or("trilinear")).expect("a checked choice");
    if adjoint {
        (warp.input, warp.output) = (other, own);
    } else {
        (warp.input, warp.output) = (own, other);
    }
    Ok(warp)
}

/// The matrix of a warp as the runner's `matrix` setting.
pub fn matrix_setting(warp: &Warp) -> String {
    let numbers: Vec<String> = warp
        .matrix
        .iter()
        .flatten()
        .map(|v| v.to_string())
        .collect();
    format!("matrix={}", numbers.join(","))
}

/// A setting that is one non-negative integer, if given.
fn whole(spec: &OpSpec, settings: &Settings, key: &str) -> Result<Option<u64>> {
    match settings.usize_list(key)?.as_deref() {
        None => Ok(None),
        Some(&[v]) => Ok(Some(v as u64)),
        Some(_) => Err(spec.error(format!("setting '{key}' takes one integer"))),
    }
}

/// What a run produced: the output and, when a gradient of the output was given, the gradient of
/// every input (in the spec's order).
#[derive(Clone, Debug)]
pub struct RunOutput {
    pub output: (Vec<f64>, Shape),
    pub grads: Vec<(String, Vec<f64>, Shape)>,
    /// Further outputs by name (see [`extra_outputs`]).
    pub extras: Vec<(String, Vec<f64>, Shape)>,
}

/// A checked call of one op with its inputs on a backend. The forward can be run repeatedly
/// (for timing); `finish` reads back the output and the gradients of the last forward.
pub struct Call<B: Backend> {
    spec: OpSpec,
    inputs: Vec<Var<B>>,
    settings: Settings,
}

impl<B: OpBackend> Call<B> {
    /// Checks the inputs by name (each one named by the spec, once) and uploads them in the
    /// spec's order.
    pub fn new(
        backend: &B,
        op: &str,
        inputs: Vec<(String, Vec<f64>, Shape)>,
        settings: &Settings,
    ) -> Result<Self> {
        let spec = lookup(op)?;
        spec.check_settings(settings)?;
        let mut by_name = BTreeMap::new();
        for (name, values, shape) in inputs {
            if !spec.inputs.iter().any(|&n| input_name(n) == name) {
                return Err(spec.error(format!(
                    "unknown input '{name}'; its inputs are {}",
                    spec.inputs.join(", ")
                )));
            }
            if by_name.insert(name.clone(), (values, shape)).is_some() {
                return Err(spec.error(format!("input '{name}' is given twice")));
            }
        }
        let mut inputs = Vec::new();
        for (k, &name) in spec.inputs.iter().enumerate() {
            let Some((values, shape)) = by_name.remove(input_name(name)) else {
                if k >= spec.required_inputs() {
                    break;
                }
                return Err(spec.error(format!(
                    "missing input '{name}'; its inputs are {}",
                    spec.inputs.join(", ")
                )));
            };
            // Every input is a parameter, so any run can be differentiated.
            inputs.push(Var::from_f64(backend, &values, &shape, true)?);
        }
        if let Some(name) = by_name.keys().next() {
            return Err(spec.error(format!(
                "input '{name}' is given without the optional inputs before it"
            )));
        }
        Ok(Call {
            spec,
            inputs,
            settings: settings.clone(),
        })
    }

    pub fn forward(&self) -> Result<Var<B>> {
        apply_op(self.spec.name, &self.inputs, &self.settings)
    }

    /// Reads back `output` (a result of `forward`) and, given `grad_output` of the output's shape,
    /// the gradient of every input weighted by it.
    pub fn finish(
        &self,
        output: &Var<B>,
        grad_output: Option<(Vec<f64>, Shape)>,
    ) -> Result<RunOutput> {
        let grads = match grad_output {
            Some((values, shape)) => self.grads(output, &values, &shape)?,
            None => Vec::new(),
        };
        let extras = extra_outputs(self.spec.name, output, &self.settings)?
            .into_iter()
            .map(|(name, v)| Ok((name.to_string(), v.to_f64()?, v.shape().clone())))
            .collect::<Result<Vec<_>>>()?;
        Ok(RunOutput {
            output: (output.to_f64()?, output.shape().clone()),
            grads,
            extras,
        })
    }

    fn grads(
        &self,
        output: &Var<B>,
        values: &[f64],
        shape: &Shape,
    ) -> Result<Vec<(String, Vec<f64>, Shape)>> {
        if shape != output.shape() {
            return Err(self.spec.error(format!(
                "the output gradient has shape {shape} but the output has shape {}",
                output.shape()
            )));
        }
        let d_output = Var::from_f64(output.backend(), values, shape, false)?;
        let wrt: Vec<&Var<B>> = self.inputs.iter().collect();
        let grads = grad(output, &wrt, Some(&d_output), false)?;
        self.spec
            .inputs
            .iter()
            .zip(grads)
            .map(|(name, g)| Ok((input_name(name).to_string(), g.to_f64()?, g.shape().clone())))
            .collect()
    }
}

/// Runs op `op` once on `backend`: the output and, given `grad_output`, every input's gradient.
pub fn run<B: OpBackend>(
    backend: &B,
    op: &str,
    inputs: Vec<(String, Vec<f64>, Shape)>,
    settings: &Settings,
    grad_output: Option<(Vec<f64>, Shape)>,
) -> Result<RunOutput> {
    let call = Call::new(backend, op, inputs, settings)?;
    let output = call.forward()?;
    call.finish(&output, grad_output)
}

#[cfg(test)]
mod tests {
    use super::*;
    use metaseg_autograd::Cpu64;

    #[test]
    fn every_op_in_the_table_runs_with_its_default_settings() {
        // Values in (0, 1), where the ops on probabilities (sharpen, entropy) are defined.
        let x = (vec![0.1, 0.3, 0.6, 0.9], Shape::from([2, 2]));
        for &name in op_names() {
            let spec = op_spec(name).unwrap();
            let inputs = spec.inputs.iter().filter(|n| !n.ends_with('?')).map(|n| {
                layer_input(name, n)
                    .or_else(|| meta_input(name, n))
                    .or_else(|| mask_input(n))
                    .unwrap_or_else(|| (n.to_string(), x.0.clone(), x.1.clone()))
            });
            let required = match name {
                "clamp" => &["min=0", "max=1"][..],
                "slice" => &["len=1"][..],
                _ => &[],
            };
            let settings = Settings::parse(required).unwrap();
            let inputs: Vec<_> = inputs.collect();
            let probe = run(&Cpu64, name, inputs.clone(), &settings, None);
            let shape = probe.unwrap_or_else(|e| panic!("{name}: {e}")).output.1;
            let grad_output = Some((vec![1.0; shape.numel()], shape));
            let out = run(&Cpu64, name, inputs, &settings, grad_output);
            if !spec.has_gradient() {
                // A mask function or a meta-gradient: asking for a gradient is the typed error,
                // never zeros.
                let Err(Error::Autograd(metaseg_autograd::Error::NoGradient { .. })) = out else {
                    panic!("{name}: a gradient was asked of an op without one: {out:?}");
                };
                continue;
            }
            let out = out.unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(out.output.0.iter().all(|v| v.is_finite()), "{name}");
        }
    }

    /// A mask [1, 1, 3, 3, 3] whose centre and one corner are background, so every distance is
    /// finite and the SDF has inside, outside and boundary voxels.
    fn mask_input(input: &str) -> Option<(String, Vec<f64>, Shape)> {
        (input == "mask").then(|| {
            let mut m = vec![1.0; 27];
            (m[0], m[13]) = (0.0, 0.0);
            (input.to_string(), m, Shape::from([1, 1, 3, 3, 3]))
        })
    }

    /// The layer ops take [N, C, D, H, W] tensors and per-channel [C] parameters.
    fn layer_input(op: &str, input: &str) -> Option<(String, Vec<f64>, Shape)> {
        let layers = [
            "max_pool3d",
            "avg_pool3d",
            "upsample_nearest",
            "upsample_trilinear",
            "batch_norm3d",
            "instance_norm3d",
            "dropout3d",
            "concat",
            "slice",
            "conv3d",
            "conv_transpose3d",
            "warp",
            "warp_adjoint",
        ];
        if !layers.contains(&op) {
            return None;
        }
        let shape = match input {
            "gamma" | "beta" => Shape::from([2]),
            // A convolution's weight: 2 -> 2 channels, kernel 2x2x2.
            "w" => Shape::from([2, 2, 2, 2, 2]),
            _ => Shape::from([1, 2, 2, 2, 2]),
        };
        let values = (0..shape.numel()).map(|i| 0.1 + 0.05 * i as f64).collect();
        Some((input.to_string(), values, shape))
    }

    /// The meta-gradient's study network: 1 input channel, 2 hidden, 2 classes on 2x2x2 volumes.
    fn meta_input(op: &str, input: &str) -> Option<(String, Vec<f64>, Shape)> {
        if op != "meta_gradient" {
            return None;
        }
        let shape = match input {
            "x_u" | "x_m" => Shape::from([1, 1, 2, 2, 2]),
            "y_u" | "y_m" => Shape::from([1, 2, 2, 2, 2]),
            "w1" => Shape::from([2, 1, 3, 3, 3]),
            "w2" => Shape::from([2, 2, 1, 1, 1]),
            _ => Shape::from([2]),
        };
        let values = if input.starts_with('y') {
            metaseg_autograd::check::one_hot(&shape, 3, None)
        } else {
            metaseg_autograd::check::seeded(shape.numel(), 4, -1.0, 1.0)
        };
        Some((input.to_string(), values, shape))
    }

    #[test]
    fn optional_inputs_may_be_left_out_but_not_required_ones() {
        let shape = Shape::from([1, 2, 2]);
        let z = ("logits".to_string(), vec![0.0; 4], shape.clone());
        let y = ("target".to_string(), vec![1.0, 0.0, 0.0, 1.0], shape);
        let w = ("weight".to_string(), vec![2.0, 0.0], Shape::from([1, 1, 2]));
        let sum = Settings::parse(["reduction=sum"]).unwrap();
        let ce = |inputs| run(&Cpu64, "cross_entropy", inputs, &sum, None);
        // Equal logits over 2 classes cost log 2 per voxel: 2 log 2 for two voxels, and with
        // weights (2, 0) again 2 log 2.
        let plain = ce(vec![z.clone(), y.clone()]).unwrap().output.0[0];
        let weighted = ce(vec![z.clone(), y, w.clone()]).unwrap().output.0[0];
        assert!((plain - 2.0 * 2f64.ln()).abs() < 1e-12, "{plain}");
        assert!((weighted - 2.0 * 2f64.ln()).abs() < 1e-12, "{weighted}");
        let Err(err) = ce(vec![z, w]) else {
            panic!("cross_entropy without its target ran");
        };
        assert!(err.to_string().contains("missing input 'target'"), "{err}");
    }

    #[test]
    fn apply_op_checks_the_number_of_inputs() {
        let x = Var::from_f64(&Cpu64, &[1.0], &Shape::from([1]), false).unwrap();
        let Err(err) = apply_op("add", &[x], &Settings::default()) else {
            panic!("add of one input succeeded");
        };
        assert_eq!(err.to_string(), "add: takes 2 inputs (a, b), got 1");
    }
}
