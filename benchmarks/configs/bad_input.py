"""Benchmark: issue 20's bad and odd overrides through `python -m launch.main`, each in its
own process, classified (refused in one line / noisy / traceback / accepted / other).

python -m benchmarks.run --config=benchmarks/configs/bad_input.py --workdir=workdirs/bench_bad_input
"""
import ml_collections

from configs import default


def get_config():
    c = default.get_config()
    c.job = "bench_bad_input"
    c.bench = ml_collections.ConfigDict(dict(parallel=2, timeout_s=120.0))
    return c
