"""The two inputs of an MLB-Seg iteration that metaseg's step draws itself: the views' warps
(Views::draw in src/train/mlb_seg/views.rs) and the teacher's input noise (Trainer::teacher_logits
in src/train/trainer.rs), both from the counter-based generator of autograd/src/random.rs.

This module only CHOOSES the fixture's inputs so that the Rust step, which has no way yet to be
handed its views and noise, draws the same ones. The reference itself (mlb_step.py) takes them as
explicit arguments; nothing here is part of the math being checked. tests/mlb_reference.rs checks
that Rust draws exactly these, so a change on either side fails loudly instead of silently.
"""

import numpy as np

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF

# Constants of the Rust code (named there): PLE_PURPOSE in views.rs, the teacher's stream salt in
# trainer.rs, META_SALT in step.rs.
PLE_PURPOSE = 2
TEACHER_STREAM = 0x7EAC4E00
META_SALT = 0x3E7A0001


def mix32(x):
    """Chris Wellons' lowbias32 integer hash."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    x ^= x >> 16
    return x


def random_bits(seed, counter):
    h = mix32((seed & MASK32) ^ 0x9E3779B9)
    h = mix32(h ^ ((seed >> 32) & MASK32))
    h = mix32(h ^ ((counter >> 32) & MASK32))
    return mix32(h ^ (counter & MASK32))


def uniform(seed, counter):
    return ((random_bits(seed, counter & MASK64) >> 9) + 0.5) / 8388608.0


def normal(seed, counter):
    u1 = uniform(seed, (2 * counter) & MASK64)
    u2 = uniform(seed, (2 * counter + 1) & MASK64)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def batch_stream(iteration, slot, purpose):
    """The first counter of the draws of (iteration, batch slot, purpose) (src/train/batch.rs)."""
    return (((iteration << 24) ^ (slot << 8) ^ purpose) << 4) & MASK64


def view_choices(seed, t, first_slot, samples, patch, zoom_range, zoom_reference):
    """Per sample: (zoom-in offset, first zoom-out offset, second zoom-out offset, flip axis), as
    Views::draw picks them: offsets from the even numbers of zoom_range scaled to the patch's
    smallest axis of more than one voxel, the two zoom-outs distinct, the flip along one of the
    axes longer than a voxel."""
    lo, hi = zoom_range
    smallest = min(n for n in patch if n > 1)
    offsets = [p * (smallest / zoom_reference) for p in range(lo, hi + 1, 2)]
    axes = [a for a in range(3) if patch[a] > 1]
    choices = []
    for s in range(samples):
        k = batch_stream(t, first_slot + s, PLE_PURPOSE)

        def pick(j, n):
            return min(int(uniform(seed, k + j) * n), max(n - 1, 0))

        zoom_in = offsets[pick(0, len(offsets))]
        first = pick(1, len(offsets))
        second = (first + 1 + pick(2, len(offsets) - 1)) % len(offsets) if len(offsets) > 1 else first
        choices.append((zoom_in, offsets[first], offsets[second], axes[pick(3, len(axes))]))
    return choices


def teacher_noise(seed, salt, t, shape):
    """clamp(0.1 N(0, 1), -0.2, 0.2) of the teacher's input on a batch of `shape`, iteration t."""
    stream = seed ^ TEACHER_STREAM ^ salt
    start = (t << 32) & MASK64
    n = int(np.prod(shape))
    z = np.array([normal(stream, start + i) for i in range(n)])
    return np.clip(0.1 * z, -0.2, 0.2).reshape(shape), z.reshape(shape)
