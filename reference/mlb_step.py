"""One whole MLB-Seg iteration in float64, written from METHODS.md section 1 and the released code
(aijinrjinr/MLB-Seg, train.py and dataloader.py), independently of metaseg's Rust code: the K
views, the PLE labels, L_cons and L_mt, the per-voxel costs, the look-ahead with momentum and
weight decay, the meta-gradient (JAX differentiating through the look-ahead, reverse over reverse),
the weights, the weighted update with clipping, the teacher's EMA, the supervised step on the meta
batch and the EMA again. The network is metaseg's 2-level 2D U-Net with batch norm (unet.py).

    python3 reference/mlb_step.py            # writes reference/fixtures/
    python3 reference/mlb_step.py --variants # also measures the released code's differences

Every input is explicit (see `make_inputs`): the images and labels, the student's parameters,
running statistics and momentum buffers, the teacher's parameters and statistics, the teacher's
input noise, the views' zoom offsets and flip axes, and the hyperparameters. Where metaseg makes a
choice that neither METHODS.md nor the released code decides, this file follows metaseg's
convention and says so; where they decide, this file follows them (see README.md).
"""

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

import rust_draws  # noqa: E402
import unet  # noqa: E402
from views import VIEWS, SampleViews, view_matrices  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
WEIGHT_EPS = 1e-10  # Ren et al. and the released code: w / (sum w + 1e-10)
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_: max_norm / (norm + 1e-6)

# The problem: metaseg's configuration keys where one exists (tests/mlb_reference.rs sets them).
CONFIG = {
    "seed": 1337,  # the run's seed: the Rust step draws its views and teacher noise from it
    "input_seed": 23,  # numpy's seed for everything else
    "t": 5,
    "patch": [1, 12, 12],
    "labeled": 2,  # the meta batch
    "unlabeled": 2,
    "base_width": 4,
    "lr": 0.01,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "clip": 0.2,
    "ema_decay": 0.99,
    "consistency": 1.0,
    "zoom_range": [4, 30],
    "zoom_reference": 144.0,
}


# ---------------------------------------------------------------- the inputs


def smooth_masks(rng, n, size, foreground):
    """n masks [n, H, W] with about `foreground` of the voxels set: thresholded sums of blobs."""
    h, w = size
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    masks = []
    for _ in range(n):
        field = np.zeros((h, w))
        for _ in range(3):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            s = rng.uniform(1.5, 3.5)
            field += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        masks.append(field > np.quantile(field, 1 - foreground))
    return np.array(masks, dtype=float)


def one_hot(fg):
    """[N, H, W] foreground -> [N, 2, H, W] one-hot."""
    return np.stack([1.0 - fg, fg], axis=1)


def make_inputs(cfg):
    rng = np.random.default_rng(cfg["input_seed"])
    size = cfg["patch"][1:]
    u, m = cfg["unlabeled"], cfg["labeled"]
    truth_u = smooth_masks(rng, u, size, 0.3)
    # Initial labels: the truth with a fifth of its voxels flipped in a blob-shaped region.
    y_init = np.abs(truth_u - smooth_masks(rng, u, size, 0.2) * (rng.uniform(size=(u, *size)) < 0.6))
    y_m = smooth_masks(rng, m, size, 0.3)
    x_u = truth_u + 0.4 * rng.normal(size=truth_u.shape)
    x_m = y_m + 0.4 * rng.normal(size=y_m.shape)

    params, stats = unet.declarations(cfg["base_width"])
    theta = []
    for name, shape in params:
        if name.endswith("conv.weight") or name in ("decoder.0.reduce.weight", "head.weight"):
            fan_in = shape[1] * int(np.prod(shape[2:]))
            theta.append(rng.normal(size=shape) * np.sqrt(2.0 / fan_in))
        elif name.endswith("bn.weight"):
            theta.append(1.0 + 0.1 * rng.normal(size=shape))
        else:
            theta.append(0.1 * rng.normal(size=shape))

    def running():
        return [rng.normal(size=s) * 0.2 if n.endswith("mean") else rng.uniform(0.5, 1.5, size=s)
                for n, s in stats]

    draws = {}
    for stream, first_slot, samples in (("u", m, u), ("m", 0, m)):
        draws[stream] = rust_draws.view_choices(
            cfg["seed"], cfg["t"], first_slot, samples, cfg["patch"], cfg["zoom_range"],
            cfg["zoom_reference"])
    noise = {}
    for stream, salt, samples in (("u", 0, u), ("m", rust_draws.META_SALT, m)):
        noise[stream] = rust_draws.teacher_noise(
            cfg["seed"], salt, cfg["t"], (VIEWS * samples, 1, *size))
    return {
        "x_u": x_u[:, None], "y_init": one_hot(y_init), "x_m": x_m[:, None], "y_m": one_hot(y_m),
        "theta": theta, "stats": running(),
        "momentum": [0.05 * rng.normal(size=t.shape) for t in theta],
        "teacher": [t + 0.05 * rng.normal(size=t.shape) for t in theta],
        "teacher_stats": running(),
        # (zoom-in, zoom-out, zoom-out, flip axis) per sample; axis 0 = D, 1 = H, 2 = W.
        "views_u": draws["u"], "views_m": draws["m"],
        # The teacher's input noise clamp(0.1 z, -0.2, 0.2) and the normals z it came from.
        "noise_u": noise["u"][0], "noise_m": noise["m"][0],
        "normals_u": noise["u"][1], "normals_m": noise["m"][1],
        "names": [n for n, _ in params], "stat_names": [n for n, _ in stats],
    }


# ---------------------------------------------------------------- views, PLE, L_cons


def sample_views(cfg, choices):
    size = tuple(cfg["patch"])
    return [SampleViews(size, view_matrices(size, *c)) for c in choices]


def apply(op, v):
    """A warp operator [voxels, voxels] on one sample [C, H, W]."""
    c, h, w = v.shape
    return jnp.einsum("oi,ci->co", op, v.reshape(c, h * w)).reshape(c, h, w)


def views_of(svs, x, nearest=False):
    """[S, C, H, W] -> [K * S, C, H, W], view-major (row k * S + s is view k of sample s)."""
    rows = []
    for k in range(VIEWS):
        for s, sv in enumerate(svs):
            rows.append(apply(sv.nearest[k] if nearest else sv.forward[k], x[s]))
    return jnp.stack(rows)


def label_views(svs, y, released=False):
    """One-hot labels into every view: nearest, and background where the view reads outside the
    patch (the zoom-outs' zero padding, which the released code's threshold also makes
    background). released: the released code's bilinear resize thresholded at 0.5."""
    if released:
        fg = (views_of(svs, y[:, 1:2]) > 0.5).astype(float)
        return jnp.concatenate([1.0 - fg, fg], axis=1)
    v = views_of(svs, y, nearest=True)
    return v.at[:, 0].add(1.0 - v.sum(axis=1))


def back(sv, k, p):
    """View k's prediction [C, H, W] warped back to the original frame and its coverage [H, W]:
    the back-warp divided by the coverage where it covers (a zoom-in shows only the centre)."""
    h, w = p.shape[1:]
    cov = sv.coverage[k].reshape(h, w)
    b = apply(sv.back[k], p)
    return b / jnp.maximum(cov, 1e-6), cov


def ple(svs, p, average):
    """The views' probabilities [K * S, 2, H, W] averaged in the original frame (by coverage, or
    divided by K as the released code), re-warped into every view, thresholded at 0.5."""
    s_count = len(svs)
    averages, labels = [], [None] * (VIEWS * s_count)
    for s, sv in enumerate(svs):
        parts = [back(sv, k, p[k * s_count + s]) for k in range(VIEWS)]
        total = sum(b * cov for b, cov in parts)
        if average == "coverage":
            avg = total / sum(cov for _, cov in parts)
        else:
            avg = total / VIEWS
        averages.append(avg)
        for k in range(VIEWS):
            fg = (apply(sv.forward[k], avg)[1] > 0.5).astype(float)
            labels[k * s_count + s] = jnp.stack([1.0 - fg, fg])
    return jnp.stack(averages), jnp.stack(labels)


def consistency(svs, p):
    """L_cons: every pair of a sample's views compared in the original frame where both cover
    it (each weighted by its coverage), the mean over the frame, averaged over the K (K - 1) / 2
    pairs and the samples."""
    s_count = len(svs)
    total = 0.0
    for s, sv in enumerate(svs):
        parts = [back(sv, k, p[k * s_count + s]) for k in range(VIEWS)]
        for a in range(VIEWS):
            for b in range(a + 1, VIEWS):
                (pa, ca), (pb, cb) = parts[a], parts[b]
                total = total + jnp.mean(ca * cb * (pa - pb) ** 2)
    return total / (s_count * VIEWS * (VIEWS - 1) // 2)


def consistency_released(svs, p):
    """The released code's L_cons (dataloader.get_consistencyloss): pair (a, b) is compared in
    view a's frame, view b warped back to the original frame (zeros where it does not cover) and
    into view a's frame; view b goes through numpy, so only view a gets a gradient."""
    s_count = len(svs)
    total = 0.0
    for s, sv in enumerate(svs):
        view = [p[k * s_count + s] for k in range(VIEWS)]
        for a in range(VIEWS):
            for b in range(a + 1, VIEWS):
                other = jax.lax.stop_gradient(apply(sv.back[b], view[b]))
                if a > 0:
                    other = apply(sv.forward[a], other)
                total = total + jnp.mean((view[a] - other) ** 2)
    return total / (s_count * VIEWS * (VIEWS - 1) // 2)


# ---------------------------------------------------------------- losses and the network


def softmax(z):
    return jax.nn.softmax(z, axis=1)


def ce_voxels(logits, y):
    """-sum_c y_c log softmax(z)_c per voxel: [N, H, W]."""
    return -(y * jax.nn.log_softmax(logits, axis=1)).sum(axis=1)


def costs(logits, y_init, y_ple):
    """c [N, 2, H, W]: channel 0 against the initial labels, 1 against the PLE labels."""
    return jnp.stack([ce_voxels(logits, y_init), ce_voxels(logits, y_ple)], axis=1)


def net(theta, names, x):
    return unet.forward(theta, names, x)


# ---------------------------------------------------------------- optimiser pieces


def sgd(theta, grads, buffers, lr, momentum, wd):
    """PyTorch's SGD (dampening 0): d = g + wd theta; buf = mu buf + d; theta - lr buf."""
    new_buffers = [momentum * b + g + wd * t for t, g, b in zip(theta, grads, buffers)]
    return [t - lr * b for t, b in zip(theta, new_buffers)], new_buffers


def clip(grads, max_norm):
    """clip_grad_norm_: the gradients scaled by min(1, max_norm / (norm + 1e-6))."""
    norm = jnp.sqrt(sum(jnp.sum(g * g) for g in grads))
    factor = jnp.minimum(1.0, max_norm / (norm + CLIP_EPS))
    return [g * factor for g in grads], float(norm)


def ema(teacher, student, t, decay):
    a = min(1.0 - 1.0 / (t + 1.0), decay)
    return [a * tp + (1 - a) * sp for tp, sp in zip(teacher, student)]


def weights(g, normalization):
    """Meta-gradients -> weights, one normalisation over both maps of every view."""
    if normalization == "clip":
        raw = jnp.maximum(-g, 0.0)
        return raw / (raw.sum() + WEIGHT_EPS)
    if normalization == "softmax":
        return jax.nn.softmax(-g.ravel()).reshape(g.shape)
    if normalization == "sigmoid":
        raw = jax.nn.sigmoid(-g)
        return raw / (raw.sum() + WEIGHT_EPS)
    raw = (g < 0).astype(float)
    return raw / (raw.sum() + WEIGHT_EPS)


# ---------------------------------------------------------------- one iteration


DEFAULTS = {
    "ple_average": "coverage",  # metaseg's choice; "views": the released code's sum / K
    "meta_views": False,  # METHODS.md: L_meta on (x_m, y_m); True: on its views (released code)
    "cons": "frame",  # "released": dataloader.get_consistencyloss
    "noise": "clamp",  # METHODS.md's clamp(0.1 z, +-0.2); "released": 0.02 z
    "labels": "nearest",  # metaseg's choice; "released": bilinear thresholded at 0.5
}


def iteration(cfg, inp, opts=None):
    """Every intermediate of one iteration, as numpy arrays (the student's [N, C, H, W])."""
    o = dict(DEFAULTS, **(opts or {}))
    names = inp["names"]
    lam, lr, mu, wd, t = (cfg[k] for k in ("consistency", "lr", "momentum", "weight_decay", "t"))
    svs_u, svs_m = sample_views(cfg, inp["views_u"]), sample_views(cfg, inp["views_m"])
    squeeze = lambda a: jnp.asarray(a)[:, :, 0] if np.ndim(a) == 5 else jnp.asarray(a)  # noqa: E731
    x_u, y_init, x_m, y_m = (squeeze(inp[k]) for k in ("x_u", "y_init", "x_m", "y_m"))
    theta = [jnp.asarray(a) for a in inp["theta"]]
    teacher = [jnp.asarray(a) for a in inp["teacher"]]
    noise_u, noise_m = (squeeze(inp[k]) if o["noise"] == "clamp" else 0.02 * squeeze(inp[z])
                        for k, z in (("noise_u", "normals_u"), ("noise_m", "normals_m")))
    cons_of = consistency if o["cons"] == "frame" else consistency_released
    out = {}

    # 1. The views; the teacher on the noisy views (training mode); the student at theta.
    xv = views_of(svs_u, x_u)
    yv_init = label_views(svs_u, y_init, released=o["labels"] == "released")
    t_logits, t_stats = net(teacher, names, xv + noise_u)
    p_teacher = softmax(t_logits)
    logits, s_stats = net(theta, names, xv)
    p = softmax(logits)
    ple_avg, y_ple = ple(svs_u, p, o["ple_average"])
    out.update(views_x_u=xv, views_y_init=yv_init, p_teacher=p_teacher, p_student=p,
               ple_average=ple_avg, y_ple=y_ple)
    out["ple_margin"] = float(min(
        jnp.min(jnp.abs(apply(sv.forward[k], ple_avg[s])[1] - 0.5))
        for s, sv in enumerate(svs_u) for k in range(VIEWS)))

    # 2. The look-ahead on sum(eps c) + lam (L_cons + L_mt) and the meta loss at theta'.
    def inner(th, eps):
        z, _ = net(th, names, xv)
        q = softmax(z)
        other = lam * (cons_of(svs_u, q) + jnp.mean((q - p_teacher) ** 2))
        return jnp.sum(eps * costs(z, yv_init, y_ple)) + other

    xv_m, yv_m = views_of(svs_m, x_m), label_views(svs_m, y_m, released=o["labels"] == "released")
    meta_x, meta_y = (xv_m, yv_m) if o["meta_views"] else (x_m, y_m)

    def look_ahead(eps):
        g_th = jax.grad(inner)(theta, eps)
        return sgd(theta, g_th, inp["momentum"], lr, mu, wd)[0]

    def meta_loss(th):
        z, _ = net(th, names, meta_x)
        return jnp.mean(ce_voxels(z, meta_y))

    eps0 = jnp.zeros((VIEWS * len(svs_u), 2) + xv.shape[2:])
    ahead = look_ahead(eps0)
    g = jax.grad(lambda eps: meta_loss(look_ahead(eps)))(eps0)
    # The identity of METHODS.md: dL/d eps_i = -lr <grad L_meta(theta'), grad c_i(theta)>.
    v = jax.grad(meta_loss)(ahead)
    _, jv = jax.jvp(lambda th: costs(net(th, names, xv)[0], yv_init, y_ple), (theta,), (v,))
    out["identity_error"] = float(jnp.max(jnp.abs(g + lr * jv)) / jnp.max(jnp.abs(g)))
    c = costs(logits, yv_init, y_ple)
    cons, mt = cons_of(svs_u, p), jnp.mean((p - p_teacher) ** 2)
    out.update(costs=c, l_cons=cons, l_mt=mt, theta_ahead=ahead, l_meta=meta_loss(ahead), g=g)
    for n in ("clip", "softmax", "sigmoid", "hard"):
        out[f"w_{n}"] = weights(g, n)
    w = out["w_clip"]
    out["g_margin"] = float(jnp.min(jnp.abs(g[g != 0])) / jnp.max(jnp.abs(g)))

    # 3. The real update at theta: sum(w c) + lam (L_cons + L_mt), clipped, SGD, EMA.
    def real_loss(th):
        z, _ = net(th, names, xv)
        q = softmax(z)
        return jnp.sum(w * costs(z, yv_init, y_ple)) + lam * (
            cons_of(svs_u, q) + jnp.mean((q - p_teacher) ** 2))

    grads, out["norm_1"] = clip(jax.grad(real_loss)(theta), cfg["clip"])
    theta_1, momentum_1 = sgd(theta, grads, inp["momentum"], lr, mu, wd)
    stats_1 = unet.updated_running(inp["stats"], s_stats)
    teacher_stats_1 = unet.updated_running(inp["teacher_stats"], t_stats)
    teacher_1 = ema(teacher, theta_1, t, cfg["ema_decay"])
    weighted = jnp.sum(w * c)
    out.update(theta_1=theta_1, momentum_1=momentum_1, stats_1=stats_1, teacher_1=teacher_1,
               teacher_stats_1=teacher_stats_1, weighted_ce=weighted)

    # 4. The supervised step on the meta batch's views at theta_1: mean CE + lam (L_cons + L_mt).
    tm_logits, tm_stats = net(teacher_1, names, xv_m + noise_m)
    pm_teacher = softmax(tm_logits)

    def supervised(th):
        z, st = net(th, names, xv_m)
        q = softmax(z)
        ce = jnp.mean(ce_voxels(z, yv_m))
        cm, mm = cons_of(svs_m, q), jnp.mean((q - pm_teacher) ** 2)
        return ce + lam * (cm + mm), (ce, cm, mm, st)

    (meta_total, (meta_ce, meta_cons, meta_mt, sm_stats)), sgrads = jax.value_and_grad(
        supervised, has_aux=True)(theta_1)
    sgrads, out["norm_2"] = clip(sgrads, cfg["clip"])
    theta_2, momentum_2 = sgd(theta_1, sgrads, momentum_1, lr, mu, wd)
    out.update(
        views_x_m=xv_m, views_y_m=yv_m, p_teacher_m=pm_teacher, theta_2=theta_2,
        momentum_2=momentum_2, stats_2=unet.updated_running(stats_1, sm_stats),
        teacher_stats_2=unet.updated_running(teacher_stats_1, tm_stats),
        teacher_2=ema(teacher_1, theta_2, t, cfg["ema_decay"]))

    fg_share = lambda y: jnp.mean(y[:, 1])  # noqa: E731
    out["log"] = {
        "loss": float(weighted + lam * (cons + mt) + meta_total), "lr": lr,
        "weighted_ce": float(weighted), "cons": float(cons), "mt": float(mt),
        "meta_ce": float(meta_ce), "meta_cons": float(meta_cons), "meta_mt": float(meta_mt),
        "weight_init": float(w[:, 0].sum()), "weight_ple": float(w[:, 1].sum()),
        "init_foreground": float(fg_share(yv_init)), "ple_foreground": float(fg_share(y_ple)),
    }
    return out


# ---------------------------------------------------------------- fixtures


def flat(tensors):
    return np.concatenate([np.asarray(t).ravel() for t in tensors])


def as_ncdhw(a):
    """[N, C, H, W] -> metaseg's [N, C, 1, H, W]."""
    return np.asarray(a)[:, :, None]


PER_VIEW = ["views_x_u", "views_y_init", "p_teacher", "p_student", "ple_average", "y_ple",
            "costs", "g", "w_clip", "w_softmax", "w_sigmoid", "w_hard", "views_x_m",
            "views_y_m", "p_teacher_m"]
STORES = ["theta_ahead", "theta_1", "momentum_1", "stats_1", "teacher_1", "teacher_stats_1",
          "theta_2", "momentum_2", "stats_2", "teacher_2", "teacher_stats_2"]
LABELS = ["views_y_init", "y_ple", "views_y_m"]


def warp_table(cfg, choices):
    size = tuple(cfg["patch"])
    per_sample = [view_matrices(size, *c) for c in choices]
    return [[per_sample[s][k].tolist() for s in range(len(choices))] for k in range(VIEWS)]


def write_fixtures(cfg, inp, out, flagged):
    FIXTURES.mkdir(exist_ok=True)
    for f in FIXTURES.glob("*.npy"):
        f.unlink()

    def save(name, a, dtype=np.float64):
        np.save(FIXTURES / f"{name}.npy", np.ascontiguousarray(np.asarray(a, dtype=dtype)))

    for k in ("x_u", "y_init", "x_m", "y_m"):
        save(k, as_ncdhw(inp[k]), np.uint8 if k.startswith("y") else np.float64)
    for k in ("noise_u", "noise_m"):
        save(k, as_ncdhw(inp[k]))
    for k in ("theta", "stats", "momentum", "teacher", "teacher_stats"):
        save(k, flat(inp[k]))
    for k in PER_VIEW:
        save(k, as_ncdhw(out[k]), np.uint8 if k in LABELS else np.float64)
    for k in STORES:
        save(k, flat(out[k]))
    # The metaseg flags with the released code's behaviour, through the same Rust functions.
    save("w_meta_views", as_ncdhw(flagged["meta_views"]["w_clip"]))
    save("y_ple_views_average", as_ncdhw(flagged["ple_views"]["y_ple"]), np.uint8)
    manifest = {
        "config": cfg,
        "param_names": inp["names"],
        "stat_names": inp["stat_names"],
        "views_u": inp["views_u"],
        "views_m": inp["views_m"],
        # The 3x4 matrix of view k of sample s: warps_u[k][s] (metaseg's Views::warps layout).
        "warps_u": warp_table(cfg, inp["views_u"]),
        "warps_m": warp_table(cfg, inp["views_m"]),
        "scalars": {k: float(out[k]) for k in ("l_cons", "l_mt", "l_meta")},
        "log": out["log"],
        "checks": {k: out[k] for k in ("identity_error", "ple_margin", "g_margin", "norm_1",
                                       "norm_2")},
    }
    (FIXTURES / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


# ---------------------------------------------------------------- the released code's differences


def share_moved(a, b):
    """Half the L1 distance of two weight distributions: the share of the weight that moved."""
    return float(0.5 * jnp.sum(jnp.abs(a - b)))


def variants(cfg, inp, base):
    """Each of the released code's behaviours alone, then all together, against the default."""
    cases = [("meta_views", {"meta_views": True}), ("ple_views", {"ple_average": "views"}),
             ("cons_released", {"cons": "released"}), ("noise_released", {"noise": "released"}),
             ("labels_released", {"labels": "released"}),
             ("all_released", {"meta_views": True, "ple_average": "views", "cons": "released",
                               "noise": "released", "labels": "released"})]
    step = flat(base["theta_2"]) - flat(inp["theta"])
    report, outs = {}, {}
    for name, opts in cases:
        o = iteration(cfg, inp, opts)
        outs[name] = o
        report[name] = {
            "l_cons": float(o["l_cons"]), "l_mt": float(o["l_mt"]),
            "init_foreground": o["log"]["init_foreground"],
            "ple_foreground": o["log"]["ple_foreground"],
            "weight_init": o["log"]["weight_init"],
            "weight_moved": share_moved(o["w_clip"], base["w_clip"]),
            "update_change": float(np.linalg.norm(flat(o["theta_2"]) - flat(base["theta_2"]))
                                   / np.linalg.norm(step)),
        }
    report["default"] = {k: float(base[k]) for k in ("l_cons", "l_mt")}
    report["default"].update({k: base["log"][k] for k in
                              ("init_foreground", "ple_foreground", "weight_init")})
    return report, outs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", action="store_true",
                        help="measure each of the released code's differences on the fixture")
    args = parser.parse_args()
    cfg = CONFIG
    inp = make_inputs(cfg)
    out = iteration(cfg, inp)
    flagged = {"meta_views": iteration(cfg, inp, {"meta_views": True}),
               "ple_views": iteration(cfg, inp, {"ple_average": "views"})}
    for k in ("identity_error", "ple_margin", "g_margin", "norm_1", "norm_2"):
        print(f"{k}: {out[k]:.3e}")
    print(json.dumps(out["log"], indent=1))
    assert out["identity_error"] < 1e-10, "the meta-gradient identity does not hold"
    assert out["ple_margin"] > 1e-6, "a PLE average sits at the threshold: choose other inputs"
    assert out["g_margin"] > 1e-9, "a meta-gradient is nearly 0: the clip's support is fragile"
    assert out["norm_1"] > cfg["clip"] and out["norm_2"] > cfg["clip"], "clipping not exercised"
    write_fixtures(cfg, inp, out, flagged)
    if args.variants:
        report, _ = variants(cfg, inp, out)
        print(json.dumps(report, indent=1))
        (FIXTURES / "variants.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
