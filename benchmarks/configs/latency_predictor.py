"""Benchmark: latency predictor error (issue 7). The fitted latency model of ResNet-56
(CIFAR, batch 128) against measured whole-network latency at 20 random aligned width
vectors; target median error under 10%.

python -m benchmarks.run --config=benchmarks/configs/latency_predictor.py --workdir=workdirs/bench_latency_predictor
"""
import ml_collections

from configs import default


def get_config():
    c = default.get_config()
    c.job = "bench_latency_predictor"
    c.bench = ml_collections.ConfigDict(dict(model="resnet56", scope="all", num_vectors=20, batch_size=128,
                                             rounds=3))
    return c
