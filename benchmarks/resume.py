"""Resumable benchmark rows: a run appends one JSON line per finished unit (a cell, a
policy) to `<workdir>/results.jsonl`, keyed and fingerprinted by the settings that made
it; a rerun reads back the rows of the same fingerprint and computes only the rest."""
from __future__ import annotations

import json
import os


def read_rows(path: str, fingerprint: str) -> dict[str, dict]:
    """The rows in `path` (JSON lines) with this fingerprint, by their "key"; a torn
    (half-written) line is ignored."""
    out = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row.get("fingerprint") == fingerprint:
                    out[row["key"]] = row
    return out


def append_row(path: str, row: dict) -> None:
    """Appends `row` as one line, on disk (fsync) before returning."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
