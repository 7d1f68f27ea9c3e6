"""Tests for jaxcompress.models: the zoo, widths, the registry and the layer table."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxcompress import cost
from jaxcompress.models import (MODELS, AxisGroup, UnknownModelError, create_model, get_spec,
                                scale_widths)

IMAGE_MODELS = [n for n in MODELS if len(get_spec(n).input_shape) == 3]  # all but the language model
SMALL_MODELS = [n for n in IMAGE_MODELS if get_spec(n).input_shape[0] <= 32]
IMAGENET_MODELS = [n for n in IMAGE_MODELS if n not in SMALL_MODELS]


def _num_params(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def test_zoo_sizes_are_what_we_think():
    assert set(SMALL_MODELS) == {"lenet300_100", "lenet5", "cnn4", "vgg11", "vgg16", "vgg19", "resnet20", "resnet56",
                                 "resnet110", "mobilenet_v1_cifar", "mobilenet_v2_cifar", "vit"}
    assert set(MODELS) - set(IMAGE_MODELS) == {"lm"} and get_spec("lm").input_dtype == "int32"
    assert len(MODELS) == 20


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_builds_with_its_default_widths(name, zoo):
    """Abstract init (no memory, no FLOPs): variables exist, widths are honoured, and the
    cost model's parameter count equals the real number of parameters."""
    table = zoo.table(name)
    spec = get_spec(name)
    assert table.widths == spec.default_widths
    assert table.model.widths == spec.default_widths
    variables = zoo.abstract_variables(name)  # jax.eval_shape of model.init
    assert set(variables) <= {"params", "masks", "batch_stats"} and "params" in variables
    # one all-ones channel mask per Conv/Dense output, norm and embedding
    n_norm = len(table.norm_groups)
    assert len(jax.tree.leaves(variables["masks"])) == len(table.layers) + len(table.norms) + len(table.embeddings)
    assert len(jax.tree.leaves(variables.get("batch_stats", {}))) == 2 * n_norm
    n_params, counted = _num_params(variables["params"]), float(cost.count(table)["params"])
    if n_params < 2 ** 24:  # exactly representable in float32, which `count` computes in
        assert counted == n_params
    else:
        assert abs(counted / n_params - 1) < 1e-7
    # every output layer width is one of the groups or the class count
    for layer in table.layers:
        assert layer.out_group >= 0 or layer.out_fixed == zoo.num_classes(name)
    # the classifier is the last layer and has num_classes outputs; the language model's is its tied
    # token embedding (logits = h @ embedding.T)
    if name == "lm":
        assert table.extra_macs[-1].path == "tok_embed/attend" and table.layers[-1].out_group == 0
    else:
        assert table.layers[-1].out_fixed == zoo.num_classes(name)


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_small_models_forward_gives_logits(name, zoo):
    x = jax.random.normal(jax.random.key(1), (2, *get_spec(name).input_shape))
    logits = zoo.forward(name)(zoo.variables(name), x)
    chex.assert_shape(logits, (2, 10))
    chex.assert_tree_all_finite(logits)
    assert np.abs(logits[0] - logits[1]).max() > 1e-3 * np.abs(logits).max()  # depends on the input


def test_num_classes_and_train_mode(zoo):
    model = create_model("resnet20", num_classes=7, width_multiplier=0.25)
    assert model.widths == (4, 8, 16) + (4,) * 3 + (8,) * 3 + (16,) * 3
    x = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(1), x, train=False))
    variables = jax.tree.map(lambda s: jnp.full(s.shape, 0.5, s.dtype), abstract)
    variables["masks"] = jax.tree.map(jnp.ones_like, variables["masks"])
    logits, state = zoo.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    chex.assert_shape(logits, (3, 7))
    # train mode updates running statistics: mean <- 0.9 * 0.5 + 0.1 * batch mean of the stem conv
    kernel = np.asarray(variables["params"]["stem_conv"]["kernel"])
    stem = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    chex.assert_trees_all_close(state["batch_stats"]["stem_bn"]["mean"],
                                0.9 * 0.5 + 0.1 * np.asarray(stem).mean(axis=(0, 1, 2)), rtol=1e-5)
    chex.assert_trees_all_equal_shapes(state["batch_stats"], variables["batch_stats"])


# ----------------------------------------------------------------------------------------------
# Widths and the registry.
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("widths, multiplier, divisor, expected", [
    ((32, 64, 1280), 0.5, 8, (16, 32, 640)),
    ((32, 64, 128), 0.75, 8, (24, 48, 96)),
    ((24,), 0.75, 8, (16,)),       # 18 / 8 = 2.25 -> 2 * 8
    ((24,), 0.9, 8, (24,)),        # 21.6 / 8 = 2.7 -> 3 * 8
    ((32,), 0.35, 8, (8,)),        # 11.2 / 8 = 1.4 -> 1 * 8
    ((16,), 0.1, 8, (8,)),         # rounds to 0: at least one divisor
    ((300, 100), 0.5, 1, (150, 50)),
    ((6, 16, 120, 84), 0.5, 1, (3, 8, 60, 42)),
    ((6, 16), 0.1, 1, (1, 2)),     # 0.6 -> 1, 1.6 -> 2
    ((6, 16), 2.0, 1, (12, 32)),
])
def test_scale_widths_by_hand(widths, multiplier, divisor, expected):
    assert scale_widths(widths, multiplier, divisor) == expected


@pytest.mark.parametrize("multiplier", [0.0, -0.5])
def test_scale_widths_rejects_non_positive_multiplier(multiplier):
    with pytest.raises(ValueError, match="width_multiplier"):
        scale_widths((8, 16), multiplier)


def test_create_model_scales_with_divisor():
    m = create_model("mobilenet_v1_cifar", 10, width_multiplier=0.5)
    assert m.widths == (16, 32, 64, 64, 128, 128, 256, 256, 256, 256, 256, 256, 512, 512)
    m = create_model("lenet5", 10, width_multiplier=0.5)
    assert m.widths == (3, 8, 60, 42)
    m = create_model("lenet5", 10, widths=(2, 3, 4, 5))
    assert m.widths == (2, 3, 4, 5)


def test_create_model_unknown_name_lists_choices():
    with pytest.raises(UnknownModelError) as excinfo:
        create_model("resnet21", 10)
    assert isinstance(excinfo.value, ValueError)
    msg = str(excinfo.value)
    assert "resnet21" in msg
    for name in MODELS:
        assert name in msg


def test_create_model_wrong_widths_length():
    with pytest.raises(ValueError) as excinfo:
        create_model("lenet5", 10, widths=(6, 16, 120))
    msg = str(excinfo.value)
    assert "lenet5" in msg and "4" in msg and "3" in msg


def test_cifar_resnet_depth_must_be_6n_plus_2():
    from jaxcompress.models import resnet
    assert resnet.cifar_stage_sizes(56) == (9, 9, 9)
    with pytest.raises(ValueError, match="6n\\+2"):
        resnet.cifar_stage_sizes(21)


# ----------------------------------------------------------------------------------------------
# The layer table.
# ----------------------------------------------------------------------------------------------

def test_lenet5_table_by_hand(zoo):
    table = zoo.table("lenet5")
    assert table.widths == (6, 16, 120, 84)
    assert [l.path for l in table.layers] == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    rows = {l.path: l for l in table.layers}
    # (kind, kernel, out_hw, in_group, in_repeat, in_fixed, out_group, out_fixed)
    expected = {
        "conv1": ("conv", (5, 5), (28, 28), -1, 1, 1, 0, 0),
        "conv2": ("conv", (5, 5), (10, 10), 0, 1, 0, 1, 0),
        "fc1": ("dense", (1, 1), (1, 1), 1, 25, 0, 2, 0),
        "fc2": ("dense", (1, 1), (1, 1), 2, 1, 0, 3, 0),
        "fc3": ("dense", (1, 1), (1, 1), 3, 1, 0, -1, 10),
    }
    for path, (kind, kernel, hw, ig, ir, ifx, og, ofx) in expected.items():
        l = rows[path]
        assert (l.kind, l.kernel_size, l.out_hw, l.in_group, l.in_repeat, l.in_fixed, l.out_group,
                l.out_fixed) == (kind, kernel, hw, ig, ir, ifx, og, ofx), path
        assert l.use_bias and not l.depthwise and l.strides == (1, 1)
    assert table.norm_groups == ()
    assert table.group_names == ("conv1", "conv2", "fc1", "fc2")
    params = table.axes["params"]
    assert params[("fc1", "kernel")] == (AxisGroup(1, 25), AxisGroup(2))
    assert params[("conv2", "kernel")] == (None, None, AxisGroup(0), AxisGroup(1))
    assert params[("conv1", "kernel")] == (None, None, None, AxisGroup(0))
    assert params[("fc3", "kernel")] == (AxisGroup(3), None)
    assert params[("fc3", "bias")] == (None,)
    assert table.mask_paths(2) == (("fc1", "channel"),)


def test_cnn4_table_and_parameters_by_hand(zoo):
    """The Section 5.5 CNN: conv5x5(32)-pool-conv5x5(64)-pool-fc(256)-fc(10), SAME convs on 32x32x3."""
    table = zoo.table("cnn4")
    assert table.widths == (32, 64, 256)
    assert [l.path for l in table.layers] == ["conv1", "conv2", "fc1", "fc2"]
    rows = {l.path: l for l in table.layers}
    expected = {  # (kind, kernel, out_hw, in_group, in_repeat, in_fixed, out_group, out_fixed)
        "conv1": ("conv", (5, 5), (32, 32), -1, 1, 3, 0, 0),
        "conv2": ("conv", (5, 5), (16, 16), 0, 1, 0, 1, 0),
        "fc1": ("dense", (1, 1), (1, 1), 1, 64, 0, 2, 0),  # 8x8 positions x 64 channels flattened
        "fc2": ("dense", (1, 1), (1, 1), 2, 1, 0, -1, 10),
    }
    for path, row in expected.items():
        l = rows[path]
        assert (l.kind, l.kernel_size, l.out_hw, l.in_group, l.in_repeat, l.in_fixed, l.out_group,
                l.out_fixed) == row, path
    # three prunable channel groups; the classifier's output is not one
    assert table.group_names == ("conv1", "conv2", "fc1")
    from jaxcompress.pruning import prunable_groups
    assert prunable_groups(table, "all") == prunable_groups(table, "inner") == [0, 1, 2]
    hand = (5 * 5 * 3 * 32 + 32) + (5 * 5 * 32 * 64 + 64) + (8 * 8 * 64 * 256 + 256) + (256 * 10 + 10)
    assert hand == 1_105_098
    assert _num_params(zoo.abstract_variables("cnn4")["params"]) == hand
    assert float(cost.count(table)["params"]) == hand
    # MACs: conv1 32*32*75*32, conv2 16*16*800*64, fc1 4096*256, fc2 256*10
    assert float(cost.count(table)["macs"]) == 32 * 32 * 75 * 32 + 16 * 16 * 800 * 64 + 4096 * 256 + 2560
    # width_multiplier 0.5 (the single-layer benchmark): 16-32-128
    half = create_model("cnn4", 10, width_multiplier=0.5)
    assert half.widths == (16, 32, 128)
    x = jnp.zeros((1, 32, 32, 3))
    n_half = _num_params(jax.eval_shape(lambda: half.init(jax.random.key(0), x))["params"])
    assert n_half == (75 * 16 + 16) + (400 * 32 + 32) + (2048 * 128 + 128) + (128 * 10 + 10) == 277_610


def test_resnet20_table_streams(zoo):
    table = zoo.table("resnet20")
    assert table.num_groups == 3 + 9
    stream1 = {p[0] for p in table.mask_paths(0)}
    assert stream1 == {"stem_conv", "stem_bn"} | {f"stage1_block{b}_b_{k}" for b in range(3)
                                                  for k in ("conv", "bn")}
    stream2 = {p[0] for p in table.mask_paths(1)}
    assert stream2 == {"stage2_block0_proj_conv", "stage2_block0_proj_bn"} | {
        f"stage2_block{b}_b_{k}" for b in range(3) for k in ("conv", "bn")}
    # inner widths: one group per block, holding its _a conv and bn
    for i, (s, b) in enumerate((s, b) for s in (1, 2, 3) for b in range(3)):
        assert {p[0] for p in table.mask_paths(3 + i)} == {f"stage{s}_block{b}_a_conv",
                                                           f"stage{s}_block{b}_a_bn"}
    rows = {l.path: l for l in table.layers}
    assert rows["stage2_block0_a_conv"].strides == (2, 2) and rows["stage2_block0_a_conv"].out_hw == (16, 16)
    assert (rows["stage2_block0_proj_conv"].in_group, rows["stage2_block0_proj_conv"].out_group) == (0, 1)
    assert rows["stage2_block0_proj_conv"].kernel_size == (1, 1)
    assert (rows["classifier"].in_group, rows["classifier"].out_fixed) == (2, 10)
    assert rows["stem_conv"].in_fixed == 3
    assert dict(table.norm_groups)["stage3_block2_b_bn"] == 2
    assert table.group_names[:4] == ("stem_conv", "stage2_block0_b_conv", "stage3_block0_b_conv",
                                     "stage1_block0_a_conv")


def test_resnet50_table_bottleneck_stem_is_its_own_group(zoo):
    table = zoo.table("resnet50")
    assert table.widths[:5] == (64, 256, 512, 1024, 2048)
    rows = {l.path: l for l in table.layers}
    assert rows["stem_conv"].out_group == 0 and rows["stem_conv"].out_hw == (112, 112)
    assert (rows["stage1_block0_proj_conv"].in_group, rows["stage1_block0_proj_conv"].out_group) == (0, 1)
    assert rows["stage2_block0_b_conv"].strides == (2, 2)  # v1.5: stride on the 3x3
    assert {p[0] for p in table.mask_paths(1)} >= {"stage1_block2_c_conv", "stage1_block0_proj_bn"}


@pytest.mark.parametrize("name", ["mobilenet_v1_cifar", "mobilenet_v1"])
def test_mobilenet_v1_depthwise_shares_input_group(name, zoo):
    table = zoo.table(name)
    rows = {l.path: l for l in table.layers}
    assert rows["stem_conv"].out_group == 0
    assert {p[0] for p in table.mask_paths(0)} == {"stem_conv", "stem_bn", "block0_dw_conv", "block0_dw_bn"}
    for i in range(13):
        dw, pw = rows[f"block{i}_dw_conv"], rows[f"block{i}_pw_conv"]
        assert dw.depthwise and not pw.depthwise
        assert dw.in_group == dw.out_group == i  # the group of the layer feeding it
        assert (pw.in_group, pw.out_group) == (i, i + 1)
        consumer_dw = {f"block{i + 1}_dw_conv", f"block{i + 1}_dw_bn"} if i < 12 else set()
        assert {p[0] for p in table.mask_paths(i + 1)} == {f"block{i}_pw_conv", f"block{i}_pw_bn"} | consumer_dw
    assert rows["block0_dw_conv"].out_hw == ((32, 32) if name.endswith("cifar") else (112, 112))


def test_mobilenet_v2_cifar_groups(zoo):
    table = zoo.table("mobilenet_v2_cifar")
    rows = {l.path: l for l in table.layers}
    for path, l in rows.items():
        if path.endswith("_dw_conv"):
            assert l.depthwise and l.in_group == l.out_group
            expand = path.replace("_dw_conv", "_expand_conv")
            feeder = rows[expand].out_group if expand in rows else rows["stem_conv"].out_group
            assert l.in_group == feeder
    # stage 3 (32 wide, 3 blocks): all projections are one stream group
    groups = {rows[f"stage3_block{b}_project_conv"].out_group for b in range(3)}
    assert groups == {3}
    assert table.widths[3] == 32


def test_layer_masks_group_masks_round_trip(zoo):
    table = zoo.table("resnet20")
    masks = zoo.variables("resnet20")["masks"]
    rng = np.random.default_rng(0)
    gms = [jnp.asarray(rng.random(w) < 0.5, jnp.float32) for w in table.widths]
    layer_masks = table.layer_masks(gms, masks)
    chex.assert_trees_all_equal_structs(layer_masks, masks)
    table.check_masks_consistent(layer_masks)
    chex.assert_trees_all_equal(table.group_masks(layer_masks), gms)
    flat = traverse_util.flatten_dict(layer_masks)
    for g, gm in enumerate(gms):
        for p in table.mask_paths(g):
            chex.assert_trees_all_equal(flat[p], gm)
    # other leaves (element masks) pass through
    km = jnp.zeros((3, 3, 16, 16))
    with_elements = table.layer_masks(gms, {**masks, "stage1_block0_a_conv": {
        **masks["stage1_block0_a_conv"], "kernel": km}})
    chex.assert_trees_all_equal(with_elements["stage1_block0_a_conv"]["kernel"], km)
    chex.assert_trees_all_equal(with_elements["stage1_block0_a_conv"]["channel"], gms[3])
    # a wrong shape names the group
    bad = list(gms)
    bad[4] = jnp.ones(5)
    with pytest.raises(ValueError, match="group 4 \\(stage1_block1_a_conv\\)"):
        table.layer_masks(bad, masks)


def test_check_masks_consistent_raises_naming_group(zoo):
    table = zoo.table("resnet20")
    masks = zoo.variables("resnet20")["masks"]
    table.check_masks_consistent(masks)  # all ones: fine
    bad = jax.tree.map(lambda x: x, masks)
    bad["stage1_block1_b_bn"] = {"channel": masks["stage1_block1_b_bn"]["channel"].at[3].set(0.0)}
    with pytest.raises(ValueError) as excinfo:
        table.check_masks_consistent(bad)
    msg = str(excinfo.value)
    assert "channel group 0 (stem_conv)" in msg and "stage1_block1_b_bn/channel" in msg
