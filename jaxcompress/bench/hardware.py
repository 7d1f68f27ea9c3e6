"""Benchmarks of hardware-aware pruning (`jaxcompress.pruning.align`, `jaxcompress.latency`).

`latency_budget`: per model, L1 pruning to a FLOPs budget with unaligned widths
(multiple 1: what a hardware-blind pruner does) against a *latency* budget of the
same fraction with the backend's aligned widths: measured dense and shrunk latency
(same process, interleaved), FLOPs and parameters left, the model's prediction.

`predictor`: the fitted `LatencyModel` (layer table + affine fit on three networks)
against measured whole-network latency at random aligned width vectors.

Weights are random: latency does not depend on trained values.
"""
from __future__ import annotations

import os

import jax
import numpy as np

from jaxcompress import cost
from jaxcompress.bench import speedup
from jaxcompress.latency import latency_model, measure_networks
from jaxcompress.models import create_model, describe, get_spec
from jaxcompress.pruning import align
from jaxcompress.pruning import criteria as C
from jaxcompress.pruning.job import latency_keep_ratio
from jaxcompress.train.metrics import write_json


def _table(name: str):
    return describe(create_model(name, 10), get_spec(name).input_shape)


def latency_budget(config, workdir: str) -> dict:
    b = config.bench
    rows = []
    for name in b.models:
        table = _table(name)
        flops_row = speedup.measure(name, b.budget, 1, b.scope, b.batch_size, b.rounds, masked=False)
        flops_row["rule"] = f"{b.budget:.0%} FLOPs, unaligned (multiple 1)"
        ratio, predicted = latency_keep_ratio(table, b.budget, b.scope, None, b.batch_size)
        lat_row = speedup.measure(name, b.budget, None, b.scope, b.batch_size, b.rounds, keep_ratio=ratio,
                                  masked=False)
        lat_row.update(rule=f"{b.budget:.0%} latency, aligned (backend multiple)", predicted_fraction=predicted)
        for r in (flops_row, lat_row):
            r["params_left"] = float(cost.count(table, r["widths"])["params"] / cost.count(table)["params"]) \
                if len(r["widths"]) == table.num_groups else None
            print(f"{name}: {r['rule']}: widths {r['widths']}, FLOPs {r['flops_left']:.2f}, dense "
                  f"{r['latency_ms']['dense']:.1f} ms, shrunk {r['latency_ms']['shrunk']:.1f} ms "
                  f"({r['speedup_shrunk']:.2f}x)", flush=True)
        rows += [flops_row, lat_row]
        write_json(os.path.join(workdir, "summary.json"), dict(job=config.job, rows=rows, partial=True))
    summary = dict(job=config.job, device_kind=jax.devices()[0].device_kind, jax_version=jax.__version__,
                   batch_size=b.batch_size, rows=rows)
    write_json(os.path.join(workdir, "summary.json"), summary)
    return summary


def predictor(config, workdir: str) -> dict:
    b = config.bench
    table = _table(b.model)
    groups = C.prunable_groups(table, b.scope)
    model = latency_model(table, b.batch_size, groups, C.lowest_counts(table, groups, None))
    mults = align.group_multiples(table.widths, groups, None)
    rng = np.random.default_rng(config.seed)
    vectors = [[int(rng.choice(align.candidates(w, mults[g]))) if g in groups else w
                for g, w in enumerate(table.widths)] for _ in range(b.num_vectors)]
    predicted = [model(w) for w in vectors]
    measured = measure_networks(table, vectors, b.batch_size, b.rounds)
    errors = [abs(p - m) / m for p, m in zip(predicted, measured)]
    for w, p, m, e in zip(vectors, predicted, measured, errors):
        print(f"widths {w[:4]}...: predicted {1e3 * p:.1f} ms, measured {1e3 * m:.1f} ms, error {e:.1%}", flush=True)
    summary = dict(job=config.job, model=b.model, device_kind=jax.devices()[0].device_kind,
                   jax_version=jax.__version__, batch_size=b.batch_size, scale=model.scale, offset_s=model.offset,
                   table_entries=len(model.lut.entries), vectors=vectors, predicted_s=predicted, measured_s=measured,
                   relative_errors=errors, median_error=float(np.median(errors)), max_error=float(np.max(errors)))
    print(f"{b.model}: median error {summary['median_error']:.1%}, max {summary['max_error']:.1%} over "
          f"{len(vectors)} aligned width vectors", flush=True)
    write_json(os.path.join(workdir, "summary.json"), summary)
    return summary
