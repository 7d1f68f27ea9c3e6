"""Benchmark: `budget_accuracy_resnet56.py` for VGG-16 on a very short budget.

VGG-16 on a 2,500-image stratified subset of CIFAR-10 (the dense VGG-16 forward takes
4.3 s per batch of 128 on 2 cores; 3 epochs of pretraining), the same two rules and
fine-tune; test accuracy on a 2,000-image stratified test subset (the same for both
rules). Too short to be meaningful (20 steps per epoch leave BatchNorm's running
statistics unsettled: 10% validation accuracy after epoch 1 in two tries); raise
data.train_size on a faster machine.

JAXCOMPRESS_DATA_DIR=../shared/data python -m launch.main --config=configs/bench/budget_accuracy_vgg16.py \
    --workdir=workdirs/bench_budget_accuracy_vgg16
"""
from configs.bench import budget_accuracy_resnet56


def get_config():
    c = budget_accuracy_resnet56.get_config()
    c.model.name = "vgg16"
    c.train.weight_decay = 5e-4
    c.data.train_size, c.data.val_size, c.data.test_size = 2500, 500, 2000
    c.train.num_epochs, c.train.learning_rate = 3, 0.02
    return c
