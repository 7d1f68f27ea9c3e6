"""Per-channel statistics of a target sample through the pretrained network.

What the STAMP mask generator may read per channel besides the set embedding
(`stamp.channel_stats`), each from one jitted forward and backward pass of the
network with all-ones channel gates on a labelled sample (normalised images):

* `mean`: the channel's mean output over the sample and spatial positions;
* `std`: its standard deviation over the same;
* `saliency`: |d loss / d gate| for the group's channel mask (which multiplies the
  output of every member layer), the channel-level connection sensitivity (SNIP at
  channel granularity: |sum over positions of activation x its gradient|).

Means and standard deviations are averaged over the group's member layers (every
layer whose channel mask the group owns). `standardized` turns each statistic into
a z-score across the group's channels, the generator's input.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcompress.train.steps import cross_entropy

STATISTICS = ("mean", "std", "saliency")


def channel_statistics(layout, variables, images, labels) -> list[jax.Array]:
    """(width, 3) statistics (`STATISTICS` order) of every prunable group of `layout`
    (a `jaxcompress.stamp.generator.GroupLayout`) on `images` (normalised floats) with
    integer `labels`, for the network `variables`. Pure; jit it (or call it inside a jit)."""
    table = layout.table
    members = [{p[:-1] for p in table.mask_paths(g)} for g in layout.groups]
    variables = jax.lax.stop_gradient({k: v for k, v in variables.items() if k != "quant"})
    base_masks = variables.get("masks")

    def loss(gates):
        outputs = [[] for _ in members]

        def record(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            path = tuple(context.module.scope.path) if context.module.scope is not None else ()
            if context.method_name == "__call__":
                for i, paths in enumerate(members):
                    if path in paths:
                        outputs[i].append(out)
            return out

        net = {**variables, "masks": layout.layer_masks(gates, base_masks)}
        with nn.intercept_methods(record):
            logits = table.model.apply(net, images, train=False)
        return cross_entropy(logits, labels).mean(), outputs

    gates = [jnp.ones((w,), jnp.float32) for w in layout.widths]
    grads, outputs = jax.grad(loss, has_aux=True)(gates)
    stats = []
    for g, (outs, grad) in enumerate(zip(outputs, grads)):
        if not outs:
            raise ValueError(f"channel_statistics: no layer of group {table.group_names[layout.groups[g]]} was "
                             f"called in the forward pass")
        flat = [o.reshape(-1, o.shape[-1]).astype(jnp.float32) for o in outs]
        mean = jnp.mean(jnp.stack([f.mean(0) for f in flat]), 0)
        std = jnp.mean(jnp.stack([f.std(0) for f in flat]), 0)
        stats.append(jnp.stack([mean, std, jnp.abs(grad)], -1))
    return stats


def standardized(stats, eps: float = 1e-6) -> list[jax.Array]:
    """Each statistic as a z-score across its group's channels (a one-channel group: 0)."""
    return [(s - s.mean(0)) / (s.std(0) + eps) for s in stats]
