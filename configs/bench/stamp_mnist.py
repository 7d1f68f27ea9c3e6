"""Benchmark (dataset shift): the CIFAR-10 reference network and meta-trained STAMP of
configs/bench/stamp_cifar10.py, deployed on MNIST digits 0-4 (padded/resized to 32x32,
grey replicated to 3 channels). Reuses that run's pretrain/ and meta/ if present.

JAXCOMPRESS_DATA_DIR=/work/shared/data python -m launch.main --config=configs/bench/stamp_mnist.py \
    --workdir=workdirs/bench_stamp_mnist
"""
import os

from configs.bench import stamp_cifar10

REFERENCE = "workdirs/bench_stamp_cifar10"


def get_config():
    c = stamp_cifar10.get_config()
    s = c.stamp
    s.target.name = "mnist"
    s.target.image_size = 32
    s.target.channels = 3
    s.target.classes = (0, 1, 2, 3, 4)  # the head has 5 outputs (5 reference classes)
    # reduced for the shared 2-core CPU: no snip_init / bbdropout here (see the CIFAR-10 run for those)
    s.methods = ("stamp", "dense", "magnitude", "snip_pretrained", "random", "scratch")
    if os.path.isdir(os.path.join(REFERENCE, "pretrain")):
        s.pretrained = os.path.join(REFERENCE, "pretrain")
    if os.path.isdir(os.path.join(REFERENCE, "meta", "checkpoints")):
        s.meta_checkpoint = os.path.join(REFERENCE, "meta")
    c.prune.multiple = 1  # unaligned channel counts, as in the paper: the uniform baselines match STAMP's size
    return c
