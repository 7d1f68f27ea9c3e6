"""STAMP: set encoder invariances, Kumaraswamy gates, KL, meta-step, deployment."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import integrate

from conftest import fast_jit  # tests/ is on sys.path (pytest's prepend import mode)

from jaxcompress.layers import BatchNorm, Conv, Dense
from jaxcompress.models import describe
from jaxcompress.pruning import shrink
from jaxcompress.stamp import (GroupLayout, MaskGenerator, SetEncoder, SparsityObjective, Stamp, TaskSampler,
                               hard_group_masks, kl_kumaraswamy_beta, kumaraswamy_mean, kumaraswamy_moment,
                               kumaraswamy_sample, pretrained_features, sample_gates)


class TinyNet(nn.Module):
    """conv-bn-relu, conv-relu, mean, dense: two prunable channel groups."""

    widths: tuple = (8, 12)
    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(BatchNorm(use_running_average=not train)(Conv(self.widths[0], (3, 3), use_bias=False)(x)))
        x = nn.relu(Conv(self.widths[1], (3, 3), strides=2)(x))
        return Dense(self.num_classes)(x.mean((1, 2)))


def _set(seed, n=12, d=6, labels=4):
    r = np.random.default_rng(seed)
    return jnp.asarray(r.normal(size=(n, d)), jnp.float32), jnp.asarray(r.integers(0, labels, n), jnp.int32)


@pytest.mark.parametrize("pooling", ["pma", "mean"])
def test_set_encoder_permutation_invariant(pooling):
    enc = SetEncoder(dim=16, num_labels=4, pooling=pooling, num_heads=2)
    x, y = _set(0)
    params = enc.init(jax.random.key(0), x, y)
    perm = np.random.default_rng(1).permutation(len(x))
    z, zp = enc.apply(params, x, y), enc.apply(params, x[perm], y[perm])
    assert z.shape == (16,)
    np.testing.assert_allclose(z, zp, rtol=1e-5, atol=1e-5)
    # a different set gives a different embedding
    assert float(jnp.abs(z - enc.apply(params, *_set(2))).max()) > 1e-3


def test_mean_pooling_set_size_invariant_and_padding():
    enc = SetEncoder(dim=16, num_labels=4, pooling="mean")
    x, y = _set(0)
    params = enc.init(jax.random.key(0), x, y)
    z = enc.apply(params, x, y)
    z3 = enc.apply(params, jnp.tile(x, (3, 1)), jnp.tile(y, 3))  # same empirical distribution, 3x the size
    np.testing.assert_allclose(z, z3, rtol=1e-5, atol=1e-5)
    pad_x, pad_y = jnp.concatenate([x, jnp.ones((5, 6))]), jnp.concatenate([y, jnp.zeros(5, jnp.int32)])
    valid = jnp.arange(17) < 12
    np.testing.assert_allclose(z, enc.apply(params, pad_x, pad_y, valid), rtol=1e-5, atol=1e-5)
    # PMA with a padding mask ignores the padding too
    pma = SetEncoder(dim=16, num_labels=4, pooling="pma", num_heads=2)
    pp = pma.init(jax.random.key(0), x, y)
    np.testing.assert_allclose(pma.apply(pp, x, y), pma.apply(pp, pad_x, pad_y, valid), rtol=1e-5, atol=1e-5)


def test_set_encoder_image_stem_permutation_invariant():
    enc = SetEncoder(dim=8, num_labels=3, pooling="pma", num_heads=2, stem_features=8)
    x = jax.random.normal(jax.random.key(0), (5, 8, 8, 3))
    y = jnp.asarray([0, 1, 2, 0, 1])
    params = enc.init(jax.random.key(1), x, y)
    perm = np.array([3, 0, 4, 1, 2])
    np.testing.assert_allclose(enc.apply(params, x, y), enc.apply(params, x[perm], y[perm]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("a,b", [(0.5, 0.5), (2.0, 1.0), (1.5, 4.0), (5.0, 0.3)])
def test_kumaraswamy_sampling_matches_analytic_moments(a, b):
    n = 200_000
    s = np.asarray(kumaraswamy_sample(jax.random.key(0), jnp.full(n, a), jnp.full(n, b)))
    assert s.min() > 0 and s.max() < 1
    mean, second = float(kumaraswamy_mean(a, b)), float(kumaraswamy_moment(a, b, 2))
    sem = np.sqrt(second - mean ** 2) / np.sqrt(n)
    assert abs(s.mean() - mean) < 5 * sem + 1e-4
    assert abs((s ** 2).mean() - second) < 0.01 * second + 1e-4
    # analytic mean against numeric integration of x * density
    dens = lambda x: a * b * x ** (a - 1) * (1 - x ** a) ** (b - 1)
    assert abs(integrate.quad(lambda x: x * dens(x), 0, 1, limit=200)[0] - mean) < 1e-4
    if b == 1.0:  # Kumaraswamy(a, 1) = Beta(a, 1): mean a / (a + 1)
        assert abs(mean - a / (a + 1)) < 1e-5


@pytest.mark.parametrize("a,b,alpha", [(1.0, 1.0, 0.5), (2.0, 3.0, 1.0), (0.7, 1.5, 0.2), (3.0, 0.8, 2.0)])
def test_closed_form_kl_matches_numeric_integration(a, b, alpha):
    q = lambda x: a * b * x ** (a - 1) * (1 - x ** a) ** (b - 1)
    p = lambda x: alpha * x ** (alpha - 1)  # Beta(alpha, 1)
    numeric = integrate.quad(lambda x: q(x) * (np.log(q(x)) - np.log(p(x))) if q(x) > 0 else 0.0, 0, 1,
                             limit=400)[0]
    closed = float(kl_kumaraswamy_beta(jnp.float32(a), jnp.float32(b), alpha))
    assert abs(closed - numeric) < 1e-3 * max(1.0, abs(numeric)), (closed, numeric)
    if a == 1.0 and b == 1.0 and alpha:  # KL(U(0,1) || Beta(alpha,1)) = -log(alpha) + alpha - 1
        assert abs(closed - (-np.log(alpha) + alpha - 1)) < 1e-4


def test_relaxed_gates_gradient_reaches_generator():
    widths = (8, 12)
    gen = MaskGenerator(group_widths=widths, hidden=16)
    z = jnp.ones(10)
    params = gen.init(jax.random.key(0), z)

    def loss(params):
        a, b = gen.apply(params, z)
        gates = [sample_gates(jax.random.key(i), ai, bi, 0.1) for i, (ai, bi) in enumerate(zip(a, b))]
        return sum(g.sum() * (i + 1) for i, g in enumerate(gates))

    grads = jax.grad(loss)(params)
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    assert leaves and all(np.all(np.isfinite(np.asarray(g))) for _, g in leaves)
    for path, g in leaves:
        assert float(jnp.abs(g).sum()) > 0, path  # every generator parameter gets a gradient
    # gates are near-binary at temperature 0.1
    a, b = gen.apply(params, z)
    g = np.asarray(sample_gates(jax.random.key(3), jnp.tile(a[0], 100), jnp.tile(b[0], 100), 0.1))
    assert np.mean((g < 0.05) | (g > 0.95)) > 0.7


def _tiny_problem(algorithm="fomaml"):
    model = TinyNet()
    table = describe(model, (8, 8, 3))
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    layout = GroupLayout(table, (0, 1))
    r = np.random.default_rng(0)
    x = r.integers(0, 256, (240, 8, 8, 3)).astype(np.uint8)
    y = (x[..., 0].mean((1, 2)) > 127).astype(np.int32) + 2 * (x[..., 1].mean((1, 2)) > 127)
    y = np.minimum(y, 2).astype(np.int32)
    stamp = Stamp(layout=layout, net_variables=dict(variables), mean=np.full(3, 0.5, np.float32),
                  std=np.full(3, 0.3, np.float32),
                  objective=SparsityObjective(budget=0.5, num_examples=240, budget_weight=1.0),
                  encoder=SetEncoder(dim=16, num_labels=3, pooling="mean"),
                  generator=MaskGenerator(group_widths=layout.widths, hidden=16), inner_steps=3, inner_lr=0.05,
                  algorithm=algorithm)
    feats = np.asarray(pretrained_features(model, variables, (x / 255.0 - 0.5) / 0.3, 1))
    sampler = TaskSampler(x, y, ways=(2, 3), set_size=16, inner_steps=3, inner_batch=16, query_size=32,
                          set_inputs=feats)
    return stamp, sampler, variables


def test_one_meta_step_decreases_post_adaptation_loss():
    stamp, sampler, _ = _tiny_problem("fomaml")
    tasks = sampler.sample(0, 2)
    state = stamp.create_state(jax.random.key(0), tasks["set_x"][0], tasks["set_y"][0], optax.sgd(0.5))
    keys = jax.random.split(jax.random.key(7), 2)
    # fast_jit: XLA's backend optimisations off (the second-order meta step is a long compile)
    post = fast_jit(lambda p: jax.vmap(stamp.post_adaptation_loss, in_axes=(None, 0, 0))(p, tasks, keys).mean())
    before = float(post(state.params))
    new_state, info = fast_jit(stamp.meta_step)(state, tasks)
    after = float(post(new_state.params))
    assert int(new_state.step) == 1 and np.isfinite(float(info["query_loss"]))
    assert after < before - 1e-4, (before, after)


def test_deployment_shrunk_network_equals_masked_network():
    stamp, sampler, variables = _tiny_problem()
    tasks = sampler.sample(3, 1)
    params = stamp.init(jax.random.key(0), tasks["set_x"][0], tasks["set_y"][0])
    probs = [np.asarray(p) for p in stamp.keep_probabilities(params, tasks["set_x"][0], tasks["set_y"][0])]
    assert all(((p > 0) & (p < 1)).all() for p in probs)
    layout = stamp.layout
    group_masks = hard_group_masks(layout, probs, "budget", budget=0.5, metric="params")
    assert float(layout.cost_fraction([m.sum() for m in group_masks], "params")) <= 0.5
    assert all(1 <= m.sum() < w for m, w in zip(group_masks, layout.widths))
    masks = layout.layer_masks([jnp.asarray(m) for m in group_masks], variables["masks"])
    # non-trivial BatchNorm statistics so the check covers them
    bs = jax.tree.map(lambda v: v + 0.3 * jax.random.uniform(jax.random.key(1), v.shape), variables["batch_stats"])
    full = {**variables, "batch_stats": bs, "masks": masks}
    small_model, small_vars = shrink(layout.table, full)
    assert tuple(small_model.widths) == tuple(int(m.sum()) for m in group_masks)
    x = jax.random.normal(jax.random.key(2), (4, 8, 8, 3))
    np.testing.assert_allclose(layout.table.model.apply(full, x), small_model.apply(small_vars, x),
                               rtol=1e-5, atol=1e-5)
    thr = hard_group_masks(layout, [np.array([0.5, 1e-4, 2e-3]), np.array([1e-5, 1e-5])], "threshold", 1e-3)
    np.testing.assert_array_equal(thr[0], [1, 0, 1])
    np.testing.assert_array_equal(thr[1], [1, 0])  # a group never loses every channel


def test_aligned_stamp_masks_round_down_to_the_multiple(zoo):
    from jaxcompress.stamp.generator import align_masks
    table = zoo.table("resnet20")
    layout = GroupLayout(table, tuple(range(table.num_groups)))
    rng = np.random.default_rng(0)
    probs = [rng.random(table.widths[g]) for g in layout.groups]
    masks = [(p >= np.sort(p)[::-1][min(len(p) - 1, k)]).astype(np.float32)
             for p, k in zip(probs, [3, 20, 45] * len(layout.groups))]  # arbitrary counts
    aligned = align_masks(layout, probs, masks, 8)
    for p, m, a in zip(probs, masks, aligned):
        k = int(a.sum())
        assert k == len(p) or (k % 8 == 0 and (k <= m.sum() or k == 8))
        assert np.all(p[a > 0].min() >= p[a == 0].max()) if 0 < k < len(p) else True  # most probable kept


def test_budget_masks_meet_the_budget_after_alignment():
    """LeNet-5 at 30% of the parameters: conv2's 16 channels feed fc1 25 times each, so
    an unaligned choice of a few conv2 channels raised to the multiple 8 would break the
    budget; the bisection costs the aligned masks, so they meet it."""
    from jaxcompress.models import create_model
    from jaxcompress.stamp import check_budget
    from jaxcompress.pruning import align
    from jaxcompress.errors import ConfigError
    table = describe(create_model("lenet5", 5), (28, 28, 1))
    layout = GroupLayout(table, tuple(range(table.num_groups)))
    mults = align.group_multiples(table.widths, list(layout.groups), None)
    assert [mults[g] for g in layout.groups] == [2, 8, 8, 8]  # 6 -> 2 (<= W/2), else the backend's 8
    rng = np.random.default_rng(1)
    probs = [rng.random(w) for w in layout.widths]
    probs[1] *= 0.01  # conv2 channels least probable: the unaligned budget choice keeps one or two of them
    unaligned = hard_group_masks(layout, probs, "budget", budget=0.3, metric="params", multiple=1)
    masks = hard_group_masks(layout, probs, "budget", budget=0.3, metric="params", multiple=None)
    counts = [int(m.sum()) for m in masks]
    assert int(unaligned[1].sum()) < 8 <= counts[1]
    assert all(k == w or k % mults[g] == 0 for k, w, g in zip(counts, layout.widths, layout.groups))
    assert float(layout.cost_fraction(counts, "params")) <= 0.3
    # the budget check knows the aligned minimum: 2/8/8/8 channels leave more than 1-1-1-1 does
    assert layout.min_fraction("params", None) > layout.min_fraction("params", 1)
    low = layout.min_fraction("params", None)
    check_budget(layout, low, "params", None)
    with pytest.raises(ConfigError, match="fewest aligned channels.*hardware.multiple=1"):
        check_budget(layout, low * 0.99, "params", None)


@pytest.mark.parametrize("penalty", ["target", "hinge"])
def test_sparsity_objective_by_hand(penalty):
    """reg = kl_weight * KL / N + budget_weight * |gap| (target) or relu(gap) (hinge),
    gap = E[params fraction] - budget; a network below the budget costs only under
    'target'."""
    table = describe(TinyNet(), (8, 8, 3))
    layout = GroupLayout(table, (0, 1))
    obj = SparsityObjective(alpha=1e-2, kl_weight=2.0, num_examples=100, budget=0.5, budget_weight=3.0,
                            penalty=penalty)
    a = [jnp.full(8, 0.5), jnp.full(12, 0.5)]
    for b_value in (0.2, 5.0):  # E[pi] high (above budget) and low (below)
        b = [jnp.full(8, b_value), jnp.full(12, b_value)]
        reg, info = obj(layout, a, b)
        kl = float(sum(kl_kumaraswamy_beta(ai, bi, 1e-2).sum() for ai, bi in zip(a, b)))
        frac = float(layout.cost_fraction([kumaraswamy_mean(ai, bi).sum() for ai, bi in zip(a, b)], "params"))
        gap = frac - 0.5
        by_hand = 2.0 * kl / 100 + 3.0 * (abs(gap) if penalty == "target" else max(gap, 0.0))
        np.testing.assert_allclose(float(reg), by_hand, rtol=1e-5)
        np.testing.assert_allclose(float(info["expected_fraction"]), frac, rtol=1e-6)
        assert (gap > 0) == (b_value == 0.2)  # both sides of the budget are exercised


class NoNormNet(nn.Module):
    """LeNet-style: no BatchNorm, so no batch_stats collection."""
    widths: tuple = (6, 8)

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(Conv(self.widths[0], (3, 3))(x))
        x = nn.relu(Conv(self.widths[1], (3, 3))(x))
        return Dense(3)(x.mean((1, 2)))


def test_bbdropout_trains_a_network_without_batchnorm():
    """BBDropout (the STAMP baseline) on a network with no batch_stats: the gates and the
    weights train, E[pi] is one probability per channel, and no batch_stats appear."""
    import types
    from jaxcompress.stamp.deploy import train_bbdropout
    from jaxcompress.train import Recipe
    model = NoNormNet()
    table = describe(model, (8, 8, 3))
    variables = dict(model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
    assert "batch_stats" not in variables
    layout = GroupLayout(table, (0, 1))
    r = np.random.default_rng(0)
    x = r.integers(0, 256, (64, 8, 8, 3)).astype(np.uint8)
    y = (x[..., 0].mean((1, 2)) > 127).astype(np.int32)
    exp = types.SimpleNamespace(train=(x, y), mean=np.full(3, 127.0, np.float32), std=np.full(3, 70.0, np.float32))
    probs, trained = train_bbdropout(exp, layout, variables, SparsityObjective(budget=0.5, num_examples=64),
                                     Recipe(num_epochs=2, learning_rate=0.05, batch_size=16))
    assert [p.shape for p in probs] == [(6,), (8,)]
    assert all(np.all((p > 0) & (p < 1)) for p in probs)
    assert "batch_stats" not in trained
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), trained["params"], variables["params"])
    assert max(jax.tree.leaves(moved)) > 0
