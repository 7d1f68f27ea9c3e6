"""Measured latency model: a lookup table of per-layer latencies on this device.

FLOPs are not time: on XLA a 50%-FLOPs network with odd widths can be slower than
the dense one. This module times each layer shape that a network at given widths
contains (conv or dense + bias + ReLU, jitted, warm-up then median), caches the
timings on disk keyed by device kind and JAX version, and predicts a network's
latency as the sum of its layers' entries, scaled and offset by an affine fit to
measured whole-network latencies (`LatencyModel`: the ops outside conv/dense layers,
BatchNorm, pooling, residual adds, grow with the widths too). `LatencyGrid` is the
same model as a jittable function of the widths, for the RL environment's wall. Hand-written: no
library provides a JAX latency table.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from jaxcompress.distributed import is_primary
from jaxcompress.timing import forward_latencies, interleaved_medians
from jaxcompress.errors import ConfigError
from jaxcompress.models.table import ModelTable
from jaxcompress.storage import canonical_json, sha256_hex


def device_key() -> str:
    """What a latency table is valid for: device kind, device count, JAX version."""
    d = jax.devices()[0]
    return f"{d.platform}:{d.device_kind}:{jax.device_count()}:jax-{jax.__version__}"


def default_cache_path() -> str:
    root = os.environ.get("JAXCOMPRESS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jaxcompress"))
    return os.path.join(root, "latency_table.json")


def layer_key(layer, widths: Sequence[int], batch: int) -> tuple:
    """Hashable shape key of one conv/dense layer (a `LayerInfo`) at these widths."""
    cin = int(widths[layer.in_group]) * layer.in_repeat if layer.in_group >= 0 else layer.in_fixed
    cout = int(widths[layer.out_group]) if layer.out_group >= 0 else layer.out_fixed
    in_hw = (layer.out_hw[0] * layer.strides[0], layer.out_hw[1] * layer.strides[1])
    return (layer.kind, batch, in_hw, cin, cout, layer.kernel_size, layer.strides, bool(layer.depthwise))


def layer_shapes(table: ModelTable, widths: Sequence[int], batch: int) -> list[tuple]:
    """`layer_key` of every conv/dense layer at these widths (a shared layer's once per
    application)."""
    return [layer_key(layer, widths, batch) for layer in table.layers for _ in range(layer.calls)]


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


def _body_sha256(body: dict) -> str:
    """sha256 of the canonical JSON of a table's device, entries and fits (floats
    round-trip exactly through JSON, so a loaded table hashes to the saved value)."""
    return sha256_hex(canonical_json(body))


def _table_problem(data) -> str | None:
    """What is wrong with a loaded latency-table file, or None."""
    if not isinstance(data, dict) or not isinstance(data.get("device"), str):
        return "no device key"
    body = {k: data.get(k, {}) for k in ("device", "entries", "fits")}
    if "sha256" in data and data["sha256"] != _body_sha256(body):
        return "its sha256 does not match its content"
    entries, fits = body["entries"], body["fits"]
    if not isinstance(entries, dict) or not all(
            isinstance(v, (int, float)) and np.isfinite(v) and v >= 0 for v in entries.values()):
        return "an entry is not a number of seconds"
    if not isinstance(fits, dict) or not all(
            isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) and np.isfinite(x) for x in v)
            for v in fits.values()):
        return "a fit is not a (scale, offset) pair"
    return None


@dataclasses.dataclass
class LatencyTable:
    """Seconds per layer shape, for one device key; persisted as JSON. `fits` keeps the
    fitted (scale, offset) of each `LatencyModel.fit`, so a network's model is measured
    once per device and every later run predicts the same."""

    device: str
    entries: dict[str, float] = dataclasses.field(default_factory=dict)
    path: str | None = None
    fits: dict[str, list[float]] = dataclasses.field(default_factory=dict)

    @classmethod
    def load(cls, path: str | None = None) -> "LatencyTable":
        """Loads the cached table; one built on another device or JAX version, or one that
        is corrupt (its sha256 does not match, or it is not a table of finite
        seconds), is discarded (with a message) and rebuilt as needed, never used silently.
        A table saved before checksums (no "sha256") is checked for its shape only."""
        path = path or default_cache_path()
        here = device_key()
        if os.path.exists(path):
            try:
                with open(path) as f:
                    data = json.load(f)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                logging.warning("latency table %s is unreadable (%s); rebuilding it", path, e)
                return cls(here, path=path)
            problem = _table_problem(data)
            if problem:
                logging.warning("latency table %s is corrupt (%s); rebuilding it", path, problem)
                return cls(here, path=path)
            if data["device"] == here:
                return cls(here, dict(data.get("entries", {})), path,
                           {k: list(v) for k, v in data.get("fits", {}).items()})
            logging.warning("latency table %s was measured on %s, this is %s; rebuilding it",
                            path, data.get("device"), here)
        return cls(here, path=path)

    def save(self) -> None:
        if self.path and is_primary():  # one writer on many hosts
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            tmp = f"{self.path}.tmp"
            body = {"device": self.device, "entries": self.entries, "fits": self.fits}
            with open(tmp, "w") as f:
                json.dump({**body, "sha256": _body_sha256(body)}, f)
            os.replace(tmp, self.path)

    def measure(self, keys: Sequence[tuple], rounds: int = 3) -> None:
        """Times every key not yet in the table (jitted, warm-up, medians), saving as it goes."""
        missing = sorted({repr(k) for k in keys} - set(self.entries))
        for i, k in enumerate(tqdm(missing, desc="latency table", disable=None if len(missing) > 8 else True)):
            self.entries[k] = interleaved_medians({"f": _layer_fn(ast.literal_eval(k))}, rounds=rounds, calls=3)["f"]
            if (i + 1) % 16 == 0:
                self.save()  # an interrupted build keeps what it measured
        if missing:
            self.save()

    def predict(self, table: ModelTable, widths: Sequence[int], batch: int) -> float:
        """Sum of the table's entries over the network's layers (measures what is missing)."""
        keys = layer_shapes(table, widths, batch)
        self.measure(keys)
        return float(sum(self.entries[repr(k)] for k in keys))


def random_variables(model, input_shape: tuple, seed: int = 0) -> dict:
    """Variables with `model.init`'s shapes drawn with numpy (no init compile): for
    timing, where the values do not matter."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *input_shape)), train=False))
    rng = np.random.default_rng(seed)

    def leaf(path, a):  # He-normal kernels, unit scales / variances / masks, zero shifts
        if len(a.shape) >= 2 and path[-1].key == "kernel":
            return jnp.asarray(rng.normal(0.0, np.sqrt(2.0 / np.prod(a.shape[:-1])), a.shape), a.dtype)
        ones = path[0].key == "masks" or path[-1].key in ("scale", "var")
        return jnp.ones(a.shape, a.dtype) if ones else jnp.zeros(a.shape, a.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def measure_networks(table: ModelTable, widths_list: Sequence[Sequence[int]], batch: int,
                     rounds: int = 3) -> list[float]:
    """Measured forward seconds per batch of the network at each widths vector
    (jitted, interleaved medians; masks all ones)."""
    lat = measured_latency({str(i): table.model.clone(widths=tuple(int(v) for v in w))
                            for i, w in enumerate(widths_list)}, table.input_shape, batch, rounds)
    return [lat[str(i)] for i in range(len(widths_list))]


def measured_latency(models: dict, input_shape: tuple, batch: int, rounds: int = 5) -> dict[str, float]:
    """Measured forward seconds per batch of each `name -> model` (random weights of
    the model's shapes; jitted, interleaved medians); {} when `batch` is 0 (off)."""
    if not batch:
        return {}
    nets = {k: (m, random_variables(m, input_shape, i)) for i, (k, m) in enumerate(models.items())}
    return forward_latencies(nets, input_shape, batch, rounds)


@dataclasses.dataclass
class LatencyModel:
    """Predicted seconds per forward batch of `table`'s network at any widths:
    `scale * sum(layer entries) + offset`, the affine map fitted by least squares to
    measured whole-network latencies (`fit`); scale 1, offset 0 before fitting."""

    lut: LatencyTable
    table: ModelTable
    batch: int
    scale: float = 1.0
    offset: float = 0.0

    def layer_sum(self, widths: Sequence[int]) -> float:
        return self.lut.predict(self.table, widths, self.batch)

    def __call__(self, widths: Sequence[int]) -> float:
        return self.scale * self.layer_sum(widths) + self.offset

    def fraction(self, widths: Sequence[int]) -> float:
        """Predicted latency as a fraction of the dense network's."""
        return self(widths) / self(self.table.widths)

    def fit(self, widths_list: Sequence[Sequence[int]], rounds: int = 3, refit: bool = False) -> "LatencyModel":
        """Fits (scale, offset) to the measured latency at these widths (>= 2 vectors);
        a fit of the same network and widths cached in the table is reused unless `refit`."""
        key = hashlib.sha1(repr((type(self.table.model).__name__, self.batch,
                                 [layer_shapes(self.table, w, self.batch) for w in widths_list])).encode()).hexdigest()
        if key in self.lut.fits and not refit:
            self.scale, self.offset = self.lut.fits[key]
            return self
        measured = np.asarray(measure_networks(self.table, widths_list, self.batch, rounds))
        sums = np.asarray([self.layer_sum(w) for w in widths_list])
        A = np.stack([sums, np.ones_like(sums)], 1)
        self.scale, self.offset = (float(v) for v in np.linalg.lstsq(A, measured, rcond=None)[0])
        self.lut.fits[key] = [self.scale, self.offset]
        self.lut.save()
        return self


def latency_model(table: ModelTable, batch: int, groups: Sequence[int], min_widths: Sequence[int],
                  path: str | None = None) -> LatencyModel:
    """A `LatencyModel` for `table` on this device: the cached layer table (built as
    needed), fitted on the dense network and on `min_widths` (the smallest widths
    the caller allows) and their midpoint."""
    mid = [int(a) if g not in groups else int(round((a + b) / 2)) for g, (a, b) in
           enumerate(zip(table.widths, min_widths))]
    return LatencyModel(LatencyTable.load(path), table, batch).fit([list(table.widths), mid, list(min_widths)])


def check_latency_budget(budget: float, name: str) -> None:
    if not 0.0 < budget <= 1.0:
        raise ConfigError(f"{name}={budget:g} must be a fraction of the dense network's latency in (0, 1] "
                          f"(or 0 for none)")


class LatencyGrid:
    """`LatencyModel` as a jittable function of the (float) group widths, for in-graph
    budgets (the RL environment's wall): each conv/dense layer's entry is tabulated on
    a grid of at most `max_points` allowed counts per channel group (from
    `counts[g]`, ascending, both ends kept) and interpolated bilinearly in (input,
    output) channels between grid points; at grid points it equals the table."""

    def __init__(self, model: LatencyModel, counts: Sequence[Sequence[int]], max_points: int = 6):
        table = model.table
        self.scale, self.offset = model.scale, model.offset
        self.axes = []
        for c in counts:
            c = np.asarray(sorted(set(int(v) for v in c)), np.float64)
            if c.size > max_points:
                c = c[np.unique(np.round(np.linspace(0, c.size - 1, max_points)).astype(int))]
            self.axes.append(c)
        self.layers = []
        keys_needed = []
        for layer in table.layers:
            ax_in = self.axes[layer.in_group] if layer.in_group >= 0 else np.asarray([0.0])
            ax_out = self.axes[layer.out_group] if layer.out_group >= 0 else np.asarray([0.0])
            grid_keys = [[None] * len(ax_out) for _ in ax_in]
            for i, ci in enumerate(ax_in):
                for j, co in enumerate(ax_out):
                    w = list(table.widths)
                    if layer.in_group >= 0:
                        w[layer.in_group] = int(ci)
                    if layer.out_group >= 0:
                        w[layer.out_group] = int(co)
                    grid_keys[i][j] = layer_key(layer, w, model.batch)
                    keys_needed.append(grid_keys[i][j])
            self.layers.append((layer.in_group, layer.out_group, ax_in, ax_out, grid_keys))
        model.lut.measure(keys_needed)
        self.values = [layer.calls * np.asarray([[model.lut.entries[repr(k)] for k in row] for row in keys], np.float64)
                       for layer, (*_, keys) in zip(table.layers, self.layers)]

    @staticmethod
    def _interp_index(axis: np.ndarray, x):
        if axis.size == 1:
            return jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32)
        i = jnp.clip(jnp.searchsorted(jnp.asarray(axis, jnp.float32), x, side="right") - 1, 0, axis.size - 2)
        lo, hi = jnp.asarray(axis, jnp.float32)[i], jnp.asarray(axis, jnp.float32)[i + 1]
        return i, jnp.clip((x - lo) / (hi - lo), 0.0, 1.0)

    def __call__(self, widths):
        """Predicted seconds per batch at these group widths (jnp; jittable, vmappable)."""
        widths = jnp.asarray(widths, jnp.float32)
        total = 0.0
        for (gi, go, ax_in, ax_out, _), v in zip(self.layers, self.values):
            v = jnp.asarray(np.pad(v, ((0, ax_in.size == 1), (0, ax_out.size == 1)), mode="edge"), jnp.float32)
            i, fi = self._interp_index(ax_in, widths[gi] if gi >= 0 else 0.0)
            j, fj = self._interp_index(ax_out, widths[go] if go >= 0 else 0.0)
            total = total + ((1 - fi) * (1 - fj) * v[i, j] + fi * (1 - fj) * v[i + 1, j]
                             + (1 - fi) * fj * v[i, j + 1] + fi * fj * v[i + 1, j + 1])
        return self.scale * total + self.offset
