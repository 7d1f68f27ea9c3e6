"""ResNet-20 on CIFAR-10 with the standard augmentation (pad-4 crop, flip)."""
from configs import default


def get_config():
    c = default.get_config()
    c.model.name = "resnet20"
    c.data.name = "cifar10"
    c.data.augment = True
    c.train.num_epochs = 160
    c.train.learning_rate = 0.1
    c.train.weight_decay = 1e-4
    return c
