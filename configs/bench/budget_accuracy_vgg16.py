"""Benchmark: accuracy and measured speed of a 50% latency budget (aligned widths)
against a 50% FLOPs budget (unaligned widths) after the same fine-tune (issue 7).

VGG-16 on a 2,500-image stratified subset of CIFAR-10 (a very short CPU budget: the
dense VGG-16 forward takes 4.3 s per batch of 128 on 2 cores; 3 epochs of
pretraining, once, into <workdir>/pretrain), L1 pruning of every channel group, 2
fine-tune epochs per rule; test accuracy on a 2,000-image stratified test subset
(the same for both rules); latency at batch 128 on this device. Too short to be
meaningful (20 steps per epoch leave BatchNorm's running statistics unsettled: 10%
validation accuracy after epoch 1 in two tries); raise data.train_size on a faster
machine.

JAXCOMPRESS_DATA_DIR=../shared/data python -m launch.main --config=configs/bench/budget_accuracy_vgg16.py \
    --workdir=workdirs/bench_budget_accuracy_vgg16
"""
import ml_collections

from configs import cifar10_resnet20


def get_config():
    c = cifar10_resnet20.get_config()
    c.job = "bench_budget_accuracy"
    c.model.name = "vgg16"
    c.train.weight_decay = 5e-4
    c.data.train_size, c.data.val_size, c.data.test_size = 2500, 500, 2000
    c.train.num_epochs, c.train.learning_rate, c.train.eval_batch_size = 3, 0.02, 500
    c.prune.criterion, c.prune.scope = "l1", "all"
    c.prune.finetune_epochs, c.prune.finetune_learning_rate = 2, 0.02
    c.bench = ml_collections.ConfigDict(dict(budget=0.5))
    return c
