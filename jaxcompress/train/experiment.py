"""Everything a job needs before it computes: data splits, model, table, mesh.

All checks that can fail on user input happen here, before any compilation.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from jaxcompress import schema
from jaxcompress.data import Dataset, channel_stats, load_dataset, select_classes, split_validation, stratified_subset
from jaxcompress.errors import ConfigError
from jaxcompress.models import ModelTable, create_model, describe, get_spec
from jaxcompress.train.steps import make_mesh


class Teacher(NamedTuple):
    """The network a compression job's fine-tunes distil from (`train.distill_weight`),
    handed to `fit`."""
    apply_fn: Callable
    variables: Any

    @classmethod
    def of(cls, state) -> "Teacher":
        """The network of a TrainState, in inference mode (its variables frozen)."""
        return cls(state.apply_fn, state.variables())


@dataclasses.dataclass
class Experiment:
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    num_classes: int
    mean: np.ndarray
    std: np.ndarray
    model: object
    table: ModelTable
    mesh: jax.sharding.Mesh
    # The jitted steps (and optimisers) built for this data and mesh, by their static
    # settings (`shared`): every `fit` / evaluation of the experiment, and of its
    # `dataclasses.replace` copies (a shrunk model: they share this dict), reuses them, so a
    # program of the same shapes and settings is compiled once per run.
    steps: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train[0].shape[1:])

    def shared(self, key: tuple, build: Callable[[], Any]) -> Any:
        """`build()` (a jitted step, an optimiser), made once per `key` (its static settings)."""
        if key not in self.steps:
            self.steps[key] = build()
        return self.steps[key]


def check_batches(config, num_devices: int) -> None:
    """What the schema cannot know: the batches the job will split over this run's
    devices divide evenly (the train and eval batches; variational pruning's and the
    search's evaluation samples, when used)."""
    fields = ["train.batch_size", "train.eval_batch_size"]
    if "variational" in (config.get("prune", {}).get("criterion"), config.get("search", {}).get("scheme")):
        fields.append("prune.variational.batch_size")
    if config.get("job") == "search":  # its candidates are evaluated with the images split over the devices
        s = config.search
        fields += ["search.eval_size"] + ["search.rerank_size"] * bool(s.rerank_top_k) \
            + ["search.candidate_finetune_batch"] * bool(s.candidate_finetune_steps
                                                        or (s.rerank_top_k and s.select_finetune_top))
    for path in fields:
        size = schema.get(config, path)
        if size <= 0 or size % num_devices:
            raise ConfigError(f"{path}={size}: must be a positive multiple of the {num_devices} devices; "
                              f"set --config.{path} to e.g. {num_devices * max(1, size // num_devices)}")


def pick_classes(ds: Dataset, classes, field: str):
    """`((x_train, y_train), (x_test, y_test), num_classes)` of `ds`, restricted to the
    class ids `classes` (the config's `field`; empty: every class) and relabelled
    0..len(classes)-1; a class the dataset lacks is a one-line ConfigError."""
    if not classes:
        return (ds.x_train, ds.y_train), (ds.x_test, ds.y_test), ds.num_classes
    try:
        outside = [c for c in classes if not 0 <= c < ds.num_classes]
        if outside:
            raise ValueError(f"{ds.name} has classes 0..{ds.num_classes - 1}")
        train, test = select_classes(ds.x_train, ds.y_train, classes), select_classes(ds.x_test, ds.y_test, classes)
    except ValueError as e:
        raise ConfigError(f"{field}={tuple(classes)}: must be class ids present in the dataset ({e}); "
                          f"set --config.{field}") from None
    return train, test, len(classes)


def setup_experiment(config) -> Experiment:
    """Loads and splits the data and builds the model named by `config`."""
    if get_spec(config.model.name).input_dtype != "float32":  # unknown model: fail before loading data
        raise ConfigError(f"model.name={config.model.name!r} is a language model (token-id inputs); the jobs "
                          f"train image classifiers only so far: train it on jaxcompress.data.load_python_stdlib "
                          f"with your own loop")
    mesh = make_mesh()
    check_batches(config, mesh.size)
    d = config.data
    ds = load_dataset(d.name, data_dir=d.data_dir or None, image_size=d.image_size or None,
                      channels=d.channels or None, lazy=d.get("lazy", False))
    (x_train, y_train), (x_test, y_test), num_classes = pick_classes(ds, tuple(d.classes), "data.classes")
    try:
        (x_train, y_train), (x_val, y_val) = split_validation(x_train, y_train, d.val_size, seed=config.seed)
    except ValueError:
        raise ConfigError(f"data.val_size={d.val_size}: must be below the {len(x_train)} training examples of "
                          f"{d.name}{list(d.classes) if d.classes else ''}, leaving some to train on; set "
                          f"--config.data.val_size") from None
    x_train, y_train = stratified_subset(x_train, y_train, d.get("train_size", 0), config.seed)
    x_test, y_test = stratified_subset(x_test, y_test, d.get("test_size", 0), config.seed)
    if len(x_train) < config.train.batch_size:
        raise ConfigError(f"only {len(x_train)} training examples but train.batch_size="
                          f"{config.train.batch_size}; lower --config.train.batch_size")
    mean, std = channel_stats(x_train)
    model = create_model(config.model.name, num_classes, config.model.width_multiplier)
    table = describe(model, tuple(x_train.shape[1:]))
    return Experiment(train=(x_train, y_train), val=(x_val, y_val), test=(x_test, y_test),
                      num_classes=num_classes, mean=mean, std=std, model=model, table=table, mesh=mesh)
