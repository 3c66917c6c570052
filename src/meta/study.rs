//! The study network of the `meta_gradient` op (issue 5): the meta step on a network small enough
//! to check by hand and to run from the command line on `.npy` arrays.

use super::{MetaPath, MetaStep, Sgd};
use metaseg_autograd::{ConvBackend, ConvSpec, LossBackend, Reduction, Result, Rule, Var};

/// MLB-Seg's learning rate of the look-ahead, unless the op's `lr` setting says otherwise.
pub const LR: f64 = 0.1;

/// The meta-gradient of the study network f(x) = conv3d(relu(conv3d(x, w1, b1, padding 1)), w2,
/// b2): costs c = cross_entropy(f(x_u), y_u) per voxel, a plain SGD look-ahead theta' = theta -
/// lr grad sum(eps c), and L_meta = mean cross_entropy(f_theta'(x_m), y_m). `inputs` are x_u, y_u,
/// x_m, y_m, w1, b1, w2, b2. The result g = dL_meta/d eps at eps = 0 [N, 1, D, H, W] has no
/// gradient of its own.
pub fn meta_gradient<B: ConvBackend + LossBackend>(
    inputs: &[Var<B>],
    lr: f64,
    path: MetaPath,
) -> Result<Var<B>> {
    let net = |theta: &[Var<B>], x: &Var<B>| -> Result<Var<B>> {
        let same = ConvSpec::new([1; 3], [1; 3]);
        let h = x.conv3d(&theta[0], Some(&theta[1]), same)?.relu()?;
        h.conv3d(&theta[2], Some(&theta[3]), ConvSpec::default())
    };
    let [x_u, y_u, x_m, y_m] = [0, 1, 2, 3].map(|k| inputs[k].detach());
    let theta: Vec<Var<B>> = inputs[4..]
        .iter()
        .map(|t| Var::parameter(t.backend(), t.value().clone()))
        .collect();
    let costs = |t: &[Var<B>]| net(t, &x_u)?.cross_entropy(&y_u, None, Reduction::None);
    let meta_loss = |t: &[Var<B>]| net(t, &x_m)?.cross_entropy(&y_m, None, Reduction::Mean);
    let step = MetaStep {
        theta: &theta,
        buffers: None,
        sgd: Sgd {
            lr,
            momentum: 0.0,
            weight_decay: 0.0,
        },
        costs: &costs,
        other: None,
        meta_loss: &meta_loss,
    };
    let g = step.meta_gradient(path)?;
    let refs: Vec<&Var<B>> = inputs.iter().collect();
    Ok(Var::from_op(
        "meta_gradient",
        g.value().clone(),
        &refs,
        Rule::None,
    ))
}
