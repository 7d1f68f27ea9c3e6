"""Two-stage RL search on LeNet-5 / MNIST (the paper's Table 1 row: 90% of the parameters
removed, 16.4% FLOPs), from the trained LeNet-5 benchmark run: FLOPs at most 20% and
parameters at most 10% (both walled), then weight bits at 5 bits on average.

python -m launch.main --config=configs/search_lenet5.py --workdir=workdirs/search_lenet5
python -m launch.main --config=configs/search_lenet5.py:element --workdir=workdirs/search_lenet5_element
(train first: python -m benchmarks.run --config=benchmarks/configs/lenet5_mnist.py --workdir=workdirs/bench_lenet5_mnist)
"""
from configs import default


def lenet5_mnist(job: str):
    """What every LeNet-5 / MNIST search config shares (this one and benchmarks/configs/search_*.py)."""
    c = default.get_config()
    c.job = job
    c.model.name = "lenet5"
    c.data.name = "mnist"
    c.search.checkpoint = "workdirs/bench_lenet5_mnist"
    c.search.scope = "all"
    c.hardware.multiple = 1  # unaligned channel counts, as in the paper (and the README's recorded rows)
    return c


def get_config(granularity: str = "channel"):
    """`granularity`: channel (kept channels per group) or element (`configs/search_lenet5.py:element`:
    magnitude element rates per layer scored after 10 SGD steps per candidate, applied in 6
    gradual steps of 3 masked epochs, as the hand-set row of `benchmarks/configs/prune_lenet5_mnist.py`)."""
    c = lenet5_mnist("search")
    c.search.granularity = granularity
    c.search.agent = "ppo"
    c.search.num_actors = 16
    c.search.episodes = 960
    c.search.flops_budget = 0.2
    c.search.params_budget = 0.1
    c.search.a_min, c.search.a_max = 0.0, 0.95
    c.search.eval_size = 1000
    c.search.finetune_epochs = 8
    c.search.finetune_learning_rate = 0.02
    c.search.quant.episodes = 256
    c.search.quant.bits_budget = 5.0
    c.search.quant.qat_epochs = 2
    if granularity == "element":
        c.search.element_iterations, c.search.element_iteration_epochs = 6, 3
        c.search.finetune_epochs = 20
        c.search.candidate_finetune_steps = 10  # rewards after 10 SGD steps per candidate: +0.14 vs +0.20 without
    return c
