"""One live run per workdir: `<workdir>/.lock`, holding the owner's pid and host.

`workdir_lock(workdir)` (a context manager; `jobs.run` holds it while a job runs)
creates the lock file atomically (`O_CREAT | O_EXCL`) and removes it on exit, also
when the job raises. While another live process holds it, a second run is refused
with one `ConfigError` line naming the owner's pid and host. A stale lock, left by a
process that is no longer running on this host (killed, crashed), is taken over with a
warning. The lock is re-entrant within a process: a job that runs another job on the
same workdir keeps working. Hand-written: `fcntl.flock` holds no owner to name, and
no kept library reports a lock's pid and host.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid

from absl import logging

from jaxcompress import files
from jaxcompress.errors import ConfigError

LOCK_NAME = ".lock"
_UNREADABLE_GRACE_S = 2.0  # a lock file being written is empty for a moment
_held: dict[str, tuple[int, dict]] = {}  # lock path -> (nesting depth, owner record), in this process
_mutex = threading.Lock()


class WorkdirLockedError(ConfigError):
    """Another live run holds the workdir."""


def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux; None elsewhere): tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except (OSError, OverflowError, ValueError):
        return False
    return True


def _read(path: str) -> tuple[bytes, dict | None]:
    """The lock file's raw bytes and its owner record (None when unreadable)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return b"", None
    try:
        owner = json.loads(raw)
        return raw, owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None
    except ValueError:
        return raw, None


def _stale_reason(path: str, owner: dict | None) -> str | None:
    """Why the lock at `path` is stale, or None while its owner may be alive."""
    if owner is None:
        try:
            age = time.time() - os.path.getmtime(path)
        except OSError:
            return None
        return "it is unreadable" if age > _UNREADABLE_GRACE_S else None
    if owner.get("host") != socket.gethostname():
        return None  # another host's process: cannot tell, so it is live
    pid = owner["pid"]
    if pid == os.getpid():
        return "it was left by an earlier process with this pid"  # this process would be in _held
    if not _alive(pid):
        return f"pid {pid} is not running"
    started = owner.get("started")
    if started is not None and _start_time(pid) not in (None, started):
        return f"pid {pid} is now another process"
    return None


def _take_over(path: str, raw: bytes) -> bool:
    """Removes the stale lock whose content is `raw`; False if another process replaced
    it meanwhile (that lock is put back)."""
    aside = f"{path}.stale.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    with open(aside, "rb") as f:
        same = f.read() == raw
    if not same:
        with contextlib.suppress(OSError):
            os.link(aside, path)  # back where it was, unless a new lock exists already
    os.unlink(aside)
    return same


def _acquire(path: str, timeout_s: float = 10.0) -> dict:
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid()),
          "since": time.strftime("%Y-%m-%d %H:%M:%S"), "token": uuid.uuid4().hex}
    deadline = time.time() + timeout_s
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raw, owner = _read(path)
            reason = _stale_reason(path, owner)
            if reason is not None:
                if _take_over(path, raw):
                    who = f"pid {owner['pid']} on {owner.get('host')}" if owner else "an unknown process"
                    logging.warning("taking over the stale workdir lock %s of %s (%s)", path, who, reason)
                continue
            if owner is not None:
                raise WorkdirLockedError(
                    f"workdir {os.path.dirname(path)} is in use by another run (pid {owner['pid']} on host "
                    f"{owner.get('host')}, since {owner.get('since', '?')}); wait for it to finish, use another "
                    f"--workdir, or delete {path} if that run is gone") from None
            if time.time() > deadline:
                raise WorkdirLockedError(f"workdir {os.path.dirname(path)} is locked by {path}, which stays "
                                         f"unreadable; delete it if no other run uses this workdir") from None
            time.sleep(0.05)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
        return me


def _release(path: str, me: dict) -> None:
    _, owner = _read(path)
    if owner is not None and owner.get("token") == me["token"]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    else:
        logging.warning("workdir lock %s is no longer this run's; left in place", path)


@contextlib.contextmanager
def workdir_lock(workdir: str, multihost: bool = False):
    """Holds `<workdir>/.lock` for the body (module docstring); yields the lock's path.
    `multihost`: a no-op (yields None), since every process of a multi-host run runs the
    job on the same workdir; its launcher owns those processes."""
    if multihost:
        yield None
        return
    if files.is_remote(workdir):  # an object store has no exclusive create: the user keeps runs apart
        logging.warning("workdir %s is remote: it is not locked against a second run; start one run per "
                        "workdir", workdir)
        yield None
        return
    path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
    with _mutex:
        if path in _held:
            _held[path] = (_held[path][0] + 1, _held[path][1])
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            _held[path] = (1, _acquire(path))
    try:
        yield path
    finally:
        with _mutex:
            depth, me = _held.pop(path)
            if depth > 1:
                _held[path] = (depth - 1, me)
            else:
                _release(path, me)
