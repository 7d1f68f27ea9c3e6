"""Quantization: bit-width policies (the `quant` collection)."""
from jaxcompress.quant.policy import make_quant

__all__ = ["make_quant"]
