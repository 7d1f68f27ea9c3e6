"""The command line: one job from an ml_collections config, absl flags.

    python -m launch.main --config=configs/quickstart.py --workdir=/tmp/quickstart \
        --config.train.num_epochs=3

(`jaxcompress-run` is the same command once installed.) Bad input (unknown model,
dataset, job, config field; missing file; unreadable checkpoint) exits with code 2
and one line naming the problem, before any compilation.
"""
from __future__ import annotations

import signal
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
    """absl flags -> the positional arguments; every failure (an unknown positional
    argument or config field, a config file that is missing, has a syntax error or
    raises, a bad override) is one line and exit code 2."""
    import re

    from ml_collections import ConfigDict

    def config_arg() -> str:  # --config as given, for the messages
        for i, arg in enumerate(argv):
            if arg.startswith(("--config=", "-config=")):
                return arg.split("=", 1)[1]
            if arg in ("--config", "-config") and i + 1 < len(argv):
                return argv[i + 1]
        return "?"

    def cannot_load(reason: str) -> None:
        reason = " ".join(reason.split()) or "no message"
        fail(f"cannot load the config file --config={config_arg()}: {reason}; fix it, or pass "
             f"--config=configs/<name>.py[:<argument>] from the project root")

    def loaded():
        try:
            return _CONFIG.value
        except Exception:  # noqa: BLE001 - only used to word the message
            return None

    def no_none_warning(record) -> bool:  # that case gets its own one-line error below
        return "get_config() returned None" not in record.getMessage()

    logging.get_absl_logger().addFilter(no_none_warning)
    try:
        rest = flags.FLAGS(argv)
        config = _CONFIG.value
        if config is not None:
            config.get("job")  # config_flags loads lazily: surface a load failure here
    except (AttributeError, KeyError) as e:  # ml_collections: override of a field that does not exist
        if isinstance(e, AttributeError) and "get_config" in str(e):
            cannot_load("it has no get_config() function")
        config = loaded()
        if config is not None and not isinstance(config, ConfigDict):
            cannot_load(f"get_config() must return an ml_collections.ConfigDict, not {type(config).__name__}")
        key = str(e.args[0] if e.args else e).strip("'\"")
        paths = [a.split("=", 1)[0][len("--config."):] for a in argv if a.startswith("--config.")]
        path = next((p for p in paths if key in p.split(".")), key)
        fail(f"unknown config field {path}; check the override's spelling against the fields in the config file "
             f"(python -c 'from jaxcompress.config import get_config; print(get_config())')")
    except OSError as e:
        fail(f"cannot load the config file given to --config ({str(e).strip().splitlines()[-1].strip()}); "
             f"pass --config=configs/<name>.py from the project root")
    except (flags.Error, TypeError, ValueError) as e:
        text = str(e).strip()
        if "Error whilst parsing config file" in text:  # get_config() raised: keep the traceback's last line
            cannot_load(re.sub(r"^(?:\w+\.)+(?=\w+: )", "", text.splitlines()[-1].strip()))
        fail(" ".join(line.strip() for line in text.splitlines()))
    except Exception as e:  # noqa: BLE001 - loading the config file ran its code: a syntax or import error, ...
        cannot_load(f"{type(e).__name__}: {e}")
    finally:
        logging.get_absl_logger().removeFilter(no_none_warning)
    if config is None and flags.FLAGS["config"].present:
        cannot_load("get_config() returned None (a missing return statement?)")
    if config is None or not _WORKDIR.value:
        fail("both --config=configs/<x>.py and --workdir=<dir> are required")
    if not isinstance(config, ConfigDict):
        cannot_load(f"get_config() must return an ml_collections.ConfigDict, not {type(config).__name__}")
    if len(rest) > 1:
        fail(f"unexpected argument {' '.join(rest[1:])!r}: give only flags, e.g. --config=configs/<x>.py "
             f"--workdir=<dir> --config.<section>.<field>=<value>")
    return rest


def quiet_library_logs() -> None:
    """Keeps jaxcompress's own INFO lines and every warning; drops libraries' INFO chatter."""
    logging.get_absl_handler().addFilter(
        lambda r: r.levelno >= logging.converter.STANDARD_WARNING or "jaxcompress" in r.pathname
        or "launch" in r.pathname or "benchmarks" in r.pathname)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def interrupt_on_signals() -> None:
    """Makes Ctrl-C (SIGINT) and SIGTERM (a scheduler stopping or preempting the job) raise
    KeyboardInterrupt, so the job saves and exits as on Ctrl-C. Python keeps SIGINT ignored
    in a process started ignoring it (`cmd &` in a script, nohup), where `kill -INT` would
    otherwise be lost."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)


def run_job(jobs: Mapping[str, str] | None = None, distilling=None) -> None:
    """Runs `--config`'s job from `jobs` (default: the library's, `jaxcompress.jobs.JOBS`).
    Ctrl-C or SIGTERM exits with code 130 and one line on how to resume, no traceback."""
    from jaxcompress.errors import NonFiniteError
    quiet_library_logs()
    interrupt_on_signals()
    try:
        summary = J.run(_CONFIG.value, _WORKDIR.value, jobs or J.JOBS, distilling or J.DISTILLING)
    except (ConfigError, DataError, UnknownModelError, CheckpointError) as e:
        fail(f"{_CONFIG.value.job} job: {e}" if isinstance(e, NonFiniteError) else str(e))
    except KeyboardInterrupt:  # the jobs finish their pending checkpoint saves while unwinding
        print(f"interrupted: the checkpoints saved so far in {_WORKDIR.value} stand; rerun the same command to "
              f"resume from the last one", file=sys.stderr)
        sys.exit(130)
    logging.info("summary: %s", {k: v for k, v in summary.items() if not isinstance(v, (list, dict))})
    headline = {k: round(v, 4) for k, v in summary.items() if isinstance(v, float) and "accuracy" in k}
    print(f"done: {_WORKDIR.value}/summary.json {headline}")


def main(jobs: Mapping[str, str] | None = None, distilling=None) -> None:
    """absl entry point (the `jaxcompress-run` console script)."""
    app.run(lambda argv: run_job(jobs, distilling), flags_parser=parse_flags)
