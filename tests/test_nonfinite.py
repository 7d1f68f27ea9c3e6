"""Non-finite values stop a job at the step where they appear and keep the last good
checkpoint; a resumed epoch reports its metrics over all of its steps; Ctrl-C exits
with one line.

Training runs are LeNet-5 on the embedded digits at batch 32 (1238 training images:
38 steps per epoch). NaN is injected inside the jitted step (the parameters are
poisoned on device before the chosen step), so the detection under test is the one
the jobs use: on device, read only where the host waits anyway.
"""
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import quickstart
from jaxcompress import jobs
from jaxcompress.errors import ConfigError, NonFiniteError
from jaxcompress.models import create_model
from jaxcompress.rl import DDPG, DDPGConfig, OBS_DIM, SearchDiverged, make_reward_fn, run_search
from jaxcompress.rl import search as search_module
from jaxcompress.stamp.meta import meta_train
from jaxcompress.train import Checkpointer, create_train_state, loop, make_optimizer
from jaxcompress.train.metrics import read_metrics
from test_rl_agents import Bandit  # tests/ is on sys.path (pytest's prepend import mode)
from test_stamp import _tiny_problem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPE = 38  # steps per epoch at batch 32


def _config(epochs: int, every: int):
    c = quickstart.get_config()
    c.job, c.train.num_epochs, c.train.batch_size = "train", epochs, 32
    c.checkpoint.every_steps = every
    c.hardware.latency_batch = 0
    return c


def _poison_step(monkeypatch, bad_step: int):
    """The training steps `fit` builds compute a NaN loss at `bad_step` (1-based): the
    parameters entering that step are multiplied by NaN, on device."""
    original = loop.S.make_train_step

    def make_train_step(*args, **kwargs):
        step_fn = original(*args, **kwargs)

        def step(state, batch, *rest):
            scale = jnp.where(state.step == bad_step - 1, jnp.nan, 1.0)
            return step_fn(state.replace(params=jax.tree.map(lambda p: p * scale, state.params)), batch, *rest)
        return step

    monkeypatch.setattr(loop.S, "make_train_step", make_train_step)


def _steps(directory):
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []


def _restore(directory):
    template = create_train_state(create_model("lenet5", 10), make_optimizer(_config(1, 0).train, 1),
                                  (28, 28, 1), 0)
    ckpt = Checkpointer(directory)
    try:
        return ckpt.restore(template)
    finally:
        ckpt.close()


@pytest.mark.parametrize("epochs, every, bad, kept", [
    (1, 5, 23, 20),      # found at the mid-epoch checkpoint of step 25, which is not saved
    (2, 0, 50, SPE),     # found at the end of epoch 2: epoch 1's checkpoint stands
])
def test_nan_loss_stops_training_at_that_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, epochs, every,
                                                                             bad, kept):
    _poison_step(monkeypatch, bad)
    workdir = str(tmp_path / "run")
    epoch, in_epoch = (bad - 1) // SPE + 1, (bad - 1) % SPE + 1
    with pytest.raises(NonFiniteError) as info:
        jobs.run(_config(epochs, every), workdir)
    message = str(info.value)
    assert isinstance(info.value, ConfigError) and "\n" not in message
    assert f"epoch {epoch}/{epochs}, step {in_epoch}/{SPE} (step {bad} of {epochs * SPE})" in message, message
    assert f"step {kept} in {workdir}/checkpoints" in message, message
    assert max(_steps(os.path.join(workdir, "checkpoints"))) == kept
    state, meta = _restore(os.path.join(workdir, "checkpoints"))
    assert int(state.step) == kept
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    # no metrics for the bad epoch; the best checkpoint is an earlier, finite one
    assert [m["epoch"] for m in read_metrics(workdir)] == list(range(1, epoch))
    assert all(s <= kept for s in _steps(os.path.join(workdir, "best")))


class _Killed(Exception):
    pass


def _stop_training_at(monkeypatch, n: int, stop):
    """The `n`-th training step (1-based, counted over every `fit` of the job) and any
    later one raise `stop` instead of running. Returns a function that puts the real
    steps back, for the rerun."""
    original, calls = loop._train_step, []

    def stopping(*args, **kwargs):
        step, extra = original(*args, **kwargs)

        def wrapped(*a):
            calls.append(1)
            if len(calls) >= n:
                raise stop
            return step(*a)
        return wrapped, extra

    monkeypatch.setattr(loop, "_train_step", stopping)
    return lambda: monkeypatch.setattr(loop, "_train_step", original)


def test_resumed_epoch_reports_metrics_over_all_its_steps(tmp_path, monkeypatch):
    """Stopped after 17 steps and resumed: killed, from the last checkpoint (step 15,
    mid-epoch); interrupted (Ctrl-C), from the checkpoint the interrupt saves at step 17.
    Either way the epoch's metrics line equals an uninterrupted run's."""
    c = _config(1, 5)
    reference = str(tmp_path / "reference")
    jobs.run(c, reference)
    ref = read_metrics(reference)
    for stop, resumed_at in ((_Killed, 15), (KeyboardInterrupt, 17)):
        workdir = str(tmp_path / stop.__name__)
        restore_steps = _stop_training_at(monkeypatch, 18, stop)  # after 17 steps
        with pytest.raises(stop):
            jobs.run(c, workdir)
        assert max(_steps(os.path.join(workdir, "checkpoints"))) == resumed_at
        restore_steps()
        jobs.run(c, workdir)
        got = read_metrics(workdir)
        assert [m["epoch"] for m in got] == [1] and got[0]["step"] == ref[0]["step"] == SPE
        assert got[0]["train"] == ref[0]["train"]  # all 38 steps, bit for bit
        assert got[0]["val"] == ref[0]["val"]


def _tiny_job(job: str):
    """The quickstart's digits at 8x8 through LeNet-300-100: a reference (1 epoch), then
    the prune job's fine-tune or QAT (1 epoch each), checkpoints every 5 steps."""
    c = _config(1, 5)
    c.job, c.model.name, c.data.image_size = job, "lenet300_100", 8
    c.prune.finetune_epochs = 1
    c.quant.mode, c.quant.qat_epochs = "qat", 1
    return c


@pytest.mark.parametrize("job, killed_at", [("prune", 50), ("quantize", 45)])
def test_prune_and_qat_killed_mid_phase_resume_to_the_same_summary(tmp_path, monkeypatch, job, killed_at):
    """Killed (an exception at the `killed_at`-th training step of the whole job, in the
    fine-tune / QAT phase after the 38-step reference: no save at the kill, as with kill
    -9) and rerun: the same summary's accuracies as an uninterrupted run."""
    c = _tiny_job(job)
    reference = str(tmp_path / "reference")
    expected = jobs.run(c, reference)
    workdir = str(tmp_path / "run")
    restore_steps = _stop_training_at(monkeypatch, killed_at, _Killed)
    with pytest.raises(_Killed):
        jobs.run(c, workdir)
    restore_steps()
    got = jobs.run(c, workdir)
    accuracies = sorted(k for k, v in expected.items() if "accuracy" in k and isinstance(v, float))
    assert accuracies and {k: got[k] for k in accuracies} == {k: expected[k] for k in accuracies}


def test_ctrl_c_exits_130_with_one_line_and_keeps_the_checkpoints(tmp_path):
    workdir = str(tmp_path / "run")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "launch.main", "--config=configs/quickstart.py", f"--workdir={workdir}",
           "--config.job=train", "--config.train.num_epochs=30", "--config.train.batch_size=32",
           "--config.checkpoint.every_steps=5", "--config.hardware.latency_batch=0"]
    # started with SIGINT ignored, as `cmd &` in a script (CI) or nohup starts it: the CLI must re-arm
    # Ctrl-C. The shell's `trap '' INT` is inherited through exec (no preexec_fn: no fork of this process)
    cmd = ["bash", "-c", 'trap "" INT; exec "$@"', "bash", *cmd]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not _steps(os.path.join(workdir, "checkpoints")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    lines = [l for l in err.splitlines() if l.strip()]
    assert lines[-1].startswith("interrupted:") and "rerun the same command" in lines[-1], err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert "done:" not in out
    saved = _steps(os.path.join(workdir, "checkpoints"))
    state, meta = _restore(os.path.join(workdir, "checkpoints"))
    assert int(state.step) == max(saved) and "iterator" in meta



def test_sigterm_and_an_inherited_ignored_sigint_both_raise_keyboard_interrupt():
    from jaxcompress.cli import interrupt_on_signals
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a process started by `cmd &` in a script has it
        interrupt_on_signals()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), sig)
                time.sleep(5)  # the handler runs at the next bytecode; never reached
    finally:
        for s, h in before.items():
            signal.signal(s, h)

# ----------------------------------------------------------------------------- STAMP, search


class _PoisonedSampler:
    """A `TaskSampler` whose tasks of meta step `bad` (1-based) have NaN set features."""

    def __init__(self, sampler, bad: int):
        self.sampler, self.bad = sampler, bad

    def sample(self, step, num_tasks):
        tasks = self.sampler.sample(step, num_tasks)
        if step + 1 == self.bad:
            tasks = {**tasks, "set_x": np.full_like(tasks["set_x"], np.nan)}
        return tasks


def test_nan_in_stamp_meta_training_stops_at_that_meta_step(tmp_path):
    stamp, sampler, _ = _tiny_problem()  # tests/test_stamp.py's: set features are floats
    workdir = str(tmp_path / "meta")
    with pytest.raises(NonFiniteError, match=r"STAMP meta-training .* at meta step 5/6; the last good checkpoint, "
                                             r"step 4 in .*checkpoints, is kept") as info:
        meta_train(stamp, _PoisonedSampler(sampler, 5), num_steps=6, tasks_per_step=2, learning_rate=1e-3,
                   workdir=workdir, checkpoint_every=2, log_every=3)
    assert "\n" not in str(info.value)
    assert _steps(os.path.join(workdir, "checkpoints")) == [2, 4]
    # the kept checkpoint is intact (its checksums verified) and restores, finite
    with Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
        restored, meta = ckpt.restore_tree(None, step=4)
    assert int(restored["step"]) == 4 and meta == {"settings": {}}
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(restored["params"]))


def test_nan_in_a_search_iteration_stops_there_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    """A non-finite iteration 3 (injected into its result) stops the search before it is
    recorded; iteration 2's checkpoint stands and a rerun resumes from it."""
    env = Bandit([0.3, 0.6, 0.5])
    agent = DDPG(DDPGConfig(warmup_episodes=4, hidden=8, batch_size=4), OBS_DIM, env.num_steps)
    reward = make_reward_fn("acc")  # one object: the resumed search reuses the compiled iteration
    kw = dict(num_actors=4, episodes=16, seed=0, log_every=0, checkpoint_dir=str(tmp_path), checkpoint_every=1)
    original, calls = search_module._compiled_iteration, []

    def poisoned(spec, state, data, mesh=None):
        compiled, seconds = original(spec, state, data, mesh)

        def step(state, data):
            calls.append(1)
            state, records, metrics, finite = compiled(state, data)
            if len(calls) == 3:
                records = {**records, "reward": jnp.full_like(records["reward"], jnp.nan)}
                finite = jnp.asarray(False)
            return state, records, metrics, finite
        return step, seconds

    monkeypatch.setattr(search_module, "_compiled_iteration", poisoned)
    with pytest.raises(SearchDiverged, match=r"non-finite reward in episodes 9\.\.12 \(iteration 3 of 4\); the last "
                                             r"good checkpoint \(iteration 2\)") as info:
        run_search(env, agent, env.accuracy, reward, {}, **kw)
    assert isinstance(info.value, NonFiniteError) and "\n" not in str(info.value)
    assert _steps(str(tmp_path)) == [2]
    monkeypatch.setattr(search_module, "_compiled_iteration", original)
    resumed = run_search(env, agent, env.accuracy, reward, {}, **kw)
    assert len(resumed.history["reward"]) == 16 and int(resumed.state.episode) == 16
