"""Benchmark: PPO (the paper's) against DDPG (AMC) and random search on LeNet-5 / MNIST at
50% FLOPs: 3 seeds each, the same episode budget (reward curves, final best reward mean and spread), then
the best policy of each run and uniform pruning fine-tuned alike (quality at a budget).
The ResNet-20 / CIFAR-10 version is `benchmarks/configs/search_agents_resnet20.py`.

python -m benchmarks.run --config=benchmarks/configs/search_agents.py --workdir=workdirs/bench_search_agents
"""
import ml_collections

from configs.search_lenet5 import lenet5_mnist


def get_config():
    c = lenet5_mnist("bench_search_agents")
    c.search.flops_budget = 0.5
    c.search.a_max = 0.9
    c.search.episodes = 800  # AMC: ~800 episodes
    c.search.eval_size = 512
    c.search.finetune_epochs = 1
    c.search.finetune_learning_rate = 0.01
    c.search.ddpg.warmup_episodes = 100  # AMC
    c.bench = agents_bench(final_window=100)
    return c


def agents_bench(final_window: int) -> ml_collections.ConfigDict:
    """The comparison every `bench_search_agents` config runs: PPO, DDPG and random search
    (the baseline at equal evaluations), 3 seeds, 16 actors each (the same episodes per
    update), then the fine-tune of each policy."""
    return ml_collections.ConfigDict(dict(
        agents=("ppo", "ddpg", "random"), seeds=(0, 1, 2), num_actors={"ppo": 16, "ddpg": 16, "random": 16},
        final_window=final_window, finetune=True))
