"""An offline text corpus for language models: the Python standard library's source.

`load_python_stdlib(seq_len)` reads every ``*.py`` file under
``sysconfig.get_paths()["stdlib"]`` (third-party ``site-packages`` /
``dist-packages`` folders left out) as bytes, one token per byte (vocabulary 256,
no tokenizer, no network). Files are taken in sorted order of their path relative
to the root; a file goes to the test split when the CRC-32 of that path falls in
the first `test_fraction` of its range, so the split is fixed by file (no file is
in both) and a file keeps its split when others are added or removed. Each split's
files are concatenated and cut into non-overlapping sequences of ``seq_len + 1``
tokens (inputs ``seq[:, :-1]``, next-token targets ``seq[:, 1:]``); the remainder
is dropped. The corpus depends on the interpreter's version (CPython 3.11: about
1,800 files, 31 MB).
"""
from __future__ import annotations

import dataclasses
import os
import sysconfig
import zlib

import numpy as np

from jaxcompress.data.sources import DataError

VOCAB_SIZE = 256  # bytes
_NOT_STDLIB = ("site-packages", "dist-packages")


@dataclasses.dataclass(frozen=True, eq=False)
class TextCorpus:
    """Token sequences of one corpus: `train` and `test` are uint8 arrays of shape
    (N, seq_len + 1) (token ids < `vocab_size`); `*_files` the source files of each split."""

    name: str
    train: np.ndarray
    test: np.ndarray
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    vocab_size: int = VOCAB_SIZE

    @property
    def seq_len(self) -> int:
        """Model input length: each sequence holds seq_len inputs and one more target."""
        return int(self.train.shape[1]) - 1


def python_files(root: str) -> list[str]:
    """Paths (relative to `root`, '/'-separated, sorted) of its ``*.py`` files outside
    site-packages / dist-packages."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _NOT_STDLIB]
        rel = os.path.relpath(folder, root).replace(os.sep, "/")
        found += [name if rel == "." else f"{rel}/{name}" for name in files if name.endswith(".py")]
    return sorted(found)


def load_python_stdlib(seq_len: int = 128, test_fraction: float = 0.1, root: str | None = None) -> TextCorpus:
    """The standard library's ``*.py`` files (or those under `root`) as byte sequences
    of ``seq_len + 1`` tokens, split by file (see the module doc).

    Raises:
      DataError: (one line) for a bad `seq_len` or `test_fraction`, or a split with
        less than one sequence of text.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise DataError(f"seq_len must be an int >= 2 (inputs and next-token targets), got {seq_len!r}.")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise DataError(f"test_fraction must be a number strictly between 0 and 1, got {test_fraction!r}.")
    root = root or sysconfig.get_paths()["stdlib"]
    files = python_files(root)
    is_test = [zlib.crc32(f.encode()) < test_fraction * 2 ** 32 for f in files]
    splits = {}
    for split, names in (("train", [f for f, t in zip(files, is_test) if not t]),
                         ("test", [f for f, t in zip(files, is_test) if t])):
        text = b"".join(_read(os.path.join(root, f)) for f in names)
        n = len(text) // (seq_len + 1)
        if n == 0:
            raise DataError(f"python_stdlib: the {split} split has {len(names)} files, {len(text)} bytes under "
                            f"{root!r}, less than one sequence of {seq_len + 1} tokens; use a smaller seq_len "
                            f"or a folder with more Python files.")
        tokens = np.frombuffer(text, np.uint8, count=n * (seq_len + 1))
        splits[split] = (tokens.reshape(n, seq_len + 1).copy(), tuple(names))
    return TextCorpus(name="python_stdlib", train=splits["train"][0], test=splits["test"][0],
                      train_files=splits["train"][1], test_files=splits["test"][1])


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"python_stdlib: cannot read {path!r} ({type(e).__name__}: {e.strerror or e}).") from e
