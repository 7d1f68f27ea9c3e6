"""Benchmark: LeNet-5 on MNIST, 2-bit (ternary) weights, 4-bit activations, QAT.

First and last layers stay at 8 bits (HAQ's convention); 5 epochs of QAT.

python -m benchmarks.run --config=benchmarks/configs/quant_lenet5_mnist_qat2.py --workdir=workdirs/bench_quant_lenet5_qat2
"""
from benchmarks.configs import quant_lenet5_mnist_qat4


def get_config():
    c = quant_lenet5_mnist_qat4.get_config()
    c.quant.bits_w = 2
    c.quant.layer_bits_w = {"conv1": 8, "fc3": 8}
    c.quant.qat_epochs = 5
    return c
