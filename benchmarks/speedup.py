"""Benchmark: real inference speed-up from surgery (issue: "the pruned model is not faster").

For each (model, FLOPs budget, channel multiple) row: L1-magnitude channel pruning at
the uniform keep ratio that meets the budget, then the forward latency (jitted, batch
`latency_batch`, interleaved medians) of the dense network, the masked-but-not-shrunk
network, and the shrunk network. Latency does not depend on the weights' values, so
the networks are freshly initialised.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from jaxcompress import cost
from jaxcompress.timing import forward_latencies
from jaxcompress.models import create_model, describe, get_spec
from jaxcompress.pruning import criteria as C
from jaxcompress.pruning.surgery import shrink, without_masks
from jaxcompress.train.metrics import write_json


def init_network(name: str, seed: int = 0):
    """`(model, table, variables, input_shape)` of a freshly initialised zoo model."""
    shape = get_spec(name).input_shape
    model = create_model(name, 10)
    table = describe(model, shape)
    variables = jax.jit(lambda: model.init(jax.random.key(seed), jnp.zeros((1, *shape))))()
    return model, table, variables, shape


def l1_masks(table, variables, counts):
    """L1 channel pruning to `counts` kept channels per group: a full `masks` collection
    (`variables["masks"]` with every group's channel mask set)."""
    return table.layer_masks(C.masks_from_scores(C.channel_scores(table, variables, "l1"), counts),
                             variables["masks"])


def measure(name: str, flops_fraction: float, multiple: int | None, scope: str, batch: int, rounds: int,
            keep_ratio: float | None = None, masked: bool = True) -> dict:
    """One row: L1 pruning of `name` at the uniform keep ratio meeting `flops_fraction`
    of the FLOPs (or at `keep_ratio` when given), widths aligned to `multiple`; measured
    latency of the dense, masked (if `masked`) and shrunk networks."""
    model, table, variables, shape = init_network(name)
    groups = C.prunable_groups(table, scope)
    ratio = keep_ratio or C.keep_ratio_for_flops(table, flops_fraction, groups, multiple)
    counts = C.keep_counts(table, ratio, groups, multiple)
    masks = l1_masks(table, variables, counts)
    small_model, small_vars = shrink(table, {**variables, "masks": masks})
    nets = {"dense": (model, without_masks(variables)), "shrunk": (small_model, without_masks(small_vars))}
    if masked:
        nets["masked"] = (model, {**variables, "masks": masks})
    lat = forward_latencies(nets, shape, batch, rounds)
    flops_left = float(cost.count(table, counts)["macs"] / cost.count(table)["macs"])
    row = dict(model=name, flops_budget=flops_fraction, multiple=multiple, scope=scope, keep_ratio=ratio,
               flops_left=flops_left, widths=list(small_model.widths), latency_ms={k: 1e3 * v for k, v in lat.items()},
               speedup_shrunk=lat["dense"] / lat["shrunk"])
    if masked:
        row["speedup_masked"] = lat["dense"] / lat["masked"]
    return row


def run(config, workdir: str) -> dict:
    b = config.bench
    rows = []
    for m, f in zip(b.models, b.flops_budgets):
        for mult in b.multiples:
            r = measure(m, f, mult, b.scope, b.batch_size, b.rounds)
            print(f"{r['model']:8s} FLOPs {r['flops_left']:.2f} (multiple {r['multiple']}, widths "
                  f"{r['widths'][:3]}...): dense {r['latency_ms']['dense']:.1f} ms, masked "
                  f"{r['latency_ms']['masked']:.1f} ms ({r['speedup_masked']:.2f}x), shrunk "
                  f"{r['latency_ms']['shrunk']:.1f} ms ({r['speedup_shrunk']:.2f}x)", flush=True)
            rows.append(r)
            write_json(os.path.join(workdir, "summary.json"), dict(job=config.job, rows=rows, partial=True))
    summary = dict(job=config.job, device_kind=jax.devices()[0].device_kind, rows=rows)
    write_json(os.path.join(workdir, "summary.json"), summary)
    return summary
