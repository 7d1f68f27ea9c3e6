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
from jaxcompress.rl import ElementEnv, PruneEnv, QuantEnv, backoff, channel_ranks, play
from jaxcompress.rl.evaluate import make_element_evaluator, make_prune_evaluator, make_quant_evaluator, stacked_logits


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
    forward = zoo.forward(name)  # jitted once per model: the masks are data
    ref = np.stack([np.asarray(forward({**variables, "masks": table.layer_masks([m[n] for m in gm],
                                                                               variables["masks"])}, x))
                    for n in range(N)])
    defer = name == "lenet5"
    out = zoo.jit(lambda gm, x: stacked_logits(table.model, table, variables, x, gm, defer))(gm, x)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5 * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("name,N,defer", [("resnet20", 3, False), ("vgg11", 4, True), ("mobilenet_v1_cifar", 2, True)])
def test_adaptive_bn_evaluation_equals_flax_batch_statistics(zoo, name, N, defer):
    """Adaptive BatchNorm (EagleEye): stacked and vmapped evaluation equal each masked
    network run by Flax in training mode (BatchNorm on the batch's statistics), actor
    by actor; and differ from the running-statistics evaluation."""
    table, variables = zoo.table(name), zoo.variables(name)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(6,) + table.input_shape).astype(np.float32))
    gm = [jnp.asarray((rng.random((N, w)) < 0.6).astype(np.float32)) for w in table.widths]

    train_mode = zoo.jit(lambda v, x: table.model.apply(v, x, train=True, mutable=["batch_stats"])[0])

    def flax_train_mode(n):  # one compile: the masks are data
        return np.asarray(train_mode({**variables, "masks": table.layer_masks([m[n] for m in gm],
                                                                            variables["masks"])}, x))

    ref = np.stack([flax_train_mode(n) for n in range(N)])
    tol = 5e-5 * max(1.0, np.abs(ref).max())
    stacked = zoo.jit(lambda gm, x: stacked_logits(table.model, table, variables, x, gm, defer, bn_adapt=True))(gm, x)
    np.testing.assert_allclose(np.asarray(stacked), ref, atol=tol)
    running = zoo.jit(lambda gm, x: stacked_logits(table.model, table, variables, x, gm, defer))(gm, x)
    assert np.abs(np.asarray(running) - ref).max() > 100 * tol
    widths = jnp.asarray(rng.integers(1, np.asarray(table.widths) + 1, (N, table.num_groups)), jnp.float32)
    env = PruneEnv(table, 1.0, 0.0, 0.9, None, 1)
    ranks = channel_ranks(C.channel_scores(table, variables, "l1"))
    labels = jnp.asarray(rng.integers(0, ref.shape[-1], 6))
    data = dict(variables=variables, images=x, labels=labels)
    accs = [jax.jit(make_prune_evaluator(env, table.model, ranks, mode=m, bn_adapt=True))(widths, data)
            for m in ("stacked", "vmap")]
    np.testing.assert_allclose(np.asarray(accs[0]), np.asarray(accs[1]))
    v0 = {**variables, "masks": table.layer_masks(env.group_masks(ranks, widths[0]), variables["masks"])}
    logits0 = train_mode(v0, x)
    np.testing.assert_allclose(float(accs[0][0]), float(jnp.mean(jnp.argmax(logits0, -1) == labels)))


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


@pytest.mark.parametrize("name,budget,params_budget", [("lenet5", 0.2, 0.1), ("lenet5", 0.5, None),
                                                        ("resnet20", 0.3, 0.25)])
def test_element_wall_meets_budget_and_costs_equal_the_sparse_cost_model(zoo, name, budget, params_budget):
    """ElementEnv: every episode ends within both budgets; its FLOPs and parameters equal
    `cost.summarize` of the element masks `criteria.element_masks` builds at its rates."""
    table, variables = zoo.table(name), zoo.variables(name)
    env = ElementEnv(table, budget, 0.0, 0.95, params_budget)
    rng = np.random.default_rng(0)
    T = env.num_steps
    actions = np.concatenate([rng.random((300, T)), rng.beta(0.2, 0.2, (100, T)), np.zeros((1, T)),
                              np.ones((1, T))]).astype(np.float32)
    res = jax.jit(jax.vmap(lambda a: env.result(play(env, a))))(actions)
    assert float(np.max(res["cost_ratio"])) <= budget + 1e-6
    if params_budget:
        assert float(np.max(res["params_ratio"])) <= params_budget + 1e-6
    kept = np.asarray(res["values"])
    assert np.all(kept >= env.k_lo) and np.all(kept <= env.weights)
    np.testing.assert_array_equal(kept[401], env.k_lo)  # a_max everywhere: the lowest counts
    for i in (0, 400, 401):
        masks = C.element_masks(table, variables, env.rates(kept[i]), variables["masks"])
        totals = cost.summarize(table, masks)["totals"]
        np.testing.assert_allclose(float(res["cost"][i]), 2 * totals["sparse_macs"], rtol=1e-5)
        np.testing.assert_allclose(float(res["params"][i]), totals["nonzero_params"], rtol=1e-5)
    # the no-pruning episode (actions 0): the wall caps layer 0 by hand, and the episode ends at the budget
    fpw = 2.0 * np.asarray(cost.layer_counts(table)["macs"]) / env.weights
    cap = (budget * env.flops_dense - np.sum(fpw[1:] * env.k_lo[1:])) / fpw[0]
    if params_budget:
        cap = min(cap, params_budget * env.params_dense - env.fixed_params - np.sum(env.k_lo[1:]))
    assert kept[400][0] == min(env.weights[0], np.floor(cap * (1 - 1e-6)))
    assert float(res["cost_ratio"][400]) > 0.98 * budget or float(res["params_ratio"][400]) > 0.98 * params_budget


def test_element_features_and_evaluator_by_hand(zoo):
    """LeNet-5's element-env features by hand; the element evaluator equals model.apply
    with `criteria.element_masks` at the candidates' rates (the reference)."""
    table, variables = zoo.table("lenet5"), zoo.variables("lenet5")
    env = ElementEnv(table, 0.5, 0.1, 0.9)
    np.testing.assert_array_equal(env.weights, [150, 2400, 48000, 10080, 840])
    np.testing.assert_array_equal(env.k_lo, [15, 240, 4800, 1008, 84])
    np.testing.assert_array_equal(env.k_hi, [135, 2160, 43200, 9072, 756])
    flops = 2.0 * np.asarray([150 * 784, 2400 * 100, 48000, 10080, 840])
    np.testing.assert_allclose(env.flops_dense, flops.sum())
    rest = np.asarray([flops[t + 1:].sum() for t in range(5)])
    raw = np.array([[0, 6, 1, 5, 5, 1, 0.1, 0.9, flops[0], rest[0]], [1, 16, 6, 5, 5, 1, 0.1, 0.9, flops[1], rest[1]],
                    [2, 120, 400, 1, 1, 1, 0.1, 0.9, flops[2], rest[2]],
                    [3, 84, 120, 1, 1, 1, 0.1, 0.9, flops[3], rest[3]],
                    [4, 10, 84, 1, 1, 1, 0.1, 0.9, flops[4], 0.0]])
    lo, hi = raw.min(0), raw.max(0)
    expected = np.where(hi > lo, (raw - lo) / np.where(hi > lo, hi - lo, 1), 0.0)
    np.testing.assert_allclose(env.observe(env.reset()), np.r_[expected[0], 0.0, 0.0], atol=1e-6)
    s1 = env.step(env.reset(), jnp.asarray(0.5))  # rate 0.1 + 0.8 * 0.5 = 0.5: 75 of 150 kept
    assert float(s1.values[0]) == 75.0 and abs(float(s1.actions[0]) - 0.5) < 1e-6
    np.testing.assert_allclose(env.observe(s1), np.r_[expected[1], 0.5 * flops[0] / flops.sum(), 0.5], atol=1e-6)

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 28, 28, 1)).astype(np.float32))
    labels = jnp.argmax(table.model.apply(variables, x), -1)
    data = dict(variables=variables, images=x, labels=labels)
    kept = np.asarray([env.weights, env.k_lo, [75, 600, 4800, 5040, 420], [150, 240, 48000, 1008, 840]],
                      np.float32)
    acc = jax.jit(make_element_evaluator(env, table.model, variables, chunk=3))(jnp.asarray(kept), data)
    assert float(acc[0]) == 1.0
    for i in range(1, len(kept)):
        masks = C.element_masks(table, variables, env.rates(kept[i]), variables["masks"])
        ref = table.model.apply({**variables, "masks": masks}, x)
        np.testing.assert_allclose(float(acc[i]), float(jnp.mean(jnp.argmax(ref, -1) == labels)))
    assert len({float(a) for a in acc}) > 1


def test_element_candidate_finetune_evaluator(zoo):
    """Element candidates with per-candidate SGD steps: lr 0 equals the plain element
    evaluation; one step equals a hand SGD step of the element-masked network."""
    from jaxcompress.train.steps import cross_entropy
    table, variables = zoo.table("lenet5"), zoo.variables("lenet5")
    env = ElementEnv(table, 0.5, 0.0, 0.9)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(32, 28, 28, 1)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, 32))
    data = dict(variables=variables, images=x, labels=y, train_images=x[None, :16], train_labels=y[None, :16])
    kept = jnp.asarray([[75, 600, 4800, 5040, 420], [150, 2400, 48000, 10080, 840]], jnp.float32)
    plain = make_element_evaluator(env, table.model, variables)(kept, data)
    frozen = jax.jit(make_element_evaluator(env, table.model, variables, finetune_steps=1, finetune_lr=0.0))(kept, data)
    np.testing.assert_allclose(np.asarray(frozen), np.asarray(plain))
    tuned = jax.jit(make_element_evaluator(env, table.model, variables, finetune_steps=1, finetune_lr=0.5))(kept, data)
    masks = C.element_masks(table, variables, env.rates(kept[0]), variables["masks"])
    f = lambda p, xx: table.model.apply({**variables, "params": p, "masks": masks}, xx)
    g = jax.grad(lambda p: cross_entropy(f(p, x[:16]), y[:16]).mean())(variables["params"])
    p1 = jax.tree.map(lambda p, d: p - 0.5 * d, variables["params"], g)
    np.testing.assert_allclose(float(tuned[0]), float(jnp.mean(jnp.argmax(f(p1, x), -1) == y)))
