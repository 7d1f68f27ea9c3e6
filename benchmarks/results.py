"""Benchmark results files: `benchmarks/results/<name>.json`, one per result set.

Every figure in `docs/RESULTS.md` and in README.md's results block is generated from
these files (`python -m benchmarks.report`), so a published figure is always one a
results file holds. A record:

    name      the file's stem (the benchmark config's stem, `_<arg>` for `config.py:<arg>`)
    title     one line
    command   the exact command line that produced it
    machine   e.g. "2-core x86_64 Linux, XLA:CPU (cpu), jax 0.10.2"
    date      YYYY-MM-DD
    source    "measured", or "migrated from README.md at commit <sha>, first written <date>"
    targets   [{"what", "target", "measured", "met": true | false | null}]  (null: no target set)
    table     markdown
    notes     short method notes: how the figure was reached, what was tried
    figures   the raw numbers ({} for migrated records)

`python -m benchmarks.run` files every run it finishes through `file_run`; by hand:

    python -m benchmarks.results <workdir> --name=<name> [--command="..."]
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
from pathlib import Path
from typing import Any, Iterable, Mapping

from benchmarks.targets import judge

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FIELDS = ("name", "title", "command", "machine", "date", "source", "targets", "table", "notes", "figures")
TARGET_FIELDS = ("what", "target", "measured", "met")
DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
SOURCE = re.compile(r"^(measured|migrated from README\.md at commit [0-9a-f]{7,40}, first written \d{4}-\d{2}-\d{2})$")
NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
# files a workdir may hold with the benchmark's own markdown table (benchmarks/quant_mixed.py,
# single_layer.py: results.md; peer.py: comparison.md)
TABLE_FILES = ("results.md", "comparison.md")


def validate(record: Mapping[str, Any]) -> None:
    """Raises ValueError naming the first field that does not follow the schema."""
    missing = [f for f in FIELDS if f not in record]
    if missing:
        raise ValueError(f"results record {record.get('name', '?')!r} lacks {', '.join(missing)}")
    name = record["name"]
    for f in ("name", "title", "command", "machine", "date", "source", "table", "notes"):
        if not isinstance(record[f], str):
            raise ValueError(f"{name}: field {f!r} must be a string")
    if not NAME.match(name):
        raise ValueError(f"{name!r}: a name is letters, digits, '_', '.', '-'")
    if not DATE.match(record["date"]):
        raise ValueError(f"{name}: date {record['date']!r} is not YYYY-MM-DD")
    datetime.date.fromisoformat(record["date"])
    if not SOURCE.match(record["source"]):
        raise ValueError(f"{name}: source {record['source']!r} is neither 'measured' nor "
                         f"'migrated from README.md at commit <sha>, first written <YYYY-MM-DD>'")
    if not record["title"].strip() or not record["command"].strip():
        raise ValueError(f"{name}: empty title or command")
    if not isinstance(record["targets"], list):
        raise ValueError(f"{name}: targets must be a list")
    for t in record["targets"]:
        if not isinstance(t, Mapping) or set(t) != set(TARGET_FIELDS):
            raise ValueError(f"{name}: every target has exactly the fields {TARGET_FIELDS}: {t!r}")
        if t["met"] not in (True, False, None):
            raise ValueError(f"{name}: target {t['what']!r}: met must be true, false or null")
        if not all(isinstance(t[k], str) for k in ("what", "target", "measured")):
            raise ValueError(f"{name}: target {t!r}: what, target and measured are strings")
    if not isinstance(record["figures"], Mapping):
        raise ValueError(f"{name}: figures must be a dict")


def make_record(name: str, title: str, command: str, machine: str, date: str, source: str = "measured",
                targets: Iterable[Mapping] = (), table: str = "", notes: str = "",
                figures: Mapping | None = None) -> dict:
    """A validated record, fields in schema order."""
    record = dict(name=name, title=title, command=command, machine=machine, date=date, source=source,
                  targets=[{k: t[k] for k in TARGET_FIELDS} for t in targets], table=table.strip(),
                  notes=notes.strip(), figures=dict(figures or {}))
    validate(record)
    return record


def dumps(record: Mapping) -> str:
    return json.dumps({f: record[f] for f in FIELDS}, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def write_result(path: str | os.PathLike, record: Mapping | None = None, **fields) -> dict:
    """Writes a record (or one built from `fields`, as `make_record` takes them) to `path`
    (a `.json` file, or a directory: then `<dir>/<name>.json`). Returns the record."""
    record = make_record(**{**(record or {}), **fields})
    path = Path(path)
    if path.suffix != ".json":
        path = path / f"{record['name']}.json"
    if path.stem != record["name"]:
        raise ValueError(f"results file {path} must be named after its record: {record['name']}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(dumps(record))
    os.replace(tmp, path)
    return record


def load_result(path: str | os.PathLike) -> dict:
    path = Path(path)
    record = json.loads(path.read_text())
    validate(record)
    if record["name"] != path.stem:
        raise ValueError(f"{path}: record name {record['name']!r} differs from the file's stem")
    return record


def load_results(directory: str | os.PathLike = RESULTS_DIR) -> list[dict]:
    """Every `<directory>/*.json` record, validated, sorted by name."""
    return [load_result(p) for p in sorted(Path(directory).glob("*.json"))]


# ---- from a benchmark run -------------------------------------------------------------

def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def numbers(summary: Mapping) -> dict:
    """The numbers of a summary: numeric scalars and lists of numbers, nested dicts kept
    (empty ones dropped); strings, booleans, non-finite values and other lists left out."""
    out = {}
    for k, v in summary.items():
        if _number(v):
            out[str(k)] = v
        elif isinstance(v, (list, tuple)) and v and all(_number(x) for x in v):
            out[str(k)] = list(v)
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, Mapping) for x in v):
            rows = [numbers(x) for x in v]  # per-row figures (e.g. one row per model)
            if any(rows):
                out[str(k)] = rows
        elif isinstance(v, Mapping):
            inner = numbers(v)
            if inner:
                out[str(k)] = inner
    return out


def scalars(figures: Mapping, prefix: str = "") -> list[tuple[str, int | float]]:
    """(dotted name, value) of every numeric scalar in `figures`, in order."""
    out = []
    for k, v in figures.items():
        if isinstance(v, Mapping):
            out += scalars(v, f"{prefix}{k}.")
        elif _number(v):
            out.append((f"{prefix}{k}", v))
    return out


def scalar_table(figures: Mapping) -> str:
    """A generic markdown table of the scalar figures ("" when there are none)."""
    rows = scalars(figures)
    if not rows:
        return ""
    fmt = lambda v: str(v) if isinstance(v, int) else format(v, ".6g")  # noqa: E731
    return "\n".join(["| figure | value |", "|---|---|"] + [f"| {k} | {fmt(v)} |" for k, v in rows])


def from_summary(name: str, summary: Mapping, command: str, *, title: str | None = None,
                 machine: str | None = None, date: str | None = None, source: str = "measured",
                 targets: Iterable[Mapping] = (), table: str | None = None, notes: str = "") -> dict:
    """A results record from a benchmark's `summary.json` dict: its numbers in `figures`;
    `table` the benchmark's own markdown table (the argument, else `summary["table"]` when
    it is a string), else a generic table of the scalar figures; `targets` the argument,
    else `summary["targets"]` when the benchmark wrote them in the schema's form. `machine` and `date`
    default to this machine and today."""
    figures = numbers(summary)
    if not targets and isinstance(summary.get("targets"), list):  # a benchmark may judge its own targets
        targets = summary["targets"]
    if table is None:
        table = summary.get("table") if isinstance(summary.get("table"), str) else scalar_table(figures)
    return make_record(
        name=name, title=title or name, command=command,
        machine=this_machine() if machine is None else machine,
        date=datetime.date.today().isoformat() if date is None else date,
        source=source, targets=targets, table=table, notes=notes, figures=figures)


def this_machine() -> str:
    """e.g. "2-core x86_64 Linux, XLA:CPU (cpu), jax 0.10.2"."""
    import jax
    d = jax.devices()
    kind = f"{d[0].device_kind} x{len(d)}" if len(d) > 1 else d[0].device_kind
    backend = f"XLA:{d[0].platform.upper()}"
    return f"{os.cpu_count()}-core {platform.machine()} {platform.system()}, {backend} ({kind}), jax {jax.__version__}"


def results_name(config_path: str) -> str:
    """`benchmarks/configs/stamp_cifar10.py:small` -> `stamp_cifar10_small`."""
    path, _, arg = config_path.partition(":")
    stem = Path(path).stem
    arg = re.sub(r"[^A-Za-z0-9_.-]+", "_", arg).strip("_")
    return f"{stem}_{arg}" if arg else stem


def run_command(argv: list[str], module: str = "benchmarks.run") -> str:
    """The command line of this run: `python -m <module>` and its arguments, quoted for a
    shell, after JAXCOMPRESS_DATA_DIR=... when that is set."""
    env = os.environ.get("JAXCOMPRESS_DATA_DIR")
    prefix = f"JAXCOMPRESS_DATA_DIR={shlex.quote(env)} " if env else ""
    return f"{prefix}python -m {module} {shlex.join(argv[1:])}".rstrip()


def file_run(name: str, workdir: str, command: str, results_dir: str | os.PathLike = RESULTS_DIR) -> Path:
    """Files the run in `workdir` (its summary.json, and its results.md / comparison.md
    table if it wrote one) as `<results_dir>/<name>.json`; an existing record's title is
    kept. Returns the path written."""
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    table = None
    if not isinstance(summary.get("table"), str):
        for t in TABLE_FILES:
            if os.path.isfile(os.path.join(workdir, t)):
                with open(os.path.join(workdir, t)) as f:
                    table = f.read()
                break
    targets, judged_table = judge(name, summary)
    table = judged_table or table
    path = Path(results_dir) / f"{name}.json"
    title = None
    if path.exists():  # the record it replaces is kept under history/ (docs read only the current ones)
        previous = json.loads(path.read_text())
        title = previous.get("title")
        archive = Path(results_dir) / "history" / f"{name}-{previous.get('date', 'undated')}.json"
        archive.parent.mkdir(parents=True, exist_ok=True)
        archive.write_text(path.read_text())
    write_result(path, from_summary(name, summary, command, title=title, table=table, targets=targets,
                                    notes=f"Filed by benchmarks.results from {workdir}/summary.json."))
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.results", description=__doc__.split("\n\n")[0])
    p.add_argument("workdir", help="a finished run's workdir (holds summary.json)")
    p.add_argument("--name", required=True, help="results file stem, e.g. the config's stem")
    p.add_argument("--command", default="", help="the command that produced the run")
    p.add_argument("--results-dir", default=str(RESULTS_DIR))
    a = p.parse_args(argv)
    command = a.command
    if not command:
        config = os.path.join(a.workdir, "config.json")
        command = f"(unrecorded; the run's config is {config})"
    print(file_run(a.name, a.workdir, command, a.results_dir))


if __name__ == "__main__":
    main()
