"""Bit-width policies: the `quant` collection from a uniform value or per-layer dict."""
from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp

from jaxcompress.errors import ConfigError
from jaxcompress.models.table import ModelTable

BITS_W_RANGE = (1, 32)
BITS_A_RANGE = (2, 32)


def _per_layer(table: ModelTable, bits, name: str, valid: tuple[int, int]) -> dict[str, float]:
    paths = [layer.path for layer in table.layers]
    if isinstance(bits, Mapping):
        unknown = sorted(set(bits) - set(paths))
        if unknown:
            raise ConfigError(f"{name} names unknown layers {unknown}; layers are: {', '.join(paths)}")
        values = {p: float(bits[p]) for p in paths if p in bits}
    else:
        values = {p: float(bits) for p in paths}
    for p, b in values.items():
        if not valid[0] <= b <= valid[1]:
            raise ConfigError(f"{name}={b:g} for layer {p} is outside the supported {valid[0]}..{valid[1]} bits")
    return values


def make_quant(table: ModelTable, bits_w=None, bits_a=None) -> dict:
    """The `quant` collection: each of `bits_w` / `bits_a` is None (full precision),
    one number for every layer, or a {layer path: bits} dict for some layers."""
    quant: dict = {}
    for key, bits, valid in (("bits_w", bits_w, BITS_W_RANGE), ("bits_a", bits_a, BITS_A_RANGE)):
        if bits is None:
            continue
        for path, b in _per_layer(table, bits, key, valid).items():
            node = quant
            for part in path.split("/"):
                node = node.setdefault(part, {})
            node[key] = jnp.asarray(b, jnp.float32)
    return quant
