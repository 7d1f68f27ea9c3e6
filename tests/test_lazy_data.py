"""Lazy datasets (`data.lazy`, issue 19): a tfds split's images are read when a batch
needs them, so each process of a many-host run reads only its rows of every global batch.
Checked on `tfds.testing.mock_data` against the eager load, and on a counting source."""
import numpy as np
import pytest

from jaxcompress.data import BatchIterator, iterate_eval, load_dataset
from jaxcompress.data.lazy import LazyImages, take_rows
from jaxcompress.data.transforms import STATS_SAMPLE, channel_stats, select_classes, split_validation


def _counting(n=40, shape=(4, 4, 1)):
    """A LazyImages over n synthetic images (image i is filled with i) and the list of
    source indices it was asked for."""
    asked = []

    def read(idx):
        asked.extend(int(i) for i in idx)
        return np.stack([np.full(shape, i % 256, np.uint8) for i in idx])

    return LazyImages(read, np.arange(n), shape), asked


def test_indexing_reads_only_the_rows_asked_for_and_views_read_nothing():
    x, asked = _counting()
    eager = np.stack([np.full((4, 4, 1), i, np.uint8) for i in range(40)])
    assert x.shape == (40, 4, 4, 1) and len(x) == 40 and x.dtype == np.uint8
    np.testing.assert_array_equal(x[[5, 2]], eager[[5, 2]])
    np.testing.assert_array_equal(x[3], eager[3])
    np.testing.assert_array_equal(x[10:13], eager[10:13])
    assert asked == [5, 2, 3, 10, 11, 12] and x.examples_read == 6
    y = np.arange(40) % 4
    (xt, yt), (xv, yv) = split_validation(x, y, 8, seed=0)
    xs, ys = select_classes(xt, yt, (1, 3))
    assert isinstance(xs, LazyImages) and len(asked) == 6  # carving and selecting read nothing
    kept = _kept(y)
    np.testing.assert_array_equal(xs[:], eager[kept][np.isin(y[kept], (1, 3))])
    assert xs.examples_read == 6 + len(xs)  # views share the counter
    np.testing.assert_array_equal(np.asarray(xv), eager[np.isin(np.arange(40), kept, invert=True)])
    np.testing.assert_array_equal(take_rows(eager, kept), eager[kept])  # plain arrays: plain indexing


def _kept(y):
    """The training rows `split_validation(x, y, 8, seed=0)` keeps (its own index function)."""
    from jaxcompress.data.transforms import stratified_split_indices
    return stratified_split_indices(y, 8, 0)[0]


def test_each_of_two_processes_reads_only_its_half_of_every_global_batch():
    batches, read = {}, {}
    for p in range(2):
        x, asked = _counting()
        it = BatchIterator(x, np.arange(40), batch_size=8, seed=3, process_index=p, process_count=2)
        batches[p] = [next(it) for _ in range(7)]  # crosses into the second epoch
        read[p] = list(asked)
    x1, asked1 = _counting()
    one = BatchIterator(x1, np.arange(40), batch_size=8, seed=3)
    for step in range(7):
        whole = next(one)
        halves = [batches[p][step] for p in range(2)]
        np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]), whole["image"])
        np.testing.assert_array_equal(np.concatenate([h["label"] for h in halves]), whole["label"])
        assert all(len(h["label"]) == 4 for h in halves)
    assert len(read[0]) == len(read[1]) == 7 * 4 and not set(read[0][:20]) & set(read[1][:20])
    assert sorted(read[0][:20] + read[1][:20]) == list(range(40))  # epoch 1: every example once, by one process
    # evaluation: each process reads its share of each padded global batch
    for p in range(2):
        x, asked = _counting(10)
        got = list(iterate_eval(x, np.arange(10), 4, process_index=p, process_count=2))
        assert asked == [i for s in range(0, 10, 4) for i in range(s + 2 * p, min(s + 2 * p + 2, 10))]
        assert [int(b["mask"].sum()) for b in got] == ([2, 2, 2] if p == 0 else [2, 2, 0])


def test_channel_stats_of_a_lazy_split_read_a_fixed_sample():
    x, asked = _counting(12)
    eager = np.stack([np.full((4, 4, 1), i, np.uint8) for i in range(12)])
    for a, b in zip(channel_stats(x), channel_stats(eager)):
        np.testing.assert_allclose(a, b)
    big, asked = _counting(STATS_SAMPLE + 5)
    mean, _ = channel_stats(big)
    idx = np.linspace(0, STATS_SAMPLE + 4, STATS_SAMPLE).astype(np.int64)
    assert asked == idx.tolist()
    np.testing.assert_allclose(mean, [np.mean(idx % 256) / 255.0], rtol=1e-6)


@pytest.fixture
def mock_tfds():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        yield tfds


@pytest.mark.parametrize("name,kwargs", [("tfds:mnist", {}), ("tfds:cifar10", dict(image_size=16, channels=1))])
def test_lazy_tfds_equals_the_eager_load(mock_tfds, name, kwargs, caplog):
    eager = load_dataset(name, **kwargs)
    lazy = load_dataset(name, lazy=True, **kwargs)
    # tfds' mock cannot skip the image decode without TensorFlow: the fallback says so, not silently
    assert "cannot read the labels without decoding the images" in caplog.text
    assert isinstance(lazy.x_train, LazyImages) and lazy.x_train.examples_read == 0
    assert lazy.x_train.shape == eager.x_train.shape and lazy.image_shape == eager.image_shape
    np.testing.assert_array_equal(lazy.y_train, eager.y_train)
    np.testing.assert_array_equal(lazy.x_train[[4, 1]], eager.x_train[[4, 1]])
    np.testing.assert_array_equal(np.asarray(lazy.x_test), eager.x_test)
    assert lazy.x_train.examples_read == 2


def test_experiment_on_a_lazy_tfds_dataset_keeps_its_splits_lazy(mock_tfds):
    from configs import quickstart
    from jaxcompress.train.experiment import setup_experiment
    c = quickstart.get_config()
    c.data.name, c.data.lazy, c.data.val_size, c.train.batch_size, c.train.eval_batch_size = \
        "tfds:mnist", True, 2, 2, 2
    exp = setup_experiment(c)
    assert all(isinstance(split[0], LazyImages) for split in (exp.train, exp.val, exp.test))
    assert (len(exp.train[0]), len(exp.val[0]), len(exp.test[0])) == (4, 2, 6)
    eager = load_dataset("tfds:mnist")
    mean, std = channel_stats(eager.x_train[_kept_of(eager.y_train, 2, c.seed)])
    np.testing.assert_allclose(exp.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(exp.std, std, rtol=1e-6)


def _kept_of(y, val_size, seed):
    from jaxcompress.data.transforms import stratified_split_indices
    return stratified_split_indices(y, val_size, seed)[0]
