"""Everything a job needs before it computes: data splits, model, table, mesh.

All checks that can fail on user input happen here, before any compilation.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from jaxcompress.data import channel_stats, load_dataset, select_classes, split_validation, stratified_subset
from jaxcompress.errors import ConfigError
from jaxcompress.models import ModelTable, create_model, describe, get_spec
from jaxcompress.train import optim
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

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train[0].shape[1:])


def check_train_config(cfg, num_devices: int) -> None:
    if cfg.optimizer not in optim.OPTIMIZERS:
        raise ConfigError(f"unknown optimizer '{cfg.optimizer}'; set --config.train.optimizer to one of "
                          f"{', '.join(optim.OPTIMIZERS)}")
    if cfg.schedule not in optim.SCHEDULES:
        raise ConfigError(f"unknown schedule '{cfg.schedule}'; set --config.train.schedule to one of "
                          f"{', '.join(optim.SCHEDULES)}")
    for key in ("batch_size", "eval_batch_size"):
        size = getattr(cfg, key)
        if size <= 0 or size % num_devices:
            raise ConfigError(f"train.{key}={size} must be a positive multiple of the {num_devices} devices; "
                              f"set --config.train.{key} to e.g. {num_devices * max(1, size // num_devices)}")
    if cfg.num_epochs <= 0:
        raise ConfigError(f"train.num_epochs must be positive, got {cfg.num_epochs}")
    if not 0.0 <= cfg.distill_weight <= 1.0:
        raise ConfigError(f"train.distill_weight={cfg.distill_weight} must be in [0, 1] (0: no distillation)")
    if cfg.distill_temperature <= 0:
        raise ConfigError(f"train.distill_temperature={cfg.distill_temperature} must be positive (Hinton et al.: 2-8)")
    if not 0 <= cfg.warmup_epochs < cfg.num_epochs:
        raise ConfigError(f"train.warmup_epochs={cfg.warmup_epochs} must be >= 0 and below train.num_epochs="
                          f"{cfg.num_epochs}; lower --config.train.warmup_epochs")


def setup_experiment(config) -> Experiment:
    """Loads and splits the data and builds the model named by `config`."""
    if config.get("multihost", False):
        jax.distributed.initialize()
    get_spec(config.model.name)  # unknown model: fail before loading data
    mesh = make_mesh()
    check_train_config(config.train, mesh.size)
    d = config.data
    ds = load_dataset(d.name, data_dir=d.data_dir or None, image_size=d.image_size or None,
                      channels=d.channels or None)
    (x_train, y_train), (x_test, y_test), num_classes = (ds.x_train, ds.y_train), (ds.x_test, ds.y_test), ds.num_classes
    if d.classes:
        x_train, y_train = select_classes(x_train, y_train, d.classes)
        x_test, y_test = select_classes(x_test, y_test, d.classes)
        num_classes = len(d.classes)
    try:
        (x_train, y_train), (x_val, y_val) = split_validation(x_train, y_train, d.val_size, seed=config.seed)
    except ValueError as e:
        raise ConfigError(f"data.val_size={d.val_size}: {e}; set --config.data.val_size to a count below "
                          f"{len(x_train)} or a fraction in (0, 1)") from None
    for field in ("train_size", "test_size"):
        if d.get(field, 0) < 0:
            raise ConfigError(f"data.{field}={d[field]} must be >= 0 (0: every example)")
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
