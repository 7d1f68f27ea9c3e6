"""Benchmark (dataset shift): the CIFAR-10 reference network and meta-trained STAMP of
benchmarks/configs/stamp_cifar10.py (same budget argument: full or small), deployed on MNIST
digits 0-4 (padded/resized to 32x32, grey replicated to 3 channels). Reuses that run's
pretrain/ and meta/ if present (run it first).

JAXCOMPRESS_DATA_DIR=/work/shared/data python -m benchmarks.run --config=benchmarks/configs/stamp_mnist.py \\
    --workdir=workdirs/bench_stamp_mnist
JAXCOMPRESS_DATA_DIR=/work/shared/data python -m benchmarks.run --config=benchmarks/configs/stamp_mnist.py:small \\
    --workdir=workdirs/bench_stamp_mnist_small
"""
import os

from benchmarks.configs import stamp_cifar10

REFERENCE = {"full": "workdirs/bench_stamp_cifar10", "small": "workdirs/bench_stamp_cifar10_small"}


def get_config(budget: str = "full"):
    c = stamp_cifar10.get_config(budget)
    s = c.stamp
    s.target.name = "mnist"
    s.target.image_size = 32
    s.target.channels = 3
    s.target.classes = (0, 1, 2, 3, 4)  # the head has 5 outputs (5 reference classes)
    # no snip_init / bbdropout here (see the CIFAR-10 run for those)
    s.methods = ("stamp", "dense", "magnitude", "snip_pretrained", "random", "scratch")
    reference = REFERENCE[budget]
    if os.path.isdir(os.path.join(reference, "pretrain")):
        s.pretrained = os.path.join(reference, "pretrain")
    if os.path.isdir(os.path.join(reference, "meta", "checkpoints")):
        s.meta_checkpoint = os.path.join(reference, "meta")
    return c
