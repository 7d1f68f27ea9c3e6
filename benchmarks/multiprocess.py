"""Benchmark: one training job as 1 process and as 2 local processes (jax.distributed
over gloo, one CPU device each), the same global batch. Issue 19's target: each of the
2 processes reads half the examples the single process reads, and the runs agree.

Each run is `python -m launch.main` (the train job of `bench.args` on the quickstart
config); the figures come from the runs' summary.json (`examples_read_per_process`,
`steps`, accuracies) and wall times. On one 2-core machine the two processes share the
cores, so wall time is reported, not judged.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from jaxcompress.train.metrics import write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_processes(args: list[str], workdir: str, num_processes: int, timeout_s: float) -> dict:
    """Runs `launch.main` with `args` as `num_processes` local processes into `workdir`;
    returns its summary.json plus the wall time. A failed process raises RuntimeError."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    connect = []
    if num_processes > 1:
        connect = ["--config.distributed.enabled=True", f"--config.distributed.num_processes={num_processes}",
                   f"--config.distributed.coordinator_address=localhost:{_free_port()}"]
    start = time.time()
    procs = [subprocess.Popen([sys.executable, "-m", "launch.main", *args, f"--workdir={workdir}", *connect,
                               *([f"--config.distributed.process_id={i}"] if connect else [])],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(num_processes)]
    errors = [p.communicate(timeout=timeout_s)[1] for p in procs]
    wall = time.time() - start
    for p, err in zip(procs, errors):
        if p.returncode:
            raise RuntimeError(f"a process of the {num_processes}-process run failed ({p.returncode}): {err[-500:]}")
    with open(os.path.join(workdir, "summary.json")) as f:
        return {**json.load(f), "wall_time_s": wall}


def run(config, workdir: str) -> dict:
    """`bench_multiprocess`: the runs of `bench.processes` (e.g. (1, 2))."""
    b = config.bench
    rows = []
    for n in b.processes:
        s = run_processes(list(b.args), os.path.join(workdir, f"{n}_processes"), n, b.timeout_s)
        rows.append(dict(processes=n, examples_read_per_process=s["examples_read_per_process"], steps=s["steps"],
                         test_accuracy=s["test_accuracy"], wall_time_s=s["wall_time_s"]))
    table = "\n".join(["| processes | examples read per process | steps (global batch) | test accuracy | wall |",
                       "|---|---|---|---|---|"]
                      + [f"| {r['processes']} | {' / '.join(map(str, r['examples_read_per_process']))} | {r['steps']} | "
                         f"{r['test_accuracy']:.4f} | {r['wall_time_s']:.0f} s |" for r in rows])
    one = rows[0]
    targets = [dict(what=f"examples read per process, {r['processes']} processes",
                    target=f"{one['examples_read_per_process'][0]} / {r['processes']} each",
                    measured=" / ".join(map(str, r["examples_read_per_process"])),
                    met=all(e * r["processes"] == one["examples_read_per_process"][0]
                            for e in r["examples_read_per_process"])) for r in rows[1:]]
    targets += [dict(what=f"same steps and test accuracy, {r['processes']} processes", target="equal to 1 process",
                     measured=f"{r['steps']} steps, {r['test_accuracy']:.4f}",
                     met=r["steps"] == one["steps"] and r["test_accuracy"] == one["test_accuracy"]) for r in rows[1:]]
    summary = dict(job=config.job, rows=rows, table=table, targets=targets)
    write_json(os.path.join(workdir, "summary.json"), summary)
    return summary
