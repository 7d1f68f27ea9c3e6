"""Flax layers whose compression decisions live in variable collections.

`Conv`, `Dense` and `BatchNorm` are drop-in replacements for `nn.Conv`,
`nn.Dense` and `nn.BatchNorm`: subclasses that accept every field of the Flax
layer with the same default (`dtype`, `param_dtype`, `precision`, dilations,
`feature_group_count`, 1-D/2-D/3-D kernels, an int `kernel_size` meaning a 1-D
kernel as in Flax, `dot_general`, BatchNorm's `momentum=0.99`, ...), create the
same parameters and, with no `masks` / `quant` entries, compute exactly what the
Flax layer computes (the Flax layer's own code runs). On top:

* `masks` collection: `channel` (out_features,) zeroes output channels (structural
  pruning); `kernel` (kernel shape), when present, zeroes single weights
  (element pruning). `model.init` creates all-ones channel masks; element masks
  are added by the pruners that need them.
* `quant` collection: `bits_w` (per-output-channel symmetric weight quantization),
  `bits_a` (input activation quantization) and optionally `range_a` (calibrated
  clip value). Without `range_a` each example's input is quantized on its own
  range (max |x| over that example's elements), so one example's output never
  depends on the rest of its batch. Scalars, traced, so a stack of bit widths can
  be vmapped without recompiling. Absent means full precision.

Masks are applied to a layer's *output*, and `BatchNorm` re-applies its own
channel mask after normalisation, so a pruned channel carries exact zeros to
every consumer: this is what makes the masked network equal to the physically
shrunk one (see `jaxcompress.pruning.surgery`). Each layer is seen once per call
by `nn.intercept_methods`, as the Flax layer is.
"""
from __future__ import annotations

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


_CONV_CALL, _DENSE_CALL, _BATCHNORM_CALL = (_flax_call(c) for c in (nn.Conv, nn.Dense, nn.BatchNorm))


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
    def _compress_kernel(self, kernel: Array) -> Array:
        # The channel mask is applied once, to the output: a relaxed (soft) mask then
        # scales the whole output linearly, bias included.
        kernel_mask = self._collection_value("masks", "kernel")
        kernel = F.apply_kernel_masks(kernel, None, kernel_mask)
        bits_w = self._collection_value("quant", "bits_w")
        if bits_w is None:
            return kernel
        # re-mask: the 1-bit sign grid would turn pruned zeros into +scale
        return F.apply_kernel_masks(F.quantize_weight(kernel, bits_w, self._collection_value("quant", "range_w")),
                                    None, kernel_mask)

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
