"""jaxcompress: physical pruning, mixed precision and automated compression search in JAX."""
__version__ = "0.1.0"
