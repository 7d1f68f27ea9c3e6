"""Images read on demand from a random-access source (`data.lazy`, tfds datasets).

A `LazyImages` stands where a dataset's uint8 image array would: it has `len`, `shape`
and `dtype`, and indexing it with an int, a slice or an index array reads (decodes)
just those examples. Selecting a subset (`take_rows`: the validation carve-out, class
selection, stratified subsets) reads nothing. So with several processes each one reads
only its rows of every global batch (`BatchIterator`, `iterate_eval`), and a dataset
larger than a host's memory trains straight from its files.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

Reader = Callable[[np.ndarray], np.ndarray]  # source indices (k,) -> uint8 images (k, *example_shape)


class LazyImages:
    """uint8 images `read` on demand: row i is example `index[i]` of the source.

    `read(indices)` returns the examples' images as one (k, H, W, C) uint8 array.
    `examples_read` counts the examples read through this view and every view taken
    from it (they share one counter).
    """

    dtype = np.dtype(np.uint8)

    def __init__(self, read: Reader, index, example_shape: tuple[int, ...], counter: list | None = None):
        self._read = read
        self._index = np.asarray(index, np.int64).reshape(-1)
        self._example_shape = tuple(int(s) for s in example_shape)
        self._counter = [0] if counter is None else counter

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self._index),) + self._example_shape

    @property
    def ndim(self) -> int:
        return 1 + len(self._example_shape)

    @property
    def examples_read(self) -> int:
        return self._counter[0]

    def __len__(self) -> int:
        return len(self._index)

    def take_rows(self, rows) -> LazyImages:
        """The rows `rows` (an index array or a boolean mask) as a view: nothing is read."""
        return LazyImages(self._read, self._index[rows], self._example_shape, self._counter)

    def map(self, fn: Callable[[np.ndarray], np.ndarray], example_shape: tuple[int, ...]) -> LazyImages:
        """A view whose reads are passed through `fn` (e.g. a resize), of `example_shape`."""
        read = self._read
        return LazyImages(lambda idx: fn(read(idx)), self._index, example_shape, self._counter)

    def __getitem__(self, key) -> np.ndarray:
        idx = self._index[key]
        if np.ndim(idx) == 0:
            return self._get(np.asarray([idx]))[0]
        return self._get(np.asarray(idx).reshape(-1))

    def _get(self, idx: np.ndarray) -> np.ndarray:
        if not len(idx):
            return np.zeros((0,) + self._example_shape, np.uint8)
        out = np.asarray(self._read(idx))
        if out.dtype != np.uint8 or out.shape != (len(idx),) + self._example_shape:
            raise ValueError(f"a lazy image source returned {out.dtype} {out.shape} for {len(idx)} examples; "
                             f"expected uint8 {(len(idx),) + self._example_shape}")
        self._counter[0] += len(idx)
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """Reads every row (what `np.asarray` of a whole split costs)."""
        out = self[:]
        return out if dtype is None else out.astype(dtype)


def take_rows(x, rows):
    """`x[rows]` for an index array or boolean mask; a `LazyImages` view (nothing read)
    when `x` is lazy."""
    return x.take_rows(rows) if isinstance(x, LazyImages) else x[rows]
