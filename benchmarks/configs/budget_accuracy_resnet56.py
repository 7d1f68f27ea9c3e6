"""Benchmark: accuracy and measured speed of a 50% latency budget (aligned widths)
against a 50% FLOPs budget (unaligned widths) after the same fine-tune (issue 7), and
of the 50% FLOPs budget with the latency allocation (per-group aligned widths, issue 21).

ResNet-56 on a 10,000-image stratified subset of CIFAR-10 (short CPU budget: 6
epochs of pretraining, once, into <workdir>/pretrain), L1 pruning of every channel
group, 2 fine-tune epochs per rule; test accuracy on the full 10,000 test images;
latency at batch 128 on this device.

JAXCOMPRESS_DATA_DIR=../shared/data python -m benchmarks.run --config=benchmarks/configs/budget_accuracy_resnet56.py \
    --workdir=workdirs/bench_budget_accuracy_resnet56
"""
import ml_collections

from configs import cifar10_resnet20


def get_config():
    c = cifar10_resnet20.get_config()
    c.job = "bench_budget_accuracy"
    c.model.name = "resnet56"
    c.data.train_size, c.data.val_size = 10000, 1000
    c.train.num_epochs, c.train.learning_rate, c.train.eval_batch_size = 6, 0.1, 500
    c.prune.criterion, c.prune.scope = "l1", "all"
    c.prune.finetune_epochs, c.prune.finetune_learning_rate = 2, 0.02
    c.bench = ml_collections.ConfigDict(dict(budget=0.5))
    return c
