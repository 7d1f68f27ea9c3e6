"""Sampling the inputs of a network's layers for He et al. 2017's channel pruning.

He, Zhang, Sun, "Channel Pruning for Accelerating Very Deep Neural Networks" (ICCV
2017) fit each layer on input patches X sampled at a few random output positions per
image (10 per image in the paper). Here the inputs of the chosen Conv / Dense layers
are recorded during one jitted forward pass (`flax.linen.intercept_methods`): a conv
gives its (kh*kw, C) patches at fixed random output positions, a Dense layer fed by
a flattened NHWC map one (H*W, C) row per image. Channels are zero-padded to
multiples of _BUCKET so one compilation of each per-layer function serves layers of
similar widths. The `quant` collection is not applied here (callers drop it).

Data parallel over a ('data',) mesh (`mesh`, default None: one device): each batch of
images (and its positions) is split over the devices, the variables are replicated,
and the recorded patches stay split by rows (`P('data')`). Batches are padded with
zero images to a multiple of the device count; a per-image `valid` weight zeroes the
padding's rows, which is neutral for everything built on them (Gram sums, targets,
the refit, given `valid_rows`).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.layers import Conv, Dense
from jaxcompress.models.table import ModelTable
from jaxcompress.train.steps import batch_sharded, replicated, split_rows

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


def _devices(mesh) -> int:
    return 1 if mesh is None else mesh.size


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


@functools.lru_cache(maxsize=16)
def _make_sampler(table: ModelTable, mesh=None):
    """Jitted `sample(variables, images, positions, valid, paths=...) -> {path: (n, r,
    c_padded)}` recording the inputs of the layers in `paths` (static) with
    `flax.linen.intercept_methods`; channels are zero-padded to a _BUCKET multiple, and
    the rows of images with `valid` 0 (batch padding) are zeros. With a `mesh`, the result
    is split over 'data', like the images, positions and `valid` it is given (the
    variables: replicated)."""
    info = {l.path: l for l in table.layers}

    def sample(variables, images, positions, valid, *, paths):
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
                    keep = jnp.repeat(valid > 0, patches.shape[0] // valid.shape[0])[:, None, None]
                    out[path] = jnp.where(keep, _pad_axis(patches, 2, _bucket(patches.shape[2])), 0.0)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            table.model.apply(variables, images, train=False)
        return out

    if mesh is None:
        return jax.jit(sample, static_argnames=("paths",))
    # Called with the variables placed replicated and the rest split over 'data' (`_sample_inputs`):
    # jit partitions the program along its committed arguments (in_shardings excludes static kwargs).
    return jax.jit(sample, static_argnames=("paths",), out_shardings=batch_sharded(mesh))


@functools.lru_cache(maxsize=8)
def _concat_rows(mesh=None):
    """Jitted `concat(chunks, rows=...)`: the chunks stacked along rows, cut to `rows`
    (static); split over 'data' with a `mesh`."""
    concat = lambda chunks, *, rows: jnp.concatenate(chunks)[:rows]
    if mesh is None:
        return jax.jit(concat, static_argnames=("rows",))
    return jax.jit(concat, static_argnames=("rows",), out_shardings=batch_sharded(mesh))


def valid_rows(x, num_images: int, mesh=None) -> int:
    """How many leading rows of a sampled array `x` (from `_input_sampler` over
    `num_images` images on `mesh`) are samples; the rest is zero padding."""
    return x.shape[0] // _round_up(num_images, _devices(mesh)) * num_images


def _sample_inputs(sample, variables, images, positions, paths, batch_size, keep_paths, mesh=None):
    """Runs `sample` over `images` in fixed-size batches (the last one padded with zero
    images, whose rows are zeros); returns the patches of `keep_paths`, the rows of
    round_up(n, devices) images (those past n: zeros), split over 'data' with a `mesh`.
    `paths` (all consumers) stays fixed so that one compiled sampler serves every pass;
    `batch_size` is a multiple of the device count."""
    n = images.shape[0]
    if mesh is not None:
        variables = jax.device_put(variables, replicated(mesh))
    chunks = {p: [] for p in keep_paths}
    per_image = {}
    for start in range(0, n, batch_size):
        nb = min(batch_size, n - start)
        batch = _np_pad(images[start:start + batch_size], 0, batch_size)
        pos = {p: _np_pad(v[start:start + batch_size], 0, batch_size) for p, v in positions.items() if p in paths}
        valid = (np.arange(batch_size) < nb).astype(np.float32)
        if mesh is not None:
            batch, pos, valid = split_rows((batch, pos, valid), mesh)
        else:
            batch = jnp.asarray(batch)
        out = sample(variables, batch, pos, valid, paths=paths)
        for p in keep_paths:
            per_image[p] = out[p].shape[0] // batch_size
            chunks[p].append(out[p])
    padded = _round_up(n, _devices(mesh))
    concat = _concat_rows(mesh)
    return {p: concat(tuple(v), rows=padded * per_image[p]) for p, v in chunks.items()}


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


def _input_sampler(table: ModelTable, images, paths: tuple, positions_per_image: int, seed: int, batch_size: int,
                   mesh=None):
    """`sample_inputs(variables, keep_paths) -> {path: (n, r, c_padded)}` over all of
    `images`, at positions fixed once here (the same for every network sampled).

    The compiled sampler records every layer in `paths`, so one program serves every
    pass and every call on this table; `keep_paths` (a subset) is what is returned.
    With a `mesh` the batches (rounded up to a multiple of its size) are split over
    'data', and so are the results: their first `valid_rows` rows are the samples, the
    rest zeros.
    """
    positions = _sample_positions(table, paths, images.shape[0], positions_per_image, seed)
    sample = _make_sampler(table, mesh)
    batch_size = _round_up(min(batch_size, images.shape[0]), _devices(mesh))
    return lambda variables, keep_paths: _sample_inputs(sample, variables, images, positions, paths, batch_size,
                                                        keep_paths, mesh)
