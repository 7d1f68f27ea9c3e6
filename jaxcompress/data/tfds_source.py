"""Reading prepared TensorFlow-Datasets datasets without TensorFlow.

Uses `tfds.data_source`, which random-accesses ArrayRecord files and decodes
examples with NumPy/PIL. Nothing is downloaded here: a dataset must have been
prepared beforehand (``tfds build <name>`` on a machine with internet).
"""

from __future__ import annotations

import numpy as np
from absl import logging

from jaxcompress.data import transforms
from jaxcompress.data.lazy import LazyImages
from jaxcompress.data.sources import DataError, Dataset

# Datasets whose held-out split is not called "test".
_TEST_SPLIT = {"imagenet2012": "validation", "imagenet2012_subset": "validation"}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def load_tfds(name: str, data_dir: str | None = None, image_size: int | None = None,
              hint: str | None = None, lazy: bool = False) -> Dataset:
    """Loads the train and test (or validation) splits of a prepared tfds dataset.

    Args:
      name: tfds name, optionally with config/version ("imagenet2012:5.1.0").
      data_dir: tfds data_dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).
      image_size: resize each image to image_size x image_size while reading
        (required when the dataset's images vary in size).
      hint: extra context for the "not prepared" error (e.g. which npz was missing).
      lazy: read only the labels now and each image when it is indexed
        (`LazyImages`; the image feature is not decoded while the labels are read).
    """
    name = name.strip()
    if not name:
        raise DataError("Empty name in 'tfds:': give a tfds dataset name, e.g. 'tfds:cifar10'.")
    try:
        import tensorflow_datasets as tfds  # lazy: slow import; never imports TensorFlow here
    except ImportError:
        raise DataError(f"reading 'tfds:{name}' needs tensorflow-datasets: pip install 'jaxcompress[tfds]'") from None

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DataError(f"tfds has no dataset {name!r}; check the name against "
                        f"tfds.list_builders() or use 'npz:<path>'.") from e
    except (AssertionError, ValueError) as e:  # bad config or version in the name
        raise DataError(f"tfds cannot build {name!r} ({_first_line(e)}); fix the "
                        f"'name[/config][:version]' part.") from e
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise DataError(f"tfds:{name} has features {sorted(features.keys())}; need 'image' and 'label'.")
    label = features["label"]
    if not isinstance(label, tfds.features.ClassLabel):
        raise DataError(f"tfds:{name}: 'label' is {type(label).__name__}, not a ClassLabel.")
    if None in tuple(features["image"].shape[:2]) and image_size is None:
        raise DataError(f"tfds:{name} has images of varying size; pass image_size "
                        f"(e.g. --config.data.image_size=224) to resize them.")

    base = name.split("/")[0].split(":")[0]
    splits = ("train", _TEST_SPLIT.get(base, "test"))
    sources = {}
    for split in splits:
        try:
            sources[split] = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # tfds raises assorted types (NotImplementedError, AssertionError, ...)
            where = f" ({hint})" if hint else ""
            if not builder.is_prepared():
                raise DataError(
                    f"tfds dataset {name!r} is not prepared in {builder.data_dir}{where}; run "
                    f"`tfds build {base} --file_format=array_record` (or "
                    f"tfds.builder({base!r}).download_and_prepare()) on a machine with internet "
                    f"and copy the data_dir here, or use 'npz:<path>'.") from e
            raise DataError(f"tfds dataset {name!r} split {split!r} cannot be read from "
                            f"{builder.data_dir} ({_first_line(e)}); re-prepare it with "
                            f"file_format='array_record'.") from e

    if lazy:  # the labels read with the image feature left undecoded (tfds.decode.SkipDecoding)
        labels = {split: tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                          decoders={"image": tfds.decode.SkipDecoding()}) for split in splits}
        read = lambda split, what: _lazy_split(sources[split], labels[split], image_size, what)  # noqa: E731
    else:
        read = lambda split, what: _read_split(sources[split], image_size, what)  # noqa: E731
    x_train, y_train = read(splits[0], f"tfds:{name}[{splits[0]}]")
    x_test, y_test = read(splits[1], f"tfds:{name}[{splits[1]}]")
    names = tuple(label.names) if label.names else None
    return Dataset(name=f"tfds:{name}", x_train=x_train, y_train=y_train,
                   x_test=x_test, y_test=y_test, num_classes=int(label.num_classes),
                   class_names=names)


def _decode(example, image_size: int | None, what: str, i: int, shape=None) -> np.ndarray:
    """One example's image as uint8 (H, W, C), resized to `image_size` if given; an
    image of another dtype or of a shape other than `shape` is a DataError."""
    img = np.asarray(example["image"])
    if img.ndim == 2:
        img = img[..., None]
    if image_size is not None and img.shape[:2] != (image_size, image_size):
        img = transforms.resize_images(img[None], image_size)[0]
    if img.dtype != np.uint8 or (shape is not None and img.shape != tuple(shape)):
        raise DataError(f"{what}: example {i} is {img.dtype} {img.shape}, expected uint8 "
                        f"{tuple(shape) if shape is not None else ''}; pass image_size to resize.")
    return img


def _read_split(source, image_size: int | None, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Decodes every example of a data source into preallocated uint8/int32 arrays."""
    n = len(source)
    images, labels = None, np.empty((n,), np.int32)
    for i, example in enumerate(source):
        img = _decode(example, image_size, what, i, None if images is None else images.shape[1:])
        if images is None:
            images = np.empty((n,) + img.shape, np.uint8)
        images[i] = img
        labels[i] = int(example["label"])
    if images is None:
        raise DataError(f"{what} is empty.")
    return images, labels


def _lazy_split(source, label_source, image_size: int | None, what: str) -> tuple[LazyImages, np.ndarray]:
    """Every label now, from `label_source` (the split read with its images undecoded),
    and the images of `source` as a `LazyImages` that decodes an example when indexed."""
    try:
        labels = np.asarray([int(example["label"]) for example in label_source], np.int32)
    except Exception as e:  # noqa: BLE001 - a tfds build that cannot skip the image decode (e.g. without TF)
        logging.warning("%s: tfds cannot read the labels without decoding the images (%s); decoding every "
                        "image once to read them", what, _first_line(e))
        labels = np.asarray([int(example["label"]) for example in source], np.int32)
    if not len(labels):
        raise DataError(f"{what} is empty.")
    shape = _decode(source[0], image_size, what, 0).shape

    def read(indices):
        return np.stack([_decode(source[int(i)], image_size, what, int(i), shape) for i in indices])

    return LazyImages(read, np.arange(len(labels)), shape), labels
