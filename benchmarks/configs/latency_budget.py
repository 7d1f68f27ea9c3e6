"""Benchmark: a 50% latency budget with aligned widths against a 50% FLOPs budget with
unaligned widths (ResNet-56 and VGG-16, CIFAR shapes, L1 pruning of every group,
batch 128; measured dense and shrunk latency on this device).

python -m benchmarks.run --config=benchmarks/configs/latency_budget.py --workdir=workdirs/bench_latency_budget
"""
import ml_collections

from configs import default


def get_config():
    c = default.get_config()
    c.job = "bench_latency_budget"
    c.bench = ml_collections.ConfigDict(dict(models=("resnet56", "vgg16"), budget=0.5, scope="all",
                                             batch_size=128, rounds=5))
    return c
