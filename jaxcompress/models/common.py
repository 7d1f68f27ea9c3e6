"""Building blocks shared by the zoo.

Rule every zoo model follows: the model is a function of `widths`, a flat tuple
with one entry per *channel group* (a set of layers whose output channels must be
pruned together: a residual stream, a depthwise conv and its producer, a conv and
its BatchNorm). A model never derives one width from another (no `4 * width`
inside the model): every group is its own entry. `jaxcompress.models.table`
relies on this to find the groups from shapes alone.
"""
from __future__ import annotations

import flax.linen as nn

from jaxcompress.layers import BatchNorm, Conv

# He et al. 2015 initialisation for ReLU networks (fan-out, as in torchvision / Flax examples).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv_bn(x, features, kernel, train, *, strides=1, groups=1, act=nn.relu, name, signed_input=False):
    """Conv (no bias) -> BatchNorm -> activation; `act=None` for a linear output.
    `signed_input`: the conv's input can be negative (images, linear residual
    streams), so activation quantization uses the signed grid."""
    x = Conv(features, (kernel, kernel), strides=strides, padding="SAME", feature_group_count=groups,
             use_bias=False, kernel_init=conv_init, signed_input=signed_input, name=f"{name}_conv")(x)
    x = BatchNorm(use_running_average=not train, momentum=0.9, name=f"{name}_bn")(x)  # zoo: 0.9, not Flax's 0.99
    return x if act is None else act(x)


def global_avg_pool(x):
    return x.mean(axis=(1, 2))
