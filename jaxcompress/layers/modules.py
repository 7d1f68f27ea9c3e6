"""Flax layers whose compression decisions live in variable collections.

`Conv`, `Dense` and `BatchNorm` are drop-in replacements for `nn.Conv`,
`nn.Dense` and `nn.BatchNorm` (same parameter names, shapes and initialisers):

* `masks` collection: `channel` (out_features,) zeroes output channels (structural
  pruning); `kernel` (kernel shape), when present, zeroes single weights
  (element pruning). `model.init` creates all-ones channel masks; element masks
  are added by the pruners that need them.
* `quant` collection: `bits_w` (per-output-channel symmetric weight quantization),
  `bits_a` (input activation quantization) and optionally `range_a` (calibrated
  clip value; the batch max is used otherwise). Scalars, traced, so a stack of bit
  widths can be vmapped without recompiling. Absent means full precision.

With no `masks` / `quant` entries given to `apply` the layers compute exactly what
the plain Flax layers compute. Masks are applied to a layer's *output*, and
`BatchNorm` re-applies its own channel mask after normalisation, so a pruned
channel carries exact zeros to every consumer: this is what makes the masked
network equal to the physically shrunk one (see `jaxcompress.pruning.surgery`).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcompress.layers import functional as F

Array = jax.Array
PaddingLike = str | int | Sequence[tuple[int, int]]


class _Compressible(nn.Module):
    """Shared reading of the `masks` and `quant` collections."""

    def _collection_value(self, col: str, name: str):
        return self.get_variable(col, name) if self.has_variable(col, name) else None

    def _channel_mask(self, features: int):
        if self.is_initializing():
            self.variable("masks", "channel", jnp.ones, (features,), jnp.float32)
        return self._collection_value("masks", "channel")

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

    def _compress_input(self, x: Array, signed: bool) -> Array:
        bits_a = self._collection_value("quant", "bits_a")
        if bits_a is None:
            return x
        return F.quantize_activation(x, bits_a, self._collection_value("quant", "range_a"), signed)


class Conv(_Compressible):
    """2-D convolution (NHWC, HWIO kernel) with masks and fake quantization.

    Attributes mirror `nn.Conv`; `feature_group_count == in_channels` gives a
    depthwise convolution. `signed_input` selects a signed activation grid (the
    network's first layer); inputs after ReLU use the unsigned grid.
    """

    features: int
    kernel_size: Sequence[int] = (3, 3)
    strides: int | Sequence[int] = 1
    padding: PaddingLike = "SAME"
    feature_group_count: int = 1
    use_bias: bool = True
    signed_input: bool = False
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kh, kw = self.kernel_size
        in_features = x.shape[-1]
        if in_features % self.feature_group_count:
            raise ValueError(
                f"{self.path}: {in_features} input channels not divisible by "
                f"feature_group_count={self.feature_group_count}")
        kernel = self.param("kernel", self.kernel_init,
                            (kh, kw, in_features // self.feature_group_count, self.features))
        mask = self._channel_mask(self.features)
        kernel = self._compress_kernel(kernel)
        x = self._compress_input(x, self.signed_input)
        strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
        padding = self.padding
        if isinstance(padding, int):
            padding = ((padding, padding), (padding, padding))
        x, kernel = nn.dtypes.promote_dtype(x, kernel)
        y = jax.lax.conv_general_dilated(
            x, kernel, strides, padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=self.feature_group_count)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,))
        return F.apply_channel_mask(y, mask)


class Dense(_Compressible):
    """Fully connected layer with masks and fake quantization (see `Conv`)."""

    features: int
    use_bias: bool = True
    signed_input: bool = False
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        mask = self._channel_mask(self.features)
        kernel = self._compress_kernel(kernel)
        x = self._compress_input(x, self.signed_input)
        x, kernel = nn.dtypes.promote_dtype(x, kernel)
        y = x @ kernel
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,))
        return F.apply_channel_mask(y, mask)


class BatchNorm(nn.BatchNorm):
    """`nn.BatchNorm` whose output is multiplied by its channel mask.

    Normalising a zeroed channel yields its shift `beta`, not zero; masking after
    the normalisation keeps pruned channels at exactly zero.
    """

    momentum: float = 0.9
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, **kwargs):
        y = super().__call__(x, use_running_average=use_running_average, **kwargs)
        if self.is_initializing():
            self.variable("masks", "channel", jnp.ones, (x.shape[-1],), jnp.float32)
        mask = self.get_variable("masks", "channel") if self.has_variable("masks", "channel") else None
        return F.apply_channel_mask(y, mask)
