"""Measured latency model: a lookup table of per-layer latencies on this device.

FLOPs are not time: on XLA a 50%-FLOPs network with odd widths can be slower than
the dense one. This module times each layer shape that a network at given widths
contains (conv or dense + bias + ReLU, jitted, warm-up then median), caches the
timings on disk keyed by device kind and JAX version, and predicts a network's
latency as the sum of its layers' entries (plus a fitted constant per network for
the ops outside conv/dense layers: pooling, residual adds). Hand-written: no
library provides a JAX latency table.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxcompress.bench.timing import interleaved_medians
from jaxcompress.models.table import ModelTable


def device_key() -> str:
    """What a latency table is valid for: device kind, device count, JAX version."""
    d = jax.devices()[0]
    return f"{d.platform}:{d.device_kind}:{jax.device_count()}:jax-{jax.__version__}"


def default_cache_path() -> str:
    root = os.environ.get("JAXCOMPRESS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jaxcompress"))
    return os.path.join(root, "latency_table.json")


def layer_shapes(table: ModelTable, widths: Sequence[int], batch: int) -> list[tuple]:
    """Hashable shape key of every conv/dense layer at these widths."""
    keys = []
    for layer in table.layers:
        cin = int(widths[layer.in_group]) * layer.in_repeat if layer.in_group >= 0 else layer.in_fixed
        cout = int(widths[layer.out_group]) if layer.out_group >= 0 else layer.out_fixed
        in_hw = (layer.out_hw[0] * layer.strides[0], layer.out_hw[1] * layer.strides[1])
        keys.append((layer.kind, batch, in_hw, cin, cout, layer.kernel_size, layer.strides,
                     bool(layer.depthwise)))
    return keys


def _layer_fn(key):
    kind, batch, in_hw, cin, cout, kernel, strides, depthwise = key
    rng = np.random.default_rng(0)
    if kind == "dense":
        x = jnp.asarray(rng.normal(size=(batch, cin)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(cin, cout)), jnp.float32)
        f = jax.jit(lambda x, w: jax.nn.relu(x @ w + 1.0))
    else:
        groups = cin if depthwise else 1
        x = jnp.asarray(rng.normal(size=(batch, *in_hw, cin)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(*kernel, cin // groups, cout)), jnp.float32)
        f = jax.jit(lambda x, w: jax.nn.relu(jax.lax.conv_general_dilated(
            x, w, strides, "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups) + 1.0))
    return lambda: f(x, w)


@dataclasses.dataclass
class LatencyTable:
    """Seconds per layer shape, for one device key; persisted as JSON."""

    device: str
    entries: dict[str, float] = dataclasses.field(default_factory=dict)
    path: str | None = None

    @classmethod
    def load(cls, path: str | None = None) -> "LatencyTable":
        """Loads the cached table; one built on another device or JAX version is
        discarded (with a message) and rebuilt as needed, never used silently."""
        path = path or default_cache_path()
        here = device_key()
        if os.path.exists(path):
            try:
                with open(path) as f:
                    data = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                logging.warning("latency table %s is unreadable (%s); rebuilding it", path, e)
                return cls(here, path=path)
            if data.get("device") == here:
                return cls(here, dict(data.get("entries", {})), path)
            logging.warning("latency table %s was measured on %s, this is %s; rebuilding it",
                            path, data.get("device"), here)
        return cls(here, path=path)

    def save(self) -> None:
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            tmp = f"{self.path}.tmp"
            with open(tmp, "w") as f:
                json.dump({"device": self.device, "entries": self.entries}, f)
            os.replace(tmp, self.path)

    def measure(self, keys: Sequence[tuple], rounds: int = 3) -> None:
        """Times every key not yet in the table (jitted, warm-up, medians)."""
        missing = sorted({repr(k) for k in keys} - set(self.entries))
        for k in missing:
            self.entries[k] = interleaved_medians({"f": _layer_fn(ast.literal_eval(k))}, rounds=rounds, calls=3)["f"]
        if missing:
            self.save()

    def predict(self, table: ModelTable, widths: Sequence[int], batch: int) -> float:
        """Sum of the table's entries over the network's layers (measures what is missing)."""
        keys = layer_shapes(table, widths, batch)
        self.measure(keys)
        return float(sum(self.entries[repr(k)] for k in keys))
