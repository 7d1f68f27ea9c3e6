"""End-to-end tests of `python -m launch.main`: outputs of a training run, evaluation
of its checkpoints, one-line errors (exit code 2) for bad input, and kill-and-resume.

Every run is LeNet-5 on the embedded digits data set (no download), 2 epochs of
batch 32: 1797 digits - 359 test - 200 validation = 1238 training images, so
1238 // 32 = 38 steps per epoch and 76 steps in all.
"""
import concurrent.futures
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_TEST, NUM_VAL, STEPS_PER_EPOCH, EPOCHS = 359, 200, 38, 2
LENET5_PARAMS = (5 * 5 * 1 * 6 + 6) + (5 * 5 * 6 * 16 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
TRAIN = ["--config=configs/quickstart.py", "--config.job=train", "--config.model.name=lenet5",
         f"--config.train.num_epochs={EPOCHS}", "--config.train.batch_size=32", "--config.checkpoint.every_steps=5"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", **extra)
    return env


def _cmd(*args):
    return [sys.executable, "-m", "launch.main", *args]


def launch(*args, env=None, timeout=600):
    return subprocess.run(_cmd(*args), cwd=ROOT, env=env or _env(), capture_output=True, text=True,
                          timeout=timeout)


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_events(directory):
    """{tag: [(step, value), ...]} from the TensorBoard event files in `directory`: TFRecord
    framing (u64 length, u32 crc, bytes, u32 crc) around `Event` protos, read by hand."""
    import struct

    from tensorboardX.proto.event_pb2 import Event
    out = {}
    for name in sorted(n for n in os.listdir(directory) if n.startswith("events.out.tfevents")):
        with open(os.path.join(directory, name), "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            length, = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def _steps(directory):
    """Finalised Orbax step directories (in-progress saves end in '.orbax-checkpoint-tmp...')."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _is_count_ratio(x, n):
    return abs(x * n - round(x * n)) < 1e-9


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted training run; its files are read right away (later jobs in the
    same workdir, such as evaluate, rewrite config.json)."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    proc = launch(*TRAIN, f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"workdir": workdir, "proc": proc,
            "config": _read_json(os.path.join(workdir, "config.json")),
            "metrics": _read_jsonl(os.path.join(workdir, "metrics.jsonl")),
            "summary": _read_json(os.path.join(workdir, "summary.json")),
            "checkpoints": _steps(os.path.join(workdir, "checkpoints")),
            "best": _steps(os.path.join(workdir, "best"))}


def test_train_run_writes_config_metrics_summary_and_checkpoints(reference_run):
    r = reference_run
    assert "done:" in r["proc"].stdout
    config = r["config"]
    assert config["job"] == "train" and config["model"]["name"] == "lenet5"
    assert config["data"]["name"] == "digits" and config["train"]["num_epochs"] == EPOCHS
    assert config["train"]["batch_size"] == 32 and config["checkpoint"]["every_steps"] == 5

    metrics = r["metrics"]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert [m["step"] for m in metrics] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    for m in metrics:
        assert 0.0 <= m["val"]["accuracy"] <= 1.0 and _is_count_ratio(m["val"]["accuracy"], NUM_VAL)
        assert m["val"]["loss"] > 0 and m["train"]["loss"] > 0
        assert m["examples_per_s"] == pytest.approx(32 * m["steps_per_s"]) and m["steps_per_s"] > 0
    # cosine decay from 0.05 over 76 steps, read at each epoch's last step (38 and 76 - 1 = 75)
    lr = [0.5 * 0.05 * (1 + math.cos(math.pi * t / (EPOCHS * STEPS_PER_EPOCH))) for t in (37, 75)]
    assert [m["learning_rate"] for m in metrics] == pytest.approx(lr, rel=1e-6, abs=1e-8)  # float32 cosine
    # the same scalars as TensorBoard events, nested keys as tags
    events = read_events(r["workdir"])
    for tag, key in (("val/accuracy", ("val", "accuracy")), ("train/loss", ("train", "loss")),
                     ("learning_rate", ("learning_rate",)), ("examples_per_s", ("examples_per_s",))):
        want = []
        for m in metrics:
            value = m
            for k in key:
                value = value[k]
            want.append((m["step"], pytest.approx(value, rel=1e-6)))
        assert events[tag] == want, tag

    s = r["summary"]
    assert s["job"] == "train" and s["model"] == "lenet5" and s["dataset"] == "digits"
    assert s["num_classes"] == 10 and s["epochs"] == EPOCHS and s["steps"] == EPOCHS * STEPS_PER_EPOCH
    assert s["params"] == LENET5_PARAMS == 61706
    assert s["nonzero_params"] == s["params"]  # nothing pruned
    assert 0.0 <= s["test_accuracy"] <= 1.0
    assert _is_count_ratio(s["test_accuracy"], NUM_TEST)  # every test image counted once, padding never
    assert s["test_accuracy"] > 0.5  # it learned something (chance is 0.1)
    assert s["val_accuracy"] == metrics[-1]["val"]["accuracy"]
    assert s["best_val_accuracy"] == max(m["val"]["accuracy"] for m in metrics)
    # measured forward latency of the trained network at hardware.latency_batch (issue 7: in every summary)
    assert s["latency_batch"] == config["hardware"]["latency_batch"] == 128
    assert list(s["latency_s"]) == ["trained"] and 0.0 < s["latency_s"]["trained"] < 10.0

    assert r["checkpoints"] and max(r["checkpoints"]) == EPOCHS * STEPS_PER_EPOCH
    assert len(r["checkpoints"]) <= 2  # checkpoint.max_to_keep
    # best/ keeps the first epoch reaching the best validation accuracy.
    best_epoch = 1 + [m["val"]["accuracy"] for m in metrics].index(s["best_val_accuracy"])
    assert r["best"] == [best_epoch * STEPS_PER_EPOCH]


@pytest.fixture(scope="module")
def evaluations(reference_run, tmp_path_factory):
    """`evaluate` of the reference run's best checkpoint (in its workdir) and of its
    last one (through --config.eval.checkpoint, in another workdir), run side by side."""
    workdir = reference_run["workdir"]
    other = str(tmp_path_factory.mktemp("evaluate_last"))
    common = [a for a in TRAIN if "job" not in a] + ["--config.job=evaluate"]
    jobs = {"best": common + [f"--workdir={workdir}"],
            "last": common + [f"--workdir={other}", f"--config.eval.checkpoint={workdir}/checkpoints"]}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        procs = dict(zip(jobs, pool.map(lambda a: launch(*a), jobs.values())))
    for name, proc in procs.items():
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
    return {"best": _read_json(os.path.join(workdir, "eval_summary.json")),
            "last": _read_json(os.path.join(other, "eval_summary.json"))}


def test_evaluate_reproduces_test_accuracy(reference_run, evaluations):
    s, last, best = reference_run["summary"], evaluations["last"], evaluations["best"]
    # The last checkpoint is the final state the train job evaluated.
    assert last["job"] == "evaluate" and last["steps"] == s["steps"]
    assert last["test_accuracy"] == s["test_accuracy"]
    assert last["val_accuracy"] == s["val_accuracy"]
    assert last["test_loss"] == pytest.approx(s["test_loss"], rel=1e-6, abs=1e-7)
    # The best checkpoint is the one that scored best_val_accuracy on validation.
    assert best["steps"] == reference_run["best"][0]
    assert best["val_accuracy"] == s["best_val_accuracy"]
    if best["steps"] == s["steps"]:
        assert best["test_accuracy"] == s["test_accuracy"]
    assert _is_count_ratio(best["test_accuracy"], NUM_TEST)
    assert list(last["latency_s"]) == ["trained"] and last["latency_s"]["trained"] > 0.0  # as the train job


# ----------------------------------------------------------------------------- bad input

QUICK = ["--config=configs/quickstart.py", "--config.job=train", "--config.train.num_epochs=1"]
BAD_INPUTS = {
    # name: (arguments, extra environment, fragments the message must contain)
    "unknown_model": (QUICK + ["--config.model.name=lenet7"], {}, ["lenet7", "model"]),
    "unknown_job": (QUICK + ["--config.job=fly"], {}, ["fly", "job"]),
    "unknown_config_field": (QUICK + ["--config.train.nope=1"], {}, ["nope"]),
    "unknown_dataset": (QUICK + ["--config.data.name=imagenet77"], {}, ["imagenet77"]),
    "missing_npz_file": (QUICK + ["--config.data.name=npz:{tmp}/no_such_file.npz"], {}, ["no_such_file.npz"]),
    "batch_not_divisible": (QUICK + ["--config.train.batch_size=12"],
                            {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, ["batch_size", "12", "8"]),
    "variational_batch_not_divisible": (QUICK + ["--config.job=prune", "--config.prune.criterion=variational",
                                                 "--config.prune.variational.batch_size=12"],
                                        {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
                                        ["prune.variational.batch_size=12", "multiple of the 8 devices"]),
    "missing_config_file": (["--config=configs/no_such_config.py"], {}, ["no_such_config.py"]),
    "missing_workdir_flag": (QUICK, {}, ["workdir"]),
    "evaluate_without_checkpoint": (QUICK + ["--config.job=evaluate"], {}, ["checkpoint"]),
    "evaluate_with_empty_best_dir": (QUICK + ["--config.job=evaluate"], {"mkdir": "best"}, ["checkpoint"]),
    "val_size_too_large": (QUICK + ["--config.data.val_size=5000"], {}, ["val_size", "5000"]),
    "warmup_not_below_num_epochs": (QUICK + ["--config.train.warmup_epochs=1"], {}, ["warmup_epochs"]),
    "negative_test_size": (QUICK + ["--config.data.test_size=-1"], {}, ["test_size", ">= 0"]),
    "latency_budget_out_of_range": (QUICK + ["--config.job=prune", "--config.prune.latency_budget=1.5"], {},
                                    ["latency_budget", "(0, 1]"]),
}
@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory):
    """Runs every bad-input case (four at a time: each is a short process)."""
    def run(name):
        args, extra, _ = BAD_INPUTS[name]
        tmp = str(tmp_path_factory.mktemp(name))
        args = [a.format(tmp=tmp) for a in args]
        extra = dict(extra)
        if "mkdir" in extra:
            os.makedirs(os.path.join(tmp, extra.pop("mkdir")))
        if name != "missing_workdir_flag":
            args.append(f"--workdir={tmp}")
        return launch(*args, env=_env(**extra), timeout=300), tmp

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        return dict(zip(BAD_INPUTS, pool.map(run, BAD_INPUTS)))


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_error(bad_input_runs, name):
    proc, workdir = bad_input_runs[name]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert lines and lines[-1].startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for fragment in BAD_INPUTS[name][2]:
        assert fragment in lines[-1], lines[-1]
    # Nothing was trained.
    assert not os.path.exists(os.path.join(workdir, "summary.json"))
    assert _steps(os.path.join(workdir, "checkpoints")) == []


# ----------------------------------------------------------------------------- resume


def _run_and_kill_mid_epoch(workdir, log_path, timeout=300.0):
    """Starts a training run and SIGKILLs it once a checkpoint exists that is inside the
    second epoch (not at an epoch boundary). Returns the finalised steps on disk, or
    None if the run finished before it could be killed."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(_cmd(*TRAIN, f"--workdir={workdir}"), cwd=ROOT, env=_env(),
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + timeout
            while time.time() < deadline:
                if proc.poll() is not None:
                    return None
                if any(s > STEPS_PER_EPOCH and s % STEPS_PER_EPOCH
                       for s in _steps(os.path.join(workdir, "checkpoints"))):
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(timeout=60)
                    return _steps(os.path.join(workdir, "checkpoints"))
                time.sleep(0.01)
            pytest.fail(f"no mid-epoch checkpoint after {timeout}s; log: {open(log_path).read()[-3000:]}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_killed_run_resumes_to_the_same_result(reference_run, tmp_path):
    workdir = str(tmp_path / "run")
    for _ in range(3):  # a run that outpaces the polling is retried from scratch
        shutil.rmtree(workdir, ignore_errors=True)
        steps_on_disk = _run_and_kill_mid_epoch(workdir, str(tmp_path / "killed.log"))
        if steps_on_disk is not None:
            break
    else:
        pytest.fail("the run finished every time before it could be killed")
    assert not os.path.exists(os.path.join(workdir, "summary.json"))
    latest = max(steps_on_disk)
    assert STEPS_PER_EPOCH < latest < EPOCHS * STEPS_PER_EPOCH and latest % STEPS_PER_EPOCH

    proc = launch(*TRAIN, f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = re.findall(r"resumed from step (\d+)", proc.stderr)
    assert resumed == [str(latest)], proc.stderr[-3000:]

    ref, got = reference_run["summary"], _read_json(os.path.join(workdir, "summary.json"))
    assert got["steps"] == ref["steps"] == EPOCHS * STEPS_PER_EPOCH
    for key in ("test_accuracy", "val_accuracy", "best_val_accuracy"):
        assert got[key] == ref[key], key
    assert got["test_loss"] == pytest.approx(ref["test_loss"], rel=1e-6, abs=1e-7)
    # Validation after every epoch matches too (epoch 1 logged by the killed run).
    metrics = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [m["epoch"] for m in metrics] == [1, 2]
    for m, r in zip(metrics, reference_run["metrics"]):
        assert m["step"] == r["step"] and m["val"]["accuracy"] == r["val"]["accuracy"]
        assert m["val"]["loss"] == pytest.approx(r["val"]["loss"], rel=1e-6, abs=1e-7)
    assert _steps(os.path.join(workdir, "best")) == reference_run["best"]
