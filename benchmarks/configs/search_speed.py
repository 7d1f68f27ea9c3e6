"""Benchmark: episodes/s of the jitted, vmapped search (N = 1, 8, 16, 32 actors) against a
straightforward per-layer Python loop over the same environment, agent and evaluation
data (LeNet-5 / MNIST, trained run workdirs/bench_lenet5_mnist), same process.

python -m benchmarks.run --config=benchmarks/configs/search_speed.py --workdir=workdirs/bench_search_speed
"""
import ml_collections

from configs.search_lenet5 import lenet5_mnist


def get_config():
    c = lenet5_mnist("bench_search_speed")
    c.search.flops_budget = 0.5
    c.bench = ml_collections.ConfigDict(dict(
        eval_sizes=(64, 256, 1000),  # validation images per candidate
        actors=(1, 8, 16, 32),
        loop_actors=(1, 8, 16, 32),  # N at which the Python loop is timed too
        jit_episodes=64,  # jitted episodes per timing round (after compile + one warm-up iteration)
        rounds=5))  # interleaved rounds: jit block, then one Python-loop iteration of N episodes
    return c
