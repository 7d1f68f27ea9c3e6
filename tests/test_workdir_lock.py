"""The workdir lock: one live run per workdir (`<workdir>/.lock` with pid and host),
stale locks taken over, re-entrant within a process, released on exceptions; and
`jobs.run` holding it around the job."""
import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from configs import default
from jaxcompress import jobs as J
from jaxcompress.errors import ConfigError
from jaxcompress.workdir_lock import LOCK_NAME, WorkdirLockedError, workdir_lock


def _write_lock(workdir, **owner):
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_NAME)
    with open(path, "w") as f:
        json.dump(owner, f)
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_holds_pid_and_host_and_is_released(tmp_path):
    workdir = str(tmp_path / "w")
    with workdir_lock(workdir) as path:
        assert path == os.path.join(workdir, LOCK_NAME)
        with open(path) as f:
            owner = json.load(f)
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    assert not os.path.exists(path)


def test_lock_is_released_on_exceptions(tmp_path):
    workdir = str(tmp_path / "w")
    with pytest.raises(KeyError):
        with workdir_lock(workdir):
            raise KeyError("boom")
    assert not os.path.exists(os.path.join(workdir, LOCK_NAME))
    with workdir_lock(workdir):  # free again
        pass


def test_lock_is_reentrant_within_a_process(tmp_path):
    workdir = str(tmp_path / "w")
    with workdir_lock(workdir) as path:
        with workdir_lock(workdir):
            with workdir_lock(os.path.join(workdir, "pretrain")) as inner:  # a nested run's own workdir
                assert os.path.exists(inner)
            assert not os.path.exists(inner)
        assert os.path.exists(path)  # still held by the outer level
    assert not os.path.exists(path)


@pytest.mark.parametrize("host", ["here", "elsewhere"])
def test_live_owner_is_refused_in_one_line(tmp_path, host):
    workdir = str(tmp_path / "w")
    hostname = socket.gethostname() if host == "here" else "another-machine.example"
    pid = os.getppid() if host == "here" else 1  # the parent process is alive; another host cannot be checked
    path = _write_lock(workdir, pid=pid, host=hostname)
    with pytest.raises(WorkdirLockedError) as excinfo:
        with workdir_lock(workdir):
            pytest.fail("entered a held workdir")
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, ConfigError)
    assert "\n" not in msg and f"pid {pid}" in msg and hostname in msg and workdir in msg
    with open(path) as f:
        assert json.load(f) == {"pid": pid, "host": hostname}  # left alone


@pytest.mark.parametrize("how", ["dead_pid", "reused_pid", "own_pid", "unreadable"])
def test_stale_lock_is_taken_over_with_a_log_line(tmp_path, caplog, how):
    workdir = str(tmp_path / "w")
    if how == "dead_pid":
        path = _write_lock(workdir, pid=_dead_pid(), host=socket.gethostname())
    elif how == "reused_pid":  # a live pid that now belongs to another process (other start time)
        path = _write_lock(workdir, pid=os.getppid(), host=socket.gethostname(), started="1")
    elif how == "own_pid":  # left by an earlier process that had this pid (e.g. in a container)
        path = _write_lock(workdir, pid=os.getpid(), host=socket.gethostname())
    else:  # a crash between creating the file and writing it, long ago
        path = _write_lock(workdir)
        with open(path, "w"):
            pass
        os.utime(path, (time.time() - 60, time.time() - 60))
    with caplog.at_level(logging.WARNING):
        with workdir_lock(workdir):
            with open(path) as f:
                assert json.load(f)["pid"] == os.getpid()
    lines = [r.getMessage() for r in caplog.records if "stale workdir lock" in r.getMessage()]
    assert len(lines) == 1 and path in lines[0], caplog.records
    assert not os.path.exists(path)
    assert [n for n in os.listdir(workdir) if n.startswith(LOCK_NAME)] == []  # nothing left aside


def test_lock_held_by_another_process_then_released(tmp_path):
    workdir = str(tmp_path / "w")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from jaxcompress.workdir_lock import workdir_lock\n"
         f"with workdir_lock({workdir!r}):\n    print('held', flush=True); sys.stdin.read()"],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkdirLockedError, match=f"pid {holder.pid} on host"):
            with workdir_lock(workdir):
                pass
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0
    with workdir_lock(workdir):  # released at the holder's exit
        pass


def test_jobs_run_holds_the_lock_around_the_job(tmp_path, monkeypatch):
    workdir = str(tmp_path / "w")
    config = default.get_config()
    config.job = "train"
    seen = []

    def job(cfg, wd):
        seen.append(json.load(open(os.path.join(wd, LOCK_NAME)))["pid"])
        if len(seen) == 1:  # a nested run on the same workdir, as a job may start
            J.run(cfg, wd)
        return {"ok": True}

    monkeypatch.setattr(J, "resolve", lambda target: job)
    assert J.run(config, workdir) == {"ok": True}
    assert seen == [os.getpid(), os.getpid()]
    assert not os.path.exists(os.path.join(workdir, LOCK_NAME))
    assert os.path.exists(os.path.join(workdir, "config.json"))

    # Another live process holds it: refused before config.json is rewritten or the job runs.
    os.remove(os.path.join(workdir, "config.json"))
    _write_lock(workdir, pid=os.getppid(), host=socket.gethostname())
    with pytest.raises(ConfigError, match="in use by another run"):
        J.run(config, workdir)
    assert len(seen) == 2 and not os.path.exists(os.path.join(workdir, "config.json"))
