"""Latency allocation (`jaxcompress.pruning.allocate`): per-group widths within a FLOPs
budget that a latency model rates fastest; checked against hand counts and brute force."""
import itertools
import os

import numpy as np
import pytest

from jaxcompress import cost, latency
from jaxcompress.errors import ConfigError
from jaxcompress.latency import LatencyTable, layer_shapes
from jaxcompress.pruning import align
from jaxcompress.pruning import criteria as C
from jaxcompress.pruning.allocate import latency_allocations, latency_counts


def _macs(table, counts):
    return float(cost.count(table, counts)["macs"] / cost.count(table)["macs"])


def test_a_free_group_stays_whole_and_the_costly_one_takes_the_cut(zoo):
    # LeNet-300-100: MACs per image 784 c0 + c0 c1 + 10 c1. Only c0 costs time, so the best
    # network within the budget keeps c1 = 100 and the largest aligned c0 that fits.
    table = zoo.table("lenet300_100")
    dense = 784 * 300 + 300 * 100 + 100 * 10
    budget = 0.5
    c0 = max(k for k in range(8, 301, 8) if 784 * k + 100 * k + 1000 <= budget * dense)
    counts = latency_counts(table, budget, lambda c: float(c[0]), [0, 1], multiple=8)
    assert counts == [c0, 100] == [144, 100]  # 884 * 144 + 1000 = 128,296 <= 133,100 < 884 * 152 + 1000


@pytest.mark.parametrize("budget", [0.3, 0.4, 0.45, 0.6])
def test_the_allocation_is_the_brute_force_optimum_on_two_groups(zoo, budget):
    # A latency that charges the first layer's MACs three times as much as the rest: the
    # allocation equals the best of every aligned (c0, c1) with at least the uniform keep
    # ratio's MACs and within the budget (at 0.4 and 0.6 that is the uniform one).
    table = zoo.table("lenet300_100")
    seconds = lambda c: 3.0 * 784 * c[0] + c[0] * c[1] + 10 * c[1]
    groups = [0, 1]
    uniform = C.keep_counts(table, C.keep_ratio_for_flops(table, budget, groups, 8), groups, 8)
    pairs = [list(p) for p in itertools.product(align.candidates(300, 8), align.candidates(100, 8))]
    feasible = [p for p in pairs if _macs(table, uniform) - 1e-9 <= _macs(table, p) <= budget]
    best = min(feasible, key=seconds)
    counts = latency_counts(table, budget, seconds, groups, multiple=8)
    assert counts == [int(k) for k in best]
    assert (counts == uniform) == (budget in (0.4, 0.6))


def test_resnet_allocation_beats_the_uniform_ratio_on_its_own_model(zoo):
    # Formula latency: MACs, but a layer reading 16x16 pixels costs 3x per MAC. The allocation
    # keeps every group aligned, stays within the budget with at least the uniform ratio's
    # MACs, predicts faster, and cuts stage 2 most.
    table = zoo.table("resnet20")
    groups = C.prunable_groups(table, "all")

    def seconds(counts):
        total = 0.0
        for kind, batch, in_hw, cin, cout, kernel, strides, _ in layer_shapes(table, counts, 1):
            hw = in_hw[0] * in_hw[1] // (strides[0] * strides[1]) if kind == "conv" else 1
            total += hw * kernel[0] * kernel[1] * cin * cout * (3.0 if in_hw[0] == 16 else 1.0)
        return total

    uniform = C.keep_counts(table, C.keep_ratio_for_flops(table, 0.5, groups, 8), groups, 8)
    counts = latency_counts(table, 0.5, seconds, groups, multiple=8)
    assert all(k == w or k % 8 == 0 for k, w in zip(counts, table.widths))
    assert _macs(table, uniform) <= _macs(table, counts) <= 0.5
    assert seconds(counts) < seconds(uniform)
    kept = np.asarray(counts) / np.asarray(table.widths)
    names = table.group_names
    stage = lambda s: np.mean([kept[g] for g in groups if names[g].startswith(f"stage{s}")])
    assert stage(2) < min(stage(1), stage(3))


def test_measure_picks_the_fastest_measured_candidate(zoo):
    table = zoo.table("resnet20")
    groups = C.prunable_groups(table, "all")
    seconds = lambda c: float(sum(c))
    candidates = latency_allocations(table, 0.5, seconds, groups, 8)
    assert len(candidates) >= 2 and [seconds(c) for c in candidates] == sorted(seconds(c) for c in candidates)
    timed = []

    def measure(ws):  # the last candidate measures fastest
        timed.append(ws)
        return [1.0 / (i + 1) for i in range(len(ws))]

    counts = latency_counts(table, 0.5, seconds, groups, 8, measure=measure, measured=3)
    assert timed == [candidates[:3]] and counts == candidates[min(2, len(candidates) - 1)]


def test_an_unreachable_budget_is_one_line_before_any_latency(zoo):
    table = zoo.table("resnet20")

    def never(_):
        raise AssertionError("latency priced before the budget check")

    with pytest.raises(ConfigError) as err:
        latency_counts(table, 0.01, never, C.prunable_groups(table, "inner"), multiple=8)
    assert "\n" not in str(err.value) and "cannot be met" in str(err.value)
    with pytest.raises(ConfigError, match="flops_budget"):
        latency_counts(table, 1.5, never, [0], multiple=8)


def test_latency_allocation_needs_a_flops_budget():
    from configs import quickstart
    from jaxcompress import schema
    c = quickstart.get_config()
    c.prune.allocation = "latency"
    with pytest.raises(ConfigError, match="prune.allocation"):
        schema.validate(c)
    c.prune.flops_budget = 0.5
    schema.validate(c)


def test_prune_job_with_latency_allocation(tmp_path, monkeypatch):
    from configs import quickstart
    from jaxcompress.pruning.job import prune_and_finetune
    from tests.test_latency import FormulaTable
    monkeypatch.setenv("JAXCOMPRESS_CACHE", str(tmp_path / "cache"))
    # deterministic 'measurements' (a formula); real timing is benchmarks/configs/peer_torch_pruning.py's
    monkeypatch.setattr(LatencyTable, "measure", FormulaTable.measure)
    monkeypatch.setattr(latency, "measure_networks", lambda table, ws, batch, rounds=3: [
        sum(FormulaTable.formula(k) for k in layer_shapes(table, w, batch)) for w in ws])
    c = quickstart.get_config()
    c.train.num_epochs, c.prune.finetune_epochs, c.hardware.latency_batch = 1, 0, 32
    c.prune.scope, c.prune.allocation, c.prune.flops_budget = "all", "latency", 0.5
    s = prune_and_finetune(c, str(tmp_path / "run"))
    assert s["allocation"] == "latency" and s["flops_left"] <= 0.5
    assert s["keep_ratios"] == {n: k / w for n, k, w in zip(s["groups"], s["widths_pruned"], s["widths_dense"])
                                if n in s["keep_ratios"]}
    assert s["latency_predicted_fraction"] < 1.0 and set(s["latency_s"]) == {"dense", "masked", "shrunk"}
    assert os.path.exists(tmp_path / "run" / "summary.json")
