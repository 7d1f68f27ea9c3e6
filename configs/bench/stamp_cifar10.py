"""Benchmark: STAMP on CIFAR-10, classes 0-4 as reference (pretrain + meta-train), 5-9 as
target; VGG-11 with width_multiplier 0.25 (trains on 2 CPU cores); 30% parameter budget.
Reduced budget for a shared 2-core CPU: subsets of the training sets, few epochs.

JAXCOMPRESS_DATA_DIR=/work/shared/data python -m launch.main --config=configs/bench/stamp_cifar10.py \
    --workdir=workdirs/bench_stamp_cifar10
"""
from configs import default


def get_config():
    c = default.get_config()
    c.job = "stamp"
    c.model.name = "vgg11"
    c.model.width_multiplier = 0.25
    c.data.name = "cifar10"
    c.data.augment = True
    c.train.num_epochs = 5  # reference pretraining
    c.train.batch_size = 64
    c.train.learning_rate = 0.05
    s = c.stamp
    s.reference_classes = (0, 1, 2, 3, 4)
    s.target.classes = (5, 6, 7, 8, 9)
    s.reference_train_size = 4000
    s.target_train_size = 2000
    s.val_size = 250
    s.budget, s.budget_metric = 0.3, "params"
    s.meta_steps, s.tasks_per_step = 40, 2
    s.inner_steps, s.inner_batch, s.query_size = 3, 32, 64
    s.meta_learning_rate = 3e-3
    s.task_ways = (2, 5)
    s.set_size = 100
    s.checkpoint_every = 20
    s.finetune_epochs, s.bbdropout_epochs = 3, 3
    s.finetune_learning_rate, s.scratch_learning_rate = 0.02, 0.05
    c.prune.multiple = 1  # unaligned channel counts, as in the paper: the uniform baselines match STAMP's size
    return c
