"""Benchmark: jaxcompress against a peer, Torch-Pruning, in one run (job `bench_peer_pruning`).

The same CIFAR ResNet-56, L1-magnitude channel pruning to ~50% of the dense MACs with
one uniform ratio for every channel group, on the CPU:

* jaxcompress (this process): `describe` (the layer table), `channel_scores(..., "l1")`
  + `keep_counts` + `masks_from_scores` + `layer_masks`, then `shrink` (surgery). Scope
  `bench.scope` ("all": all 30 groups of ResNet-56, i.e. the 3 residual streams and the
  27 block-inner widths; "inner" leaves the streams whole). The L1 score of a channel
  sums the L1 norms of its producers' output kernels (every conv that writes into a
  residual stream; the first conv of a block for an inner width). Kept per group:
  round(width * keep ratio); the largest keep ratio meeting the budget is found by
  bisection on `jaxcompress.cost.count`.
  With `bench.allocations` also "latency": the per-group widths within the same MACs
  budget that this device's measured layer table rates fastest
  (`jaxcompress.pruning.allocate.latency_counts`), one more jaxcompress column.
* Torch-Pruning (`benchmarks/peer_torch_pruning.py`, run with `bench.torch_python`,
  an interpreter of its own environment: jaxcompress does not depend on torch):
  `tp.pruner.MetaPruner` + `tp.importance.MagnitudeImportance(p=1)`, `global_pruning=False`,
  the classifier's outputs ignored. Its dependency graph finds the same 30 groups
  (streams included); a channel's importance is the mean, over every layer coupled to
  it (producers' output kernels, consumers' input-kernel slices, BatchNorm affine), of
  that layer's L1 norm along the channel, divided by the group mean. Kept per group:
  floor(width * (1 - ratio)); the smallest ratio meeting the budget is found by
  bisection, pruning a copy each time.

MACs are counted the same way on both sides: multiply-accumulates of the conv and
linear layers per image (no bias, BatchNorm, ReLU or pooling); parameters are weights,
biases and BatchNorm scale/shift. The timed "pruning call" is, given the ratio (the
ratio searches are reported apart): jaxcompress `describe` + scores + masks + `shrink`;
Torch-Pruning `MetaPruner(...)` (dependency-graph build, a traced forward) + `step()`.
Both are timed on a fresh copy of the dense network `bench.prune_repeats` times (first
call, and median of the others). Latency: batch `bench.batch_size` inference, dense vs
pruned, interleaved rounds, medians; jaxcompress jitted (XLA, NHWC), PyTorch eager under
`torch.no_grad()` with `torch.set_num_threads(all cores)`, in NCHW and in channels_last.

Weights are random (latency and pruning time do not depend on trained values): the
jaxcompress initialisation (seed `bench.seed`), handed to the PyTorch network by
name (`init_weights.npz`) when `bench.share_weights`, so both libraries score the same
numbers. Writes `summary.json` (both sides side by side) and `comparison.md`.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import time

import jax
import numpy as np
from flax import traverse_util

from jaxcompress import cost
from benchmarks import speedup
from jaxcompress.timing import forward_latencies, interleaved_medians
from jaxcompress.errors import ConfigError
from jaxcompress.models import create_model, describe, get_spec
from jaxcompress.pruning import criteria as C
from jaxcompress.pruning.allocate import device_latency_counts
from jaxcompress.pruning.surgery import shrink, without_masks
from jaxcompress.train.metrics import write_json

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_torch_pruning.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL = "python3 -m venv .venv-torch && .venv-torch/bin/pip install torch==2.13.0 torch-pruning"
PEER_MODELS = ("resnet20", "resnet56", "resnet110")
ALLOCATIONS = ("uniform", "latency")


def torch_interpreter(path: str) -> str:
    """The peer's Python: `path` as given if absolute, else from the working directory or
    the project root. A one-line ConfigError saying how to create it if it is missing."""
    candidates = [path] if os.path.isabs(path) else [os.path.abspath(path), os.path.join(ROOT, path)]
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise ConfigError(f"bench.torch_python '{path}' does not exist (the Torch-Pruning peer runs in its own "
                      f"environment; jaxcompress does not depend on torch); create it from the project root: "
                      f"{INSTALL}")


def check_bench(b) -> None:
    if b.model not in PEER_MODELS:
        raise ConfigError(f"bench.model '{b.model}': the peer benchmark builds CIFAR ResNets only; "
                          f"choose one of {', '.join(PEER_MODELS)}")
    if not 0.0 < b.flops_budget < 1.0:
        raise ConfigError(f"bench.flops_budget {b.flops_budget:g} is outside (0, 1)")
    for key in ("batch_size", "rounds", "prune_repeats"):
        if int(b[key]) < 1:
            raise ConfigError(f"bench.{key} must be >= 1, got {b[key]}")
    unknown = [a for a in b.allocations if a not in ALLOCATIONS]
    if unknown or not b.allocations:
        raise ConfigError(f"bench.allocations {tuple(b.allocations)}: choose one or more of {', '.join(ALLOCATIONS)}")
    if not all(len(s) == 2 and all(int(v) == v and v >= 1 for v in s) for s in b.conv_shapes):
        raise ConfigError(f"bench.conv_shapes {tuple(b.conv_shapes)}: each is (pixels, channels), positive integers")
    if b.scope not in C.SCOPES:
        raise ConfigError(f"unknown prune scope '{b.scope}'; choose one of {', '.join(C.SCOPES)}")


def check_torch(python: str, timeout: float = 300.0) -> dict:
    """Imports torch and torch_pruning in the peer's interpreter; their versions."""
    proc = subprocess.run([python, SCRIPT, "--check"], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"{python} cannot import torch and torch_pruning ({last}); install them: "
                          f"{os.path.dirname(python)}/pip install torch==2.13.0 torch-pruning")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def torch_state_dict(variables) -> dict[str, np.ndarray]:
    """The Flax ResNet's variables under the PyTorch module names of the peer script
    (`stage2_block0_a_conv/kernel` -> `stage2_block0.a_conv.weight`, HWIO -> OIHW)."""
    leaf_names = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                  "var": "running_var"}
    out = {}
    for col in ("params", "batch_stats"):
        for path, leaf in traverse_util.flatten_dict(dict(variables[col])).items():
            module, leaf_name = path[-2], path[-1]
            m = re.fullmatch(r"(stage\d+_block\d+)_(.+)", module)
            name = f"{m.group(1)}.{m.group(2)}" if m else module
            x = np.asarray(leaf, np.float32)
            if leaf_name == "kernel":
                x = x.transpose(3, 2, 0, 1) if x.ndim == 4 else x.T
            out[f"{name}.{leaf_names[leaf_name]}"] = np.ascontiguousarray(x)
    return out


def prune_call(model, shape, variables, counts):
    """The timed jaxcompress pruning call: layer table, L1 scores + masks to `counts`, surgery.

    Returns `(small_model, small_variables, table, {"analysis": s, "prune": s})`.
    """
    t0 = time.perf_counter()
    table = describe(model, shape)
    t1 = time.perf_counter()
    masks = speedup.l1_masks(table, variables, counts)
    small_model, small_vars = shrink(table, {**variables, "masks": masks})
    jax.block_until_ready(small_vars)
    t2 = time.perf_counter()
    return small_model, small_vars, table, dict(analysis=t1 - t0, prune=t2 - t1)


def _first_and_median(values):
    rest = values[1:] if len(values) > 1 else values
    return values[0], statistics.median(rest)


def allocate_counts(table, allocation: str, flops_budget: float, groups, multiple, batch: int) -> tuple[list, str]:
    """Kept channels per group within `flops_budget` of the MACs, and how they were chosen:
    "uniform" (the largest uniform keep ratio, bisection) or "latency" (per-group widths
    that this device's measured layer table rates fastest at `batch`,
    `jaxcompress.pruning.allocate`)."""
    if allocation == "latency":
        return device_latency_counts(table, flops_budget, groups, multiple, batch)[0], "latency allocation"
    ratio = C.keep_ratio_for_flops(table, flops_budget, groups, multiple)
    return C.keep_counts(table, ratio, groups, multiple), f"uniform keep ratio {ratio:.4f}"


def jaxcompress_side(name: str, flops_budget: float, scope: str = "all", multiple: int = 1, repeats: int = 3,
                     seed: int = 0, variables=None, allocation: str = "uniform", batch: int = 128) -> tuple[dict, dict]:
    """Prunes `name` to `flops_budget` of its MACs with jaxcompress (no latency), the kept
    counts chosen by `allocation` (`allocate_counts`).

    Returns `(result, nets)`: the figures, and `{"dense": (model, variables), "pruned": ...}`
    (variables without masks) for timing. `variables` defaults to a fresh init (`seed`).
    """
    if variables is None:
        model, table, variables, shape = speedup.init_network(name, seed)
    else:
        shape = get_spec(name).input_shape
        model = create_model(name, 10)
        table = describe(model, shape)
    t0 = time.perf_counter()
    groups = C.prunable_groups(table, scope)
    counts, how = allocate_counts(table, allocation, flops_budget, groups, multiple, batch)
    search_seconds = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        small_model, small_vars, _, t = prune_call(model, shape, variables, counts)
        times.append(t)
    dense, pruned = cost.count(table), cost.count(table, counts)
    leaves = lambda v: int(sum(np.size(x) for x in jax.tree.leaves(v["params"])))
    totals = [t["analysis"] + t["prune"] for t in times]
    first, median = _first_and_median(totals)
    a_first, a_median = _first_and_median([t["analysis"] for t in times])
    p_first, p_median = _first_and_median([t["prune"] for t in times])
    kept = sum(counts[g] for g in groups) / sum(table.widths[g] for g in groups)
    result = dict(
        library="jaxcompress", jax_version=jax.__version__, model=name, allocation=allocation,
        method=f"describe + channel_scores(l1) + masks_from_scores + shrink, scope={scope}, {how}",
        scope=scope, groups_pruned=len(groups), keep_ratio=kept, pruning_ratio=1.0 - kept,
        flops_budget=flops_budget,
        macs_dense=int(dense["macs"]), macs_pruned=int(pruned["macs"]),
        macs_fraction=float(pruned["macs"] / dense["macs"]),
        params_dense=leaves(variables), params_pruned=leaves(small_vars),
        params_fraction=leaves(small_vars) / leaves(variables),
        widths_dense=list(table.widths), widths=[int(w) for w in small_model.widths],
        search_seconds=search_seconds,
        prune_seconds=dict(first=first, median=median, build_first=a_first, build_median=a_median,
                           step_first=p_first, step_median=p_median, repeats=repeats),
    )
    nets = {"dense": (model, without_masks(variables)),
            "pruned": (small_model, without_masks(small_vars))}
    return result, nets


def run_torch(python: str, args: list[str], timeout: float) -> dict:
    proc = subprocess.run([python, SCRIPT, *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"the Torch-Pruning script failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if not lines:
        raise RuntimeError(f"the Torch-Pruning script printed no JSON line:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


ROWS = [  # (label, key or function of a side's result)
    ("MACs dense -> pruned (M)", lambda r: f"{r['macs_dense'] / 1e6:.2f} -> {r['macs_pruned'] / 1e6:.2f}"),
    ("MACs fraction", lambda r: f"{r['macs_fraction']:.4f}"),
    ("params dense -> pruned", lambda r: f"{r['params_dense']:,} -> {r['params_pruned']:,}"),
    ("params fraction", lambda r: f"{r['params_fraction']:.4f}"),
    ("channel pruning ratio", lambda r: f"{r['pruning_ratio']:.4f}"),
    ("stream widths (stage 1/2/3)", lambda r: "/".join(str(w) for w in r["widths"][:3])),
    ("inner widths (stage 1/2/3, first block)", lambda r: "/".join(
        str(r["widths"][3 + i * (len(r["widths"]) - 3) // 3]) for i in range(3))),
    ("ratio search (s)", lambda r: f"{r['search_seconds']:.2f}"),
    ("pruning call, first (s)", lambda r: f"{r['prune_seconds']['first']:.3f}"),
    ("pruning call, median of repeats (s)", lambda r: f"{r['prune_seconds']['median']:.3f}"),
    ("  of which graph/table analysis (s)", lambda r: f"{r['prune_seconds']['build_median']:.3f}"),
    ("  of which scores + removal (s)", lambda r: f"{r['prune_seconds']['step_median']:.3f}"),
    ("latency dense (ms, batch {b}; PyTorch NCHW)", lambda r: f"{r['latency_ms']['dense']:.1f}"),
    ("latency pruned (ms, batch {b}; PyTorch NCHW)", lambda r: f"{r['latency_ms']['pruned']:.1f}"),
    ("speed-up dense/pruned", lambda r: f"{r['speedup']:.2f}x"),
    ("latency dense, NHWC (ms; PyTorch channels_last)", lambda r: f"{_nhwc(r, 'dense'):.1f}"),
    ("latency pruned, NHWC (ms; PyTorch channels_last)", lambda r: f"{_nhwc(r, 'pruned'):.1f}"),
    ("speed-up dense/pruned, NHWC", lambda r: f"{_nhwc(r, 'dense') / _nhwc(r, 'pruned'):.2f}x"),
]


def _nhwc(result: dict, net: str) -> float:
    """Latency in ms in the NHWC layout: PyTorch's channels_last run, XLA's only one."""
    return result["latency_ms"].get(f"{net}_channels_last", result["latency_ms"][net])


def markdown(sides: dict[str, dict], tp: dict, batch: int) -> str:
    """One column per jaxcompress allocation, then Torch-Pruning's."""
    first = next(iter(sides.values()))
    head = [f"jaxcompress {first['jax_version']} (JAX), {a} allocation" for a in sides]
    lines = [f"| ResNet-56, L1, {first['flops_budget']:.0%} MACs budget | " + " | ".join(head)
             + f" | Torch-Pruning {tp['torch_pruning_version']} (torch {tp['torch_version']}) |",
             "|---" * (len(sides) + 2) + "|"]
    for label, f in ROWS:
        lines.append(f"| {label.format(b=batch)} | " + " | ".join(f(r) for r in [*sides.values(), tp]) + " |")
    return "\n".join(lines) + "\n"


def xla_convs(shapes, batch: int, rounds: int) -> dict:
    """{"HWxC": ms}: one 3x3 C -> C convolution (stride 1, SAME, no bias) on XLA:CPU, NHWC /
    HWIO (XLA's layout for it), batch `batch`, jitted, interleaved medians."""
    fns = {}
    for hw, c in shapes:
        x = jax.random.normal(jax.random.key(0), (batch, hw, hw, c))
        w = jax.random.normal(jax.random.key(1), (3, 3, c, c))
        conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                                 dimension_numbers=("NHWC", "HWIO", "NHWC")))
        fns[f"{hw}x{c}"] = (lambda conv=conv, x=x, w=w: conv(x, w))
    return {k: 1e3 * v for k, v in interleaved_medians(fns, rounds=rounds, calls=3).items()}


def conv_markdown(xla: dict, torch_ms: dict, batch: int) -> str:
    """Single-conv table: where XLA:CPU's convolution itself stands against oneDNN's."""
    lines = [f"| one 3x3 conv, C -> C, batch {batch} | XLA:CPU NHWC (ms) | PyTorch channels_last (ms) | "
             "PyTorch NCHW (ms) | XLA / channels_last |", "|---|---|---|---|---|"]
    for shape, ms in xla.items():
        (hw, c), t = shape.split("x"), torch_ms[shape]
        lines.append(f"| {hw}x{hw} pixels, C={c} | {ms:.2f} | "
                     f"{t['channels_last']:.2f} | {t['nchw']:.2f} | {ms / t['channels_last']:.2f}x |")
    return "\n".join(lines) + "\n"


def run(config, workdir: str) -> dict:
    b = config.bench
    check_bench(b)
    python = torch_interpreter(b.torch_python)  # before any work
    versions = check_torch(python)
    load_start = list(os.getloadavg())
    _, _, variables, shape = speedup.init_network(b.model, b.seed)
    sides, nets = {}, {}
    for allocation in b.allocations:
        sides[allocation], pair = jaxcompress_side(b.model, b.flops_budget, b.scope, b.multiple, b.prune_repeats,
                                                   b.seed, variables, allocation, b.batch_size)
        nets.update(dense=pair["dense"], **{allocation: pair["pruned"]})
    lat = forward_latencies(nets, shape, b.batch_size, b.rounds)  # dense and every allocation, in alternation
    for allocation, jc in sides.items():
        jc.update(latency_ms={"dense": 1e3 * lat["dense"], "pruned": 1e3 * lat[allocation]},
                  latency_ratio=lat[allocation] / lat["dense"], speedup=lat["dense"] / lat[allocation],
                  batch_size=b.batch_size, device_kind=jax.devices()[0].device_kind, loadavg=list(os.getloadavg()))
        print(f"jaxcompress ({allocation}): MACs {jc['macs_fraction']:.4f}, pruning call "
              f"{jc['prune_seconds']['median']:.3f} s, latency {jc['latency_ms']['dense']:.1f} -> "
              f"{jc['latency_ms']['pruned']:.1f} ms", flush=True)
    args = ["--depth", b.model[len("resnet"):], "--flops-fraction", str(b.flops_budget),
            "--batch-size", str(b.batch_size), "--rounds", str(b.rounds), "--calls", "3", "--warmup", "2",
            "--prune-repeats", str(b.prune_repeats), "--threads", str(b.torch_threads), "--seed", str(b.seed)]
    if b.share_weights:
        weights = os.path.join(workdir, "init_weights.npz")
        np.savez(weights, **torch_state_dict(nets["dense"][1]))
        args += ["--weights", weights]
    tp = run_torch(python, args, b.torch_timeout_s)
    print(f"torch-pruning: MACs {tp['macs_fraction']:.4f}, pruning call {tp['prune_seconds']['median']:.3f} s, "
          f"latency {tp['latency_ms']['dense']:.1f} -> {tp['latency_ms']['pruned']:.1f} ms", flush=True)
    shapes = [tuple(int(v) for v in s) for s in b.conv_shapes]
    xla = xla_convs(shapes, b.batch_size, b.rounds)
    conv_args = ["--conv-shapes", ",".join(f"{hw}x{c}" for hw, c in shapes), "--batch-size", str(b.batch_size),
                 "--rounds", str(b.rounds), "--calls", "3", "--warmup", "2", "--threads", str(b.torch_threads)]
    torch_convs = run_torch(python, conv_args, b.torch_timeout_s)["conv_ms"] if shapes else {}
    table = markdown(sides, tp, b.batch_size) + ("\n" + conv_markdown(xla, torch_convs, b.batch_size) if shapes else "")
    summary = dict(
        job=config.job, model=b.model, flops_budget=b.flops_budget, batch_size=b.batch_size,
        weights=("random: jaxcompress init (seed %d), loaded into the PyTorch net by name" % b.seed
                 if b.share_weights else "random: each library's own init"),
        machine=dict(cpu_count=os.cpu_count(), device_kind=jax.devices()[0].device_kind,
                     loadavg_start=load_start, loadavg_end=list(os.getloadavg())),
        versions=dict(jax=jax.__version__, **versions),
        jaxcompress=sides, torch_pruning=tp, conv_ms=dict(xla=xla, torch=torch_convs),
        comparison={a: dict(macs_fraction=(jc["macs_fraction"], tp["macs_fraction"]),
                            latency_pruned_ms=(jc["latency_ms"]["pruned"], tp["latency_ms"]["pruned"]),
                            speedup=(jc["speedup"], tp["speedup"])) for a, jc in sides.items()},
        table=table,
    )
    write_json(os.path.join(workdir, "summary.json"), summary)
    with open(os.path.join(workdir, "comparison.md"), "w") as f:
        f.write(table)
    print(table, flush=True)
    return summary
