"""Benchmark (issue 17): STAMP against SNIP, random and magnitude pruning over 3 seeds,
paired on the same seeds (`benchmarks/stamp_seeds.py`), CIFAR-10 0-4 -> 5-9 at 30% of
the parameters, on the setup of benchmarks/configs/stamp_cifar10.py.

The argument (after ':') is `<budget>[_global|_counts][_mnist]`:
- budget `small` (a newcomer's run, minutes on 2 CPU cores) or `full` (stamp_cifar10's full
  budget, about 20 minutes per seed on 2 CPU cores);
- selection: by default `per_layer` (STAMP keeps each group's uniform-widths count,
  meta-trained with straight-through top-k gates and per-channel target statistics, so
  every method has the same widths); `_global`: STAMP's widths from the global E[pi]
  ranking, random channels at those widths and at uniform widths (what the widths cost);
- `_counts` (per_layer only): the budget term holds each group's expected kept channels
  at its count (`stamp.budget_penalty=counts`) instead of the small budget's hinge, which
  lets the sparse prior collapse E[pi] to one value;
- `_mnist`: the target is MNIST digits 0-4 (32x32, 3 channels), deploying the reference
  network and per-seed meta-training of the CIFAR-10 run with the same budget and
  selection (run that first; its workdir, `REUSE`).

JAXCOMPRESS_DATA_DIR=/work/shared/data python -m benchmarks.run --config=benchmarks/configs/stamp_seeds.py:small \\
    --workdir=workdirs/bench_stamp_seeds_small
JAXCOMPRESS_DATA_DIR=/work/shared/data python -m benchmarks.run --config=benchmarks/configs/stamp_seeds.py:small_mnist \\
    --workdir=workdirs/bench_stamp_seeds_small_mnist
"""
import ml_collections

from benchmarks.configs import stamp_cifar10
from jaxcompress.errors import ConfigError

BUDGETS = ("small", "full")
REUSE = "workdirs/bench_stamp_seeds_{}"  # the CIFAR-10 run an _mnist run deploys (same budget and selection)


def get_config(arg: str = "small"):
    budget, *options = arg.split("_")
    known = set(options) <= {"global", "counts", "mnist"} and len(set(options)) == len(options)
    if budget not in BUDGETS or not known or {"global", "counts"} <= set(options):
        raise ConfigError(f"unknown argument '{arg}' for {__name__}; use <small|full>[_global|_counts][_mnist]")
    selection = "global" if "global" in options else "per_layer"
    c = stamp_cifar10.get_config(budget)
    c.job = "bench_stamp_seeds"
    s = c.stamp
    s.selection = selection
    s.channel_stats = selection == "per_layer"
    s.baseline_widths = "stamp"  # every baseline at STAMP's widths (per_layer: the uniform ones)
    s.methods = ("stamp", "magnitude", "snip_pretrained", "random")
    if selection == "global":  # random at uniform widths vs random_stamp_widths: what the widths cost
        s.baseline_widths = "uniform"
        s.methods += ("random_stamp_widths",)
    if "counts" in options:
        s.budget_penalty = "counts"
    reuse = ""
    if "mnist" in options:
        s.target.name, s.target.image_size, s.target.channels = "mnist", 32, 3
        s.target.classes = (0, 1, 2, 3, 4)  # the head has 5 outputs (5 reference classes)
        reuse = REUSE.format("_".join([budget] + [o for o in options if o != "mnist"]))
    c.bench = ml_collections.ConfigDict(dict(seeds=(0, 1, 2), reuse=reuse,
                                             wall_target_s=600.0 if budget == "small" else 0.0))
    return c
