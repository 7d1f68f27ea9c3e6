"""Run outputs in the workdir: metrics.jsonl, config.json, summary.json.

Written by process 0 only (`jaxcompress.distributed.is_primary`): on many hosts the
other processes compute the same values and write nothing."""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(_plain(obj), f, indent=2, sort_keys=True)
    os.replace(tmp, path)


class MetricWriter:
    """Appends one JSON object per line to `<workdir>/metrics.jsonl` (process 0 only)."""

    def __init__(self, workdir: str):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, "metrics.jsonl")

    def write(self, step: int, **metrics) -> None:
        if not is_primary():
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), "time": time.time(), **_plain(metrics)}) + "\n")

    def read(self) -> list[dict]:
        return read_metrics(os.path.dirname(self.path))


def read_metrics(workdir: str) -> list[dict]:
    """The records of `<workdir>/metrics.jsonl` ([] when there is none; creates nothing)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
