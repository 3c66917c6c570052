//! V-Net as the LA semi-supervised benchmarks use it (UA-MT, DTC, MC-Net, MLB-Seg): encoder levels
//! of 1, 2, 3, 3, 3 conv(3x3x3)-BN-ReLU units at widths base * 2^level, down-sampling by a k2 s2
//! conv-BN-ReLU, up-sampling by a k2 s2 transposed conv-BN-ReLU added to the encoder's output of the
//! same level, a decoder level with as many units as its encoder level, Dropout3d after the
//! bottleneck and before the head, and a 1x1x1 head. Optional heads: tanh signed distance (DTC,
//! DTML) and a 1x1 conv-BN-ReLU-1x1 conv projection for contrastive losses.

use super::layers::{dropout, Activation, Conv, ConvNormAct, Forward};
use super::params::Declarations;
use super::{check_input, NetBackend, Network, Outputs};
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
        }
    }
}

pub struct VNet {
    config: VNetConfig,
    params: Declarations,
    stats: Declarations,
    /// Per level, its conv units (the first takes the level's input).
    encoder: Vec<Vec<ConvNormAct>>,
    /// From level l to l + 1.
    down: Vec<ConvNormAct>,
    /// From level l + 1 to l.
    up: Vec<ConvNormAct>,
    /// Per level below the bottleneck, its conv units.
    decoder: Vec<Vec<ConvNormAct>>,
    head: Conv,
    sdf: Option<Conv>,
    projection: Option<(ConvNormAct, Conv)>,
}

/// Conv units of level l: 1, 2, then 3.
fn units(level: usize) -> usize {
    (level + 1).min(3)
}

const CUBE3: ConvSpec = ConvSpec {
    stride: [1; 3],
    padding: [1; 3],
    dilation: [1; 3],
};
const DOWN2: ConvSpec = ConvSpec {
    stride: [2; 3],
    padding: [0; 3],
    dilation: [1; 3],
};
const POINT: ConvSpec = ConvSpec {
    stride: [1; 3],
    padding: [0; 3],
    dilation: [1; 3],
};

impl VNet {
    pub fn new(config: VNetConfig) -> Result<VNet> {
        let bad = |message: String| metaseg_autograd::Error::InvalidArgument {
            op: "vnet",
            message,
        };
        if config.levels == 0 || config.base_width == 0 || config.classes == 0 {
            return Err(bad(format!(
                "levels, base width and classes must be positive: {config:?}"
            )));
        }
        if let Some(p) = config.dropout.filter(|p| !(0.0..1.0).contains(p)) {
            return Err(bad(format!("dropout {p} must be in [0, 1)")));
        }
        let (mut params, mut stats) = (Declarations::default(), Declarations::default());
        let width = |l: usize| config.base_width << l;
        let relu = Activation::Relu;
        let mut unit = |name: String, c: [usize; 2], k: usize, spec: ConvSpec, transposed: bool| {
            let conv = move |d: &mut Declarations, n: &str| {
                if transposed {
                    Conv::transposed(d, n, c, [k; 3], spec)
                } else {
                    Conv::new(d, n, c, [k; 3], spec)
                }
            };
            ConvNormAct::new(&mut params, &mut stats, &name, conv, c[1], relu)
        };
        let mut encoder = Vec::new();
        let mut down = Vec::new();
        for l in 0..config.levels {
            let input = if l == 0 { config.in_channels } else { width(l) };
            let level = (0..units(l))
                .map(|u| {
                    let c_in = if u == 0 { input } else { width(l) };
                    unit(
                        format!("encoder.{l}.{u}"),
                        [c_in, width(l)],
                        3,
                        CUBE3,
                        false,
                    )
                })
                .collect();
            encoder.push(level);
            if l + 1 < config.levels {
                down.push(unit(
                    format!("down.{l}"),
                    [width(l), width(l + 1)],
                    2,
                    DOWN2,
                    false,
                ));
            }
        }
        let mut up = Vec::new();
        let mut decoder = Vec::new();
        for l in (0..config.levels - 1).rev() {
            up.push(unit(
                format!("up.{l}"),
                [width(l + 1), width(l)],
                2,
                DOWN2,
                true,
            ));
            decoder.push(
                (0..units(l))
                    .map(|u| unit(format!("decoder.{l}.{u}"), [width(l); 2], 3, CUBE3, false))
                    .collect(),
            );
        }
        // Index order in `up` and `decoder`: from the deepest level up.
        let head = Conv::new(
            &mut params,
            "head",
            [width(0), config.classes],
            [1; 3],
            POINT,
        );
        let sdf = config.sdf_head.then(|| {
            Conv::new(
                &mut params,
                "sdf_head",
                [width(0), config.classes],
                [1; 3],
                POINT,
            )
        });
        let projection = config.projection.map(|e| {
            let hidden = ConvNormAct::new(
                &mut params,
                &mut stats,
                "projection.0",
                |d, n| Conv::new(d, n, [width(0), width(0)], [1; 3], POINT),
                width(0),
                relu,
            );
            let out = Conv::new(&mut params, "projection.1", [width(0), e], [1; 3], POINT);
            (hidden, out)
        });
        Ok(VNet {
            config,
            params,
            stats,
            encoder,
            down,
            up,
            decoder,
            head,
            sdf,
            projection,
        })
    }

    pub fn config(&self) -> &VNetConfig {
        &self.config
    }

    /// The factor every patch axis must divide by.
    pub fn patch_multiple(&self) -> usize {
        1 << (self.config.levels - 1)
    }
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
        let m = self.patch_multiple();
        check_input("vnet", x.shape(), self.config.in_channels, [m; 3])?;
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
        if let Some(p) = self.config.dropout {
            h = dropout(f, &h, p, 0)?;
        }
        for (i, skip) in skips.iter().rev().enumerate() {
            h = self.up[i].apply(f, &h)?.add(skip)?;
            h = chain(f, &self.decoder[i], h)?;
        }
        if let Some(p) = self.config.dropout {
            h = dropout(f, &h, p, 1)?;
        }
        let logits = self.head.apply(f, &h)?;
        let sdf = match &self.sdf {
            Some(c) => Some(c.apply(f, &h)?.tanh()?),
            None => None,
        };
        let embedding = match &self.projection {
            Some((hidden, out)) => Some(out.apply(f, &hidden.apply(f, &h)?)?),
            None => None,
        };
        Ok(Outputs {
            logits,
            sdf,
            embedding,
            batch_stats: f.batch_stats.take(),
        })
    }
}
