"""Minibatch iteration over in-memory arrays and placement on devices.

Batches stay uint8 on the host; normalisation and augmentation belong in the
jitted step on device.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Mapping

import jax
import numpy as np


class BatchIterator:
    """Seeded, shuffled, epoch-based minibatches over in-memory arrays, with a position that can be checkpointed.

    Runs forever. The order within epoch `e` is a permutation that is a pure
    function of (seed, e), so `get_state()` -> `set_state()` resumes exactly.
    With drop_remainder=False the last batch of each epoch is smaller.

    `batch_size` is the global batch. Of `process_count` processes (one per host of a
    multi-host run; the caller passes `jax.process_index()`, `jax.process_count()`),
    process `process_index` yields only its contiguous share of every global batch:
    rows [p * b / n, (p + 1) * b / n) of it (`np.array_split` shares for a smaller last
    batch), the permutation being the same on every process. `shard_batch` assembles the
    shares into the global array. The position (`get_state`) counts global batches, so
    it is the same on every process. `examples_read` counts the rows this process has
    yielded.
    """

    def __init__(self, x, y, batch_size: int, seed: int, shuffle: bool = True,
                 drop_remainder: bool = True, process_index: int = 0, process_count: int = 1):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} examples but y has {len(y)}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if len(x) == 0 or (drop_remainder and len(x) < batch_size):
            raise ValueError(f"{len(x)} examples do not fill one batch of {batch_size}; use a "
                             f"smaller batch_size or drop_remainder=False.")
        _check_processes(batch_size, process_index, process_count)
        self._x, self._y = x, y
        self._batch_size = int(batch_size)
        self._seed = int(seed)
        self._shuffle = shuffle
        self._drop_remainder = drop_remainder
        self._process_index, self._process_count = int(process_index), int(process_count)
        self._epoch, self._index = 0, 0
        self._perm_epoch, self._perm = None, None
        self.examples_read = 0

    @property
    def batch_size(self) -> int:
        """The global batch size (this process yields its share of it)."""
        return self._batch_size

    @property
    def steps_per_epoch(self) -> int:
        n, b = len(self._x), self._batch_size
        return n // b if self._drop_remainder else -(-n // b)

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            n = len(self._x)
            self._perm = (np.random.default_rng([self._seed, epoch]).permutation(n)
                          if self._shuffle else np.arange(n))
            self._perm_epoch = epoch
        return self._perm

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._index >= self.steps_per_epoch:
            self._epoch, self._index = self._epoch + 1, 0
        start = self._index * self._batch_size
        idx = self._permutation(self._epoch)[start:start + self._batch_size]
        idx = process_rows(idx, self._process_index, self._process_count)
        self._index += 1
        self.examples_read += len(idx)
        return {"image": self._x[idx], "label": self._y[idx]}

    def get_state(self) -> dict[str, int]:
        """Position to checkpoint: {"epoch": e, "index": batches already taken in epoch e}."""
        return {"epoch": self._epoch, "index": self._index}

    def set_state(self, state: Mapping[str, int]) -> None:
        """Restores a position from `get_state`; the next batch continues from there."""
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= self.steps_per_epoch:
            raise ValueError(f"invalid iterator state {dict(state)} for {self.steps_per_epoch} "
                             f"steps per epoch.")
        self._epoch, self._index = epoch, index


def _check_processes(batch_size: int, process_index: int, process_count: int) -> None:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in 0..process_count-1 (process_count="
                         f"{process_count}).")
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} (the global batch) must be a multiple of the "
                         f"{process_count} processes.")


def process_rows(rows, process_index: int, process_count: int):
    """This process's contiguous share of a global batch's `rows` (`np.array_split`:
    equal shares when `process_count` divides the batch)."""
    if process_count == 1:
        return rows
    return np.array_split(rows, process_count)[process_index]


def iterate_eval(x, y, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Every example once, in order, in global batches of exactly `batch_size`.

    The last batch is zero-padded; the boolean "mask" marks real examples, so a
    jitted eval step compiles once and sums metrics over mask only. With several
    processes each yields its contiguous `batch_size / process_count` rows of every
    padded global batch (as `BatchIterator`), so the sums over the global batch equal
    one process's.
    """
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples but y has {len(y)}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    _check_processes(batch_size, process_index, process_count)
    share = batch_size // process_count
    for start in range(0, len(x), batch_size):
        lo = start + process_index * share
        images, labels = x[lo:lo + share], y[lo:lo + share]
        real = len(images)
        mask = np.zeros(share, bool)
        mask[:real] = True
        if real < share:
            images = np.concatenate([images, np.zeros((share - real,) + images.shape[1:], images.dtype)])
            labels = np.concatenate([labels, np.zeros((share - real,) + labels.shape[1:], labels.dtype)])
        yield {"image": images, "label": labels, "mask": mask}


def shard_batch(batch: Mapping[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    """Places each array of a host batch on devices with `sharding`.

    `sharding` is a jax.sharding.Sharding that splits axis 0 over the mesh axis
    'data' (e.g. NamedSharding(mesh, P('data'))); a jax.sharding.Mesh is
    accepted as shorthand for exactly that. On multi-host runs each process
    passes its own slice of the global batch and the result is the global array
    (jax.make_array_from_process_local_data).
    """
    if isinstance(sharding, jax.sharding.Mesh):
        sharding = jax.sharding.NamedSharding(sharding, jax.sharding.PartitionSpec("data"))
    if jax.process_count() > 1:
        return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
                for k, v in batch.items()}
    return {k: jax.device_put(v, sharding) for k, v in batch.items()}


class DevicePrefetcher:
    """The batches of a `BatchIterator`, placed on devices (`shard_batch`) `size` batches
    ahead of the one being trained on, and at most `limit` of them in all (None: no limit).

    `flax.jax_utils.prefetch_to_device` for our sharded global batches: `device_put` is
    asynchronous, so the next batches' host gathering and transfers overlap the running
    step. `get_state()` and `examples_read` count only the batches handed out by
    `next()` (as the wrapped iterator's would without prefetching), never the ones
    waiting in the buffer, so a checkpoint records the position of what was trained on.
    `limit` (the steps left to run) keeps the buffer from drawing past the last step.
    `size=0` draws and places each batch when it is asked for.
    """

    def __init__(self, iterator: BatchIterator, sharding, size: int = 2, limit: int | None = None):
        if size < 0:
            raise ValueError(f"prefetch size must be >= 0, got {size}.")
        self._it, self._sharding, self._size = iterator, sharding, int(size)
        self._left = None if limit is None else int(limit)  # batches still to draw from the iterator
        self._buffer = collections.deque()  # (device batch, iterator position after it, examples read after it)
        self._state, self.examples_read = iterator.get_state(), iterator.examples_read

    @property
    def steps_per_epoch(self) -> int:
        return self._it.steps_per_epoch

    def _draw(self, n: int) -> None:
        for _ in range(n):
            if self._left is not None and self._left <= 0:
                return
            batch = shard_batch(next(self._it), self._sharding)
            self._buffer.append((batch, self._it.get_state(), self._it.examples_read))
            if self._left is not None:
                self._left -= 1

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        self._draw(self._size + 1 - len(self._buffer))
        if not self._buffer:
            raise StopIteration
        batch, self._state, self.examples_read = self._buffer.popleft()
        return batch

    def get_state(self) -> dict[str, int]:
        """The wrapped iterator's position after the last batch `next()` returned."""
        return dict(self._state)
