"""Transformer drop-ins and the ViT zoo entry (issue 18).

* `LayerNorm`, `RMSNorm`, `Embed`, `DenseGeneral` and `MultiHeadDotProductAttention`
  have every field of the Flax layer with the same default and compute bit for bit
  what Flax computes with the same parameters;
* a norm's statistics ignore pruned channels, an attention layer's heads are pruned
  as units, an embedding's features can be pruned: masked == shrunk;
* the ViT's table (residual stream, heads and MLP groups), `shrink`, `cost.count`
  against a hand count, the criteria scoring heads and MLP neurons;
* misuse and unsupported structures give one-line errors.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxcompress import cost
from jaxcompress.layers import Dense, DenseGeneral, Embed, LayerNorm, MultiHeadDotProductAttention, RMSNorm
from jaxcompress.models import ViT, describe, get_spec
from jaxcompress.models.table import UnsupportedModelError
from jaxcompress.pruning import shrink
from jaxcompress.pruning.criteria import channel_scores, masks_from_scores, prunable_groups


def _one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


def _bitwise(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def _normal(seed, shape, dtype=jnp.float32):
    """Random inputs drawn with numpy: no XLA compile per shape."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _randomize(tree, key):
    """Every leaf random (Flax initialises biases to zero and scales to one)."""
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, [(0.5 * _normal((key, i), l.shape) + np.asarray(l, np.float32)).astype(l.dtype)
                                        for i, l in enumerate(leaves)])


def _apply(jit, module, **kwargs):
    """jit(module.apply) with static keyword arguments (one compile per call site)."""
    return jit(lambda variables, *args: module.apply(variables, *args, **kwargs))


# ----------------------------------------------------------------------------------------------
# Same fields, same defaults; unmasked == Flax, bit for bit.
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ours, ref", [(LayerNorm, nn.LayerNorm), (RMSNorm, nn.RMSNorm), (Embed, nn.Embed),
                                       (DenseGeneral, nn.DenseGeneral),
                                       (MultiHeadDotProductAttention, nn.MultiHeadDotProductAttention)])
def test_every_flax_field_with_the_same_default(ours, ref):
    assert issubclass(ours, ref)
    fields = {f.name: f for f in dataclasses.fields(ours)}
    for f in dataclasses.fields(ref):
        g = fields[f.name]
        assert g.default is f.default or g.default == f.default, f.name
        assert g.default_factory is f.default_factory, f.name
    assert set(fields) - {f.name for f in dataclasses.fields(ref)} <= {"signed_input"}


NORM_CASES = {
    "default": {},
    "no_bias_bfloat16_slow_variance": dict(use_bias=False, dtype=jnp.bfloat16, use_fast_variance=False, epsilon=1e-3),
    "no_scale_two_reduction_axes": dict(use_scale=False, reduction_axes=(-2, -1), feature_axes=-1),
}


@pytest.mark.parametrize("case", sorted(NORM_CASES))
@pytest.mark.parametrize("ours, ref", [(LayerNorm, nn.LayerNorm), (RMSNorm, nn.RMSNorm)])
def test_norm_is_bitwise_flax(ours, ref, case, zoo):
    kwargs = dict(NORM_CASES[case])
    if ref is nn.RMSNorm:
        kwargs.pop("use_bias", None)
    key = jax.random.key(0)
    x = 0.3 + _normal(0, (2, 5, 8))
    ours, ref = ours(**kwargs), ref(**kwargs)
    our_vars, ref_vars = ours.init(key, x), ref.init(key, x)
    assert our_vars["masks"]["channel"].shape == (8,)
    jax.tree.map(_bitwise, our_vars.get("params", {}), ref_vars.get("params", {}))
    params = _randomize(ref_vars.get("params", {}), 1)
    user_mask = jnp.arange(8) % 3 != 0  # Flax's own `mask` argument still works
    ours_fn, ref_fn = _apply(zoo.jit, ours), _apply(zoo.jit, ref)
    y = ref_fn({"params": params}, x)
    _bitwise(ours_fn({"params": params}, x), y)
    # all-ones masks: the statistics are a masked mean, which XLA may sum in another order over
    # several reduction axes (bit for bit over one)
    y_ones = ours_fn({"params": params, "masks": our_vars["masks"]}, x)
    if case == "no_scale_two_reduction_axes":
        np.testing.assert_allclose(np.asarray(y_ones), np.asarray(y), rtol=1e-6, atol=1e-6)
    else:
        _bitwise(y_ones, y)
    _bitwise(_apply(zoo.jit, ours, mask=user_mask)({"params": params}, x),
             _apply(zoo.jit, ref, mask=user_mask)({"params": params}, x))


@pytest.mark.parametrize("kwargs", [{}, dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)])
def test_embed_lookup_and_attend_are_bitwise_flax(kwargs):
    key = jax.random.key(0)
    ids = jnp.array([[0, 3, 6], [2, 2, 5]])
    ours, ref = Embed(7, 8, **kwargs), nn.Embed(7, 8, **kwargs)
    our_vars, ref_vars = ours.init(key, ids), ref.init(key, ids)
    jax.tree.map(_bitwise, our_vars["params"], ref_vars["params"])
    query = _normal(1, (2, 3, 8))
    for variables in ({"params": ref_vars["params"]}, our_vars):
        _bitwise(ours.apply(variables, ids), ref.apply(ref_vars, ids))
        _bitwise(ours.apply(variables, query, method="attend"), ref.apply(ref_vars, query, method="attend"))


@pytest.mark.parametrize("kwargs", [dict(features=(2, 3), axis=-1), dict(features=6, axis=(-2, -1))])
def test_dense_general_is_bitwise_flax(kwargs, zoo):
    key = jax.random.key(0)
    x = _normal(0, (2, 5, 3, 4))
    ours, ref = DenseGeneral(**kwargs), nn.DenseGeneral(**kwargs)
    our_vars, ref_vars = zoo.jit(ours.init)(key, x), zoo.jit(ref.init)(key, x)
    jax.tree.map(_bitwise, our_vars["params"], ref_vars["params"])
    assert our_vars["masks"]["channel"].shape == (np.atleast_1d(kwargs["features"])[0],)
    params = _randomize(ref_vars["params"], 1)
    _bitwise(zoo.jit(ours.apply)({"params": params, "masks": our_vars["masks"]}, x),
             zoo.jit(ref.apply)({"params": params}, x))


ATTENTION_CASES = {
    "cross_causal_mask": (dict(num_heads=4, qkv_features=8, out_features=5), True),
    "normalize_qk_bfloat16": (dict(num_heads=2, qkv_features=4, normalize_qk=True, dtype=jnp.bfloat16), False),
    "no_bias_dropout": (dict(num_heads=2, use_bias=False, dropout_rate=0.5, deterministic=False), False),
}


@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
def test_attention_is_bitwise_flax(case, zoo):
    kwargs, cross = ATTENTION_CASES[case]
    key = jax.random.key(0)
    x = _normal(0, (2, 5, 6))
    args = (x, _normal(1, (2, 5, 6))) if cross else (x,)
    kw = dict(mask=nn.make_causal_mask(jnp.ones((2, 5)))) if cross else {}
    rngs = {"dropout": jax.random.key(3)}
    ours, ref = MultiHeadDotProductAttention(**kwargs), nn.MultiHeadDotProductAttention(**kwargs)
    init = lambda m: zoo.jit(lambda *a: m.init({"params": key, **rngs}, *a, **kw))(*args)
    our_vars, ref_vars = init(ours), init(ref)
    jax.tree.map(_bitwise, our_vars["params"], ref_vars["params"])
    heads = kwargs["num_heads"]
    for k in ("query", "key", "value"):
        assert our_vars["masks"][k]["channel"].shape == (heads,)
    params = _randomize(ref_vars["params"], 2)
    ours_fn, ref_fn = _apply(zoo.jit, ours, rngs=rngs, **kw), _apply(zoo.jit, ref, rngs=rngs, **kw)
    y = ref_fn({"params": params}, *args)
    _bitwise(ours_fn({"params": params}, *args), y)
    _bitwise(ours_fn({"params": params, "masks": our_vars["masks"]}, *args), y)


# ----------------------------------------------------------------------------------------------
# Masked == shrunk, layer by layer.
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ours, ref", [(LayerNorm, nn.LayerNorm), (RMSNorm, nn.RMSNorm)])
def test_norm_statistics_ignore_pruned_channels(ours, ref, zoo):
    key = jax.random.key(0)
    x = 1.0 + _normal(0, (3, 4, 8))
    params = _randomize(ref().init(key, x)["params"], 1)
    mask = jnp.array([1, 0, 1, 1, 0, 1, 0, 1], jnp.float32)
    kept = np.flatnonzero(mask)
    ours_fn = _apply(zoo.jit, ours())
    y = ours_fn({"params": params, "masks": {"channel": mask}}, x)
    small = ref().apply({"params": jax.tree.map(lambda p: p[kept], params)}, x[..., kept])
    np.testing.assert_allclose(y[..., kept], small, rtol=1e-5, atol=1e-6)
    _bitwise(y[..., mask == 0], jnp.zeros_like(y[..., mask == 0]))  # exact zeros, not the bias
    # whatever the pruned channels hold, they do not reach the statistics
    y2 = ours_fn({"params": params, "masks": {"channel": mask}}, x.at[..., 1].set(100.0))
    np.testing.assert_allclose(y2, y, rtol=1e-6, atol=1e-6)


def test_attention_head_mask_equals_flax_without_those_heads(zoo):
    key = jax.random.key(0)
    x = _normal(0, (2, 5, 6))
    kwargs = dict(num_heads=4, qkv_features=12)
    variables = zoo.jit(MultiHeadDotProductAttention(**kwargs).init)(key, x)
    params = _randomize(variables["params"], 1)
    heads = jnp.array([1, 0, 1, 0], jnp.float32)
    masks = {**variables["masks"], **{k: {"channel": heads} for k in ("query", "key", "value")}}
    y = zoo.jit(MultiHeadDotProductAttention(**kwargs).apply)({"params": params, "masks": masks}, x)
    kept = np.flatnonzero(heads)
    small = {k: ({"kernel": p["kernel"][kept], "bias": p["bias"]} if k == "out"  # (heads, head_dim, d)
                 else {"kernel": p["kernel"][:, kept], "bias": p["bias"][kept]})  # (d, heads, head_dim)
             for k, p in params.items()}
    y_small = zoo.jit(nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=6).apply)({"params": small}, x)
    np.testing.assert_allclose(y, y_small, rtol=1e-5, atol=1e-6)


def test_embed_feature_mask_reaches_lookup_and_attend():
    key = jax.random.key(0)
    ids = jnp.array([[0, 3, 6]])
    emb = Embed(7, 8)
    variables = emb.init(key, ids)
    mask = jnp.array([1, 1, 0, 1, 0, 1, 1, 1], jnp.float32)
    masked = {**variables, "masks": {"channel": mask}}
    y = emb.apply(masked, ids)
    np.testing.assert_array_equal(y[..., mask == 0], 0.0)
    query = _normal(1, (2, 8))
    kept = np.flatnonzero(mask)
    small = nn.Embed(7, kept.size).apply({"params": {"embedding": variables["params"]["embedding"][:, kept]}},
                                         query[:, kept], method="attend")
    np.testing.assert_allclose(emb.apply(masked, query, method="attend"), small, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# The ViT: table, masked == shrunk, cost, criteria.
# ----------------------------------------------------------------------------------------------

D, HEADS, MLP, HEAD_DIM, IMG, CLASSES = 12, (3, 2), (20, 16), 4, (16, 16, 3), 10
TOKENS = (IMG[0] // 4) * (IMG[1] // 4)


@pytest.fixture(scope="module")
def vit(zoo):
    """A small ViT, random variables drawn with numpy (no op-by-op init), and a cache of
    jitted forward passes, one per model width (masks and bits are data: no recompiles)."""
    model = ViT(widths=(D,) + HEADS + MLP, num_classes=CLASSES, head_dim=HEAD_DIM)
    table = describe(model, IMG)
    x = _normal(1, (2, *IMG))
    return model, table, _numpy_variables(model, x), x, _Forward(zoo.jit)


def _numpy_variables(model, x, seed=0):
    """Variables with the shapes of `model.init`, drawn with numpy (no XLA compile):
    all-ones channel masks, scales N(1, 0.3), every other parameter N(0, 0.3)."""
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    return jax.tree_util.tree_map_with_path(
        lambda p, l: jnp.ones(l.shape) if p[0].key == "masks"
        else jnp.asarray(rng.normal(1.0 if p[-1].key == "scale" else 0.0, 0.3, l.shape), l.dtype), abstract)


class _Forward:
    def __init__(self, jit):
        self.jit, self.cache = jit, {}

    def __call__(self, model, variables, x):
        key = (model.widths, tuple(sorted(variables)))
        if key not in self.cache:
            self.cache[key] = self.jit(model.apply)
        return self.cache[key](variables, x)


def test_vit_table(vit):
    _, table, _, _, _ = vit
    assert table.group_names == ("patch_embed", "block0_attn/query", "block1_attn/query", "block0_fc1",
                                 "block1_fc1")
    # the residual stream: patch embedding, position embedding, attention outputs, MLP outputs, every norm
    assert {p[0] if len(p) == 2 else "/".join(p[:-1]) for p in table.mask_paths(0)} == {
        "patch_embed", "pos_embed", "final_ln", "block0_attn/out", "block1_attn/out"} | {
        f"block{i}_{k}" for i in range(2) for k in ("ln1", "ln2", "fc2")}
    # heads: query, key and value of one block, tied
    assert {"/".join(p[:-1]) for p in table.mask_paths(1)} == {f"block0_attn/{k}" for k in ("query", "key", "value")}
    assert {"/".join(p[:-1]) for p in table.mask_paths(4)} == {"block1_fc1"}
    assert [(a.path, a.heads_group, a.head_dim, a.q_rows, a.kv_len) for a in table.attention] == [
        ("block0_attn", 1, HEAD_DIM, TOKENS, TOKENS), ("block1_attn", 2, HEAD_DIM, TOKENS, TOKENS)]
    assert prunable_groups(table, "inner") == [1, 2, 3, 4]  # heads and MLP neurons; the stream needs 'all'
    assert prunable_groups(table, "all") == [0, 1, 2, 3, 4]
    assert table.norm_groups == () and len(table.norms) == 5 and table.embeddings == (("pos_embed", 0),)


def _hand_count(d, heads, mlp, hd=HEAD_DIM, tokens=TOKENS, patch=4, channels=3, classes=CLASSES):
    params = patch * patch * channels * d + d + tokens * d + 2 * d + d * classes + classes
    macs = tokens * patch * patch * channels * d + d * classes
    for h, m in zip(heads, mlp):
        params += 2 * 2 * d                                   # two LayerNorms
        params += 3 * (d * h * hd + h * hd) + h * hd * d + d  # query, key, value, out
        params += d * m + m + m * d + d                       # MLP
        macs += tokens * (3 * d * h * hd + h * hd * d)        # projections
        macs += 2 * h * tokens * tokens * hd                  # q.k scores and weighted values
        macs += tokens * 2 * d * m
    return params, macs


def test_vit_cost_count_by_hand(vit):
    _, table, variables, _, _ = vit
    params, macs = _hand_count(D, HEADS, MLP)
    assert params == sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
    counted = cost.count(table)
    assert float(counted["params"]) == params and float(counted["macs"]) == macs
    assert float(counted["flops"]) == 2 * macs
    smaller = (7, 1, 2, 9, 5)
    counted = jax.jit(lambda w: cost.count(table, w))(jnp.asarray(smaller, jnp.float32))
    assert (float(counted["params"]), float(counted["macs"])) == _hand_count(7, (1, 2), (9, 5))
    summary = cost.summarize(table)
    assert summary["totals"]["params"] == params and summary["totals"]["macs"] == macs


def test_zoo_vit_cost_by_hand(zoo):
    table = zoo.table("vit")
    assert get_spec("vit").input_shape == (32, 32, 3)
    d, depth = table.widths[0], (len(table.widths) - 1) // 2
    assert table.widths == (128,) + (4,) * 6 + (512,) * 6 and depth == 6
    params, macs = _hand_count(d, table.widths[1:1 + depth], table.widths[1 + depth:], hd=32, tokens=64)
    counted = cost.count(table)
    assert float(counted["params"]) == params and float(counted["macs"]) == macs


def _random_group_masks(table, seed):
    """About half of every group, at least one channel kept and one pruned."""
    rng = np.random.default_rng(seed)
    masks = []
    for w in table.widths:
        m = rng.random(w) < 0.5
        keep = rng.integers(w)
        m[keep], m[(keep + 1 + rng.integers(w - 1)) % w] = True, False
        masks.append(jnp.asarray(m, jnp.float32))
    return masks


def test_vit_masked_equals_shrunk(vit):
    """Random masks on every group: the residual stream, the heads and the MLP neurons."""
    model, table, variables, x, forward = vit
    gms = _random_group_masks(table, seed=3)
    assert all(0 < g.sum() < g.size for g in gms)
    masks = table.layer_masks(gms, variables["masks"])
    masked = {**variables, "masks": masks}
    small_model, small_vars = shrink(table, masked)
    kept = [int(g.sum()) for g in gms]
    assert small_model.widths == tuple(kept)
    att = small_vars["params"]["block0_attn"]
    assert att["query"]["kernel"].shape == (kept[0], kept[1], HEAD_DIM)  # whole heads removed
    assert att["out"]["kernel"].shape == (kept[1], HEAD_DIM, kept[0])
    y = forward(model, masked, x)
    y_small = forward(small_model, small_vars, x)
    np.testing.assert_allclose(y, y_small, rtol=1e-5, atol=1e-5)
    assert np.abs(y - forward(model, variables, x)).max() > 1e-3  # the masks did something
    # the cost of the masked network is the cost of the shrunk one
    small_params = sum(leaf.size for leaf in jax.tree.leaves(small_vars["params"]))
    assert float(cost.count(table, kept)["params"]) == small_params
    assert float(cost.count(describe(small_model, IMG))["macs"]) == float(cost.count(table, kept)["macs"])


def test_vit_masked_equals_shrunk_with_fake_quantization(vit):
    """Random masks on the heads and MLP neurons (scope 'inner'), 4-bit weights, 8-bit inputs."""
    model, table, variables, x, forward = vit
    gms = _random_group_masks(table, seed=7)
    gms[0] = jnp.ones(D)
    masks = table.layer_masks(gms, variables["masks"])
    quant = {}
    for layer in table.layers:
        node = quant
        for k in layer.path.split("/"):
            node = node.setdefault(k, {})
        node.update(bits_w=jnp.float32(4.0), bits_a=jnp.float32(8.0))
    masked = {**variables, "masks": masks, "quant": quant}
    small_model, small_vars = shrink(table, masked)
    assert small_vars["quant"]["block0_attn"]["query"]["range_w"].shape == (int(gms[1].sum()), HEAD_DIM)
    y, y_small = forward(model, masked, x), forward(small_model, small_vars, x)
    np.testing.assert_allclose(y, y_small, rtol=1e-4, atol=1e-4)
    assert np.abs(y - forward(model, {**variables, "masks": masks}, x)).max() > 1e-4  # quantization is on


def test_vit_criteria_score_heads_and_mlp_neurons(vit):
    model, table, variables, x, forward = vit
    flat = traverse_util.flatten_dict(variables["params"])
    l1 = channel_scores(table, variables, "l1")
    l2 = channel_scores(table, variables, "l2")
    assert [s.shape for s in l1] == [s.shape for s in l2] == [(w,) for w in table.widths]
    # a head's score sums its query, key and value kernel slices (d, head_dim)
    qkv = [np.asarray(flat[("block0_attn", k, "kernel")]) for k in ("query", "key", "value")]
    np.testing.assert_allclose(l1[1], sum(np.abs(k).sum(axis=(0, 2)) for k in qkv), rtol=1e-5)
    np.testing.assert_allclose(l2[1], sum(np.sqrt((k ** 2).sum(axis=(0, 2))) for k in qkv), rtol=1e-5)
    np.testing.assert_allclose(l1[4], np.abs(np.asarray(flat[("block1_fc1", "kernel")])).sum(0), rtol=1e-5)
    # prune about half the heads and MLP neurons: shrink gives the masked network
    counts = [D, 2, 1, 10, 8]
    masks = table.layer_masks(masks_from_scores(l2, counts), variables["masks"])
    small_model, small_vars = shrink(table, {**variables, "masks": masks})
    assert small_model.widths == tuple(counts)
    np.testing.assert_allclose(forward(model, {**variables, "masks": masks}, x), forward(small_model, small_vars, x),
                               rtol=1e-5, atol=1e-5)


def test_snip_scores_heads_and_mlp_neurons():
    """SNIP (|g * w| summed per output channel) on a one-block ViT (compiling a gradient is slow)."""
    model = ViT(widths=(8, 2, 6), num_classes=3, head_dim=2)
    table = describe(model, (8, 8, 3))
    x = _normal(0, (2, 8, 8, 3))
    variables = _numpy_variables(model, x)
    snip = channel_scores(table, variables, "snip", batch=(x, jnp.array([1, 2])))
    assert [s.shape for s in snip] == [(8,), (2,), (6,)]
    assert all(np.all(s >= 0) and np.any(s > 0) for s in snip)
    masks = table.layer_masks(masks_from_scores(snip, [8, 1, 3]), variables["masks"])
    assert shrink(table, {**variables, "masks": masks})[0].widths == (8, 1, 3)


def test_vit_wrong_group_masks_are_one_line_errors(vit):
    _, table, variables, _, _ = vit
    good = [jnp.ones(w) for w in table.widths]
    with pytest.raises(ValueError) as excinfo:
        table.layer_masks(good[:-1], variables["masks"])
    assert "got 4 group masks for 5 channel groups" in _one_line(excinfo)
    with pytest.raises(ValueError) as excinfo:
        table.layer_masks(good[:1] + [jnp.ones(HEAD_DIM * HEADS[0])] + good[2:], variables["masks"])
    assert _one_line(excinfo).startswith(f"group 1 (block0_attn/query): mask shape ({HEAD_DIM * HEADS[0]},) "
                                         f"!= ({HEADS[0]},)")
    heads = jnp.array([1.0, 0.0, 1.0])
    masks = traverse_util.flatten_dict(table.layer_masks(good, variables["masks"]))
    masks[("block0_attn", "key", "channel")] = heads  # key pruned, query and value not
    with pytest.raises(ValueError) as excinfo:
        shrink(table, {**variables, "masks": traverse_util.unflatten_dict(masks)})
    assert "channel group 1 (block0_attn/query) is pruned inconsistently" in _one_line(excinfo)


# ----------------------------------------------------------------------------------------------
# What describe cannot prove correct, it refuses in one line.
# ----------------------------------------------------------------------------------------------

class Block(nn.Module):
    """A pre-norm transformer block over a residual stream of width widths[0]."""

    widths: tuple = (8, 2, 16)
    variant: str = "ok"

    @nn.compact
    def __call__(self, x, train: bool = False):
        d, h, m = self.widths
        x = Dense(d, name="embed")(x.reshape(x.shape[0], -1, x.shape[-1]))
        norm = nn.LayerNorm if self.variant == "plain_norm" else LayerNorm
        y = norm(name="ln")(x)
        if self.variant == "plain_attention":
            y = nn.MultiHeadDotProductAttention(num_heads=h, qkv_features=4 * h, name="attn")(y)
        elif self.variant == "derived_head_dim":  # a fixed number of heads, head_dim = w / 2
            y = MultiHeadDotProductAttention(num_heads=2, qkv_features=2 * m, name="attn")(y)
        else:
            y = MultiHeadDotProductAttention(num_heads=h, qkv_features=4 * h, name="attn")(y)
        x = x + y
        hidden = 4 * d if self.variant == "derived_mlp" else m
        if self.variant == "norm_over_tokens":
            x = LayerNorm(reduction_axes=(-2, -1), feature_axes=-2, name="ln_tokens")(x)
        x = x + Dense(d, name="fc2")(nn.gelu(Dense(hidden, name="fc1")(LayerNorm(name="ln2")(x))))
        if self.variant == "plain_embed":
            x = x + nn.Embed(x.shape[1], d, name="pos")(jnp.arange(x.shape[1]))
        return Dense(3, name="head")(x.mean(1))


@pytest.mark.parametrize("variant, expected", [
    ("plain_norm", "layer 'ln': a plain flax.linen.LayerNorm over a channel group"),
    ("plain_attention", "layer 'attn': a plain flax.linen.MultiHeadDotProductAttention over a channel group"),
    ("plain_embed", "layer 'pos': a plain flax.linen.Embed over a channel group"),
    ("derived_mlp", "layer 'fc1': its output size is 4 x widths[0] (embed), a derived width"),
    ("derived_head_dim", "layer 'attn/query': its output feature axis 1 ("),
    ("norm_over_tokens", "layer 'ln_tokens': it normalises over channel group 0 (embed, input axis 2), which is "
                         "not one of its feature_axes"),
])
def test_unsupported_transformer_structures_are_refused(variant, expected):
    with pytest.raises(UnsupportedModelError) as excinfo:
        describe(Block(variant=variant), (4, 4, 3))
    assert expected in _one_line(excinfo)


def test_supported_block_describes():
    table = describe(Block(), (4, 4, 3))
    assert table.group_names == ("embed", "attn/query", "fc1")
    assert prunable_groups(table, "inner") == [1, 2]


class TiedEmbedding(nn.Module):
    """Tokens -> Embed (features: a channel group) -> LayerNorm -> tied output (`attend`)."""

    widths: tuple = (6,)
    vocab: int = 11

    @nn.compact
    def __call__(self, x, train: bool = False):
        ids = (jnp.abs(x[..., 0]) * 7).astype(jnp.int32) % self.vocab  # describe probes with float images
        embed = Embed(self.vocab, self.widths[0], name="embed")
        return embed.attend(LayerNorm(name="ln")(embed(ids.reshape(ids.shape[0], -1))))


def test_embedding_group_and_tied_attend(zoo):
    model = TiedEmbedding()
    table = describe(model, (2, 3, 1))
    assert table.embeddings == (("embed", 0),) and table.layers == ()
    tokens, d, vocab = 6, 6, 11
    counted = cost.count(table)
    assert float(counted["params"]) == vocab * d + 2 * d
    assert float(counted["macs"]) == tokens * d * vocab  # attend: logits = h @ embedding.T
    assert float(cost.count(table, [4])["macs"]) == tokens * 4 * vocab
    x = _normal(0, (2, 2, 3, 1))
    variables = _numpy_variables(model, x)
    masks = table.layer_masks([jnp.array([1, 0, 1, 1, 0, 1], jnp.float32)], variables["masks"])
    small_model, small_vars = shrink(table, {**variables, "masks": masks})
    assert small_model.widths == (4,) and small_vars["params"]["embed"]["embedding"].shape == (vocab, 4)
    np.testing.assert_allclose(zoo.jit(model.apply)({**variables, "masks": masks}, x),
                               zoo.jit(small_model.apply)(small_vars, x), rtol=1e-5, atol=1e-5)


def test_vit_element_masks_are_counted_on_the_kept_heads(vit):
    """Element masks on a ViT with heads and MLP neurons pruned: `cost.summarize` counts
    exactly the mask's ones inside the kept channels (3-D attention kernels included)."""
    from jaxcompress.pruning.criteria import element_masks
    _, table, variables, _, _ = vit
    gms = _random_group_masks(table, seed=5)
    masks = element_masks(table, variables, 0.5, table.layer_masks(gms, variables["masks"]))
    report = cost.summarize(table, masks)
    flat = traverse_util.flatten_dict(masks)
    for row, layer in zip(report["layers"], table.layers):
        inside = np.asarray(flat[tuple(layer.path.split("/")) + ("kernel",)]) * table.kernel_keep(layer, gms)
        assert row["nonzero_weights"] == int(inside.sum()), layer.path
