"""Tests for the `bench_single_layer` job (the two-stage paper's Sec. 5.5 experiment):
config checks, single-group pruning by each method, and a tiny end-to-end run with resume."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from benchmarks.configs import single_layer_cifar10
from benchmarks.resume import read_rows
from benchmarks.run import run as run_job
from jaxcompress.data import normalize
from jaxcompress.errors import ConfigError
from jaxcompress.models import create_model, describe
from benchmarks import single_layer as bench
from jaxcompress.train import Recipe, create_train_state
from jaxcompress.train.experiment import Experiment
from jaxcompress.train.steps import make_mesh


def _config(**bench_overrides):
    c = single_layer_cifar10.get_config()
    for k, v in bench_overrides.items():
        setattr(c.bench, k, v)
    return c


# ---------------------------------------------------------------------------------------- config

@pytest.mark.parametrize("overrides, needle", [
    (dict(methods=("magnitude", "l3")), "unknown bench.methods ['l3']"),
    (dict(rates=(0.5, 0.0)), "bench.rates: 0 is outside (0, 1)"),
    (dict(rates=(1.0,)), "bench.rates: 1 is outside (0, 1)"),
    (dict(rates=(-0.25,)), "outside (0, 1)"),
    (dict(layers=("conv1", "fc2")), "unknown bench.layers ['fc2']"),  # the classifier is not prunable
    (dict(layers=("conv3",)), "prunable channel groups are: conv1, conv2, fc1"),
])
def test_bad_config_is_one_line_before_any_work(overrides, needle, tmp_path, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("data loaded / work started before the config was checked")
    monkeypatch.setattr(bench, "setup_experiment", no_work)
    with pytest.raises(ConfigError) as e:
        run_job(_config(**overrides), str(tmp_path))
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "pretrain") and not os.path.exists(tmp_path / "results.jsonl")


def test_config_defaults_and_cells():
    b, cells = bench.check_config(_config())
    assert b["layers"] == ("conv1", "conv2", "fc1")
    assert len(cells) == 27 and cells[0] == ("magnitude", "conv1", 0.25) and cells[-1] == ("variational", "fc1", 0.75)
    c = _config(layers=())  # () = every prunable group
    assert bench.check_config(c)[0]["layers"] == ("conv1", "conv2", "fc1")
    c = _config()
    c.bench.variational.num_stepz = 3
    with pytest.raises(ConfigError, match="unknown config.bench.variational fields"):
        bench.check_config(c)


# --------------------------------------------------------------------------- one group, by hand

@pytest.fixture(scope="module")
def cnn4_exp():
    """cnn4 (widths 16-32-128) with random weights and 64 random 32x32x3 'training' images."""
    model = create_model("cnn4", 10, width_multiplier=0.5)
    table = describe(model, (32, 32, 3))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 32, 32, 3)).astype(np.uint8)
    y = rng.integers(0, 10, 64).astype(np.int32)
    mean, std = np.full(3, 120.0, np.float32), np.full(3, 60.0, np.float32)
    exp = Experiment(train=(x, y), val=(x[:8], y[:8]), test=(x[:8], y[:8]), num_classes=10, mean=mean, std=std,
                     model=model, table=table, mesh=make_mesh())
    variables = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))()
    state = create_train_state(model, optax.sgd(0.1), (32, 32, 3), 0, variables=variables)
    return exp, state


def _kernels(params):
    return {k[0]: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items() if k[-1] == "kernel"}


@pytest.mark.parametrize("method", ["magnitude", "lasso"])
def test_only_the_named_group_is_pruned(method, cnn4_exp):
    exp, state = cnn4_exp
    b, _ = bench.check_config(_config(lasso_sample_size=32))
    masks, params = bench.prune_one_layer(_config(), exp, state, method, "conv1", 0.75, b, {})
    gm = [np.asarray(m) for m in exp.table.group_masks(masks)]
    assert [int(m.sum()) for m in gm] == [4, 32, 128]  # 16 * (1 - 0.75) = 4 of conv1; the rest whole
    before, after = _kernels(state.params), _kernels(params)
    if method == "magnitude":
        l1 = np.abs(before["conv1"]).sum(axis=(0, 1, 2))
        np.testing.assert_array_equal(np.flatnonzero(gm[0]), np.sort(np.argsort(-l1, kind="stable")[:4]))
        changed = []
    else:  # LASSO refits conv1's consumer (conv2) and nothing else
        changed = ["conv2"]
        assert not np.allclose(before["conv2"], after["conv2"])
        kept_rows = after["conv2"][:, :, gm[0] == 0, :]
        np.testing.assert_array_equal(kept_rows, 0.0)  # pruned input channels' weights are zero
    for name in ("conv1", "conv2", "fc1", "fc2"):
        if name not in changed:
            np.testing.assert_array_equal(before[name], after[name], err_msg=name)


# ------------------------------------------------------------------------------------ end to end

def _tiny(workdir):
    """digits (8x8x1: cnn4's SAME convs give a 2x2x16 map into fc1), widths 8-16-64, conv2 at 50%."""
    c = _config(layers=("conv2",), rates=(0.5,), finetune_steps=3, finetune_dense=False, lasso_sample_size=100)
    c.bench.variational.num_steps = 4
    c.bench.variational.batch_size = 64
    c.model.width_multiplier = 0.25
    c.data.name, c.data.val_size = "digits", 200
    c.train.num_epochs, c.train.batch_size, c.train.eval_batch_size = 1, 64, 500
    return c


def test_end_to_end_tiny_and_resume(tmp_path, monkeypatch):
    c = _tiny(tmp_path)
    s = run_job(c, str(tmp_path))
    assert s["widths"] == [8, 16, 64] and s["finetune_steps"] == 3 and s["finetune_examples"] == 3 * 64
    rows = {r["method"]: r for r in s["cells"]}
    assert set(rows) == {"magnitude", "lasso", "variational"}

    # the dense error, recomputed here from the pretrained checkpoint
    from jaxcompress.train.experiment import setup_experiment
    from jaxcompress.train.loop import load_trained
    exp = setup_experiment(c)
    state = load_trained(exp, str(tmp_path / "pretrain"), Recipe.from_config(c))
    xt, yt = exp.test
    logits = lambda v: np.asarray(exp.model.apply(v, normalize(xt, exp.mean, exp.std)))
    dense_err = float(np.mean(logits(state.variables()).argmax(-1) != yt))
    assert s["error_dense"] == pytest.approx(dense_err, abs=1e-9)

    # hand cost of widths (8, 8, 64): conv1 25*1*8+8, conv2 25*8*8+8, fc1 2*2*8*64+64, fc2 64*10+10
    dense_params = (25 * 8 + 8) + (25 * 8 * 16 + 16) + (4 * 16 * 64 + 64) + (64 * 10 + 10)
    pruned_params = (25 * 8 + 8) + (25 * 8 * 8 + 8) + (4 * 8 * 64 + 64) + (64 * 10 + 10)
    for r in rows.values():
        assert r["widths"] == [8, 8, 64] and len(r["kept"]) == 8
        assert r["params_left"] == pytest.approx(pruned_params / dense_params, rel=1e-6)
        assert r["error_increase"] == pytest.approx(r["error_finetuned"] - dense_err, abs=1e-12)
        assert 0.0 <= r["error_before_finetune"] <= 1.0 and 0.0 <= r["error_finetuned"] <= 1.0

    # magnitude: the 8 conv2 channels of largest L1 norm; its pre-fine-tune error is the masked net's
    kernel = np.asarray(state.params["conv2"]["kernel"])
    top = np.sort(np.argsort(-np.abs(kernel).sum(axis=(0, 1, 2)), kind="stable")[:8])
    assert rows["magnitude"]["kept"] == top.tolist()
    m = np.zeros(16, np.float32)
    m[top] = 1.0
    masks = exp.table.layer_masks([jnp.ones(8), jnp.asarray(m), jnp.ones(64)], state.masks)
    masked_err = float(np.mean(logits({**state.variables(), "masks": masks}).argmax(-1) != yt))
    assert rows["magnitude"]["error_before_finetune"] == pytest.approx(masked_err, abs=1e-9)

    # outputs: table in summary, markdown, plot, one results line per cell
    assert s["table"]["lasso"]["conv2"]["0.5"] == rows["lasso"]["error_increase"]
    assert s["ordering"]["total"] == 1
    md = (tmp_path / "results.md").read_text()
    assert f"| conv2 | magnitude | {100 * rows['magnitude']['error_increase']:+.2f} (" in md
    assert (tmp_path / "single_layer.png").stat().st_size > 5000
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 3

    # resume: drop the magnitude line; only that cell is redone, its fine-tune restored from its
    # checkpoint (same numbers), the other cells are read back
    calls = []
    real = bench.shrink_and_finetune

    def counting(*a, **k):
        calls.append(a[3])
        return real(*a, **k)

    monkeypatch.setattr(bench, "shrink_and_finetune", counting)
    (tmp_path / "results.jsonl").write_text("\n".join(l for l in lines if '"magnitude"' not in l) + "\n")
    s2 = run_job(c, str(tmp_path))
    assert len(calls) == 1 and "magnitude_conv2_0.5" in calls[0]
    assert s2["table"] == s["table"]
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 3

    # other settings -> other fingerprint: nothing is reused
    assert read_rows(str(tmp_path / "results.jsonl"), "0" * 10) == {}
    assert len(read_rows(str(tmp_path / "results.jsonl"), s["fingerprint"])) == 3
    c.bench.finetune_steps = 4
    assert bench._fingerprint(c, bench.check_config(c)[0]) != s["fingerprint"]
