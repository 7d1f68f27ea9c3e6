"""The seed statistics of the benchmarks (mean +- se, paired differences) against hand
computations and scipy, and the STAMP seeds benchmark's comparison, targets and
diagnosis on hand-made job summaries (no job runs here)."""
import math

import pytest
from scipy import stats as scipy_stats

from benchmarks import stamp_seeds
from benchmarks.configs import stamp_seeds as seeds_config
from benchmarks.stats import mean_se, paired
from jaxcompress.errors import ConfigError


def test_mean_se_by_hand():
    r = mean_se([1.0, 2.0, 6.0])
    assert r["mean"] == pytest.approx(3.0) and r["n"] == 3
    assert r["se"] == pytest.approx(math.sqrt(((4 + 1 + 9) / 2) / 3))  # sample var 7, se sqrt(7/3)
    assert mean_se([0.5]) == dict(mean=0.5, se=0.0, n=1)


def test_paired_differences_by_hand_and_scipy():
    a, b = [0.80, 0.82, 0.85], [0.78, 0.81, 0.80]
    d = paired(a, b)  # differences 0.02, 0.01, 0.05: mean 0.08/3
    assert d["mean"] == pytest.approx(0.08 / 3)
    assert d["se"] == pytest.approx(mean_se([0.02, 0.01, 0.05])["se"])
    assert d["p"] == pytest.approx(scipy_stats.ttest_rel(a, b).pvalue)
    assert d["a_better_by_1se"]
    assert not paired(b, a)["a_better_by_1se"]
    assert not paired([0.5, 0.9], [0.6, 0.7])["a_better_by_1se"]  # +0.05 +- 0.15
    assert paired([0.5], [0.4])["p"] is None
    with pytest.raises(ValueError, match="same seeds"):
        paired([0.1, 0.2], [0.1])


def _summary(acc: dict, ratio, variation_ratio=0.05):
    methods = {m: dict(accuracy=a, params_pct=30.0, flops_pct=31.0, widths=[3, 5]) for m, a in acc.items()}
    methods["stamp"].update(keep_prob_undecided=0.4,
                            keep_prob_variation=dict(ratio=variation_ratio, mask_agreement=0.9))
    return dict(methods=methods, time_ratio_to_stamp={"magnitude": ratio})


def test_compare_targets_and_diagnosis_on_hand_made_runs():
    runs = {0: _summary(dict(stamp=0.80, snip_pretrained=0.78, random=0.79, random_stamp_widths=0.80,
                             magnitude=0.82), 4.0),
            1: _summary(dict(stamp=0.82, snip_pretrained=0.80, random=0.83, random_stamp_widths=0.80,
                             magnitude=0.83), None),
            2: _summary(dict(stamp=0.84, snip_pretrained=0.81, random=0.82, random_stamp_widths=0.83,
                             magnitude=0.84), 2.0)}
    cmp = stamp_seeds.compare(runs)
    assert cmp["seeds"] == [0, 1, 2]
    snip = cmp["methods"]["snip_pretrained"]
    assert snip["accuracy"] == [0.78, 0.80, 0.81] and snip["accuracy_mean"] == pytest.approx(0.79666, abs=1e-4)
    assert snip["stamp_minus"]["mean"] == pytest.approx((0.02 + 0.02 + 0.03) / 3)
    assert cmp["methods"]["stamp"]["stamp_minus"] is None
    t = {x["what"].split(",")[0].split(" (")[0]: x for x in stamp_seeds.targets(cmp, 700.0, 600.0)}
    assert t["wall time of the whole comparison"]["measured"] == "11.7 min" and not t[
        "wall time of the whole comparison"]["met"]
    assert len(stamp_seeds.targets(cmp, 700.0)) == 3  # no wall target: none reported
    assert t["STAMP - snip_pretrained"]["met"] is True
    # random: differences +0.01, -0.01, +0.02 -> +0.67 +- 0.88 points: below one se
    assert t["STAMP - random"]["met"] is False and t["STAMP - random"]["measured"] == "+0.67 +- 0.88 points"
    ratio = t["magnitude's target time to STAMP's val accuracy / STAMP's"]
    assert ratio["measured"] == "4.0x, never reached, 2.0x" and ratio["met"] is False
    lines = stamp_seeds.diagnosis(cmp)
    assert lines[0].startswith("channel choice at STAMP's widths (stamp - random_stamp_widths): +1.00 +- 0.58")
    assert lines[1].startswith("STAMP's widths vs uniform widths (random_stamp_widths - random): -0.33")
    assert "nearly a fixed learned mask" in lines[2]
    table = stamp_seeds.table(cmp)
    assert "| snip_pretrained | 79.67 +- 0.88% | 78.00 / 80.00 / 81.00 | 30.0 | 31.0 | +2.33 +- 0.33 |" in table


def test_seed_configs_keep_every_method_at_the_same_widths():
    c = seeds_config.get_config("small")
    assert c.stamp.selection == "per_layer" and c.stamp.channel_stats and c.stamp.baseline_widths == "stamp"
    assert "random_stamp_widths" not in c.stamp.methods  # per_layer: it would repeat random
    g = seeds_config.get_config("small_global")
    assert g.stamp.selection == "global" and "random_stamp_widths" in g.stamp.methods
    assert tuple(c.bench.seeds) == (0, 1, 2)
    m = seeds_config.get_config("small_mnist")
    assert m.stamp.target.name == "mnist" and m.bench.reuse == "workdirs/bench_stamp_seeds_small"
    assert seeds_config.get_config("full_global_mnist").bench.reuse == "workdirs/bench_stamp_seeds_full_global"
    with pytest.raises(ConfigError, match="unknown argument"):
        seeds_config.get_config("small_layers")
    with pytest.raises(ConfigError, match="unknown argument"):
        seeds_config.get_config("small_global_counts")
    assert seeds_config.get_config("small_counts_mnist").stamp.budget_penalty == "counts"
