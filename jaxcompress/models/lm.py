"""A small decoder-only language model (GPT-style, pre-norm, RMSNorm) over byte tokens.

Built only from jaxcompress's drop-ins, as a function of its widths, like the ViT
(`jaxcompress.models.vit`):

    widths = (dim, heads_0 .. heads_{depth-1}, mlp_0 .. mlp_{depth-1})

* `dim`, the residual stream: the token and position embeddings, every attention
  output and MLP output add into it, every RMSNorm normalises over it (its mean
  square ignores pruned channels), and the tied output layer (`Embed.attend`,
  logits = h @ embedding.T) reads it. Prune it with scope 'all' only.
* `heads_i`: block i's causal self-attention heads, pruned as units (`head_dim`
  is fixed, `qkv_features = heads_i * head_dim`).
* `mlp_i`: block i's MLP hidden neurons, their own entry (default 4 x dim).

Input: integer token ids of shape (batch, tokens), tokens <= `seq_len`; output:
logits (batch, tokens, vocab_size), position t computed from tokens 0..t only.
No dropout, so train and test mode compute the same.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxcompress.layers import Dense, Embed, MultiHeadDotProductAttention, RMSNorm

VOCAB_SIZE, SEQ_LEN = 256, 128  # bytes; the registry's default context


def default_widths(dim: int = 128, depth: int = 4, heads: int = 4, mlp_ratio: int = 4) -> tuple[int, ...]:
    return (dim,) + (heads,) * depth + (mlp_ratio * dim,) * depth


class DecoderLM(nn.Module):
    """Token + position embedding -> depth x [x + attn(RMSNorm(x), causal),
    x + MLP(RMSNorm(x))] -> RMSNorm -> tied output layer (the token embedding's `attend`)."""

    widths: tuple[int, ...] = default_widths()
    vocab_size: int = VOCAB_SIZE
    seq_len: int = SEQ_LEN
    head_dim: int = 32

    @property
    def depth(self) -> int:
        return (len(self.widths) - 1) // 2

    @nn.compact
    def __call__(self, tokens, train: bool = False):
        if len(self.widths) % 2 != 1 or len(self.widths) < 3:
            raise ValueError(f"DecoderLM widths are (dim, heads x depth, mlp x depth): an odd number >= 3 of "
                             f"entries, got {len(self.widths)}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer) or tokens.ndim != 2 or tokens.shape[1] > self.seq_len:
            raise ValueError(f"DecoderLM takes integer token ids of shape (batch, tokens <= {self.seq_len}), "
                             f"got {tokens.dtype} of shape {tokens.shape}")
        dim, depth = self.widths[0], self.depth
        heads, mlp = self.widths[1:1 + depth], self.widths[1 + depth:]
        embed = Embed(self.vocab_size, dim, embedding_init=nn.initializers.normal(0.02), name="tok_embed")
        x = embed(tokens) + Embed(self.seq_len, dim, embedding_init=nn.initializers.normal(0.02),
                                  name="pos_embed")(jnp.arange(tokens.shape[1]))
        causal = nn.make_causal_mask(tokens)  # (batch, 1, tokens, tokens)
        for i in range(depth):
            y = RMSNorm(name=f"block{i}_norm1")(x)
            y = MultiHeadDotProductAttention(num_heads=heads[i], qkv_features=heads[i] * self.head_dim,
                                             out_features=dim, name=f"block{i}_attn")(y, mask=causal)
            x = x + y
            y = RMSNorm(name=f"block{i}_norm2")(x)
            y = nn.gelu(Dense(mlp[i], signed_input=True, name=f"block{i}_fc1")(y))
            x = x + Dense(dim, signed_input=True, name=f"block{i}_fc2")(y)  # gelu dips below zero
        return embed.attend(RMSNorm(name="final_norm")(x))
