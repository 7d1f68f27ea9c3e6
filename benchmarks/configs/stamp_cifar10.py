"""Benchmark: STAMP on CIFAR-10, classes 0-4 as reference (pretrain + meta-train), 5-9 as
target; VGG-11 with width_multiplier 0.25 (trains on 2 CPU cores); 30% parameter budget.

Two budgets (the config argument after ':'):
- full (default, ~35 min on a quiet 2-core CPU): every reference training image
  (25,000), 15 epochs; 200 meta steps; 10,000 target images, 8 fine-tune epochs.
- small (~6 min): 4,000 reference images, 5 epochs; 40 meta steps; 2,000 target
  images, 3 fine-tune epochs.

JAXCOMPRESS_DATA_DIR=/work/shared/data python -m benchmarks.run --config=benchmarks/configs/stamp_cifar10.py \\
    --workdir=workdirs/bench_stamp_cifar10
JAXCOMPRESS_DATA_DIR=/work/shared/data python -m benchmarks.run --config=benchmarks/configs/stamp_cifar10.py:small \\
    --workdir=workdirs/bench_stamp_cifar10_small
"""
from configs import default
from jaxcompress.errors import ConfigError

BUDGETS = ("full", "small")


def get_config(budget: str = "full"):
    if budget not in BUDGETS:
        raise ConfigError(f"unknown budget '{budget}' for {__name__}; use :{' or :'.join(BUDGETS)}")
    full = budget == "full"
    c = default.get_config()
    c.job = "stamp"
    c.model.name = "vgg11"
    c.model.width_multiplier = 0.25
    c.data.name = "cifar10"
    c.data.augment = True
    c.train.num_epochs = 15 if full else 5  # reference pretraining
    c.train.batch_size = 64
    c.train.learning_rate = 0.05
    s = c.stamp
    s.reference_classes = (0, 1, 2, 3, 4)
    s.target.classes = (5, 6, 7, 8, 9)
    s.reference_train_size = 0 if full else 4000  # 0: all
    s.target_train_size = 10000 if full else 2000
    s.val_size = 500 if full else 250
    s.budget, s.budget_metric = 0.3, "params"
    s.budget_penalty = "target" if full else "hinge"  # small: as its recorded README row was measured
    s.meta_steps, s.tasks_per_step = (200 if full else 40), 2
    s.inner_steps, s.inner_batch, s.query_size = 3, 32, 64
    s.meta_learning_rate = 3e-3
    s.task_ways = (2, 5)
    s.set_size = 100
    s.checkpoint_every = 20
    s.finetune_epochs = s.bbdropout_epochs = 8 if full else 3
    s.finetune_learning_rate, s.scratch_learning_rate = 0.02, 0.05
    c.hardware.multiple = 1  # unaligned channel counts, as in the paper: the uniform baselines match STAMP's size
    return c
