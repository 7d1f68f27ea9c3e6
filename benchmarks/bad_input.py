"""Benchmark: the bad and odd overrides of issue 20, each run through `python -m
launch.main` as a user would, and what came back:

    refused   exit code 2, exactly one stderr line starting "error: ", no traceback
    noisy     exit code 2 with the error line, but more lines on stderr
    traceback a Python traceback on stderr (the promise broken)
    accepted  exit 0, or still working after `bench.timeout_s` (the job ran on nonsense)
    other     any other exit

Target (issue 20): every override outside the schema refused in one line, 0 tracebacks.
Each case is its own process from the offline quickstart config (embedded digits).
"""
from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import tempfile

from absl import logging

from jaxcompress.train.metrics import write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTCOMES = ("refused", "noisy", "traceback", "accepted", "other")

# (job, override(s)) from issue 20's lists: "Tracebacks" and "Accepted silently"
CASES = (
    ("train", "data.image_size=1"), ("train", "data.image_size=3"),
    ("train", "model.width_multiplier=inf"), ("train", "model.width_multiplier=nan"),
    ("train", "model.width_multiplier=5000"), ("train", "model.width_multiplier=1e-9"),
    ("train", "data.classes=(1,1)"), ("train", "data.classes=(-1,)"), ("train", "data.classes=(10,)"),
    ("train", "data.classes=('a',)"),
    ("prune", "prune.sample_size=0"), ("prune", "prune.sample_size=-1"), ("prune", "hardware.latency_batch=-1"),
    ("search", "search.eval_chunk=-1"), ("search", "search.checkpoint_every=0"),
    ("search", "search.report_budgets=('a',)"), ("search", "search.ddpg.hidden=0"),
    ("search", "search.ppo.clip=-1"), ("search", "search.ppo.clip=nan"), ("search", "search.log_every=0"),
    ("stamp", "stamp.inner_steps=-1"), ("stamp", "stamp.query_size=0"), ("stamp", "stamp.tasks_per_step=0"),
    ("stamp", "stamp.num_heads=3"), ("stamp", "stamp.task_ways=(9,)"),
    ("stamp", "stamp.prior_alpha=0"), ("stamp", "stamp.prior_alpha=-1"), ("stamp", "stamp.temperature=0"),
    ("stamp", "stamp.feature_convs=0"), ("stamp", "stamp.feature_convs=99"), ("stamp", "stamp.methods=()"),
    ("stamp", "stamp.baseline_widths=foo"), ("stamp", "stamp.meta_checkpoint=/nonexistent/meta"),
    ("quantize", "quant.verify_batch=0"), ("quantize", "quant.mode=qat quant.qat_learning_rate=nan"),
    ("quantize", "quant.budget_ratio=2.0"), ("quantize", "quant.budget_ratio=nan"),
    ("quantize", "quant.kmeans_iters=-1"),
    ("train", "checkpoint.max_to_keep=-1"), ("train", "checkpoint.max_to_keep=0"),
    ("train", "train.learning_rate=nan"), ("train", "train.learning_rate=-0.1"),
    ("train", "train.learning_rate=inf"), ("train", "train.weight_decay=nan"), ("train", "train.weight_decay=-1"),
    ("train", "train.momentum=nan"), ("train", "train.momentum=-1"), ("train", "train.label_smoothing=2"),
    ("train", "train.label_smoothing=-0.5"), ("train", "train.label_smoothing=nan"),
    ("train", "train.num_epochs=1000000000000"),
    ("train", "distributed.coordinator_address=localhost:1234"),
    ("train", "<workdir is a file>"), ("train", "<config file raises>"), ("train", "<config file syntax error>"),
)
CONFIG_FILES = {"<config file raises>": "def get_config():\n    raise RuntimeError('no config here')\n",
                "<config file syntax error>": "def get_config(:\n    pass\n"}


def classify(returncode: int | None, stderr: str) -> str:
    """The outcome of one run (module docstring); `returncode` None: killed at the timeout."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    if "Traceback (most recent call last)" in stderr:
        return "traceback"
    if returncode is None or returncode == 0:
        return "accepted"
    if returncode == 2 and lines and lines[-1].startswith("error: "):
        return "refused" if len(lines) == 1 else "noisy"
    return "other"


def _command(job: str, override: str, tmp: str) -> tuple[list[str], str]:
    workdir = os.path.join(tmp, "workdir")
    config = "configs/quickstart.py"
    extra = [] if override.startswith("<") else [f"--config.{o}" for o in override.split()]
    if override in CONFIG_FILES:
        config = os.path.join(tmp, "config.py")
        with open(config, "w") as f:
            f.write(CONFIG_FILES[override])
    if override == "<workdir is a file>":
        with open(workdir, "w") as f:
            f.write("not a directory\n")
    args = [sys.executable, "-m", "launch.main", f"--config={config}", f"--workdir={workdir}"]
    if override not in CONFIG_FILES:
        args += [f"--config.job={job}", "--config.train.num_epochs=1"]
    return args + extra, workdir


def run_case(job: str, override: str, timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        args, _ = _command(job, override, tmp)
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env.setdefault("JAX_PLATFORMS", "cpu")
        try:
            proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
            code, stderr = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as e:
            code, stderr = None, (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else ""
    lines = [line for line in stderr.splitlines() if line.strip()]
    outcome = classify(code, stderr)
    return dict(job=job, override=override, outcome=outcome, exit_code=code,
                line=(lines[-1] if lines else "")[:300])


def run(config, workdir: str) -> dict:
    """`bench_bad_input`: every case of `CASES`, `bench.parallel` at a time."""
    b = config.bench
    with concurrent.futures.ThreadPoolExecutor(b.parallel) as pool:
        rows = list(pool.map(lambda case: run_case(*case, b.timeout_s), CASES))
    counts = {k: sum(r["outcome"] == k for r in rows) for k in OUTCOMES}
    for r in rows:
        logging.info("%-9s %-8s %s: %s", r["outcome"], r["job"], r["override"], r["line"][:120])
    summary = dict(job=config.job, cases=len(rows), counts=counts, refused_share=counts["refused"] / len(rows),
                   rows=rows)
    write_json(os.path.join(workdir, "summary.json"), summary)
    return summary
