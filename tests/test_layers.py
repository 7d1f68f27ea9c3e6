"""Tests for jaxcompress.layers: masked / quantized layers and the pure functions.

Every layer is checked against the plain Flax layer (`nn.Conv`, `nn.Dense`,
`nn.BatchNorm`) run on the same parameters, and every quantizer against values
worked out by hand.
"""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jaxcompress.layers import (BatchNorm, Conv, Dense, fake_quant_symmetric, fake_quant_unsigned,
                                quantize_activation, quantize_weight, ste_round)

# ----------------------------------------------------------------------------------------------
# Conv / Dense against the plain Flax layers.
# ----------------------------------------------------------------------------------------------

# (name, Conv kwargs, input channels). 7x7 inputs make stride 2 with SAME padding asymmetric.
CONV_CASES = [
    ("s1_same", dict(features=4, kernel_size=(3, 3), strides=1, padding="SAME"), 3),
    ("s2_same", dict(features=4, kernel_size=(3, 3), strides=2, padding="SAME"), 3),
    ("s1_valid", dict(features=5, kernel_size=(3, 3), strides=1, padding="VALID"), 3),
    ("s2_valid_rect", dict(features=5, kernel_size=(3, 2), strides=(2, 1), padding="VALID"), 3),
    ("s1_int_pad", dict(features=4, kernel_size=(5, 5), strides=1, padding=1), 3),
    ("s2_int_pad_nobias", dict(features=4, kernel_size=(3, 3), strides=2, padding=2, use_bias=False), 3),
    ("pointwise_s2", dict(features=6, kernel_size=(1, 1), strides=2, padding=0), 4),
    ("depthwise", dict(features=6, kernel_size=(3, 3), strides=1, padding="SAME", feature_group_count=6), 6),
    ("depthwise_s2_mult2", dict(features=12, kernel_size=(3, 3), strides=2, padding="SAME",
                                feature_group_count=6), 6),
    ("grouped", dict(features=4, kernel_size=(3, 3), strides=1, padding="SAME", feature_group_count=2), 6),
]

MASK_CASES = ("s2_same", "s1_valid", "s2_int_pad_nobias", "depthwise_s2_mult2")

DENSE_CASES = [
    ("bias", dict(features=7), (3, 5)),
    ("nobias", dict(features=4, use_bias=False), (3, 5)),
    ("batched_leading_dims", dict(features=3), (2, 3, 5)),
]


def _randomize_biases(params, key):
    """Plain Flax initialises biases to zero; random biases make bias handling observable."""
    def f(path, leaf):
        if path[-1].key == "bias":
            return jax.random.normal(jax.random.fold_in(key, leaf.size), leaf.shape)
        return leaf
    return jax.tree_util.tree_map_with_path(f, params)


def _conv_setup(kwargs, cin, seed=0):
    key = jax.random.key(seed)
    x = jax.random.normal(jax.random.fold_in(key, 1), (2, 7, 7, cin))
    ref = nn.Conv(**kwargs)
    params = _randomize_biases(ref.init(key, x)["params"], key)
    ours = Conv(**kwargs)
    return ref, ours, params, x


class ConvDenseMatchFlaxTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*CONV_CASES)
    def test_conv_equals_nn_conv(self, kwargs, cin):
        ref, ours, params, x = _conv_setup(kwargs, cin)
        init_vars = ours.init(jax.random.key(3), x)
        chex.assert_trees_all_equal_shapes(init_vars["params"], params)
        np.testing.assert_array_equal(init_vars["masks"]["channel"], np.ones(kwargs["features"]))
        y_ref = ref.apply({"params": params}, x)
        apply = self.variant(ours.apply)
        for variables in ({"params": params}, {"params": params, "masks": init_vars["masks"]}):
            y = apply(variables, x)
            chex.assert_shape(y, y_ref.shape)
            chex.assert_trees_all_close(y, y_ref, rtol=1e-6, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*DENSE_CASES)
    def test_dense_equals_nn_dense(self, kwargs, shape):
        key = jax.random.key(0)
        x = jax.random.normal(jax.random.fold_in(key, 1), shape)
        ref = nn.Dense(**kwargs)
        params = _randomize_biases(ref.init(key, x)["params"], key)
        ours = Dense(**kwargs)
        init_vars = ours.init(key, x)
        chex.assert_trees_all_equal_shapes(init_vars["params"], params)
        y_ref = ref.apply({"params": params}, x)
        apply = self.variant(ours.apply)
        for variables in ({"params": params}, {"params": params, "masks": init_vars["masks"]}):
            y = apply(variables, x)
            chex.assert_shape(y, (*shape[:-1], kwargs["features"]))
            chex.assert_trees_all_close(y, y_ref, rtol=1e-6, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*[c for c in CONV_CASES if c[0] in MASK_CASES])
    def test_conv_channel_mask_zeroes_exactly_those_channels(self, kwargs, cin):
        ref, ours, params, x = _conv_setup(kwargs, cin, seed=1)
        features = kwargs["features"]
        mask = (np.arange(features) % 3 != 1).astype(np.float32)  # drop channels 1, 4, 7, ...
        y = self.variant(ours.apply)({"params": params, "masks": {"channel": jnp.asarray(mask)}}, x)
        y_ref = np.asarray(ref.apply({"params": params}, x))
        y = np.asarray(y)
        # Pruned channels are exact zeros even with a non-zero bias.
        np.testing.assert_array_equal(y[..., mask == 0], 0.0)
        chex.assert_trees_all_close(y[..., mask == 1], y_ref[..., mask == 1], rtol=1e-6, atol=1e-6)
        assert np.abs(y_ref[..., mask == 0]).min() > 0 or not kwargs.get("use_bias", True)

    @chex.variants(with_jit=True, without_jit=True)
    def test_dense_channel_mask(self):
        key = jax.random.key(2)
        x = jax.random.normal(key, (4, 6))
        ref = nn.Dense(5)
        params = _randomize_biases(ref.init(key, x)["params"], key)
        mask = jnp.array([0.0, 1.0, 1.0, 0.0, 1.0])
        y = np.asarray(self.variant(Dense(5).apply)({"params": params, "masks": {"channel": mask}}, x))
        y_ref = np.asarray(ref.apply({"params": params}, x))
        np.testing.assert_array_equal(y[:, [0, 3]], 0.0)
        chex.assert_trees_all_close(y[:, [1, 2, 4]], y_ref[:, [1, 2, 4]], rtol=1e-6, atol=1e-6)


    def test_soft_channel_mask_gates_output_linearly(self):
        key = jax.random.key(4)
        x = jax.random.normal(key, (4, 6))
        ref = nn.Dense(3)
        params = _randomize_biases(ref.init(key, x)["params"], key)
        gate = jnp.array([0.25, 0.5, 1.0])
        y = Dense(3).apply({"params": params, "masks": {"channel": gate}}, x)
        chex.assert_trees_all_close(y, gate * ref.apply({"params": params}, x), rtol=1e-6, atol=1e-6)


class _ConvThenDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(Conv(4, (3, 3), padding="SAME", name="conv")(x))
        return Dense(3, name="fc")(x.reshape(x.shape[0], -1))


class ElementMaskTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_kernel_mask_equals_hand_masked_kernel(self):
        key = jax.random.key(0)
        x = jax.random.normal(key, (2, 5, 5, 2))
        model = _ConvThenDense()
        variables = model.init(key, x)
        params = _randomize_biases(variables["params"], key)
        rng = np.random.default_rng(0)
        conv_km = (rng.random((3, 3, 2, 4)) < 0.6).astype(np.float32)
        fc_km = (rng.random((100, 3)) < 0.6).astype(np.float32)
        conv_cm = np.array([1.0, 0.0, 1.0, 1.0], np.float32)
        masks = {"conv": {"channel": jnp.asarray(conv_cm), "kernel": jnp.asarray(conv_km)},
                 "fc": {"channel": jnp.ones(3), "kernel": jnp.asarray(fc_km)}}
        y = self.variant(model.apply)({"params": params, "masks": masks}, x)

        # By hand with plain Flax layers: kernel * element mask, then the channel mask.
        p = params
        h = nn.Conv(4, (3, 3), padding="SAME").apply(
            {"params": {"kernel": p["conv"]["kernel"] * conv_km, "bias": p["conv"]["bias"]}}, x)
        h = nn.relu(h * conv_cm)
        y_ref = nn.Dense(3).apply(
            {"params": {"kernel": p["fc"]["kernel"] * fc_km, "bias": p["fc"]["bias"]}}, h.reshape(2, -1))
        chex.assert_trees_all_close(y, y_ref, rtol=1e-6, atol=1e-6)
        # and the element masks really changed the output
        assert not np.allclose(y, model.apply({"params": params}, x), atol=1e-3)


class BatchNormMaskTest(chex.TestCase):

    def _setup(self):
        key = jax.random.key(0)
        x = 2.0 + 3.0 * jax.random.normal(key, (4, 3, 3, 5))
        params = {"scale": jax.random.uniform(jax.random.fold_in(key, 1), (5,), minval=0.5, maxval=1.5),
                  "bias": 0.5 + jax.random.normal(jax.random.fold_in(key, 2), (5,))}
        stats = {"mean": 0.3 * jax.random.normal(jax.random.fold_in(key, 3), (5,)),
                 "var": jax.random.uniform(jax.random.fold_in(key, 4), (5,), minval=0.5, maxval=1.5)}
        mask = jnp.array([1.0, 0.0, 1.0, 0.0, 1.0])
        return x, params, stats, mask

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("train", True), ("eval", False))
    def test_masked_channel_exactly_zero(self, train):
        x, params, stats, mask = self._setup()
        ours, ref = BatchNorm(use_running_average=not train, momentum=0.9), nn.BatchNorm(use_running_average=not train,
                                                                             momentum=0.9, epsilon=1e-5)
        init_vars = ours.init(jax.random.key(0), x)
        np.testing.assert_array_equal(init_vars["masks"]["channel"], np.ones(5))
        variables = {"params": params, "batch_stats": stats, "masks": {"channel": mask}}
        apply = self.variant(lambda v, x: ours.apply(v, x, mutable=["batch_stats"]))
        y, new_state = apply(variables, x)
        y_ref, new_state_ref = ref.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
        y, y_ref = np.asarray(y), np.asarray(y_ref)
        np.testing.assert_array_equal(y[..., [1, 3]], 0.0)
        assert np.abs(y_ref[..., [1, 3]]).min() > 0  # plain BN would output beta-ish values there
        chex.assert_trees_all_close(y[..., [0, 2, 4]], y_ref[..., [0, 2, 4]], rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(new_state, new_state_ref, rtol=1e-6, atol=1e-7)
        if train:  # momentum 0.9: new = 0.9 * old + 0.1 * batch statistic
            batch_mean = np.asarray(x).mean(axis=(0, 1, 2))
            chex.assert_trees_all_close(new_state["batch_stats"]["mean"],
                                        0.9 * np.asarray(stats["mean"]) + 0.1 * batch_mean, rtol=1e-5)
        else:  # eval by hand: (x - mean) / sqrt(var + eps) * scale + bias, then mask
            hand = ((np.asarray(x) - stats["mean"]) / np.sqrt(np.asarray(stats["var"]) + 1e-5)
                    * params["scale"] + params["bias"]) * np.asarray(mask)
            chex.assert_trees_all_close(y, hand, rtol=1e-5, atol=1e-6)

    def test_without_masks_equals_plain_batchnorm(self):
        x, params, stats, _ = self._setup()
        for train in (True, False):
            y = BatchNorm(use_running_average=not train, momentum=0.9).apply(
                {"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
            y_ref = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5).apply(
                {"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
            chex.assert_trees_all_close(y, y_ref, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Quantizers on hand-picked tensors.
# ----------------------------------------------------------------------------------------------

class FakeQuantTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_unsigned_2_bits_on_0_3_gives_integer_levels(self):
        # s = 3 / (2^2 - 1) = 1: levels 0, 1, 2, 3; clip below 0 and above 3.
        x = jnp.array([-1.0, 0.0, 0.4, 0.6, 1.2, 1.7, 2.2, 2.9, 3.0, 5.0])
        expected = jnp.array([0.0, 0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 3.0])
        y = self.variant(fake_quant_unsigned)(x, 2.0, 3.0)
        chex.assert_trees_all_close(y, expected, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_unsigned_3_bits(self):
        # s = 1.4 / 7 = 0.2; x / s = 0.25, 0.75, 1.65, 5, clip(7.5) = 7.
        x = jnp.array([0.05, 0.15, 0.33, 1.0, 1.5])
        y = self.variant(fake_quant_unsigned)(x, 3.0, 1.4)
        chex.assert_trees_all_close(y, jnp.array([0.0, 0.2, 0.4, 1.0, 1.4]), atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_symmetric_3_bits_scale_is_max_over_3(self):
        # 3 bits: grid {-3..3} * s with s = 0.9 / 3 = 0.3.
        x = jnp.array([-2.0, -0.5, -0.1, 0.0, 0.2, 0.5, 0.8, 1.5])
        expected = 0.3 * jnp.array([-3.0, -2.0, 0.0, 0.0, 1.0, 2.0, 3.0, 3.0])
        y = self.variant(fake_quant_symmetric)(x, 3.0, 0.9)
        chex.assert_trees_all_close(y, expected, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_symmetric_2_bits_is_ternary(self):
        x = jnp.array([-0.7, -0.3, 0.2, 0.6, 2.0])
        y = self.variant(fake_quant_symmetric)(x, 2.0, 1.0)
        chex.assert_trees_all_close(y, jnp.array([-1.0, 0.0, 0.0, 1.0, 1.0]), atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_symmetric_per_channel_scale_broadcasts(self):
        x = jnp.array([[0.5, 0.5], [-1.0, 2.0]])
        y = self.variant(fake_quant_symmetric)(x, 3.0, jnp.array([1.5, 3.0]))  # s = 0.5, 1.0
        chex.assert_trees_all_close(y, jnp.array([[0.5, 0.0], [-1.0, 2.0]]), atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_one_bit_is_sign(self):
        x = jnp.array([-2.0, -0.1, 0.0, 0.3, 4.0])
        y = self.variant(fake_quant_symmetric)(x, 1.0, 0.5)
        chex.assert_trees_all_close(y, jnp.array([-0.5, -0.5, 0.5, 0.5, 0.5]), atol=0.0)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("b32", 32.0), ("b64", 64.0))
    def test_full_precision_is_identity(self, bits):
        x = jnp.array([-7.3, -0.123456, 0.0, 0.987654, 11.0])  # also outside the clip range
        chex.assert_trees_all_equal(self.variant(fake_quant_symmetric)(x, bits, 1.0), x)
        chex.assert_trees_all_equal(self.variant(fake_quant_unsigned)(x, bits, 1.0), x)
        kernel = jnp.array([[0.31, -0.77], [0.123, 0.5]])
        chex.assert_trees_all_equal(self.variant(quantize_weight)(kernel, bits), kernel)

    @chex.variants(with_jit=True, without_jit=True)
    def test_quantize_weight_per_output_channel(self):
        # column 0: max 0.9, s = 0.3 -> 0.3, -0.9, 0.5/0.3 = 1.67 -> 0.6
        # column 1: max 0.4, s = 0.4/3 -> 0.1/s = 0.75 -> 1, 0.25/s = 1.875 -> 2, -0.4 -> -3
        kernel = jnp.array([[0.3, 0.1], [-0.9, 0.25], [0.5, -0.4]])
        s1 = 0.4 / 3
        expected = jnp.array([[0.3, s1], [-0.9, 2 * s1], [0.6, -3 * s1]])
        chex.assert_trees_all_close(self.variant(quantize_weight)(kernel, 3.0), expected, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_quantize_weight_conv_kernel_against_numpy(self):
        kernel = jax.random.normal(jax.random.key(0), (3, 3, 4, 5))
        k = np.asarray(kernel, np.float64)
        for bits in (2.0, 4.0, 8.0):
            s = np.abs(k).max(axis=(0, 1, 2)) / (2 ** (bits - 1) - 1)
            expected = np.round(k / s) * s
            y = self.variant(quantize_weight)(kernel, bits)
            chex.assert_trees_all_close(y, expected.astype(np.float32), atol=1e-5)
            assert len(np.unique(np.asarray(y)[..., 0])) <= 2 ** bits - 1

    @chex.variants(with_jit=True, without_jit=True)
    def test_quantize_activation_uses_batch_max_when_no_range(self):
        x = jnp.array([0.0, 0.9, 2.2, 4.0])  # s = 4 / 3: 0, 0.675, 1.65, 3 -> 0, 1, 2, 3
        y = self.variant(lambda x: quantize_activation(x, 2.0))(x)
        chex.assert_trees_all_close(y, jnp.array([0.0, 4 / 3, 8 / 3, 4.0]), atol=1e-6)
        y = self.variant(lambda x: quantize_activation(x, 2.0, x_range=2.0))(x)  # s = 2/3: 0, 1.35, clip 3, 3
        chex.assert_trees_all_close(y, jnp.array([0.0, 2 / 3, 2.0, 2.0]), atol=1e-6)
        xs = jnp.array([-4.0, -1.0, 1.9, 3.0])  # signed, 3 bits, s = 4/3: -3, -0.75, 1.425, 2.25
        y = self.variant(lambda x: quantize_activation(x, 3.0, signed=True))(xs)
        chex.assert_trees_all_close(y, jnp.array([-4.0, -4 / 3, 4 / 3, 8 / 3]), atol=1e-6)


class STEGradientTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_ste_round(self):
        x = jnp.array([-1.7, -0.2, 0.4, 2.6])
        chex.assert_trees_all_close(self.variant(ste_round)(x), jnp.array([-2.0, 0.0, 0.0, 3.0]))
        g = self.variant(jax.grad(lambda x: ste_round(x).sum()))(x)
        chex.assert_trees_all_equal(g, jnp.ones(4))

    @chex.variants(with_jit=True, without_jit=True)
    def test_unsigned_gradient_one_inside_zero_outside(self):
        x = jnp.array([-1.0, -0.01, 0.4, 1.7, 2.99, 3.01, 5.0])
        g = self.variant(jax.grad(lambda x: fake_quant_unsigned(x, 2.0, 3.0).sum()))(x)
        chex.assert_trees_all_equal(g, jnp.array([0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("b1", 1.0), ("b3", 3.0), ("b8", 8.0))
    def test_symmetric_gradient_one_inside_zero_outside(self, bits):
        x = jnp.array([-3.0, -1.01, -0.5, 0.2, 0.99, 1.01, 2.0])
        g = self.variant(jax.grad(lambda x: fake_quant_symmetric(x, bits, 1.0).sum()))(x)
        chex.assert_trees_all_equal(g, jnp.array([0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]))

    @chex.variants(with_jit=True, without_jit=True)
    def test_full_precision_gradient_is_one_everywhere(self):
        x = jnp.array([-3.0, 0.5, 2.0])
        g = self.variant(jax.grad(lambda x: fake_quant_symmetric(x, 32.0, 1.0).sum()))(x)
        chex.assert_trees_all_equal(g, jnp.ones(3))

    @chex.variants(with_jit=True, without_jit=True)
    def test_quantize_weight_gradient_one_off_the_max(self):
        kernel = jnp.array([[0.3, 0.1], [-0.9, 0.25], [0.5, -0.4]])
        g = self.variant(jax.grad(lambda k: quantize_weight(k, 3.0).sum()))(kernel)
        not_max = np.array([[1, 1], [0, 1], [1, 0]], bool)
        chex.assert_trees_all_equal(np.asarray(g)[not_max], np.ones(4, np.float32))

    def test_quantize_weight_gradient_is_identity_everywhere(self):
        kernel = jnp.array([[0.3, 0.1], [-0.9, 0.25], [0.5, -0.4]])
        g = jax.grad(lambda k: quantize_weight(k, 3.0).sum())(kernel)
        chex.assert_trees_all_equal(g, jnp.ones_like(kernel))


# ----------------------------------------------------------------------------------------------
# Decisions are data: vmap over masks and bit widths, no recompilation.
# ----------------------------------------------------------------------------------------------

def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


@pytest.fixture(scope="module")
def lenet(zoo):
    table = zoo.table("lenet5")
    variables = zoo.variables("lenet5")
    x = jax.random.normal(jax.random.key(7), (3, 28, 28, 1))
    return table, variables, x


def test_vmap_over_channel_masks_equals_separate_applies(lenet):
    table, variables, x = lenet
    rng = np.random.default_rng(0)
    stack = []
    for _ in range(3):
        gms = [jnp.asarray((rng.random(w) < 0.5) | (np.arange(w) == 0), jnp.float32) for w in table.widths]
        stack.append(table.layer_masks(gms, variables["masks"]))
    params = variables["params"]
    apply = jax.jit(lambda m: table.model.apply({"params": params, "masks": m}, x))
    ys = jax.jit(jax.vmap(apply))(_stack(stack))
    chex.assert_shape(ys, (3, 3, 10))
    for i, m in enumerate(stack):
        chex.assert_trees_all_close(ys[i], apply(m), rtol=1e-5, atol=1e-6)
    assert not np.allclose(ys[0], ys[1], atol=1e-4)  # the three policies really differ


def _quant(table, bits_w, bits_a=None):
    q = {}
    for layer in table.layers:
        q[layer.path] = {"bits_w": jnp.asarray(bits_w, jnp.float32)}
        if bits_a is not None:
            q[layer.path]["bits_a"] = jnp.asarray(bits_a, jnp.float32)
    return q


def test_vmap_over_bit_widths_equals_separate_applies(lenet):
    table, variables, x = lenet
    bits = [2.0, 4.0, 8.0]
    apply = jax.jit(lambda q: table.model.apply({"params": variables["params"], "quant": q}, x))
    stacked = _stack([_quant(table, b, b + 1) for b in bits])
    ys = jax.jit(jax.vmap(apply))(stacked)
    chex.assert_shape(ys, (3, 3, 10))
    for i, b in enumerate(bits):
        chex.assert_trees_all_close(ys[i], apply(_quant(table, b, b + 1)), rtol=1e-5, atol=1e-6)
    assert not np.allclose(ys[0], ys[2], atol=1e-4)


def test_changing_bits_does_not_retrace_jitted_apply(lenet):
    table, variables, x = lenet
    traces = []

    @jax.jit
    def apply(q):
        traces.append(1)  # Python side effect: runs only while tracing
        return table.model.apply({"params": variables["params"], "quant": q}, x)

    outs = [apply(_quant(table, b, b)) for b in (2.0, 3.0, 5.0, 8.0, 32.0)]
    assert len(traces) == 1
    full = table.model.apply({"params": variables["params"]}, x)
    chex.assert_trees_all_close(outs[-1], full, rtol=1e-6, atol=1e-6)  # 32 bits = not quantized
    errs = [float(jnp.abs(o - full).max()) for o in outs[:-1]]
    assert errs[0] > errs[-1] > 0  # coarser grids give larger errors, so bits are really used


def test_layer_quant_collection_equals_hand_quantized_layer():
    key = jax.random.key(0)
    x = jax.random.uniform(key, (4, 6), minval=-0.2, maxval=2.0)
    ref = nn.Dense(3)
    params = _randomize_biases(ref.init(key, x)["params"], key)
    for signed in (False, True):
        q = {"bits_w": jnp.float32(3.0), "bits_a": jnp.float32(2.0), "range_a": jnp.float32(1.5)}
        y = Dense(3, signed_input=signed).apply({"params": params, "quant": q}, x)
        fq = fake_quant_symmetric if signed else fake_quant_unsigned
        x_q = fq(x, 2.0, 1.5)
        k = np.asarray(params["kernel"])
        s = np.abs(k).max(axis=0) / 3.0
        k_q = np.round(k / s) * s
        y_ref = np.asarray(x_q) @ k_q + np.asarray(params["bias"])
        chex.assert_trees_all_close(y, y_ref.astype(np.float32), rtol=1e-5, atol=1e-5)
