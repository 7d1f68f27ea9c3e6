"""Structural pruning: channel-group masks and physical surgery."""
from jaxcompress.pruning.surgery import kept_indices, shrink

__all__ = ["kept_indices", "shrink"]
