"""Jobs by name: what `launch/main.py` (and the `jaxcompress-run` entry point) runs
for `config.job`. A job's module is imported only when that job is asked for."""
from __future__ import annotations

import importlib
import os
from typing import Callable, Mapping

from jaxcompress import files
from jaxcompress.distributed import initialize_from_config
from jaxcompress.errors import ConfigError
from jaxcompress.schema import validate
from jaxcompress.train.metrics import write_json
from jaxcompress.workdir_lock import workdir_lock

# name -> "module:function"; every function is `f(config, workdir) -> summary dict`
JOBS = {
    "train": "jaxcompress.train.loop:train_and_evaluate",
    "evaluate": "jaxcompress.train.loop:evaluate",
    "prune": "jaxcompress.pruning.job:prune_and_finetune",
    "quantize": "jaxcompress.quant.job:quantize",
    "search": "jaxcompress.rl.job:search",
    "stamp": "jaxcompress.stamp.job:run",
}
# jobs whose fine-tunes distil from their reference network when train.distill_weight > 0
DISTILLING = ("prune", "quantize", "search")


# optional dependencies (setup.py extras) a job's module imports
EXTRAS = {"distrax": "rl", "rlax": "rl"}


def resolve(target: str) -> Callable:
    """The function named by "module:function"; a missing optional dependency is a
    one-line error naming the extra that installs it."""
    module, _, name = target.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as e:
        if e.name not in EXTRAS:
            raise
        raise ConfigError(f"{module} needs {e.name}: pip install 'jaxcompress[{EXTRAS[e.name]}]'") from None


def run(config, workdir: str, jobs: Mapping[str, str] = JOBS, distilling=DISTILLING) -> dict:
    """Validates the config against the schema (`jaxcompress.schema`), checks the job
    name, connects the processes of a multi-process run (`config.distributed`, once per
    process), writes `<workdir>/config.json` (process 0), runs the job."""
    validate(config)  # every field's type and range, before any import, file or compile
    if config.job not in jobs:
        raise ConfigError(f"unknown job '{config.job}'; set --config.job to one of {', '.join(sorted(jobs))}"
                          + ("" if config.job in JOBS or not config.job.startswith("bench")
                             else " (benchmarks run with python -m benchmarks.run)"))
    if config.train.distill_weight > 0 and config.job not in distilling:
        raise ConfigError(f"train.distill_weight={config.train.distill_weight}: job '{config.job}' has no teacher; "
                          f"distillation applies to the fine-tunes of the {', '.join(distilling)} jobs (from "
                          f"their reference network); set --config.train.distill_weight=0")
    job = resolve(jobs[config.job])  # before any work: a missing extra fails here
    # once per process, before any JAX computation; every job (and every job a job runs) shares it
    multihost = initialize_from_config(config)
    try:
        files.make_dirs(workdir)
    except OSError as e:  # a file there, no permission, ...
        raise ConfigError(f"--workdir={workdir}: cannot be used as the run's directory ({type(e).__name__}: "
                          f"{e.strerror or e}); give a new or existing directory") from None
    with workdir_lock(workdir, multihost=multihost):  # a second live run: one-line refusal
        write_json(os.path.join(workdir, "config.json"), config.to_dict())
        return job(config, workdir)
