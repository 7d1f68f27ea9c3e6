"""Datasets, host-side batching and on-device transforms for jaxcompress.

Typical use::

    ds = load_dataset("cifar10")                   # uint8 NHWC arrays
    mean, std = channel_stats(ds.x_train)
    it = BatchIterator(ds.x_train, ds.y_train, batch_size=128, seed=0)
    batch = shard_batch(next(it), sharding)        # then, in the jitted step:
    x = augment_cifar(rng, normalize(batch["image"], mean, std))

Language models: `load_python_stdlib(seq_len)`, byte tokens of the Python standard
library's source (offline), split by file.
"""

from jaxcompress.data.pipeline import BatchIterator, DevicePrefetcher, iterate_eval, shard_batch
from jaxcompress.data.sources import DataError, Dataset, load_dataset
from jaxcompress.data.text import TextCorpus, load_python_stdlib
from jaxcompress.data.transforms import (
    augment_cifar,
    channel_stats,
    normalize,
    select_classes,
    split_validation,
    stratified_subset,
)

__all__ = [
    "BatchIterator",
    "DataError",
    "DevicePrefetcher",
    "Dataset",
    "TextCorpus",
    "augment_cifar",
    "channel_stats",
    "iterate_eval",
    "load_dataset",
    "load_python_stdlib",
    "normalize",
    "select_classes",
    "shard_batch",
    "split_validation",
    "stratified_subset",
]
