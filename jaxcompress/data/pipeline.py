"""Minibatch iteration over in-memory arrays and placement on devices.

Batches stay uint8 on the host; normalisation and augmentation belong in the
jitted step on device.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import jax
import numpy as np


class BatchIterator:
    """Seeded, shuffled, epoch-based minibatches over in-memory arrays, with a position that can be checkpointed.

    Runs forever. The order within epoch `e` is a permutation that is a pure
    function of (seed, e), so `get_state()` -> `set_state()` resumes exactly.
    With drop_remainder=False the last batch of each epoch is smaller.
    """

    def __init__(self, x, y, batch_size: int, seed: int, shuffle: bool = True,
                 drop_remainder: bool = True):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} examples but y has {len(y)}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if len(x) == 0 or (drop_remainder and len(x) < batch_size):
            raise ValueError(f"{len(x)} examples do not fill one batch of {batch_size}; use a "
                             f"smaller batch_size or drop_remainder=False.")
        self._x, self._y = x, y
        self._batch_size = int(batch_size)
        self._seed = int(seed)
        self._shuffle = shuffle
        self._drop_remainder = drop_remainder
        self._epoch, self._index = 0, 0
        self._perm_epoch, self._perm = None, None

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
        self._index += 1
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


def iterate_eval(x, y, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Every example once, in order, in batches of exactly `batch_size`.

    The last batch is zero-padded; the boolean "mask" marks real examples, so a
    jitted eval step compiles once and sums metrics over mask only.
    """
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples but y has {len(y)}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    n = len(x)
    for start in range(0, n, batch_size):
        images, labels = x[start:start + batch_size], y[start:start + batch_size]
        real = len(images)
        mask = np.zeros(batch_size, bool)
        mask[:real] = True
        if real < batch_size:
            images = np.concatenate([images, np.zeros((batch_size - real,) + images.shape[1:],
                                                      images.dtype)])
            labels = np.concatenate([labels, np.zeros((batch_size - real,) + labels.shape[1:],
                                                      labels.dtype)])
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
