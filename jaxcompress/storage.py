"""Exact storage of a compressed network: the bytes `jaxcompress.quant.export` writes.

Per Conv / Dense layer (after surgery, i.e. kept channels only):

* weights: `bits_w` bits per stored entry, bit-packed, rounded up to whole bytes per
  layer (`bits_w` = 32: raw float32);
* element-pruned layers (a `kernel` mask with zeros among the kept channels) store
  only the kept entries in compressed sparse form with *relative* indices, as Deep
  Compression (Han et al. 2016, Sec. 2 and Fig. 2) does: entries are taken in
  output-channel-major order; each carries an `index_bits`-bit gap (8 for conv, 5
  for dense layers by default, as in the paper) and gaps too long for the field are
  bridged by filler entries. Codes and gaps are two bit-packed streams;
* side information: float32 scales (+ a uint8 zero point each, asymmetric), one per
  output channel or one per tensor, or a float32 codebook of 2^bits_w centroids
  (k-means); none at 32 bits;
* float32 bias; a float32 activation clip value when the layer's input is quantized
  with a calibrated range (`range_a`).

BatchNorm layers store two float32 per channel (scale and shift folded with the
running statistics, as inference needs). Everything is hand-written: no library
accounts bytes this way.

Below `jaxcompress.cost` (whose `summarize` counts bytes with `table_layer_storage`)
and outside `jaxcompress.quant`, whose package imports `cost` (`quant.budget`);
`jaxcompress.quant.size` and `jaxcompress.quant.quantizers` re-export these names.

The checksums of what the library stores (`sha256_hex`, `file_sha256`, `canonical_json`)
live here too: the packed file's payload and metadata, the StableHLO file's sidecar and
the checkpoint manifests all use them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Mapping

import numpy as np
from etils import epath

from jaxcompress.errors import ConfigError

SCHEMES = ("symmetric", "asymmetric", "kmeans")
GRANULARITIES = ("channel", "tensor")
FLOAT_BITS = 32
DEFAULT_INDEX_BITS = {"conv": 8, "dense": 5}


@dataclasses.dataclass(frozen=True)
class WeightQuantizer:
    """How weights are quantized: `scheme` symmetric | asymmetric | kmeans and
    `granularity` channel | tensor (k-means always has one codebook per layer)."""

    scheme: str = "symmetric"
    granularity: str = "channel"

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ConfigError(f"unknown quant.scheme '{self.scheme}'; choose one of {', '.join(SCHEMES)}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"unknown quant.granularity '{self.granularity}'; choose one of "
                              f"{', '.join(GRANULARITIES)}")

    def scale_count(self, cout: int) -> int:
        return int(cout) if self.granularity == "channel" else 1

    def meta_bytes(self, cout: int, bits: int) -> int:
        """Bytes of the side information of a layer quantized to `bits` < 32:
        float32 scales (+ uint8 zero points) or a float32 codebook of 2^bits entries."""
        if self.scheme == "kmeans":
            return 4 * 2 ** int(bits)
        per = 5 if self.scheme == "asymmetric" else 4
        return per * self.scale_count(cout)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def channel_major(a: np.ndarray) -> np.ndarray:
    """Flattens a kernel (..., C_out) output channel by output channel (CSC for (in, out))."""
    a = np.asarray(a)
    return np.moveaxis(a, -1, 0).reshape(-1)


def from_channel_major(flat: np.ndarray, shape) -> np.ndarray:
    shape = tuple(shape)
    return np.moveaxis(np.asarray(flat).reshape((shape[-1],) + shape[:-1]), 0, -1)


def sparse_layout(keep_flat: np.ndarray, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Relative-index layout of the kept positions of a flat 0/1 array.

    Returns `(gaps, source)`: one entry per stored item; `gaps[i]` in
    [0, 2^index_bits - 1]; `source[i]` is the flat position of a real entry, or -1 for
    a filler. Decoding: a cursor starts at 0; a filler (gap = 2^index_bits - 1)
    advances it by that much; a real entry sits at cursor + gap and moves the cursor
    one past itself.
    """
    if index_bits < 1:
        raise ValueError(f"index_bits must be >= 1, got {index_bits}")
    limit = 2 ** int(index_bits) - 1
    pos = np.flatnonzero(np.asarray(keep_flat).reshape(-1))
    run = np.diff(np.concatenate([[-1], pos])) - 1  # zeros before each kept position
    fillers = run // limit
    count = fillers + 1
    total = int(count.sum())
    real_at = np.cumsum(count) - 1  # index of every real entry in the stream
    gaps = np.full(total, limit, np.int64)
    source = np.full(total, -1, np.int64)
    gaps[real_at] = run - fillers * limit
    source[real_at] = pos
    return gaps, source


def sparse_positions(gaps: np.ndarray, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `sparse_layout`: (flat positions of the real entries, their stream indices)."""
    limit = 2 ** int(index_bits) - 1
    gaps = np.asarray(gaps, np.int64)
    filler = gaps == limit
    advance = np.where(filler, limit, gaps + 1)
    end = np.cumsum(advance)
    real = np.flatnonzero(~filler)
    return end[real] - 1, real


def sparse_entries(keep_flat: np.ndarray, index_bits: int) -> int:
    """Number of stored entries (kept + fillers) of `sparse_layout`."""
    limit = 2 ** int(index_bits) - 1
    pos = np.flatnonzero(np.asarray(keep_flat).reshape(-1))
    run = np.diff(np.concatenate([[-1], pos])) - 1
    return int(pos.size + (run // limit).sum())


def packed_bytes(count: int, bits: float) -> int:
    return int(math.ceil(count * bits / 8))


@dataclasses.dataclass(frozen=True)
class LayerStorage:
    """Bytes of one layer, by part; `total` is what the packed file holds for it."""

    format: str  # "dense" | "sparse"
    entries: int  # stored weight entries (kept elements + fillers when sparse)
    weight_bytes: int
    index_bytes: int
    scale_bytes: int
    bias_bytes: int
    activation_bytes: int

    @property
    def total(self) -> int:
        return (self.weight_bytes + self.index_bytes + self.scale_bytes + self.bias_bytes
                + self.activation_bytes)


def layer_storage(num_weights: int, cout: int, bits_w: float, quantizer: WeightQuantizer, *,
                  keep_flat: np.ndarray | None = None, index_bits: int = 8, use_bias: bool = True,
                  activation_range: bool = False) -> LayerStorage:
    """Exact bytes of one layer. `keep_flat`: the element mask of the kept kernel in
    `channel_major` order (None or all ones: stored dense)."""
    sparse = keep_flat is not None and not bool(np.all(np.asarray(keep_flat) > 0))
    entries = sparse_entries(keep_flat, index_bits) if sparse else int(num_weights)
    float_layer = bits_w >= FLOAT_BITS
    bits = FLOAT_BITS if float_layer else bits_w
    return LayerStorage(
        format="sparse" if sparse else "dense", entries=entries,
        weight_bytes=packed_bytes(entries, bits),
        index_bytes=packed_bytes(entries, index_bits) if sparse else 0,
        scale_bytes=0 if float_layer else quantizer.meta_bytes(cout, bits),
        bias_bytes=4 * int(cout) if use_bias else 0,
        activation_bytes=4 if activation_range else 0)


def kept_element_mask(table, layer, kernel_mask, group_masks) -> np.ndarray:
    """`kernel_mask` restricted to the kept channels: the element mask of the shrunk
    kernel (in its own shape), as surgery would gather it."""
    keep = np.asarray(kernel_mask) > 0
    if group_masks is None:
        return keep
    keep = keep & table.kernel_keep(layer, group_masks)
    for axis, ag in enumerate(table.kernel_axes(layer)):  # every grouped axis (attention: heads and features)
        if ag is None:
            continue
        keep = np.compress(np.tile(np.asarray(group_masks[ag.group]) > 0, ag.repeat), keep, axis=axis)
    return keep


def table_layer_storage(table, layer, num_weights: int, cout: int, flat_masks: Mapping, group_masks,
                        flat_quant: Mapping, quantizer: WeightQuantizer | None = None,
                        index_bits: Mapping[str, int] | None = None) -> LayerStorage:
    """`layer_storage` of a `ModelTable` layer with `num_weights` kept-channel weights and
    `cout` kept outputs, under flattened `masks` / `quant` dicts (`cost.summarize` calls
    this for its `bytes`)."""
    quantizer = quantizer or WeightQuantizer()
    index_bits = {**DEFAULT_INDEX_BITS, **(index_bits or {})}
    key = tuple(layer.path.split("/"))
    kernel_mask = flat_masks.get(key + ("kernel",))
    keep_flat = None
    if kernel_mask is not None:
        keep_flat = channel_major(kept_element_mask(table, layer, kernel_mask, group_masks))
    bits_w = float(np.asarray(flat_quant.get(key + ("bits_w",), FLOAT_BITS)))
    bits_a = float(np.asarray(flat_quant.get(key + ("bits_a",), FLOAT_BITS)))
    has_range = key + ("range_a",) in flat_quant and bits_a < FLOAT_BITS
    return layer_storage(int(round(num_weights)), int(round(cout)), bits_w, quantizer, keep_flat=keep_flat,
                         index_bits=int(index_bits[layer.kind]), use_bias=layer.use_bias,
                         activation_range=has_range)


# ------------------------------------------------------------------------------------------------
# Checksums
# ------------------------------------------------------------------------------------------------

def sha256_hex(data) -> str:
    """The hex sha256 of `data` (bytes, or any contiguous buffer)."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str) -> str:
    """The hex sha256 of the file at `path`, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with epath.Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def canonical_json(obj) -> bytes:
    """`obj` as canonical JSON bytes (sorted keys, no white space, ASCII): what a checksum of a
    JSON document is taken of, so that it does not depend on key order or formatting."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
