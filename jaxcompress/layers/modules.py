"""Flax layers whose compression decisions live in variable collections.

`Conv`, `Dense`, `DenseGeneral`, `BatchNorm`, `LayerNorm`, `RMSNorm`, `Embed` and
`MultiHeadDotProductAttention` are drop-in replacements for the `flax.linen`
layers of the same names: subclasses that accept every field of the Flax layer
with the same default (`dtype`, `param_dtype`, `precision`, dilations,
`feature_group_count`, 1-D/2-D/3-D kernels, an int `kernel_size` meaning a 1-D
kernel as in Flax, `dot_general`, BatchNorm's `momentum=0.99`, ...), create the
same parameters and, with no `masks` / `quant` entries, compute exactly what the
Flax layer computes (the Flax layer's own code runs). On top:

* `masks` collection: `channel` (out_features,) zeroes output channels (structural
  pruning); `kernel` (kernel shape), when present, zeroes single weights
  (element pruning). `model.init` creates all-ones channel masks; element masks
  are added by the pruners that need them. A `DenseGeneral`'s channel mask covers
  its *first* output feature axis, so the query / key / value projections of
  `MultiHeadDotProductAttention` (features = (num_heads, head_dim)) mask whole
  heads: the heads of an attention layer are one channel group, pruned as units.
  A norm's channel mask covers its feature axes and also leaves pruned channels
  out of its statistics (`LayerNorm`, `RMSNorm`); an `Embed`'s covers its
  feature axis (lookup and `attend`).
* `quant` collection: `bits_w` (per-output-channel symmetric weight quantization),
  `bits_a` (input activation quantization) and optionally `range_a` (calibrated
  clip value). Without `range_a` each example's input is quantized on its own
  range (max |x| over that example's elements), so one example's output never
  depends on the rest of its batch. Scalars, traced, so a stack of bit widths can
  be vmapped without recompiling. Absent means full precision.

Masks are applied to a layer's *output*, and the norms re-apply their own
channel mask after normalisation, so a pruned channel carries exact zeros to
every consumer: this is what makes the masked network equal to the physically
shrunk one (see `jaxcompress.pruning.surgery`). Each layer is seen once per call
by `nn.intercept_methods`, as the Flax layer is.
"""
from __future__ import annotations

import functools
import types

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcompress.layers import functional as F

Array = jax.Array


def _flax_call(cls):
    """The Flax layer's own `__call__`, undecorated: run inside our `__call__` it
    computes with our module's scope and fields, and interceptors see one call."""
    method = cls.__call__
    return getattr(method, "__wrapped__", method)


_CONV_CALL, _DENSE_CALL, _DENSE_GENERAL_CALL, _BATCHNORM_CALL, _LAYERNORM_CALL, _RMSNORM_CALL = (
    _flax_call(c) for c in (nn.Conv, nn.Dense, nn.DenseGeneral, nn.BatchNorm, nn.LayerNorm, nn.RMSNorm))


def _flax_call_with(cls, **names):
    """The Flax layer's own `__call__` with some of the module-level names it reads
    (the layer classes it builds its sublayers from) replaced: Flax's code runs, with
    our drop-ins as its sublayers."""
    fn = _flax_call(cls)
    missing = sorted(set(names) - set(fn.__code__.co_names))
    if missing:  # a Flax version that builds its sublayers differently: fail loudly, not silently
        raise ImportError(f"{cls.__name__}.__call__ no longer reads {missing}; jaxcompress's drop-in needs updating")
    rebound = types.FunctionType(fn.__code__, {**fn.__globals__, **names}, fn.__name__, fn.__defaults__,
                                 fn.__closure__)
    rebound.__kwdefaults__ = fn.__kwdefaults__
    return rebound


class _Compressible(nn.Module):
    """Shared reading of the `masks` and `quant` collections."""

    @nn.nowrap
    def _collection_value(self, col: str, name: str):
        return self.get_variable(col, name) if self.has_variable(col, name) else None

    @nn.nowrap
    def _channel_mask(self, features: int):
        if self.is_initializing():
            self.variable("masks", "channel", jnp.ones, (features,), jnp.float32)
        return self._collection_value("masks", "channel")

    @nn.nowrap
    def _kernel_out_ndim(self) -> int:
        """Trailing kernel axes that index outputs (one weight scale per output)."""
        return 1

    @nn.nowrap
    def _compress_kernel(self, kernel: Array) -> Array:
        # The channel mask is applied once, to the output: a relaxed (soft) mask then
        # scales the whole output linearly, bias included.
        kernel_mask = self._collection_value("masks", "kernel")
        kernel = F.apply_kernel_masks(kernel, None, kernel_mask)
        bits_w = self._collection_value("quant", "bits_w")
        if bits_w is None:
            return kernel
        w_max = self._collection_value("quant", "range_w")
        n_out = self._kernel_out_ndim()
        if w_max is None and n_out != 1:  # one scale per output (all output axes), max over the inputs
            w_max = jnp.max(jnp.abs(kernel), axis=tuple(range(kernel.ndim - n_out)))
        # re-mask: the 1-bit sign grid would turn pruned zeros into +scale
        return F.apply_kernel_masks(F.quantize_weight(kernel, bits_w, w_max), None, kernel_mask)

    @nn.nowrap
    def _compress_input(self, x: Array, signed: bool, batch_dims: int) -> Array:
        bits_a = self._collection_value("quant", "bits_a")
        if bits_a is None:
            return x
        return F.quantize_activation(x, bits_a, self._collection_value("quant", "range_a"), signed,
                                     batch_dims=batch_dims)

    @nn.nowrap
    def param(self, name, init_fn, *init_args, **init_kwargs):
        """`nn.Module.param`; the `kernel` comes back element-masked and fake-quantized,
        which is how the Flax layer's own code computes with the compressed kernel."""
        value = super().param(name, init_fn, *init_args, **init_kwargs)
        return self._compress_kernel(value) if name == "kernel" else value


class Conv(_Compressible, nn.Conv):
    """`nn.Conv` (any number of spatial dims, channels last) with masks and fake quantization.

    Every `nn.Conv` field works as there; `feature_group_count == in_channels` gives
    a depthwise convolution. `signed_input` selects a signed activation grid (the
    network's first layer, linear streams); inputs after ReLU use the unsigned grid.
    """

    signed_input: bool = False

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        spatial = 1 if isinstance(self.kernel_size, int) else len(self.kernel_size)
        if inputs.ndim < spatial + 1:
            raise ValueError(f"{'/'.join(self.path) or 'Conv'}: input of shape {inputs.shape} has fewer than "
                             f"{spatial + 1} axes (spatial dims + channels) for kernel_size={self.kernel_size}")
        in_features = inputs.shape[-1]
        if in_features % self.feature_group_count:
            raise ValueError(
                f"{'/'.join(self.path) or 'Conv'}: {in_features} input channels not divisible by "
                f"feature_group_count={self.feature_group_count}")
        mask = self._channel_mask(self.features)
        x = self._compress_input(inputs, self.signed_input, batch_dims=inputs.ndim - spatial - 1)
        return F.apply_channel_mask(_CONV_CALL(self, x), mask)


class Dense(_Compressible, nn.Dense):
    """`nn.Dense` with masks and fake quantization (see `Conv`). For activation
    quantization without a calibrated range, axis 0 of an input with two or more
    axes indexes the examples."""

    signed_input: bool = False

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        mask = self._channel_mask(self.features)
        x = self._compress_input(inputs, self.signed_input, batch_dims=1 if inputs.ndim > 1 else 0)
        return F.apply_channel_mask(_DENSE_CALL(self, x), mask)


class BatchNorm(nn.BatchNorm):
    """`nn.BatchNorm` (same fields and defaults, `momentum=0.99` included) whose
    output is multiplied by its channel mask (shape: the feature axes, `axis`).

    Normalising a zeroed channel yields its shift `beta`, not zero; masking after
    the normalisation keeps pruned channels at exactly zero.
    """

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        y = _BATCHNORM_CALL(self, x, use_running_average=use_running_average, mask=mask)
        axes = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
        axes = tuple(sorted(a % x.ndim for a in axes))
        if self.is_initializing():
            self.variable("masks", "channel", jnp.ones, tuple(x.shape[a] for a in axes), jnp.float32)
        channel = self.get_variable("masks", "channel") if self.has_variable("masks", "channel") else None
        if channel is None:
            return y
        shape = [1] * x.ndim
        for a in axes:
            shape[a] = x.shape[a]
        return y * jnp.reshape(channel, shape).astype(y.dtype)


class DenseGeneral(_Compressible, nn.DenseGeneral):
    """`nn.DenseGeneral` with masks and fake quantization (see `Conv`).

    Its channel mask has the size of the *first* output feature axis and zeroes
    whole slices of the output: with `features=(num_heads, head_dim)` it prunes
    heads. Weight quantization has one scale per output (every output feature
    axis), the maximum over the contracted input axes.
    """

    signed_input: bool = False

    @nn.nowrap
    def _kernel_out_ndim(self) -> int:
        return len(_as_tuple(self.features))

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        features = _as_tuple(self.features)
        mask = self._channel_mask(features[0])
        x = self._compress_input(inputs, self.signed_input, batch_dims=1 if inputs.ndim > 1 else 0)
        y = _DENSE_GENERAL_CALL(self, x)
        if mask is None:
            return y
        return y * jnp.reshape(mask, (features[0],) + (1,) * (len(features) - 1)).astype(y.dtype)


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _feature_mask(module: nn.Module, x: Array, feature_axes) -> Array | None:
    """A norm's channel mask (shape: x's feature axes), created all-ones by `init`,
    reshaped to broadcast against x; None when the `masks` collection is absent."""
    axes = tuple(sorted(a % x.ndim for a in _as_tuple(feature_axes)))
    if module.is_initializing():
        module.variable("masks", "channel", jnp.ones, tuple(x.shape[a] for a in axes), jnp.float32)
    if not module.has_variable("masks", "channel"):
        return None
    shape = [1] * x.ndim
    for a in axes:
        shape[a] = x.shape[a]
    return jnp.reshape(module.get_variable("masks", "channel"), shape)


def _masked_norm(module: nn.Module, flax_call, x: Array, mask: Array | None) -> Array:
    """Flax's norm computed on the kept channels only: pruned channels (mask 0) stay out
    of the mean and variance (Flax's own `mask` argument, combined with the caller's),
    and leave the norm as exact zeros (a zero input would otherwise leave as its bias)."""
    channel = _feature_mask(module, x, module.feature_axes)
    if channel is None:
        return flax_call(module, x, mask=mask)
    keep = jnp.broadcast_to(channel > 0, x.shape)
    y = flax_call(module, x, mask=keep if mask is None else jnp.logical_and(mask, keep))
    return y * channel.astype(y.dtype)


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` (same fields and defaults) whose statistics ignore pruned channels.

    Its channel mask (shape: the feature axes) selects the channels the mean and
    variance are taken over and multiplies the output, so a masked LayerNorm
    computes exactly what the shrunk one computes on the kept channels. Without a
    `masks` collection it is Flax's layer, bit for bit; with all-ones masks the
    statistics are a masked mean (Flax's `mask` argument), equal to Flax's up to
    the order XLA sums in (bit for bit over a single reduction axis).
    """

    @nn.compact
    def __call__(self, x, *, mask=None):
        return _masked_norm(self, _LAYERNORM_CALL, x, mask)


class RMSNorm(nn.RMSNorm):
    """`nn.RMSNorm` (same fields and defaults) whose mean square ignores pruned
    channels; see `LayerNorm`."""

    @nn.compact
    def __call__(self, x, *, mask=None):
        return _masked_norm(self, _RMSNORM_CALL, x, mask)


class Embed(nn.Embed):
    """`nn.Embed` (same fields and defaults) whose feature axis can be a channel group.

    The channel mask (features,) multiplies the embedding table, so lookups leave
    pruned features at exact zeros and `attend` (a tied output layer, logits =
    query @ embedding.T) ignores the query's pruned features.
    """

    def setup(self):
        super().setup()
        if self.is_initializing():
            self.variable("masks", "channel", jnp.ones, (self.features,), jnp.float32)
        if self.has_variable("masks", "channel"):
            mask = self.get_variable("masks", "channel")
            self.embedding = self.embedding * mask.astype(self.embedding.dtype)


# Flax's attention code builds its projections and its optional query / key norms
# from these names; our drop-ins take their place. Every projection reads a signed
# input (a norm's output, or attention values), so activation quantization uses
# the signed grid.
_ATTENTION_CALL = _flax_call_with(nn.MultiHeadDotProductAttention,
                                  DenseGeneral=functools.partial(DenseGeneral, signed_input=True),
                                  LayerNorm=LayerNorm)


class MultiHeadDotProductAttention(nn.MultiHeadDotProductAttention):
    """`nn.MultiHeadDotProductAttention` (same fields, defaults, parameters and code)
    whose heads are one prunable channel group.

    Flax's own `__call__` runs with our `DenseGeneral` as the `query`, `key`,
    `value` and `out` projections (and our `LayerNorm` for `normalize_qk`). The
    query / key / value projections have features (num_heads, head_dim), so each
    has a channel mask of shape (num_heads,): a pruned head's queries, keys and
    values are exact zeros, its attention output is zero and the `out` projection
    gets nothing from it. Surgery removes whole heads: `num_heads` shrinks,
    `head_dim` stays, so a zoo model sets `qkv_features = num_heads * head_dim`
    with `num_heads` taken from its widths tuple. Unmasked it computes exactly what
    Flax's layer computes with the same parameters.
    """

    @nn.compact
    def __call__(self, inputs_q, inputs_k=None, inputs_v=None, *, inputs_kv=None, mask=None,
                 deterministic=None, dropout_rng=None, sow_weights=False):
        return _ATTENTION_CALL(self, inputs_q, inputs_k, inputs_v, inputs_kv=inputs_kv, mask=mask,
                               deterministic=deterministic, dropout_rng=dropout_rng, sow_weights=sow_weights)
