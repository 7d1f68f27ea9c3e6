"""Benchmark: LeNet-5 on MNIST pruned gradually with hand-set per-layer rates
(structural L1 channel pruning, then magnitude element pruning of the remaining
weights; 6 steps with 3 epochs of masked fine-tuning between), shrunk and fine-tuned
for 20 epochs.
Target: >= 90% of parameters removed, FLOPs <= 20% of dense, test error <= dense + 0.15.

python -m benchmarks.run --config=benchmarks/configs/prune_lenet5_mnist.py --workdir=workdirs/bench_prune_lenet5
(uses the reference trained by benchmarks/configs/lenet5_mnist.py if present, else trains one)
"""
import os

from benchmarks.configs import lenet5_mnist

REFERENCE = "workdirs/bench_lenet5_mnist"


def get_config():
    c = lenet5_mnist.get_config()
    c.job = "prune"
    c.prune.checkpoint = REFERENCE if os.path.isdir(REFERENCE) else ""
    c.prune.criterion = "l1"
    c.prune.keep_ratios = {"conv1": 0.67, "conv2": 0.75, "fc1": 0.5, "fc2": 0.5}
    c.prune.element_rates = {"conv1": 0.5, "conv2": 0.7, "fc1": 0.8, "fc2": 0.5, "fc3": 0.2}
    c.prune.iterations = 6  # gradual: prune a sixth of the way, fine-tune 3 epochs, repeat
    c.prune.iteration_epochs = 3
    c.prune.finetune_epochs = 20
    c.prune.finetune_learning_rate = 0.02
    c.hardware.multiple = 1  # unaligned channel counts, as in the paper (and the README's recorded row)
    return c
