"""Masked and quantized Flax layers, and the pure functions underneath."""
from jaxcompress.layers.functional import (
    FULL_PRECISION_BITS,
    apply_channel_mask,
    apply_kernel_masks,
    fake_quant_symmetric,
    fake_quant_unsigned,
    quantize_activation,
    quantize_weight,
    ste_round,
)
from jaxcompress.layers.information_dropout import (ALPHA_MAX, ALPHA_MIN, InformationDropout,
                                                    information_dropout_alpha, information_dropout_kl_relu,
                                                    information_dropout_kl_softplus)
from jaxcompress.layers.modules import (BatchNorm, Conv, Dense, DenseGeneral, Embed, LayerNorm,
                                       MultiHeadDotProductAttention, RMSNorm)

__all__ = [
    "FULL_PRECISION_BITS", "apply_channel_mask", "apply_kernel_masks", "fake_quant_symmetric",
    "fake_quant_unsigned", "quantize_activation", "quantize_weight", "ste_round",
    "BatchNorm", "Conv", "Dense", "DenseGeneral", "Embed", "LayerNorm", "MultiHeadDotProductAttention",
    "RMSNorm", "ALPHA_MAX", "ALPHA_MIN", "InformationDropout", "information_dropout_alpha",
    "information_dropout_kl_relu", "information_dropout_kl_softplus",
]
