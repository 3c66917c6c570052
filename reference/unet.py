"""metaseg's U-Net (src/nn/unet.rs) in 2D with two levels and batch norm, dropout off, in JAX.

The architecture is the specification being matched, written here from its description:
  level 0: two units of conv 3x3 (pad 1, bias) - batch norm - LeakyReLU(0.01), 1 -> f0 -> f0;
  level 1: max-pool 2x2, two units f0 -> f1 -> f1;
  decoder: conv 1x1 f1 -> f0 (bias), bilinear up-sampling by 2 (align_corners = False, the
  source index clamped at both ends, as PyTorch), concatenation [skip, up], two units 2 f0 -> f0
  -> f0; head: conv 3x3 f0 -> classes (bias).
Tensors are [N, C, H, W] here; metaseg's [N, C, 1, H, W] and its [out, in, 1, k, k] kernels map
onto them by dropping the depth axis. Batch norm in training mode normalises with the batch's
mean and biased variance (eps 1e-5) and reports (mean, biased variance, count) for the running
statistics, which follow PyTorch's rule: r <- 0.9 r + 0.1 b, the variance unbiased.
"""

import jax
import jax.numpy as jnp
import numpy as np

BN_EPS = 1e-5
BN_MOMENTUM = 0.1
LEAKY_SLOPE = 0.01
UNITS = ["encoder.0.0", "encoder.0.1", "encoder.1.0", "encoder.1.1", "decoder.0.0", "decoder.0.1"]


def declarations(f0, classes=2, in_channels=1):
    """(name, shape) of the parameters and of the running statistics, in metaseg's store order."""
    f1 = 2 * f0
    params, stats = [], []

    def unit(name, c_in, c_out):
        params.extend([
            (f"{name}.conv.weight", (c_out, c_in, 1, 3, 3)),
            (f"{name}.conv.bias", (c_out,)),
            (f"{name}.bn.weight", (c_out,)),
            (f"{name}.bn.bias", (c_out,)),
        ])
        stats.extend([(f"{name}.bn.running_mean", (c_out,)), (f"{name}.bn.running_var", (c_out,))])

    unit("encoder.0.0", in_channels, f0)
    unit("encoder.0.1", f0, f0)
    unit("encoder.1.0", f0, f1)
    unit("encoder.1.1", f1, f1)
    params.extend([("decoder.0.reduce.weight", (f0, f1, 1, 1, 1)), ("decoder.0.reduce.bias", (f0,))])
    unit("decoder.0.0", 2 * f0, f0)
    unit("decoder.0.1", f0, f0)
    params.extend([("head.weight", (classes, f0, 1, 3, 3)), ("head.bias", (classes,))])
    return params, stats


def conv(x, w, b):
    """Cross-correlation (PyTorch's conv) with 'same' padding, w [out, in, 1, k, k]."""
    k = w.shape[-1]
    y = jax.lax.conv_general_dilated(
        x, w[:, :, 0], window_strides=(1, 1), padding=[(k // 2, k // 2)] * 2,
        dimension_numbers=("NCHW", "OIHW", "NCHW"), precision=jax.lax.Precision.HIGHEST)
    return y + b[None, :, None, None]


def batch_norm_train(x, gamma, beta):
    mean = x.mean(axis=(0, 2, 3))
    var = ((x - mean[None, :, None, None]) ** 2).mean(axis=(0, 2, 3))
    y = (x - mean[None, :, None, None]) / jnp.sqrt(var[None, :, None, None] + BN_EPS)
    count = x.shape[0] * x.shape[2] * x.shape[3]
    return y * gamma[None, :, None, None] + beta[None, :, None, None], (mean, var, count)


def leaky_relu(x):
    return jnp.where(x > 0, x, LEAKY_SLOPE * x)


def max_pool2(x):
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def upsample_matrix(n):
    """[2n, n]: bilinear doubling with align_corners = False, source clamped to [0, n - 1]."""
    u = np.zeros((2 * n, n))
    for o in range(2 * n):
        src = max((o + 0.5) / 2.0 - 0.5, 0.0)
        i0 = int(np.floor(src))
        lam = src - i0
        i1 = min(i0 + 1, n - 1)
        u[o, i0] += 1.0 - lam
        u[o, i1] += lam
    return u


def upsample2(x):
    uh, uw = upsample_matrix(x.shape[2]), upsample_matrix(x.shape[3])
    return jnp.einsum("ah,nchw,bw->ncab", uh, x, uw)


def forward(params, names, x):
    """Logits [N, classes, H, W] and the batch statistics of every batch norm, in store order."""
    p = dict(zip(names, params))
    stats = []

    def unit(name, h):
        h = conv(h, p[f"{name}.conv.weight"], p[f"{name}.conv.bias"])
        h, s = batch_norm_train(h, p[f"{name}.bn.weight"], p[f"{name}.bn.bias"])
        stats.append(s)
        return leaky_relu(h)

    h = unit("encoder.0.1", unit("encoder.0.0", x))
    skip = h
    h = unit("encoder.1.1", unit("encoder.1.0", max_pool2(h)))
    up = upsample2(conv(h, p["decoder.0.reduce.weight"], p["decoder.0.reduce.bias"]))
    h = jnp.concatenate([skip, up], axis=1)
    h = unit("decoder.0.1", unit("decoder.0.0", h))
    return conv(h, p["head.weight"], p["head.bias"]), stats


def updated_running(running, batch_stats):
    """Running statistics [mean_0, var_0, mean_1, ...] after one training pass."""
    out = []
    for u, (mean, var, count) in enumerate(batch_stats):
        r_mean, r_var = running[2 * u], running[2 * u + 1]
        out.append((1 - BN_MOMENTUM) * r_mean + BN_MOMENTUM * mean)
        out.append((1 - BN_MOMENTUM) * r_var + BN_MOMENTUM * var * count / (count - 1))
    return out
