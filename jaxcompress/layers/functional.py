"""Pure functions underneath the compressed layers: masks, fake quantization, STE.

Everything here is a function of arrays only (bit widths included), so it can be
jitted once and `jax.vmap`-ed over stacks of masks or bit widths without
recompiling. Quantization follows the uniform affine scheme used by HAQ
(Wang et al. 2019, Sec. 3.3) and the two-stage paper's QAT stage (Zhan et al.
2021, Sec. 4.2): values are clipped to a range, scaled to 2^b - 1 levels and
rounded, with the straight-through estimator (Bengio et al. 2013) passing the
gradient through the rounding unchanged and zeroing it outside the clip range.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

FULL_PRECISION_BITS = 32.0
"""A bit width at or above this value means "not quantized" (identity)."""

_TINY = 1e-12


def apply_channel_mask(y: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Zeroes the channels (last axis) of `y` where `mask` is 0."""
    if mask is None:
        return y
    return y * mask.astype(y.dtype)


def apply_kernel_masks(kernel, channel_mask=None, kernel_mask=None):
    """Kernel with pruned output channels (last axis) and pruned elements zeroed."""
    if kernel_mask is not None:
        kernel = kernel * kernel_mask.astype(kernel.dtype)
    return apply_channel_mask(kernel, channel_mask)


def ste_round(x: jax.Array) -> jax.Array:
    """Rounds in the forward pass; identity gradient (straight-through estimator)."""
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def _levels(bits):
    return 2.0 ** jnp.asarray(bits, jnp.float32)


def _unsigned_step(bits, x_max, dtype):
    x_max = jnp.maximum(jnp.asarray(x_max, dtype), _TINY)
    return x_max, x_max / (_levels(bits) - 1.0)


def _signed_step(bits, x_max, dtype):
    x_max = jnp.maximum(jnp.asarray(x_max, dtype), _TINY)
    return x_max, x_max / jnp.maximum(_levels(bits) / 2.0 - 1.0, 1.0)


def fake_quant_unsigned(x: jax.Array, bits, x_max) -> jax.Array:
    """Quantizes x to `bits` unsigned levels on [0, x_max] (activations after ReLU).

    q(x) = round(clip(x, 0, x_max) / s) * s with s = x_max / (2^b - 1). The gradient
    is 1 inside [0, x_max] and 0 outside (from the clip), the STE of the paper's QAT.
    Bits >= 32 return x unchanged.
    """
    x_max, scale = _unsigned_step(bits, x_max, x.dtype)
    xc = jnp.where((x >= 0) & (x <= x_max), x, jnp.clip(x, 0.0, x_max))  # gradient 1 at the bounds too
    q = ste_round(xc / scale) * scale
    return jnp.where(bits >= FULL_PRECISION_BITS, x, q.astype(x.dtype))


def fake_quant_symmetric(x: jax.Array, bits, x_max) -> jax.Array:
    """Quantizes x to the signed symmetric grid {-(2^(b-1)-1)..2^(b-1)-1} * s.

    s = x_max / (2^(b-1) - 1); `x_max` broadcasts against x (per-channel scales pass
    an array of shape (C,) for a channel-last x). The gradient is 1 inside
    [-x_max, x_max] and 0 outside. Bits >= 32 return x unchanged. One bit means
    the binary grid {-s, s} with s = x_max (sign quantization).
    """
    x_max, scale = _signed_step(bits, x_max, x.dtype)
    xc = jnp.where(jnp.abs(x) <= x_max, x, jnp.clip(x, -x_max, x_max))  # gradient 1 at the bounds too
    q = ste_round(xc / scale) * scale
    binary = jnp.where(xc >= 0, x_max, -x_max)
    binary = xc + jax.lax.stop_gradient(binary - xc)
    q = jnp.where(bits <= 1.0, binary, q)
    return jnp.where(bits >= FULL_PRECISION_BITS, x, q.astype(x.dtype))


def quantize_weight(kernel: jax.Array, bits, w_max=None) -> jax.Array:
    """Symmetric per-output-channel fake quantization of a kernel (last axis = out).

    The scale of each output channel is `w_max` if given, else max|w| over that
    channel (no clipping, so the STE gradient is the identity everywhere).
    """
    if w_max is None:
        w_max = jnp.max(jnp.abs(kernel), axis=tuple(range(kernel.ndim - 1)))
    return fake_quant_symmetric(kernel, bits, jax.lax.stop_gradient(w_max))


def _activation_range(x: jax.Array, x_range, batch_dims: int | None):
    if x_range is not None:
        return x_range
    if batch_dims is None:
        batch_dims = 1 if x.ndim > 1 else 0
    axes = tuple(range(batch_dims, x.ndim))
    return jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=axes, keepdims=True))


def activation_codes(x: jax.Array, bits, x_range=None, signed: bool = False, *,
                     batch_dims: int | None = None) -> tuple[jax.Array, jax.Array]:
    """The integer codes (float-valued) and the step of `quantize_activation(x, ...)`, whose
    value is exactly `codes * step`: unsigned codes in [0, 2^b - 1], signed ones in
    [-(2^(b-1) - 1), 2^(b-1) - 1] (bits >= 2). The step is a scalar for a calibrated
    range, else one per example (keepdims). For integer execution (`jaxcompress.quant.integer`)."""
    x_range = _activation_range(x, x_range, batch_dims)
    if signed:
        x_max, step = _signed_step(bits, x_range, x.dtype)
        return jnp.round(jnp.clip(x, -x_max, x_max) / step), step
    x_max, step = _unsigned_step(bits, x_range, x.dtype)
    return jnp.round(jnp.clip(x, 0.0, x_max) / step), step


def quantize_activation(x: jax.Array, bits, x_range=None, signed: bool = False, *,
                        batch_dims: int | None = None) -> jax.Array:
    """Fake-quantizes an activation tensor.

    `x_range` is the calibrated clip value (max for unsigned inputs, max |x| for
    signed ones). When None, each example uses its own range: max |x| over the
    example's elements (no gradient through it), so an example's output never
    depends on the other examples of its batch. The leading `batch_dims` axes index
    the examples (default: axis 0 if x has two or more axes; a 1-D x is one example).
    """
    x_range = _activation_range(x, x_range, batch_dims)
    if signed:
        return fake_quant_symmetric(x, bits, x_range)
    return fake_quant_unsigned(x, bits, x_range)
