"""Benchmark: LeNet-5 / MNIST, uniform weight bits (8, 4, 3, 2) against mixed-precision
allocations of the same exact size (sensitivity heuristic), activations at 8 bits,
each row 1 epoch of QAT from the same float network (equal training budget).

The mixed rows keep the first and last layers at 8 bits (HAQ) and may go down to 1 bit
elsewhere; their size is at most the uniform row's.

python -m benchmarks.run --config=benchmarks/configs/quant_lenet5_mixed.py --workdir=workdirs/bench_quant_lenet5_mixed
"""
import ml_collections

from benchmarks.configs import quant_lenet5_mnist


def get_config():
    c = quant_lenet5_mnist.get_config()
    c.job = "bench_quant_mixed"
    c.quant.mode = "qat"
    c.quant.qat_epochs = 1
    c.quant.bits_a = 8
    c.quant.calibration = "mse"
    # uniform rows vs sensitivity-based mixed rows of the same size
    c.bench = ml_collections.ConfigDict(dict(uniform_bits=(8, 4, 3, 2), mixed_bits=(4, 3, 2)))
    c.quant.min_bits_w = 1
    c.quant.sensitivity_bits = (1, 2, 3, 4, 5, 6, 7, 8)
    return c
