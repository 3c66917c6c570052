//! U-Net as the SSL4MIS ACDC and polyp code builds it: per level two conv-BN-LeakyReLU units at
//! widths 16/32/64/128/256, max-pool 2 between levels, and on the way up a 1x1 conv to the skip's
//! width, up-sampling by 2, concatenation with the skip, and two units; a 3x3 head. In 2D every
//! kernel, pool and up-sampling has depth 1, so a 2D network runs on [N, C, 1, H, W].

use super::layers::{dropout, Activation, Conv, ConvNormAct, Forward};
use super::params::Declarations;
use super::{check_input, NetBackend, Network, Outputs};
use metaseg_autograd::{ConvSpec, Result, Upsample, Var, Window3d};

#[derive(Clone, Debug, PartialEq)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub classes: usize,
    /// Widths of the levels, top first (16, 32, 64, 128, 256).
    pub features: Vec<usize>,
    /// 2D (depth-1 kernels, volumes [N, C, 1, H, W]) or 3D.
    pub three_d: bool,
    /// How the decoder up-samples after its 1x1 conv.
    pub upsample: Upsample,
    /// Dropout3d probability on the bottleneck, if any.
    pub dropout: Option<f64>,
}

impl Default for UNetConfig {
    fn default() -> Self {
        UNetConfig {
            in_channels: 1,
            classes: 2,
            features: vec![16, 32, 64, 128, 256],
            three_d: false,
            upsample: Upsample::Trilinear,
            dropout: Some(0.5),
        }
    }
}

pub struct UNet {
    config: UNetConfig,
    params: Declarations,
    stats: Declarations,
    /// Two units per level.
    encoder: Vec<[ConvNormAct; 2]>,
    /// From the deepest level up: the 1x1 conv to the skip's width, then two units.
    decoder: Vec<(Conv, [ConvNormAct; 2])>,
    head: Conv,
}

impl UNet {
    pub fn new(config: UNetConfig) -> Result<UNet> {
        let bad = |message: String| metaseg_autograd::Error::InvalidArgument {
            op: "unet",
            message,
        };
        if config.features.is_empty() || config.features.contains(&0) || config.classes == 0 {
            return Err(bad(format!(
                "features ({:?}) and classes ({}) must be positive",
                config.features, config.classes
            )));
        }
        let (mut params, mut stats) = (Declarations::default(), Declarations::default());
        let (kernel, spec) = Self::kernel(config.three_d);
        let point = ConvSpec::default();
        let mut pair = |params: &mut Declarations, name: String, c: [usize; 2]| {
            let mut unit = |u: usize, c: [usize; 2]| {
                ConvNormAct::new(
                    params,
                    &mut stats,
                    &format!("{name}.{u}"),
                    |d, n| Conv::new(d, n, c, kernel, spec),
                    c[1],
                    Activation::LeakyRelu,
                )
            };
            [unit(0, c), unit(1, [c[1]; 2])]
        };
        let f = &config.features;
        let encoder: Vec<_> = (0..f.len())
            .map(|l| {
                let c_in = if l == 0 { config.in_channels } else { f[l - 1] };
                pair(&mut params, format!("encoder.{l}"), [c_in, f[l]])
            })
            .collect();
        let mut decoder = Vec::new();
        for l in (0..f.len() - 1).rev() {
            let reduce = Conv::new(
                &mut params,
                &format!("decoder.{l}.reduce"),
                [f[l + 1], f[l]],
                [1; 3],
                point,
            );
            let units = pair(&mut params, format!("decoder.{l}"), [2 * f[l], f[l]]);
            decoder.push((reduce, units));
        }
        let head = Conv::new(&mut params, "head", [f[0], config.classes], kernel, spec);
        Ok(UNet {
            config,
            params,
            stats,
            encoder,
            decoder,
            head,
        })
    }

    /// The 3x3(x3) kernel and its padding.
    fn kernel(three_d: bool) -> ([usize; 3], ConvSpec) {
        let d = usize::from(three_d);
        ([1 + 2 * d, 3, 3], ConvSpec::new([1; 3], [d, 1, 1]))
    }

    /// The pooling and up-sampling factor per axis.
    fn factor(&self) -> [usize; 3] {
        [1 + usize::from(self.config.three_d), 2, 2]
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }
}

impl Network for UNet {
    fn params(&self) -> &Declarations {
        &self.params
    }

    fn stats(&self) -> &Declarations {
        &self.stats
    }

    fn forward<B: NetBackend>(&self, f: &Forward<B>, x: &Var<B>) -> Result<Outputs<B>> {
        let factor = self.factor();
        let downs = self.config.features.len() as u32 - 1;
        let multiple = factor.map(|a| a.pow(downs));
        check_input("unet", x.shape(), self.config.in_channels, multiple)?;
        let pool = Window3d {
            kernel: factor,
            stride: factor,
        };
        let mut skips = Vec::new();
        let mut h = x.clone();
        for (l, [a, b]) in self.encoder.iter().enumerate() {
            if l > 0 {
                skips.push(h.clone());
                h = h.max_pool3d(pool)?;
            }
            h = b.apply(f, &a.apply(f, &h)?)?;
        }
        if let Some(p) = self.config.dropout {
            h = dropout(f, &h, p, 0)?;
        }
        for ((reduce, [a, b]), skip) in self.decoder.iter().zip(skips.iter().rev()) {
            let up = reduce
                .apply(f, &h)?
                .upsample3d(self.config.upsample, factor)?;
            let joined = Var::concat_channels(&[skip, &up])?;
            h = b.apply(f, &a.apply(f, &joined)?)?;
        }
        Ok(Outputs {
            logits: self.head.apply(f, &h)?,
            logits_b: None,
            sdf: None,
            embedding: None,
            batch_stats: f.batch_stats.take(),
        })
    }
}
