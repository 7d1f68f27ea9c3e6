"""Benchmark: ResNet-20 on a 10,000-image stratified subset of CIFAR-10, 12 epochs with
the standard augmentation: the trained network the ResNet-20 search benchmarks start
from (`benchmarks/configs/search_agents_resnet20.py`). A short CPU budget (about 25 min on
2 cores), not the 160-epoch recipe of `configs/cifar10_resnet20.py`.

JAXCOMPRESS_DATA_DIR=../shared/data python -m benchmarks.run --config=benchmarks/configs/resnet20_cifar10.py \
    --workdir=workdirs/bench_resnet20_cifar10
"""
from configs import cifar10_resnet20


def get_config():
    c = cifar10_resnet20.get_config()
    c.data.train_size, c.data.val_size = 10000, 1000
    c.train.num_epochs, c.train.learning_rate, c.train.eval_batch_size = 12, 0.1, 500
    return c
