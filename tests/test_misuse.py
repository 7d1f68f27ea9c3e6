"""Misuse gets one-line errors naming what is wrong and how to fix it, never an
IndexError or a silently wrong table.

* group masks of the wrong number or shape (`ModelTable.layer_masks`), masks missing
  a layer, variables of another width given to `shrink`;
* `describe` refuses, naming the layer: a channel group made or read by a plain Flax
  layer, a concatenation of channel groups, a norm over a channel group, a derived
  width (`Dense(4 * w)`), grouped and 1-D/3-D convolutions;
* a fixed size that is a multiple of a probe prime (2,018 classes) stays fixed.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import cost
from jaxcompress.layers import BatchNorm, Conv, Dense, InformationDropout
from jaxcompress.models.table import UnsupportedModelError, describe
from jaxcompress.pruning import shrink


def _one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


class MLP(nn.Module):
    """in (flattened) -> a -> b -> classes; two channel groups."""

    widths: tuple = (4, 6)
    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(Dense(self.widths[0], signed_input=True, name="a")(x.reshape(x.shape[0], -1)))
        x = nn.relu(Dense(self.widths[1], name="b")(x))
        return Dense(self.num_classes, name="head")(x)


@pytest.fixture(scope="module")
def mlp():
    model = MLP()
    table = describe(model, (2, 2, 1))
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 2, 2, 1)))
    return model, table, variables


# ----------------------------------------------------------------------------------------------
# Group masks of the wrong number or shape.
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 3, 0])
def test_layer_masks_wrong_number_of_group_masks(mlp, n):
    _, table, variables = mlp
    gms = [jnp.ones(4), jnp.ones(6), jnp.ones(6)][:n]
    with pytest.raises(ValueError) as excinfo:
        table.layer_masks(gms, variables["masks"])
    msg = _one_line(excinfo)
    assert f"got {n} group masks for 2 channel groups (a, b)" in msg and "one mask per group" in msg


@pytest.mark.parametrize("bad", [jnp.ones(5), jnp.ones((6, 1)), jnp.ones(()), [1.0, 0.0]])
def test_layer_masks_wrong_shape_names_the_group(mlp, bad):
    _, table, variables = mlp
    with pytest.raises(ValueError) as excinfo:
        table.layer_masks([jnp.ones(4), bad], variables["masks"])
    msg = _one_line(excinfo)
    assert "group 1 (b)" in msg and "!= (6,)" in msg


def test_layer_masks_not_a_list(mlp):
    _, table, _ = mlp
    with pytest.raises(ValueError) as excinfo:
        table.layer_masks({"a": jnp.ones(4), "b": jnp.ones(6)})
    assert "list of 2 group masks" in _one_line(excinfo)


def test_masks_missing_a_layer(mlp):
    _, table, variables = mlp
    masks = {k: v for k, v in variables["masks"].items() if k != "b"}
    for fn in (table.group_masks, table.check_masks_consistent):
        with pytest.raises(ValueError) as excinfo:
            fn(masks)
        assert "no 'b/channel' leaf" in _one_line(excinfo)
    with pytest.raises(ValueError) as excinfo:
        shrink(table, {**variables, "masks": masks})
    assert "no 'b/channel' leaf" in _one_line(excinfo)


def test_shrink_variables_of_another_width(mlp):
    model, table, _ = mlp
    other = jax.jit(model.clone(widths=(4, 5)).init)(jax.random.key(0), jnp.zeros((1, 2, 2, 1)))
    with pytest.raises(ValueError) as excinfo:
        shrink(table, other)
    msg = _one_line(excinfo)
    assert "5 entries" in msg and "expects 6" in msg and "group 1 (b)" in msg


def test_shrink_without_params(mlp):
    _, table, variables = mlp
    with pytest.raises(ValueError) as excinfo:
        shrink(table, variables["params"])
    assert "'params' collection" in _one_line(excinfo)


# ----------------------------------------------------------------------------------------------
# A fixed size that is a multiple of a probe prime stays fixed.
# ----------------------------------------------------------------------------------------------

def test_2018_classes_and_2026_inputs_are_fixed_sizes():
    """2,018 = 2 x 1,009 and 2,026 = 2 x 1,013: multiples of the first probe primes."""
    model = MLP(num_classes=2018)
    table = describe(model, (1, 1, 2026))
    rows = {l.path: l for l in table.layers}
    assert (rows["a"].in_group, rows["a"].in_fixed) == (-1, 2026)
    assert (rows["head"].in_group, rows["head"].out_group, rows["head"].out_fixed) == (1, -1, 2018)
    assert table.axes["params"][("head", "kernel")][1] is None
    hand = (2026 * 4 + 4) + (4 * 6 + 6) + (6 * 2018 + 2018)
    assert float(cost.count(table)["params"]) == hand
    x = jax.random.normal(jax.random.key(1), (2, 1, 1, 2026))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    gms = [jnp.array([1.0, 0.0, 1.0, 1.0]), jnp.array([0.0, 1.0, 1.0, 0.0, 1.0, 1.0])]
    masked = {**variables, "masks": table.layer_masks(gms, variables["masks"])}
    small_model, small_vars = shrink(table, masked)
    assert small_model.widths == (3, 4) and small_vars["params"]["head"]["kernel"].shape == (4, 2018)
    np.testing.assert_allclose(jax.jit(small_model.apply)(small_vars, x), jax.jit(model.apply)(masked, x),
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# describe refuses what it cannot describe exactly, naming the layer.
# ----------------------------------------------------------------------------------------------

class PlainProducer(nn.Module):
    widths: tuple = (4,)
    kind: str = "conv"

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.kind == "conv":
            x = nn.relu(nn.Conv(self.widths[0], (3, 3), name="plain")(x)).mean((1, 2))
        else:
            x = nn.relu(nn.Dense(self.widths[0], name="plain")(x.reshape(x.shape[0], -1)))
        return Dense(3, name="head")(x)


class PlainConsumer(nn.Module):
    widths: tuple = (4,)

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(Conv(self.widths[0], (3, 3), name="conv")(x))
        return nn.Dense(3, name="plain_head")(x.mean((1, 2)))


@pytest.mark.parametrize("kind, cls", [("conv", "Conv"), ("dense", "Dense")])
def test_plain_flax_layer_making_a_group(kind, cls):
    with pytest.raises(UnsupportedModelError) as excinfo:
        describe(PlainProducer(kind=kind), (4, 4, 2))
    msg = _one_line(excinfo)
    assert f"layer 'plain': a plain flax.linen.{cls} over a channel group" in msg
    assert f"use jaxcompress.layers.{cls}" in msg
    assert isinstance(excinfo.value, ValueError)


def test_plain_flax_layer_reading_a_group():
    with pytest.raises(UnsupportedModelError) as excinfo:
        describe(PlainConsumer(), (4, 4, 2))
    assert "layer 'plain_head': a plain flax.linen.Dense" in _one_line(excinfo)


class Concat(nn.Module):
    widths: tuple = (4, 6)
    with_image: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        a = nn.relu(Conv(self.widths[0], (3, 3), name="a")(x))
        b = nn.relu(Conv(self.widths[1], (3, 3), name="b")(x))
        parts = [a, b, x] if self.with_image else [a, b]
        return Dense(3, name="head")(jnp.concatenate(parts, -1).mean((1, 2)))


@pytest.mark.parametrize("with_image", [False, True])
def test_concatenation_of_groups_is_refused(with_image):
    with pytest.raises(UnsupportedModelError) as excinfo:
        describe(Concat(with_image=with_image), (4, 4, 2))
    msg = _one_line(excinfo)
    assert msg.startswith("describe: layer 'head': its input is the concatenation of group 0 (a) + group 1 (b)")
    assert "concatenation of channel groups is not supported yet" in msg
    assert ("+ 2 fixed channels" in msg) == with_image


class Normed(nn.Module):
    widths: tuple = (4,)
    norm: str = "LayerNorm"

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = Dense(self.widths[0], name="fc")(x.reshape(x.shape[0], -1))
        if self.norm == "BatchNorm":
            x = nn.BatchNorm(use_running_average=not train, name="norm")(x)
        else:
            x = getattr(nn, self.norm)(name="norm")(x)
        return Dense(3, name="head")(nn.relu(x))


@pytest.mark.parametrize("norm", ["LayerNorm", "RMSNorm", "BatchNorm"])
def test_norm_over_a_group_is_refused(norm):
    with pytest.raises(UnsupportedModelError) as excinfo:
        describe(Normed(norm=norm), (2, 2, 1))
    msg = _one_line(excinfo)
    assert f"layer 'norm': a plain flax.linen.{norm} over a channel group" in msg
    if norm == "BatchNorm":
        assert "use jaxcompress.layers.BatchNorm" in msg
    else:
        assert "statistics" in msg and "not supported yet" in msg


class DerivedMLP(nn.Module):
    """The transformer MLP: Dense(4 * w) inside a residual stream of width w."""

    widths: tuple = (4,)
    derive: str = "times4"

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = Dense(self.widths[0], name="embed")(x.reshape(x.shape[0], -1))
        hidden = 4 * self.widths[0] if self.derive == "times4" else self.widths[0] // 2
        h = nn.gelu(Dense(hidden, name="up")(x))
        x = x + Dense(self.widths[0], name="down")(h)
        return Dense(3, name="head")(x)


def test_derived_width_is_refused():
    with pytest.raises(UnsupportedModelError) as excinfo:
        describe(DerivedMLP(), (2, 2, 1))
    msg = _one_line(excinfo)
    assert msg.startswith("describe: layer 'up': its output size is 4 x widths[0] (embed), a derived width")
    with pytest.raises(UnsupportedModelError) as excinfo:
        describe(DerivedMLP(derive="half"), (2, 2, 1))
    assert "layer 'up': its output size" in _one_line(excinfo) and "derived" in str(excinfo.value)


class OddConvs(nn.Module):
    widths: tuple = (4, 6)
    kind: str = "grouped"

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.kind == "grouped_fixed":  # 4 -> 6 channels in 2 groups, on the image: no channel group
            x = Conv(6, (3, 3), feature_group_count=2, name="c0")(x)
        x = nn.relu(Conv(self.widths[0], (3, 3), name="c1")(x))
        if self.kind == "grouped":
            x = Conv(self.widths[0], (3, 3), feature_group_count=2, name="c2")(x)
        elif self.kind == "depthwise_multiplier":
            x = Conv(2 * x.shape[-1], (3, 3), feature_group_count=x.shape[-1], name="c2")(x)
        elif self.kind == "1d":  # over the rows
            x = Conv(self.widths[1], 3, name="c2")(x.reshape(x.shape[0], -1, x.shape[-1]))[:, None]
        return Dense(3, name="head")(x.mean((1, 2)))


@pytest.mark.parametrize("kind, expected", [
    ("grouped", "does not build at the probe widths (distinct primes above 1000): c2: 1009 input channels not "
                "divisible by feature_group_count=2"),
    ("depthwise_multiplier", "layer 'c2': its output size is 2 x widths[0] (c1), a derived width"),
    ("1d", "layer 'c2': a 1-D convolution"),
    ("grouped_fixed", "layer 'c0': a grouped convolution (feature_group_count=2, 4 -> 6 channels")])
def test_unsupported_convolutions_are_refused(kind, expected):
    with pytest.raises(UnsupportedModelError) as excinfo:
        describe(OddConvs(widths=(4,) if kind == "grouped" else (4, 6), kind=kind), (4, 4, 4))
    assert expected in _one_line(excinfo)


def test_model_without_widths():
    with pytest.raises(UnsupportedModelError) as excinfo:
        describe(nn.Dense(3), (4,))
    assert "no `widths` field" in _one_line(excinfo)


class WithInformationDropout(nn.Module):
    """InformationDropout's plain alpha head reads and writes a group: allowed (its noise
    multiplies f(h), zero on pruned channels)."""

    widths: tuple = (4,)

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = Conv(self.widths[0], (3, 3), name="conv")(x)
        x, _ = InformationDropout(deterministic=True, name="drop")(x)
        return Dense(3, name="head")(x.mean((1, 2)))


def test_information_dropout_head_is_not_refused():
    table = describe(WithInformationDropout(), (4, 4, 2))
    assert [l.path for l in table.layers] == ["conv", "head"]
    assert table.axes["params"][("drop", "alpha_head", "kernel")][2:] == (table.axes["masks"][("conv", "channel")][0],) * 2


def test_zoo_style_bn_model_still_describes():
    class ConvBN(nn.Module):
        widths: tuple = (4,)

        @nn.compact
        def __call__(self, x, train: bool = False):
            x = Conv(self.widths[0], (3, 3), use_bias=False, name="conv")(x)
            x = nn.relu(BatchNorm(use_running_average=not train, name="bn")(x))
            return Dense(3, name="head")(x.mean((1, 2)))

    table = describe(ConvBN(), (4, 4, 2))
    assert table.norm_groups == (("bn", 0),)
    assert {p[0] for p in table.mask_paths(0)} == {"conv", "bn"}
