"""The layer table: which axis of which variable belongs to which channel group.

Hand-written (no library does this). Every zoo model is a function of a flat
`widths` tuple, one entry per channel group (see `jaxcompress.models.common`). To
find the groups we build the model abstractly (`jax.eval_shape`, no FLOPs, no
memory) with every width replaced by a distinct prime above 1000. An axis of size
p_g belongs to group g; an axis of size p_g * r (r < 1000) is group g repeated r
times, which is how a conv map of r = H*W positions flattened into a Dense layer
looks (NHWC flattening: row s * C + c). Other sizes are fixed (image channels,
classes, kernel taps). This works for any model that follows the widths rule,
including users' own, and is checked by surgery tests on the whole zoo.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxcompress.layers import Conv, Dense

_MAX_REPEAT = 1000


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
    """Geometry of one Conv / Dense layer; in/out group -1 means a fixed size."""

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


@dataclasses.dataclass(frozen=True, eq=False)
class ModelTable:
    """Static description of a model's layers and channel groups.

    `axes[collection][path]` gives, for every variable leaf, one `AxisGroup` or
    None per axis. `norm_groups` lists the channel group of every BatchNorm.
    """

    model: nn.Module
    input_shape: tuple[int, ...]
    widths: tuple[int, ...]
    layers: tuple[LayerInfo, ...]
    norm_groups: tuple[tuple[str, int], ...]
    axes: Mapping[str, Mapping[tuple[str, ...], tuple[AxisGroup | None, ...]]]

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

    def group_masks(self, masks: Mapping) -> list[jax.Array]:
        """One channel mask per group, read from the first member of each group."""
        flat = traverse_util.flatten_dict(dict(masks))
        out = []
        for g in range(self.num_groups):
            paths = self.mask_paths(g)
            out.append(flat[paths[0]] if paths else jnp.ones((self.widths[g],), jnp.float32))
        return out

    def layer_masks(self, group_masks, masks: Mapping | None = None) -> dict:
        """Writes one mask per group into every member's `channel` leaf.

        `masks` (optional) supplies the other leaves (element masks) to keep.
        """
        flat = traverse_util.flatten_dict(dict(masks)) if masks is not None else {}
        for g, gm in enumerate(group_masks):
            if gm.shape != (self.widths[g],):
                raise ValueError(f"group {g} ({self.group_names[g]}): mask shape {gm.shape} "
                                 f"!= ({self.widths[g]},)")
            for p in self.mask_paths(g):
                flat[p] = jnp.asarray(gm, jnp.float32)
        return traverse_util.unflatten_dict(flat)

    def check_masks_consistent(self, masks: Mapping) -> None:
        """Raises ValueError naming the first group whose members disagree."""
        flat = traverse_util.flatten_dict(dict(masks))
        for g in range(self.num_groups):
            paths = self.mask_paths(g)
            ref = np.asarray(flat[paths[0]])
            for p in paths[1:]:
                if not np.array_equal(np.asarray(flat[p]), ref):
                    raise ValueError(
                        f"channel group {g} ({self.group_names[g]}) is pruned inconsistently: "
                        f"{'/'.join(paths[0])} and {'/'.join(p)} differ; prune groups with "
                        f"ModelTable.layer_masks")

    def kernel_keep(self, layer: LayerInfo, group_masks) -> np.ndarray:
        """Boolean array of `layer`'s kernel shape: entries that survive the channel masks."""
        taps = (*layer.kernel_size, ) if layer.kind == "conv" else ()
        cin = (group_masks[layer.in_group] > 0 if layer.in_group >= 0 else np.ones(layer.in_fixed, bool))
        cin = np.ones(1, bool) if layer.depthwise else np.tile(np.asarray(cin), layer.in_repeat)
        cout = (np.asarray(group_masks[layer.out_group]) > 0 if layer.out_group >= 0
                else np.ones(layer.out_fixed, bool))
        keep = cin[:, None] & cout[None, :]
        return np.broadcast_to(keep, taps + keep.shape)

    # Vectorised geometry for the cost model (numpy constants, jnp-friendly).
    def arrays(self) -> dict[str, np.ndarray]:
        f = lambda key: np.asarray([getattr(l, key) for l in self.layers])
        return dict(
            in_group=f("in_group"), in_repeat=f("in_repeat"), in_fixed=f("in_fixed"),
            out_group=f("out_group"), out_fixed=f("out_fixed"),
            taps=np.asarray([l.kernel_size[0] * l.kernel_size[1] for l in self.layers]),
            positions=np.asarray([l.out_hw[0] * l.out_hw[1] for l in self.layers]),
            depthwise=f("depthwise"), use_bias=f("use_bias"),
            norm_group=np.asarray([g for _, g in self.norm_groups], dtype=np.int64).reshape(-1),
        )


def _axis_group(size: int, primes: tuple[int, ...]) -> AxisGroup | None:
    for g, p in enumerate(primes):
        if size % p == 0 and size // p < _MAX_REPEAT:
            return AxisGroup(g, size // p)
    return None


def describe(model: nn.Module, input_shape: tuple[int, ...]) -> ModelTable:
    """Builds the `ModelTable` of `model` for inputs of shape `input_shape` (H, W, C)."""
    widths = tuple(int(w) for w in model.widths)
    primes = _primes_above(1000, len(widths))
    probe = model.clone(widths=primes)
    calls: dict[str, tuple] = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, (Conv, Dense)):
            calls["/".join(mod.path)] = (mod, args[0].shape, out.shape)
        return out

    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    with nn.intercept_methods(record):
        variables = jax.eval_shape(lambda: probe.init(jax.random.key(0), jnp.zeros(x.shape), train=False))
    layers = []
    for path, (mod, in_shape, out_shape) in calls.items():
        in_ag, out_ag = _axis_group(in_shape[-1], primes), _axis_group(out_shape[-1], primes)
        is_conv = isinstance(mod, Conv)
        layers.append(LayerInfo(
            path=path, kind="conv" if is_conv else "dense",
            kernel_size=tuple(mod.kernel_size) if is_conv else (1, 1),
            strides=((mod.strides,) * 2 if isinstance(mod.strides, int) else tuple(mod.strides))
            if is_conv else (1, 1),
            out_hw=tuple(out_shape[1:3]) if is_conv else (1, 1),
            in_group=in_ag.group if in_ag else -1, in_repeat=in_ag.repeat if in_ag else 1,
            in_fixed=0 if in_ag else in_shape[-1],
            out_group=out_ag.group if out_ag else -1, out_fixed=0 if out_ag else out_shape[-1],
            depthwise=is_conv and mod.feature_group_count > 1 and mod.feature_group_count == in_shape[-1],
            use_bias=mod.use_bias))
    axes = {col: {p: tuple(_axis_group(s, primes) for s in leaf.shape)
                  for p, leaf in traverse_util.flatten_dict(tree).items()}
            for col, tree in variables.items()}
    norm_groups = tuple(("/".join(p[:-1]), ax[0].group) for p, ax in axes.get("params", {}).items()
                        if p[-1] == "scale" and ax[0] is not None)
    return ModelTable(model=model, input_shape=tuple(input_shape), widths=widths,
                      layers=tuple(layers), norm_groups=norm_groups, axes=axes)
