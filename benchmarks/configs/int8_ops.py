"""Benchmark: float32 against int8 x int8 -> int32 convolutions and products on this
device, and what XLA compiles the integer ones into (issue 21; benchmarks/int8_ops.py).
LeNet-5's and ResNet-20's layers at batch 128, and two with int4 weights.

python -m benchmarks.run --config=benchmarks/configs/int8_ops.py --workdir=workdirs/bench_int8_ops
"""
import ml_collections

from configs import default


def get_config():
    c = default.get_config()
    c.job = "bench_int8_ops"
    c.bench = ml_collections.ConfigDict(dict(
        ops=("conv:28x28x1:5x5:6", "conv:14x14x6:5x5:16", "dot:400:120", "dot:120:84",
             "conv:32x32x16:3x3:16", "conv:16x16x32:3x3:32", "conv:8x8x64:3x3:64",
             "dot4:400:120", "conv4:16x16x32:3x3:32"),  # int4 weights (the conv: int4 inputs too)
        batch_size=128, rounds=5, calls=3))
    return c
