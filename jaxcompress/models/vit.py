"""Vision Transformer (Dosovitskiy et al. 2021) sized for CIFAR-10: 32x32 images in
4x4 patches (64 tokens), pre-norm blocks, mean pooling over the tokens.

Built only from jaxcompress's drop-ins, as a function of its widths:

    widths = (dim, heads_0 .. heads_{depth-1}, mlp_0 .. mlp_{depth-1})

* `dim`, the residual stream: the patch embedding, the position embedding, every
  attention output and MLP output add into it, and every LayerNorm normalises over
  it (its statistics ignore pruned channels). Prune it with scope 'all' only, like
  every residual stream.
* `heads_i`: block i's attention heads, pruned as units (`head_dim` is fixed, so
  `qkv_features = heads_i * head_dim`).
* `mlp_i`: block i's MLP hidden neurons. The usual `4 * dim` is a *derived* width,
  which `describe` cannot prune exactly; here every hidden width is its own entry
  (default 4 x dim), so it is a channel group of its own.

No dropout or class token (mean pooling), so train and test mode compute the same.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxcompress.layers import Conv, Dense, Embed, LayerNorm, MultiHeadDotProductAttention


def default_widths(dim: int = 128, depth: int = 6, heads: int = 4, mlp_ratio: int = 4) -> tuple[int, ...]:
    return (dim,) + (heads,) * depth + (mlp_ratio * dim,) * depth


class ViT(nn.Module):
    """Pre-norm ViT: patchify conv -> + position embedding -> depth x [x + attn(LN(x)),
    x + MLP(LN(x))] -> LN -> mean over tokens -> Dense(num_classes)."""

    widths: tuple[int, ...] = default_widths()
    num_classes: int = 10
    patch_size: int = 4
    head_dim: int = 32

    @property
    def depth(self) -> int:
        return (len(self.widths) - 1) // 2

    @nn.compact
    def __call__(self, x, train: bool = False):
        if len(self.widths) % 2 != 1 or len(self.widths) < 3:
            raise ValueError(f"ViT widths are (dim, heads x depth, mlp x depth): an odd number >= 3 of entries, "
                             f"got {len(self.widths)}")
        dim, depth = self.widths[0], self.depth
        heads, mlp = self.widths[1:1 + depth], self.widths[1 + depth:]
        p = self.patch_size
        x = Conv(dim, (p, p), strides=p, padding="VALID", signed_input=True, name="patch_embed")(x)
        x = x.reshape(x.shape[0], -1, dim)  # (batch, tokens, dim)
        tokens = x.shape[1]
        x = x + Embed(tokens, dim, embedding_init=nn.initializers.normal(0.02), name="pos_embed")(
            jnp.arange(tokens))
        for i in range(depth):
            y = LayerNorm(name=f"block{i}_ln1")(x)
            y = MultiHeadDotProductAttention(num_heads=heads[i], qkv_features=heads[i] * self.head_dim,
                                             out_features=dim, name=f"block{i}_attn")(y)
            x = x + y
            y = LayerNorm(name=f"block{i}_ln2")(x)
            y = nn.gelu(Dense(mlp[i], signed_input=True, name=f"block{i}_fc1")(y))
            y = Dense(dim, signed_input=True, name=f"block{i}_fc2")(y)  # gelu dips below zero
            x = x + y
        x = LayerNorm(name="final_ln")(x)
        return Dense(self.num_classes, signed_input=True, name="head")(x.mean(axis=1))
