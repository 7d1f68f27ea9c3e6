"""Benchmark: PPO's update count and advantage normalisation (issue 16, item 4), on the
agents benchmark's setting (LeNet-5 / MNIST, 50% FLOPs, 800 episodes of 16 actors, 3
seeds, the best policy of each seed fine-tuned 1 epoch). The default PPO (4 actor steps
per iteration: 50 iterations x 4 = 200 actor gradient steps, advantages normalised per
batch) is `search_agents.py`'s ppo row; each argument changes one thing:

- `epochs16`: 16 actor steps per iteration (800 in the search);
- `raw`: advantages only centred, not divided by their batch standard deviation;
- `epochs16_raw`: both.

python -m benchmarks.run --config=benchmarks/configs/search_ppo_updates.py:epochs16 \\
    --workdir=workdirs/bench_search_ppo_updates_epochs16
"""
from benchmarks.configs import search_agents
from jaxcompress.errors import ConfigError

VARIANTS = {"epochs16": (16, True), "raw": (4, False), "epochs16_raw": (16, False)}


def get_config(arg: str = "epochs16"):
    if arg not in VARIANTS:
        raise ConfigError(f"unknown argument '{arg}' for {__name__}; use one of {', '.join(VARIANTS)}")
    c = search_agents.get_config()
    c.search.ppo.epochs, c.search.ppo.normalize_advantages = VARIANTS[arg]
    c.bench.agents = ("ppo",)
    return c
