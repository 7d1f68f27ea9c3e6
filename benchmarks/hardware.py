"""Benchmarks of hardware-aware pruning (`jaxcompress.pruning.align`, `jaxcompress.latency`).

`latency_budget`: per model, L1 pruning to a FLOPs budget with unaligned widths
(multiple 1: what a hardware-blind pruner does) against a *latency* budget of the
same fraction with the backend's aligned widths: measured dense and shrunk latency
(same process, interleaved), FLOPs and parameters left, the model's prediction.

`budget_accuracy`: the same two rules on a trained network (trained once into
`<workdir>/pretrain`, or `prune.checkpoint`), each through the `prune` job with the
same fine-tune: accuracy, FLOPs, parameters and measured latency per rule.

`predictor`: the fitted `LatencyModel` (layer table + affine fit on three networks)
against measured whole-network latency at random aligned width vectors.

Weights are random: latency does not depend on trained values.
"""
from __future__ import annotations

import os

import jax
import numpy as np

from jaxcompress import cost, pipeline
from benchmarks import speedup
from jaxcompress.latency import latency_model, measure_networks
from jaxcompress.models import create_model, describe, get_spec
from jaxcompress.pruning import align
from jaxcompress.pruning import criteria as C
from jaxcompress.pruning.job import latency_keep_ratio, prune_and_finetune
from jaxcompress.train import setup_experiment
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


# the budget rules `budget_accuracy` compares (`bench.rules`): a FLOPs budget with the uniform
# ratio at unaligned widths; a measured-latency budget (aligned widths); the FLOPs budget with
# per-group aligned widths chosen for latency (`prune.allocation=latency`, issue 21)
RULES = ("flops", "latency", "flops_latency_allocation")


def budget_accuracy(config, workdir: str) -> dict:
    b = config.bench
    exp = setup_experiment(config)
    pipeline.reference(config, exp, config.prune.checkpoint, workdir, "prune.checkpoint")
    checkpoint = config.prune.checkpoint or os.path.join(workdir, "pretrain")
    rows = {}
    for rule in b.get("rules", RULES):
        c = config.copy_and_resolve_references()
        c.prune.checkpoint = checkpoint
        if rule == "flops":
            c.prune.flops_budget, c.hardware.multiple = b.budget, 1
        elif rule == "latency":
            c.prune.latency_budget = b.budget
        else:  # per-group aligned widths within the FLOPs budget, fastest by this device's layer table
            c.prune.flops_budget, c.prune.allocation = b.budget, "latency"
        s = prune_and_finetune(c, os.path.join(workdir, rule))
        rows[rule] = {k: s[k] for k in ("accuracy_dense", "accuracy_masked", "accuracy_pruned", "widths_pruned",
                                        "flops_left", "params_removed", "latency_s", "speedup_shrunk",
                                        "speedup_masked", "latency_predicted_fraction", "keep_ratio")}
        print(f"{config.model.name} {rule} budget {b.budget:.0%}: widths {s['widths_pruned'][:4]}..., FLOPs "
              f"{s['flops_left']:.2f}, accuracy {s['accuracy_dense']:.4f} -> {s['accuracy_pruned']:.4f}, "
              f"speed-up {s['speedup_shrunk']:.2f}x", flush=True)
    summary = dict(job=config.job, model=config.model.name, dataset=config.data.name, budget=b.budget,
                   train_size=config.data.train_size, test_size=config.data.test_size,
                   pretrain_epochs=config.train.num_epochs,
                   finetune_epochs=config.prune.finetune_epochs, device_kind=jax.devices()[0].device_kind,
                   rows=rows)
    write_json(os.path.join(workdir, "summary.json"), summary)
    return summary
