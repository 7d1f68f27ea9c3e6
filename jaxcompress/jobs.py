"""Jobs by name: what `launch/main.py` runs for `config.job`."""
from __future__ import annotations

import os

from jaxcompress.bench import hardware, overhead, peer, speedup
from jaxcompress.errors import ConfigError
from jaxcompress.pruning import bench as prune_bench
from jaxcompress.pruning.job import prune_and_finetune
from jaxcompress.quant import bench as quant_bench
from jaxcompress.quant.job import quantize
from jaxcompress.stamp.job import run as stamp
from jaxcompress.rl import bench as rl_bench
from jaxcompress.rl.job import search
from jaxcompress.train import evaluate, train_and_evaluate
from jaxcompress.train.metrics import write_json

JOBS = {
    "train": train_and_evaluate,
    "evaluate": evaluate,
    "prune": prune_and_finetune,
    "quantize": quantize,
    "bench_quant_mixed": quant_bench.run,
    "stamp": stamp,
    "bench_overhead": overhead.run,
    "bench_prune_speedup": speedup.run,
    "bench_single_layer": prune_bench.run,
    "bench_peer_pruning": peer.run,
    "bench_latency_budget": hardware.latency_budget,
    "bench_latency_predictor": hardware.predictor,
    "bench_budget_accuracy": hardware.budget_accuracy,
    "search": search,
    "bench_search_speed": rl_bench.speed,
    "bench_search_agents": rl_bench.agents,
}
# jobs whose fine-tunes distil from their reference network when train.distill_weight > 0
DISTILLING = ("prune", "quantize", "search", "bench_search_agents", "bench_budget_accuracy")


def run(config, workdir: str) -> dict:
    """Checks the job name, writes `<workdir>/config.json`, runs the job."""
    if config.job not in JOBS:
        raise ConfigError(f"unknown job '{config.job}'; set --config.job to one of {', '.join(sorted(JOBS))}")
    if config.train.distill_weight > 0 and config.job not in DISTILLING:
        raise ConfigError(f"train.distill_weight={config.train.distill_weight}: job '{config.job}' has no teacher; "
                          f"distillation applies to the fine-tunes of the {', '.join(DISTILLING)} jobs (from "
                          f"their reference network); set --config.train.distill_weight=0")
    os.makedirs(workdir, exist_ok=True)
    write_json(os.path.join(workdir, "config.json"), config.to_dict())
    return JOBS[config.job](config, workdir)
