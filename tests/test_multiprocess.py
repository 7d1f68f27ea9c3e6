"""Many processes (issue 19): the `distributed` config section and its rules, one
`jax.distributed.initialize` per process, each process's rows of every global batch
(pure numpy), and end to end two local processes (gloo CPU collectives, one CPU device
each) training the quickstart network, killed after their first checkpoint and resumed:
each process read half of every global batch, the final parameters equal a 1-process
2-device run's, and every file is written once.

The end-to-end run is an MLP (LeNet-300-100) on the embedded 8x8 digits, 512 training
images in batches of 32: 16 steps per epoch, 2 epochs, a checkpoint every 4 steps.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from jaxcompress import distributed, jobs
from jaxcompress.config import get_config
from jaxcompress.data import BatchIterator, iterate_eval
from jaxcompress.errors import ConfigError
from jaxcompress.schema import validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ------------------------------------------------------------------------------------ per-process batches


def _data(n):
    return np.arange(n * 2, dtype=np.int32).reshape(n, 2), np.arange(n, dtype=np.int32)


@pytest.mark.parametrize("count", [2, 4])
def test_each_process_reads_its_contiguous_share_of_every_global_batch(count):
    x, y = _data(103)
    whole = BatchIterator(x, y, batch_size=8, seed=3)
    parts = [BatchIterator(x, y, batch_size=8, seed=3, process_index=p, process_count=count) for p in range(count)]
    for _ in range(2 * whole.steps_per_epoch + 3):  # across epoch ends (new permutations)
        batch = next(whole)
        shares = [next(it) for it in parts]
        assert all(len(s["label"]) == 8 // count for s in shares)
        np.testing.assert_array_equal(np.concatenate([s["label"] for s in shares]), batch["label"])
        np.testing.assert_array_equal(np.concatenate([s["image"] for s in shares]), batch["image"])
        assert all(it.get_state() == whole.get_state() for it in parts)  # the position is the global one
    assert [it.steps_per_epoch for it in parts] == [whole.steps_per_epoch] * count
    assert [it.examples_read for it in parts] == [whole.examples_read // count] * count
    assert parts[0].batch_size == whole.batch_size == 8


def test_a_process_resumes_exactly_from_the_global_position():
    x, y = _data(50)
    it = BatchIterator(x, y, batch_size=6, seed=0, process_index=1, process_count=2)
    for _ in range(11):
        next(it)
    state = it.get_state()
    expected = [next(it)["label"] for _ in range(5)]
    resumed = BatchIterator(x, y, batch_size=6, seed=0, process_index=1, process_count=2)
    resumed.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["label"], want)


def test_eval_shares_together_are_the_padded_global_batches():
    x, y = _data(23)
    whole = list(iterate_eval(x, y, 10))
    shares = [list(iterate_eval(x, y, 10, p, 2)) for p in range(2)]
    assert len(shares[0]) == len(shares[1]) == len(whole) == 3
    for i, batch in enumerate(whole):
        for key in ("image", "label", "mask"):
            np.testing.assert_array_equal(np.concatenate([shares[0][i][key], shares[1][i][key]]), batch[key])
    assert sum(int(b["mask"].sum()) for s in shares for b in s) == 23  # every example once: same metrics


def test_process_arguments_are_checked():
    x, y = _data(20)
    with pytest.raises(ValueError, match="multiple of the 3 processes"):
        BatchIterator(x, y, batch_size=8, seed=0, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="process_index=2"):
        BatchIterator(x, y, batch_size=8, seed=0, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="multiple of the 3 processes"):
        next(iterate_eval(x, y, 8, 0, 3))


# ------------------------------------------------------------------------------------ config rules

RULE_CASES = [  # (distributed overrides, the field the one-line error names)
    ({"coordinator_address": "localhost:1234"}, "distributed.enabled"),  # settings without the switch
    ({"enabled": True, "coordinator_address": "localhost:1234"}, "distributed.num_processes"),
    ({"enabled": True, "coordinator_address": "localhost:1234", "num_processes": 2}, "distributed.process_id"),
    ({"enabled": True, "coordinator_address": "localhost:1234", "num_processes": 2, "process_id": 2},
     "distributed.process_id"),
    ({"enabled": True, "num_processes": 2, "process_id": 0}, "distributed.coordinator_address"),
    ({"enabled": True, "process_id": 0}, "distributed.coordinator_address"),
    ({"enabled": True, "coordinator_address": "localhost", "num_processes": 2, "process_id": 0},
     "distributed.coordinator_address"),
    ({"enabled": True, "coordinator_address": "localhost:1234", "num_processes": 3, "process_id": 0},
     "train.batch_size"),  # 128 rows do not split over 3 processes
]


def _config(**distributed_settings):
    c = get_config()
    for key, value in distributed_settings.items():
        c.distributed[key] = value
    return c


@pytest.mark.parametrize("overrides,field", RULE_CASES)
def test_missing_or_contradictory_distributed_settings_are_one_line(overrides, field):
    with pytest.raises(ConfigError, match=f"^{field}=") as e:
        validate(_config(**overrides))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("overrides", [
    {}, {"enabled": True},  # auto-detection
    {"enabled": True, "coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1},
    {"enabled": True, "coordinator_address": "[::1]:8476", "num_processes": 1, "process_id": 0},
])
def test_complete_distributed_settings_validate(overrides):
    validate(_config(**overrides))


# ------------------------------------------------------------------------------------ one initialize


@pytest.fixture
def fake_initialize(monkeypatch):
    """jax.distributed.initialize recorded instead of called (this pytest process stays one process)."""
    calls = []
    monkeypatch.setattr(distributed, "_connected", None)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args: calls.append(args))
    return calls


def test_initialize_runs_once_per_process_and_refuses_other_settings(fake_initialize):
    distributed.initialize_once("localhost:1234", 2, 1)
    distributed.initialize_once("localhost:1234", 2, 1)
    assert fake_initialize == [("localhost:1234", 2, 1)]
    with pytest.raises(ConfigError, match="already joined"):
        distributed.initialize_once("localhost:999", 2, 1)
    distributed._connected = None
    distributed.initialize_once()  # empty: JAX's auto-detection
    assert fake_initialize[-1] == (None, None, None)


def _nested_job(config, workdir):
    """A job that runs another job first, as prune / quantize / search train their reference."""
    inner = jobs.run(config, os.path.join(workdir, "pretrain"), {"train": "test_multiprocess:_leaf_job"})
    return {"inner": inner}


def _leaf_job(config, workdir):
    return {"workdir": workdir}


def test_chained_jobs_initialize_once(fake_initialize, tmp_path):
    config = _config(enabled=True)
    summary = jobs.run(config, str(tmp_path), {"train": "test_multiprocess:_nested_job"})
    assert summary["inner"]["workdir"].endswith("pretrain")
    assert fake_initialize == [(None, None, None)]
    assert (tmp_path / "config.json").exists() and (tmp_path / "pretrain" / "config.json").exists()


def test_a_config_without_the_section_runs_as_one_process(fake_initialize):
    assert not distributed.initialize_from_config(ml_collections.ConfigDict({"job": "train"}))
    assert not distributed.initialize_from_config(get_config())
    assert fake_initialize == []


# ------------------------------------------------------------------------------------ two processes

STEPS_PER_EPOCH, EPOCHS, BATCH = 16, 2, 32
TRAIN = ["--config=configs/quickstart.py", "--config.job=train", "--config.model.name=lenet300_100",
         "--config.data.image_size=8", "--config.data.val_size=100", "--config.data.train_size=512",
         "--config.data.test_size=100", f"--config.train.num_epochs={EPOCHS}", f"--config.train.batch_size={BATCH}",
         "--config.train.eval_batch_size=100", "--config.hardware.latency_batch=0",
         "--config.checkpoint.every_steps=4"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int = 1) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu")
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _start(workdir, log, args=(), env=None):
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "launch.main", *TRAIN, f"--workdir={workdir}", *args],
                                cwd=ROOT, env=env or _env(), stdout=f, stderr=subprocess.STDOUT)


def _start_pair(workdir, tmp, tag):
    port = _free_port()
    flags = ["--config.distributed.enabled=True", f"--config.distributed.coordinator_address=localhost:{port}",
             "--config.distributed.num_processes=2"]
    return [_start(workdir, tmp / f"{tag}{i}.log", flags + [f"--config.distributed.process_id={i}"])
            for i in range(2)]


def _steps(directory):
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []


def _final_params(workdir):
    """The parameters of the latest checkpoint, as numpy (no template, no devices)."""
    import orbax.checkpoint as ocp
    path = os.path.join(workdir, "checkpoints", str(_steps(os.path.join(workdir, "checkpoints"))[-1]), "state")
    with ocp.PyTreeCheckpointer() as c:
        tree = c.metadata(path).item_metadata.tree
        args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), tree,
                            is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
        restored = c.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
    return int(restored["step"]), restored["params"]


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _finish(procs, timeout):
    deadline = time.time() + timeout
    for p in procs:
        p.wait(timeout=max(1.0, deadline - time.time()))
    return [p.returncode for p in procs]


def _log(path):
    with open(path) as f:
        return f.read()


def test_two_processes_killed_and_resumed_equal_one_process_on_two_devices(tmp_path):
    ref_dir, run_dir = tmp_path / "one_process", tmp_path / "two_processes"
    procs = []
    try:
        procs.append(_start(ref_dir, tmp_path / "ref.log", env=_env(devices=2)))
        pair = _start_pair(run_dir, tmp_path, "killed")
        procs += pair
        deadline = time.time() + 400
        while not _steps(run_dir / "checkpoints") and all(p.poll() is None for p in pair):
            assert time.time() < deadline, "no checkpoint within 400 s"
            time.sleep(0.05)
        for p in pair:  # kill -9 both, right after the first checkpoint
            p.send_signal(signal.SIGKILL)
        codes = _finish(pair, 60)
        assert codes == [-signal.SIGKILL] * 2, (codes, _log(tmp_path / "killed0.log")[-3000:])
        saved = _steps(run_dir / "checkpoints")
        assert saved and saved[-1] < EPOCHS * STEPS_PER_EPOCH

        pair = _start_pair(run_dir, tmp_path, "resumed")
        procs += pair
        codes = _finish(pair + [procs[0]], 400)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = [_log(tmp_path / f"resumed{i}.log") for i in range(2)]
    assert codes == [0, 0, 0], (codes, logs[0][-3000:], logs[1][-3000:], _log(tmp_path / "ref.log")[-3000:])
    assert all("resumed from step" in log for log in logs)

    # each process read half of every global batch it trained on after the restart
    summary, ref = (json.loads((d / "summary.json").read_text()) for d in (run_dir, ref_dir))
    resumed_step = int(logs[0].split("resumed from step ")[1].split()[0])
    assert resumed_step in saved
    steps_run = EPOCHS * STEPS_PER_EPOCH - resumed_step
    assert summary["examples_read_per_process"] == [steps_run * BATCH // 2] * 2
    assert ref["examples_read_per_process"] == [EPOCHS * STEPS_PER_EPOCH * BATCH]
    assert summary["devices"] == ref["devices"] == 2 and summary["steps"] == ref["steps"]

    # the same network as one process on two devices, and the same metrics
    step, params = _final_params(run_dir)
    ref_step, ref_params = _final_params(ref_dir)
    assert step == ref_step == EPOCHS * STEPS_PER_EPOCH
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params, ref_params)
    for key in ("test_accuracy", "val_accuracy", "best_val_accuracy"):
        assert summary[key] == pytest.approx(ref[key], abs=1e-6), key
    assert summary["test_loss"] == pytest.approx(ref["test_loss"], rel=1e-4)

    # written once: one metrics line per epoch end, none twice; no file left half-written
    records = _records(run_dir)
    assert len({r["step"] for r in records}) == len(records)
    assert records[-1]["step"] == EPOCHS * STEPS_PER_EPOCH
    for r in records:
        match = next(q for q in _records(ref_dir) if q["step"] == r["step"])
        assert r["val"]["accuracy"] == pytest.approx(match["val"]["accuracy"], abs=1e-6)
    assert not [n for n in os.listdir(run_dir) if n.endswith(".tmp")]

    # the prune job on that network, as two processes and as one process on two devices: L1 channels,
    # shrunk, fine-tuned one epoch over both processes; the same widths, accuracies and metrics
    prune = ["--config.job=prune", f"--config.prune.checkpoint={run_dir}", "--config.prune.keep_ratio=0.5",
             "--config.prune.finetune_epochs=1"]
    pruned, pruned_ref = tmp_path / "prune_two", tmp_path / "prune_one"
    procs = []
    try:
        procs.append(_start(pruned_ref, tmp_path / "prune_ref.log", prune, env=_env(devices=2)))
        port = _free_port()
        procs += [_start(pruned, tmp_path / f"prune{i}.log", prune + [
            "--config.distributed.enabled=True", f"--config.distributed.coordinator_address=localhost:{port}",
            "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"]) for i in range(2)]
        codes = _finish(procs, 400)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert codes == [0, 0, 0], [_log(tmp_path / f"prune{i}.log")[-3000:] for i in range(2)]
    summary, ref = (json.loads((d / "summary.json").read_text()) for d in (pruned, pruned_ref))
    assert summary["widths_pruned"] == ref["widths_pruned"] and summary["widths_pruned"][0] < 300
    for key in ("accuracy_dense", "accuracy_masked", "accuracy_pruned"):
        assert summary[key] == pytest.approx(ref[key], abs=1e-6), key
    records = _records(pruned / "finetune")
    assert records and len({r["step"] for r in records}) == len(records)
