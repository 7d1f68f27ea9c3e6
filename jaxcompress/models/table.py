"""The layer table: which axis of which variable belongs to which channel group.

Hand-written (no library does this). Every zoo model is a function of a flat
`widths` tuple, one entry per channel group (see `jaxcompress.models.common`). To
find the groups we build the model abstractly (`jax.eval_shape`, no FLOPs, no
memory) twice, with every width replaced by a distinct prime above 1000, a
different prime in each probe. A size equal in both probes is fixed (image
channels, classes, kernel taps), even when it happens to be a multiple of a probe
prime (2,018 classes). A size of p_g * r in both probes (same g, same r < 1000)
is group g repeated r times, which is how a conv map of r = H*W positions
flattened into a Dense layer looks (NHWC flattening: row s * C + c). This works
for any model that follows the widths rule, including users' own, and is checked
by surgery tests on the whole zoo.

Transformers: `MultiHeadDotProductAttention`'s heads are a channel group when its
`num_heads` is a width and `head_dim` is fixed (query / key / value kernels
(d, heads, head_dim), out kernel (heads, head_dim, d)); `LayerNorm` / `RMSNorm`
normalise over their channel group's kept channels only; an `Embed`'s feature
axis can be a group. The attention's score and value products (2 x heads x
head_dim x query rows x keys MACs) and `Embed.attend` are costed as `extra_macs`;
every parameter not in a Conv / Dense layer (norms, embeddings, a model's own
parameters such as a class token) as `extra_params`.

What `describe` cannot prove correct it refuses with one line naming the layer
(`UnsupportedModelError`): a concatenation of channel groups, a width derived from
another (`4 * w`; give the transformer MLP's hidden width its own entry in
widths), a plain Flax norm, attention, embedding, `Conv` or `Dense` layer over a
channel group, grouped convolutions, 1-D/3-D convolutions, a norm whose
statistics span a channel group outside its feature axes, a `DenseGeneral` whose
later output axes or several input axes are channel groups, attention with a
decode cache or with a sequence length that depends on the widths.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxcompress.layers import (BatchNorm, Conv, Dense, DenseGeneral, Embed, InformationDropout, LayerNorm,
                                MultiHeadDotProductAttention, RMSNorm)

_MAX_REPEAT = 1000
_PROBE_START = 1000


class UnsupportedModelError(ValueError):
    """`describe` met a structure it cannot describe exactly (one line: layer and reason)."""


# Flax layers that mix or own channels: over a channel group they would make the
# masked network differ from the shrunk one (or go uncounted), so `describe` refuses
# them there. {class name: what to do instead}.
_PLAIN_LAYERS = {
    "Conv": "use jaxcompress.layers.Conv (same arguments)",
    "Dense": "use jaxcompress.layers.Dense (same arguments)",
    "BatchNorm": "use jaxcompress.layers.BatchNorm (same arguments)",
    "DenseGeneral": "use jaxcompress.layers.DenseGeneral (same arguments)",
    "Einsum": "plain Einsum layers are not supported yet",
    "ConvTranspose": "transposed convolutions are not supported yet",
    "ConvLocal": "locally connected convolutions are not supported yet",
    "Embed": "its lookups would not be masked; use jaxcompress.layers.Embed (same arguments)",
    "MultiHeadDotProductAttention": "use jaxcompress.layers.MultiHeadDotProductAttention (same arguments)",
    "LayerNorm": "pruned channels would enter its statistics, plain norms over a channel group are not supported "
                 "yet: use jaxcompress.layers.LayerNorm (same arguments)",
    "RMSNorm": "pruned channels would enter its statistics, plain norms over a channel group are not supported "
               "yet: use jaxcompress.layers.RMSNorm (same arguments)",
    "GroupNorm": "pruned channels would enter its statistics; norms over a channel group are not supported yet",
    "InstanceNorm": "pruned channels would enter its statistics; norms over a channel group are not supported yet",
    "SpectralNorm": "weight normalisations over a channel group are not supported yet",
    "WeightNorm": "weight normalisations over a channel group are not supported yet",
}
_PLAIN_CLASSES = tuple(getattr(nn, n) for n in _PLAIN_LAYERS if hasattr(nn, n))
_DROP_INS = (Conv, Dense, DenseGeneral, BatchNorm, LayerNorm, RMSNorm, Embed, MultiHeadDotProductAttention)
_WEIGHT_LAYERS = (Conv, Dense, DenseGeneral)


def _primes_above(start: int, count: int) -> tuple[int, ...]:
    primes, n = [], start
    while len(primes) < count:
        n += 1
        if all(n % d for d in range(2, int(n ** 0.5) + 1)):
            primes.append(n)
    return tuple(primes)


@dataclasses.dataclass(frozen=True)
class AxisGroup:
    """Axis of size widths[group] * repeat, channel index fastest (NHWC flatten)."""

    group: int
    repeat: int = 1


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """Geometry of one Conv / Dense / DenseGeneral layer; in/out group -1 means a fixed size.

    Inputs: `in_group` x `in_repeat` channels (or `in_fixed`); outputs:
    `out_group` x `out_repeat` (or `out_fixed`). `out_ndim` is the number of
    trailing kernel axes that index outputs: 1 for Conv / Dense; 2 for an
    attention projection (heads, head_dim), whose out group is the heads and
    out_repeat the head_dim. The kernel's own axes are in `ModelTable.axes`.
    """

    path: str
    kind: str  # "conv" | "dense"
    kernel_size: tuple[int, int]
    strides: tuple[int, int]
    out_hw: tuple[int, int]
    in_group: int
    in_repeat: int
    in_fixed: int
    out_group: int
    out_fixed: int
    depthwise: bool
    use_bias: bool
    out_repeat: int = 1
    out_ndim: int = 1
    calls: int = 1  # applications per forward pass (a shared layer): its weights count once, its MACs each time


@dataclasses.dataclass(frozen=True)
class CostTerm:
    """`fixed` x prod(widths[g] for g in `groups`): the size of a parameter leaf, or the
    MACs of a product with no weight layer of its own (attention scores and values,
    `Embed.attend`)."""

    path: str
    fixed: int
    groups: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class AttentionInfo:
    """A `MultiHeadDotProductAttention`: its heads are channel group `heads_group`, or
    -1 for a fixed number `num_heads` (0 when the heads are a group), each of
    `head_dim` features; `q_rows` query positions (all axes but the heads and
    features, one example) attend to `kv_len` keys."""

    path: str
    heads_group: int
    num_heads: int
    head_dim: int
    q_rows: int
    kv_len: int


@dataclasses.dataclass(frozen=True, eq=False)
class ModelTable:
    """Static description of a model's layers and channel groups.

    `axes[collection][path]` gives, for every variable leaf, one `AxisGroup` or
    None per axis. `norm_groups` lists the channel group of every BatchNorm;
    `norms` every norm drop-in (path, "batch" | "layer" | "rms", group or -1),
    `embeddings` every `Embed` (path, group of its features or -1), `attention`
    every attention layer. `extra_params` and `extra_macs` are the parameters and
    MACs outside the Conv / Dense / DenseGeneral `layers` (see `CostTerm`).
    `param_shapes` is the shape of every `params` leaf at `widths`.
    """

    model: nn.Module
    input_shape: tuple[int, ...]
    widths: tuple[int, ...]
    layers: tuple[LayerInfo, ...]
    norm_groups: tuple[tuple[str, int], ...]
    axes: Mapping[str, Mapping[tuple[str, ...], tuple[AxisGroup | None, ...]]]
    norms: tuple[tuple[str, str, int], ...] = ()
    embeddings: tuple[tuple[str, int], ...] = ()
    attention: tuple[AttentionInfo, ...] = ()
    extra_params: tuple[CostTerm, ...] = ()
    extra_macs: tuple[CostTerm, ...] = ()
    param_shapes: Mapping[tuple[str, ...], tuple[int, ...]] = dataclasses.field(default_factory=dict)

    @property
    def num_groups(self) -> int:
        return len(self.widths)

    @property
    def group_names(self) -> tuple[str, ...]:
        """Each group is named after its first producing layer."""
        names = [None] * self.num_groups
        for layer in self.layers:
            if layer.out_group >= 0 and names[layer.out_group] is None:
                names[layer.out_group] = layer.path
        return tuple(n or f"group{g}" for g, n in enumerate(names))

    def mask_paths(self, group: int) -> tuple[tuple[str, ...], ...]:
        """Paths of the `masks` collection's `channel` leaves that belong to `group`."""
        return tuple(p for p, ax in self.axes.get("masks", {}).items()
                     if p[-1] == "channel" and ax[0] == AxisGroup(group))

    def _flat_masks(self, masks: Mapping) -> dict:
        """The flattened `masks` collection; a missing channel leaf is a one-line error."""
        if not isinstance(masks, Mapping):
            raise ValueError(f"masks must be the `masks` collection (a mapping of layer paths), "
                             f"got {type(masks).__name__}")
        flat = traverse_util.flatten_dict(dict(masks))
        for g in range(self.num_groups):
            for p in self.mask_paths(g):
                if p not in flat:
                    raise ValueError(f"masks has no '{'/'.join(p)}' leaf (channel group {g}, "
                                     f"{self.group_names[g]}): pass the whole `masks` collection of "
                                     f"this model (model.init creates it)")
        return flat

    def group_masks(self, masks: Mapping) -> list[jax.Array]:
        """One channel mask per group, read from the first member of each group."""
        flat = self._flat_masks(masks)
        out = []
        for g in range(self.num_groups):
            paths = self.mask_paths(g)
            out.append(flat[paths[0]] if paths else jnp.ones((self.widths[g],), jnp.float32))
        return out

    def layer_masks(self, group_masks, masks: Mapping | None = None) -> dict:
        """Writes one mask per group into every member's `channel` leaf.

        `group_masks`: exactly one mask of shape (widths[g],) per group g, in
        `group_names` order. `masks` (optional) supplies the other leaves (element
        masks) to keep.
        """
        if isinstance(group_masks, Mapping) or not hasattr(group_masks, "__len__"):
            raise ValueError(f"layer_masks takes a list of {self.num_groups} group masks (one per channel "
                             f"group, in table.group_names order), got {type(group_masks).__name__}")
        if len(group_masks) != self.num_groups:
            raise ValueError(f"layer_masks got {len(group_masks)} group masks for {self.num_groups} channel "
                             f"groups ({', '.join(self.group_names)}): pass exactly one mask per group, "
                             f"in table.group_names order")
        flat = traverse_util.flatten_dict(dict(masks)) if masks is not None else {}
        for g, gm in enumerate(group_masks):
            shape = tuple(np.shape(gm))
            if shape != (self.widths[g],):
                raise ValueError(f"group {g} ({self.group_names[g]}): mask shape {shape} "
                                 f"!= ({self.widths[g]},); give each group one mask of its width")
            for p in self.mask_paths(g):
                flat[p] = jnp.asarray(gm, jnp.float32)
        return traverse_util.unflatten_dict(flat)

    def check_masks_consistent(self, masks: Mapping) -> None:
        """Raises ValueError naming the first group whose members disagree."""
        flat = self._flat_masks(masks)
        for g in range(self.num_groups):
            paths = self.mask_paths(g)
            if not paths:
                continue
            ref = np.asarray(flat[paths[0]])
            for p in paths[1:]:
                if not np.array_equal(np.asarray(flat[p]), ref):
                    raise ValueError(
                        f"channel group {g} ({self.group_names[g]}) is pruned inconsistently: "
                        f"{'/'.join(paths[0])} and {'/'.join(p)} differ; prune groups with "
                        f"ModelTable.layer_masks")

    def kernel_axes(self, layer: LayerInfo) -> tuple[AxisGroup | None, ...]:
        """The channel group (or None) of every axis of `layer`'s kernel."""
        return self.axes["params"][tuple(layer.path.split("/")) + ("kernel",)]

    def out_axis(self, layer: LayerInfo) -> int:
        """The kernel axis of `layer`'s output channels (its first output axis)."""
        return len(self.kernel_axes(layer)) - layer.out_ndim

    def kernel_keep(self, layer: LayerInfo, group_masks) -> np.ndarray:
        """Boolean array of `layer`'s kernel shape: entries that survive the channel masks
        (every kernel axis that is a channel group, repeated axes channel-fastest)."""
        axes = self.kernel_axes(layer)
        keep = np.ones(self.param_shapes[tuple(layer.path.split("/")) + ("kernel",)], bool)
        for axis, ag in enumerate(axes):
            if ag is None:
                continue
            sel = np.tile(np.asarray(group_masks[ag.group]) > 0, ag.repeat)
            shape = [1] * len(axes)
            shape[axis] = sel.size
            keep = keep & sel.reshape(shape)
        return keep

    # Vectorised geometry for the cost model (numpy constants, jnp-friendly).
    def arrays(self) -> dict[str, np.ndarray]:
        f = lambda key, dtype=np.int64: np.asarray([getattr(l, key) for l in self.layers], dtype)
        return dict(
            in_group=f("in_group"), in_repeat=f("in_repeat"), in_fixed=f("in_fixed"),
            out_group=f("out_group"), out_fixed=f("out_fixed"), out_repeat=f("out_repeat"),
            taps=np.asarray([l.kernel_size[0] * l.kernel_size[1] for l in self.layers], np.int64),
            positions=np.asarray([l.out_hw[0] * l.out_hw[1] * l.calls for l in self.layers], np.int64),
            depthwise=f("depthwise", bool), use_bias=f("use_bias", bool),
            norm_group=np.asarray([g for _, g in self.norm_groups], dtype=np.int64).reshape(-1),
        )


def _axis_group(size_a: int, size_b: int, primes_a, primes_b) -> AxisGroup | None | bool:
    """Axis sizes in the two probes -> None (fixed), an `AxisGroup`, or False when the
    size depends on the widths in a way that is not one group (repeated)."""
    if size_a == size_b:
        return None
    for g, (pa, pb) in enumerate(zip(primes_a, primes_b)):
        if size_a % pa == 0 and size_b % pb == 0 and size_a // pa == size_b // pb < _MAX_REPEAT:
            return AxisGroup(g, size_a // pa)
    return False


def _sum_of_groups(size_a: int, size_b: int, primes_a, primes_b, names) -> str | None:
    """Names the channel groups (and fixed channels) that a size is the concatenation of,
    trying up to three groups; None if it is not such a sum."""
    n = len(primes_a)
    for k in (1, 2, 3):
        for combo in itertools.combinations_with_replacement(range(n), k):
            fixed = size_a - sum(primes_a[g] for g in combo)
            if fixed < 0 or size_b - sum(primes_b[g] for g in combo) != fixed or (k == 1 and fixed == 0):
                continue
            parts = [f"group {g} ({names[g]})" for g in combo] + ([f"{fixed} fixed channels"] if fixed else [])
            return " + ".join(parts)
    return None


def _shapes(tree) -> list[tuple[int, ...]]:
    return [tuple(x.shape) for x in jax.tree.leaves(tree) if hasattr(x, "shape")]


def _probe(model: nn.Module, widths: tuple[int, ...], input_shape, input_dtype=jnp.float32) -> tuple[list, dict]:
    """Abstract init of `model` at `widths` on one example of `input_dtype`: every module
    call (module, method, input shapes, output shapes) in the order the calls return,
    and the variables' shapes."""
    probe = model.clone(widths=widths)
    calls = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" or (context.method_name == "attend"
                                                 and isinstance(context.module, Embed)):
            calls.append((context.module, context.method_name, _shapes((args, kwargs)), _shapes(out)))
        return out

    x = jax.ShapeDtypeStruct((1, *input_shape), input_dtype)
    try:
        with nn.intercept_methods(record):
            variables = jax.eval_shape(lambda x: probe.init(jax.random.key(0), x, train=False), x)
    except Exception as e:  # one line: the model's own error, at probe widths
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UnsupportedModelError(
            f"describe: {type(model).__name__} does not build at the probe widths (distinct primes above "
            f"{_PROBE_START}): {first}; a described model must build at any widths (grouped convolutions "
            f"over a channel group, or widths that must divide by a constant, are not supported yet)") from e
    return calls, variables


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _out_channel_axis(mod) -> int:
    """The output axis a weight layer's channel mask covers."""
    return -len(_as_tuple(mod.features)) if isinstance(mod, DenseGeneral) else -1


def _group_names(calls, primes_a, primes_b) -> list[str]:
    """Each group named after its first producing drop-in (for error messages)."""
    names = [f"group{g}" for g in range(len(primes_a))]
    seen = set()
    for (mod, method, _, out_a), (_, _, _, out_b) in calls:
        if isinstance(mod, _WEIGHT_LAYERS) and method == "__call__" and out_a and out_b:
            axis = _out_channel_axis(mod)
            ag = _axis_group(out_a[0][axis], out_b[0][axis], primes_a, primes_b)
            if isinstance(ag, AxisGroup) and ag.group not in seen:
                seen.add(ag.group)
                names[ag.group] = "/".join(mod.path)
    return names


def _refuse(path: str, reason: str):
    raise UnsupportedModelError(f"describe: layer '{path or '<model>'}': {reason}")


def _channel_axis(path, what, size_a, size_b, primes_a, primes_b, names, *, allow_repeat: bool):
    """The group of a layer's input or output channel axis, or a one-line refusal."""
    ag = _axis_group(size_a, size_b, primes_a, primes_b)
    if ag is False:
        parts = _sum_of_groups(size_a, size_b, primes_a, primes_b, names)
        if parts is not None:
            _refuse(path, f"its {what} is the concatenation of {parts}; concatenation of channel groups is "
                          f"not supported yet (give the concatenated tensor a layer of its own width)")
        _refuse(path, f"its {what} size ({size_a} at probe widths) is derived from the widths in a way "
                      f"describe cannot follow (e.g. w // 2, w + 1); derived widths are not supported yet: "
                      f"give every such size its own entry in widths")
    if isinstance(ag, AxisGroup) and ag.repeat > 1 and not allow_repeat:
        _refuse(path, f"its {what} size is {ag.repeat} x widths[{ag.group}] ({names[ag.group]}), a derived "
                      f"width; derived widths are not supported yet: give this size its own entry in widths")
    return ag


def _check_plain(mod, in_a, in_b, out_a, out_b, names):
    """Refuses a plain Flax layer that touches a channel group (an axis whose size
    differs between the probes)."""
    if isinstance(mod, _DROP_INS) or isinstance(mod.parent, InformationDropout):
        return  # our drop-ins; InformationDropout's alpha head multiplies a masked output
    parent = mod.parent
    if isinstance(parent, nn.MultiHeadDotProductAttention) and not isinstance(parent, _DROP_INS):
        mod = parent  # a plain attention layer's projections: name the attention layer
    kind = next(n for n in _PLAIN_LAYERS if getattr(nn, n, None) is not None and isinstance(mod, getattr(nn, n)))
    for sa, sb in zip(in_a + out_a, in_b + out_b):
        for da, db in zip(sa, sb):
            if da != db:
                _refuse("/".join(mod.path), f"a plain flax.linen.{kind} over a channel group "
                                            f"({da} channels at probe widths): {_PLAIN_LAYERS[kind]}")


def _spatial(value, n: int, default: int = 1) -> tuple[int, ...]:
    value = default if value is None else value
    return (int(value),) * n if isinstance(value, int) else tuple(int(v) for v in value)


def _weight_layer(mod, path, in_a, in_b, out_a, out_b, primes_a, primes_b, names) -> LayerInfo:
    """The `LayerInfo` of a Conv / Dense / DenseGeneral call, or a one-line refusal."""
    if isinstance(mod, DenseGeneral):
        return _dense_general(mod, path, in_a[0], in_b[0], out_a[0], out_b[0], primes_a, primes_b, names)
    in_shape, out_shape = in_a[0], out_a[0]
    in_ag = _channel_axis(path, "input", in_a[0][-1], in_b[0][-1], primes_a, primes_b, names, allow_repeat=True)
    out_ag = _channel_axis(path, "output", out_a[0][-1], out_b[0][-1], primes_a, primes_b, names,
                           allow_repeat=False)
    is_conv = isinstance(mod, Conv)
    depthwise = False
    if is_conv:
        kernel_size = _spatial(mod.kernel_size, 1)
        if len(kernel_size) != 2:
            _refuse(path, f"a {len(kernel_size)}-D convolution; layer tables (cost, surgery, pruning) "
                          f"support 2-D convolutions and Dense layers only so far")
        groups, cin, cout = mod.feature_group_count, in_shape[-1], out_shape[-1]
        depthwise = groups > 1 and groups == cin
        if groups > 1 and not (depthwise and (cout == cin or (in_ag is None and out_ag is None))):
            _refuse(path, f"a grouped convolution (feature_group_count={groups}, {cin} -> {cout} channels "
                          f"at probe widths); only depthwise convolutions (groups = input channels = "
                          f"output channels) are supported so far")
        strides = _spatial(mod.strides, 2)
        out_hw = tuple(out_shape[1:3])
    else:
        kernel_size, strides = (1, 1), (1, 1)
        out_hw = _positions(out_shape[1:-1])
    return LayerInfo(
        path=path, kind="conv" if is_conv else "dense", kernel_size=kernel_size, strides=strides,
        out_hw=out_hw,
        in_group=in_ag.group if in_ag else -1, in_repeat=in_ag.repeat if in_ag else 1,
        in_fixed=0 if in_ag else in_shape[-1],
        out_group=out_ag.group if out_ag else -1, out_fixed=0 if out_ag else out_shape[-1],
        depthwise=depthwise, use_bias=mod.use_bias)


def _positions(middle) -> tuple[int, int]:
    """Positions a Dense layer is applied at (tokens, pixels), as (H, W) or (N, 1)."""
    middle = tuple(middle)
    return middle if len(middle) == 2 else (int(np.prod(middle, dtype=np.int64)), 1)


def _dense_general(mod, path, in_a, in_b, out_a, out_b, primes_a, primes_b, names) -> LayerInfo:
    """A DenseGeneral: at most one contracted axis and only the first output axis may be
    channel groups (the channel mask covers the first output axis)."""
    if _as_tuple(mod.batch_dims):
        _refuse(path, "a DenseGeneral with batch_dims (a batched kernel) is not supported yet")
    n_out = len(_as_tuple(mod.features))
    contracted = sorted(a % len(in_a) for a in _as_tuple(mod.axis))
    in_ags = [_channel_axis(path, f"input axis {a}", in_a[a], in_b[a], primes_a, primes_b, names,
                            allow_repeat=True) for a in contracted]
    grouped = [ag for ag in in_ags if ag is not None]
    if len(grouped) > 1:
        _refuse(path, f"a DenseGeneral contracting over {len(grouped)} channel groups "
                      f"({', '.join(names[ag.group] for ag in grouped)}); at most one is supported so far")
    in_fixed = int(np.prod([in_a[a] for a, ag in zip(contracted, in_ags) if ag is None], dtype=np.int64))
    out_sizes_a, out_sizes_b = out_a[len(out_a) - n_out:], out_b[len(out_b) - n_out:]
    out_ag = _channel_axis(path, "output", out_sizes_a[0], out_sizes_b[0], primes_a, primes_b, names,
                           allow_repeat=False)
    for k, (sa, sb) in enumerate(zip(out_sizes_a[1:], out_sizes_b[1:]), start=1):
        if sa != sb:
            _refuse(path, f"its output feature axis {k} ({sa} at probe widths) depends on the widths; only the "
                          f"first output feature axis carries a channel mask (heads x head_dim: make num_heads "
                          f"the width and keep head_dim fixed)")
    out_rest = int(np.prod(out_sizes_a[1:], dtype=np.int64))
    return LayerInfo(
        path=path, kind="dense", kernel_size=(1, 1), strides=(1, 1),
        out_hw=_positions(out_a[1:len(out_a) - n_out]),
        in_group=grouped[0].group if grouped else -1, in_repeat=grouped[0].repeat * in_fixed if grouped else 1,
        in_fixed=0 if grouped else in_fixed,
        out_group=out_ag.group if out_ag else -1, out_fixed=0 if out_ag else out_sizes_a[0] * out_rest,
        depthwise=False, use_bias=mod.use_bias, out_repeat=out_rest if out_ag else 1, out_ndim=n_out)


def _check_norm(mod, path, x_a, x_b, primes_a, primes_b, names) -> AxisGroup | None:
    """A LayerNorm / RMSNorm: a channel group it normalises over must be one of its
    feature axes (so its channel mask keeps pruned channels out of the statistics).
    Returns the group of its first feature axis."""
    ndim = len(x_a)
    reduction = {a % ndim for a in _as_tuple(mod.reduction_axes)}
    features = sorted(a % ndim for a in _as_tuple(mod.feature_axes))
    for a in range(ndim):
        ag = _channel_axis(path, f"input axis {a}", x_a[a], x_b[a], primes_a, primes_b, names,
                           allow_repeat=a not in reduction and a not in features)
        if ag is not None and a in reduction and a not in features:
            _refuse(path, f"it normalises over channel group {ag.group} ({names[ag.group]}, input axis {a}), "
                          f"which is not one of its feature_axes {tuple(features)}: its channel mask cannot keep "
                          f"pruned channels out of the statistics")
    if not features:
        return None
    return _axis_group(x_a[features[0]], x_b[features[0]], primes_a, primes_b)


def _attention(mod, path, outs_a, outs_b, primes_a, primes_b) -> AttentionInfo:
    """Heads group and geometry of an attention layer, from its projections' outputs."""
    if mod.decode:
        _refuse(path, "attention with an autoregressive decode cache (decode=True) is not supported by "
                      "describe yet; describe the model with decode=False")
    q_a, q_b = outs_a[path + "/query"], outs_b[path + "/query"]
    k_a, k_b = outs_a[path + "/key"], outs_b[path + "/key"]
    if q_a[:-2] != q_b[:-2] or k_a[-3] != k_b[-3]:
        _refuse(path, f"its query positions {q_a[1:-2]} or key length {k_a[-3]} depend on the widths; "
                      f"a sequence length must not be a width")
    heads = _axis_group(q_a[-2], q_b[-2], primes_a, primes_b)  # a plain group: checked by its projections
    return AttentionInfo(path=path, heads_group=heads.group if heads else -1, num_heads=0 if heads else q_a[-2],
                         head_dim=q_a[-1], q_rows=int(np.prod(q_a[:-2], dtype=np.int64)), kv_len=k_a[-3])


def _cost_term(path: str, shape, axis_groups) -> CostTerm:
    fixed = 1
    for n, ag in zip(shape, axis_groups):
        fixed *= n if ag is None else ag.repeat
    return CostTerm(path, int(fixed), tuple(ag.group for ag in axis_groups if ag is not None))


def describe(model: nn.Module, input_shape: tuple[int, ...], input_dtype=jnp.float32) -> ModelTable:
    """Builds the `ModelTable` of `model` for inputs of shape `input_shape` ((H, W, C)
    for images) and dtype `input_dtype` (`"int32"` for a language model's token ids).

    Raises `UnsupportedModelError` (one line naming the layer) for structures whose
    table would be wrong (see the module doc).
    """
    if not hasattr(model, "widths"):
        raise UnsupportedModelError(f"describe: {type(model).__name__} has no `widths` field; a described "
                                    f"model is built from a widths tuple, one entry per channel group")
    widths = tuple(int(w) for w in model.widths)
    primes = _primes_above(_PROBE_START, 2 * len(widths))
    primes_a, primes_b = primes[:len(widths)], primes[len(widths):]
    calls_a, variables = _probe(model, primes_a, input_shape, input_dtype)
    calls_b, variables_b = _probe(model, primes_b, input_shape, input_dtype)
    flat_vars = {col: traverse_util.flatten_dict(tree) for col, tree in variables.items()}
    flat_vars_b = {col: traverse_util.flatten_dict(tree) for col, tree in variables_b.items()}
    same_structure = (len(calls_a) == len(calls_b) and all(
        a[0].path == b[0].path and type(a[0]) is type(b[0]) and a[1] == b[1] and len(a[2]) == len(b[2])
        and len(a[3]) == len(b[3]) for a, b in zip(calls_a, calls_b)) and {c: set(t) for c, t in flat_vars.items()}
        == {c: set(t) for c, t in flat_vars_b.items()})
    if not same_structure:
        raise UnsupportedModelError(f"describe: the layers of {type(model).__name__} change with the widths "
                                    f"(not only their sizes); a described model must have the same layers at "
                                    f"every width")
    names = _group_names(list(zip(calls_a, calls_b)), primes_a, primes_b)
    outs_a = {"/".join(c[0].path): c[3][0] for c in calls_a if c[1] == "__call__" and c[3]}
    outs_b = {"/".join(c[0].path): c[3][0] for c in calls_b if c[1] == "__call__" and c[3]}

    layers: dict[str, LayerInfo] = {}
    norms: dict[str, tuple[str, str, int]] = {}
    embeddings: dict[str, tuple[str, int]] = {}
    attention: dict[str, AttentionInfo] = {}
    extra_macs: dict[str, CostTerm] = {}
    aux = set()  # InformationDropout modules: training-only noise heads, not costed
    for (mod, method, in_a, out_a), (mod_b, _, in_b, out_b) in zip(calls_a, calls_b):
        path = "/".join(mod.path)
        if isinstance(mod, InformationDropout):
            aux.add(mod.path)
        if isinstance(mod, _PLAIN_CLASSES):
            _check_plain(mod, in_a, in_b, out_a, out_b, names)
        if isinstance(mod, BatchNorm):
            for axis in ((mod.axis,) if isinstance(mod.axis, int) else mod.axis):
                ag = _channel_axis(path, "input", in_a[0][axis], in_b[0][axis], primes_a, primes_b, names,
                                   allow_repeat=True)
            norms.setdefault(path, (path, "batch", ag.group if ag else -1))
        elif isinstance(mod, (LayerNorm, RMSNorm)):
            ag = _check_norm(mod, path, in_a[0], in_b[0], primes_a, primes_b, names)
            norms.setdefault(path, (path, "layer" if isinstance(mod, LayerNorm) else "rms", ag.group if ag else -1))
        elif isinstance(mod, Embed):
            if mod.num_embeddings != mod_b.num_embeddings:
                _refuse(path, f"an Embed whose num_embeddings ({mod.num_embeddings} at probe widths) depends on "
                              f"the widths; only its features can be a channel group")
            ag = _channel_axis(path, "feature", mod.features, mod_b.features, primes_a, primes_b, names,
                               allow_repeat=False)
            embeddings.setdefault(path, (path, ag.group if ag else -1))
            if method == "attend":  # logits = query @ embedding.T: rows x features x num_embeddings MACs
                rows = int(np.prod(out_a[0][:-1], dtype=np.int64))
                extra_macs.setdefault(path + "/attend", CostTerm(path + "/attend", rows * mod.num_embeddings
                                                                 * (1 if ag else mod.features),
                                                                 (ag.group,) if ag else ()))
        elif isinstance(mod, MultiHeadDotProductAttention) and path not in attention:
            att = attention[path] = _attention(mod, path, outs_a, outs_b, primes_a, primes_b)
            # scores q.k and the weighted sum of values: 2 x heads x head_dim x q_rows x kv_len MACs
            fixed = 2 * att.head_dim * att.q_rows * att.kv_len * (att.num_heads if att.heads_group < 0 else 1)
            extra_macs[path] = CostTerm(path, fixed, (att.heads_group,) if att.heads_group >= 0 else ())
        if isinstance(mod, _WEIGHT_LAYERS) and method == "__call__":
            info = _weight_layer(mod, path, in_a, in_b, out_a, out_b, primes_a, primes_b, names)
            if path in layers:  # a shared layer applied again: the same geometry, its MACs once more
                if dataclasses.replace(info, calls=layers[path].calls) != layers[path]:
                    _refuse(path, "a layer applied more than once with different input or output shapes "
                                  "(e.g. at two resolutions); apply it to one shape, or use two layers")
                info = dataclasses.replace(info, calls=layers[path].calls + 1)
            layers[path] = info

    axes = {}
    for col, flat in flat_vars.items():
        axes[col] = {}
        for p, leaf in flat.items():
            leaf_b = flat_vars_b[col][p]
            if leaf.ndim != leaf_b.ndim:
                _refuse("/".join(p[:-1]), f"variable {col}/{'/'.join(p)} changes rank with the widths")
            ags = tuple(_axis_group(a, b, primes_a, primes_b) for a, b in zip(leaf.shape, leaf_b.shape))
            if any(ag is False for ag in ags):
                _refuse("/".join(p[:-1]), f"variable {col}/{'/'.join(p)} has shape {leaf.shape} at probe widths, "
                                          f"not made of single channel groups (a concatenation or a derived "
                                          f"width); this is not supported yet")
            if col == "masks" and p[-1] == "channel" and any(ag is not None for ag in ags) and (
                    len(ags) != 1 or ags[0].repeat != 1):
                _refuse("/".join(p[:-1]), f"its channel mask has shape {leaf.shape} at probe widths, not one "
                                          f"channel group; a channel mask must span exactly one group")
            axes[col][p] = ags
    norm_groups = tuple((path, g) for path, kind, g in norms.values() if kind == "batch" and g >= 0
                        and tuple(path.split("/")) + ("scale",) in axes.get("params", {}))
    weight_leaves = {tuple(l.path.split("/")) + (n,) for l in layers.values() for n in ("kernel", "bias")}
    extra_params = tuple(
        _cost_term("/".join(p), flat_vars["params"][p].shape, ags) for p, ags in axes.get("params", {}).items()
        if p not in weight_leaves and not any(p[:len(a)] == a for a in aux))
    param_shapes = {p: tuple(widths[ag.group] * ag.repeat if ag is not None else n
                             for n, ag in zip(flat_vars["params"][p].shape, ags))
                    for p, ags in axes.get("params", {}).items()}
    return ModelTable(model=model, input_shape=tuple(input_shape), widths=widths,
                      layers=tuple(layers.values()), norm_groups=norm_groups, axes=axes,
                      norms=tuple(norms.values()), embeddings=tuple(embeddings.values()),
                      attention=tuple(attention.values()), extra_params=extra_params,
                      extra_macs=tuple(extra_macs.values()), param_shapes=param_shapes)
