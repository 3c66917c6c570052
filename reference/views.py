"""PLE's K = 5 views (METHODS.md, section 1.3) as dense linear operators on one sample's voxels.

A warp is the 3x4 matrix M that sends output voxel index o = (d, h, w) to the input point
M (o, 1) it reads (metaseg's convention, src/train/mlb_seg/views.rs and autograd/src/warp.rs).
Reading is trilinear with the volume extended by zeros, or the nearest voxel (round half up); as a
matrix A [output voxels, input voxels] the warp of a volume v is A v, so everything downstream is
plain linear algebra that JAX differentiates.

The views' matrices follow from the released code's resizes (cv2.resize, INTER_LINEAR, whose
voxel j of an m-voxel resize of n voxels reads the input at (j + 0.5) n / m - 0.5):
  zoom-in by p: resize n -> n + 2p, keep voxels p .. p + n: output o is resized voxel o + p;
  zoom-out by p: resize n -> n - 2p, place it at p .. n - p, zeros around: output o is resized
  voxel o - p. Both: input point (o + q + 0.5) n / (n + 2q) - 0.5 with q = p (in) or -p (out).
  flip along an axis: input point n - 1 - o.
Axes of one voxel (the depth of a 2D patch) are left alone.
"""

import numpy as np

VIEWS = 5
SNAP = 1024.0  # nearest rounding snaps to 1/1024 voxel first, as metaseg does (warp.rs, SNAP)


def identity(size):
    m = np.zeros((3, 4))
    m[:, :3] = np.eye(3)
    return m


def zoom(size, q):
    """q > 0: zoom in by q voxels per side; q < 0: zoom out by -q."""
    m = identity(size)
    for a, n in enumerate(size):
        if n > 1:
            r = n / (n + 2.0 * q)
            m[a, a] = r
            m[a, 3] = (q + 0.5) * r - 0.5
    return m


def flip(size, axis):
    m = identity(size)
    m[axis, axis] = -1.0
    m[axis, 3] = size[axis] - 1.0
    return m


def inverse(m):
    full = np.vstack([m, [0.0, 0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:3]


def view_matrices(size, zoom_in, zoom_out_a, zoom_out_b, flip_axis):
    """The K matrices in metaseg's view order: identity, zoom-in, two zoom-outs, flip."""
    return [
        identity(size),
        zoom(size, zoom_in),
        zoom(size, -zoom_out_a),
        zoom(size, -zoom_out_b),
        flip(size, flip_axis),
    ]


def _grid(size):
    d, h, w = np.meshgrid(*[np.arange(n) for n in size], indexing="ij")
    return np.stack([d.ravel(), h.ravel(), w.ravel()], axis=1).astype(float)


def _flat(idx, size):
    return (idx[:, 0] * size[1] + idx[:, 1]) * size[2] + idx[:, 2]


def operator(m, size, nearest=False):
    """A [voxels, voxels] with (A v)[o] = v read at M (o, 1)."""
    size = tuple(size)
    n = int(np.prod(size))
    points = _grid(size) @ m[:, :3].T + m[:, 3]
    a = np.zeros((n, n))
    rows = np.arange(n)
    if nearest:
        snapped = np.floor(points * SNAP + 0.5)
        idx = np.floor((snapped + SNAP / 2) / SNAP).astype(int)
        inside = np.all((idx >= 0) & (idx < np.array(size)), axis=1)
        a[rows[inside], _flat(idx[inside], size)] = 1.0
        return a
    base = np.floor(points)
    frac = points - base
    for corner in range(8):
        step = np.array([corner >> 2 & 1, corner >> 1 & 1, corner & 1])
        idx = base.astype(int) + step
        weight = np.prod(np.where(step == 1, frac, 1.0 - frac), axis=1)
        inside = np.all((idx >= 0) & (idx < np.array(size)), axis=1) & (weight != 0.0)
        np.add.at(a, (rows[inside], _flat(idx[inside], size)), weight[inside])
    return a


def is_exact(m):
    """Identity or a flip: the warp permutes voxels, so it covers the whole frame."""
    lin = m[:, :3]
    return np.all((lin == 0) | (np.abs(lin) == 1)) and np.all(np.diag(lin) != 0) \
        and np.all(np.mod(m[:, 3], 1.0) == 0)


class SampleViews:
    """The operators of one sample's views: forward (into view k, trilinear and nearest), back
    (view k into the original frame) and the back-warp's coverage (a ones volume warped back)."""

    def __init__(self, size, matrices):
        self.matrices = matrices
        self.forward = [operator(m, size) for m in matrices]
        self.nearest = [operator(m, size, nearest=True) for m in matrices]
        self.back = [operator(inverse(m), size) for m in matrices]
        self.coverage = [
            np.ones(int(np.prod(size))) if is_exact(m) else b.sum(axis=1)
            for m, b in zip(matrices, self.back)
        ]
