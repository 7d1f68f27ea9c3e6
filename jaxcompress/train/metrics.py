"""Run outputs in the workdir: metrics.jsonl (and the same scalars as TensorBoard event
files), config.json, summary.json.

`tensorboard --logdir <workdir or a folder of workdirs>` shows every run's curves: a
nested metric `{"val": {"accuracy": a}}` is the tag `val/accuracy`; lists, strings and
booleans stay in metrics.jsonl only. Events are written with tensorboardX (no
TensorFlow). Written by process 0 only (`jaxcompress.distributed.is_primary`): on many hosts the
other processes compute the same values and write nothing."""
from __future__ import annotations

import json
import os
import time
from typing import Mapping

import jax
import numpy as np

from jaxcompress import files
from jaxcompress.distributed import is_primary


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        x = np.asarray(x)
        return x.item() if x.ndim == 0 else x.tolist()
    return x


def write_json(path: str, obj) -> None:
    """Writes atomically (tmp + rename) so an interrupted run never leaves half a file.
    Process 0 only (module docstring); the others do nothing."""
    if not is_primary():
        return
    files.write_atomic(path, json.dumps(_plain(obj), indent=2, sort_keys=True))


def scalars(metrics: Mapping, prefix: str = "") -> dict[str, float]:
    """The numeric scalars of nested `metrics` by `a/b` tag (bools, strings, lists left out)."""
    out = {}
    for k, v in metrics.items():
        tag = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(scalars(v, tag + "/"))
        elif isinstance(v, (int, float, np.number, np.ndarray, jax.Array)) and not isinstance(v, (bool, np.bool_)) \
                and np.ndim(v) == 0:
            out[tag] = float(v)
    return out


class MetricWriter:
    """Appends one JSON object per line to `<workdir>/metrics.jsonl` and its scalars to
    TensorBoard event files in `<workdir>` (process 0 only; `tensorboard=False`: JSON only).
    A remote workdir (`gs://...`) works: the JSON through `jaxcompress.files`, the events
    through tensorboardX's own writer for that scheme (gs:// needs google-cloud-storage)."""

    def __init__(self, workdir: str, tensorboard: bool = True):
        files.make_dirs(workdir)
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tensorboard = tensorboard
        self._board = None

    def write(self, step: int, **metrics) -> None:
        if not is_primary():
            return
        now = time.time()
        files.append_text(self.path, json.dumps({"step": int(step), "time": now, **_plain(metrics)}) + "\n")
        if self.tensorboard:
            if self._board is None:
                from tensorboardX import SummaryWriter  # imported on the first write
                self._board = SummaryWriter(os.path.dirname(self.path))
            for tag, value in scalars(metrics).items():
                self._board.add_scalar(tag, value, int(step), walltime=now)
            self._board.flush()

    def close(self) -> None:
        if self._board is not None:
            self._board.close()
            self._board = None

    def read(self) -> list[dict]:
        return read_metrics(os.path.dirname(self.path))


def read_metrics(workdir: str) -> list[dict]:
    """The records of `<workdir>/metrics.jsonl` ([] when there is none; creates nothing)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not files.exists(path):
        return []
    return [json.loads(line) for line in files.read_text(path).splitlines() if line.strip()]
