//! V-Net as the LA semi-supervised benchmarks use it (UA-MT, DTC, MC-Net, MLB-Seg): encoder levels
//! of 1, 2, 3, 3, 3 conv(3x3x3)-BN-ReLU units at widths base * 2^level, down-sampling by a k2 s2
//! conv-BN-ReLU, up-sampling by a k2 s2 transposed conv-BN-ReLU added to the encoder's output of the
//! same level, a decoder level with as many units as its encoder level, Dropout3d after the
//! bottleneck and before the head, and a 1x1x1 head. Optional heads: tanh signed distance (DTC,
//! DTML) and a 1x1 conv-BN-ReLU-1x1 conv projection for contrastive losses. Optional for IDEAL: a
//! second decoder with its own head on the same encoder (parameters `b.*`), and a 1x1 conv
//! projection of the bottleneck for dense contrastive pre-training of the encoder alone.
//!
//! In 2D (`two_d`) every kernel has depth 1: 1x3x3 convolutions and 1x2x2 stride-(1, 2, 2) down-
//! and up-sampling, so the network runs on [N, C, 1, H, W] (each slice of a deeper input alone).

use super::layers::{dropout, Activation, Conv, ConvNormAct, Forward};
use super::params::Declarations;
use super::{check_input, NetBackend, Network, Outputs, PassStats};
use metaseg_autograd::{ConvSpec, Result, Var};

#[derive(Clone, Debug, PartialEq)]
pub struct VNetConfig {
    pub in_channels: usize,
    pub classes: usize,
    /// Filters of the first level (16 in the LA recipes).
    pub base_width: usize,
    /// Resolution levels, the bottleneck included (5 in the LA recipes).
    pub levels: usize,
    /// Dropout3d probability after the bottleneck and before the head (0.5), if any.
    pub dropout: Option<f64>,
    /// A second 1x1x1 head with tanh and `classes` outputs, for signed distance maps.
    pub sdf_head: bool,
    /// A projection head with this many embedding channels.
    pub projection: Option<usize>,
    /// A second decoder and head on the same encoder (`Outputs::logits_b`).
    pub second_decoder: bool,
    /// A 1x1 conv of the bottleneck's features to this many channels ([`VNet::dense_embedding`]).
    pub encoder_projection: Option<usize>,
    /// Kernels of depth 1, pooling H and W only: a 2D network on [N, C, 1, H, W].
    pub two_d: bool,
}

impl Default for VNetConfig {
    /// The LA recipe's network for a binary task.
    fn default() -> Self {
        VNetConfig {
            in_channels: 1,
            classes: 2,
            base_width: 16,
            levels: 5,
            dropout: Some(0.5),
            sdf_head: false,
            projection: None,
            second_decoder: false,
            encoder_projection: None,
            two_d: false,
        }
    }
}

/// A decoder: per level below the bottleneck (deepest first) its up-sampling unit and conv units,
/// then the head.
struct Decoder {
    up: Vec<ConvNormAct>,
    levels: Vec<Vec<ConvNormAct>>,
    head: Conv,
}

pub struct VNet {
    config: VNetConfig,
    params: Declarations,
    stats: Declarations,
    /// Per level, its conv units (the first takes the level's input).
    encoder: Vec<Vec<ConvNormAct>>,
    /// From level l to l + 1.
    down: Vec<ConvNormAct>,
    decoder: Decoder,
    decoder_b: Option<Decoder>,
    sdf: Option<Conv>,
    projection: Option<(ConvNormAct, Conv)>,
    encoder_projection: Option<Conv>,
}

/// Conv units of level l: 1, 2, then 3.
fn units(level: usize) -> usize {
    (level + 1).min(3)
}

/// A layer's kernel shape and its stride and padding.
#[derive(Clone, Copy)]
struct Kernel {
    shape: [usize; 3],
    spec: ConvSpec,
}

/// The three kernels of a V-Net: 3x3x3 same-size convolutions, k2 s2 down- and up-sampling and
/// 1x1x1 heads; in 2D the first two have depth 1 and stride 1 along D.
#[derive(Clone, Copy)]
struct Kernels {
    cube: Kernel,
    down: Kernel,
    point: Kernel,
}

impl Kernels {
    fn new(two_d: bool) -> Kernels {
        let depth = |k: usize| if two_d { [1, k, k] } else { [k; 3] };
        Kernels {
            cube: Kernel {
                shape: depth(3),
                spec: ConvSpec::new([1; 3], depth(3).map(|k| k / 2)),
            },
            down: Kernel {
                shape: depth(2),
                spec: ConvSpec::new(depth(2), [0; 3]),
            },
            point: Kernel {
                shape: [1; 3],
                spec: ConvSpec::default(),
            },
        }
    }
}

impl VNet {
    pub fn new(config: VNetConfig) -> Result<VNet> {
        let bad = |message: String| metaseg_autograd::Error::InvalidArgument {
            op: "vnet",
            message,
        };
        if config.levels == 0 || config.base_width == 0 || config.classes == 0 {
            return Err(bad(format!(
                "levels ({}), base width ({}) and classes ({}) must be positive",
                config.levels, config.base_width, config.classes
            )));
        }
        if let Some(p) = config.dropout.filter(|p| !(0.0..1.0).contains(p)) {
            return Err(bad(format!("dropout {p} must be in [0, 1)")));
        }
        let (mut params, mut stats) = (Declarations::default(), Declarations::default());
        let width = |l: usize| config.base_width << l;
        let k = Kernels::new(config.two_d);
        let mut unit = |name: String, c: [usize; 2], kernel: Kernel, transposed: bool| {
            conv_unit(&mut params, &mut stats, &name, c, kernel, transposed)
        };
        let mut encoder = Vec::new();
        let mut down = Vec::new();
        for l in 0..config.levels {
            let input = if l == 0 { config.in_channels } else { width(l) };
            let level = (0..units(l))
                .map(|u| {
                    let c_in = if u == 0 { input } else { width(l) };
                    unit(format!("encoder.{l}.{u}"), [c_in, width(l)], k.cube, false)
                })
                .collect();
            encoder.push(level);
            if l + 1 < config.levels {
                let c = [width(l), width(l + 1)];
                down.push(unit(format!("down.{l}"), c, k.down, false));
            }
        }
        let decoder = build_decoder(&mut params, &mut stats, &config, "");
        let point = |d: &mut Declarations, name: &str, c: [usize; 2]| {
            Conv::new(d, name, c, k.point.shape, k.point.spec)
        };
        let sdf =
            (config.sdf_head).then(|| point(&mut params, "sdf_head", [width(0), config.classes]));
        let projection = config.projection.map(|e| {
            let hidden = ConvNormAct::new(
                &mut params,
                &mut stats,
                "projection.0",
                |d, n| point(d, n, [width(0), width(0)]),
                width(0),
                Activation::Relu,
            );
            let out = point(&mut params, "projection.1", [width(0), e]);
            (hidden, out)
        });
        // Declared after every tensor of the one-decoder network, so adding them leaves the
        // others' initial values as they were.
        let decoder_b = config
            .second_decoder
            .then(|| build_decoder(&mut params, &mut stats, &config, "b."));
        let bottleneck = width(config.levels - 1);
        let encoder_projection = (config.encoder_projection)
            .map(|e| point(&mut params, "encoder_projection", [bottleneck, e]));
        Ok(VNet {
            config,
            params,
            stats,
            encoder,
            down,
            decoder,
            decoder_b,
            sdf,
            projection,
            encoder_projection,
        })
    }

    pub fn config(&self) -> &VNetConfig {
        &self.config
    }

    /// The factor each patch axis (D, H, W) must divide by: the down-sampling of the levels.
    pub fn patch_multiple(&self) -> [usize; 3] {
        let m = 1 << (self.config.levels - 1);
        [if self.config.two_d { 1 } else { m }, m, m]
    }
}

/// A conv-BN-ReLU unit from c[0] to c[1] channels, transposed or not.
fn conv_unit(
    params: &mut Declarations,
    stats: &mut Declarations,
    name: &str,
    c: [usize; 2],
    kernel: Kernel,
    transposed: bool,
) -> ConvNormAct {
    let conv = move |d: &mut Declarations, n: &str| {
        if transposed {
            Conv::transposed(d, n, c, kernel.shape, kernel.spec)
        } else {
            Conv::new(d, n, c, kernel.shape, kernel.spec)
        }
    };
    ConvNormAct::new(params, stats, name, conv, c[1], Activation::Relu)
}

/// A decoder and its head, their tensors named with `prefix`.
fn build_decoder(
    params: &mut Declarations,
    stats: &mut Declarations,
    config: &VNetConfig,
    prefix: &str,
) -> Decoder {
    let width = |l: usize| config.base_width << l;
    let k = Kernels::new(config.two_d);
    let mut up = Vec::new();
    let mut levels = Vec::new();
    for l in (0..config.levels - 1).rev() {
        let name = format!("{prefix}up.{l}");
        let c = [width(l + 1), width(l)];
        up.push(conv_unit(params, stats, &name, c, k.down, true));
        levels.push(
            (0..units(l))
                .map(|u| {
                    let name = format!("{prefix}decoder.{l}.{u}");
                    conv_unit(params, stats, &name, [width(l); 2], k.cube, false)
                })
                .collect(),
        );
    }
    let name = format!("{prefix}head");
    let c = [width(0), config.classes];
    let head = Conv::new(params, &name, c, k.point.shape, k.point.spec);
    Decoder { up, levels, head }
}

fn chain<B: NetBackend>(f: &Forward<B>, units: &[ConvNormAct], x: Var<B>) -> Result<Var<B>> {
    units.iter().try_fold(x, |x, u| u.apply(f, &x))
}

impl Network for VNet {
    fn params(&self) -> &Declarations {
        &self.params
    }

    fn stats(&self) -> &Declarations {
        &self.stats
    }

    fn forward<B: NetBackend>(&self, f: &Forward<B>, x: &Var<B>) -> Result<Outputs<B>> {
        let (mut h, skips) = self.encode(f, x)?;
        if let Some(p) = self.config.dropout {
            h = dropout(f, &h, p, 0)?;
        }
        let features = self.decode(f, &self.decoder, h.clone(), &skips, 1)?;
        let logits = self.decoder.head.apply(f, &features)?;
        let logits_b = match &self.decoder_b {
            Some(d) => Some(d.head.apply(f, &self.decode(f, d, h, &skips, 2)?)?),
            None => None,
        };
        let sdf = match &self.sdf {
            Some(c) => Some(c.apply(f, &features)?.tanh()?),
            None => None,
        };
        let embedding = match &self.projection {
            Some((hidden, out)) => Some(out.apply(f, &hidden.apply(f, &features)?)?),
            None => None,
        };
        Ok(Outputs {
            logits,
            logits_b,
            sdf,
            embedding,
            batch_stats: f.batch_stats.take(),
        })
    }
}

impl VNet {
    /// The encoder: the bottleneck's features and the skip connections (level 0 first).
    fn encode<B: NetBackend>(&self, f: &Forward<B>, x: &Var<B>) -> Result<(Var<B>, Vec<Var<B>>)> {
        let m = self.patch_multiple();
        check_input("vnet", x.shape(), self.config.in_channels, m)?;
        let levels = self.config.levels;
        let mut skips = Vec::with_capacity(levels);
        let mut h = x.clone();
        for l in 0..levels {
            h = chain(f, &self.encoder[l], h)?;
            if l + 1 < levels {
                skips.push(h.clone());
                h = self.down[l].apply(f, &h)?;
            }
        }
        Ok((h, skips))
    }

    /// A decoder's last features (before its head) from the bottleneck `h`, with the dropout
    /// before the head as layer `dropout_layer`.
    fn decode<B: NetBackend>(
        &self,
        f: &Forward<B>,
        decoder: &Decoder,
        mut h: Var<B>,
        skips: &[Var<B>],
        dropout_layer: u64,
    ) -> Result<Var<B>> {
        for (i, skip) in skips.iter().rev().enumerate() {
            h = decoder.up[i].apply(f, &h)?.add(skip)?;
            h = chain(f, &decoder.levels[i], h)?;
        }
        match self.config.dropout {
            Some(p) => dropout(f, &h, p, dropout_layer),
            None => Ok(h),
        }
    }

    /// The encoder alone and its bottleneck projection: dense embeddings [N, E, patch / 2^(L-1)]
    /// (not normalised) for dense contrastive pre-training, with the batch statistics of a
    /// training pass. Needs `encoder_projection`.
    pub fn dense_embedding<B: NetBackend>(
        &self,
        f: &Forward<B>,
        x: &Var<B>,
    ) -> Result<(Var<B>, PassStats<B>)> {
        let projection = self.encoder_projection.as_ref().ok_or_else(|| {
            metaseg_autograd::Error::InvalidArgument {
                op: "vnet",
                message: "dense_embedding needs a network with encoder_projection".into(),
            }
        })?;
        let (h, _) = self.encode(f, x)?;
        let embedding = projection.apply(f, &h)?;
        Ok((embedding, f.batch_stats.take()))
    }
}
