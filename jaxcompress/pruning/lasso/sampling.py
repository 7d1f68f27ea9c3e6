"""Sampling the inputs of a network's layers for He et al. 2017's channel pruning.

He, Zhang, Sun, "Channel Pruning for Accelerating Very Deep Neural Networks" (ICCV
2017) fit each layer on input patches X sampled at a few random output positions per
image (10 per image in the paper). Here the inputs of the chosen Conv / Dense layers
are recorded during one jitted forward pass (`flax.linen.intercept_methods`): a conv
gives its (kh*kw, C) patches at fixed random output positions, a Dense layer fed by
a flattened NHWC map one (H*W, C) row per image. Channels are zero-padded to
multiples of _BUCKET so one compilation of each per-layer function serves layers of
similar widths. The `quant` collection is not applied here (callers drop it).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.layers import Conv, Dense
from jaxcompress.models.table import ModelTable

_BUCKET = 32


def _bucket(size: int) -> int:
    """Channel counts are zero-padded to multiples of _BUCKET inside the driver, so one
    compilation of each per-layer function serves layers of similar widths."""
    return -(-size // _BUCKET) * _BUCKET


def _pad_axis(x, axis: int, size: int, np_=jnp):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return np_.pad(x, pad)


_np_pad = functools.partial(_pad_axis, np_=np)


def _explicit_padding(padding, in_hw, kernel, strides):
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    if isinstance(padding, str):
        if padding.upper() == "VALID":
            return ((0, 0), (0, 0))
        if padding.upper() == "SAME":
            pads = []
            for size, k, s in zip(in_hw, kernel, strides):
                out = -(-size // s)
                total = max((out - 1) * s + k - size, 0)
                pads.append((total // 2, total - total // 2))
            return tuple(pads)
        raise ValueError(f"LASSO channel pruning supports SAME / VALID / explicit padding, got '{padding}'")
    return tuple(tuple(int(v) for v in p) for p in padding)


def _conv_patches(x, mod: Conv, positions, out_w: int):
    """(B*P, kh*kw, C) input patches of `mod` at flat output positions (B, P)."""
    kh, kw = mod.kernel_size
    strides = (mod.strides,) * 2 if isinstance(mod.strides, int) else tuple(mod.strides)
    pads = _explicit_padding(mod.padding, x.shape[1:3], (kh, kw), strides)
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    rows, cols = (positions // out_w) * strides[0], (positions % out_w) * strides[1]
    window = lambda img, i, j: jax.lax.dynamic_slice(img, (i, j, 0), (kh, kw, img.shape[-1]))
    patches = jax.vmap(jax.vmap(window, in_axes=(None, 0, 0)))(xp, rows, cols)  # (B, P, kh, kw, C)
    B, P = positions.shape
    return patches.reshape(B * P, kh * kw, x.shape[-1])


@functools.lru_cache(maxsize=16)
def _make_sampler(table: ModelTable):
    """Jitted `sample(variables, images, positions, paths) -> {path: (n, r, c_padded)}`
    recording the inputs of the layers in `paths` (static) with
    `flax.linen.intercept_methods`; channels are zero-padded to a _BUCKET multiple."""
    info = {l.path: l for l in table.layers}

    @functools.partial(jax.jit, static_argnames=("paths",))
    def sample(variables, images, positions, paths):
        out = {}

        def interceptor(next_fun, args, kwargs, context):
            mod = context.module
            if context.method_name == "__call__" and isinstance(mod, (Conv, Dense)):
                path = "/".join(mod.path)
                if path in paths:
                    x = args[0]
                    if isinstance(mod, Conv):
                        patches = _conv_patches(x, mod, positions[path], info[path].out_hw[1])
                    else:
                        patches = x.reshape(x.shape[0], info[path].in_repeat, -1)
                    out[path] = _pad_axis(patches, 2, _bucket(patches.shape[2]))
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            table.model.apply(variables, images, train=False)
        return out

    return sample


def _sample_inputs(sample, variables, images, positions, paths, batch_size, keep_paths):
    """Runs `sample` over `images` in fixed-size batches (last one padded); returns the
    patches of `keep_paths`. `paths` (all consumers) stays fixed so that one compiled
    sampler serves every pass."""
    n = images.shape[0]
    chunks = {p: [] for p in keep_paths}
    for start in range(0, n, batch_size):
        batch = images[start:start + batch_size]
        nb = batch.shape[0]
        if nb < batch_size and n > batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - nb, *batch.shape[1:]), batch.dtype)])
        pos = {p: v[start:start + batch_size] for p, v in positions.items() if p in paths}
        pos = {p: np.concatenate([v, np.zeros((batch.shape[0] - nb, v.shape[1]), v.dtype)]) for p, v in pos.items()}
        out = sample(variables, jnp.asarray(batch), pos, paths)
        for p in keep_paths:
            per_image = out[p].shape[0] // batch.shape[0]
            chunks[p].append(out[p][:nb * per_image])
    return {p: jnp.concatenate(v) for p, v in chunks.items()}


def _sample_positions(table: ModelTable, paths, num_images: int, per_image: int, seed: int):
    """Random flat output positions, (num_images, min(per_image, H*W)) int32, for each
    conv layer in `paths`, drawn in the table's layer order from `seed`."""
    rng = np.random.default_rng(seed)
    positions = {}
    for l in table.layers:
        if l.path in paths and l.kind == "conv":
            hw = l.out_hw[0] * l.out_hw[1]
            p = min(per_image, hw)
            positions[l.path] = np.argsort(rng.random((num_images, hw)), axis=1)[:, :p].astype(np.int32)
    return positions


def _input_sampler(table: ModelTable, images, paths: tuple, positions_per_image: int, seed: int, batch_size: int):
    """`sample_inputs(variables, keep_paths) -> {path: (n, r, c_padded)}` over all of
    `images`, at positions fixed once here (the same for every network sampled).

    The compiled sampler records every layer in `paths`, so one program serves every
    pass and every call on this table; `keep_paths` (a subset) is what is returned.
    """
    positions = _sample_positions(table, paths, images.shape[0], positions_per_image, seed)
    sample = _make_sampler(table)
    batch_size = min(batch_size, images.shape[0])
    return lambda variables, keep_paths: _sample_inputs(sample, variables, images, positions, paths, batch_size,
                                                        keep_paths)
