"""Benchmark: which channel multiples pay on this device (issue 7's alignment table).

ResNet-56 (CIFAR) L1-pruned to 50% of its FLOPs with kept counts rounded to multiples
of 1, 2, 4, 8 and 16; dense vs masked-not-shrunk vs shrunk forward latency, batch 128.

python -m benchmarks.run --config=benchmarks/configs/width_alignment.py --workdir=workdirs/bench_width_alignment
"""
from benchmarks.configs import prune_speedup


def get_config():
    c = prune_speedup.get_config()
    c.bench.models, c.bench.flops_budgets, c.bench.multiples = ("resnet56",), (0.5,), (1, 2, 4, 8, 16)
    return c
