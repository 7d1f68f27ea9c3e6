"""Benchmark: inference speed-up of physically pruned networks (batch 128).

ResNet-56 at 50% FLOPs and VGG-16 at 30% FLOPs, L1 channel pruning, widths rounded to
multiples of 1 (unaligned) and 8 (aligned); dense vs masked-not-shrunk vs shrunk.

python -m benchmarks.run --config=benchmarks/configs/prune_speedup.py --workdir=workdirs/bench_prune_speedup
"""
import ml_collections

from configs import default


def get_config():
    c = default.get_config()
    c.job = "bench_prune_speedup"
    c.bench = ml_collections.ConfigDict(dict(
        models=("resnet56", "vgg16"), flops_budgets=(0.5, 0.3), multiples=(1, 8), scope="all",
        batch_size=128, rounds=5))
    return c
