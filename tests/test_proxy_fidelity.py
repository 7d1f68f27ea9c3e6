"""The proxy-fidelity benchmark (`bench_proxy_fidelity`, issue 16 item 1): its rank
statistics against hand counts and scipy, the distillation proxy against a hand
computation, and the job end to end on the embedded digits (policies within the
budget, proxies scored like the search scores candidates, a rerun fine-tunes nothing)."""
import itertools
import json
import math
import os

import numpy as np
import pytest
from scipy import stats as scipy_stats

from benchmarks import proxy_fidelity as PF
from benchmarks import stats
from benchmarks import targets as T
from benchmarks.configs.proxy_fidelity import bench
from benchmarks.run import run as run_job
from configs import quickstart
from jaxcompress import cost, pipeline
from jaxcompress.pruning import criteria as C
from jaxcompress.rl.evaluate import correct_fraction
from jaxcompress.rl.job import eval_data
from jaxcompress.train import Recipe, setup_experiment
from jaxcompress.train.loop import load_trained


# ---- rank statistics ------------------------------------------------------------------

def test_kendall_and_spearman_equal_hand_counts_and_scipy():
    x, y = [1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 1.0, 4.0, 3.0, 5.0]
    signs = [np.sign((x[i] - x[j]) * (y[i] - y[j])) for i, j in itertools.combinations(range(5), 2)]
    concordant, discordant = signs.count(1.0), signs.count(-1.0)
    assert (concordant, discordant) == (8, 2)  # only the swapped pairs (1, 2) and (3, 4) disagree
    assert stats.kendall_tau(x, y) == pytest.approx((concordant - discordant) / 10) == pytest.approx(0.6)
    d = np.asarray(x) - np.asarray(y)  # x and y are their own ranks
    assert stats.spearman_rho(x, y) == pytest.approx(1 - 6 * np.sum(d ** 2) / (5 * (25 - 1))) == pytest.approx(0.8)
    rng = np.random.default_rng(0)
    a = rng.normal(size=40)
    b = a + rng.normal(size=40)
    b[:5] = b[5]  # ties: tau-b, as scipy
    assert stats.kendall_tau(a, b) == pytest.approx(scipy_stats.kendalltau(a, b).statistic)
    assert stats.spearman_rho(a, b) == pytest.approx(scipy_stats.spearmanr(a, b).statistic)
    assert math.isnan(stats.kendall_tau([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_bootstrap_interval_holds_the_estimate_and_is_fixed_by_its_seed():
    rng = np.random.default_rng(1)
    x = rng.normal(size=33)
    y = x + 0.8 * rng.normal(size=33)
    r = stats.rank_correlations(x, y, resamples=500, seed=3)
    assert r["tau_lo"] <= r["tau"] <= r["tau_hi"] and r["rho_lo"] <= r["rho"] <= r["rho_hi"]
    assert -1 <= r["tau_lo"] < r["tau_hi"] <= 1 and r["n"] == 33
    assert stats.rank_correlations(x, y, resamples=500, seed=3) == r
    assert stats.rank_correlations(x, y, resamples=500, seed=4) != r
    # resamples with an undefined statistic (constant x) are left out, not propagated
    lo, hi = stats.bootstrap_interval(stats.kendall_tau, ([0.0, 0.0, 0.0, 1.0], [1.0, 2.0, 3.0, 4.0]), 200, 0)
    assert np.isfinite(lo) and np.isfinite(hi)


# ---- the distillation proxy ---------------------------------------------------------

def test_distill_kl_equals_a_hand_computation():
    teacher = np.asarray([[2.0, 0.0, -1.0], [0.5, 0.5, 1.0]])
    students = np.asarray([teacher, [[0.0, 1.0, 0.0], [1.0, -1.0, 2.0]]])  # (N=2, B=2, K=3)

    def kl(t, s, temp):
        p = np.exp(t / temp) / np.exp(t / temp).sum()
        q = np.exp(s / temp) / np.exp(s / temp).sum()
        return float(np.sum(p * np.log(p / q)))

    for temp in (1.0, 2.0):
        want = [np.mean([kl(teacher[b], s[b], temp) for b in range(2)]) for s in students]
        got = np.asarray(PF.distill_kl(students, teacher, temp))
        assert got.shape == (2,)
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert float(PF.distill_kl(students, teacher)[0]) == pytest.approx(0.0, abs=1e-7)


# ---- the job end to end -------------------------------------------------------------

def _config(reference: str):
    c = quickstart.get_config()
    c.model.name, c.data.image_size = "lenet300_100", 8  # an MLP on the 8x8 digits: compiles fast
    c.hardware.latency_batch = 0
    c.job = "bench_proxy_fidelity"
    s = c.search
    s.checkpoint, s.scope, s.flops_budget, s.a_max = reference, "all", 0.3, 0.9
    s.eval_size, s.finetune_epochs, s.finetune_learning_rate = 64, 1, 0.01
    c.bench = bench(bn_sizes=(32, 128))
    c.bench.num_policies, c.bench.sgd_steps, c.bench.resamples, c.bench.timing_repeats = 4, 2, 200, 1
    return c


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("proxy_fidelity")
    c = _config("")
    c.train.num_epochs = 1
    c.job = "train"
    reference = str(root / "reference")
    run_job(c, reference)
    c = _config(reference)
    workdir = str(root / "bench")
    return c, workdir, run_job(c, workdir)


def test_summary_policies_within_budget_and_proxies_scored_like_the_search(finished):
    c, workdir, out = finished
    names = ["masked", "bn_32", "bn_128", "sgd_2", "distill"]
    assert [r["name"] for r in out["rows"]] == names
    for r in out["rows"]:
        assert set(r) >= {"tau", "tau_lo", "tau_hi", "rho", "rho_lo", "rho_hi", "seconds_per_candidate"}
        assert r["seconds_per_candidate"] > 0 and -1 <= r["tau"] <= 1
    assert [r["n"] for r in out["rows"]] == [64, 32, 128, 64, 64]
    assert out["default_proxy"] == "masked"  # bn_adapt on, 0 steps, n = eval_size; the MLP has no BatchNorm
    assert out["best_proxy"] == max(out["rows"], key=lambda r: r["tau"])["name"]
    assert out["table"].startswith("| proxy |") and out["table"].count("\n") == len(names) + 3
    flops = [p["flops_ratio"] for p in out["policies"]]
    assert out["flops_baseline"]["tau"] == pytest.approx(
        scipy_stats.kendalltau(flops, [p["accuracy"] for p in out["policies"]]).statistic)

    exp = setup_experiment(c)
    budget = c.search.flops_budget * float(cost.count(exp.table)["flops"])
    policies = out["policies"]
    assert len(policies) == 5 and policies[0]["label"] == "uniform"
    assert len({tuple(p["widths"]) for p in policies}) == 5
    for p in policies:
        assert float(cost.count(exp.table, p["widths"])["flops"]) <= budget * (1 + 1e-6)
        assert set(p["scores"]) == set(names) and 0 <= p["accuracy"] <= 1
    for r in out["rows"]:
        scores = [p["scores"][r["name"]] for p in policies]
        acc = [p["accuracy"] for p in policies]
        assert r["tau"] == pytest.approx(scipy_stats.kendalltau(scores, acc).statistic)

    # the masked and distill scores of the uniform policy, from the masked network directly
    state = load_trained(exp, c.search.checkpoint, Recipe.from_config(c))
    variables = state.variables()
    data = eval_data(exp, variables, c.search.eval_size, c.seed)
    masks = exp.table.layer_masks(C.masks_from_scores(C.channel_scores(exp.table, variables, "l1"),
                                                      policies[0]["widths"]), variables.get("masks"))
    logits = exp.model.apply({**data["variables"], "masks": masks}, data["images"], train=False)
    dense = exp.model.apply(data["variables"], data["images"], train=False)
    assert policies[0]["scores"]["masked"] == pytest.approx(float(correct_fraction(logits, data["labels"])), abs=1e-6)
    assert policies[0]["scores"]["distill"] == pytest.approx(-float(PF.distill_kl(logits[None], dense)[0]),
                                                             rel=1e-4, abs=1e-6)

    targets, table = T.judge("proxy_fidelity", out)
    assert targets[0]["met"] is None and "CIFAR-10" in targets[0]["target"] and table == out["table"]
    assert T.judge("proxy_fidelity_resnet20", out)[0][0]["met"] == (out["default_tau"] >= 0.6)


def test_a_rerun_fine_tunes_nothing_and_reports_the_same(finished, monkeypatch):
    c, workdir, out = finished
    path = os.path.join(workdir, "results.jsonl")
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 5 and {r["key"] for r in rows} == {PF.policy_key(p["widths"]) for p in out["policies"]}
    mtime = os.path.getmtime(path)

    def refuse(*args, **kwargs):
        raise AssertionError("a finished policy was fine-tuned again")

    monkeypatch.setattr(pipeline, "shrink_and_finetune", refuse)
    again = run_job(c, workdir)
    assert os.path.getmtime(path) == mtime
    with open(path) as f:
        assert sum(1 for _ in f) == 5
    assert [p["accuracy"] for p in again["policies"]] == [p["accuracy"] for p in out["policies"]]
    assert [p["widths"] for p in again["policies"]] == [p["widths"] for p in out["policies"]]
    assert [r["tau"] for r in again["rows"]] == pytest.approx([r["tau"] for r in out["rows"]])
