"""Exact storage of a compressed network: the format lives in `jaxcompress.storage`
(below `jaxcompress.cost`, which counts bytes with it, and outside this package,
whose `__init__` imports `cost`); its names are re-exported here."""
from jaxcompress.storage import (DEFAULT_INDEX_BITS, FLOAT_BITS, LayerStorage, WeightQuantizer, channel_major,
                                 from_channel_major, kept_element_mask, layer_storage, packed_bytes, sparse_entries,
                                 sparse_layout, sparse_positions, table_layer_storage)

__all__ = ["DEFAULT_INDEX_BITS", "FLOAT_BITS", "LayerStorage", "WeightQuantizer", "channel_major",
           "from_channel_major", "kept_element_mask", "layer_storage", "packed_bytes", "sparse_entries",
           "sparse_layout", "sparse_positions", "table_layer_storage"]
