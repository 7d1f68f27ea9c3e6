"""Bit packing of unsigned integer codes (1 to 64 bits each) into bytes and back.

Little-endian bit order: code i occupies bits [i * b, (i + 1) * b) of the stream,
least significant bit first; the last byte is zero-padded. `ceil(n * b / 8)` bytes
for n codes. Works in chunks of 8 codes (b bytes each) so memory stays bounded for
large layers. numpy's `packbits` does the byte assembly.
"""
from __future__ import annotations

import numpy as np

_CHUNK = 1 << 20  # codes per chunk (a multiple of 8: chunks are byte-aligned)


def pack_bits(codes, bits: int) -> np.ndarray:
    """uint8 array of ceil(len(codes) * bits / 8) bytes holding `codes` (each < 2^bits)."""
    bits = int(bits)
    if not 1 <= bits <= 64:
        raise ValueError(f"pack_bits: bits must be in 1..64, got {bits}")
    codes = np.asarray(codes).reshape(-1)
    if codes.size and (np.any(codes < 0) if codes.dtype.kind == "i" else False):
        raise ValueError("pack_bits: codes must be non-negative")
    codes = codes.astype(np.uint64)
    if bits < 64 and codes.size and int(codes.max()) >> bits:
        raise ValueError(f"pack_bits: a code exceeds {bits} bits (max {int(codes.max())})")
    shifts = np.arange(bits, dtype=np.uint64)
    out = []
    for start in range(0, codes.size, _CHUNK):
        chunk = codes[start:start + _CHUNK]
        bit_matrix = ((chunk[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
        out.append(np.packbits(bit_matrix.reshape(-1), bitorder="little"))
    return np.concatenate(out) if out else np.zeros(0, np.uint8)


def unpack_bits(data, bits: int, count: int) -> np.ndarray:
    """The `count` codes (uint64) stored by `pack_bits(codes, bits)` in `data`."""
    bits, count = int(bits), int(count)
    data = np.asarray(data, np.uint8).reshape(-1)
    if data.size * 8 < count * bits:
        raise ValueError(f"unpack_bits: {data.size} bytes cannot hold {count} codes of {bits} bits")
    weights = np.left_shift(np.uint64(1), np.arange(bits, dtype=np.uint64))
    out = []
    chunk_bytes = _CHUNK * bits // 8
    for i, start in enumerate(range(0, count, _CHUNK)):
        n = min(_CHUNK, count - start)
        raw = data[i * chunk_bytes:i * chunk_bytes + (n * bits + 7) // 8]
        bit_matrix = np.unpackbits(raw, count=n * bits, bitorder="little").reshape(n, bits)
        out.append((bit_matrix.astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64))
    return np.concatenate(out) if out else np.zeros(0, np.uint64)
