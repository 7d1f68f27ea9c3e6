"""The `stamp` job end to end (LeNet-5 on the embedded digits, no download) and its
time-to-accuracy bookkeeping, checked against hand-computed values."""
import json
import os
import time

import pytest

from configs import default
from jaxcompress import cost, jobs
from jaxcompress.models import create_model, describe
from jaxcompress.stamp import deploy as D
from jaxcompress.stamp.job import stamp_time_ratios


def _write_metrics(directory, rows):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "metrics.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def test_val_curve_shifts_epochs_onto_the_methods_target_time(tmp_path):
    # A method that started at wall-clock 1000 s, spent 30 s before its fine-tune (e.g.
    # the dense fine-tune of magnitude pruning), logged epochs at 1040 and 1050 s and
    # ended at 1055 s (target time 55 s). An epoch logged at 990 s belongs to an
    # earlier, interrupted run and is dropped.
    _write_metrics(tmp_path, [{"step": 1, "time": 990.0, "val": {"accuracy": 0.1}},
                              {"step": 5, "time": 1040.0, "val": {"accuracy": 0.5}},
                              {"step": 9, "time": 1050.0, "val": {"accuracy": 0.7}}])
    assert D.val_curve(str(tmp_path), 55.0, 1055.0) == [[40.0, 0.5], [50.0, 0.7]]
    assert D.val_curve(str(tmp_path / "absent"), 5.0, 1.0) == []


def test_time_to_accuracy_is_the_first_epoch_reaching_it():
    curve = [[10.0, 0.4], [20.0, 0.6], [30.0, 0.55], [40.0, 0.8]]
    assert D.time_to_accuracy(curve, 0.6) == 20.0
    assert D.time_to_accuracy(curve, 0.7) == 40.0
    assert D.time_to_accuracy(curve, 0.81) is None


def test_stamp_time_ratios_by_hand():
    results = {"stamp": dict(val_accuracy=0.6, target_time_s=20.0, val_curve=[[15.0, 0.6]]),
               "magnitude": dict(val_accuracy=0.7, target_time_s=100.0, val_curve=[[60.0, 0.5], [80.0, 0.65]]),
               "random": dict(val_accuracy=0.5, target_time_s=30.0, val_curve=[[30.0, 0.5]])}
    r = stamp_time_ratios(results)
    assert r["stamp_val_accuracy"] == 0.6
    assert r["time_to_stamp_val_accuracy_s"] == {"magnitude": 80.0, "random": None}
    assert r["time_ratio_to_stamp"] == {"magnitude": 4.0, "random": None}


EPOCHS = 2


def stamp_config():
    """The stamp job on LeNet-5 / the embedded digits, 0-4 -> 5-9, minutes on a CPU."""
    c = default.get_config()
    c.job, c.model.name = "stamp", "lenet5"
    c.data.name, c.data.image_size = "digits", 28
    c.train.num_epochs, c.train.batch_size, c.train.eval_batch_size = 2, 32, 200
    c.train.learning_rate = 0.05
    c.hardware.latency_batch = 16
    s = c.stamp
    s.reference_classes, s.target.classes = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
    s.val_size, s.set_size, s.snip_batch = 60, 40, 64
    s.meta_steps, s.tasks_per_step, s.checkpoint_every = 3, 2, 2
    s.inner_steps, s.inner_batch, s.query_size = 2, 16, 32
    s.finetune_epochs = EPOCHS
    s.methods = ("stamp", "dense", "magnitude", "random", "scratch")
    return c


@pytest.fixture(scope="module")
def stamp_run(tmp_path_factory):
    c = stamp_config()
    workdir = str(tmp_path_factory.mktemp("stamp"))
    start = time.time()
    summary = jobs.run(c, workdir)
    return dict(summary=summary, workdir=workdir, config=c, seconds=time.time() - start)


def test_stamp_job_runs_every_method_at_the_budget(stamp_run):
    s, c = stamp_run["summary"], stamp_run["config"]
    assert set(s["methods"]) == set(c.stamp.methods)
    table = describe(create_model("lenet5", 5), (28, 28, 1))
    dense = cost.count(table)
    for name, r in s["methods"].items():
        # the reported size is the cost model's for the reported widths
        c_ = cost.count(table, r["widths"])
        assert r["params_pct"] == pytest.approx(100 * float(c_["params"] / dense["params"]))
        assert r["flops_pct"] == pytest.approx(100 * float(c_["flops"] / dense["flops"]))
        assert 0.0 <= r["accuracy"] <= 1.0 and s[f"accuracy_{name}"] == r["accuracy"]
        assert 0.0 < r["target_time_s"] <= r["total_time_s"] <= stamp_run["seconds"]
    stamp = s["methods"]["stamp"]
    assert stamp["params_pct"] <= 100 * c.stamp.budget + 1e-6  # mask_mode budget meets it exactly or below
    for name in ("magnitude", "random"):  # same final size: uniform ratio at STAMP's parameter fraction
        assert s["methods"][name]["params_pct"] <= stamp["params_pct"] + 1e-6
    assert s["methods"]["scratch"]["widths"] == stamp["widths"]
    assert s["methods"]["dense"]["params_pct"] == 100.0
    assert s["methods"]["scratch"]["total_time_s"] == s["methods"]["scratch"]["target_time_s"]  # no pretraining
    assert stamp["total_time_s"] == pytest.approx(stamp["target_time_s"] + s["pretrain_time_s"]
                                                  + s["meta_train_time_s"])
    assert set(s["latency_s"]) == {"dense", "stamp"} and min(s["latency_s"].values()) > 0
    assert os.path.exists(os.path.join(stamp_run["workdir"], "accuracy_vs_time.png"))


def test_stamp_job_curves_and_time_ratios(stamp_run):
    s = stamp_run["summary"]
    for name, r in s["methods"].items():
        curve = r["val_curve"]
        assert len(curve) == EPOCHS  # one point per fine-tune epoch
        times = [t for t, _ in curve]
        assert times == sorted(times) and 0.0 <= times[0] and times[-1] <= r["target_time_s"]
        assert curve[-1][1] == pytest.approx(r["val_accuracy"])  # the last epoch is the evaluated state
    # magnitude's curve starts after its dense fine-tune (counted in its target time)
    assert s["methods"]["magnitude"]["val_curve"][0][0] > s["methods"]["dense"]["target_time_s"] * 0.5
    assert s["stamp_val_accuracy"] == s["methods"]["stamp"]["val_accuracy"]
    for name, t in s["time_to_stamp_val_accuracy_s"].items():
        assert t == D.time_to_accuracy(s["methods"][name]["val_curve"], s["stamp_val_accuracy"])
        ratio = s["time_ratio_to_stamp"][name]
        assert ratio == (None if t is None else pytest.approx(t / s["methods"]["stamp"]["target_time_s"]))


def test_stamp_job_reuses_a_pretrained_network_and_meta_checkpoint(stamp_run, tmp_path):
    """`stamp.pretrained` and `stamp.meta_checkpoint` pointing at `stamp_run`'s: nothing is
    trained before the target side, and STAMP deploys the same widths."""
    c = stamp_run["config"].copy_and_resolve_references()
    c.stamp.pretrained = os.path.join(stamp_run["workdir"], "pretrain")
    c.stamp.meta_checkpoint = os.path.join(stamp_run["workdir"], "meta")
    c.stamp.methods, c.stamp.finetune_epochs, c.stamp.diagnostic_sets = ("stamp",), 0, 0
    c.hardware.latency_batch = 0
    s = jobs.run(c, str(tmp_path))
    assert s["methods"]["stamp"]["widths"] == stamp_run["summary"]["methods"]["stamp"]["widths"]
    assert not os.path.exists(os.path.join(str(tmp_path), "pretrain")) and not os.path.exists(
        os.path.join(str(tmp_path), "meta"))
