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
def _batch_stats_fn(apply_fn, sample_size: int):
    signed: dict[str, bool] = {}

    @jax.jit
    def stats(variables, x, key):
        out = {}
        for i, (path, (a, is_signed)) in enumerate(record_layer_inputs(apply_fn, variables, x).items()):
            signed[path] = is_signed
            flat = a.reshape(-1).astype(jnp.float32)
            v = jnp.abs(flat) if is_signed else jnp.maximum(flat, 0.0)
            idx = jax.random.randint(jax.random.fold_in(key, i), (sample_size,), 0, flat.size)
            out[path] = {"max": v.max(), "min": flat.min(), "sample": v[idx]}
        return out

    return stats, signed


def mse_optimal_range(values: np.ndarray, bits: float, signed: bool, max_value: float, grid: int = 100) -> float:
    """The clip value in {max * k / grid : k = 1..grid} minimising the MSE of quantizing `values`
    (non-negative magnitudes) at `bits`."""
    v = jnp.asarray(values, jnp.float32)
    candidates = jnp.asarray(max(max_value, 1e-12) * np.arange(1, grid + 1) / grid, jnp.float32)
    quant = fake_quant_symmetric if signed else fake_quant_unsigned
    errors = jax.jit(jax.vmap(lambda r: jnp.mean((quant(v, bits, r) - v) ** 2)))(candidates)
    return float(candidates[int(jnp.argmin(errors))])


def calibrate_ranges(apply_fn, variables: Mapping, batches, method: str = "minmax", percentile: float = 99.99,
                     sample_size: int = 65536, mse_grid: int = 100, seed: int = 0) -> tuple[dict, dict]:
    """Returns `(quant, report)`: `variables["quant"]` with `range_a` set for every layer whose
    `bits_a` < 32, and per layer {range, max, min, signed}.

    `apply_fn(variables, x, train=False)` runs the network (e.g. `make_quantized_apply`'s);
    `batches` is a sequence of normalised input arrays. Activations are recorded in float
    (each layer's input quantization is switched off while calibrating).
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
        stats_fn, signed = _batch_stats_fn(apply_fn, sample_size)  # one compilation per network
    except TypeError:  # an unhashable apply function
        stats_fn, signed = _batch_stats_fn.__wrapped__(apply_fn, sample_size)
    acc: dict[str, dict] = {}
    key = jax.random.key(seed)
    for b, x in enumerate(batches):
        x = jnp.asarray(x)
        if x.shape[0] == 0:
            raise ConfigError("calibration data is empty: a calibration batch has no examples")
        stats = jax.device_get(stats_fn(calib_vars, x, jax.random.fold_in(key, b)))
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
