"""VGG (Simonyan & Zisserman 2015) with BatchNorm.

`head="cifar"`: one classifier on the 1x1x512 map of a 32x32 input (VGG-19 then has
20.04M parameters, the two-stage paper's CIFAR-10 VGG). `head="imagenet"`: the
original 4096-4096 classifier on the 7x7 map of a 224x224 input (VGG-16: 138.4M).
widths = one entry per conv, then (fc1, fc2) for the ImageNet head.
"""
from __future__ import annotations

import flax.linen as nn

from jaxcompress.layers import Dense
from jaxcompress.models.common import conv_bn

POOL = "M"
CONFIGS = {
    11: (64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL),
    16: (64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512, POOL),
    19: (64, 64, POOL, 128, 128, POOL, 256, 256, 256, 256, POOL, 512, 512, 512, 512, POOL,
         512, 512, 512, 512, POOL),
}


def default_widths(depth: int, head: str = "cifar") -> tuple[int, ...]:
    convs = tuple(c for c in CONFIGS[depth] if c != POOL)
    return convs + ((4096, 4096) if head == "imagenet" else ())


class VGG(nn.Module):
    depth: int = 16
    widths: tuple[int, ...] = default_widths(16)
    num_classes: int = 10
    head: str = "cifar"

    @nn.compact
    def __call__(self, x, train: bool = False):
        i = 0
        for c in CONFIGS[self.depth]:
            if c == POOL:
                x = nn.max_pool(x, (2, 2), (2, 2))
            else:
                x = conv_bn(x, self.widths[i], 3, train, name=f"layer{i}", signed_input=i == 0)
                i += 1
        x = x.reshape(x.shape[0], -1)
        if self.head == "imagenet":
            for j in range(2):
                x = nn.relu(Dense(self.widths[i + j], name=f"fc{j + 1}")(x))
        return Dense(self.num_classes, name="classifier")(x)
