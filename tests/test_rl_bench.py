"""The PPO-vs-DDPG benchmark job (`bench_search_agents`, the issue's stability and
quality-at-a-budget benchmarks) end to end on the embedded digits with LeNet-5."""
import os

import numpy as np
import pytest

from configs import quickstart
from benchmarks.configs.search_agents import agents_bench
from benchmarks.run import run as run_job
from jaxcompress.pruning import criteria as C
from jaxcompress.rl.evaluate import correct_fraction
from jaxcompress.rl.job import eval_data
from jaxcompress.train import Recipe, setup_experiment
from jaxcompress.train.loop import load_trained


def test_agents_bench_summary_agrees_with_its_runs_and_uniform_is_scored_like_the_agents(tmp_path):
    c = quickstart.get_config()
    c.job, c.train.num_epochs = "train", 2
    reference = str(tmp_path / "reference")
    run_job(c, reference)

    c.job = "bench_search_agents"
    s = c.search
    s.checkpoint, s.scope, s.flops_budget, s.a_max = reference, "all", 0.5, 0.9
    s.episodes, s.eval_size, s.finetune_epochs, s.ddpg.warmup_episodes = 8, 100, 1, 4
    c.bench = agents_bench(final_window=4)
    c.bench.seeds, c.bench.num_actors = (0, 1), {"ppo": 4, "ddpg": 4, "random": 4}
    assert c.bench.agents == ("ppo", "ddpg", "random")
    c.bench.agents = ("ppo", "random")  # DDPG goes through the same code as PPO here; two agents keep CI short
    c.train.distill_weight = 0.5  # the policies' fine-tunes distil from the reference
    out = run_job(c, str(tmp_path / "bench"))

    for agent in ("ppo", "random"):
        runs = [out["runs"][f"{agent}_seed{seed}"] for seed in (0, 1)]
        best = np.asarray([r["best_reward"] for r in runs])
        e = out["per_agent"][agent]
        assert e["best_reward_mean"] == pytest.approx(best.mean()) and e["best_reward_std"] == pytest.approx(best.std())
        assert e["ft_accuracy_mean"] == pytest.approx(np.mean([r["ft_accuracy"] for r in runs]))
        for r in runs:
            assert r["episodes"] == 8 and r["ft_flops_ratio"] <= 0.5 + 1e-6
            assert r["best_reward"] == pytest.approx(r["best_val_accuracy"])  # reward "acc": the accuracy itself

    # uniform: the largest uniform keep ratio within the budget, scored by the agents' evaluator,
    # which here (no per-candidate SGD steps) is the plain forward of the masked reference
    exp = setup_experiment(c)
    state = load_trained(exp, reference, Recipe.from_config(c))
    uniform = out["uniform"]
    groups = list(C.prunable_groups(exp.table, "all"))
    assert uniform["widths"] == C.keep_counts(exp.table, uniform["keep_ratio"], groups, c.hardware.multiple)
    assert uniform["flops_ratio"] <= 0.5 + 1e-6
    variables = state.variables()
    data = eval_data(exp, variables, s.eval_size, c.seed)
    masks = exp.table.layer_masks(C.masks_from_scores(C.channel_scores(exp.table, variables, s.rank_criterion),
                                                      uniform["widths"]), variables.get("masks"))
    logits = exp.model.apply({**data["variables"], "masks": masks}, data["images"], train=False)
    assert uniform["search_val_accuracy"] == pytest.approx(float(correct_fraction(logits, data["labels"])), abs=1e-6)
    for plot in ("rewards.png", "best_rewards.png"):
        assert os.path.getsize(tmp_path / "bench" / plot) > 0
