"""Benchmark: training-step time of zoo models built from masked + quantized layers
(all-ones masks, 32-bit) against the same nets from plain Flax layers (target <= 1.10x).

python -m benchmarks.run --config=benchmarks/configs/layer_overhead.py --workdir=workdirs/bench_overhead
"""
import ml_collections

from configs import default


def get_config():
    c = default.get_config()
    c.job = "bench_overhead"
    c.bench = ml_collections.ConfigDict(dict(models=("lenet5", "resnet20"), batch_size=128, rounds=7))
    return c
