"""Integer execution of a quantized network: int8 weights and activations, int32 accumulation.

`integerize(table, variables)` adds an `integer` collection: for every `Conv` / `Dense` whose
weights and input activations are quantized to 2-8 bits, its kernel as int8 codes
(pruned weights zero) and its per-output-channel (or per-tensor) float32 weight step.
`integer_apply(model)` is `make_quantized_apply(model)` with those layers executed in
integers: the input's activation codes (`layers.functional.activation_codes`, the same
grid the fake quantization rounds to) times the int8 kernel, by `lax.conv_general_dilated`
/ `lax.dot_general` with `preferred_element_type=int32`, then one multiply by the two
steps (folded: activation step x weight step per output channel) and the bias. The Flax
layer's own `__call__` runs, with only its `lax` convolution / product replaced, so
every field (padding, strides, dilation, groups, batch dims) behaves as in float.

Unsigned activation codes (after a ReLU, up to 255 at 8 bits) run with a zero point of
128, as int8 engines do: conv(x, w) = conv(x - 128, w) + 128 conv(1, w), the second
term computed once for one example (XLA folds it when the weights are constants).

Exactness: the int32 accumulations are exact (tests compare them with NumPy's int64
products); only the final float multiply and the bias add round, where the fake-quant
network's float convolution rounds in its sum instead. The outputs therefore agree to
float rounding per layer, and a downstream activation can move by one code where its
value sits on a rounding boundary.

Where XLA has no int8 kernel, the same integer sums can run on the float32 one:
`integer_apply(..., accumulate=...)` sums a convolution's int8 x int8 products in float32
where that is exact (every sum of at most `FLOAT_EXACT_TERMS` products of int8 codes is an
integer below 2**24), so the outputs stay bit-identical. "auto" does so on the CPU for
convolutions with 2 to `CPU_INT8_CONV_MIN_CHANNELS` - 1 input channels, which XLA:CPU
runs on converted s32 operands at a fifth of float32's speed (benchmarks/int8_ops.py;
with one input channel that s32 path is the faster one).

Only the symmetric uniform weight grid (the layers' own, `WeightQuantizer("symmetric",
...)`) has integer codes with a zero point of zero; other schemes, and layers at 9+ or
float bits, stay in float (`integerize` records which layers run integer).
"""
from __future__ import annotations

import math
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from jax import lax

from jaxcompress.layers import functional as F
from jaxcompress.layers import modules as M
from jaxcompress.models.table import ModelTable
from jaxcompress.quant.qat import make_quantized_apply, weight_mask
from jaxcompress.quant.quantizers import WeightQuantizer, half_range, uniform_encode

INTEGER = "integer"
MAX_BITS = 8
ZERO_POINT = 128  # unsigned activation codes 0..255 shifted into int8
ACCUMULATE = ("int32", "float32", "auto")
# |a * w| <= 128 * 127 per product of int8 codes; a sum of K of them is an integer float32 holds
# exactly (< 2**24) while K <= FLOAT_EXACT_TERMS
FLOAT_EXACT_TERMS = 2 ** 24 // (128 * 127)
# XLA:CPU (jaxlib 0.10) runs an int8 x int8 -> int32 convolution with fewer input channels than
# this on converted s32 operands, with no int8 kernel: 0.13-0.24x float32's speed with 6-16
# input channels (measured, benchmarks/int8_ops.py); with this many or more it has one (1.4-1.6x
# float32's). With one input channel (a grey image) the s32 path is the faster (1.8x float32's).
CPU_INT8_CONV_MIN_CHANNELS = 32


def integer_layers(table: ModelTable, quant: Mapping) -> list[tuple]:
    """Paths of `table`'s `Conv` and `Dense` layers (not the attention projections) whose
    bits_w and bits_a in `quant` are both in [2, 8] (concrete values)."""
    flat = traverse_util.flatten_dict(dict(quant or {}))
    paths = []
    for layer in table.layers:
        path = tuple(layer.path.split("/"))
        bits_w, bits_a = flat.get(path + ("bits_w",)), flat.get(path + ("bits_a",))
        plain = layer.kind == "conv" or len(table.kernel_axes(layer)) == 2  # a DenseGeneral's kernel has 3+ axes
        if plain and bits_w is not None and bits_a is not None and 2 <= float(bits_w) <= MAX_BITS \
                and 2 <= float(bits_a) <= MAX_BITS:
            paths.append(path)
    return paths


def integerize(table: ModelTable, variables: Mapping, quantizer: WeightQuantizer = WeightQuantizer()) -> dict:
    """`variables` (of `table`'s model) plus the `integer` collection (int8 `kernel` codes,
    float32 `step_w`) for every layer `integer_layers` names. Refuses a non-symmetric
    weight quantizer, and variables with no such layer."""
    if quantizer.scheme != "symmetric":
        raise ValueError(f"integerize: the {quantizer.scheme} weight grid has no zero-free integer codes; "
                         f"quantize with WeightQuantizer('symmetric', ...) for integer execution")
    flat_p = traverse_util.flatten_dict(dict(variables["params"]))
    flat_m = traverse_util.flatten_dict(dict(variables.get("masks") or {}))
    flat_q = traverse_util.flatten_dict(dict(variables.get("quant") or {}))
    out = {}
    for path in integer_layers(table, variables.get("quant")):
        kernel = jnp.asarray(flat_p[path + ("kernel",)], jnp.float32)
        mask = weight_mask(flat_m, path, kernel.shape)
        if mask is not None:
            kernel = kernel * mask
        bits = flat_q[path + ("bits_w",)]
        enc = uniform_encode(kernel, bits, "symmetric", quantizer.granularity, mask)
        half = half_range(bits)
        codes = enc["codes"] - half if mask is None else (enc["codes"] - half) * mask
        out[path + ("kernel",)] = codes.astype(jnp.int8)
        out[path + ("step_w",)] = jnp.broadcast_to(enc["scale"], kernel.shape[-1:]).astype(jnp.float32)
    if not out:
        raise ValueError("integerize: no Conv or Dense layer has both bits_w and bits_a in [2, 8]; set them with "
                         "make_quant (jaxcompress.quant.policy) before integerizing")
    return {**variables, INTEGER: traverse_util.unflatten_dict(out)}


class _IntegerLax:
    """`jax.lax` for one layer call, with its convolution / dot product run on the int8
    codes: the float operands Flax hands over are the activation codes (the layer passes
    them in) and the fake-quantized kernel (ignored: the int8 codes replace it)."""

    def __init__(self, codes_w, step, zero_point: int, float_accumulate: bool = False):
        self.codes_w, self.step, self.zero_point = codes_w, step, zero_point
        self.float_accumulate = float_accumulate  # the products summed in float32: exact (`accumulates_in_float`)

    def __getattr__(self, name):
        return getattr(lax, name)

    def _finish(self, acc, correction):
        if self.zero_point:
            acc = acc + self.zero_point * correction
        step = self.step
        if step.ndim > 1:  # one activation step per example: Flax may have flattened the batch axes
            step = step.reshape((acc.shape[0],) + (1,) * (acc.ndim - 2) + step.shape[-1:])
        return acc.astype(jnp.float32) * step

    def _lhs(self, codes):
        return (codes - self.zero_point).astype(jnp.int8)

    def conv_general_dilated(self, lhs, rhs, *args, **kwargs):
        kwargs.pop("precision", None)

        def conv(x):
            if self.float_accumulate:  # the same integer sums, computed by the float32 kernel
                return lax.conv_general_dilated(x.astype(jnp.float32), self.codes_w.astype(jnp.float32), *args,
                                                precision=lax.Precision.HIGHEST, **kwargs).astype(jnp.int32)
            return lax.conv_general_dilated(x, self.codes_w, *args, preferred_element_type=jnp.int32, **kwargs)
        acc = conv(self._lhs(lhs))
        correction = conv(jnp.ones_like(lhs[:1], jnp.int8)) if self.zero_point else None
        return self._finish(acc, correction)

    def dot_general(self, lhs, rhs, dimension_numbers, precision=None, **kwargs):
        acc = lax.dot_general(self._lhs(lhs), self.codes_w, dimension_numbers, preferred_element_type=jnp.int32)
        correction = jnp.sum(self.codes_w.astype(jnp.int32), axis=0) if self.zero_point else None
        return self._finish(acc, correction)


_FLAX_CALLS = {M.Conv: nn.Conv, M.Dense: nn.Dense}


def accumulates_in_float(kernel_shape, accumulate: str, backend: str) -> bool:
    """Whether a convolution's int8 products (kernel `kernel_shape`, HWIO) are summed by
    the float32 kernel, exactly (at most `FLOAT_EXACT_TERMS` terms per output), instead of
    an int8 -> int32 one: never for "int32"; wherever exact for "float32"; for "auto",
    where exact and the input has 2 to `CPU_INT8_CONV_MIN_CHANNELS` - 1 channels on the
    CPU (no int8 kernel there). Dense layers always sum in int32 (XLA:CPU has int8 dots)."""
    if accumulate not in ACCUMULATE:
        raise ValueError(f"integer accumulate={accumulate!r}; choose one of {', '.join(ACCUMULATE)}")
    exact = math.prod(kernel_shape[:-1]) <= FLOAT_EXACT_TERMS
    if accumulate == "auto":
        return exact and backend == "cpu" and 1 < kernel_shape[-2] < CPU_INT8_CONV_MIN_CHANNELS
    return exact and accumulate == "float32"


def _integer_call(module, inputs, accumulate: str = "int32"):
    """`module(inputs)` (a `Conv` or `Dense` with an `integer` entry) in integers."""
    flax_cls = _FLAX_CALLS[type(module)]
    spatial = 0 if flax_cls is nn.Dense else (1 if isinstance(module.kernel_size, int) else len(module.kernel_size))
    batch_dims = 1 if flax_cls is nn.Dense and inputs.ndim > 1 else inputs.ndim - spatial - 1
    codes, step_a = F.activation_codes(inputs, module.get_variable("quant", "bits_a"),
                                       module._collection_value("quant", "range_a"), module.signed_input,
                                       batch_dims=batch_dims)
    step_w, codes_w = module.get_variable(INTEGER, "step_w"), module.get_variable(INTEGER, "kernel")
    in_float = flax_cls is nn.Conv and accumulates_in_float(codes_w.shape, accumulate, jax.default_backend())
    ops = _IntegerLax(codes_w, step_a * step_w, 0 if module.signed_input else ZERO_POINT, in_float)
    y = M._flax_call_with(flax_cls, lax=ops)(module, codes)
    return F.apply_channel_mask(y, module._channel_mask(module.features))


def _interceptor(accumulate: str):
    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if (context.method_name == "__call__" and type(module) in _FLAX_CALLS
                and module.has_variable(INTEGER, "kernel")):
            return _integer_call(module, *args, **kwargs, accumulate=accumulate)
        return next_fun(*args, **kwargs)

    return intercept


def integer_apply(model: nn.Module, quantizer: WeightQuantizer = WeightQuantizer(), accumulate: str = "int32"):
    """`apply(variables, x, **kw)`: `make_quantized_apply(model, quantizer)` with the layers
    of `variables[INTEGER]` (`integerize`) executed on their integer codes: int8 x int8
    products summed in int32, or, for the convolutions `accumulates_in_float` picks by
    `accumulate` ("int32" | "float32" | "auto"), the same sums by the float32 kernel
    (exact, so the outputs are bit-identical)."""
    float_apply = make_quantized_apply(model, quantizer)
    intercept = _interceptor(accumulate)
    accumulates_in_float((1, 1), accumulate, "cpu")  # an unknown mode fails here, before tracing

    def apply(variables, *args, **kwargs):
        with nn.intercept_methods(intercept):
            return float_apply(variables, *args, **kwargs)

    return apply
