"""Benchmark: `budget_accuracy_resnet56.py` for VGG-16 on a short CPU budget.

VGG-16 on a 5,000-image stratified subset of CIFAR-10, 3 epochs of AdamW pretraining (the
dense VGG-16 forward takes 4.3 s per batch of 128 on 2 cores: its three 512-channel
convs at 2x2 are 91% of it), the same two rules and 2 fine-tune epochs each; test
accuracy on a 2,000-image stratified test subset (the same for both rules). A short
budget: raise data.train_size and train.num_epochs on a faster machine.

JAXCOMPRESS_DATA_DIR=../shared/data python -m benchmarks.run --config=benchmarks/configs/budget_accuracy_vgg16.py \
    --workdir=workdirs/bench_budget_accuracy_vgg16
"""
from benchmarks.configs import budget_accuracy_resnet56


def get_config():
    c = budget_accuracy_resnet56.get_config()
    c.model.name = "vgg16"
    c.train.weight_decay = 5e-4
    c.data.train_size, c.data.val_size, c.data.test_size = 5000, 500, 2000
    # SGD at 0.05 left the dense network at chance after 2 epochs (train loss 3.6, then 2.37): Adam starts VGG-16 faster
    c.train.optimizer, c.train.num_epochs, c.train.learning_rate, c.train.warmup_epochs = "adamw", 3, 1e-3, 0.0
    c.prune.finetune_learning_rate = 5e-4
    return c
