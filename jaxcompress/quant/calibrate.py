"""Activation range calibration: the clip value `range_a` of every quantized layer input.

Run the (weight-quantized, activation-float) network on a few batches, record each
Conv / Dense layer's input (through `flax.linen.intercept_methods`, so any model
built from `jaxcompress.layers` works) and choose the clip value by

* `minmax`: the largest value seen (|x| for the signed first layer);
* `percentile`: that percentile of the values (e.g. 99.99), robust to outliers;
* `mse`: the candidate clip value (`mse_grid` of them, evenly spaced up to the
  largest value) whose fake quantization at the layer's `bits_a` has the smallest
  mean squared error on the recorded values (the "MSE-optimal" clipping of e.g.
  Banner et al. 2019, searched rather than solved).

Percentile and MSE use a fixed-size random sample of every batch's values per layer.
The result is written into the `quant` collection as `range_a` (what the layers use).

With a `mesh` (a 1-D ('data',) mesh, e.g. `Experiment.mesh`) the collection runs data
parallel: each batch is split over the devices (`P('data')`), the variables are
replicated, and the per-layer max / min are all-reduced while the random sample (the
same indices as on one device) gathers the chosen values. A batch that does not divide
by the device count is padded with zero images that are masked out of the max, the min
and the sample, so the statistics are those of the real images.
"""
from __future__ import annotations

import functools
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from jaxcompress.errors import ConfigError
from jaxcompress.layers import Conv, Dense, DenseGeneral, fake_quant_symmetric, fake_quant_unsigned
from jaxcompress.quant.quantizers import FLOAT_BITS
from jaxcompress.train.steps import replicated, split_rows

CALIBRATIONS = ("minmax", "percentile", "mse")


def check_calibration(method: str, batches, percentile: float = 99.99) -> None:
    if method not in CALIBRATIONS:
        raise ConfigError(f"unknown quant.calibration '{method}'; choose one of {', '.join(CALIBRATIONS)}")
    if not 0.0 < percentile <= 100.0:
        raise ConfigError(f"quant.percentile={percentile:g} is outside (0, 100]")
    if batches is not None and len(batches) == 0:
        raise ConfigError("calibration data is empty: give at least one non-empty batch "
                          "(quant.calib_batches > 0, quant.calib_batch_size > 0, a non-empty training split)")


def record_layer_inputs(apply_fn, variables, x) -> dict[str, tuple[jax.Array, bool]]:
    """{layer path: (input array, signed grid?)} for every Conv / Dense / DenseGeneral call of one
    forward pass."""
    records: dict[str, tuple[jax.Array, bool]] = {}

    def record(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, (Conv, Dense, DenseGeneral)):
            records["/".join(mod.path)] = (args[0], bool(mod.signed_input))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        apply_fn(variables, x, train=False)
    return records


@functools.lru_cache(maxsize=16)
def _batch_stats_fn(apply_fn, sample_size: int, mesh=None):
    """(jitted `stats(variables, x, key, num_valid=...)`, {layer: signed}): each layer's
    input max / min and `sample_size` random values over the first `num_valid` (static)
    examples of the batch `x` (the rest: padding). With a `mesh`, `x` comes split over
    'data', the variables replicated, and the results are replicated."""
    signed: dict[str, bool] = {}

    def stats(variables, x, key, *, num_valid):
        out = {}
        for i, (path, (a, is_signed)) in enumerate(record_layer_inputs(apply_fn, variables, x).items()):
            signed[path] = is_signed
            flat = a.reshape(-1).astype(jnp.float32)
            v = jnp.abs(flat) if is_signed else jnp.maximum(flat, 0.0)
            size = flat.size
            v_max, flat_min = v.max(), flat.min()
            if num_valid < x.shape[0]:  # padded batch: the real examples' values come first
                if a.shape[0] != x.shape[0]:
                    raise ValueError(f"calibration: layer {path}'s input has {a.shape[0]} rows for a batch of "
                                     f"{x.shape[0]}; cannot mask the padding of an unbatched input")
                size = flat.size // x.shape[0] * num_valid
                real = jnp.arange(flat.size) < size
                v_max, flat_min = jnp.where(real, v, 0.0).max(), jnp.where(real, flat, jnp.inf).min()
            idx = jax.random.randint(jax.random.fold_in(key, i), (sample_size,), 0, size)
            out[path] = {"max": v_max, "min": flat_min, "sample": v[idx]}
        return out

    if mesh is None:
        return jax.jit(stats, static_argnames=("num_valid",)), signed
    # Called with `x` split over 'data' and the variables replicated (`calibrate_ranges`): jit
    # partitions the program along its committed arguments (in_shardings excludes static kwargs).
    return jax.jit(stats, static_argnames=("num_valid",), out_shardings=replicated(mesh)), signed


def mse_optimal_range(values: np.ndarray, bits: float, signed: bool, max_value: float, grid: int = 100) -> float:
    """The clip value in {max * k / grid : k = 1..grid} minimising the MSE of quantizing `values`
    (non-negative magnitudes) at `bits`."""
    v = jnp.asarray(values, jnp.float32)
    candidates = jnp.asarray(max(max_value, 1e-12) * np.arange(1, grid + 1) / grid, jnp.float32)
    errors = _quantization_errors(v, jnp.float32(bits), candidates, signed=bool(signed))
    return float(candidates[int(jnp.argmin(errors))])


@functools.partial(jax.jit, static_argnames=("signed",))
def _quantization_errors(v, bits, candidates, *, signed: bool):
    """The MSE of quantizing `v` at `bits` with each clip value of `candidates`; one
    compilation serves every layer (same sample count)."""
    quant = fake_quant_symmetric if signed else fake_quant_unsigned
    return jax.vmap(lambda r: jnp.mean((quant(v, bits, r) - v) ** 2))(candidates)


def calibrate_ranges(apply_fn, variables: Mapping, batches, method: str = "minmax", percentile: float = 99.99,
                     sample_size: int = 65536, mse_grid: int = 100, seed: int = 0, *, mesh=None
                     ) -> tuple[dict, dict]:
    """Returns `(quant, report)`: `variables["quant"]` with `range_a` set for every layer whose
    `bits_a` < 32, and per layer {range, max, min, signed}.

    `apply_fn(variables, x, train=False)` runs the network (e.g. `make_quantized_apply`'s);
    `batches` is a sequence of normalised input arrays. Activations are recorded in float
    (each layer's input quantization is switched off while calibrating). `mesh`: a 1-D
    ('data',) mesh to split each batch over (module docstring; any batch size: padded and
    masked); None: one device.
    """
    check_calibration(method, batches, percentile)
    quant = dict(variables.get("quant") or {})
    flat_q = dict(traverse_util.flatten_dict(quant))
    bits_a = {"/".join(k[:-1]): float(v) for k, v in flat_q.items() if k[-1] == "bits_a"}
    targets = {p: b for p, b in bits_a.items() if b < FLOAT_BITS}
    if not targets:
        return quant, {}
    weight_only = {k: v for k, v in flat_q.items() if k[-1] not in ("bits_a", "range_a")}
    calib_vars = {**variables, "quant": traverse_util.unflatten_dict(weight_only)} if weight_only else \
        {k: v for k, v in variables.items() if k != "quant"}
    try:
        stats_fn, signed = _batch_stats_fn(apply_fn, sample_size, mesh)  # one compilation per network
    except TypeError:  # an unhashable apply function
        stats_fn, signed = _batch_stats_fn.__wrapped__(apply_fn, sample_size, mesh)
    if mesh is not None:
        calib_vars = jax.device_put(calib_vars, replicated(mesh))
    devices = 1 if mesh is None else mesh.size
    acc: dict[str, dict] = {}
    key = jax.random.key(seed)
    for b, x in enumerate(batches):
        x = jnp.asarray(x) if mesh is None else np.asarray(x)
        num_valid = x.shape[0]
        if num_valid == 0:
            raise ConfigError("calibration data is empty: a calibration batch has no examples")
        if mesh is not None:  # zero images up to a multiple of the devices, masked out in `stats_fn`
            x = split_rows(np.pad(x, [(0, -num_valid % devices)] + [(0, 0)] * (x.ndim - 1)), mesh)
        stats = jax.device_get(stats_fn(calib_vars, x, jax.random.fold_in(key, b), num_valid=num_valid))
        for path, s in stats.items():
            a = acc.setdefault(path, {"max": 0.0, "min": np.inf, "samples": []})
            a["max"] = max(a["max"], float(s["max"]))
            a["min"] = min(a["min"], float(s["min"]))
            a["samples"].append(np.asarray(s["sample"]))
    report = {}
    for path, bits in targets.items():
        if path not in acc:
            raise ConfigError(f"layer {path} has bits_a but was not called in the forward pass")
        a = acc[path]
        values = np.concatenate(a["samples"])
        if method == "minmax":
            r = a["max"]
        elif method == "percentile":
            r = float(np.percentile(values, percentile))
        else:
            r = mse_optimal_range(values, bits, signed[path], a["max"], mse_grid)
        r = max(r, 1e-8)
        if a["min"] < 0 and not signed[path]:
            logging.warning("layer %s quantizes its input on the unsigned grid but saw negative inputs "
                            "(min %.3g): they are clipped to 0", path, a["min"])
        flat_q[tuple(path.split("/")) + ("range_a",)] = jnp.asarray(r, jnp.float32)
        report[path] = {"range": r, "max": a["max"], "min": a["min"], "signed": signed[path], "bits_a": bits}
    return traverse_util.unflatten_dict(flat_q), report
