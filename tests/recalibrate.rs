//! Batch-norm recalibration (`nn::recalibrate`): the running statistics it gives equal the mean
//! and unbiased variance over every element of every batch, computed here on the host in f64, on
//! Cpu64 and on the GPU; on a U-Net the GPU agrees with Cpu64; misuse is an error.

mod common;

use common::{gpu, seeded};
use metaseg::nn::layers::BatchNorm;
use metaseg::nn::recalibrate::recalibrated_stats;
use metaseg::nn::{
    Declarations, Forward, Mode, NetBackend, Network, Outputs, ParamStore, UNet, UNetConfig,
};
use metaseg_autograd::{Cpu64, Result, Shape, Tolerance, Var};

const TRAIN: Mode = Mode::Train { seed: 7, step: 0 };

/// One batch norm over the input: its running statistics are those of the input itself.
struct OneNorm {
    params: Declarations,
    stats: Declarations,
    norm: BatchNorm,
}

impl OneNorm {
    fn new(channels: usize) -> Self {
        let (mut params, mut stats) = (Declarations::default(), Declarations::default());
        let norm = BatchNorm::new(&mut params, &mut stats, "bn", channels);
        OneNorm {
            params,
            stats,
            norm,
        }
    }
}

impl Network for OneNorm {
    fn params(&self) -> &Declarations {
        &self.params
    }
    fn stats(&self) -> &Declarations {
        &self.stats
    }
    fn forward<B: NetBackend>(&self, f: &Forward<B>, x: &Var<B>) -> Result<Outputs<B>> {
        Ok(Outputs {
            logits: self.norm.apply(f, x)?,
            logits_b: None,
            sdf: None,
            embedding: None,
            batch_stats: f.batch_stats.take(),
        })
    }
}

/// Batches of 2 and 3 samples of [C = 2, 4 x 2 x 2] with channel means apart from 0.
fn host_batches() -> Vec<(Vec<f64>, Shape)> {
    [2, 3]
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let shape = Shape::from([n, 2, 4, 2, 2]);
            let x = seeded(shape.numel(), 11 + i as u64, -1.0, 3.0);
            (x, shape)
        })
        .collect()
}

/// Per channel over every batch: [means..., unbiased variances...].
fn host_statistics(batches: &[(Vec<f64>, Shape)], channels: usize) -> Vec<f64> {
    let mut per_channel = vec![Vec::new(); channels];
    for (x, shape) in batches {
        let [n, c, d, h, w] = <[usize; 5]>::try_from(shape.dims()).unwrap();
        let voxels = d * h * w;
        for s in 0..n {
            for (ch, values) in per_channel.iter_mut().enumerate().take(c) {
                let start = (s * c + ch) * voxels;
                values.extend_from_slice(&x[start..start + voxels]);
            }
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let means: Vec<f64> = per_channel.iter().map(|v| mean(v)).collect();
    let vars = per_channel
        .iter()
        .zip(&means)
        .map(|(v, m)| v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64);
    means.iter().copied().chain(vars).collect()
}

fn recalibrated<B: NetBackend>(backend: &B, net: &impl Network) -> Vec<f64> {
    let params = net.init_params(backend, 3).unwrap();
    let stats = net.init_stats(backend).unwrap();
    let xs: Vec<Var<B>> = host_batches()
        .iter()
        .map(|(x, s)| Var::from_f64(backend, x, s, false).unwrap())
        .collect();
    let out = recalibrated_stats(net, &params, &stats, &xs, TRAIN).unwrap();
    out.values()
        .iter()
        .flat_map(|v| v.to_f64().unwrap())
        .collect()
}

#[test]
fn running_statistics_are_those_of_every_batch_together() {
    let net = OneNorm::new(2);
    let expected = host_statistics(&host_batches(), 2);
    Tolerance::F64.assert("Cpu64", &recalibrated(&Cpu64, &net), &expected);
    Tolerance::F32_ACCUMULATED.assert("GPU", &recalibrated(&gpu(), &net), &expected);
}

#[test]
fn a_unets_recalibration_on_the_gpu_matches_cpu64() {
    let net = UNet::new(UNetConfig {
        in_channels: 2,
        classes: 3,
        features: vec![2, 3],
        three_d: true,
        upsample: metaseg_autograd::Upsample::Trilinear,
        dropout: None,
    })
    .unwrap();
    let (host, device) = (recalibrated(&Cpu64, &net), recalibrated(&gpu(), &net));
    let initial: Vec<f64> = net
        .init_stats(&Cpu64)
        .unwrap()
        .values()
        .iter()
        .flat_map(|v| v.to_f64().unwrap())
        .collect();
    assert!(
        host.iter().zip(&initial).all(|(a, b)| a != b),
        "every running statistic was re-estimated"
    );
    Tolerance::F32_ACCUMULATED.assert("U-Net running statistics", &device, &host);
}

#[test]
fn needs_training_mode_and_a_batch() {
    let net = OneNorm::new(2);
    let params: ParamStore<Cpu64> = net.init_params(&Cpu64, 3).unwrap();
    let stats = net.init_stats(&Cpu64).unwrap();
    let (x, s) = &host_batches()[0];
    let x = Var::from_f64(&Cpu64, x, s, false).unwrap();
    let eval = recalibrated_stats(&net, &params, &stats, &[x], Mode::Eval);
    let message = eval.expect_err("eval mode is refused").to_string();
    assert!(message.contains("training mode"), "{message}");
    let empty = recalibrated_stats(&net, &params, &stats, &[], TRAIN);
    let message = empty.expect_err("no batches is refused").to_string();
    assert!(message.contains("no batches"), "{message}");
}
