"""Benchmark: LeNet-5 on MNIST, 8-bit post-training quantization (weights and activations).

Quantizes the trained network of benchmarks/configs/lenet5_mnist.py (trained into
workdirs/bench_lenet5_mnist first if missing), exports the packed integer file and
checks it. Target: test accuracy drop <= 0.1 points.

python -m benchmarks.run --config=benchmarks/configs/quant_lenet5_mnist.py --workdir=workdirs/bench_quant_lenet5_ptq8
"""
from benchmarks.configs import lenet5_mnist


def get_config():
    c = lenet5_mnist.get_config()
    c.job = "quantize"
    c.quant.checkpoint = "workdirs/bench_lenet5_mnist"
    c.quant.train_if_missing = True
    c.quant.mode = "ptq"
    c.quant.bits_w = 8
    c.quant.bits_a = 8
    c.quant.calibration = "minmax"
    return c
