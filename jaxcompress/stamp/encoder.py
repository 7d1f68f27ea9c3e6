"""Permutation-invariant set encoder: a sampled dataset -> one task embedding.

STAMP (Song et al., arXiv:2006.12139) encodes a sample of (image, label) pairs of
a dataset into one vector that conditions the mask generator. We follow the two
set-function families its reference list points to:

* Deep Sets (Zaheer et al. 2017, arXiv:1703.06114): rho(mean_i phi(x_i, y_i));
  mean pooling is invariant to the order *and* (for repeated samples) the size
  of the set;
* Set Transformer (Lee et al. 2019): pooling by multi-head attention, PMA,
  MAB(S, rFF(H)) with a learned seed S, MAB(X, Y) = LN(H + rFF(H)),
  H = LN(X + MultiHead(X, Y, Y)) (Layer Norm: Ba et al. 2016).

Per-instance features (`phi`'s input) are either vectors precomputed by the frozen
pretrained network's early layers (`pretrained_features`, our default; the
network's own view of the data) or raw images through a small conv stem learned
with the encoder (`instance="stem"`). The label enters as a learned embedding, so
the encoder sees which instances share a class.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcompress.layers import BatchNorm, Conv


class ConvStem(nn.Module):
    """Small conv stem for `instance="stem"`: two strided 3x3 convs, global mean."""

    features: int = 32

    @nn.compact
    def __call__(self, x):
        for i, f in enumerate((self.features // 2, self.features)):
            x = nn.relu(nn.Conv(f, (3, 3), strides=2, name=f"conv{i}")(x))
        return x.mean(axis=(-3, -2))


class PMA(nn.Module):
    """Pooling by multi-head attention with `num_seeds` learned seeds (Set Transformer)."""

    dim: int
    num_heads: int = 4
    num_seeds: int = 1

    @nn.compact
    def __call__(self, h, valid=None):
        seeds = self.param("seeds", nn.initializers.normal(0.1), (self.num_seeds, self.dim))
        seeds = jnp.broadcast_to(seeds, h.shape[:-2] + seeds.shape)
        z = nn.Dense(self.dim, name="rff_in")(h)
        mask = None if valid is None else valid[..., None, None, :]
        att = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, qkv_features=self.dim,
                                              out_features=self.dim, name="mha")(seeds, z, mask=mask)
        x = nn.LayerNorm(name="ln0")(seeds + att)
        x = nn.LayerNorm(name="ln1")(x + nn.Dense(self.dim, name="rff_out")(nn.relu(nn.Dense(self.dim)(x))))
        return x.reshape(*x.shape[:-2], self.num_seeds * self.dim)


class SetEncoder(nn.Module):
    """Embeds a set {(x_i, y_i)} (leading axis = set) into a `dim` vector.

    `inputs`: (N, D) features or (N, H, W, C) images (then a `ConvStem` is used);
    `labels`: (N,) ints below `num_labels`; `valid` (N,) bool marks real members of
    a padded set. `pooling`: "pma" (attention) or "mean" (Deep Sets).
    """

    dim: int = 64
    num_labels: int = 10
    pooling: str = "pma"
    num_heads: int = 4
    stem_features: int = 32

    @nn.compact
    def __call__(self, inputs, labels, valid=None):
        if inputs.ndim >= 4:
            inputs = ConvStem(self.stem_features, name="stem")(inputs)
        h = jnp.concatenate([inputs, nn.Embed(self.num_labels, self.dim, name="label_embed")(labels)], -1)
        h = nn.relu(nn.Dense(self.dim, name="phi0")(h))
        h = nn.Dense(self.dim, name="phi1")(h)
        if self.pooling == "mean":
            w = jnp.ones(h.shape[:-1]) if valid is None else valid.astype(h.dtype)
            pooled = (h * w[..., None]).sum(-2) / jnp.maximum(w.sum(-1, keepdims=True), 1.0)
        elif self.pooling == "pma":
            pooled = PMA(self.dim, self.num_heads, name="pma")(h, valid)
        else:
            raise ValueError(f"unknown set pooling '{self.pooling}'; choose pma or mean")
        return nn.Dense(self.dim, name="rho")(nn.relu(pooled))


def pretrained_features(model, variables, images, num_convs: int = 2):
    """Per-instance features from the first `num_convs` conv layers of a frozen network.

    Runs `model` (inference mode, no gradient to its variables) and takes the output
    of the last Conv or BatchNorm called before the (`num_convs` + 1)-th conv, then
    ReLU and global average pooling: (N, H, W, C) normalised images -> (N, channels).
    """
    outputs: list[tuple[str, jax.Array]] = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and isinstance(context.module, (Conv, BatchNorm)):
            outputs.append(("conv" if isinstance(context.module, Conv) else "bn", out))
        return out

    variables = jax.lax.stop_gradient({k: v for k, v in variables.items() if k != "quant"})
    with nn.intercept_methods(record):
        model.apply(variables, images, train=False)
    convs = [i for i, (kind, _) in enumerate(outputs) if kind == "conv"]
    if not convs:
        raise ValueError("pretrained_features needs a network with conv layers; use instance='stem'")
    k = min(max(1, num_convs), len(convs))
    stop = convs[k] if k < len(convs) else len(outputs)
    feat = outputs[stop - 1][1]
    return nn.relu(feat).mean(axis=(1, 2))
