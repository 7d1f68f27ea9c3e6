"""The command line: one job from an ml_collections config, absl flags.

    python -m launch.main --config=configs/quickstart.py --workdir=/tmp/quickstart \
        --config.train.num_epochs=3

(`jaxcompress-run` is the same command once installed.) Bad input (unknown model,
dataset, job, config field; missing file; unreadable checkpoint) exits with code 2
and one line naming the problem, before any compilation.
"""
from __future__ import annotations

import sys
from typing import Mapping

from absl import app, flags, logging
from ml_collections import config_flags

from jaxcompress import jobs as J
from jaxcompress.data import DataError
from jaxcompress.errors import ConfigError
from jaxcompress.models import UnknownModelError
from jaxcompress.train import CheckpointError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/<x>.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and summary.json.")


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv):
    try:
        rest = flags.FLAGS(argv)
        config = _CONFIG.value
        if config is not None:
            config.get("job")  # config_flags loads lazily: surface a load failure here
    except (AttributeError, KeyError) as e:  # ml_collections: override of a field that does not exist
        fail(f"unknown config field {e}; check the override's spelling against the fields in the config file "
             f"(python -c 'from jaxcompress.config import get_config; print(get_config())')")
    except OSError as e:
        fail(f"cannot load the config file given to --config ({str(e).strip().splitlines()[-1].strip()}); "
             f"pass --config=configs/<name>.py from the project root")
    except (flags.Error, TypeError, ValueError) as e:
        fail(" ".join(line.strip() for line in str(e).strip().splitlines()))
    if config is None or not _WORKDIR.value:
        fail("both --config=configs/<x>.py and --workdir=<dir> are required")
    return rest


def quiet_library_logs() -> None:
    """Keeps jaxcompress's own INFO lines and every warning; drops libraries' INFO chatter."""
    logging.get_absl_handler().addFilter(
        lambda r: r.levelno >= logging.converter.STANDARD_WARNING or "jaxcompress" in r.pathname
        or "launch" in r.pathname or "benchmarks" in r.pathname)


def run_job(jobs: Mapping[str, str] | None = None, distilling=None) -> None:
    """Runs `--config`'s job from `jobs` (default: the library's, `jaxcompress.jobs.JOBS`)."""
    quiet_library_logs()
    try:
        summary = J.run(_CONFIG.value, _WORKDIR.value, jobs or J.JOBS, distilling or J.DISTILLING)
    except (ConfigError, DataError, UnknownModelError, CheckpointError) as e:
        fail(str(e))
    logging.info("summary: %s", {k: v for k, v in summary.items() if not isinstance(v, (list, dict))})
    headline = {k: round(v, 4) for k, v in summary.items() if isinstance(v, float) and "accuracy" in k}
    print(f"done: {_WORKDIR.value}/summary.json {headline}")


def main(jobs: Mapping[str, str] | None = None, distilling=None) -> None:
    """absl entry point (the `jaxcompress-run` console script)."""
    app.run(lambda argv: run_job(jobs, distilling), flags_parser=parse_flags)
