"""ResNets (He et al. 2016): CIFAR ResNet-20/56/110 and ImageNet ResNet-18/50.

Downsampling blocks use a 1x1 projection shortcut (He et al.'s option B), chosen by
position, never by width, so a pruned stream stays a valid residual stream. The
ImageNet bottleneck puts the stride on the 3x3 conv (torchvision's "v1.5").

widths layout: `(stem,)` for bottleneck nets only (their stem feeds a projection),
then one entry per stage's residual stream, then the inner widths of every block in
order (one per basic block, two per bottleneck block).
"""
from __future__ import annotations

import flax.linen as nn

from jaxcompress.layers import Dense
from jaxcompress.models.common import conv_bn, global_avg_pool


def default_widths(stage_sizes, stream_widths, bottleneck: bool) -> tuple[int, ...]:
    inner = []
    for n, w in zip(stage_sizes, stream_widths):
        inner += [w // 4] * (2 * n) if bottleneck else [w] * n
    stem = (stream_widths[0] // 4,) if bottleneck else ()
    return stem + tuple(stream_widths) + tuple(inner)


def cifar_stage_sizes(depth: int) -> tuple[int, int, int]:
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
    return ((depth - 2) // 6,) * 3


class ResNet(nn.Module):
    stage_sizes: tuple[int, ...] = (9, 9, 9)
    widths: tuple[int, ...] = default_widths((9, 9, 9), (16, 32, 64), False)
    num_classes: int = 10
    bottleneck: bool = False
    imagenet_stem: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        n_stages = len(self.stage_sizes)
        offset = 1 if self.bottleneck else 0
        streams = self.widths[offset:offset + n_stages]
        inner = iter(self.widths[offset + n_stages:])
        stem_width = self.widths[0] if self.bottleneck else streams[0]
        if self.imagenet_stem:
            x = conv_bn(x, stem_width, 7, train, strides=2, name="stem", signed_input=True)
            x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")
        else:
            x = conv_bn(x, stem_width, 3, train, name="stem", signed_input=True)
        for s, n_blocks in enumerate(self.stage_sizes):
            for b in range(n_blocks):
                name = f"stage{s + 1}_block{b}"
                stride = 2 if (b == 0 and s > 0) else 1
                if self.bottleneck:
                    y = conv_bn(x, next(inner), 1, train, name=f"{name}_a")
                    y = conv_bn(y, next(inner), 3, train, strides=stride, name=f"{name}_b")
                    y = conv_bn(y, streams[s], 1, train, act=None, name=f"{name}_c")
                else:
                    y = conv_bn(x, next(inner), 3, train, strides=stride, name=f"{name}_a")
                    y = conv_bn(y, streams[s], 3, train, act=None, name=f"{name}_b")
                if b == 0 and (s > 0 or self.bottleneck):
                    x = conv_bn(x, streams[s], 1, train, strides=stride, act=None, name=f"{name}_proj")
                x = nn.relu(x + y)
        return Dense(self.num_classes, name="classifier")(global_avg_pool(x))
