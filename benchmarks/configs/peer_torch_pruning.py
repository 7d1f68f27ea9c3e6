"""Benchmark: jaxcompress vs Torch-Pruning (peer), ResNet-56 L1 pruning to 50% FLOPs, one run.

Side by side: MACs / params left, the time of the pruning call, and CPU inference
latency dense vs pruned at batch 128 (see `benchmarks/peer.py`), for jaxcompress with
one uniform keep ratio and with the latency allocation (`jaxcompress.pruning.allocate`,
widths aligned to 8 in both), and Torch-Pruning (NCHW and channels_last). The PyTorch
side runs in its own environment (jaxcompress does not depend on torch); create it
once from the project root:

    python3 -m venv .venv-torch && .venv-torch/bin/pip install torch==2.13.0 torch-pruning

python -m benchmarks.run --config=benchmarks/configs/peer_torch_pruning.py --workdir=workdirs/bench_peer_torch_pruning
"""
import ml_collections

from configs import default


def get_config():
    c = default.get_config()
    c.job = "bench_peer_pruning"
    c.bench = ml_collections.ConfigDict(dict(
        model="resnet56", flops_budget=0.5, scope="all", multiple=8,  # 1: unaligned widths
        allocations=("uniform", "latency"),  # jaxcompress columns: one keep ratio; latency-table widths
        # single 3x3 convs (pixels H=W, C -> C channels) timed on both sides: XLA's conv against oneDNN's
        conv_shapes=((32, 8), (32, 16), (16, 16), (16, 24), (16, 32), (8, 48), (8, 64)),
        batch_size=128, rounds=5, prune_repeats=5, seed=0,
        share_weights=True,  # the PyTorch net loads jaxcompress's (random) initialisation
        torch_python=".venv-torch/bin/python",  # relative: to the working directory, else the project root
        torch_threads=0,  # 0: torch.set_num_threads(os.cpu_count())
        torch_timeout_s=1800))
    return c
