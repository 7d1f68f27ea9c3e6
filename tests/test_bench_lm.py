"""The LM pruning benchmark (`benchmarks/lm_prune.py`, issue 18) end to end on a tiny LM:
summary fields, the masked network's perplexity equals the shrunk one's, the results
table, and a rerun reads the dense network back instead of retraining it."""
import json
import math
import os

import pytest

from benchmarks import run as bench_run
from benchmarks.configs import lm_prune as lm_config


def _tiny(criteria=("l2", "snip", "random"), seeds=(0, 1)):
    c = lm_config.get_config()
    c.bench.update(dict(seq_len=16, dim=16, depth=1, heads=4, head_dim=4, mlp_ratio=2, batch_size=8,
                        train_steps=30, warmup_steps=5, finetune_steps=10, finetune_warmup=2, snip_batch=8,
                        eval_sequences=32, eval_batch=16, criteria=criteria, seeds=seeds))
    return c


def test_lm_prune_benchmark_end_to_end(tmp_path):
    workdir = str(tmp_path)
    s = bench_run.run(_tiny(), workdir)
    assert s["job"] == "bench_lm_prune" and s["seeds"] == [0, 1]
    assert s["widths_dense"] == [16, 4, 32] and s["widths_pruned"] == [16, 3, 22]
    c = s["cost"]
    assert c["params_pruned"] < c["params_dense"] and 0 < c["macs_fraction"] < 1
    assert not s["dense"]["cached"] and math.isfinite(s["dense"]["perplexity"]) and s["dense"]["perplexity"] < 256
    assert list(s["criteria"]) == ["l2", "snip", "random"]
    for name, rows in s["runs"].items():
        for r in rows:
            assert r["widths"] == s["widths_pruned"]
            assert r["perplexity_masked"] == pytest.approx(r["perplexity_pruned"], rel=1e-5)  # masked == shrunk
            assert r["max_logit_diff"] < 1e-4 and math.isfinite(r["perplexity_finetuned"])
        m = s["criteria"][name]
        assert len(m["perplexity_finetuned"]) == 2 and m["perplexity_finetuned_se"] >= 0
        assert (m["minus_random"] is None) == (name == "random")
    l2 = s["criteria"]["l2"]
    assert l2["perplexity_pruned"][0] == l2["perplexity_pruned"][1]  # magnitude scores do not depend on the seed
    d = l2["minus_random"]["perplexity_finetuned"]
    assert d["mean"] == pytest.approx(l2["perplexity_finetuned_mean"] - s["criteria"]["random"]["perplexity_finetuned_mean"])
    assert [t["met"] for t in s["targets"]] == [None, True] and "l2 / snip / random" in s["targets"][0]["what"]
    with open(os.path.join(workdir, "results.md")) as f:
        table = f.read()
    assert table.startswith("| network | test perplexity, pruned |") and "| snip |" in table
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f)["table"] == s["table"]
    again = bench_run.run(_tiny(criteria=("random",), seeds=(1,)), workdir)  # the cached dense network
    assert again["dense"]["cached"] and again["dense"]["perplexity"] == s["dense"]["perplexity"]
    assert again["runs"]["random"][0] == {**s["runs"]["random"][1], "finetune_time_s": again["runs"]["random"][0][
        "finetune_time_s"]}
