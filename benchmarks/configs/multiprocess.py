"""Benchmark: the train job as 1 process and as 2 local processes (jax.distributed, gloo,
one CPU device each) at the same global batch: examples read per process must halve,
and the runs must agree (issue 19).

python -m benchmarks.run --config=benchmarks/configs/multiprocess.py --workdir=workdirs/bench_multiprocess
"""
import ml_collections

from configs import default

TRAIN = ("--config=configs/quickstart.py", "--config.job=train", "--config.model.name=lenet300_100",
         "--config.data.image_size=8", "--config.data.val_size=100", "--config.train.num_epochs=3",
         "--config.train.batch_size=32", "--config.train.eval_batch_size=100", "--config.hardware.latency_batch=0")


def get_config():
    c = default.get_config()
    c.job = "bench_multiprocess"
    c.bench = ml_collections.ConfigDict(dict(processes=(1, 2), args=TRAIN, timeout_s=900.0))
    return c
