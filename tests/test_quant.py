"""Tests for jaxcompress.quant: quantizers, STE, k-means, packing, exact sizes, export, budgets.

Expected numbers are worked out by hand in the comments next to them.
"""
import functools
import math
import os
import tempfile

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxcompress import cost
from jaxcompress.errors import ConfigError
from jaxcompress.layers import BatchNorm, Conv, Dense
from jaxcompress.models import describe
from jaxcompress.quant import (SizeModel, WeightQuantizer, calibrate_ranges, enforce_budget, export_packed,
                               fake_quant_weight, fold_batchnorm, kmeans_1d, layer_bits, load_packed, make_quant,
                               make_quantized_apply, pack_bits, quantized_params, read_policy, sparse_layout,
                               uniform_decode, uniform_encode, unpack_bits, write_policy)
from jaxcompress.quant import export as E
from jaxcompress.quant.budget import allocate_by_sensitivity, floors
from jaxcompress.quant.calibrate import mse_optimal_range
from jaxcompress.quant.qat import add_kmeans_assignments
from jaxcompress.quant.size import sparse_entries, sparse_positions

@pytest.fixture
def tmp_path():
    """A private temporary directory (pytest's numbered basetemp can be pruned by a concurrent run)."""
    import pathlib
    with tempfile.TemporaryDirectory(prefix="jaxcompress-quant-") as d:
        yield pathlib.Path(d)


W = np.array([[1.0, 0.3], [-0.4, 0.9], [0.2, -0.6]], np.float32)  # (in=3, out=2)


@functools.partial(jax.jit, static_argnames=("scheme", "granularity"))
def _encode_decode(w, bits, scheme, granularity):
    enc = uniform_encode(w, bits, scheme, granularity)
    return uniform_decode(enc["codes"], bits, enc["scale"], enc.get("zero_point")), enc


def _fq(w, bits, scheme="symmetric", granularity="channel"):
    q, enc = _encode_decode(jnp.asarray(w, jnp.float32), jnp.float32(bits), scheme, granularity)
    return np.asarray(q), jax.device_get(enc)


# ------------------------------------------------------------------------------------------------
# Uniform quantizers against hand-computed grids
# ------------------------------------------------------------------------------------------------

def test_symmetric_per_channel_two_and_three_bits_by_hand():
    # 2 bits: grid {-1, 0, 1} * max|w| per output channel: steps 1.0 and 0.9.
    q, enc = _fq(W, 2)
    np.testing.assert_allclose(q, [[1.0, 0.0], [0.0, 0.9], [0.0, -0.9]], atol=1e-7)
    np.testing.assert_allclose(enc["scale"], [1.0, 0.9], rtol=1e-7)
    np.testing.assert_array_equal(enc["codes"], [[2, 1], [1, 2], [1, 0]])  # round(w / s) + 1
    # 3 bits: steps max/3: 1/3 and 0.3; -0.4 * 3 = -1.2 -> -1, 0.2 * 3 = 0.6 -> 1, -0.6 / 0.3 = -2.
    q, _ = _fq(W, 3)
    np.testing.assert_allclose(q, [[1.0, 0.3], [-1 / 3, 0.9], [1 / 3, -0.6]], rtol=1e-6)


def test_symmetric_per_tensor_and_one_bit_by_hand():
    q, enc = _fq(W, 2, granularity="tensor")  # one step, max|w| = 1.0: 0.9 -> 1, -0.6 -> -1
    np.testing.assert_allclose(q, [[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], atol=1e-7)
    assert enc["scale"].shape == ()
    q, _ = _fq(W, 1, granularity="tensor")  # sign quantization: +-max|w|
    np.testing.assert_allclose(q, [[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0]])


def test_asymmetric_by_hand():
    # [lo, hi] = [-1, 2], 2 bits: step 1, zero point 1, codes [0, 1, 1, 3]
    # (0.5 rounds half to even, to 0).
    w = np.array([[-1.0], [0.0], [0.5], [2.0]], np.float32)
    q, enc = _fq(w, 2, "asymmetric", "tensor")
    np.testing.assert_allclose(q.ravel(), [-1.0, 0.0, 0.0, 2.0], atol=1e-7)
    np.testing.assert_array_equal(np.asarray(enc["codes"]).ravel(), [0, 1, 1, 3])
    assert float(enc["zero_point"]) == 1.0


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_round_trip_error_at_most_half_a_step(scheme, granularity):
    w = np.asarray(jax.random.normal(jax.random.key(3), (3, 3, 5, 7)))
    for bits in range(2, 9):
        q, enc = _fq(w, bits, scheme, granularity)
        step = np.asarray(enc["scale"])
        assert np.all(np.abs(w - q) <= step / 2 * (1 + 1e-5) + 1e-7), bits
        # zero maps to zero exactly (pruned weights stay pruned)
        z, _ = _fq(np.where(np.abs(w) < 0.5, 0.0, w), bits, scheme, granularity)
        assert np.all(z[np.abs(w) < 0.5] == 0.0)


def test_encode_decode_jit_equals_eager_and_bits_are_traced():
    w = jax.random.normal(jax.random.key(0), (40, 12))
    f = lambda w, b: fake_quant_weight(w, b, WeightQuantizer())
    jitted = jax.jit(f)
    for bits in (2, 5, 8):
        chex.assert_trees_all_equal(f(w, jnp.float32(bits)), jitted(w, jnp.float32(bits)))
    # one program for every bit width; vmap over a stack of widths
    stack = jax.vmap(lambda b: f(w, b))(jnp.asarray([2.0, 4.0, 32.0]))
    chex.assert_trees_all_equal(stack[2], w)
    chex.assert_trees_all_equal(stack[0], f(w, jnp.float32(2)))


def test_symmetric_matches_the_layers_own_weight_quantizer():
    from jaxcompress.layers import quantize_weight
    w = jax.random.normal(jax.random.key(1), (3, 3, 4, 6))
    ours = jax.jit(lambda w, b: fake_quant_weight(w, b, WeightQuantizer()))
    theirs = jax.jit(quantize_weight)
    for bits in (2, 4, 8):
        b = jnp.float32(bits)
        np.testing.assert_allclose(ours(w, b), theirs(w, b), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# STE gradients
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("quantizer", [WeightQuantizer(), WeightQuantizer("asymmetric", "tensor"),
                                       WeightQuantizer("kmeans")])
def test_ste_gradient_is_identity_and_masked_entries_get_none(quantizer):
    w = jax.random.normal(jax.random.key(0), (4, 3))
    c = jax.random.normal(jax.random.key(1), (4, 3))
    mask = jnp.asarray(np.array([[1, 0, 1], [1, 1, 1], [0, 1, 1], [1, 1, 0]], np.float32))
    assign = kmeans_1d(w, 2, mask)[0] if quantizer.scheme == "kmeans" else None
    g = jax.grad(lambda w: jnp.sum(c * fake_quant_weight(w, 2, quantizer, mask, assign)))(w)
    chex.assert_trees_all_close(g, c * mask)
    g = jax.grad(lambda w: jnp.sum(c * fake_quant_weight(w, 32, quantizer)))(w)  # float: plain identity
    chex.assert_trees_all_close(g, c)


class Tiny(nn.Module):
    """Odd sizes on purpose: conv 3x3x2->5 with BatchNorm, dense 125->7, dense 7->3 (no bias)."""
    widths: tuple = (5, 7)

    @nn.compact
    def __call__(self, x, train=False):
        x = Conv(self.widths[0], (3, 3), use_bias=False, signed_input=True, name="conv")(x)
        x = nn.relu(BatchNorm(use_running_average=not train, name="bn")(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(Dense(self.widths[1], name="fc1")(x))
        return Dense(3, use_bias=False, name="out")(x)


@pytest.fixture(scope="module")
def tiny():
    model = Tiny()
    table = describe(model, (5, 5, 2))
    x = jax.random.normal(jax.random.key(7), (16, 5, 5, 2))
    v = jax.jit(model.init)(jax.random.key(0), x[:1])
    k = jax.random.split(jax.random.key(9), 4)
    v["params"]["bn"]["scale"] = 1 + 0.3 * jax.random.normal(k[0], (5,))
    v["params"]["bn"]["bias"] = 0.2 * jax.random.normal(k[1], (5,))
    v["batch_stats"]["bn"]["mean"] = jax.random.normal(k[2], (5,))
    v["batch_stats"]["bn"]["var"] = jnp.exp(jax.random.normal(k[3], (5,)))
    fc1_mask = (jax.random.uniform(jax.random.key(4), (125, 7)) > 0.6).astype(jnp.float32)  # element-pruned
    v["masks"]["fc1"]["kernel"] = fc1_mask
    return model, table, v, x


def test_qat_gradient_equals_float_gradient_at_the_quantized_weights(tiny):
    model, table, v, x = tiny
    quant = make_quant(table, bits_w=3)
    apply_q = make_quantized_apply(model)
    loss_q = lambda p: jnp.sum(apply_q({**v, "params": p, "quant": quant}, x) ** 2)
    wq = quantized_params(v["params"], v["masks"], quant, WeightQuantizer())
    loss_f = lambda p: jnp.sum(model.apply({**v, "params": p}, x) ** 2)
    chex.assert_trees_all_close(jax.jit(jax.grad(loss_q))(v["params"]), jax.jit(jax.grad(loss_f))(wq),
                                rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# k-means
# ------------------------------------------------------------------------------------------------

def test_kmeans_tiny_tensor_by_hand():
    x = jnp.asarray([0.0, 0.1, 0.2, 0.9, 1.0, 5.0])
    # 1 bit: init [0, 5], midpoint 2.5 -> {0, .1, .2, .9, 1} (mean .44) and {5}; stable.
    assign, book = kmeans_1d(x, 1)
    np.testing.assert_array_equal(assign, [0, 0, 0, 0, 0, 1])
    np.testing.assert_allclose(book[:2], [0.44, 5.0], rtol=1e-6)
    # 2 bits: init [0, 5/3, 10/3, 5], midpoints [.83, 2.5, 4.17] -> {0, .1, .2}, {.9, 1}, {}, {5};
    # means [.1, .95, -, 5]; the empty cluster reports 0.
    assign, book = kmeans_1d(x, 2)
    np.testing.assert_array_equal(assign, [0, 0, 0, 1, 1, 3])
    np.testing.assert_allclose(book[:4], [0.1, 0.95, 0.0, 5.0], rtol=1e-6, atol=1e-7)
    assert np.all(np.asarray(book[4:]) == 0)
    # masked: without 5.0 the range is [0, 1]: init [0, 1] -> {0, .1, .2}, {.9, 1}
    assign, book = kmeans_1d(x, 1, jnp.asarray([1, 1, 1, 1, 1, 0.0]))
    np.testing.assert_allclose(book[:2], [0.1, 0.95], rtol=1e-6)


def test_kmeans_weight_sharing_uses_at_most_2_to_the_bits_values():
    w = jax.random.normal(jax.random.key(2), (3, 3, 4, 8))
    share = jax.jit(lambda w, b, a: fake_quant_weight(w, b, WeightQuantizer("kmeans"), assign=a))
    for bits in (1, 3, 5):
        assign, _ = kmeans_1d(w, bits)
        q = share(w, jnp.float32(bits), assign)
        assert len(np.unique(np.asarray(q))) <= 2 ** bits
        assert int(assign.max()) < 2 ** bits


# ------------------------------------------------------------------------------------------------
# Bit packing and relative indices
# ------------------------------------------------------------------------------------------------

def test_pack_bits_by_hand():
    np.testing.assert_array_equal(pack_bits([1, 0, 1, 1], 1), [0b1101])  # LSB first
    np.testing.assert_array_equal(pack_bits([5, 3], 3), [29])  # bits 1,0,1 | 1,1,0 -> 1 + 4 + 8 + 16
    np.testing.assert_array_equal(pack_bits([0x1234], 16), [0x34, 0x12])
    with pytest.raises(ValueError):
        pack_bits([4], 2)


@pytest.mark.parametrize("bits", list(range(1, 9)) + [13, 32])
def test_pack_round_trip_odd_sizes(bits):
    rng = np.random.default_rng(bits)
    for n in (1, 7, 9, 1001):
        codes = rng.integers(0, 2 ** bits, n, dtype=np.uint64)
        packed = pack_bits(codes, bits)
        assert packed.size == math.ceil(n * bits / 8)
        np.testing.assert_array_equal(unpack_bits(packed, bits, n), codes)


def test_relative_index_layout_by_hand():
    # kept positions 0, 5, 6 with 2-bit gaps (a gap field of 3 is a filler that skips 3):
    # gap 0 -> 0; run of 4 zeros = filler (3) + gap 1 -> 5; gap 0 -> 6.
    keep = np.array([1, 0, 0, 0, 0, 1, 1, 0, 0])
    gaps, source = sparse_layout(keep, 2)
    np.testing.assert_array_equal(gaps, [0, 3, 1, 0])
    np.testing.assert_array_equal(source, [0, -1, 5, 6])
    assert sparse_entries(keep, 2) == 4
    np.testing.assert_array_equal(sparse_positions(gaps, 2)[0], [0, 5, 6])
    keep = np.zeros(12, int)
    keep[10] = 1  # run of 10 = 3 fillers + gap 1
    gaps, _ = sparse_layout(keep, 2)
    np.testing.assert_array_equal(gaps, [3, 3, 3, 1])
    np.testing.assert_array_equal(sparse_positions(gaps, 2)[0], [10])


# ------------------------------------------------------------------------------------------------
# Exact size accounting
# ------------------------------------------------------------------------------------------------

def test_lenet5_bytes_by_hand(zoo):
    table = zoo.table("lenet5")
    # weights 150 + 2400 + 48000 + 10080 + 840 = 61470; 236 outputs: 236 float32 biases and scales.
    assert cost.summarize(table)["totals"]["bytes"] == 4 * 61706
    assert cost.summarize(table, None, make_quant(table, 8))["totals"]["bytes"] == 61470 + 944 + 944
    # 4 bits: ceil(150 / 2) + 1200 + 24000 + 5040 + 420 = 30735
    assert cost.summarize(table, None, make_quant(table, 4))["totals"]["bytes"] == 30735 + 944 + 944
    asym = WeightQuantizer("asymmetric")  # + one uint8 zero point per output channel
    assert cost.summarize(table, None, make_quant(table, 8), quantizer=asym)["totals"]["bytes"] == 63358 + 236
    kmeans = WeightQuantizer("kmeans")  # 5 codebooks of 16 float32 instead of 236 scales
    assert cost.summarize(table, None, make_quant(table, 4), quantizer=kmeans)["totals"]["bytes"] == \
        30735 + 5 * 16 * 4 + 944


def test_sparse_layer_bytes_by_hand(tiny):
    _, table, v, _ = tiny
    keep = np.asarray(v["masks"]["fc1"]["kernel"])
    entries = sparse_entries(np.moveaxis(keep, -1, 0).reshape(-1), 5)  # output-channel-major, 5-bit gaps
    row = cost.summarize(table, v["masks"], make_quant(table, 3))["layers"][1]
    assert row["layer"] == "fc1" and row["format"] == "sparse" and row["entries"] == entries
    assert entries >= keep.sum()
    # 3-bit codes + 5-bit gaps, each stream rounded up to bytes; 7 scales, 7 biases
    assert row["bytes"] == math.ceil(entries * 3 / 8) + math.ceil(entries * 5 / 8) + 28 + 28


# ------------------------------------------------------------------------------------------------
# Packed export: file size == accounting, loaded model == fake-quant model
# ------------------------------------------------------------------------------------------------

QUANTIZERS = [WeightQuantizer(), WeightQuantizer("symmetric", "tensor"), WeightQuantizer("asymmetric"),
              WeightQuantizer("kmeans")]


@pytest.mark.parametrize("quantizer", QUANTIZERS, ids=lambda q: f"{q.scheme}-{q.granularity}")
def test_export_round_trip_every_bit_width(tiny, tmp_path, quantizer):
    model, table, v, x = tiny
    fq_params = jax.jit(lambda p, m, q: quantized_params(p, m, q, quantizer))
    for bits in range(1, 9):
        quant = make_quant(table, bits_w={"conv": bits, "fc1": bits, "out": 9 - bits})
        if quantizer.scheme == "kmeans":
            quant = add_kmeans_assignments(v["params"], v["masks"], quant, iters=5)
        variables = {**v, "quant": quant}
        path = str(tmp_path / f"m{bits}.npz")
        info = export_packed(path, table, variables, model_name="tiny", num_classes=3, quantizer=quantizer)
        accounting = cost.summarize(table, v["masks"], quant, quantizer=quantizer)["totals"]["bytes"]
        assert info["payload_bytes"] == accounting
        assert os.path.getsize(path) == info["file_bytes"]
        assert 0 < info["file_bytes"] - info["payload_bytes"] - info["meta_bytes"] < 1024  # npz/npy headers
        _, loaded, meta = load_packed(path, model=Tiny())
        expected = traverse_util.flatten_dict(fq_params(v["params"], v["masks"], quant))
        got = traverse_util.flatten_dict(loaded["params"])
        for layer in ("conv", "fc1", "out"):
            np.testing.assert_array_equal(got[(layer, "kernel")], expected[(layer, "kernel")])
        assert meta["layers"][1]["format"] == "sparse"


def test_loaded_outputs_equal_fake_quant_outputs(tiny, tmp_path):
    model, table, v, x = tiny
    quant = make_quant(table, bits_w={"conv": 8, "fc1": 3, "out": 5}, bits_a={"fc1": 4, "out": 6})
    apply_q = make_quantized_apply(model)
    quant, _ = calibrate_ranges(apply_q, {**v, "quant": quant}, [x], "minmax")
    variables = {**v, "quant": quant}
    path = str(tmp_path / "m.npz")
    export_packed(path, table, variables, model_name="tiny", num_classes=3)
    loaded_model, loaded, _ = load_packed(path, model=Tiny())
    folded = fold_batchnorm(variables, E.norm_epsilons(model, (5, 5, 2)))
    out = E.compare_outputs(apply_q, folded, loaded_model.apply, loaded, x)
    assert out["max_abs_diff"] == 0.0 and out["argmax_agreement"] == 1.0
    # folding BatchNorm changes the float network's outputs only by rounding
    float_folded = {k: c for k, c in folded.items() if k != "quant"}
    np.testing.assert_allclose(model.apply(float_folded, x), model.apply(v, x), rtol=1e-5, atol=1e-5)


def test_export_refuses_an_unshrunk_network(tiny, tmp_path):
    _, table, v, _ = tiny
    masks = jax.tree.map(lambda m: m, v["masks"])
    masks["conv"]["channel"] = jnp.asarray([1.0, 0, 1, 1, 1])
    masks["bn"]["channel"] = masks["conv"]["channel"]
    with pytest.raises(ValueError, match="shrink"):
        export_packed(str(tmp_path / "x.npz"), table, {**v, "masks": masks}, model_name="tiny", num_classes=3)


# ------------------------------------------------------------------------------------------------
# Calibration
# ------------------------------------------------------------------------------------------------

class OneDense(nn.Module):
    signed: bool = False

    @nn.compact
    def __call__(self, x, train=False):
        return Dense(2, signed_input=self.signed, name="fc")(x)


def test_calibration_minmax_percentile_and_mse():
    model = OneDense()
    bits = {"fc": {"bits_a": jnp.float32(4)}}
    x = jnp.asarray([[0.0, 1.0, 2.0, 3.0, 10.0]])
    v = model.init(jax.random.key(0), x)
    q, report = calibrate_ranges(model.apply, {**v, "quant": bits}, [x], "minmax")
    assert float(q["fc"]["range_a"]) == 10.0 and not report["fc"]["signed"]
    q, _ = calibrate_ranges(model.apply, {**v, "quant": bits}, [x], "percentile", percentile=50.0)
    assert float(q["fc"]["range_a"]) == pytest.approx(2.0)  # the median of {0, 1, 2, 3, 10}
    q, _ = calibrate_ranges(model.apply, {**v, "quant": bits}, [x, -x], "mse")
    assert 0 < float(q["fc"]["range_a"]) <= 10.0
    q, report = calibrate_ranges(OneDense(signed=True).apply, {**v, "quant": bits}, [-x], "minmax")
    assert float(q["fc"]["range_a"]) == 10.0 and report["fc"]["signed"]  # max |x|


def test_mse_optimal_range_against_brute_force():
    values = np.array([0.0, 1.0, 2.0, 3.0, 10.0], np.float32)
    r = mse_optimal_range(values, 2, signed=False, max_value=10.0, grid=100)
    # 2 bits unsigned: levels {0, r/3, 2r/3, r}; numpy brute force over the same grid
    cands = 10.0 * np.arange(1, 101) / 100

    def err(c):
        s = c / 3
        return np.mean((np.round(np.clip(values, 0, c) / s) * s - values) ** 2)
    assert r == pytest.approx(cands[int(np.argmin([err(c) for c in cands]))], rel=1e-6)
    assert err(r) < err(10.0)


# ------------------------------------------------------------------------------------------------
# Budgets (HAQ) and allocation
# ------------------------------------------------------------------------------------------------

def test_haq_budget_enforcement_meets_budget_and_is_monotone(zoo):
    table = zoo.table("lenet5")
    size = SizeModel(table)
    start = {l.path: 8 for l in table.layers}
    assert size(start) == 63358
    # all-minimum: conv1 and fc3 at 8 bits, the rest at 2: 150 + 600 + 12000 + 2520 + 840 + 944 + 944
    assert size(floors(list(start), start)) == 17998
    # just below 8 bits everywhere: the last layer is held at 8, so fc2 goes to 7 bits first
    assert enforce_budget(start, size, 63357) == {"conv1": 8, "conv2": 8, "fc1": 8, "fc2": 7, "fc3": 8}
    previous = None
    for budget in (60000, 45000, 30000, 25000, 20000, 17998):
        bits = enforce_budget(start, size, budget)
        assert size(bits) <= budget
        assert bits["conv1"] == 8 and bits["fc3"] == 8
        if previous is not None:  # smaller budget -> no layer gets more bits
            assert all(bits[p] <= previous[p] for p in bits)
        previous = bits
    with pytest.raises(ConfigError, match="cannot be met"):
        enforce_budget(start, size, 17997)


def test_bitops_budget(zoo):
    from jaxcompress.quant import bitops
    table = zoo.table("lenet5")
    ops = bitops(table)
    eight = {l.path: 8 for l in table.layers}
    # MACs 117,600 + 240,000 + 48,000 + 10,080 + 840 = 416,520, times 8 x 8 bits
    assert ops(eight, eight) == 416520 * 64
    bits = enforce_budget(eight, lambda bw: ops(bw, eight), 416520 * 48)
    assert ops(bits, eight) <= 416520 * 48 and bits["conv1"] == 8 and bits["fc3"] == 8


def test_sensitivity_allocation_lowers_the_insensitive_layer_first(zoo):
    table = zoo.table("lenet5")
    size = SizeModel(table)
    start = {l.path: 8 for l in table.layers}
    sens = {p: {b: 0.0 for b in range(1, 9)} for p in start}
    sens["fc1"] = {b: (8 - b) * 1.0 for b in range(1, 9)}  # fc1 hurts, fc2 and conv2 do not
    # every lowering of fc2 saves 1260 B, of conv2 300 B: free layers go first, biggest saving first
    bits = allocate_by_sensitivity(start, sens, size, size(start) - 5000)
    assert bits == {"conv1": 8, "conv2": 8, "fc1": 8, "fc2": 4, "fc3": 8}  # 5040 B saved
    # conv2 is free down to 6 bits, fc2 costs a little per bit: conv2 8 -> 6 (600 B), fc2 8 -> 6
    # (3120 B in all >= 2000), then the 1120 B of slack buy conv2's two bits back.
    sens["conv2"] = {b: 0.0 if b >= 6 else 10.0 for b in range(1, 9)}
    sens["fc2"] = {b: (8 - b) * 5e-4 for b in range(1, 9)}
    bits = allocate_by_sensitivity(start, sens, size, size(start) - 2000)
    assert bits == {"conv1": 8, "conv2": 8, "fc1": 8, "fc2": 6, "fc3": 8}
    assert size(bits) == size(start) - 2520


# ------------------------------------------------------------------------------------------------
# Bad input: one-line ConfigError
# ------------------------------------------------------------------------------------------------

def test_bad_bits_and_policies(zoo, tmp_path):
    table = zoo.table("lenet5")
    for bad in (0, 9, 2.5, "x"):
        with pytest.raises(ConfigError, match="bits_w"):
            layer_bits(table, bad, None, "bits_w")
    with pytest.raises(ConfigError, match="bits_a"):
        layer_bits(table, 1, None, "bits_a")  # activations: 2..8
    with pytest.raises(ConfigError, match="unknown layers"):
        layer_bits(table, 8, {"conv9": 4}, "bits_w")
    path = str(tmp_path / "policy.json")
    write_policy(path, {"conv1": 8, "fc2": 3}, {"fc2": 4}, model="lenet5", reward=0.5)
    policy = read_policy(path, table, "lenet5")
    assert policy["bits_w"] == {"conv1": 8, "fc2": 3} and policy["reward"] == 0.5
    write_policy(path, {"conv1": 8, "nope": 3})
    with pytest.raises(ConfigError, match="unknown layers"):
        read_policy(path, table)
    with pytest.raises(ConfigError, match="does not exist"):
        read_policy(str(tmp_path / "missing.json"), table)
    with pytest.raises(ConfigError, match="calibration data is empty"):
        calibrate_ranges(lambda *a, **k: None, {"params": {}, "quant": {}}, [], "minmax")


def test_job_config_errors_before_any_work(tmp_path):
    from configs import default
    from jaxcompress import jobs
    cases = [("bits_w", 9, "bits_w"), ("bits_a", 1, "bits_a"), ("calib_batches", 0, "calibration data is empty"),
             ("scheme", "lloyd", "scheme"), ("mode", "qtq", "mode"), ("policy", "/nonexistent.json", "policy")]
    for field, value, match in cases:
        c = default.get_config()
        c.job = "quantize"
        c.quant[field] = value
        with pytest.raises(ConfigError, match=match) as e:
            jobs.run(c, str(tmp_path / field))
        assert "\n" not in str(e.value)
