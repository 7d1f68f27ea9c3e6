"""A run's files on any filesystem `etils.epath` reaches: local paths, and remote ones
such as `gs://bucket/run` (Google Cloud Storage; `pip install gcsfs` or TensorFlow's
`tf.io.gfile`, as etils documents). Every writer of a workdir goes through these, so
`--workdir=gs://bucket/run` writes into the bucket, not into a local folder named `gs:`.

Object stores have no append and no atomic rename: `append_text` rewrites the object
with the new text at its end there, and `write_atomic` writes a temporary object and
moves it over the target (on a local disk the move is atomic, so a killed run never
leaves half a file).
"""
from __future__ import annotations

import os
import uuid

from etils import epath


def is_remote(path) -> bool:
    """Whether `path` names a remote filesystem (`<scheme>://...`)."""
    return "://" in os.fspath(path)


def make_dirs(path) -> epath.Path:
    """`path` as an `epath.Path`, created with its parents (a no-op where it exists)."""
    p = epath.Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


def write_atomic(path, data: bytes | str) -> None:
    """Writes `data` to `path` (its folder created) through a temporary file moved over
    it; a local file is on disk (fsync) before the move."""
    p = epath.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.parent / f"{p.name}.{uuid.uuid4().hex[:12]}.tmp"  # unique: processes sharing a workdir never collide
    data = data.encode() if isinstance(data, str) else data
    if is_remote(path):
        tmp.write_bytes(data)
        tmp.replace(p)
        return
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


def append_text(path, text: str) -> None:
    """Appends `text` to `path` (created if missing); remote: the object rewritten."""
    p = epath.Path(path)
    if not is_remote(path):
        with p.open("a") as f:
            f.write(text)
        return
    p.write_text((p.read_text() if p.exists() else "") + text)


def exists(path) -> bool:
    return epath.Path(path).exists()


def is_file(path) -> bool:
    return epath.Path(path).is_file()


def is_dir(path) -> bool:
    return epath.Path(path).is_dir()


def list_names(path) -> list[str]:
    """The names in folder `path` ([] when it does not exist)."""
    p = epath.Path(path)
    return sorted(c.name for c in p.iterdir()) if p.is_dir() else []


def read_bytes(path) -> bytes:
    return epath.Path(path).read_bytes()


def read_text(path) -> str:
    return epath.Path(path).read_text()


def save_figure(fig, path, dpi: int = 120) -> None:
    """`fig.savefig` to `path` (matplotlib writes local files only: PNG bytes moved there)."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format=os.path.splitext(os.fspath(path))[1][1:] or "png")
    write_atomic(path, buffer.getvalue())
