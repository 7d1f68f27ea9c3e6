"""MobileNet-v1 (Howard et al. 2017) and MobileNet-v2 (Sandler et al. 2018).

A depthwise conv shares its channel group with the layer feeding it; each
inverted-residual stage's blocks share one stream group.

v1 widths: (stem, 13 pointwise outputs). v2 widths: (stem, 7 stage streams,
one expansion per block with t > 1 (16), last 1x1 conv).
"""
from __future__ import annotations

import flax.linen as nn

from jaxcompress.layers import Dense
from jaxcompress.models.common import conv_bn, global_avg_pool

V1_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1),
             (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))  # (pointwise width, dw stride)
V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
             (6, 160, 3, 2), (6, 320, 1, 1))  # (expansion t, width c, blocks n, stride s)


def v1_default_widths() -> tuple[int, ...]:
    return (32,) + tuple(w for w, _ in V1_BLOCKS)


def v2_default_widths() -> tuple[int, ...]:
    streams, expansions, prev = [], [], 32
    for t, c, n, _ in V2_STAGES:
        streams.append(c)
        for b in range(n):
            if t != 1:
                expansions.append(t * (prev if b == 0 else c))
        prev = c
    return (32,) + tuple(streams) + tuple(expansions) + (1280,)


class MobileNetV1(nn.Module):
    widths: tuple[int, ...] = v1_default_widths()
    num_classes: int = 1000
    small_input: bool = False  # CIFAR: stride 1 in the stem

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = conv_bn(x, self.widths[0], 3, train, strides=1 if self.small_input else 2, name="stem", signed_input=True)
        for i, (_, stride) in enumerate(V1_BLOCKS):
            x = conv_bn(x, x.shape[-1], 3, train, strides=stride, groups=x.shape[-1], name=f"block{i}_dw")
            x = conv_bn(x, self.widths[i + 1], 1, train, name=f"block{i}_pw")
        return Dense(self.num_classes, name="classifier")(global_avg_pool(x))


class MobileNetV2(nn.Module):
    widths: tuple[int, ...] = v2_default_widths()
    num_classes: int = 1000
    small_input: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        n = len(V2_STAGES)
        streams, expansions = self.widths[1:1 + n], iter(self.widths[1 + n:-1])
        x = conv_bn(x, self.widths[0], 3, train, strides=1 if self.small_input else 2, name="stem",
                    act=nn.relu6, signed_input=True)
        for s, (t, _, n_blocks, stride) in enumerate(V2_STAGES):
            for b in range(n_blocks):
                name = f"stage{s + 1}_block{b}"
                y = x
                if t != 1:
                    y = conv_bn(y, next(expansions), 1, train, act=nn.relu6, name=f"{name}_expand",
                                signed_input=True)  # input: the linear stream
                y = conv_bn(y, y.shape[-1], 3, train, strides=stride if b == 0 else 1, groups=y.shape[-1],
                            act=nn.relu6, name=f"{name}_dw")
                y = conv_bn(y, streams[s], 1, train, act=None, name=f"{name}_project")
                x = x + y if b > 0 else y
        x = conv_bn(x, self.widths[-1], 1, train, act=nn.relu6, name="last", signed_input=True)
        return Dense(self.num_classes, name="classifier")(global_avg_pool(x))
