"""Tests for jaxcompress.pruning.surgery: the shrunk network equals the masked one.

Every CIFAR/MNIST-size zoo model (and ResNet-18 on 64x64 inputs) is pruned with random
consistent group masks, with non-trivial BatchNorm statistics and biases (see the
`zoo.variables` fixture), and physically shrunk.
"""
import types
import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from jaxcompress import cost
from jaxcompress.models import describe
from jaxcompress.pruning import kept_indices, shrink

SURGERY_MODELS = [
    ("lenet5", None), ("lenet300_100", None), ("cnn4", None), ("vgg11", None), ("vgg16", None), ("resnet20", None),
    ("resnet56", None), ("mobilenet_v1_cifar", None), ("mobilenet_v2_cifar", None),
    ("resnet18", (64, 64, 3)),
]


def _random_group_masks(table, seed, keep=0.5):
    """Keep each channel with probability `keep`, at least one per group."""
    rng = np.random.default_rng(seed)
    out = []
    for w in table.widths:
        m = rng.random(w) < keep
        if not m.any():
            m[rng.integers(w)] = True
        out.append(jnp.asarray(m, jnp.float32))
    return out


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(a).max()


def _n_params(tree):
    return sum(int(np.prod(l.shape)) for l in jax.tree.leaves(tree))


_PRUNED = {}


def _prune(zoo, name, shape=None):
    """Random group masks, masked and shrunk network and their outputs; cached per model."""
    if (name, shape) not in _PRUNED:
        table, variables = zoo.table(name, shape), zoo.variables(name, shape)
        group_masks = _random_group_masks(table, seed=zlib.crc32(name.encode()))
        masks = table.layer_masks(group_masks, variables["masks"])
        masked_vars = {**variables, "masks": masks}
        x = jax.random.normal(jax.random.key(1), (2, *zoo.input_shape(name, shape)))
        forward = zoo.forward(name, shape)  # one compilation for the dense and the masked net
        small_model, small_vars = shrink(table, masked_vars)
        small_forward = zoo.jit(lambda v, x: small_model.apply(v, x, train=False))
        _PRUNED[name, shape] = types.SimpleNamespace(
            name=name, table=table, variables=variables, group_masks=group_masks, masks=masks,
            masked_vars=masked_vars, x=x, y_dense=forward(variables, x), y_masked=forward(masked_vars, x),
            small_model=small_model, small_vars=small_vars, small_forward=small_forward,
            y_small=small_forward(small_vars, x))
    return _PRUNED[name, shape]


@pytest.fixture(params=SURGERY_MODELS, ids=[n if s is None else f"{n}_{s[0]}px" for n, s in SURGERY_MODELS])
def pruned(request, zoo):
    return _prune(zoo, *request.param)


def test_shrunk_outputs_equal_masked_outputs(pruned):
    chex.assert_shape(pruned.y_small, pruned.y_masked.shape)
    assert _rel_err(pruned.y_masked, pruned.y_small) < 1e-5
    assert _rel_err(pruned.y_dense, pruned.y_masked) > 1e-3  # pruning really changed the network


def test_shrunk_widths_are_mask_sums(pruned):
    expected = tuple(int(np.sum(m)) for m in pruned.group_masks)
    assert pruned.small_model.widths == expected
    assert all(0 < w_new <= w for w_new, w in zip(expected, pruned.table.widths))
    assert type(pruned.small_model) is type(pruned.table.model)


def test_shrunk_parameter_count_equals_cost_summary(pruned):
    n = _n_params(pruned.small_vars["params"])
    assert n == cost.summarize(pruned.table, pruned.masks)["totals"]["params"]
    assert n < _n_params(pruned.variables["params"])


def test_shrunk_variables_have_the_small_models_shapes(pruned):
    """The reference is the smaller model's own (abstract) init."""
    x = jnp.zeros((1, *pruned.table.input_shape))
    expected = jax.eval_shape(lambda: pruned.small_model.init(jax.random.key(0), x, train=False))
    assert set(pruned.small_vars) == set(expected)
    chex.assert_trees_all_equal_shapes(pruned.small_vars, expected)
    # channel masks of the shrunk network are all ones
    for leaf in jax.tree.leaves(pruned.small_vars["masks"]):
        np.testing.assert_array_equal(leaf, 1.0)


def test_shrunk_leaves_are_gathered_kept_slices(pruned):
    """Spot-check the first layer with a kept-channel output by hand."""
    table, kept = pruned.table, [np.flatnonzero(np.asarray(m)) for m in pruned.group_masks]
    first = table.layers[0]
    key = tuple(first.path.split("/"))
    old = np.asarray(traverse_util.flatten_dict(pruned.variables["params"])[key + ("kernel",)])
    new = np.asarray(traverse_util.flatten_dict(pruned.small_vars["params"])[key + ("kernel",)])
    np.testing.assert_array_equal(new, old[..., kept[first.out_group]])
    for path, g in table.norm_groups[:3]:
        bkey = tuple(path.split("/"))
        for col, leaf in (("batch_stats", "mean"), ("batch_stats", "var"), ("params", "scale")):
            old = traverse_util.flatten_dict(pruned.variables[col])[bkey + (leaf,)]
            new = traverse_util.flatten_dict(pruned.small_vars[col])[bkey + (leaf,)]
            np.testing.assert_array_equal(new, np.asarray(old)[kept[g]])


@pytest.mark.parametrize("name", ["lenet5", "resnet20"])
def test_orbax_round_trip_of_shrunk_variables(name, zoo, tmp_path):
    p = _prune(zoo, name)
    ckptr = ocp.StandardCheckpointer()
    path = tmp_path / "shrunk"
    ckptr.save(path, p.small_vars)
    ckptr.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, p.small_vars)
    restored = ckptr.restore(path, abstract)
    ckptr.close()

    chex.assert_trees_all_equal(restored, p.small_vars)
    chex.assert_trees_all_equal_dtypes(restored, p.small_vars)
    chex.assert_trees_all_equal(p.small_forward(restored, p.x), p.y_small)
    # a plain dense network: runs without the masks collection, same outputs as the masked one
    plain = {k: v for k, v in restored.items() if k in ("params", "batch_stats")}
    y_plain = zoo.jit(lambda v, x: p.small_model.apply(v, x, train=False))(plain, p.x)
    assert _rel_err(p.y_masked, y_plain) < 1e-5


# ----------------------------------------------------------------------------------------------
# Element masks, errors, quantization.
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, layers", [
    ("lenet5", ("conv2", "fc1", "fc3")),
    ("mobilenet_v1_cifar", ("block3_dw_conv", "block3_pw_conv", "classifier")),
])
def test_element_masks_survive_as_gathered_zeros(name, layers, zoo):
    table, variables = zoo.table(name), zoo.variables(name)
    group_masks = _random_group_masks(table, seed=5)
    kept = [np.flatnonzero(np.asarray(m)) for m in group_masks]
    masks = table.layer_masks(group_masks, variables["masks"])
    rng = np.random.default_rng(6)
    rows = {l.path: l for l in table.layers}
    element = {}
    for path in layers:
        shape = variables["params"][path]["kernel"].shape
        element[path] = (rng.random(shape) < 0.5).astype(np.float32)
        masks[path] = {**masks[path], "kernel": jnp.asarray(element[path])}
    masked_vars = {**variables, "masks": masks}
    small_model, small_vars = shrink(table, masked_vars)

    for path in layers:
        layer, km = rows[path], element[path]
        if layer.in_group >= 0 and not layer.depthwise:  # NHWC flatten: row = position * C + channel
            w_in = table.widths[layer.in_group]
            rows_kept = (np.arange(layer.in_repeat)[:, None] * w_in + kept[layer.in_group][None]).reshape(-1)
            km = np.take(km, rows_kept, axis=-2)
        if layer.out_group >= 0:
            km = km[..., kept[layer.out_group]]
        new_km = np.asarray(small_vars["masks"][path]["kernel"])
        np.testing.assert_array_equal(new_km, km)
        assert new_km.shape == small_vars["params"][path]["kernel"].shape
        assert (new_km == 0).sum() > 0

    x = jax.random.normal(jax.random.key(3), (2, *zoo.input_shape(name)))
    y_masked = zoo.forward(name)(masked_vars, x)
    y_small = zoo.jit(lambda v, x: small_model.apply(v, x, train=False))(small_vars, x)
    assert _rel_err(y_masked, y_small) < 1e-5
    # sparsity is preserved: the shrunk table counts the same nonzero weights
    before = cost.summarize(table, masks)["totals"]
    after = cost.summarize(describe(small_model, table.input_shape), small_vars["masks"])["totals"]
    assert after["nonzero_params"] == before["nonzero_params"] < before["params"] == after["params"]


@pytest.mark.parametrize("name, group, group_name", [("lenet5", 1, "conv2"), ("resnet20", 0, "stem_conv"),
                                                      ("resnet20", 4, "stage1_block1_a_conv")])
def test_shrink_rejects_an_empty_group(name, group, group_name, zoo):
    table, variables = zoo.table(name), zoo.variables(name)
    group_masks = _random_group_masks(table, seed=0)
    group_masks[group] = jnp.zeros_like(group_masks[group])
    masks = table.layer_masks(group_masks, variables["masks"])
    with pytest.raises(ValueError, match=f"channel group {group} \\({group_name}\\)"):
        shrink(table, {**variables, "masks": masks})
    with pytest.raises(ValueError, match="at least one channel"):
        kept_indices(table, masks)


def test_shrink_rejects_inconsistent_masks(zoo):
    table, variables = zoo.table("resnet20"), zoo.variables("resnet20")
    masks = table.layer_masks(_random_group_masks(table, seed=0), variables["masks"])
    masks["stage2_block1_b_conv"] = {"channel": 1.0 - masks["stage2_block1_b_conv"]["channel"]}
    with pytest.raises(ValueError, match="channel group 1 \\(stage2_block0_b_conv\\).*stage2_block1_b_conv"):
        shrink(table, {**variables, "masks": masks})


def test_shrink_without_masks_is_identity(zoo):
    table, variables = zoo.table("lenet5"), zoo.variables("lenet5")
    plain = {"params": variables["params"]}
    model, out = shrink(table, plain)
    assert model is table.model
    chex.assert_trees_all_equal(out, plain)


def test_kept_indices(zoo):
    table, variables = zoo.table("lenet5"), zoo.variables("lenet5")
    gms = [jnp.zeros(w).at[jnp.array([0, w - 1])].set(1.0) for w in table.widths]
    kept = kept_indices(table, table.layer_masks(gms, variables["masks"]))
    for k, w in zip(kept, table.widths):
        np.testing.assert_array_equal(k, [0, w - 1])


def test_shrunk_equals_masked_with_weight_quantization(zoo):
    table, variables = zoo.table("lenet5"), zoo.variables("lenet5")
    masks = table.layer_masks(_random_group_masks(table, seed=8), variables["masks"])
    quant = {l.path: {"bits_w": jnp.float32(4.0)} for l in table.layers}
    masked_vars = {**variables, "masks": masks, "quant": quant}
    small_model, small_vars = shrink(table, masked_vars)
    for path, q in quant.items():  # bits kept; the masked network's weight scales frozen as range_w
        assert float(small_vars["quant"][path]["bits_w"]) == float(q["bits_w"])
        assert small_vars["quant"][path]["range_w"].shape == (small_vars["params"][path]["kernel"].shape[-1],)
    x = jax.random.normal(jax.random.key(4), (2, 28, 28, 1))
    y_masked = zoo.jit(lambda v, x: table.model.apply(v, x))(masked_vars, x)
    y_small = zoo.jit(lambda v, x: small_model.apply(v, x))(small_vars, x)
    assert _rel_err(y_masked, y_small) < 1e-5
