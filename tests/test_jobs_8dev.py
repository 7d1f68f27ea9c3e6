"""Every job (train, prune, quantize with QAT, search, STAMP) once on 8 simulated CPU
devices, so that a donation or sharding bug cannot hide behind one device.

The 8 devices need XLA_FLAGS before JAX starts: the jobs run one after the other in a
subprocess (sharing its compilations) that prints their summaries' key figures as
JSON; the assertions are made here. Settings are the tiny ones of tests/test_rl_job.py,
tests/test_stamp_job.py and tests/test_quant_job.py, with every batch a multiple of 8;
prune, quantize and search start from the train job's network.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent('''
    import json, os, sys, time
    import jax
    from configs import default, quickstart
    from jaxcompress import jobs

    assert jax.device_count() == 8, jax.devices()
    root = sys.argv[1]
    out, seconds, start = {}, {}, time.time()

    def lap(job):
        global start
        seconds[job], start = round(time.time() - start, 1), time.time()

    def base(job):
        c = quickstart.get_config()
        c.job, c.train.num_epochs, c.train.batch_size, c.train.eval_batch_size = job, 1, 64, 200
        c.hardware.latency_batch = 0
        return c

    c = base("train")
    train_dir = os.path.join(root, "train")
    s = jobs.run(c, train_dir)
    lap("train")
    out["train"] = dict(devices=s["devices"], steps=s["steps"], test_accuracy=s["test_accuracy"])

    c = base("prune")
    c.prune.checkpoint, c.prune.finetune_epochs = train_dir, 1
    s = jobs.run(c, os.path.join(root, "prune"))
    lap("prune")
    out["prune"] = dict(accuracy_pruned=s["accuracy_pruned"], widths=s["widths_pruned"])

    # QAT distilled from the float network: the run whose donated state crashed on 8 devices
    c = base("quantize")
    c.quant.checkpoint, c.quant.mode, c.quant.qat_epochs = train_dir, "qat", 1
    c.quant.calib_batches, c.quant.calib_batch_size, c.quant.verify_batch = 2, 64, 64
    c.train.distill_weight = 0.5
    s = jobs.run(c, os.path.join(root, "quantize"))
    lap("quantize")
    out["quantize"] = {k: s[k] for k in ("accuracy_qat", "accuracy_exported", "accuracy_quantized",
                                         "outputs_match", "payload_equals_accounting", "outputs_max_abs_diff",
                                         "accuracy_integer", "integer_layers", "stablehlo_argmax_agreement")}
    out["quantize"]["integer_stablehlo"] = {k: s["integer_stablehlo"][k] for k in ("int8_ops", "argmax_agreement")}

    c = base("search")
    c.search.checkpoint = train_dir
    q = c.search
    q.granularity, q.num_actors, q.episodes, q.eval_size, q.a_max = "element", 8, 8, 96, 0.95
    q.flops_budget, q.params_budget, q.finetune_epochs = 0.2, 0.1, 1
    q.element_iterations, q.element_iteration_epochs = 1, 1
    q.quant.episodes, q.quant.qat_epochs = 8, 1
    s = jobs.run(c, os.path.join(root, "search"))
    lap("search")
    out["search"] = dict(flops_ratio=s["stage1"]["flops_ratio"], avg_bits=s["stage2"]["avg_bits"])

    c = default.get_config()
    c.job, c.model.name = "stamp", "lenet5"
    c.data.name, c.data.image_size = "digits", 28
    c.train.num_epochs, c.train.batch_size, c.train.eval_batch_size = 1, 32, 200
    c.hardware.latency_batch = 0
    t = c.stamp
    t.reference_classes, t.target.classes = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
    t.val_size, t.set_size, t.snip_batch = 64, 40, 64
    t.meta_steps, t.tasks_per_step, t.checkpoint_every = 2, 8, 2  # 8 tasks: one per device
    t.inner_steps, t.inner_batch, t.query_size = 2, 16, 32
    t.selection, t.channel_stats, t.meta_val_size, t.meta_val_tasks = "per_layer", True, 50, 8
    t.baseline_widths, t.diagnostic_sets = "stamp", 3
    t.finetune_epochs, t.methods = 1, ("stamp", "snip_pretrained", "random_stamp_widths")
    s = jobs.run(c, os.path.join(root, "stamp"))
    lap("stamp")
    out["stamp"] = {name: {k: r[k] for k in ("accuracy", "widths", "params_pct")} for name, r in s["methods"].items()}
    out["stamp"]["stamp"].update({k: s["methods"]["stamp"][k] for k in ("keep_prob_variation", "keep_prob_undecided")})
    out["stamp_budget"] = t.budget
    out["stamp_meta"] = s["meta"]
    print("RESULT " + json.dumps({**out, "seconds": seconds}))
''')


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    # XLA's backend optimisations off (as conftest's fast_jit): compiles take about half the time, and
    # what is under test (donation, shardings) does not depend on them
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"}
    root = str(tmp_path_factory.mktemp("jobs8"))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, root], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert line, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(line[-1][len("RESULT "):])


def test_train_on_eight_devices(results):
    r = results["train"]
    assert r["devices"] == 8 and r["steps"] == 1238 // 64 and r["test_accuracy"] > 0.5


def test_prune_on_eight_devices(results):
    r = results["prune"]
    assert r["accuracy_pruned"] > 0.3
    assert all(w <= d for w, d in zip(r["widths"], [6, 16, 120, 84])) and sum(r["widths"]) < 6 + 16 + 120 + 84


def test_quantize_with_distilled_qat_on_eight_devices(results):
    r = results["quantize"]
    assert r["outputs_match"] and r["payload_equals_accounting"], r
    assert r["accuracy_exported"] == r["accuracy_quantized"] == r["accuracy_qat"] > 0.5
    # executed in int8 x int8 -> int32 (symmetric weights, every layer at 8 bits), replicated over 8 devices
    assert r["integer_layers"] == ["conv1", "conv2", "fc1", "fc2", "fc3"], r
    assert abs(r["accuracy_integer"] - r["accuracy_quantized"]) <= 0.01 and r["stablehlo_argmax_agreement"] == 1.0
    # model.int8.stablehlo: the integer network, int8 x int8 products in the module (the 5 layers and the
    # zero-point correction of conv2, which reads unsigned ReLU codes), agreeing with it under plain JAX
    # (the export's constant folding may move one activation code: at most one of the 64 checked images)
    assert r["integer_stablehlo"]["int8_ops"] == 6 and r["integer_stablehlo"]["argmax_agreement"] >= 63 / 64


def test_search_on_eight_devices(results):
    r = results["search"]
    assert r["flops_ratio"] <= 0.2 + 1e-6 and 2.0 <= r["avg_bits"] <= 5.0 + 1e-6


def test_stamp_on_eight_devices(results):
    """`selection=per_layer` with per-channel statistics: every baseline exactly at STAMP's
    widths, STAMP within its budget, the diagnostics of E[pi] recorded."""
    r = results["stamp"]
    assert set(r) == {"stamp", "snip_pretrained", "random_stamp_widths"}
    for name in r:
        assert r[name]["widths"] == r["stamp"]["widths"] and 0.0 <= r[name]["accuracy"] <= 1.0
    assert r["stamp"]["params_pct"] <= 100 * results["stamp_budget"] + 1e-6
    v = r["stamp"]["keep_prob_variation"]
    assert v["sets"] == 4 and v["across_sets"] >= 0 and 0 <= v["mask_agreement"] <= 1
    assert 0 <= r["stamp"]["keep_prob_undecided"] <= 1
    meta = results["stamp_meta"]  # the meta step's tasks split over the 8 devices; validation picked a step
    assert meta["task_devices"] == 8 and meta["best_step"] in (2,) and 0.0 <= meta["val_accuracy"] <= 1.0
