"""Benchmark: LeNet-5 on MNIST, 15 epochs on 2 CPU cores (target >= 99.0% test).

python -m benchmarks.run --config=benchmarks/configs/lenet5_mnist.py --workdir=workdirs/bench_lenet5_mnist
"""
from configs import default


def get_config():
    c = default.get_config()
    c.model.name = "lenet5"
    c.data.name = "mnist"
    c.train.num_epochs = 15
    c.train.batch_size = 128
    c.train.learning_rate = 0.05
    return c
