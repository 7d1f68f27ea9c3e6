"""Offline quickstart: train LeNet-5 on the embedded 8x8 digits (resized to 28x28),
prune half of its channels by L1 norm, physically shrink it and fine-tune it.

Runs end to end in about a minute on 2 CPU cores with no download.
"""
from configs import default


def get_config():
    c = default.get_config()
    c.data.name = "digits"
    c.data.image_size = 28
    c.data.val_size = 200
    c.train.num_epochs = 8
    c.train.batch_size = 64
    c.train.eval_batch_size = 200
    c.train.learning_rate = 0.05
    c.job = "prune"
    c.prune.finetune_epochs = 3
    return c
