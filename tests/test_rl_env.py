"""The compression environment: action wall, features, costs, HAQ back-off, evaluators."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import cost
from jaxcompress.errors import ConfigError
from jaxcompress.models import describe
from jaxcompress.pruning import criteria as C
from jaxcompress.pruning.surgery import shrink
from jaxcompress.rl import PruneEnv, QuantEnv, backoff, channel_ranks, play
from jaxcompress.rl.evaluate import make_prune_evaluator, make_quant_evaluator, stacked_logits


def _flops64(table, widths):
    """FLOPs in float64 from the table's geometry (independent of the float32 cost model)."""
    total = 0.0
    for layer in table.layers:
        cin = widths[layer.in_group] * layer.in_repeat if layer.in_group >= 0 else layer.in_fixed
        cout = widths[layer.out_group] if layer.out_group >= 0 else layer.out_fixed
        taps = layer.kernel_size[0] * layer.kernel_size[1]
        total += 2.0 * taps * cout * (1 if layer.depthwise else cin) * layer.out_hw[0] * layer.out_hw[1]
    return total


@pytest.mark.parametrize("name,budget,a_max,multiple,scope,params_budget", [
    ("lenet5", 0.2, 0.9, 1, "all", None), ("lenet5", 0.5, 0.8, 2, "all", None), ("lenet5", 0.2, 0.9, 1, "all", 0.1),
    ("resnet20", 0.5, 0.8, 1, "inner", None), ("resnet20", 0.35, 0.9, 4, "all", 0.3),
    ("resnet20", 0.5, 0.8, None, "all", None)])
def test_action_wall_always_meets_budget(zoo, name, budget, a_max, multiple, scope, params_budget):
    table = zoo.table(name)
    env = PruneEnv(table, budget, 0.0, a_max, C.prunable_groups(table, scope), multiple, params_budget)
    rng = np.random.default_rng(0)
    T = env.num_steps
    actions = np.concatenate([rng.random((400, T)), rng.beta(0.2, 0.2, (200, T)), np.zeros((1, T)), np.ones((1, T)),
                              np.tile([[0.0, 1.0]], (1, T))[:, :T]]).astype(np.float32)
    finals = jax.jit(jax.vmap(lambda a: play(env, a)))(actions)
    widths = np.asarray(finals.values)
    flops = np.asarray([_flops64(table, w) for w in widths])
    dense = _flops64(table, table.widths)
    assert np.all(flops <= budget * dense * (1 + 1e-6)), (flops / dense).max()
    if params_budget is not None:
        params = np.asarray([float(cost.count(table, w)["params"]) for w in widths[:50]])
        assert np.all(params <= params_budget * env.params_dense * (1 + 1e-5))
    W = np.asarray(table.widths, np.float64)
    for t, g in enumerate(env.groups):
        k = widths[:, g]
        assert np.all((k >= env.k_lo[t]) & (k <= W[g]))
        assert np.all((k % (multiple or 8) == 0) | (k == W[g]))  # None: 8 on CPU (every width here >= 16)
    others = np.setdiff1d(np.arange(table.num_groups), env.groups)
    assert np.all(widths[:, others] == W[others])
    # the can use most of the budget (the wall is not overly conservative)
    assert flops.max() >= 0.9 * budget * dense


def test_state_features_lenet5_by_hand(zoo):
    env = PruneEnv(zoo.table("lenet5"), 0.5, 0.1, 0.8)
    # per group (conv1, conv2, fc1, fc2): index, c_out, c_in, kh, kw, stride, a_min, a_max, FLOPs, FLOPs after
    flops = np.array([2 * 28 * 28 * 25 * 1 * 6, 2 * 10 * 10 * 25 * 6 * 16, 2 * 400 * 120, 2 * 120 * 84], float)
    raw = np.array([[0, 6, 1, 5, 5, 1, 0.1, 0.8, flops[0], flops[1:].sum()],
                    [1, 16, 6, 5, 5, 1, 0.1, 0.8, flops[1], flops[2:].sum()],
                    [2, 120, 400, 1, 1, 1, 0.1, 0.8, flops[2], flops[3]],
                    [3, 84, 120, 1, 1, 1, 0.1, 0.8, flops[3], 0.0]])
    lo, hi = raw.min(0), raw.max(0)
    expected = np.where(hi > lo, (raw - lo) / np.where(hi > lo, hi - lo, 1), 0.0)
    dense = 2.0 * (117600 + 240000 + 48000 + 10080 + 840)
    s = env.reset()
    np.testing.assert_allclose(env.observe(s), np.r_[expected[0], 0.0, 0.0], atol=1e-6)
    # action 0.5 on conv1: rate 0.1 + 0.7 * 0.5 = 0.45 -> keep round(6 * 0.55) = 3 channels
    s = env.step(s, 0.5)
    assert float(s.values[0]) == 3.0
    reduced = (2 * 28 * 28 * 25 * 3 + 2 * 10 * 10 * 25 * 3 * 16) / dense
    np.testing.assert_allclose(env.observe(s), np.r_[expected[1], reduced, (0.5 - 0.1) / 0.7], atol=1e-6)
    np.testing.assert_allclose(float(s.actions[0]), 0.5, atol=1e-6)  # executed rate 1 - 3/6


def test_episode_flops_equal_cost_model_and_shrunk_network(zoo):
    table = zoo.table("lenet5")
    variables = zoo.variables("lenet5")
    env = PruneEnv(table, 0.3, 0.0, 0.9)
    final = play(env, jnp.asarray([0.3, 0.9, 0.6, 0.1]))
    res = env.result(final)
    widths = np.asarray(final.values)
    assert float(res["cost"]) == float(cost.count(table, widths)["flops"])
    assert float(res["params"]) == float(cost.count(table, widths)["params"])
    ranks = channel_ranks(C.channel_scores(table, variables, "l1"))
    masks = table.layer_masks(env.group_masks(ranks, jnp.asarray(widths)), variables["masks"])
    small, _ = shrink(table, {**variables, "masks": masks})
    assert tuple(small.widths) == tuple(int(w) for w in widths)
    small_flops = float(cost.count(describe(small, table.input_shape))["flops"])
    np.testing.assert_allclose(float(res["cost"]), small_flops, rtol=1e-6)
    assert small_flops <= 0.3 * _flops64(table, table.widths) * (1 + 1e-6)


def test_haq_backoff_matches_reference_and_meets_budget():
    rng = np.random.default_rng(1)
    weights = rng.integers(10, 1000, 7).astype(np.float64)
    for _ in range(20):
        bits = rng.integers(2, 9, 7).astype(np.float64)
        budget = float(rng.uniform(2.0, 8.0) * weights.sum())
        ref = bits.copy()  # HAQ: lower one bit at a time from the last layer backwards, cyclically
        i = 0
        while (ref * weights).sum() > budget and i < 7 * 32:
            pos = 6 - i % 7
            ref[pos] = max(2.0, ref[pos] - 1) if ref[pos] > 2 else ref[pos]
            i += 1
        out = np.asarray(jax.jit(backoff, static_argnums=(3,))(bits, weights, budget, 2))
        np.testing.assert_array_equal(out, ref)
        assert (out * weights).sum() <= budget * (1 + 1e-6) or np.all(out == 2)


def test_quant_env_episode_within_budget(zoo):
    table = zoo.table("lenet5")
    env = QuantEnv(table, 4.0, 2, 8)
    rng = np.random.default_rng(0)
    finals = jax.vmap(lambda a: play(env, a))(rng.random((64, env.num_steps)).astype(np.float32))
    bits = np.asarray(finals.values)
    assert np.all((bits >= 2) & (bits <= 8) & (bits == np.round(bits)))
    assert np.all((bits * env.weights).sum(1) <= 4.0 * env.weights.sum() * (1 + 1e-6))
    quant = env.quant_tree(jnp.asarray(bits[0]), 8)
    assert float(quant["conv2"]["bits_w"]) == bits[0, 1] and float(quant["fc3"]["bits_a"]) == 8.0


@pytest.mark.parametrize("name,N", [("lenet5", 9), ("lenet5", 3), ("resnet20", 3)])
def test_stacked_evaluation_equals_masked_networks(zoo, name, N):
    """Shared-weight stacked evaluation (with channel expansion for lenet5 at N=9 > 6
    channels, and the non-deferred fallback for resnet20) equals N masked networks."""
    table, variables = zoo.table(name), zoo.variables(name)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(5,) + table.input_shape).astype(np.float32))
    gm = [jnp.asarray((rng.random((N, w)) < 0.6).astype(np.float32)) for w in table.widths]
    ref = np.stack([np.asarray(table.model.apply({**variables, "masks": table.layer_masks([m[n] for m in gm],
                                                                                           variables["masks"])}, x))
                    for n in range(N)])
    defer = name == "lenet5"
    out = jax.jit(lambda gm, x: stacked_logits(table.model, table, variables, x, gm, defer))(gm, x)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5 * max(1.0, np.abs(ref).max()))


def test_prune_and_quant_evaluators_agree_with_apply(zoo):
    table, variables = zoo.table("lenet5"), zoo.variables("lenet5")
    env = PruneEnv(table, 0.5, 0.0, 0.8)
    ranks = channel_ranks(C.channel_scores(table, variables, "l1"))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 28, 28, 1)).astype(np.float32))
    logits = table.model.apply(variables, x)
    labels = jnp.argmax(logits, -1)  # dense network: accuracy 1
    data = dict(variables=variables, images=x, labels=labels)
    widths = jnp.asarray([[6, 16, 120, 84], [3, 8, 60, 40], [1, 2, 10, 5]] * 3, jnp.float32)
    stacked = jax.jit(make_prune_evaluator(env, table.model, ranks, chunk=4))(widths, data)
    vmapped = jax.jit(make_prune_evaluator(env, table.model, ranks, mode="vmap"))(widths, data)
    chex.assert_trees_all_close(stacked, vmapped)
    assert float(stacked[0]) == 1.0
    qenv = QuantEnv(table, 8.0, 2, 8)
    bits = jnp.asarray([[8.0] * 5, [2.0] * 5], jnp.float32)
    acc = jax.jit(make_quant_evaluator(qenv, table.model, None, chunk=1))(bits, data)
    from jaxcompress.quant import make_quant
    q2 = table.model.apply({**variables, "quant": make_quant(table, bits_w=2)}, x)
    np.testing.assert_allclose(float(acc[1]), float(jnp.mean(jnp.argmax(q2, -1) == labels)))


def test_bad_bounds_fail_before_work(zoo):
    table = zoo.table("lenet5")
    with pytest.raises(ConfigError, match="cannot be met"):
        PruneEnv(table, 0.01, 0.0, 0.8)
    with pytest.raises(ConfigError, match="a_min=0.6 > search.a_max=0.5"):
        PruneEnv(table, 0.5, 0.6, 0.5)
    with pytest.raises(ConfigError, match="1..8"):
        QuantEnv(table, 4.0, 0, 8)
    with pytest.raises(ConfigError, match="1..8"):
        QuantEnv(table, 4.0, 2, 16)
    with pytest.raises(ConfigError, match="cannot be met"):
        QuantEnv(table, 1.5, 2, 8)


def test_candidate_finetune_evaluator(zoo):
    """Per-candidate SGD steps: lr 0 equals the plain evaluation; one step equals a hand
    SGD step of the masked network."""
    from jaxcompress.train.steps import cross_entropy
    table, variables = zoo.table("lenet5"), zoo.variables("lenet5")
    env = PruneEnv(table, 0.5, 0.0, 0.8)
    ranks = channel_ranks(C.channel_scores(table, variables, "l1"))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(32, 28, 28, 1)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, 32))
    data = dict(variables=variables, images=x, labels=y, train_images=x[None, :16], train_labels=y[None, :16])
    widths = jnp.asarray([[3, 8, 60, 40], [6, 16, 120, 84]], jnp.float32)
    plain = make_prune_evaluator(env, table.model, ranks)(widths, data)
    frozen = jax.jit(make_prune_evaluator(env, table.model, ranks, finetune_steps=1, finetune_lr=0.0))(widths, data)
    np.testing.assert_allclose(np.asarray(frozen), np.asarray(plain))
    tuned = jax.jit(make_prune_evaluator(env, table.model, ranks, finetune_steps=1, finetune_lr=0.5))(widths, data)
    masks = table.layer_masks(env.group_masks(ranks, widths[0]), variables["masks"])
    f = lambda p, xx: table.model.apply({**variables, "params": p, "masks": masks}, xx)
    g = jax.grad(lambda p: cross_entropy(f(p, x[:16]), y[:16]).mean())(variables["params"])
    p1 = jax.tree.map(lambda p, d: p - 0.5 * d, variables["params"], g)
    np.testing.assert_allclose(float(tuned[0]), float(jnp.mean(jnp.argmax(f(p1, x), -1) == y)))
    assert float(tuned[0]) != float(plain[0]) or float(tuned[1]) != float(plain[1])
