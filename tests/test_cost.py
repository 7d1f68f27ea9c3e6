"""Tests for jaxcompress.cost: parameters, MACs and bytes against published and hand counts.

ImageNet-size models go only through `describe` (jax.eval_shape) and the cost model,
which never run a forward pass.
"""
import functools

import chex
import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jaxcompress import cost
from jaxcompress.layers import Conv, Dense
from jaxcompress.models import create_model, describe
from jaxcompress.models.vgg import CONFIGS, POOL

# ----------------------------------------------------------------------------------------------
# Hand counts.
# ----------------------------------------------------------------------------------------------

LENET5_LAYERS = {  # weights, biases, MACs (conv1 pads to keep 28x28)
    "conv1": (5 * 5 * 1 * 6, 6, 28 * 28 * 25 * 6),
    "conv2": (5 * 5 * 6 * 16, 16, 10 * 10 * 150 * 16),
    "fc1": (400 * 120, 120, 400 * 120),
    "fc2": (120 * 84, 84, 120 * 84),
    "fc3": (84 * 10, 10, 84 * 10),
}


def _lenet5_hand(w):
    """Params and MACs of LeNet-5 with widths w = (conv1, conv2, fc1, fc2), in Python ints."""
    c1, c2, f1, f2 = w
    params = (25 * c1 + c1) + (25 * c1 * c2 + c2) + (25 * c2 * f1 + f1) + (f1 * f2 + f2) + (f2 * 10 + 10)
    macs = 28 * 28 * 25 * c1 + 10 * 10 * 25 * c1 * c2 + 25 * c2 * f1 + f1 * f2 + f2 * 10
    return params, macs


def test_lenet5_exact(zoo):
    table = zoo.table("lenet5")
    c = cost.count(table)
    assert int(c["params"]) == 61706 == _lenet5_hand((6, 16, 120, 84))[0]
    macs = 28 * 28 * 25 * 6 + 10 * 10 * 150 * 16 + 400 * 120 + 120 * 84 + 84 * 10
    assert int(c["macs"]) == macs == 416520
    assert int(c["flops"]) == 2 * macs
    per_layer = cost.layer_counts(table)
    for i, layer in enumerate(table.layers):
        w, b, m = LENET5_LAYERS[layer.path]
        assert (int(per_layer["weights"][i]), int(per_layer["biases"][i]), int(per_layer["macs"][i])) == (w, b, m)
    s = cost.summarize(table)
    assert s["totals"]["params"] == s["totals"]["nonzero_params"] == 61706
    assert s["totals"]["macs"] == s["totals"]["sparse_macs"] == macs
    assert s["totals"]["bytes"] == 4 * 61706  # float32 everything
    assert s["widths"] == [6, 16, 120, 84]
    assert [r["layer"] for r in s["layers"]] == list(LENET5_LAYERS)


def test_lenet300_100_exact(zoo):
    c = cost.count(zoo.table("lenet300_100"))
    assert int(c["params"]) == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10 == 266610
    assert int(c["macs"]) == 784 * 300 + 300 * 100 + 100 * 10


# (name, params, params rtol, MACs, MACs rtol): published counts.
PUBLISHED = [
    ("resnet56", 0.85e6, 0.01, 125e6, 0.01),       # He et al. 2016, Table 6
    ("resnet50", 25.6e6, 0.01, 4.1e9, 0.02),       # He et al. 2016; torchvision
    ("vgg16_imagenet", 138.4e6, 0.005, 15.5e9, 0.01),  # Simonyan & Zisserman 2015
    ("mobilenet_v1", 4.2e6, 0.015, 569e6, 0.01),   # Howard et al. 2017, Table 8
    ("vgg19", 20.04e6, 0.005, None, None),         # the two-stage paper's CIFAR-10 VGG-19
]


@pytest.mark.parametrize("name, params, p_tol, macs, m_tol", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_published_counts(name, params, p_tol, macs, m_tol, zoo):
    c = cost.count(zoo.table(name))
    assert abs(float(c["params"]) / params - 1) < p_tol, float(c["params"])
    if macs is not None:
        assert abs(float(c["macs"]) / macs - 1) < m_tol, float(c["macs"])


# Exact counts of the same architectures elsewhere: torchvision resnet18/50 (BN affine
# parameters counted, running statistics not), Keras MobileNet trainable parameters.
EXACT = [("resnet18", 11_689_512, 1_814_073_344), ("resnet50", 25_557_032, 4_089_184_256),
         ("mobilenet_v1", 4_231_976, None)]


@pytest.mark.parametrize("name, params, macs", EXACT, ids=[e[0] for e in EXACT])
def test_exact_reference_counts(name, params, macs, zoo):
    s = cost.summarize(zoo.table(name))["totals"]
    assert s["params"] == params
    if macs is not None:
        assert s["macs"] == macs


def _vgg16_imagenet_params():
    """VGG-16 with BatchNorm and bias-free convs (conv_bn), in Python ints: torchvision's
    vgg16_bn has 138,365,992 parameters, 4,224 of them conv biases."""
    convs = [c for c in CONFIGS[16] if c != POOL]
    n, cin = 0, 3
    for c in convs:
        n += 9 * cin * c + 2 * c
        cin = c
    n += 7 * 7 * 512 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 1000 + 1000
    assert n == 138_365_992 - 4_224
    return n


def test_vgg16_imagenet_count_float32_close(zoo):
    # count() is a jnp float32 function (it runs inside jit / vmap): exact to float32 rounding.
    c = cost.count(zoo.table("vgg16_imagenet"))
    assert abs(float(c["params"]) - _vgg16_imagenet_params()) <= 16


def test_summarize_totals_exact_python_numbers_for_large_bn_model(zoo):
    s = cost.summarize(zoo.table("vgg16_imagenet"))["totals"]
    assert type(s["params"]) is float and type(s["bytes"]) is float
    assert s["params"] == _vgg16_imagenet_params()


# ----------------------------------------------------------------------------------------------
# count(): a pure jnp function of a width vector.
# ----------------------------------------------------------------------------------------------

def _random_widths(table, n, seed):
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(1, np.asarray(table.widths) + 1) for _ in range(n)]).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _cached_table(name):
    inputs = {"lenet5": (28, 28, 1), "resnet20": (32, 32, 3), "mobilenet_v1_cifar": (32, 32, 3)}
    return describe(create_model(name, 10), inputs[name])


class CountJitVmapTest(chex.TestCase):

    def _table(self, name):
        return _cached_table(name)

    @chex.variants(with_jit=True, without_jit=True)
    def test_lenet5_batch_of_widths_matches_hand_formula(self):
        table = self._table("lenet5")
        widths = _random_widths(table, 6, seed=0)
        out = self.variant(jax.vmap(lambda w: cost.count(table, w)))(jnp.asarray(widths))
        chex.assert_shape([out["params"], out["macs"], out["flops"]], (6,))
        hand = np.array([_lenet5_hand(tuple(int(v) for v in w)) for w in widths], np.float64)
        chex.assert_trees_all_close(out["params"], hand[:, 0].astype(np.float32), rtol=1e-6)
        chex.assert_trees_all_close(out["macs"], hand[:, 1].astype(np.float32), rtol=1e-6)
        chex.assert_trees_all_close(out["flops"], 2 * hand[:, 1].astype(np.float32), rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("resnet20", "resnet20"), ("mobilenet_v1_cifar", "mobilenet_v1_cifar"))
    def test_vmap_equals_per_row(self, name):
        table = self._table(name)
        widths = _random_widths(table, 4, seed=1)
        batched = self.variant(jax.vmap(lambda w: cost.count(table, w)))(jnp.asarray(widths))
        for i, w in enumerate(widths):
            row = cost.count(table, w)
            chex.assert_trees_all_close({k: batched[k][i] for k in row}, row, rtol=1e-6)

    def test_count_equals_real_parameters_of_model_built_at_those_widths(self):
        table = self._table("resnet20")
        widths = tuple(int(v) for v in _random_widths(table, 1, seed=2)[0])
        model = create_model("resnet20", 10, widths=widths)
        variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
        n = sum(int(np.prod(l.shape)) for l in jax.tree.leaves(variables["params"]))
        assert int(cost.count(table, jnp.asarray(widths, jnp.float32))["params"]) == n


# ----------------------------------------------------------------------------------------------
# summarize(): masks and bit widths.
# ----------------------------------------------------------------------------------------------

def _lenet5_masks(table, variables, seed=0, with_elements=True):
    rng = np.random.default_rng(seed)
    gms = [np.asarray((rng.random(w) < 0.6) | (np.arange(w) == 0), np.float32) for w in table.widths]
    masks = table.layer_masks([jnp.asarray(g) for g in gms], variables["masks"])
    kms = {}
    if with_elements:
        for path, shape in (("conv2", (5, 5, 6, 16)), ("fc1", (400, 120)), ("fc3", (84, 10))):
            kms[path] = (rng.random(shape) < 0.5).astype(np.float32)
            masks[path]["kernel"] = jnp.asarray(kms[path])
    return gms, kms, masks


def test_summarize_element_masks_nonzero_by_hand(zoo):
    table, variables = zoo.table("lenet5"), zoo.variables("lenet5")
    gms, kms, masks = _lenet5_masks(table, variables)
    k0, k1, k2, k3 = (g > 0 for g in gms)
    n0, n1, n2, n3 = (int(g.sum()) for g in gms)
    s = cost.summarize(table, masks)
    rows = {r["layer"]: r for r in s["layers"]}
    # nonzero weights of the kept channels, by hand
    conv2 = kms["conv2"][:, :, k0][..., k1].sum()
    fc1 = kms["fc1"].reshape(25, 16, 120)[:, k1][..., k2].sum()  # rows: position * 16 + channel
    fc3 = kms["fc3"][k3].sum()
    hand_nonzero = {"conv1": 25 * n0, "conv2": conv2, "fc1": fc1, "fc2": n2 * n3, "fc3": fc3}
    hand_weights = {"conv1": 25 * n0, "conv2": 25 * n0 * n1, "fc1": 25 * n1 * n2, "fc2": n2 * n3,
                    "fc3": n3 * 10}
    hand_biases = {"conv1": n0, "conv2": n1, "fc1": n2, "fc2": n3, "fc3": 10}
    positions = {"conv1": 28 * 28, "conv2": 10 * 10, "fc1": 1, "fc2": 1, "fc3": 1}
    for path in LENET5_LAYERS:
        r = rows[path]
        assert r["nonzero_weights"] == hand_nonzero[path], path
        assert r["weights"] == hand_weights[path] and r["biases"] == hand_biases[path], path
        assert r["macs"] == hand_weights[path] * positions[path]
        assert r["sparse_macs"] == hand_nonzero[path] * positions[path]
    t = s["totals"]
    assert t["nonzero_params"] == sum(hand_nonzero.values()) + sum(hand_biases.values())
    assert t["params"] == sum(hand_weights.values()) + sum(hand_biases.values())
    assert t["params"] == _lenet5_hand((n0, n1, n2, n3))[0]
    assert t["sparse_macs"] == sum(hand_nonzero[p] * positions[p] for p in positions)
    assert s["widths"] == [n0, n1, n2, n3]


def test_summarize_bytes_with_bits_by_hand(zoo):
    table = zoo.table("lenet5")
    quant = {"conv2": {"bits_w": jnp.float32(4.0)}, "fc1": {"bits_w": jnp.float32(8.0)},
             "fc2": {"bits_w": jnp.float32(32.0)}}
    rows = {r["layer"]: r for r in cost.summarize(table, None, quant)["layers"]}
    # conv2 at 4 bits: 2400 weights * 4 / 8 + 16 float32 scales + 16 float32 biases
    assert rows["conv2"]["bytes"] == 2400 * 4 / 8 + 4 * 16 + 4 * 16 == 1328
    assert rows["fc1"]["bytes"] == 48000 * 8 / 8 + 4 * 120 + 4 * 120 == 48960
    assert rows["fc2"]["bytes"] == 4 * (120 * 84 + 84)  # 32 bits: float32, no scales
    assert rows["conv1"]["bytes"] == 4 * 156 and rows["fc3"]["bytes"] == 4 * 850
    assert rows["conv2"]["bits_w"] == 4.0 and rows["conv1"]["bits_w"] == 32.0
    total = cost.summarize(table, None, quant)["totals"]["bytes"]
    assert total == 1328 + 48960 + 4 * (10164 + 156 + 850) == 94968


def test_summarize_bytes_with_channel_masks_and_bits(zoo):
    table, variables = zoo.table("lenet5"), zoo.variables("lenet5")
    gms, _, masks = _lenet5_masks(table, variables, seed=3, with_elements=False)
    n0, n1, n2, n3 = (int(g.sum()) for g in gms)
    quant = {"conv2": {"bits_w": jnp.float32(4.0)}}
    rows = {r["layer"]: r for r in cost.summarize(table, masks, quant)["layers"]}
    weights = 25 * n0 * n1
    assert rows["conv2"]["bytes"] == np.ceil(weights * 4 / 8) + 4 * n1 + 4 * n1
    assert rows["fc1"]["bytes"] == 4 * (25 * n1 * n2 + n2)


def test_summarize_resnet20_masks_match_count_of_effective_widths(zoo):
    table, variables = zoo.table("resnet20"), zoo.variables("resnet20")
    rng = np.random.default_rng(5)
    gms = [jnp.asarray((rng.random(w) < 0.5) | (np.arange(w) == 0), jnp.float32) for w in table.widths]
    masks = table.layer_masks(gms, variables["masks"])
    widths = np.array([float(g.sum()) for g in gms], np.float32)
    np.testing.assert_array_equal(cost.effective_widths(table, masks), widths)
    s = cost.summarize(table, masks)
    c = cost.count(table, widths)
    assert s["totals"]["params"] == int(c["params"])
    assert s["totals"]["macs"] == int(c["macs"])
    # BatchNorm: two parameters per kept channel; with no BN the sums would differ by this much
    norm = sum(2 * widths[g] for _, g in table.norm_groups)
    layer_sum = sum(r["weights"] + r["biases"] for r in s["layers"])
    assert s["totals"]["params"] == layer_sum + norm


class _SharedConv(flax_nn.Module):
    """A conv applied twice (weights shared): its MACs count twice, its weights once."""

    widths: tuple = (8,)
    resolutions: tuple = (8, 8)

    @flax_nn.compact
    def __call__(self, x, train=False):
        shared = Conv(self.widths[0], (3, 3))
        x = flax_nn.relu(Conv(self.widths[0], (3, 3))(x))
        x = flax_nn.relu(shared(x))
        if self.resolutions[1] != self.resolutions[0]:
            x = x[:, ::2, ::2]
        x = flax_nn.relu(shared(x))
        return Dense(10)(x.mean((1, 2)))


def test_a_shared_layer_counts_its_macs_per_application():
    from jaxcompress.models.table import UnsupportedModelError
    from jaxcompress.latency import layer_shapes
    table = describe(_SharedConv(), (8, 8, 3))
    for w in (8, 5):  # conv0 (3 -> w), shared (w -> w) twice, dense (w -> 10), all on 8x8
        c = cost.count(table, (w,))
        assert float(c["params"]) == (27 * w + w) + (9 * w * w + w) + (10 * w + 10)
        assert float(c["macs"]) == 64 * 27 * w + 2 * 64 * 9 * w * w + 10 * w
    assert float(cost.summarize(table)["totals"]["macs"]) == float(cost.count(table)["macs"])
    keys = layer_shapes(table, (8,), 4)  # the latency model times the shared conv twice
    assert len(keys) == 4 and keys[1] == keys[2]
    with pytest.raises(UnsupportedModelError, match="applied more than once with different"):
        describe(_SharedConv(resolutions=(8, 4)), (8, 8, 3))
