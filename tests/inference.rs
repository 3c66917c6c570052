//! Sliding-window inference and post-processing: window placement, agreement with a whole-volume
//! forward for a network that sees one voxel at a time, padding of small volumes, and the
//! largest connected component.

mod common;

use common::{gpu, seeded};
use metaseg::eval::inference::keep_largest_components;
use metaseg::eval::inference::{window_starts, HostVolume};
use metaseg::eval::{argmax, largest_component, predict_probabilities, SlidingWindow};
use metaseg::nn::layers::Conv;
use metaseg::nn::{Declarations, Forward, NetBackend, Network, Outputs};
use metaseg_autograd::{ConvSpec, Cpu64, Result, Shape, Tolerance, Var};

/// A 1x1x1 convolution: each output voxel depends on its own input voxel only, so any tiling of
/// the volume gives the whole-volume result.
struct Pointwise {
    params: Declarations,
    stats: Declarations,
    conv: Conv,
}

impl Pointwise {
    fn new(c_in: usize, classes: usize) -> Self {
        let mut params = Declarations::default();
        let conv = Conv::new(
            &mut params,
            "conv",
            [c_in, classes],
            [1; 3],
            ConvSpec::default(),
        );
        Pointwise {
            params,
            stats: Declarations::default(),
            conv,
        }
    }
}

impl Network for Pointwise {
    fn params(&self) -> &Declarations {
        &self.params
    }
    fn stats(&self) -> &Declarations {
        &self.stats
    }
    fn forward<B: NetBackend>(&self, f: &Forward<B>, x: &Var<B>) -> Result<Outputs<B>> {
        Ok(Outputs {
            logits: self.conv.apply(f, x)?,
            logits_b: None,
            sdf: None,
            embedding: None,
            batch_stats: Vec::new(),
        })
    }
}

#[test]
fn windows_cover_each_axis_and_end_flush() {
    assert_eq!(window_starts(10, 4, 3), [0, 3, 6]);
    assert_eq!(window_starts(8, 4, 4), [0, 4]);
    assert_eq!(window_starts(4, 4, 2), [0]);
    assert_eq!(window_starts(3, 4, 2), [0]);
}

#[test]
fn sliding_windows_agree_with_one_whole_volume_forward() {
    let g = gpu();
    let net = Pointwise::new(2, 3);
    let params = net.init_params(&Cpu64, 1).unwrap().transfer(&g).unwrap();
    let stats = net.init_stats(&g).unwrap();
    // One volume larger than the patch with overlapping windows, one smaller (zero-padded).
    for dims in [[7, 9, 5], [3, 9, 5]] {
        let n: usize = dims.iter().product();
        let data: Vec<f32> = seeded(2 * n, 4, -2.0, 2.0)
            .iter()
            .map(|&v| v as f32)
            .collect();
        let volume = HostVolume {
            data: &data,
            channels: 2,
            dims,
        };
        let window = SlidingWindow {
            patch: [4; 3],
            stride: [3, 2, 3],
        };
        let probs = predict_probabilities(&g, &net, &params, &stats, &volume, window).unwrap();
        let whole = Shape::from([1, 2, dims[0], dims[1], dims[2]]);
        let x: Vec<f64> = data.iter().map(|&v| f64::from(v)).collect();
        let x = Var::from_f64(&Cpu64, &x, &whole, false).unwrap();
        let params_cpu = net.init_params(&Cpu64, 1).unwrap();
        let stats_cpu = net.init_stats(&Cpu64).unwrap();
        let out = net
            .run(&params_cpu, &stats_cpu, &x, metaseg::nn::Mode::Eval)
            .unwrap();
        let expected = out.logits.softmax_channels().unwrap().to_f64().unwrap();
        let probs: Vec<f64> = probs.iter().map(|&p| f64::from(p)).collect();
        Tolerance::F32.assert(&format!("{dims:?}"), &probs, &expected);
    }
}

#[test]
fn argmax_picks_the_most_probable_class() {
    // Two classes over three voxels: [K, voxels].
    assert_eq!(argmax(&[0.2, 0.7, 0.5, 0.8, 0.3, 0.5], 2), [1, 0, 0]);
    assert_eq!(argmax(&[0.2, 0.7, 0.5], 1), [0, 1, 0]);
}

#[test]
fn the_largest_component_is_kept_with_diagonal_neighbours_connected() {
    let dims = [3, 4, 4];
    let mut mask = vec![false; 48];
    let at = |z: usize, y: usize, x: usize| (z * 4 + y) * 4 + x;
    // A diagonal chain of three voxels (one 26-connected component) and a pair elsewhere.
    for (z, y, x) in [(0, 0, 0), (1, 1, 1), (2, 2, 2), (0, 3, 0), (1, 3, 0)] {
        mask[at(z, y, x)] = true;
    }
    let kept = largest_component(&mask, dims);
    let expected: Vec<usize> = vec![at(0, 0, 0), at(1, 1, 1), at(2, 2, 2)];
    let got: Vec<usize> = (0..48).filter(|&i| kept[i]).collect();
    assert_eq!(got, expected);
    assert!(largest_component(&[false; 48], dims).iter().all(|&v| !v));
}

#[test]
fn each_class_keeps_its_own_largest_component() {
    let dims = [1, 3, 7];
    // Row 0: class 1 in runs of 3 and 1; row 1: class 2 in runs of 1 and 2; row 2: background
    // and a class-2 voxel diagonal to row 1's pair (so that pair becomes a component of 3).
    #[rustfmt::skip]
    let mut labels = vec![
        1, 1, 1, 0, 1, 0, 0,
        2, 0, 0, 0, 0, 2, 2,
        0, 0, 0, 0, 2, 0, 0,
    ];
    keep_largest_components(&mut labels, dims, 3);
    #[rustfmt::skip]
    let expected = vec![
        1, 1, 1, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 2, 2,
        0, 0, 0, 0, 2, 0, 0,
    ];
    assert_eq!(labels, expected);
}
