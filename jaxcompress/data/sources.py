"""Image-classification datasets as in-memory uint8 arrays.

`load_dataset` understands three kinds of names:

* ``"digits"``: scikit-learn's 8x8 digits, embedded in the package (no file,
  no network); the offline default.
* ``"npz:<path>"``: a Keras-layout ``.npz`` file (``x_train, y_train, x_test,
  y_test`` and optionally ``classes``). The shortcuts ``"mnist"`` and
  ``"cifar10"`` read ``mnist.npz`` / ``cifar10.npz`` from the data folder when
  present and otherwise fall back to ``tfds:mnist`` / ``tfds:cifar10``.
* ``"tfds:<name>"``: a TensorFlow-Datasets dataset that has already been
  prepared, read through ``tfds.data_source`` (no TensorFlow needed).

Every problem with the input is reported as a one-line `DataError` that says
what is wrong and how to fix it, raised before large arrays are read.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile

import numpy as np

from jaxcompress.data import transforms
from jaxcompress.data.lazy import LazyImages

DATA_DIR_ENV = "JAXCOMPRESS_DATA_DIR"
NPZ_SHORTCUTS = ("mnist", "cifar10")
_VALID_FORMS = (
    "use 'digits', 'mnist', 'cifar10', 'npz:<path to .npz>' or "
    "'tfds:<tfds name>' (e.g. 'tfds:cifar100', 'tfds:svhn_cropped')"
)
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SEED = 0


class DataError(ValueError):
    """Bad dataset name, file or content; the message is always one line."""

    def __init__(self, message: str):
        lines = [line.strip() for line in str(message).splitlines()]
        super().__init__(" ".join(line for line in lines if line))


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split of images held in memory.

    Images are uint8 NHWC (grey images carry a channel axis of size 1);
    labels are int32 of shape (N,).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    class_names: tuple[str, ...] | None = None

    def __post_init__(self):
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.dtype != np.uint8 or x.ndim != 4:
                raise DataError(f"Dataset {self.name!r}: x_{split} must be uint8 NHWC, "
                                f"got {x.dtype} with shape {x.shape}.")
            if y.dtype != np.int32 or y.shape != (x.shape[0],):
                raise DataError(f"Dataset {self.name!r}: y_{split} must be int32 of shape "
                                f"({x.shape[0]},), got {y.dtype} with shape {y.shape}.")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(f"Dataset {self.name!r}: train images {self.x_train.shape[1:]} and "
                            f"test images {self.x_test.shape[1:]} differ in shape.")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise DataError(f"Dataset {self.name!r}: {len(self.class_names)} class names for "
                            f"{self.num_classes} classes.")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def num_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.x_test.shape[0])


def load_dataset(
    name: str,
    data_dir: str | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    lazy: bool = False,
) -> Dataset:
    """Loads a dataset by name (see the module docstring for the forms).

    Args:
      name: "digits", "mnist", "cifar10", "npz:<path>" or "tfds:<name>".
      data_dir: folder for relative npz paths (default: $JAXCOMPRESS_DATA_DIR)
        and the tfds data_dir (default: tfds's own default).
      image_size: if given, resize images (bilinear) to image_size x image_size.
        Required for datasets of varying image size such as tfds:imagenet2012.
      channels: if given, 1 (average RGB to grey) or 3 (replicate grey).
      lazy: a tfds dataset's images are read when indexed (`jaxcompress.data.lazy`),
        not all at load: each process of a many-host run reads only its rows, and a
        split larger than memory works. In-memory sources (digits, npz) ignore it.

    Raises:
      DataError: with a one-line explanation of what is wrong and how to fix it.
    """
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"Dataset name must be a non-empty string, got {name!r}: {_VALID_FORMS}.")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size < 1):
        raise DataError(f"image_size must be a positive int or None, got {image_size!r}.")
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1, 3 or None, got {channels!r}.")

    name = name.strip()
    if name == "digits":
        ds = _load_digits()
    elif name in NPZ_SHORTCUTS:
        folder = data_dir or os.environ.get(DATA_DIR_ENV)
        path = os.path.join(os.path.expanduser(folder), f"{name}.npz") if folder else None
        if path and os.path.isfile(path):
            ds = _load_npz(path, name)
        else:
            hint = (f"no {name}.npz in {folder!r}" if folder else
                    f"no data folder set ({DATA_DIR_ENV} / --config.data.data_dir) holding {name}.npz")
            from jaxcompress.data import tfds_source  # lazy: tfds import is slow
            ds = tfds_source.load_tfds(name, data_dir=data_dir, image_size=image_size, hint=hint, lazy=lazy)
    elif name.startswith("npz:"):
        path = _resolve_path(name[len("npz:"):], data_dir)
        ds = _load_npz(path, name)
    elif name.startswith("tfds:"):
        from jaxcompress.data import tfds_source  # lazy: tfds import is slow
        ds = tfds_source.load_tfds(name[len("tfds:"):], data_dir=data_dir, image_size=image_size, lazy=lazy)
    else:
        raise DataError(f"Unknown dataset {name!r}: {_VALID_FORMS}.")
    return _convert(ds, image_size, channels)


def _load_digits() -> Dataset:
    """scikit-learn's 1797 8x8 digits, split 80/20 stratified with seed 0."""
    from sklearn.datasets import load_digits  # lazy: sklearn import is slow

    digits = load_digits()
    x = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    y = digits.target.astype(np.int32)
    train_idx, test_idx = transforms.stratified_split_indices(
        y, _DIGITS_TEST_FRACTION, seed=_DIGITS_SEED)
    return Dataset(
        name="digits",
        x_train=x[train_idx], y_train=y[train_idx],
        x_test=x[test_idx], y_test=y[test_idx],
        num_classes=10,
        class_names=tuple(str(c) for c in digits.target_names),
    )


def _resolve_path(path: str, data_dir: str | None) -> str:
    """Resolves a relative npz path against data_dir, else $JAXCOMPRESS_DATA_DIR."""
    path = os.path.expanduser(path.strip())
    if not path:
        raise DataError(f"Empty path in 'npz:': give a file, e.g. 'npz:mnist.npz' ({_VALID_FORMS}).")
    if not os.path.isabs(path):
        folder = data_dir or os.environ.get(DATA_DIR_ENV)
        if folder:
            path = os.path.join(os.path.expanduser(folder), path)
    return os.path.abspath(path)


_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _npz_headers(path: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Reads (shape, dtype) of every array in an .npz without loading the data."""
    headers = {}
    with zipfile.ZipFile(path) as zf:
        for member in zf.namelist():
            if not member.endswith(".npy"):
                continue
            with zf.open(member) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            headers[member[: -len(".npy")]] = (tuple(shape), np.dtype(dtype))
    return headers


def _check_npz_headers(path: str, headers: dict) -> None:
    """Validates keys, dtypes and shapes of a Keras-layout npz before loading it."""
    missing = [k for k in _NPZ_KEYS if k not in headers]
    if missing:
        raise DataError(f"{path}: missing keys {missing} (found {sorted(headers)}); a Keras-layout "
                        f"npz needs x_train, y_train, x_test, y_test (+ optional classes).")
    for split in ("train", "test"):
        (xs, xd), (ys, yd) = headers[f"x_{split}"], headers[f"y_{split}"]
        if xd != np.uint8 or len(xs) not in (3, 4):
            raise DataError(f"{path}: x_{split} must be uint8 of shape (N,H,W) or (N,H,W,C), "
                            f"got {xd} {xs}; save images as uint8 0..255.")
        if not np.issubdtype(yd, np.integer) or len(ys) != 1:
            raise DataError(f"{path}: y_{split} must be integer labels of shape (N,), got {yd} {ys}.")
        if xs[0] != ys[0]:
            raise DataError(f"{path}: x_{split} has {xs[0]} images but y_{split} has {ys[0]} labels; "
                            f"they must match.")
    tr, te = headers["x_train"][0], headers["x_test"][0]
    if _with_channel(tr)[1:] != _with_channel(te)[1:]:
        raise DataError(f"{path}: x_train images {tr[1:]} and x_test images {te[1:]} differ in shape.")


def _with_channel(shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape + (1,) if len(shape) == 3 else shape


def _load_npz(path: str, name: str) -> Dataset:
    """Loads and validates a Keras-layout .npz file."""
    if not os.path.isfile(path):
        raise DataError(f"npz file not found: tried {path!r}; put the file there or point "
                        f"{DATA_DIR_ENV} (or --config.data.data_dir) at the folder holding it.")
    try:
        headers = _npz_headers(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npz file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); re-create it with np.savez.") from e
    _check_npz_headers(path, headers)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in _NPZ_KEYS}
            classes = f["classes"] if "classes" in headers else None
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: corrupt or unreadable array ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); re-create it with np.savez.") from e

    x_train, x_test = (arrays[k] if arrays[k].ndim == 4 else arrays[k][..., None]
                       for k in ("x_train", "x_test"))
    y_train, y_test = (arrays[k].astype(np.int64) for k in ("y_train", "y_test"))
    low = min(y_train.min(initial=0), y_test.min(initial=0))
    high = max(y_train.max(initial=-1), y_test.max(initial=-1))
    if low < 0 or high >= 2**31:
        raise DataError(f"{path}: labels must lie in 0..2**31-1, found {low}..{high}.")
    num_classes = int(high) + 1
    class_names = None
    if classes is not None:
        class_names = tuple(str(c) for c in np.asarray(classes).reshape(-1))
        if len(class_names) < num_classes:
            raise DataError(f"{path}: 'classes' has {len(class_names)} names but labels go up to "
                            f"{num_classes - 1}.")
        num_classes = len(class_names)
    return Dataset(name=name, x_train=x_train, y_train=y_train.astype(np.int32),
                   x_test=x_test, y_test=y_test.astype(np.int32),
                   num_classes=num_classes, class_names=class_names)


def _convert(ds: Dataset, image_size: int | None, channels: int | None) -> Dataset:
    """Applies the optional channel conversion and square resize to both splits (to a
    lazy split's images as they are read)."""
    h, w, c = ds.image_shape
    if channels is not None and c not in (1, 3):
        raise DataError(f"{ds.name}: cannot convert {c}-channel images to {channels} channels "
                        f"(only 1 <-> 3 is supported).")
    steps = []
    if channels == 1 and c == 3:  # shrink first: cheaper resize
        steps.append(transforms.to_grey)
    if image_size is not None and (h, w) != (image_size, image_size):
        steps.append(lambda x: transforms.resize_images(x, image_size))
        h = w = image_size
    if channels == 3 and c == 1:
        steps.append(lambda x: np.repeat(x, 3, axis=-1))
    if not steps:
        return ds

    def convert(x):
        for step in steps:
            x = step(x)
        return x

    shape = (h, w, channels or c)
    xs = [x.map(convert, shape) if isinstance(x, LazyImages) else convert(x) for x in (ds.x_train, ds.x_test)]
    return dataclasses.replace(ds, x_train=xs[0], x_test=xs[1])
