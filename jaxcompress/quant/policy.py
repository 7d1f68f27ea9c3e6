"""Bit-width policies: the `quant` collection from a uniform value or per-layer dict."""
from __future__ import annotations

import json
from typing import Mapping

import jax.numpy as jnp

from jaxcompress import files
from jaxcompress.errors import ConfigError
from jaxcompress.models.table import ModelTable
from jaxcompress.quant.quantizers import FLOAT_BITS

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


# ------------------------------------------------------------------------------------------------
# Supported bit widths and the policy file (what the RL search writes, what `quantize` reads).
# ------------------------------------------------------------------------------------------------

POLICY_FORMAT = "jaxcompress.quant_policy/1"
SUPPORTED_BITS_W = tuple(range(1, 9)) + (32,)  # 32: the layer stays float32
SUPPORTED_BITS_A = tuple(range(2, 9)) + (32,)  # 32: the layer's input is not quantized


def _as_bits(value, name: str, where: str, supported: tuple[int, ...]) -> int:
    try:
        b = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} for {where} is {value!r}, not a number of bits") from None
    if b != int(b) or int(b) not in supported:
        raise ConfigError(f"{name}={value!r} for {where} is outside the supported bit widths "
                          f"{supported[0]}..{supported[-2]} (or 32 = float)")
    return int(b)


def layer_bits(table: ModelTable, default, overrides: Mapping | None, name: str) -> dict[str, int]:
    """{layer path: bits} for every layer: `default` (a number) overridden by `overrides`
    ({layer path: bits}); ConfigError for unknown layers and unsupported widths."""
    supported = SUPPORTED_BITS_W if name == "bits_w" else SUPPORTED_BITS_A
    paths = [layer.path for layer in table.layers]
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(paths))
    if unknown:
        raise ConfigError(f"{name} names unknown layers {unknown}; layers are: {', '.join(paths)}")
    out = {p: _as_bits(default, name, "every layer", supported) for p in paths}
    out.update({p: _as_bits(b, name, f"layer {p}", supported) for p, b in overrides.items()})
    return out


def resolve_bits(table: ModelTable, bits_w=8, bits_a=FLOAT_BITS, *, layer_bits_w: Mapping | None = None,
                 layer_bits_a: Mapping | None = None, policy: str = "", model: str | None = None
                 ) -> tuple[dict[str, int], dict[str, int]]:
    """({layer path: bits_w}, {layer path: bits_a}) for every layer of `table`: the uniform
    `bits_w` / `bits_a`, overridden by `layer_bits_w` / `layer_bits_a` ({layer path: bits}),
    then by the policy file `policy` (if given; checked by `read_policy` against `table`
    and `model`). ConfigError for unknown layers and unsupported widths.

        bits_w, bits_a = resolve_bits(table, policy="bits_policy.json")   # layers it leaves out: 8 / float
    """
    overrides_w, overrides_a = dict(layer_bits_w or {}), dict(layer_bits_a or {})
    if policy:
        read = read_policy(policy, table, model)
        overrides_w.update(read.get("bits_w", {}))
        overrides_a.update(read.get("bits_a", {}))
    return layer_bits(table, bits_w, overrides_w, "bits_w"), layer_bits(table, bits_a, overrides_a, "bits_a")


def write_policy(path: str, bits_w: Mapping[str, int], bits_a: Mapping[str, int] | None = None, *,
                 model: str | None = None, widths=None, **info) -> dict:
    """Writes a policy file (JSON, format `jaxcompress.quant_policy/1`):

        {"format": "jaxcompress.quant_policy/1",
         "model": "resnet20",                 # optional: checked against config.model.name
         "widths": [16, 32, ...],             # optional: checked against the network's widths
         "bits_w": {"stem_conv": 8, ...},     # layer path -> weight bits (1..8, 32 = float)
         "bits_a": {"stem_conv": 8, ...},     # optional: layer path -> input activation bits (2..8, 32)
         ...}                                 # any other keys (reward, accuracy, search step) are kept as info

    Layers a policy leaves out take the config's uniform `quant.bits_w` / `quant.bits_a`.
    """
    policy = {"format": POLICY_FORMAT, "bits_w": {k: int(v) for k, v in bits_w.items()}}
    if bits_a is not None:
        policy["bits_a"] = {k: int(v) for k, v in bits_a.items()}
    if model is not None:
        policy["model"] = model
    if widths is not None:
        policy["widths"] = [int(w) for w in widths]
    policy.update(info)
    files.write_atomic(path, json.dumps(policy, indent=2, sort_keys=True))
    return policy


def read_policy(path: str, table: ModelTable, model: str | None = None) -> dict:
    """Reads and checks a policy file against `table` (and the model name); returns the
    dict with `bits_w` / `bits_a` ({layer: bits}, possibly partial)."""
    if not files.is_file(path):
        raise ConfigError(f"quant.policy file {path} does not exist")
    try:
        policy = json.loads(files.read_text(path))
    except (OSError, ValueError) as e:
        raise ConfigError(f"quant.policy file {path} is not valid JSON ({e})") from None
    if not isinstance(policy, dict) or policy.get("format") != POLICY_FORMAT:
        raise ConfigError(f"quant.policy file {path} is not a '{POLICY_FORMAT}' policy (its 'format' key)")
    if model is not None and policy.get("model", model) != model:
        raise ConfigError(f"quant.policy file {path} is for model '{policy['model']}', not '{model}'")
    if "widths" in policy and [int(w) for w in policy["widths"]] != [int(w) for w in table.widths]:
        raise ConfigError(f"quant.policy file {path} is for widths {policy['widths']}, but the network "
                          f"has widths {list(table.widths)}")
    for name in ("bits_w", "bits_a"):
        if name in policy and not isinstance(policy[name], dict):
            raise ConfigError(f"quant.policy file {path}: '{name}' must be a {{layer: bits}} object")
        layer_bits(table, 32, policy.get(name), name)  # names and ranges
    return policy
