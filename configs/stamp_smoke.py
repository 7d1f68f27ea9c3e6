"""A minutes-long STAMP run on CIFAR-10 (tiny subsets) to check the pipeline end to end.

JAXCOMPRESS_DATA_DIR=/work/shared/data python -m launch.main --config=configs/stamp_smoke.py --workdir=/tmp/stamp_smoke
"""
from benchmarks.configs import stamp_cifar10


def get_config():
    c = stamp_cifar10.get_config("small")
    c.model.width_multiplier = 0.125
    c.train.num_epochs = 1
    s = c.stamp
    s.reference_train_size, s.target_train_size, s.val_size = 640, 320, 100
    s.meta_steps, s.checkpoint_every, s.set_size = 4, 2, 32
    s.finetune_epochs, s.bbdropout_epochs, s.snip_batch = 1, 1, 64
    return c
