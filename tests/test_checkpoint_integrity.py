"""Integrity of what jaxcompress writes and reads back: checksummed Orbax checkpoints
(every flipped byte of every file of a step detected, fall back to the previous intact
step, legacy steps without a manifest), packed exports (`model.npz`), the latency
cache, and a clean one-line exit (no "Event loop is closed") through `launch.main`."""
import gc
import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcompress.latency import LatencyTable, device_key
from jaxcompress.models import create_model
from jaxcompress.quant.export import PackedFileError, export_packed, load_packed, read_packed
from jaxcompress.train import Checkpointer, CheckpointError, create_train_state
from jaxcompress.train.checkpoint import CHECKSUMS, MANIFEST, _drop_closed_loop_reports, state_tree
from jaxcompress.workdir_lock import workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (28, 28, 1)

# Orbax may leave un-awaited read coroutines behind when a legacy corrupt step fails.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _state(step: int, seed: int = 0):
    """A small LeNet-300-100 TrainState at `step`, every leaf drawn from `seed` (numpy:
    no compile), so states of different seeds differ everywhere."""
    model = create_model("lenet300_100", 10)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *SHAPE))))
    rng = np.random.default_rng(seed)
    variables = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)
    state = create_train_state(model, optax.sgd(0.1, momentum=0.9), SHAPE, seed, variables=variables)
    return state.replace(step=jnp.asarray(step, jnp.int32),
                         opt_state=jax.tree.map(lambda a: a + seed, state.opt_state))


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(state_tree(a)), jax.tree.leaves(state_tree(b))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _files(step_dir):
    out = []
    for root, _, names in os.walk(step_dir):
        out += [os.path.relpath(os.path.join(root, n), step_dir) for n in names]
    return sorted(out)


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def _restore_error(directory, template, step=None) -> str:
    ckpt = Checkpointer(directory)
    try:
        with pytest.raises(CheckpointError) as excinfo:
            ckpt.restore(template, step)
    finally:
        ckpt.close()
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.strip() == msg, msg
    return msg


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A directory with steps 3 and 7 (different states), saved by `Checkpointer`."""
    directory = str(tmp_path_factory.mktemp("saved") / "ckpt")
    ckpt = Checkpointer(directory)
    states = {3: _state(3, seed=1), 7: _state(7, seed=2)}
    for s in (3, 7):
        ckpt.save(states[s], {"at": s})
    ckpt.close()
    return directory, states


def _copy(saved, tmp_path):
    directory = str(tmp_path / "ckpt")
    shutil.copytree(saved[0], directory)
    return directory


# ----------------------------------------------------------------------------- checkpoints


def test_save_writes_a_manifest_of_every_file(saved):
    directory, states = saved
    for s in (3, 7):
        step_dir = os.path.join(directory, str(s))
        with open(os.path.join(step_dir, MANIFEST)) as f:
            listed = sorted(json.load(f)["body"]["files"])
        assert listed == sorted(f.replace(os.sep, "/") for f in _files(step_dir) if f != MANIFEST)
        assert any(f.startswith("state/") for f in listed) and "meta/metadata" in listed
    with open(os.path.join(directory, CHECKSUMS)) as f:
        assert json.load(f)["unchecked_steps"] == []  # no step lacks a manifest
    ckpt = Checkpointer(directory)
    restored, meta = ckpt.restore(_state(0, seed=9))
    ckpt.close()
    assert meta == {"at": 7}
    _assert_same(restored, states[7])


def test_every_flipped_byte_of_every_file_is_detected(saved, tmp_path):
    """Bytes flipped at several offsets of every file of a step (the manifest included):
    each restore raises one line naming the step and the file; 100% detected."""
    directory = _copy(saved, tmp_path)
    template = _state(0, seed=9)
    step_dir = os.path.join(directory, "7")
    files = _files(step_dir)
    assert len(files) >= 10
    tried = detected = 0
    for rel in files:
        path = os.path.join(step_dir, rel)
        with open(path, "rb") as f:
            original = f.read()
        for offset in sorted({0, 1, len(original) // 3, len(original) // 2, len(original) - 1}):
            _flip(path, offset)
            msg = _restore_error(directory, template, step=7)
            tried += 1
            named = MANIFEST if rel == MANIFEST else rel.replace(os.sep, "/")
            detected += "step 7" in msg and named in msg and directory in msg and "delete" in msg
            with open(path, "wb") as f:
                f.write(original)
        # A truncated file too.
        with open(path, "r+b") as f:
            f.truncate(len(original) // 2)
        msg = _restore_error(directory, template, step=7)
        tried += 1
        detected += "step 7" in msg and (MANIFEST if rel == MANIFEST else rel.replace(os.sep, "/")) in msg
        with open(path, "wb") as f:
            f.write(original)
    assert detected == tried, f"{detected}/{tried} corruptions detected"
    # Put back, the step restores again.
    ckpt = Checkpointer(directory)
    restored, _ = ckpt.restore(template, step=7)
    ckpt.close()
    _assert_same(restored, saved[1][7])


def test_missing_file_or_manifest_is_detected(saved, tmp_path):
    directory = _copy(saved, tmp_path)
    os.remove(os.path.join(directory, "7", "meta", "metadata"))
    msg = _restore_error(directory, _state(0), step=7)
    assert "step 7" in msg and "meta/metadata is missing" in msg
    os.remove(os.path.join(directory, "3", MANIFEST))
    msg = _restore_error(directory, _state(0), step=3)
    assert "step 3" in msg and f"{MANIFEST} is missing" in msg


def test_latest_corrupt_step_falls_back_to_the_previous_intact_one(saved, tmp_path, caplog):
    directory = _copy(saved, tmp_path)
    states = saved[1]
    data = [f for f in _files(os.path.join(directory, "7")) if "/d/" in f.replace(os.sep, "/")]
    _flip(os.path.join(directory, "7", max(data, key=lambda f: os.path.getsize(os.path.join(directory, "7", f)))),
          100)
    ckpt = Checkpointer(directory)
    assert ckpt.latest_step() == 7
    with caplog.at_level(logging.WARNING):
        restored, meta = ckpt.restore(_state(0, seed=9))  # as `fit` resumes: the latest intact step
    assert meta == {"at": 3}
    _assert_same(restored, states[3])
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "step 7" in warnings[0] and "using step 3" in warnings[0], warnings
    # Training goes on from step 3 and saves step 7 again: the corrupt one is moved aside.
    caplog.clear()
    new7 = _state(7, seed=5)
    with caplog.at_level(logging.INFO):
        ckpt.save(new7, {"at": "new 7"})
    assert any("moved corrupt checkpoint step 7" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # the one warning was enough
    ckpt.close()
    assert os.path.isdir(os.path.join(directory, "7.corrupt"))
    ckpt = Checkpointer(directory)
    assert list(ckpt.manager.all_steps()) == [3, 7]
    restored, meta = ckpt.restore(_state(0, seed=9))
    ckpt.close()
    assert meta == {"at": "new 7"}
    _assert_same(restored, new7)


def test_every_step_corrupt_is_one_line_naming_the_latest(saved, tmp_path):
    directory = _copy(saved, tmp_path)
    for s in (3, 7):
        _flip(os.path.join(directory, str(s), "meta", "metadata"), 0)
    msg = _restore_error(directory, _state(0))
    assert msg.startswith(f"checkpoint step 7 in {directory} is corrupt: file meta/metadata does not match")
    assert "delete" in msg


def test_legacy_steps_without_manifest_restore_without_warnings(saved, tmp_path, caplog):
    directory = _copy(saved, tmp_path)
    for s in (3, 7):
        os.remove(os.path.join(directory, str(s), MANIFEST))
    os.remove(os.path.join(directory, CHECKSUMS))  # as written before manifests existed
    ckpt = Checkpointer(directory, max_to_keep=3)
    with caplog.at_level(logging.WARNING):
        restored, meta = ckpt.restore(_state(0, seed=9))
        assert meta == {"at": 7}
        _assert_same(restored, saved[1][7])
        # A new step saved into the legacy directory is checksummed; the old ones stay restorable.
        ckpt.save(_state(9, seed=4), {"at": 9})
        assert ckpt.restore(_state(0, seed=9), step=3)[1] == {"at": 3}
    ckpt.close()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert os.path.exists(os.path.join(directory, "9", MANIFEST))
    with open(os.path.join(directory, CHECKSUMS)) as f:
        assert json.load(f)["unchecked_steps"] == [3, 7]
    os.remove(os.path.join(directory, "9", MANIFEST))  # but a new step's manifest is expected
    assert f"{MANIFEST} is missing" in _restore_error(directory, _state(0), step=9)


def test_step_committed_before_its_manifest_restores(saved, tmp_path):
    """A run killed between Orbax's commit and the manifest: the step is listed as being
    saved, so it restores (unchecked) instead of counting as corrupt."""
    directory = _copy(saved, tmp_path)
    os.remove(os.path.join(directory, "7", MANIFEST))
    with open(os.path.join(directory, CHECKSUMS), "w") as f:
        json.dump({"unchecked_steps": [7]}, f)
    ckpt = Checkpointer(directory)
    assert ckpt.restore(_state(0))[1] == {"at": 7}
    ckpt.close()


def _unretrieved_future_log(raiser_file: str, caplog) -> list[str]:
    """Logs asyncio's report of a future whose exception, raised in code from
    `raiser_file`, nobody retrieved (what Orbax's abandoned reads leave behind)."""
    import asyncio
    namespace = {}
    exec(compile("def read():\n    raise Exception('Encountered error while reading array index')",
                 raiser_file, "exec"), namespace)
    loop = asyncio.new_event_loop()
    future = loop.create_future()
    try:
        namespace["read"]()
    except Exception as e:  # noqa: BLE001
        future.set_exception(e)
    loop.close()
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        del future
        gc.collect()
    return [r.getMessage() for r in caplog.records if r.name == "asyncio"]


def test_abandoned_orbax_reads_are_not_reported_but_other_lost_futures_are(caplog):
    _drop_closed_loop_reports()
    assert _unretrieved_future_log("/site-packages/orbax/checkpoint/serialization.py", caplog) == []
    (message,) = _unretrieved_future_log("/site-packages/mylib/reader.py", caplog)
    assert message.startswith("Future exception was never retrieved")


def test_restore_of_a_missing_step_is_one_line(saved):
    msg = _restore_error(saved[0], _state(0), step=5)
    assert "no checkpoint step 5" in msg and "[3, 7]" in msg


# ----------------------------------------------------------------------------- packed exports


@pytest.fixture(scope="module")
def packed(zoo, tmp_path_factory):
    table = zoo.table("lenet5")
    path = str(tmp_path_factory.mktemp("packed") / "model.npz")
    export_packed(path, table, zoo.variables("lenet5"), model_name="lenet5", num_classes=10)
    with open(path, "rb") as f:
        raw = f.read()
    return path, raw, read_packed(path)


def _one_line_packed_error(path) -> str:
    with pytest.raises(PackedFileError) as excinfo:
        load_packed(path)
    msg = str(excinfo.value)
    assert "\n" not in msg and path in msg, msg
    return msg


def test_packed_file_carries_checksums_and_loads(packed):
    path, _, (payload, meta) = packed
    assert len(meta["payload_sha256"]) == 64 and len(meta["meta_sha256"]) == 64
    model, variables, _ = load_packed(path)
    assert tuple(model.widths) == tuple(meta["widths"])


def test_corrupt_packed_payload_or_metadata_is_refused(packed, tmp_path):
    _, raw, (payload, meta) = packed
    path = str(tmp_path / "model.npz")
    # Valid zip and npy (CRCs recomputed by savez), one payload byte changed: the sha256 catches it.
    bad = payload.copy()
    bad[len(bad) // 2] ^= 1
    with open(path, "wb") as f:
        np.savez(f, payload=bad, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    assert "payload does not match its sha256" in _one_line_packed_error(path)
    # Metadata edited (still valid JSON): its own sha256 catches it.
    edited = {**meta, "num_classes": 9}
    with open(path, "wb") as f:
        np.savez(f, payload=payload, meta=np.frombuffer(json.dumps(edited).encode(), np.uint8))
    assert "metadata does not match its sha256" in _one_line_packed_error(path)
    # Truncated.
    with open(path, "wb") as f:
        f.write(raw[: len(raw) // 2])
    assert "cannot read the packed file" in _one_line_packed_error(path)


def test_flipped_bytes_anywhere_in_a_packed_file_are_refused_or_harmless(packed, tmp_path):
    """A byte flipped anywhere: refused in one line, or (zip bookkeeping such as a
    timestamp) read back exactly as written. Never loaded as something else."""
    _, raw, (payload, meta) = packed
    path = str(tmp_path / "model.npz")
    offsets = sorted(set(range(0, 160)) | set(range(0, len(raw), max(1, len(raw) // 150)))
                     | set(range(len(raw) - 160, len(raw))))
    refused = set()
    for offset in offsets:
        corrupt = bytearray(raw)
        corrupt[offset] ^= 0xFF
        with open(path, "wb") as f:
            f.write(corrupt)
        try:
            got_payload, got_meta = read_packed(path)
        except PackedFileError as e:
            assert "\n" not in str(e)
            refused.add(offset)
            continue
        np.testing.assert_array_equal(got_payload, payload)
        assert got_meta == meta, offset
    body = [o for o in offsets if 160 <= o < len(raw) - 160]  # inside the payload (and meta) data
    assert len(body) > 100 and all(o in refused for o in body)


# ----------------------------------------------------------------------------- latency cache


def _cached_table(path):
    lut = LatencyTable(device_key(), {"('dense', 4)": 1.5e-5, "('conv', 4)": 2.25e-4}, path,
                       {"abc": [1.1, 2e-5]})
    lut.save()
    return lut


def test_latency_cache_round_trips_with_a_checksum(tmp_path):
    path = str(tmp_path / "lat.json")
    lut = _cached_table(path)
    with open(path) as f:
        assert len(json.load(f)["sha256"]) == 64
    again = LatencyTable.load(path)
    assert again.entries == lut.entries and again.fits == lut.fits


@pytest.mark.parametrize("how", ["entry", "fit", "checksum", "not_a_number"])
def test_corrupt_latency_cache_is_discarded_and_rebuilt(tmp_path, caplog, how):
    path = str(tmp_path / "lat.json")
    _cached_table(path)
    with open(path) as f:
        text = f.read()
    if how == "entry":
        text = text.replace("1.5e-05", "1.6e-05")
    elif how == "fit":
        text = text.replace("1.1", "1.2")
    elif how == "checksum":
        data = json.loads(text)
        data["sha256"] = "0" * 64
        text = json.dumps(data)
    else:  # a table from before checksums, with garbage in it
        text = json.dumps({"device": device_key(), "entries": {"k": "fast"}, "fits": {}})
    with open(path, "w") as f:
        f.write(text)
    with caplog.at_level(logging.WARNING):
        lut = LatencyTable.load(path)
    assert lut.entries == {} and lut.fits == {} and lut.device == device_key()
    assert any("is corrupt" in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records)
    lut.entries["k"] = 1e-3  # rebuilt: the next save is a valid, checksummed table
    lut.save()
    assert LatencyTable.load(path).entries == {"k": 1e-3}


def test_latency_cache_from_before_checksums_still_loads(tmp_path):
    path = tmp_path / "lat.json"
    path.write_text(json.dumps({"device": device_key(), "entries": {"k": 1e-4}}))
    assert LatencyTable.load(str(path)).entries == {"k": 1e-4}


# ----------------------------------------------------------------------------- end to end


# the quickstart's digits at 8x8 through LeNet-300-100 (the fastest to compile), no latency measurement
SMALL = ("--config.model.name=lenet300_100", "--config.data.image_size=8", "--config.hardware.latency_batch=0")


def _launch(*args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run([sys.executable, "-m", "launch.main", "--config=configs/quickstart.py", *SMALL, *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _assert_one_line_exit(proc, *fragments):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr, proc.stderr[-3000:]
    assert lines and lines[-1].startswith("error: "), proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """LeNet-300-100 on the quickstart's digits, trained 1 epoch (19 steps, checkpoints every 5)."""
    workdir = str(tmp_path_factory.mktemp("e2e") / "run")
    proc = _launch("--config.job=train", "--config.train.num_epochs=1",
                   "--config.checkpoint.every_steps=5", f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def _largest_data_file(step_dir):
    files = [os.path.join(r, n) for r, _, names in os.walk(step_dir) for n in names if os.sep + "d" in r]
    return max(files, key=os.path.getsize)


def test_evaluate_of_a_corrupt_best_step_is_one_line_without_teardown_noise(trained, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(trained, workdir)
    best = os.path.join(workdir, "best")
    (step,) = [n for n in os.listdir(best) if n.isdigit()]
    victim = _largest_data_file(os.path.join(best, step))
    for offset in (64, 1000, os.path.getsize(victim) - 1):
        _flip(victim, offset)
    proc = _launch("--config.job=evaluate", f"--workdir={workdir}")
    rel = os.path.relpath(victim, os.path.join(best, step))
    _assert_one_line_exit(proc, f"checkpoint step {step} in {best} is corrupt", rel, "delete")
    # A legacy step (no manifest) that Orbax fails to read: one line, no "Event loop is closed".
    os.remove(os.path.join(best, step, MANIFEST))
    os.remove(os.path.join(best, CHECKSUMS))
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    proc = _launch("--config.job=evaluate", f"--workdir={workdir}")
    _assert_one_line_exit(proc, f"cannot restore checkpoint step {step}")


def test_resume_falls_back_past_a_corrupt_latest_step(trained, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(trained, workdir)
    ckpts = os.path.join(workdir, "checkpoints")
    steps = sorted(int(n) for n in os.listdir(ckpts) if n.isdigit())
    assert steps == [15, 19]
    _flip(_largest_data_file(os.path.join(ckpts, "19")), 200)
    proc = _launch("--config.job=train", "--config.train.num_epochs=2",
                   "--config.checkpoint.every_steps=5", f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr
    corrupt = [line for line in proc.stderr.splitlines() if "is corrupt" in line]
    assert len(corrupt) == 1 and "step 19" in corrupt[0] and "using step 15" in corrupt[0], proc.stderr[-3000:]
    assert "resumed from step 15" in proc.stderr
    assert sorted(int(n) for n in os.listdir(ckpts) if n.isdigit()) == [35, 38]
    assert os.path.isdir(os.path.join(ckpts, "19.corrupt"))
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f)["steps"] == 38


def test_second_run_on_a_held_workdir_is_refused_in_one_line(tmp_path):
    workdir = str(tmp_path / "held")
    with workdir_lock(workdir):  # this live process holds it
        proc = _launch("--config.job=train", "--config.train.num_epochs=1", f"--workdir={workdir}")
        _assert_one_line_exit(proc, f"pid {os.getpid()}", socket.gethostname(), "in use")
    assert not os.path.exists(os.path.join(workdir, "config.json"))  # refused before anything is written
    gc.collect()


def _abandoned_coroutine(raiser_file: str) -> None:
    """A coroutine from `raiser_file`, suspended mid-read and garbage-collected: its
    cleanup raises, which Python reports as "Exception ignored in: <coroutine ...>"."""
    namespace = {}
    exec(compile("class Wait:\n    def __await__(self):\n        yield\n\n"
                 "async def read():\n    try:\n        await Wait()\n    finally:\n"
                 "        raise Exception('Encountered error while reading array index')\n", raiser_file, "exec"),
         namespace)
    coroutine = namespace["read"]()
    coroutine.send(None)
    del coroutine
    gc.collect()


def test_abandoned_orbax_coroutines_are_not_reported_but_others_are(monkeypatch):
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    _drop_closed_loop_reports()  # wraps the recorder
    _abandoned_coroutine("/site-packages/orbax/checkpoint/serialization.py")
    assert reported == []
    _abandoned_coroutine("/site-packages/mylib/reader.py")
    (report,) = reported
    assert "Encountered error" in str(report.exc_value)
