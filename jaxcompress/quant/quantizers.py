"""Weight quantizers: uniform (symmetric / asymmetric, per channel / per tensor) and
k-means weight sharing, each as an exact encoder (integer codes + scales or codebook)
and a decoder, so that fake quantization, accounting and the packed export agree
bit for bit.

* Uniform symmetric (HAQ, Wang et al. 2019, Sec. 3.3; the layers' own
  `jaxcompress.layers.quantize_weight`): s = max|w| / (2^(b-1) - 1), codes
  round(w / s) + 2^(b-1) - 1 in [0, 2^b - 2]; one bit is sign quantization {-max|w|, +max|w|}.
  Per output channel (max over all but the last axis) or per tensor.
* Uniform asymmetric (affine): [lo, hi] = [min(w, 0), max(w, 0)], s = (hi - lo) / (2^b - 1),
  integer zero point z = round(-lo / s), codes clip(round(w / s) + z, 0, 2^b - 1); zero
  is exactly representable, so pruned weights stay zero.
* k-means weight sharing (Deep Compression, Han et al. 2016, Sec. 3; HAQ's k-means
  mode): one codebook of 2^b centroids per layer, linear initialisation between
  min(w) and max(w), jitted Lloyd iterations (1-D: assignment by midpoints). During
  QAT the assignments are fixed (stored as `assign_w` in the `quant` collection) and
  each centroid is the mean of the latent weights of its cluster, so the STE gradient
  moves centroids by the mean gradient of their cluster (Deep Compression's
  shared-weight fine-tuning, up to a learning-rate factor).

Bit widths are traced values (vmap-able, no recompilation); the k-means codebook has
`KMEANS_SLOTS` = 256 slots of which the first 2^b are used. The straight-through
estimator is written `stop_gradient(q) + (w - stop_gradient(w))`: its value is q
exactly and its gradient the identity (weights are never clipped: the ranges cover
every weight).

`WeightQuantizer` (the scheme and granularity, and the side-information bytes they
store) and `FLOAT_BITS` live with the storage format in `jaxcompress.storage`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.storage import FLOAT_BITS, GRANULARITIES, SCHEMES, WeightQuantizer  # noqa: F401 (re-exported)

KMEANS_SLOTS = 256
WEIGHT_BITS = tuple(range(1, 9)) + (FLOAT_BITS,)
ACTIVATION_BITS = tuple(range(2, 9)) + (FLOAT_BITS,)
_TINY = 1e-12


def ste(x: jax.Array, q: jax.Array) -> jax.Array:
    """Value exactly `q`, gradient the identity with respect to `x`."""
    return jax.lax.stop_gradient(q) + (x - jax.lax.stop_gradient(x))


def _reduce_axes(w, granularity: str):
    return tuple(range(w.ndim - 1)) if granularity == "channel" else tuple(range(w.ndim))


def _levels(bits):
    return 2.0 ** jnp.asarray(bits, jnp.float32)


# Grid constants by bit width, as exactly rounded float32 tables. XLA may turn a division
# by a broadcast scalar into a multiplication by its reciprocal, differently in different
# programs; the quantizers therefore only multiply (by these constants, or by one
# reciprocal per channel), so the training graph, the exporter and the loader compute
# the same float32 numbers.
_B = np.arange(FLOAT_BITS + 1, dtype=np.float64)
_HALF = np.maximum(2.0 ** np.maximum(_B - 1, 0) - 1, 1).astype(np.float32)  # 2^(b-1) - 1 (>= 1)
_INV_HALF = (1.0 / _HALF.astype(np.float64)).astype(np.float32)
_TOP = np.maximum(2.0 ** _B - 1, 1).astype(np.float32)  # 2^b - 1
_INV_TOP = (1.0 / _TOP.astype(np.float64)).astype(np.float32)


def _table(values: np.ndarray, bits):
    idx = jnp.clip(jnp.round(jnp.asarray(bits, jnp.float32)), 0, FLOAT_BITS).astype(jnp.int32)
    return jnp.asarray(values)[idx]


def half_range(bits) -> jax.Array:
    """2^(b-1) - 1 (at least 1) for `bits` b, float32: the code of zero on the symmetric
    grid, so that its codes minus it are the signed integers in [-(2^(b-1) - 1), 2^(b-1) - 1]."""
    return _table(_HALF, bits)


# ------------------------------------------------------------------------------------------------
# Uniform quantization
# ------------------------------------------------------------------------------------------------

def uniform_encode(w: jax.Array, bits, scheme: str = "symmetric", granularity: str = "channel",
                   mask: jax.Array | None = None) -> dict:
    """Integer codes (float-valued integers, shape of w) and their float32 `scale`
    (shape (C,) per channel, () per tensor) and, asymmetric, `zero_point`.

    `mask` (optional, shape of w) excludes pruned elements from the range.
    Symmetric: step = max|w| / (2^(b-1) - 1) (one bit: the stored scale is max|w|);
    asymmetric: step = (hi - lo) / (2^b - 1). Codes are round(w * (1 / step)) (+ offsets),
    rounding half to even.
    """
    w = jax.lax.stop_gradient(jnp.asarray(w, jnp.float32))
    axes = _reduce_axes(w, granularity)
    valid = jnp.ones(w.shape, bool) if mask is None else jnp.asarray(mask) > 0
    if scheme == "symmetric":
        w_max = jnp.maximum(jnp.max(jnp.where(valid, jnp.abs(w), 0.0), axis=axes), _TINY)
        step = w_max * _table(_INV_HALF, bits)
        inv_step = 1.0 / step
        binary = jnp.asarray(bits) <= 1
        xc = jnp.clip(w, -w_max, w_max)
        codes = jnp.where(binary, (xc >= 0).astype(jnp.float32), jnp.round(xc * inv_step) + half_range(bits))
        return {"codes": codes, "scale": jnp.where(binary, w_max, step)}
    if scheme == "asymmetric":
        lo = jnp.minimum(jnp.min(jnp.where(valid, w, jnp.inf), axis=axes), 0.0)
        hi = jnp.maximum(jnp.max(jnp.where(valid, w, -jnp.inf), axis=axes), 0.0)
        top = _table(_TOP, bits)
        step = jnp.maximum(hi - lo, _TINY) * _table(_INV_TOP, bits)
        inv_step = 1.0 / step
        zero_point = jnp.clip(jnp.round(-lo * inv_step), 0.0, top)
        codes = jnp.clip(jnp.round(w * inv_step) + zero_point, 0.0, top)
        return {"codes": codes, "scale": step, "zero_point": zero_point}
    raise ValueError(f"uniform_encode: scheme must be symmetric or asymmetric, got {scheme!r}")


def uniform_decode(codes, bits, scale, zero_point=None) -> jax.Array:
    """Dequantized float32 weights; `codes` may be any integer or float array."""
    codes = jnp.asarray(codes, jnp.float32)
    scale = jnp.asarray(scale, jnp.float32)
    if zero_point is not None:
        return (codes - jnp.asarray(zero_point, jnp.float32)) * scale
    return jnp.where(jnp.asarray(bits) <= 1, (2.0 * codes - 1.0) * scale, (codes - half_range(bits)) * scale)


# ------------------------------------------------------------------------------------------------
# k-means weight sharing
# ------------------------------------------------------------------------------------------------

def _assign(x, centroids):
    """Nearest centroid of sorted `centroids` (inactive slots +inf) for every x."""
    mids = (centroids[:-1] + centroids[1:]) / 2.0
    return jnp.searchsorted(mids, x, side="left").astype(jnp.int32)


def cluster_means(w, assign, mask=None, slots: int = KMEANS_SLOTS):
    """Mean of the (unmasked) weights of every cluster; 0 for empty clusters."""
    w = jnp.asarray(w, jnp.float32).reshape(-1)
    m = jnp.ones_like(w) if mask is None else jnp.asarray(mask, jnp.float32).reshape(-1)
    a = jnp.asarray(assign).reshape(-1)
    sums = jax.ops.segment_sum(w * m, a, slots)
    counts = jax.ops.segment_sum(m, a, slots)
    return jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), 0.0)


@functools.partial(jax.jit, static_argnames=("iters",))
def kmeans_1d(w: jax.Array, bits, mask: jax.Array | None = None, iters: int = 20):
    """Lloyd's k-means on the entries of w with k = 2^bits (bits <= 8), linear init.

    Returns `(assign, codebook)`: int32 cluster indices of w's shape and the
    `KMEANS_SLOTS` centroids (the cluster means of the final assignment; slots at or
    beyond 2^bits and empty clusters are 0). Masked entries take no part.
    """
    x = jnp.asarray(w, jnp.float32).reshape(-1)
    m = jnp.ones_like(x) if mask is None else (jnp.asarray(mask).reshape(-1) > 0).astype(jnp.float32)
    k = _levels(bits)
    lo = jnp.min(jnp.where(m > 0, x, jnp.inf))
    hi = jnp.max(jnp.where(m > 0, x, -jnp.inf))
    lo, hi = jnp.where(jnp.isfinite(lo), lo, 0.0), jnp.where(jnp.isfinite(hi), hi, 0.0)
    slots = jnp.arange(KMEANS_SLOTS, dtype=jnp.float32)
    active = slots < k
    init = jnp.where(active, lo + (hi - lo) * slots / jnp.maximum(k - 1.0, 1.0), jnp.inf)

    def lloyd(c, _):
        a = _assign(x, c)
        sums = jax.ops.segment_sum(x * m, a, KMEANS_SLOTS)
        counts = jax.ops.segment_sum(m, a, KMEANS_SLOTS)
        return jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), c), None

    centroids, _ = jax.lax.scan(lloyd, init, None, length=iters)
    assign = _assign(x, centroids)
    return assign.reshape(jnp.shape(w)), cluster_means(x, assign, m)


# ------------------------------------------------------------------------------------------------
# One entry point per layer: encode / decode / fake-quant
# ------------------------------------------------------------------------------------------------

def encode_weight(w, bits, quantizer: WeightQuantizer, mask=None, assign=None) -> dict:
    """Codes (shape of w) and side information for one kernel (bits < 32)."""
    if quantizer.scheme == "kmeans":
        if assign is None:
            raise ValueError("k-means quantization needs the cluster assignment (quant `assign_w`)")
        return {"codes": jnp.asarray(assign, jnp.int32),
                "codebook": cluster_means(jax.lax.stop_gradient(w), assign, mask)}
    return uniform_encode(w, bits, quantizer.scheme, quantizer.granularity, mask)


def decode_weight(encoded: dict, bits, quantizer: WeightQuantizer) -> jax.Array:
    if quantizer.scheme == "kmeans":
        return jnp.asarray(encoded["codebook"], jnp.float32)[jnp.asarray(encoded["codes"], jnp.int32)]
    return uniform_decode(encoded["codes"], bits, encoded["scale"], encoded.get("zero_point"))


def fake_quant_weight(w, bits, quantizer: WeightQuantizer, mask=None, assign=None) -> jax.Array:
    """Quantized-then-dequantized w (pruned entries zero) with an identity STE gradient.

    Bits >= 32 return w unchanged (times the mask).
    """
    w = jnp.asarray(w)
    if mask is not None:
        w = w * jnp.asarray(mask, w.dtype)
    if quantizer.scheme == "kmeans" and assign is None:  # no clustering (a float layer)
        return w
    q = decode_weight(encode_weight(w, bits, quantizer, mask, assign), bits, quantizer).astype(w.dtype)
    if mask is not None:
        q = q * jnp.asarray(mask, w.dtype)
    return jnp.where(jnp.asarray(bits) >= FLOAT_BITS, w, ste(w, q))

