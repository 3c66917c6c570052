//! A valid call of every op of the runner's table: inputs (by name, in the spec's order) and the
//! settings it needs, small enough for any test to run every op on both backends.

use metaseg::runner::{input_name, op_spec};
use metaseg_autograd::check::{one_hot, seeded, seeded_mask};
use metaseg_autograd::Shape;

pub type Input = (String, Vec<f64>, Shape);

/// [N, C, D, H, W] = [2, 2, 2, 3, 3]: two images (the contrastive ops pair them), two classes.
pub fn image_shape() -> Shape {
    Shape::from([2, 2, 2, 3, 3])
}

/// The settings `op` requires (the others keep their defaults).
pub fn example_settings(op: &str) -> Vec<&'static str> {
    match op {
        "clamp" => vec!["min=0.2", "max=0.8"],
        "slice" => vec!["len=1"],
        _ => Vec::new(),
    }
}

/// Every input of `op`, optional ones included, with seeded values where the op is defined
/// (probabilities in (0, 1), one-hot labels, masks with both values).
pub fn example_inputs(op: &str) -> Vec<Input> {
    let spec = op_spec(op).unwrap_or_else(|| panic!("no op {op}"));
    spec.inputs
        .iter()
        .enumerate()
        .map(|(k, name)| {
            let name = input_name(name);
            let (values, shape) = example_input(op, name, 10 + k as u64);
            (name.to_string(), values, shape)
        })
        .collect()
}

fn example_input(op: &str, name: &str, seed: u64) -> (Vec<f64>, Shape) {
    let image = image_shape();
    let per_voxel = Shape::from([2, 1, 2, 3, 3]);
    let shape = match (op, name) {
        ("matmul", "a") => Shape::from([3, 4]),
        ("matmul", "b") => Shape::from([4, 2]),
        (_, "gamma" | "beta" | "b") => Shape::from([2]),
        ("conv3d" | "conv_transpose3d", "w") => Shape::from([2, 2, 2, 2, 2]),
        (_, "weight" | "anchors" | "mask") => per_voxel.clone(),
        ("meta_gradient", _) => return meta_input(name, seed),
        _ => image.clone(),
    };
    let values = match (op, name) {
        (_, "target" | "labels") => one_hot(&shape, seed, None),
        (_, "mask" | "anchors") => seeded_mask(&shape, seed, 0.6),
        // sigmoid(-1500 x) stays well inside f32's range (it underflows to 0 from |x| ~ 0.07).
        ("sdf_probability", _) => seeded(shape.numel(), seed, -0.01, 0.01),
        _ => seeded(shape.numel(), seed, 0.1, 0.9),
    };
    (values, shape)
}

/// The meta-gradient's study network: 1 input channel, 2 hidden, 2 classes on 2x2x2 volumes.
fn meta_input(name: &str, seed: u64) -> (Vec<f64>, Shape) {
    let shape = match name {
        "x_u" | "x_m" => Shape::from([1, 1, 2, 2, 2]),
        "y_u" | "y_m" => Shape::from([1, 2, 2, 2, 2]),
        "w1" => Shape::from([2, 1, 3, 3, 3]),
        "w2" => Shape::from([2, 2, 1, 1, 1]),
        _ => Shape::from([2]),
    };
    let values = if name.starts_with('y') {
        one_hot(&shape, seed, None)
    } else {
        seeded(shape.numel(), seed, -1.0, 1.0)
    };
    (values, shape)
}
