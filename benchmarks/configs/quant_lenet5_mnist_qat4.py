"""Benchmark: LeNet-5 on MNIST, 4-bit weights and activations, quantization-aware training.

3 epochs of QAT (straight-through estimator) from the trained float network, starting
from MSE-calibrated activation ranges. Target: test accuracy drop <= 0.3 points.

python -m benchmarks.run --config=benchmarks/configs/quant_lenet5_mnist_qat4.py --workdir=workdirs/bench_quant_lenet5_qat4
"""
from benchmarks.configs import quant_lenet5_mnist


def get_config():
    c = quant_lenet5_mnist.get_config()
    c.quant.mode = "qat"
    c.quant.bits_w = 4
    c.quant.bits_a = 4
    c.quant.calibration = "mse"
    c.quant.qat_epochs = 3
    c.quant.qat_learning_rate = 0.01
    return c
