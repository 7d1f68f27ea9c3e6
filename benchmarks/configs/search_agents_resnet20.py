"""Benchmark: PPO (the paper's) against DDPG (AMC) on ResNet-20 / CIFAR-10 at 50% FLOPs,
the issue's network for the paper's Figure 2: 3 seeds each, the same episode budget
(reward curves, final best reward mean and spread), then the best policy of each run
and uniform pruning fine-tuned alike (quality at a budget). The LeNet-5 version is
`benchmarks/configs/search_agents.py`.

Starts from the ResNet-20 trained by `benchmarks/configs/resnet20_cifar10.py` (same
10,000-image CIFAR-10 subset; run that first). The inner channel of every residual
block is searched (residual streams whole, as AMC), unaligned counts; candidates are
scored on 256 validation images; 2 fine-tune epochs per policy. PPO uses the Beta
policy: with the sigmoid-squashed Gaussian one seed's mean saturated (std stayed ~0.9
before the sigmoid) and its rewards sank to 0.30 (README results table).

JAXCOMPRESS_DATA_DIR=../shared/data python -m benchmarks.run --config=benchmarks/configs/search_agents_resnet20.py \
    --workdir=workdirs/bench_search_agents_resnet20
"""
from benchmarks.configs import resnet20_cifar10
from benchmarks.configs.search_agents import agents_bench


def get_config():
    c = resnet20_cifar10.get_config()
    c.job = "bench_search_agents"
    c.search.checkpoint = "workdirs/bench_resnet20_cifar10"
    c.search.scope = "inner"
    c.hardware.multiple = 1
    c.search.flops_budget = 0.5
    c.search.a_max = 0.8
    c.search.episodes = 400
    c.search.eval_size = 256
    c.search.finetune_epochs = 2
    c.search.finetune_learning_rate = 0.02
    c.search.ppo.policy = "beta"  # the sigmoid-squashed Gaussian's mean saturated on one seed (README)
    c.search.ddpg.warmup_episodes = 100  # AMC
    c.bench = agents_bench(final_window=64)
    return c
