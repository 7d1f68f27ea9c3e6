"""A small 4-layer CNN for CIFAR-10: the network of the two-stage paper's Section 5.5
single-layer experiment (Zhan, Lin, Cao 2021: "2 convolution (conv) layers and 2 fully
connected (fc) layers"; widths are not given there, ours below)."""
from __future__ import annotations

import flax.linen as nn

from jaxcompress.layers import Conv, Dense


class CNN4(nn.Module):
    """conv5x5(32) -> maxpool 2 -> conv5x5(64) -> maxpool 2 -> fc(256) -> fc(classes), ReLU.

    Both convs pad SAME, so any input whose side is divisible by 4 works (32x32 CIFAR
    gives an 8x8x64 map into fc1). widths = (conv1, conv2, fc1): three prunable channel
    groups; the classifier's output is not a group. On 32x32x3 with the default widths:
    conv1 5*5*3*32 + 32 = 2,432, conv2 5*5*32*64 + 64 = 51,264,
    fc1 8*8*64*256 + 256 = 1,048,832, fc2 256*10 + 10 = 2,570: 1,105,098 parameters.
    """

    widths: tuple[int, ...] = (32, 64, 256)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(Conv(self.widths[0], (5, 5), padding="SAME", signed_input=True, name="conv1")(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(Conv(self.widths[1], (5, 5), padding="SAME", name="conv2")(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(Dense(self.widths[2], name="fc1")(x))
        return Dense(self.num_classes, name="fc2")(x)
