"""Search baselines and selection (issue 16): random search draws feasible policies at the
budget through the environment's own wall and keeps the agents' bookkeeping; held-out
re-ranking picks the policy best on split B; splits A and B are disjoint samples of the
validation split. Small: LeNet-5 with random weights, 16-24 images, one compile each."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import cost
from jaxcompress.config import get_config
from jaxcompress.errors import ConfigError
from jaxcompress.pruning import criteria as C
from jaxcompress.rl import (PruneEnv, QuantEnv, RandomSearch, batched_rollout, channel_ranks, choose,
                            make_prune_evaluator, make_reward_fn, rerank, run_search, top_distinct)
from jaxcompress.rl.job import (AGENTS, check_rerank, eval_data, history_points, make_agent, rerank_stage1,
                                validation_sample)
from jaxcompress.rl.rerank import finetune_select

BUDGET, A_MIN, A_MAX = 0.3, 0.1, 0.9
EPISODES, ACTORS = 48, 16


def _images(n, seed):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, 28, 28, 1)).astype(np.float32))


@pytest.fixture(scope="module")
def setup(zoo):
    """A random search on LeNet-5 at 30% FLOPs (and 40% parameters), R_FLOPs reward,
    candidates scored like the agents' (stacked in-graph evaluator, adaptive BN)."""
    table, variables = zoo.table("lenet5"), zoo.variables("lenet5")
    env = PruneEnv(table, BUDGET, A_MIN, A_MAX, C.prunable_groups(table, "all"), 1, params_budget=0.4)
    ranks = channel_ranks(C.channel_scores(table, variables, "l1"))
    evaluate = make_prune_evaluator(env, table.model, ranks, chunk=8, bn_adapt=True)
    reward_fn = make_reward_fn("flops", env.cost_bounds())
    x = _images(24, 0)
    data = dict(variables=variables, images=x, labels=jnp.argmax(table.model.apply(variables, x), -1))
    res = run_search(env, RandomSearch(), evaluate, reward_fn, data, num_actors=ACTORS, episodes=EPISODES, seed=3,
                     log_every=0)
    return types.SimpleNamespace(table=table, variables=variables, env=env, evaluate=evaluate, reward_fn=reward_fn,
                                 data=data, res=res)


def test_random_is_an_agent_of_the_job_and_draws_uniform_actions():
    assert "random" in AGENTS and isinstance(make_agent("random", get_config().search, 4), RandomSearch)
    agent = RandomSearch()
    state = agent.init(jax.random.PRNGKey(0))
    draws = jax.vmap(lambda k: agent.act(state, jnp.zeros(12), k)[0])(jax.random.split(jax.random.PRNGKey(1), 2000))
    draws = np.asarray(draws)
    assert draws.min() >= 0.0 and draws.max() <= 1.0 and abs(draws.mean() - 0.5) < 0.03
    assert np.histogram(draws, bins=4, range=(0, 1))[0].min() > 400  # every quarter of [0, 1] drawn


def test_random_search_draws_only_feasible_policies_at_the_budget(setup):
    env, table, h = setup.env, setup.table, setup.res.history
    widths = np.asarray(h["values"], np.float64)
    assert widths.shape == (EPISODES, table.num_groups)
    assert len({tuple(w) for w in widths}) > EPISODES // 2  # random: mostly different policies
    dense = cost.count(table, table.widths)
    W = np.asarray(table.widths, np.float64)
    for w, rates, ratio in zip(widths, np.asarray(h["actions"]), h["cost_ratio"]):
        c = cost.count(table, w)  # the cost model on every drawn policy
        assert float(c["flops"]) <= BUDGET * float(dense["flops"]) * (1 + 1e-6)
        assert float(c["params"]) <= 0.4 * float(dense["params"]) * (1 + 1e-5)
        assert ratio == pytest.approx(float(c["flops"]) / float(dense["flops"]), rel=1e-5)
        k = w[env.groups]
        assert np.all((k >= env.k_lo) & (k <= env.k_hi))
        # executed rates: within [a_min, a_max] up to rounding to whole channels
        np.testing.assert_allclose(rates, 1 - k / W[env.groups], atol=1e-6)
        slack = 0.5 / W[env.groups] + 1e-6
        assert np.all(rates >= A_MIN - slack) and np.all(rates <= A_MAX + slack)
    # the wall lets random policies use most of the budget
    assert max(h["cost_ratio"]) >= 0.9 * BUDGET


def test_random_bits_are_backed_off_to_the_budget(zoo):
    qenv = QuantEnv(zoo.table("lenet5"), 4.0, 2, 8)
    agent = RandomSearch()
    final, _ = jax.jit(lambda k: batched_rollout(qenv, agent, agent.init(k), jax.random.split(k, 64),
                                                 jnp.arange(64)))(jax.random.PRNGKey(0))
    bits = np.asarray(final.values)
    assert np.all((bits >= 2) & (bits <= 8)) and np.all(bits == np.round(bits))
    assert np.all(bits @ qenv.weights <= 4.0 * qenv.weights.sum() * (1 + 1e-6))


def test_random_search_keeps_the_agents_bookkeeping(setup):
    res, h = setup.res, setup.res.history
    assert set(h) == {"metrics", "episode", "accuracy", "reward", "cost", "cost_ratio", "values", "actions", "params"}
    assert h["episode"] == list(range(EPISODES)) and len(h["metrics"]) == EPISODES // ACTORS
    i = int(np.argmax(h["reward"]))
    best = res.best
    assert best["reward"] == pytest.approx(max(h["reward"])) and best["accuracy"] == pytest.approx(h["accuracy"][i])
    assert best["values"] == pytest.approx(h["values"][i]) and best["actions"] == pytest.approx(h["actions"][i])
    assert best["cost"] == pytest.approx(h["cost"][i])
    assert int(jax.device_get(res.state.agent.draws)) == EPISODES * setup.env.num_steps
    assert len(history_points(h)) == EPISODES  # what the job's reports read


def test_top_distinct_and_choose_on_a_hand_made_table():
    values = [[6, 16], [3, 8], [6, 16], [4, 8], [3, 8], [5, 10], [2, 4]]
    score_a = [0.90, 0.95, 0.90, 0.70, 0.95, 0.70, 0.10]
    # [3, 8] twice at 0.95 (first kept), [6, 16] twice, tie 0.70 between [4, 8] and [5, 10]: earlier first
    assert top_distinct(values, score_a, 8) == [1, 0, 3, 5, 6]
    assert top_distinct(values, score_a, 3) == [1, 0, 3]
    assert top_distinct(values, [0.5, 0.6, 0.9, 0.1, 0.1, 0.1, 0.1], 2) == [2, 1]  # a duplicate at its best score
    assert choose([0.95, 0.90, 0.70], [0.80, 0.85, 0.60]) == 1  # best on B, not on A
    assert choose([0.95, 0.90, 0.70], [0.80, 0.85, 0.85]) == 1  # tie on B: better on A
    assert choose([0.90, 0.90, 0.70], [0.85, 0.85, 0.10]) == 0  # tie on both: earlier
    with pytest.raises(ValueError):
        choose([0.9], [0.9, 0.8])


def test_rerank_rescores_the_top_k_on_split_b_and_picks_the_best_there(setup):
    h = setup.res.history
    xb = _images(20, 1)
    data_b = dict(setup.data, images=xb, labels=jnp.argmax(setup.table.model.apply(setup.variables, xb), -1))
    out = rerank(setup.evaluate, setup.reward_fn, h, data_b, 5)
    idx = top_distinct(h["values"], h["reward"], 5)
    rows = out["candidates"]
    assert [r["index"] for r in rows] == idx and out["size_b"] == 20 and out["top_k"] == 5
    values = jnp.asarray([h["values"][i] for i in idx], jnp.float32)
    acc_b = np.asarray(jax.jit(setup.evaluate)(values, data_b))
    reward_b = np.asarray(setup.reward_fn(jnp.asarray(acc_b), jnp.asarray([h["cost"][i] for i in idx]), 0.0, 0.0))
    for r, i, a, rb in zip(rows, idx, acc_b, reward_b):
        assert r["accuracy_a"] == h["accuracy"][i] and r["reward_a"] == h["reward"][i] and r["episode"] == i
        assert r["accuracy_b"] == pytest.approx(float(a)) and r["reward_b"] == pytest.approx(float(rb), rel=1e-5)
    assert out["chosen"] == choose([r["reward_a"] for r in rows], [r["reward_b"] for r in rows])
    c = rows[out["chosen"]]
    assert c["reward_b"] == max(r["reward_b"] for r in rows)
    assert out["best"]["values"] == c["values"] and out["best"]["reward_b"] == c["reward_b"]
    assert out["best"]["reward"] == c["reward_a"] and out["best"]["actions"] == pytest.approx(h["actions"][c["index"]])


def test_splits_a_and_b_are_disjoint_samples_of_the_validation_split(zoo):
    a, b = validation_sample(100, 30, 7), validation_sample(100, 50, 7, skip=30)
    assert len(a) == 30 and len(b) == 50 and not set(a) & set(b)
    np.testing.assert_array_equal(a, np.random.default_rng(7).permutation(100)[:30])  # split A as before
    assert len(validation_sample(60, 50, 7, skip=30)) == 30  # B gets what is left
    # through eval_data: every validation image is its own index; no test split exists here
    n = 60
    x = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 28, 28, 1)).copy()
    exp = types.SimpleNamespace(val=(x, np.arange(n) % 10), mean=0.0, std=1.0 / 255, mesh=None)
    variables = zoo.variables("lenet5")
    da, db = eval_data(exp, variables, 24, 0), eval_data(exp, variables, 40, 0, skip=24)
    ia, ib = (np.round(np.asarray(d["images"])[:, 0, 0, 0]).astype(int) for d in (da, db))
    assert len(ia) == 24 and len(ib) == 36 and not set(ia) & set(ib) and set(ia) | set(ib) == set(range(n))
    np.testing.assert_array_equal(np.asarray(db["labels"]), ib % 10)


def test_the_jobs_rerank_scores_split_b_with_the_searchs_scoring(setup):
    n = 64
    x = np.random.default_rng(2).integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
    labels = np.random.default_rng(3).integers(0, 10, n)
    exp = types.SimpleNamespace(val=(x, labels), mean=0.5, std=0.25, mesh=None)
    s = types.SimpleNamespace(rerank_top_k=3, rerank_size=2000, eval_size=24, candidate_finetune_steps=0,
                              candidate_finetune_batch=64)
    scoring = (setup.evaluate, setup.reward_fn)
    out = rerank_stage1(s, exp, setup.variables, setup.res, scoring, seed=5)
    assert out["size_a"] == 24 and out["size_b"] == 40 and len(out["candidates"]) == 3
    data_b = eval_data(exp, setup.variables, 2000, 5, skip=24)
    expected = rerank(setup.evaluate, setup.reward_fn, setup.res.history, data_b, 3)
    assert out["candidates"] == expected["candidates"] and out["chosen"] == expected["chosen"]
    off, all_a = (types.SimpleNamespace(**{**vars(s), **change}) for change in ({"rerank_top_k": 0}, {"eval_size": 64}))
    assert rerank_stage1(off, exp, setup.variables, setup.res, scoring, 5) is None
    check_rerank(off, 64)  # off: nothing to check
    with pytest.raises(ConfigError, match="search.rerank_top_k=3 needs validation images beyond split A"):
        rerank_stage1(all_a, exp, setup.variables, setup.res, scoring, 5)
    with pytest.raises(ConfigError, match="validation split has 64, search.eval_size=64 takes them all"):
        check_rerank(all_a, 64)  # what the job calls before any training


def test_finetune_select_fine_tunes_the_best_on_split_b_and_keeps_the_best_after():
    """A hand-made re-ranking: 4 candidates; the 3 best on B (ties: better on A) are
    fine-tuned by a lookup 'evaluator' and the best after fine-tuning is chosen."""
    rows = [dict(index=i, values=[float(i), 1.0], actions=[0.1 * i], cost=1.0, accuracy_a=a, reward_a=a,
                 accuracy_b=b, reward_b=b) for i, (a, b) in enumerate([(0.9, 0.7), (0.8, 0.8), (0.7, 0.8), (0.95, 0.6)])]
    reranked = dict(top_k=4, size_b=10, size_a=5, candidates=rows, chosen=1, best={})
    after = jnp.asarray([0.0, 0.85, 0.9, 0.99])  # accuracy after fine-tuning, by candidate (its values[0])
    seen = []

    def evaluate_ft(values, data):
        seen.append(values.shape)
        return after[values[:, 0].astype(jnp.int32)] + 0.0 * data["images"].sum()

    out = finetune_select(evaluate_ft, lambda acc, cost, lo, hi: acc, reranked, dict(images=jnp.zeros(2)), 3, 1.0, 1.0)
    assert out["finetuned"] == [1, 2, 0]  # B: 0.8, 0.8 (0.8 on A beats 0.7), 0.7; candidate 3 (0.6 on B) is not tried
    assert seen == [(3, 2)]
    assert out["chosen"] == 2 and out["best"]["values"] == [2.0, 1.0] and out["best"]["actions"] == [0.2]
    assert out["best"]["accuracy_ft"] == pytest.approx(0.9) and out["best"]["reward"] == 0.7
    assert "accuracy_ft" not in out["candidates"][3] and out["candidates"][0]["accuracy_ft"] == 0.0
    assert rows[0] == reranked["candidates"][0] and "accuracy_ft" not in rows[0]  # the input is not changed
    with pytest.raises(ValueError):
        finetune_select(evaluate_ft, lambda *a: a[0], reranked, {}, 0, 1.0, 1.0)


def test_the_jobs_selection_fine_tunes_with_the_searchs_evaluator(setup):
    n = 64
    x = np.random.default_rng(2).integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
    labels = np.random.default_rng(3).integers(0, 10, n)
    exp = types.SimpleNamespace(val=(x, labels), train=(x, labels), mean=0.5, std=0.25, mesh=None)
    s = types.SimpleNamespace(rerank_top_k=4, rerank_size=2000, eval_size=24, candidate_finetune_steps=0,
                              candidate_finetune_batch=8, select_finetune_top=2, select_finetune_steps=3)
    ranks = channel_ranks(C.channel_scores(setup.table, setup.variables, "l1"))
    evaluate_ft = make_prune_evaluator(setup.env, setup.table.model, ranks, chunk=8, finetune_steps=3,
                                       finetune_lr=0.05, bn_adapt=True)
    out = rerank_stage1(s, exp, setup.variables, setup.res, (setup.evaluate, setup.reward_fn), 5, evaluate_ft)
    plain = rerank_stage1(s, exp, setup.variables, setup.res, (setup.evaluate, setup.reward_fn), 5)
    assert [dict((k, r[k]) for k in r if not k.endswith("_ft")) for r in out["candidates"]] == plain["candidates"]
    data_ft = eval_data(exp, setup.variables, 2000, 5, 3, 8, skip=24)
    assert data_ft["train_images"].shape == (3, 8, 28, 28, 1)
    expected = finetune_select(evaluate_ft, setup.reward_fn, plain, data_ft, 2,
                               min(setup.res.history["cost"]), max(setup.res.history["cost"]))
    assert out["finetuned"] == expected["finetuned"] and len(out["finetuned"]) == 2
    assert out["chosen"] == expected["chosen"] and out["best"] == expected["best"]
    assert all("reward_ft" in out["candidates"][i] for i in out["finetuned"])


def test_the_search_samples_must_divide_over_the_devices_before_any_work():
    from jaxcompress.train.experiment import check_batches
    c = get_config()
    c.job, c.train.batch_size, c.train.eval_batch_size = "search", 64, 200
    c.search.eval_size, c.search.candidate_finetune_batch = 96, 60
    with pytest.raises(ConfigError, match="search.candidate_finetune_batch=60: must be a positive multiple of the 8"):
        check_batches(c, 8)  # the fine-tune selection splits its batches over the devices
    c.search.select_finetune_top = 0
    check_batches(c, 8)  # no per-candidate fine-tune at all: the batch is unused
    c.search.eval_size = 100
    with pytest.raises(ConfigError, match="search.eval_size=100"):
        check_batches(c, 8)
