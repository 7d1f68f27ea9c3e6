"""Latency table: prediction is the sum of entries; cache keyed by device and JAX version."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import latency
from jaxcompress.errors import ConfigError
from jaxcompress.latency import LatencyGrid, LatencyModel, LatencyTable, device_key, latency_model, layer_shapes
from jaxcompress.models import create_model, describe
from jaxcompress.pruning import align
from jaxcompress.pruning import criteria as C
from jaxcompress.rl import PruneEnv, play


def _table():
    return describe(create_model("lenet300_100", 10), (28, 28, 1))


def test_predict_is_sum_of_entries_and_cached(tmp_path):
    path = str(tmp_path / "lat.json")
    table = _table()
    lut = LatencyTable.load(path)
    total = lut.predict(table, table.widths, batch=4)
    keys = layer_shapes(table, table.widths, 4)
    assert len(keys) == 3 and keys[0][3:5] == (784, 300) and keys[2][3:5] == (100, 10)
    np.testing.assert_allclose(total, sum(lut.entries[repr(k)] for k in keys))
    reloaded = LatencyTable.load(path)
    assert reloaded.entries == lut.entries  # same device: the cached timings are reused
    assert reloaded.predict(table, table.widths, batch=4) == total


def test_table_from_another_device_is_discarded(tmp_path):
    path = tmp_path / "lat.json"
    path.write_text(json.dumps({"device": "gpu:H100:1:jax-0.0", "entries": {"k": 1.0}}))
    assert LatencyTable.load(str(path)).entries == {}
    assert LatencyTable.load(str(path)).device == device_key()


def test_corrupt_table_is_rebuilt(tmp_path):
    path = tmp_path / "lat.json"
    path.write_text("{not json")
    assert LatencyTable.load(str(path)).entries == {}


# ---------------------------------------------------------------- latency model, grid, budgets

class FormulaTable(LatencyTable):
    """A latency table whose 'measurements' are a formula (deterministic tests): MACs,
    with a 50% penalty when a channel count is not a multiple of 8."""

    @staticmethod
    def formula(key):
        kind, batch, in_hw, cin, cout, kernel, strides, depthwise = key
        hw = in_hw[0] * in_hw[1] // (strides[0] * strides[1]) if kind == "conv" else 1
        macs = batch * hw * kernel[0] * kernel[1] * cout * (1 if depthwise else cin)
        return 1e-9 * macs * (1.5 if cin % 8 or cout % 8 else 1.0)

    def measure(self, keys, rounds=3):
        for k in keys:
            self.entries.setdefault(repr(k), FormulaTable.formula(k))


def _formula_model(table, batch=4):
    return LatencyModel(FormulaTable(device_key()), table, batch, scale=2.0, offset=1e-4)


def test_model_is_affine_in_the_table_sum(zoo):
    table = zoo.table("lenet5")
    model = _formula_model(table)
    w = [4, 8, 64, 48]
    by_hand = sum(FormulaTable.formula(k) for k in layer_shapes(table, w, 4))
    np.testing.assert_allclose(model(w), 2.0 * by_hand + 1e-4)


def test_fit_recovers_scale_and_offset(zoo, monkeypatch):
    table = zoo.table("lenet5")
    model = _formula_model(table)
    truth = lambda w: 3.0 * model.layer_sum(w) + 0.002
    monkeypatch.setattr(latency, "measure_networks", lambda t, ws, b, rounds=3: [truth(w) for w in ws])
    model.fit([table.widths, [4, 8, 64, 48], [2, 8, 16, 8]])
    np.testing.assert_allclose([model.scale, model.offset], [3.0, 0.002], rtol=1e-6)


def test_fit_is_cached_per_network_and_widths(zoo, tmp_path, monkeypatch):
    table = zoo.table("lenet5")
    calls = []

    def measure(t, ws, b, rounds=3):
        calls.append(len(ws))
        return [(2.0 + len(calls)) * 1e-9 * sum(FormulaTable.formula(k) for k in layer_shapes(t, w, b)) + 1e-3
                for w in ws]

    monkeypatch.setattr(latency, "measure_networks", measure)
    monkeypatch.setattr(LatencyTable, "measure", FormulaTable.measure)
    path, vectors = str(tmp_path / "lat.json"), [table.widths, [4, 8, 64, 48], [2, 8, 16, 8]]
    first = LatencyModel(LatencyTable.load(path), table, 4).fit(vectors)
    again = LatencyModel(LatencyTable.load(path), table, 4).fit(vectors)  # a later run: from the file
    assert calls == [3] and (again.scale, again.offset) == (first.scale, first.offset)
    LatencyModel(LatencyTable.load(path), table, 4).fit(vectors[:2])  # other widths: measured
    refit = LatencyModel(LatencyTable.load(path), table, 4).fit(vectors, refit=True)
    assert calls == [3, 2, 3] and refit.scale != first.scale


def test_grid_equals_model_at_grid_points_and_interpolates(zoo):
    table = zoo.table("resnet20")
    model = _formula_model(table)
    counts = [align.candidates(w, 8) for w in table.widths]
    grid = LatencyGrid(model, counts, max_points=6)
    rng = np.random.default_rng(0)
    for _ in range(5):
        w = [int(rng.choice(ax)) for ax in grid.axes]
        np.testing.assert_allclose(float(grid(jnp.asarray(w, jnp.float32))), model(w), rtol=1e-5)
    # between two grid points of one group, the prediction lies between the neighbours'
    g = int(np.argmax(table.widths))
    ax = grid.axes[g]
    assert ax.size == 6 and ax[0] == 8 and ax[-1] == 64  # 8 candidates subsampled to 6, both ends kept
    gap = int(np.argmax(np.diff(ax)))
    lo, hi = list(table.widths), list(table.widths)
    lo[g], hi[g] = int(ax[gap]), int(ax[gap + 1])
    mid = jnp.asarray(table.widths, jnp.float32).at[g].set(0.5 * (ax[gap] + ax[gap + 1]))
    assert min(model(lo), model(hi)) <= float(grid(mid)) <= max(model(lo), model(hi))


def test_env_latency_wall_always_meets_budget(zoo):
    table = zoo.table("resnet20")
    model = _formula_model(table, batch=8)
    groups = C.prunable_groups(table, "all")
    env = PruneEnv(table, 1.0, 0.0, 0.8, groups, 16, latency_model=model, latency_budget=0.6)
    assert all(ax.size <= 4 for ax in env.latency.axes)  # multiple 16: every candidate is a grid point
    actions = np.random.default_rng(1).random((200, env.num_steps)).astype(np.float32)
    actions = np.concatenate([actions, np.ones((1, env.num_steps), np.float32)])
    finals = jax.jit(jax.vmap(lambda a: play(env, a)))(actions)
    fractions = np.asarray([model.fraction(w.astype(int).tolist()) for w in np.asarray(finals.values)])
    assert np.all(fractions <= 0.6 + 1e-6), fractions.max()
    assert fractions.max() >= 0.5  # the wall does not throw the budget away
    np.testing.assert_allclose(np.asarray(env.result(jax.tree.map(lambda x: x[0], finals))["latency_ratio"]),
                               fractions[0], rtol=1e-5)


def test_env_rejects_an_unreachable_latency_budget(zoo):
    table = zoo.table("resnet20")
    with pytest.raises(ConfigError, match="latency budget of 1.0% cannot be met"):
        PruneEnv(table, 1.0, 0.0, 0.5, None, 8, latency_model=_formula_model(table), latency_budget=0.01)


def test_keep_ratio_for_latency_is_the_largest_that_fits(zoo):
    table = zoo.table("resnet20")
    model = _formula_model(table)
    groups = C.prunable_groups(table, "all")
    r = C.keep_ratio_for_budget(table, 0.5, model.fraction, groups, 8, what="latency")
    assert model.fraction(C.keep_counts(table, r, groups, 8)) <= 0.5
    finer = [x for x in np.linspace(0.125, 1.0, 400) if model.fraction(C.keep_counts(table, x, groups, 8)) <= 0.5]
    assert C.keep_counts(table, max(finer), groups, 8) == C.keep_counts(table, r, groups, 8)
    with pytest.raises(ConfigError, match="latency budget of 1.0% cannot be met"):
        C.keep_ratio_for_budget(table, 0.01, model.fraction, groups, 8, what="latency")


def test_prune_job_meets_a_latency_budget(tmp_path, monkeypatch):
    from configs import quickstart
    from jaxcompress.pruning.job import prune_and_finetune
    monkeypatch.setenv("JAXCOMPRESS_CACHE", str(tmp_path / "cache"))
    # deterministic 'measurements' (the formula); real timing is what benchmarks/configs/latency_budget.py measures
    monkeypatch.setattr(LatencyTable, "measure", FormulaTable.measure)
    monkeypatch.setattr(latency, "measure_networks", lambda table, ws, batch, rounds=3: [
        1.1 * sum(FormulaTable.formula(k) for k in layer_shapes(table, w, batch)) + 1e-5 for w in ws])
    c = quickstart.get_config()
    c.train.num_epochs, c.prune.finetune_epochs, c.hardware.latency_batch = 1, 0, 32
    c.prune.scope, c.prune.latency_budget = "all", 0.6
    s = prune_and_finetune(c, str(tmp_path / "run"))
    assert s["latency_budget"] == 0.6 and s["latency_predicted_fraction"] <= 0.6
    assert all(k == w or k % m == 0 for k, w, m in zip(s["widths_pruned"], s["widths_dense"], [2, 8, 8, 8]))
    assert set(s["latency_s"]) == {"dense", "masked", "shrunk"}
    c.prune.latency_budget = 1e-3  # infeasible: fails before training anything
    with pytest.raises(ConfigError, match="cannot be met"):
        prune_and_finetune(c, str(tmp_path / "run2"))
    assert not os.path.exists(tmp_path / "run2" / "pretrain")


def test_search_job_keeps_a_latency_budget(tmp_path, monkeypatch):
    from configs import quickstart
    from jaxcompress.rl.job import search
    monkeypatch.setenv("JAXCOMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(LatencyTable, "measure", FormulaTable.measure)
    monkeypatch.setattr(latency, "measure_networks", lambda table, ws, batch, rounds=3: [
        sum(FormulaTable.formula(k) for k in layer_shapes(table, w, batch)) for w in ws])
    c = quickstart.get_config()
    c.job, c.train.num_epochs, c.hardware.latency_batch = "search", 1, 32
    s = c.search
    s.num_actors, s.episodes, s.eval_size, s.scope, s.a_max = 4, 8, 100, "all", 0.9
    s.flops_budget, s.latency_budget, s.finetune_epochs, s.quant.episodes = 1.0, 0.5, 0, 0
    out = search(c, str(tmp_path / "run"))
    stage1 = out["stage1"]
    assert stage1["latency_budget"] == 0.5 and stage1["latency_predicted_ratio"] <= 0.5
    lat = latency_model(describe(create_model("lenet5", 10), (28, 28, 1)), 32, [0, 1, 2, 3], [2, 8, 8, 8])
    # the in-graph grid interpolates between its points: the exact model agrees closely
    assert lat.fraction(stage1["widths"]) <= 0.5 * 1.05
    assert set(stage1["latency_s"]) == {"dense", "shrunk"}
