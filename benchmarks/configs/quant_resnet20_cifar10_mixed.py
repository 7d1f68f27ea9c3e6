"""Benchmark: ResNet-20 / CIFAR-10, uniform 8, 6 and 4-bit weights against a
sensitivity-based mixed allocation of the size of the 4-bit network; activations 8
bits; every row 1 epoch of QAT from the same float network (equal budget).

The float network is trained first if missing, with a short CPU budget (10 epochs on
a 10,000-image stratified subset of the training split) into
workdirs/bench_resnet20_cifar10_short; QAT uses the same subset; test accuracy is on
the full 10,000-image test set.

JAXCOMPRESS_DATA_DIR=../shared/data python -m benchmarks.run --config=benchmarks/configs/quant_resnet20_cifar10_mixed.py --workdir=workdirs/bench_quant_resnet20_mixed
"""
import ml_collections

from configs import cifar10_resnet20


def get_config():
    c = cifar10_resnet20.get_config()
    c.train.num_epochs = 10
    c.data.train_size, c.data.val_size = 10000, 1000
    c.train.eval_batch_size = 500
    c.job = "bench_quant_mixed"
    c.quant.checkpoint = "workdirs/bench_resnet20_cifar10_short"
    c.quant.train_if_missing = True
    c.quant.mode = "qat"
    c.quant.qat_epochs = 1
    c.quant.qat_learning_rate = 0.01
    c.quant.bits_a = 8
    c.quant.calibration = "mse"
    # uniform rows vs sensitivity-based mixed rows of the same size
    c.bench = ml_collections.ConfigDict(dict(uniform_bits=(8, 6, 4), mixed_bits=(4,)))
    c.quant.min_bits_w = 2
    c.quant.sensitivity_bits = (2, 3, 4, 5, 6, 7, 8)
    return c
