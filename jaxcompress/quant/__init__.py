"""Quantization: quantizers (uniform, k-means), QAT apply, calibration, exact size,
packed export, budget enforcement, a whole network's PTQ / QAT (`quantize_state`,
`train_qat`) and the `quantize` job (`jaxcompress.quant.job`)."""
from jaxcompress.quant.budget import SizeModel, allocate_by_sensitivity, bitops, enforce_budget
from jaxcompress.quant.calibrate import CALIBRATIONS, calibrate_ranges
from jaxcompress.quant.export import (EXPORT_FORMAT, compare_outputs, export_packed, fold_batchnorm, load_packed,
                                      norm_epsilons)
from jaxcompress.quant.pack import pack_bits, unpack_bits
from jaxcompress.quant.policy import (POLICY_FORMAT, SUPPORTED_BITS_A, SUPPORTED_BITS_W, layer_bits, make_quant,
                                      read_policy, resolve_bits, write_policy)
from jaxcompress.quant.qat import (QuantRecipe, add_kmeans_assignments, calibration_batches, make_quantized_apply,
                                   quantize_state, quantized_params, train_qat)
from jaxcompress.quant.quantizers import (GRANULARITIES, SCHEMES, WeightQuantizer, decode_weight, encode_weight,
                                          fake_quant_weight, kmeans_1d, uniform_decode, uniform_encode)
from jaxcompress.quant.size import DEFAULT_INDEX_BITS, LayerStorage, layer_storage, sparse_layout

__all__ = [
    "SizeModel", "allocate_by_sensitivity", "bitops", "enforce_budget", "CALIBRATIONS", "calibrate_ranges",
    "EXPORT_FORMAT", "compare_outputs", "export_packed", "fold_batchnorm", "load_packed", "norm_epsilons",
    "pack_bits", "unpack_bits", "POLICY_FORMAT", "SUPPORTED_BITS_A", "SUPPORTED_BITS_W", "layer_bits",
    "make_quant", "read_policy", "resolve_bits", "write_policy", "QuantRecipe", "add_kmeans_assignments",
    "calibration_batches", "make_quantized_apply", "quantize_state", "quantized_params", "train_qat",
    "GRANULARITIES", "SCHEMES", "WeightQuantizer", "decode_weight", "encode_weight", "fake_quant_weight",
    "kmeans_1d", "uniform_decode", "uniform_encode", "DEFAULT_INDEX_BITS", "LayerStorage", "layer_storage",
    "sparse_layout",
]
