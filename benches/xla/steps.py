"""The comparator of benches/training_step.rs: the same whole steps with JAX, jit-compiled by XLA
for the CPU, timed after a warm-up with the result waited for.

- a V-Net training step: forward in training mode (batch statistics, Dropout3d), loss
  0.5 (mean cross-entropy + softmax Dice), backward, SGD with momentum 0.9 and weight decay 1e-4
  (PyTorch's, the momentum buffers carried from step to step);
- MLB-Seg's meta step: the exact meta-gradient dL_meta(theta'(eps))/d eps at eps = 0 of a look-ahead
  SGD step on the per-voxel costs (mean CE on the meta batch at theta'), by reverse over reverse
  (jax.grad through jax.grad) and by the forward-mode path the Rust code calls fast
  (-lr <grad L_meta(theta'), grad c_i(theta)> as one jvp of the costs).

The network is src/nn/vnet.rs: encoder levels of 1, 2, 3, 3, 3 conv(3x3x3)-BN-ReLU units at widths
base * 2^level, k2 s2 conv-BN-ReLU down, k2 s2 transposed conv-BN-ReLU up added to the encoder's
output, decoder levels as deep as the encoder's, Dropout3d(0.5) after the bottleneck and before the
1x1x1 head; 1 input channel, 2 classes, batch 2. The default preset's 2D network (two_d) has kernels
of depth 1 (1x3x3 convolutions, 1x2x2 stride-(1, 2, 2) down and up) and no dropout, on 4 images of
64 x 64 (the row "width 8, 4 levels, 4 x 64^2").

    pip install -r benches/xla/requirements.txt
    python3 benches/xla/steps.py --out target/xla-steps.json [--small | --no-la | --default]

`cargo bench --bench training_step -- xla` runs this first and prints both sides and their ratio.
"""

import argparse
import json
import platform
import time
from datetime import datetime, timezone

import jax
import jax.numpy as jnp
from jax import lax

STEPS = 3
# The activations' layout: NCDHW as metaseg's by default; --layout ndhwc for channels-last, which
# XLA may prefer on some CPUs (on this 2-core machine under load, the width 8, 3 level step was not
# faster with it: 5.1-7.6 s against 2.7-5.8 s, one run). The weights keep PyTorch's OIDHW; XLA lays
# them out as it likes at compile time.
LAYOUTS = {
    "ndhwc": ("NDHWC", "OIDHW", "NDHWC"),
    "ncdhw": ("NCDHW", "OIDHW", "NCDHW"),
}
DIMS = LAYOUTS["ncdhw"]


def channels_last():
    return DIMS[0] == "NDHWC"


def channel_axis():
    return -1 if channels_last() else 1


def spatial_axes():
    """The batch's and the spatial axes: what a channel's statistics sum over."""
    return (0, 1, 2, 3) if channels_last() else (0, 2, 3, 4)


def per_channel(v):
    """A [C] vector broadcast along the channel axis of a 5-D activation."""
    return v[None, None, None, None, :] if channels_last() else v[None, :, None, None, None]


def units(level):
    return min(level + 1, 3)


def kernel(k, two_d):
    """The kernel's (kd, kh, kw): depth 1 in 2D."""
    return (1 if two_d else k, k, k)


def conv_params(key, c_in, c_out, k, transposed=False):
    """Kaiming-normal weight ([c_out, c_in, kd, kh, kw], or [c_in, c_out, ...] transposed), zero
    bias; k is the kernel's (kd, kh, kw)."""
    shape = (c_in, c_out) if transposed else (c_out, c_in)
    fan_in = shape[1] * k[0] * k[1] * k[2]
    w = jax.random.normal(key, shape + k, jnp.float32) * (2.0 / fan_in) ** 0.5
    return {"w": w, "b": jnp.zeros((c_out,), jnp.float32)}


def unit_params(key, c_in, c_out, k, transposed=False):
    p = conv_params(key, c_in, c_out, k, transposed)
    p["gamma"] = jnp.ones((c_out,), jnp.float32)
    p["beta"] = jnp.zeros((c_out,), jnp.float32)
    return p


def vnet_params(key, width, levels, two_d=False, in_channels=1, classes=2):
    keys = iter(jax.random.split(key, 64))
    w = lambda l: width << l
    k3, k2 = kernel(3, two_d), kernel(2, two_d)
    p = {"encoder": [], "down": [], "up": [], "decoder": []}
    for l in range(levels):
        c0 = in_channels if l == 0 else w(l)
        p["encoder"].append(
            [unit_params(next(keys), c0 if u == 0 else w(l), w(l), k3) for u in range(units(l))]
        )
        if l + 1 < levels:
            p["down"].append(unit_params(next(keys), w(l), w(l + 1), k2))
    for l in reversed(range(levels - 1)):
        p["up"].append(unit_params(next(keys), w(l + 1), w(l), k2, transposed=True))
        p["decoder"].append([unit_params(next(keys), w(l), w(l), k3) for _ in range(units(l))])
    p["head"] = conv_params(next(keys), w(0), classes, (1, 1, 1))
    return p


def along(p, stride, padding):
    """Per spatial axis the stride and padding: 1 and 0 along an axis the kernel has size 1 on
    (the depth of a 2D network's kernels)."""
    ks = p["w"].shape[2:]
    strides = tuple(stride if k > 1 else 1 for k in ks)
    return strides, [(padding, padding) if k > 1 else (0, 0) for k in ks]


def conv(x, p, stride, padding):
    strides, pads = along(p, stride, padding)
    y = lax.conv_general_dilated(x, p["w"], strides, pads, dimension_numbers=DIMS)
    return y + per_channel(p["b"])


def conv_transpose(x, p):
    # PyTorch's ConvTranspose3d(k 2, s 2) with weight [c_in, c_out, kd, kh, kw]: the gradient of
    # the convolution whose (OIDHW) weight that is.
    strides, _ = along(p, 2, 0)
    y = lax.conv_transpose(
        x, p["w"], strides, "VALID", dimension_numbers=DIMS, transpose_kernel=True
    )
    return y + per_channel(p["b"])


def batch_norm_relu(x, p, eps=1e-5):
    mean = x.mean(axis=spatial_axes(), keepdims=True)
    var = ((x - mean) ** 2).mean(axis=spatial_axes(), keepdims=True)
    y = (x - mean) * lax.rsqrt(var + eps) * per_channel(p["gamma"]) + per_channel(p["beta"])
    return jax.nn.relu(y)


def dropout3d(x, key, p):
    if p == 0.0:
        return x
    c = x.shape[channel_axis()]
    shape = (x.shape[0], 1, 1, 1, c) if channels_last() else (x.shape[0], c, 1, 1, 1)
    keep = jax.random.bernoulli(key, 1.0 - p, shape)
    return jnp.where(keep, x / (1.0 - p), 0.0)


def vnet(params, x, key):
    """The logits of a training-mode forward; no dropout in 2D (depth-1 kernels)."""
    rate = 0.0 if params["down"][0]["w"].shape[2] == 1 else 0.5
    levels = len(params["encoder"])
    k0, k1 = jax.random.split(key)
    skips = []
    h = x
    for l in range(levels):
        for u in params["encoder"][l]:
            h = batch_norm_relu(conv(h, u, 1, 1), u)
        if l + 1 < levels:
            skips.append(h)
            d = params["down"][l]
            h = batch_norm_relu(conv(h, d, 2, 0), d)
    h = dropout3d(h, k0, rate)
    for i, skip in enumerate(reversed(skips)):
        up = params["up"][i]
        h = batch_norm_relu(conv_transpose(h, up), up) + skip
        for u in params["decoder"][i]:
            h = batch_norm_relu(conv(h, u, 1, 1), u)
    h = dropout3d(h, k1, rate)
    return conv(h, params["head"], 1, 0)


def cross_entropy(logits, y):
    """Per voxel, [N, D, H, W]."""
    return -(y * jax.nn.log_softmax(logits, axis=channel_axis())).sum(axis=channel_axis())


def softmax_dice(logits, y, smooth=1e-5):
    """1 - mean over classes of the Dice of softmax(logits), sums over the batch, squared."""
    p = jax.nn.softmax(logits, axis=channel_axis())
    axes = spatial_axes()
    inter = (p * y).sum(axes)
    denominator = (p * p).sum(axes) + (y * y).sum(axes)
    return 1.0 - ((2.0 * inter + smooth) / (denominator + smooth)).mean()


def sgd(params, grads, lr, weight_decay, buffers=None, momentum=0.9):
    """PyTorch's SGD: d = g + wd theta, buf = momentum buf + d (d on the first step),
    theta - lr buf."""
    d = jax.tree.map(lambda g, t: g + weight_decay * t, grads, params)
    if buffers is not None:
        d = jax.tree.map(lambda b, g: momentum * b + g, buffers, d)
    return jax.tree.map(lambda t, b: t - lr * b, params, d), d


def training_step(params, buffers, x, y, key):
    def loss_fn(t):
        logits = vnet(t, x, key)
        return 0.5 * (cross_entropy(logits, y).mean() + softmax_dice(logits, y))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    new, buffers = sgd(params, grads, 0.01, 1e-4, buffers)
    return loss, new, buffers


def meta_losses(x_u, y_u, x_m, y_m, key):
    costs = lambda t: cross_entropy(vnet(t, x_u, key), y_u)
    meta_loss = lambda t: cross_entropy(vnet(t, x_m, key), y_m).mean()
    return costs, meta_loss


LR, DECAY = 0.01, 5e-4


def meta_reverse(params, x_u, y_u, x_m, y_m, key):
    costs, meta_loss = meta_losses(x_u, y_u, x_m, y_m, key)

    def objective(eps):
        g = jax.grad(lambda t: (eps * costs(t)).sum())(params)
        return meta_loss(sgd(params, g, LR, DECAY)[0])

    voxels = tuple(d for axis, d in enumerate(x_u.shape) if axis != channel_axis() % 5)
    return jax.grad(objective)(jnp.zeros(voxels, jnp.float32))


def meta_fast(params, x_u, y_u, x_m, y_m, key):
    costs, meta_loss = meta_losses(x_u, y_u, x_m, y_m, key)
    # At eps = 0 the look-ahead step moves theta by its weight decay only.
    zero = jax.tree.map(jnp.zeros_like, params)
    v = jax.grad(meta_loss)(sgd(params, zero, LR, DECAY)[0])
    _, jv = jax.jvp(costs, (params,), (v,))
    return -LR * jv


def batch(key, config):
    kx, ky = jax.random.split(key)
    spatial = config.spatial()
    x = jax.random.uniform(kx, (config.batch,) + spatial + (1,), jnp.float32, -1.0, 1.0)
    labels = jax.random.randint(ky, (config.batch,) + spatial, 0, 2)
    y = jax.nn.one_hot(labels, 2, dtype=jnp.float32)
    if not channels_last():
        x, y = jnp.moveaxis(x, -1, 1), jnp.moveaxis(y, -1, 1)
    return x, y


def timed(step, *args):
    """Seconds per call over STEPS calls after a warm-up (compilation) call."""
    jax.block_until_ready(step(*args))
    runs = []
    for _ in range(STEPS):
        start = time.perf_counter()
        jax.block_until_ready(step(*args))
        runs.append(time.perf_counter() - start)
    return runs


def timed_training(params, x, y, key):
    """training_step's seconds per call, each step on the last one's parameters and buffers."""
    step = jax.jit(training_step)
    zero = jax.tree.map(jnp.zeros_like, params)
    _, params, buffers = jax.block_until_ready(step(params, zero, x, y, key))
    runs = []
    for _ in range(STEPS):
        start = time.perf_counter()
        _, params, buffers = jax.block_until_ready(step(params, buffers, x, y, key))
        runs.append(time.perf_counter() - start)
    return runs


class Config:
    """A V-Net of width and levels on batch patches: cubes of `side`, or 2D images of side^2."""

    def __init__(self, width, levels, side, two_d=False, batch=2):
        self.width, self.levels, self.side = width, levels, side
        self.two_d, self.batch = two_d, batch

    def spatial(self):
        return (1, self.side, self.side) if self.two_d else (self.side,) * 3

    def params(self):
        return vnet_params(jax.random.PRNGKey(7), self.width, self.levels, self.two_d)

    def key(self, kind):
        """The row's name, as benches/training_step.rs writes it."""
        size = f"{self.side}^2" if self.two_d else f"{self.side}^3"
        return f"{kind}, width {self.width}, {self.levels} levels, {self.batch} x {size}"


DEFAULT_2D = Config(8, 4, 64, two_d=True, batch=4)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the JSON results file to write")
    parser.add_argument("--small", action="store_true", help="only the smallest configuration")
    parser.add_argument("--no-la", action="store_true", help="skip the LA-size network")
    parser.add_argument(
        "--default", action="store_true", help="only the default preset's 2D network"
    )
    parser.add_argument(
        "--layout", choices=sorted(LAYOUTS), default="ncdhw", help="the activations' layout"
    )
    parser.add_argument("--no-meta", action="store_true", help="only the training steps")
    args = parser.parse_args()
    global DIMS
    DIMS = LAYOUTS[args.layout]

    configs = [Config(4, 3, 16)]
    if args.default:
        configs = [DEFAULT_2D]
    elif not args.small:
        configs += [DEFAULT_2D, Config(8, 3, 32), Config(8, 4, 32)]
    skip_la = args.small or args.default or args.no_la
    train_configs = configs + ([] if skip_la else [Config(16, 5, 64)])
    rows, parameters = {}, {}
    for config in train_configs:
        params = config.params()
        x, y = batch(jax.random.PRNGKey(3), config)
        runs = timed_training(params, x, y, jax.random.PRNGKey(1))
        name = config.key("V-Net training step")
        rows[name] = runs
        parameters[name] = sum(leaf.size for leaf in jax.tree.leaves(params))
        print(f"{name}: {runs}", flush=True)
    for config in [] if args.no_meta else configs:
        params = config.params()
        data = batch(jax.random.PRNGKey(3), config) + batch(jax.random.PRNGKey(5), config)
        for path, step in [("Reverse", meta_reverse), ("Fast", meta_fast)]:
            runs = timed(jax.jit(step), params, *data, jax.random.PRNGKey(2))
            name = config.key(f"meta step ({path})")
            rows[name] = runs
            parameters[name] = sum(leaf.size for leaf in jax.tree.leaves(params))
            print(f"{name}: {runs}", flush=True)
    results = {
        "jax": jax.__version__,
        "device": str(jax.devices()[0]),
        "layout": args.layout,
        "machine": platform.platform(),
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "steps": STEPS,
        "seconds": rows,
        "parameters": parameters,
    }
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
