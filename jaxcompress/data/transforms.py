"""Array transforms: splits, class selection, normalisation and augmentation.

Host-side helpers work on NumPy uint8 arrays without converting whole datasets
to float; `normalize` and `augment_cifar` are meant to run on device, inside a
jitted step.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.data.lazy import LazyImages, take_rows

_CHUNK = 4096  # images per chunk in the memory-friendly host loops
STATS_SAMPLE = 10_000  # images of a lazy (read-on-demand) split that `channel_stats` reads


def stratified_split_indices(y: np.ndarray, val_size: int | float,
                             seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split of range(len(y)) into (keep, held_out) indices.

    The held-out count is `val_size` (an int) or round(val_size * N) (a float in
    (0, 1)); it is shared out over classes in proportion to their size (largest
    remainder), and each class's members are drawn with a NumPy PCG64 generator
    seeded with `seed`. Both index arrays are sorted (original order).
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}.")
    n = y.shape[0]
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float, np.integer, np.floating)):
        raise ValueError(f"val_size must be an int count or a float fraction, got {val_size!r}.")
    if isinstance(val_size, (float, np.floating)):
        if not 0.0 < val_size < 1.0:
            raise ValueError(f"val_size as a fraction must be in (0, 1), got {val_size}.")
        n_val = int(round(float(val_size) * n))
    else:
        n_val = int(val_size)
    if n_val < 1:
        raise ValueError(f"val_size={val_size!r} gives no validation examples out of {n}.")
    if n_val >= n:
        raise ValueError(f"val_size={val_size!r} takes {n_val} of {n} examples and leaves train "
                         f"empty; use a smaller val_size.")

    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    exact = counts * (n_val / n)
    alloc = np.floor(exact).astype(np.int64)
    remainder = n_val - int(alloc.sum())
    order = np.argsort(-(exact - alloc), kind="stable")  # largest remainder, ties by class
    alloc[order[:remainder]] += 1

    rng = np.random.default_rng(seed)
    held = []
    for k in range(len(classes)):
        members = np.flatnonzero(inverse == k)
        held.append(rng.permutation(members)[: alloc[k]])
    held = np.sort(np.concatenate(held))
    mask = np.ones(n, bool)
    mask[held] = False
    return np.flatnonzero(mask), held


def split_validation(x, y, val_size: int | float, seed: int = 0):
    """Carves a deterministic, stratified validation split out of a training set.

    Args:
      x, y: training images and labels (same leading length).
      val_size: number of validation examples (int) or a fraction in (0, 1).
      seed: the split is a pure function of (y, val_size, seed).

    Returns:
      ((x_train, y_train), (x_val, y_val)), each in original order.
    """
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples but y has {len(y)}.")
    keep, held = stratified_split_indices(y, val_size, seed)
    return (take_rows(x, keep), y[keep]), (take_rows(x, held), y[held])


def stratified_subset(x, y, size: int, seed: int = 0):
    """At most `size` examples of (x, y), stratified by class and deterministic in
    `seed` (all of them when `size` is 0 or not below len(y)); original order."""
    if not size or size >= len(y):
        return x, y
    _, keep = stratified_split_indices(y, int(size), seed)
    return take_rows(x, keep), y[keep]


def select_classes(x, y, classes: Sequence[int], relabel: bool = True):
    """Keeps only examples of `classes`, relabelled 0..len(classes)-1 in that order.

    With relabel=False the original labels are kept. Examples keep their order.
    """
    classes = [int(c) for c in classes]
    if not classes:
        raise ValueError("classes must name at least one class.")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes {classes} contains duplicates.")
    y = np.asarray(y)
    absent = [c for c in classes if not np.any(y == c)]
    if absent:
        raise ValueError(f"classes {absent} do not occur in the labels (present: {np.unique(y).tolist()}).")
    mask = np.isin(y, classes)
    y_sel = y[mask]
    if relabel:
        order = np.argsort(classes)  # new label of the k-th smallest class
        y_sel = order[np.searchsorted(np.asarray(classes)[order], y_sel)].astype(np.int32)
    return take_rows(x, mask), y_sel


def channel_stats(x_uint8) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of uint8 images (last axis = channel), in [0, 1] units.

    Accumulates exact integer sums over chunks of images, so it never holds a
    float copy of the dataset. Returns float32 arrays of shape (C,). Of a lazy split
    (`LazyImages`) longer than `STATS_SAMPLE`, only that many evenly spaced images are read.
    """
    if isinstance(x_uint8, LazyImages) and len(x_uint8) > STATS_SAMPLE:
        x_uint8 = x_uint8[np.linspace(0, len(x_uint8) - 1, STATS_SAMPLE).astype(np.int64)]
    x = np.asarray(x_uint8)
    if x.dtype != np.uint8 or x.ndim < 2:
        raise ValueError(f"channel_stats expects uint8 images (..., C), got {x.dtype} {x.shape}.")
    c = x.shape[-1]
    total = np.zeros(c, np.uint64)
    total_sq = np.zeros(c, np.uint64)
    for start in range(0, x.shape[0], _CHUNK):
        chunk = x[start:start + _CHUNK].reshape(-1, c).astype(np.uint64)
        total += chunk.sum(axis=0)
        total_sq += (chunk * chunk).sum(axis=0)
    count = x.size // c
    if count == 0:
        raise ValueError("channel_stats of an empty array.")
    mean = total.astype(np.float64) / count
    var = np.maximum(total_sq.astype(np.float64) / count - mean * mean, 0.0)
    return (mean / 255.0).astype(np.float32), (np.sqrt(var) / 255.0).astype(np.float32)


def normalize(x_uint8, mean, std):
    """(x / 255 - mean) / std as float32; NumPy in -> NumPy out, JAX in -> JAX out."""
    xp = jnp if isinstance(x_uint8, jax.Array) else np
    mean = xp.asarray(mean, dtype=xp.float32)
    std = xp.asarray(std, dtype=xp.float32)
    return (xp.asarray(x_uint8).astype(xp.float32) / 255.0 - mean) / std


def augment_cifar(rng: jax.Array, x: jax.Array, pad: int = 4) -> jax.Array:
    """Standard CIFAR augmentation on a batch (N, H, W, C), jittable.

    Each image is zero-padded by `pad` pixels on every side, cropped back to
    H x W at a uniformly random offset in [0, 2*pad]^2, and flipped
    horizontally with probability 0.5. `pad` must be a static Python int.
    """
    if x.ndim != 4:
        raise ValueError(f"augment_cifar expects NHWC images, got shape {x.shape}.")
    pad = int(pad)
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}.")
    n, h, w, c = x.shape
    offset_key, flip_key = jax.random.split(rng)
    offsets = jax.random.randint(offset_key, (n, 2), 0, 2 * pad + 1)
    flips = jax.random.bernoulli(flip_key, 0.5, (n,))
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def crop_and_flip(image, offset, flip):
        crop = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))
        return jnp.where(flip, crop[:, ::-1, :], crop)

    return jax.vmap(crop_and_flip)(padded, offsets, flips)


def to_grey(x_uint8: np.ndarray) -> np.ndarray:
    """Averages 3 channels to 1 (rounded), uint8 NHWC -> uint8 NHW1."""
    s = x_uint8.sum(axis=-1, keepdims=True, dtype=np.uint16)
    return ((s + 1) // 3).astype(np.uint8)  # round(s / 3); s / 3 never ends in .5


def resize_images(x_uint8: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of uint8 NHWC images to size x size (PIL, one image at a time).

    Works for batches of mixed-size images given as a list, too. PIL's bilinear
    filter is antialiased when shrinking.
    """
    from PIL import Image  # lazy; pillow comes with matplotlib/tfds

    n = len(x_uint8)
    if n == 0:
        return np.empty((0, size, size, np.shape(x_uint8)[-1]), np.uint8)
    c = np.shape(x_uint8[0])[-1]
    out = np.empty((n, size, size, c), np.uint8)
    for i in range(n):
        img = np.asarray(x_uint8[i])
        if c in (1, 3):
            pil = Image.fromarray(img[..., 0] if c == 1 else img)
            out[i] = np.asarray(pil.resize((size, size), Image.BILINEAR)).reshape(size, size, c)
        else:
            for ch in range(c):
                pil = Image.fromarray(np.ascontiguousarray(img[..., ch]))
                out[i, ..., ch] = np.asarray(pil.resize((size, size), Image.BILINEAR))
    return out
