"""Tests for jaxcompress.data: sources, transforms and the batch pipeline."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.data import (
    BatchIterator,
    DataError,
    Dataset,
    augment_cifar,
    channel_stats,
    iterate_eval,
    load_dataset,
    normalize,
    select_classes,
    shard_batch,
    split_validation,
)
from jaxcompress.data import sources

DATA_DIR = os.environ.get("JAXCOMPRESS_DATA_DIR")


def _real_file(name):
    if not DATA_DIR or not os.path.isfile(os.path.join(DATA_DIR, name)):
        pytest.skip(f"{name} not found: set JAXCOMPRESS_DATA_DIR to the shared data folder")
    return os.path.join(DATA_DIR, name)


def _assert_one_line_error(excinfo, *fragments):
    msg = str(excinfo.value)
    assert "\n" not in msg
    for fragment in fragments:
        assert fragment in msg, msg


# ----------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_digits_shapes_and_split(digits):
    assert isinstance(digits, Dataset)
    assert digits.x_train.dtype == np.uint8 and digits.x_test.dtype == np.uint8
    assert digits.y_train.dtype == np.int32 and digits.y_test.dtype == np.int32
    assert digits.x_train.shape == (1438, 8, 8, 1)
    assert digits.x_test.shape == (359, 8, 8, 1)  # round(0.2 * 1797)
    assert digits.image_shape == (8, 8, 1)
    assert digits.num_classes == 10
    assert digits.class_names == tuple("0123456789")
    assert digits.x_train.max() == 255 and digits.x_train.min() == 0
    # Stratified: each class's test share is 20% of that class up to rounding.
    y_all = np.concatenate([digits.y_train, digits.y_test])
    counts_all = np.bincount(y_all, minlength=10)
    counts_test = np.bincount(digits.y_test, minlength=10)
    assert counts_all.sum() == 1797
    assert np.all(np.abs(counts_test - 0.2 * counts_all) <= 1)


def test_digits_is_deterministic_and_matches_sklearn(digits):
    again = load_dataset("digits")
    np.testing.assert_array_equal(digits.x_train, again.x_train)
    np.testing.assert_array_equal(digits.y_test, again.y_test)
    from sklearn.datasets import load_digits
    raw = load_digits()
    scaled = np.round(raw.images * 255 / 16).astype(np.uint8)[..., None]
    # Every train/test image is an sklearn image with its label, each used once.
    x_all = np.concatenate([digits.x_train, digits.x_test]).reshape(1797, -1)
    y_all = np.concatenate([digits.y_train, digits.y_test])
    key = lambda x, y: sorted(zip(map(bytes, x), y.tolist()))
    assert key(x_all, y_all) == key(scaled.reshape(1797, -1), raw.target)


# ----------------------------------------------------------------------------- npz


def _write_npz(path, **overrides):
    rng = np.random.default_rng(0)
    arrays = dict(
        x_train=rng.integers(0, 256, (12, 6, 5), dtype=np.uint8),
        y_train=np.arange(12, dtype=np.uint8) % 3,
        x_test=rng.integers(0, 256, (4, 6, 5), dtype=np.uint8),
        y_test=np.array([2, 1, 0, 1], np.uint8),
    )
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return arrays


def test_npz_grey_gets_channel_axis(tmp_path):
    arrays = _write_npz(tmp_path / "small.npz")
    ds = load_dataset("npz:small.npz", data_dir=str(tmp_path))
    assert ds.name == "npz:small.npz"
    assert ds.x_train.shape == (12, 6, 5, 1) and ds.x_test.shape == (4, 6, 5, 1)
    assert ds.y_train.dtype == np.int32 and ds.y_test.dtype == np.int32
    np.testing.assert_array_equal(ds.x_train[..., 0], arrays["x_train"])
    np.testing.assert_array_equal(ds.y_test, [2, 1, 0, 1])
    assert ds.num_classes == 3 and ds.class_names is None


def test_npz_env_var_absolute_path_and_classes(tmp_path, monkeypatch):
    rgb = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    _write_npz(tmp_path / "rgb.npz", x_train=rgb, y_train=np.array([0, 1]),
               x_test=rgb[:1], y_test=np.array([1]), classes=np.array(["cat", "dog", "eel"]))
    monkeypatch.setenv("JAXCOMPRESS_DATA_DIR", str(tmp_path))
    ds = load_dataset("npz:rgb.npz")
    assert ds.image_shape == (4, 4, 3)
    assert ds.class_names == ("cat", "dog", "eel") and ds.num_classes == 3
    same = load_dataset(f"npz:{tmp_path / 'rgb.npz'}", data_dir="/nonexistent")
    np.testing.assert_array_equal(same.x_train, rgb)


def test_npz_shortcut_uses_file_in_data_dir(tmp_path):
    _write_npz(tmp_path / "mnist.npz")
    ds = load_dataset("mnist", data_dir=str(tmp_path))
    assert ds.name == "mnist" and ds.x_train.shape == (12, 6, 5, 1)


def test_npz_missing_key(tmp_path):
    _write_npz(tmp_path / "bad.npz", y_test=None)
    with pytest.raises(DataError) as e:
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")
    _assert_one_line_error(e, "missing keys ['y_test']")


def test_npz_length_mismatch(tmp_path):
    _write_npz(tmp_path / "bad.npz", y_train=np.zeros(11, np.uint8))
    with pytest.raises(DataError) as e:
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")
    _assert_one_line_error(e, "x_train has 12 images but y_train has 11 labels")


def test_npz_wrong_dtype_and_shape(tmp_path):
    _write_npz(tmp_path / "f.npz", x_test=np.zeros((4, 6, 5), np.float32))
    with pytest.raises(DataError) as e:
        load_dataset(f"npz:{tmp_path / 'f.npz'}")
    _assert_one_line_error(e, "x_test must be uint8", "float32")
    _write_npz(tmp_path / "s.npz", x_test=np.zeros((4, 7, 5), np.uint8))
    with pytest.raises(DataError) as e:
        load_dataset(f"npz:{tmp_path / 's.npz'}")
    _assert_one_line_error(e, "differ in shape")


def test_npz_missing_file(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("npz:nothere.npz", data_dir=str(tmp_path))
    _assert_one_line_error(e, "not found", str(tmp_path / "nothere.npz"), "JAXCOMPRESS_DATA_DIR")


def test_npz_corrupt_file(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"this is not a zip file\n" * 10)
    with pytest.raises(DataError) as e:
        load_dataset("npz:junk.npz", data_dir=str(tmp_path))
    _assert_one_line_error(e, "junk.npz", "not a readable .npz")


def test_unknown_name_and_bad_arguments():
    with pytest.raises(DataError) as e:
        load_dataset("imagenet")
    _assert_one_line_error(e, "Unknown dataset 'imagenet'", "npz:", "tfds:", "digits")
    with pytest.raises(DataError) as e:
        load_dataset("hf:mnist")
    _assert_one_line_error(e, "Unknown dataset 'hf:mnist'")
    assert issubclass(DataError, ValueError)
    with pytest.raises(DataError, match="channels must be 1, 3"):
        load_dataset("digits", channels=2)
    with pytest.raises(DataError, match="image_size must be a positive int"):
        load_dataset("digits", image_size=0)


# ----------------------------------------------------------------------------- real files


def test_real_mnist_npz():
    path = _real_file("mnist.npz")
    headers = sources._npz_headers(path)  # shape/dtype without reading the data
    assert headers["x_train"] == ((60000, 28, 28), np.dtype(np.uint8))
    assert headers["x_test"] == ((10000, 28, 28), np.dtype(np.uint8))
    ds = load_dataset("mnist", data_dir=DATA_DIR)
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert ds.num_classes == 10
    assert np.bincount(ds.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_real_cifar10_npz():
    path = _real_file("cifar10.npz")
    headers = sources._npz_headers(path)
    assert headers["x_train"] == ((50000, 32, 32, 3), np.dtype(np.uint8))
    assert headers["x_test"] == ((10000, 32, 32, 3), np.dtype(np.uint8))
    with np.load(path) as f:
        classes = tuple(str(c) for c in f["classes"])
        y_test = f["y_test"]
    assert classes == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                       "ship", "truck")
    assert np.bincount(y_test).tolist() == [1000] * 10


# ----------------------------------------------------------------------------- tfds (mocked)


@pytest.fixture
def mock_tfds():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        yield tfds


@pytest.mark.parametrize("name,shape,names", [
    ("mnist", (28, 28, 1), tuple("0123456789")),
    # cifar10's real names come from files written when the dataset is prepared;
    # the code-only mock only knows num_classes, so names default to "0".."9".
    ("cifar10", (32, 32, 3), tuple("0123456789")),
])
def test_tfds_mocked(mock_tfds, name, shape, names):
    ds = load_dataset(f"tfds:{name}")
    assert ds.name == f"tfds:{name}"
    assert ds.x_train.shape == (6,) + shape and ds.x_test.shape == (6,) + shape
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int32
    assert ds.num_classes == 10 and ds.class_names == names
    assert 0 <= ds.y_train.min() and ds.y_train.max() < 10
    # The mock yields the same examples for every split and read.
    direct = mock_tfds.data_source(name, split="train")
    np.testing.assert_array_equal(ds.x_train[3], direct[3]["image"])
    assert ds.y_train[3] == direct[3]["label"]
    assert "tensorflow" not in sys.modules


def test_tfds_shortcut_falls_back_when_no_npz(mock_tfds, tmp_path):
    ds = load_dataset("mnist", data_dir=str(tmp_path), image_size=32, channels=3)
    assert ds.name == "tfds:mnist" and ds.x_test.shape == (6, 32, 32, 3)


def test_tfds_varying_size_needs_image_size(mock_tfds):
    with pytest.raises(DataError) as e:
        load_dataset("tfds:imagenet2012")
    _assert_one_line_error(e, "varying size", "image_size")
    ds = load_dataset("tfds:imagenet2012", image_size=16)
    assert ds.x_train.shape == (6, 16, 16, 3) and ds.num_classes == 1000


def test_tfds_not_prepared_and_unknown(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(DataError) as e:
        load_dataset("tfds:mnist", data_dir=str(tmp_path))
    _assert_one_line_error(e, "not prepared", "tfds build mnist", "npz:")
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", data_dir=str(tmp_path))  # no npz there, tfds not prepared either
    _assert_one_line_error(e, "no cifar10.npz in", "tfds build cifar10")
    with pytest.raises(DataError) as e:
        load_dataset("tfds:no_such_dataset_xyz")
    _assert_one_line_error(e, "tfds has no dataset 'no_such_dataset_xyz'")


def test_tfds_reads_real_array_record_files(tmp_path):
    """Prepares a tiny dataset as ArrayRecord (no TensorFlow needed) and reads it back."""
    tfds = pytest.importorskip("tensorflow_datasets")

    class JaxcompressTinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            # Tensor, not Image: encoding PNGs while preparing would need TensorFlow.
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(5, 4, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(names=["a", "b", "c"])}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(7, 0), "test": self._generate_examples(3, 100)}

        def _generate_examples(self, n, offset):
            for i in range(n):
                yield i, {"image": np.full((5, 4, 1), offset + i, np.uint8), "label": i % 3}

    JaxcompressTinyImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    # Not registered: tfds finds the prepared files in data_dir, as on a machine
    # that received a data_dir built elsewhere.
    ds = load_dataset("tfds:jaxcompress_tiny_images", data_dir=str(tmp_path))
    assert ds.x_train.shape == (7, 5, 4, 1) and ds.x_test.shape == (3, 5, 4, 1)
    assert ds.num_classes == 3 and ds.class_names == ("a", "b", "c")
    # tfds shuffles record order; each image still carries its own label.
    assert sorted(ds.x_train[:, 0, 0, 0].tolist()) == list(range(7))
    np.testing.assert_array_equal(ds.y_train, ds.x_train[:, 0, 0, 0] % 3)
    assert sorted(ds.x_test[:, 2, 1, 0].tolist()) == [100, 101, 102]
    np.testing.assert_array_equal(ds.y_test, (ds.x_test[:, 0, 0, 0] - 100) % 3)
    assert "tensorflow" not in sys.modules


# ----------------------------------------------------------------------------- conversions


def test_grey_to_rgb_resize(tmp_path):
    rng = np.random.default_rng(1)
    _write_npz(tmp_path / "m.npz", x_train=rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
               y_train=np.array([0, 1, 2]), x_test=np.full((1, 28, 28), 77, np.uint8),
               y_test=np.array([1]))
    ds = load_dataset("npz:m.npz", data_dir=str(tmp_path), image_size=32, channels=3)
    assert ds.x_train.shape == (3, 32, 32, 3) and ds.x_train.dtype == np.uint8
    np.testing.assert_array_equal(ds.x_train[..., 0], ds.x_train[..., 1])
    np.testing.assert_array_equal(ds.x_train[..., 0], ds.x_train[..., 2])
    np.testing.assert_array_equal(ds.x_test, 77)  # a constant image stays constant


def test_rgb_to_grey_averages(tmp_path):
    x = np.zeros((1, 2, 2, 3), np.uint8)
    x[0, 0, 0] = [0, 0, 2]      # mean 0.67 -> 1
    x[0, 0, 1] = [10, 20, 31]   # mean 20.33 -> 20
    x[0, 1, 0] = [255, 255, 255]
    _write_npz(tmp_path / "c.npz", x_train=x, y_train=np.array([0]), x_test=x, y_test=np.array([0]))
    ds = load_dataset("npz:c.npz", data_dir=str(tmp_path), channels=1)
    assert ds.x_train.shape == (1, 2, 2, 1)
    np.testing.assert_array_equal(ds.x_train[0, ..., 0], [[1, 20], [255, 0]])


def test_digits_to_lenet_size(digits):
    ds = load_dataset("digits", image_size=28)
    assert ds.x_train.shape == (1438, 28, 28, 1)
    np.testing.assert_array_equal(ds.y_train, digits.y_train)


# ----------------------------------------------------------------------------- transforms


def test_split_validation():
    x = np.arange(100)[:, None] * np.ones((1, 3), int)
    y = np.repeat(np.arange(4), 25)
    (xt, yt), (xv, yv) = split_validation(x, y, 0.2, seed=3)
    assert len(xv) == 20 and len(xt) == 80
    assert np.bincount(yv).tolist() == [5, 5, 5, 5]  # stratified
    ids_t, ids_v = xt[:, 0], xv[:, 0]
    assert not set(ids_t) & set(ids_v)
    assert sorted(np.concatenate([ids_t, ids_v]).tolist()) == list(range(100))
    np.testing.assert_array_equal(y[ids_v], yv)
    (_, _), (xv2, _) = split_validation(x, y, 0.2, seed=3)
    np.testing.assert_array_equal(xv, xv2)
    (_, _), (xv3, _) = split_validation(x, y, 0.2, seed=4)
    assert not np.array_equal(xv, xv3)
    (xt4, _), (xv4, yv4) = split_validation(x, y, 7)
    assert len(xv4) == 7 and len(xt4) == 93 and np.bincount(yv4, minlength=4).max() == 2
    for bad in (100, 0, 1.0, 0.0, -3):
        with pytest.raises(ValueError):
            split_validation(x, y, bad)


def test_select_classes():
    x = np.array([10, 11, 12, 13, 14, 15])
    y = np.array([0, 3, 1, 3, 2, 1])
    xs, ys = select_classes(x, y, [3, 1])
    np.testing.assert_array_equal(xs, [11, 12, 13, 15])
    np.testing.assert_array_equal(ys, [0, 1, 0, 1])
    assert ys.dtype == np.int32
    xs, ys = select_classes(x, y, [3, 1], relabel=False)
    np.testing.assert_array_equal(ys, [3, 1, 3, 1])
    with pytest.raises(ValueError, match="do not occur"):
        select_classes(x, y, [1, 7])
    with pytest.raises(ValueError, match="duplicates"):
        select_classes(x, y, [1, 1])


def test_channel_stats_and_normalize():
    x = np.array([[[[0, 255]], [[255, 255]]]], np.uint8)  # (1, 2, 1, 2)
    mean, std = channel_stats(x)
    assert mean.dtype == np.float32 and std.dtype == np.float32
    np.testing.assert_allclose(mean, [0.5, 1.0])
    np.testing.assert_allclose(std, [0.5, 0.0], atol=1e-7)
    x2 = np.array([[[[51, 102]]]], np.uint8)  # 0.2, 0.4
    out = normalize(x2, [0.1, 0.2], [0.5, 0.25])
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0, 0], [0.2, 0.8], rtol=1e-6)
    out_j = normalize(jnp.asarray(x2), np.array([0.1, 0.2]), np.array([0.5, 0.25]))
    assert isinstance(out_j, jax.Array) and out_j.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out_j), out, rtol=1e-6)
    # Chunked accumulation equals a direct float64 computation on a bigger array.
    big = np.random.default_rng(0).integers(0, 256, (5000, 3, 3, 3), dtype=np.uint8)
    m, s = channel_stats(big)
    np.testing.assert_allclose(m, (big / 255.0).mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(s, (big / 255.0).std(axis=(0, 1, 2)), rtol=1e-5)


def _augment_candidates(image, pad):
    h, w, _ = image.shape
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[dy:dy + h, dx:dx + w]
            yield (dy, dx, False), crop
            yield (dy, dx, True), crop[:, ::-1]


def test_augment_cifar():
    x = jnp.asarray(np.random.default_rng(0).uniform(1, 2, (32, 8, 8, 3)), jnp.float32)
    rng = jax.random.key(42)
    out = augment_cifar(rng, x)
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(jax.jit(augment_cifar)(rng, x)), np.asarray(out))
    x_np, out_np = np.asarray(x), np.asarray(out)
    seen = []
    for i in range(len(x_np)):
        matches = [k for k, cand in _augment_candidates(x_np[i], 4) if np.array_equal(cand, out_np[i])]
        assert len(matches) == 1, f"image {i} is no zero-padded crop/flip of its input"
        seen.append(matches[0])
    flips = [f for _, _, f in seen]
    assert 0 < sum(flips) < len(flips)  # both flipped and unflipped occur
    assert len({(dy, dx) for dy, dx, _ in seen}) > 5  # offsets vary per image
    assert not np.array_equal(np.asarray(augment_cifar(jax.random.key(43), x)), out_np)
    # pad=0: only flips.
    out0 = np.asarray(augment_cifar(rng, x, pad=0))
    for i in range(len(x_np)):
        assert np.array_equal(out0[i], x_np[i]) or np.array_equal(out0[i], x_np[i][:, ::-1])


# ----------------------------------------------------------------------------- pipeline


def _arrays(n=10):
    x = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 1), np.uint8)
    return x, np.arange(n, dtype=np.int32)


def test_batch_iterator_epoch_covers_all():
    x, y = _arrays(10)
    it = BatchIterator(x, y, batch_size=3, seed=0)
    assert it.steps_per_epoch == 3
    batches = [next(it) for _ in range(3)]
    labels = np.concatenate([b["label"] for b in batches])
    assert len(set(labels.tolist())) == 9  # 3 full batches of distinct examples, 1 dropped
    for b in batches:
        assert b["image"].dtype == np.uint8 and b["image"].shape == (3, 2, 2, 1)
        np.testing.assert_array_equal(b["image"][:, 0, 0, 0], b["label"])
    it = BatchIterator(x, y, batch_size=4, seed=0, drop_remainder=False)
    assert it.steps_per_epoch == 3
    labels = np.concatenate([next(it)["label"] for _ in range(3)])
    assert sorted(labels.tolist()) == list(range(10))
    it = BatchIterator(x, y, batch_size=5, seed=0, shuffle=False)
    assert [next(it)["label"].tolist() for _ in range(3)] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9],
                                                              [0, 1, 2, 3, 4]]


def test_batch_iterator_seeds_and_epochs_differ():
    x, y = _arrays(50)
    a = [next(BatchIterator(x, y, 50, seed=0))["label"]]
    b = [next(BatchIterator(x, y, 50, seed=1))["label"]]
    assert not np.array_equal(a[0], b[0])
    it = BatchIterator(x, y, 50, seed=0)
    e0, e1 = next(it)["label"], next(it)["label"]
    np.testing.assert_array_equal(e0, a[0])
    assert not np.array_equal(e0, e1) and sorted(e1.tolist()) == list(range(50))


def test_batch_iterator_resume():
    x, y = _arrays(10)
    reference = BatchIterator(x, y, batch_size=3, seed=7)
    expected = [next(reference)["label"] for _ in range(10)]
    for stop in (0, 2, 3, 4, 6):  # 3 and 6 sit on epoch boundaries
        first = BatchIterator(x, y, batch_size=3, seed=7)
        for _ in range(stop):
            next(first)
        state = first.get_state()
        assert set(state) == {"epoch", "index"}
        resumed = BatchIterator(x, y, batch_size=3, seed=7)
        resumed.set_state(dict(state))
        got = [next(resumed)["label"] for _ in range(10 - stop)]
        for g, e in zip(got, expected[stop:]):
            np.testing.assert_array_equal(g, e)
    with pytest.raises(ValueError):
        reference.set_state({"epoch": 0, "index": 4})


def test_iterate_eval_pads_and_masks():
    x, y = _arrays(10)
    batches = list(iterate_eval(x, y, 4))
    assert len(batches) == 3
    assert all(b["image"].shape == (4, 2, 2, 1) and b["label"].shape == (4,) for b in batches)
    assert sum(int(b["mask"].sum()) for b in batches) == 10
    assert batches[-1]["mask"].tolist() == [True, True, False, False]
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    assert labels.tolist() == list(range(10))
    assert [int(b["mask"].sum()) for b in iterate_eval(x, y, 5)] == [5, 5]


def test_shard_batch_one_device_mesh():
    mesh = jax.make_mesh((1,), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    x, y = _arrays(4)
    batch = next(iterate_eval(x, y, 4))
    out = shard_batch(batch, sharding)
    assert set(out) == {"image", "label", "mask"}
    for k, v in out.items():
        assert isinstance(v, jax.Array) and v.sharding == sharding
        np.testing.assert_array_equal(np.asarray(v), batch[k])
    assert out["image"].dtype == jnp.uint8
    assert shard_batch(batch, mesh)["label"].sharding == sharding


def test_stratified_subset_keeps_class_proportions_and_order():
    from jaxcompress.data import stratified_subset
    y = np.array([0] * 60 + [1] * 30 + [2] * 10)
    x = np.arange(100)
    xs, ys = stratified_subset(x, y, 20, seed=3)
    assert np.bincount(ys).tolist() == [12, 6, 2]  # 20 x (0.6, 0.3, 0.1)
    assert np.all(np.diff(xs) > 0) and np.array_equal(y[xs], ys)
    assert stratified_subset(x, y, 0)[0] is x and stratified_subset(x, y, 100)[0] is x


def test_pick_classes_relabels_and_refuses_a_class_the_dataset_lacks_in_one_line():
    from jaxcompress.data import Dataset
    from jaxcompress.errors import ConfigError
    from jaxcompress.train.experiment import pick_classes
    y_train, y_test = np.array([0, 3, 5, 3, 0], np.int32), np.array([5, 0, 3], np.int32)
    ds = Dataset(name="npz:tiny.npz", x_train=np.zeros((5, 2, 2, 1), np.uint8), y_train=y_train,
                 x_test=np.zeros((3, 2, 2, 1), np.uint8), y_test=y_test, num_classes=8)
    (_, ytr), (_, yte), k = pick_classes(ds, (5, 3), "data.classes")
    assert k == 2 and ytr.tolist() == [1, 0, 1] and yte.tolist() == [0, 1]  # 5 -> 0, 3 -> 1, in the given order
    for classes, words in (((3, 9), "npz:tiny.npz has classes 0..7"), ((3, 7), "classes [7] do not occur")):
        with pytest.raises(ConfigError) as e:
            pick_classes(ds, classes, "stamp.target.classes")
        assert str(e.value).startswith(f"stamp.target.classes={classes}: must be class ids present in the dataset")
        assert words in str(e.value) and "\n" not in str(e.value)
