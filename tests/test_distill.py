"""Knowledge distillation in the compression jobs' fine-tunes (`train.distill_weight`):
the jobs hand their reference network to `fit` as the teacher; the loss itself is
checked against Hinton et al.'s formulas in tests/test_train.py."""
import jax
import numpy as np
import pytest

from configs import quickstart
from jaxcompress import jobs
from jaxcompress.errors import ConfigError
from jaxcompress.train import Recipe, loop, setup_experiment


def _record_steps(monkeypatch) -> list:
    """Wraps the jitted training steps `fit` builds: one entry per step built (the fits of
    one experiment with the same settings share one), holding the teacher variables of its
    first call (None: trained without a teacher) and the number of calls."""
    calls, original = [], loop.S.jit_data_parallel

    def jit_data_parallel(step_fn, mesh, donate=True, replicated_args=0):
        jitted = original(step_fn, mesh, donate, replicated_args)
        entry = {"teacher": None, "steps": 0}
        calls.append(entry)

        def step(state, batch, *teacher):
            if teacher and entry["teacher"] is None:
                entry["teacher"] = teacher[0]
            entry["steps"] += 1
            return jitted(state, batch, *teacher)
        return step

    monkeypatch.setattr(loop.S, "jit_data_parallel", jit_data_parallel)
    return calls


def test_prune_job_fine_tunes_distil_from_the_reference(tmp_path, monkeypatch):
    calls = _record_steps(monkeypatch)
    c = quickstart.get_config()
    c.train.num_epochs, c.prune.finetune_epochs = 1, 1
    c.prune.iterations, c.prune.iteration_epochs = 2, 1
    c.train.distill_weight = 0.5
    workdir = str(tmp_path / "run")
    summary = jobs.run(c, workdir)
    # pretraining the reference (1 epoch) has no teacher; the gradual step's and the shrunk
    # network's fine-tunes (1 epoch each) share one jitted step (`Experiment.shared`), with it
    assert [e["teacher"] is None for e in calls] == [True, False]
    assert calls[1]["steps"] == 2 * calls[0]["steps"] > 0
    reference = loop.load_trained(setup_experiment(c), f"{workdir}/pretrain", Recipe.from_config(c))
    for entry in calls[1:]:
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(entry["teacher"]["params"]), reference.params)
    assert summary["accuracy_pruned"] > 0.5


def test_distillation_settings_are_checked_before_any_work(tmp_path):
    c = quickstart.get_config()
    c.job, c.train.distill_weight = "train", 0.5
    with pytest.raises(ConfigError, match="job 'train' has no teacher") as e:
        jobs.run(c, str(tmp_path / "train"))
    assert "\n" not in str(e.value)
    for field, value, match in [("distill_weight", 1.5, "must be in \\[0, 1\\]"),
                                ("distill_temperature", 0.0, "must be positive")]:
        c = quickstart.get_config()
        c.train[field] = value
        with pytest.raises(ConfigError, match=match):
            jobs.run(c, str(tmp_path / field))
        assert not (tmp_path / field / "pretrain").exists()
