"""Mixed precision (`train.dtype`) and batch prefetching (`train.prefetch`).

bfloat16 steps are checked against a hand-rolled reference (parameters and input cast
to bfloat16 by hand, the model applied, the loss on float32 logits) and against the
float32 step; float32 steps against a verbatim copy of the step before `compute_dtype`
existed (bit for bit). Prefetching is checked batch for batch against the plain
iterator, and fits killed or interrupted mid-run and resumed with prefetching on
against an uninterrupted fit without it (bit for bit).
"""
import os

import flax.linen as nn
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcompress import jobs
from jaxcompress.config import SCHEMA, get_config
from jaxcompress.data import BatchIterator, DevicePrefetcher, normalize
from jaxcompress.errors import ConfigError
from jaxcompress.layers import Dense
from jaxcompress.models import create_model
from jaxcompress.models.common import conv_bn, global_avg_pool
from jaxcompress.train import Recipe, create_train_state, fit, loop, make_eval_step, make_optimizer, make_train_step
from jaxcompress.train import steps as S

MEAN, STD = np.array([0.4], np.float32), np.array([0.3], np.float32)
BF16 = jnp.bfloat16


def exact_jit(fun):
    """`jax.jit` rounding every bfloat16 result to bfloat16: by default XLA may keep some in
    float32 (`xla_allow_excess_precision`), differently in differently fused programs, so
    two programs of the same math would differ by a bfloat16 rounding here and there."""
    return jax.jit(fun, compiler_options={"xla_allow_excess_precision": False})


class ConvBN(nn.Module):
    """conv3x3 -> BatchNorm -> ReLU -> global pool -> dense: a BatchNorm network in a few ops."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = conv_bn(x, 8, 3, train, name="c1", signed_input=True)
        return Dense(3, name="fc")(global_avg_pool(x))


def _batch(n, shape, seed=0, num_classes=3):
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, size=(n, *shape), dtype=np.uint8),
            "label": rng.integers(0, num_classes, size=n).astype(np.int32)}


def _state(model, shape, tx, seed=0):
    """A TrainState whose BatchNorm statistics are not the init's zeros / ones (so their
    update is not trivially checked)."""
    state = create_train_state(model, tx, shape, seed)
    rng = np.random.default_rng(seed + 1)
    stats = jax.tree.map(lambda s: jnp.asarray(np.abs(rng.normal(size=s.shape)) * 0.2 + 0.05, s.dtype),
                         state.batch_stats)
    return state.replace(batch_stats=stats)


def _train_step_before(mean, std):
    """`make_train_step(mean, std)` as it was before `compute_dtype` (verbatim, no teacher)."""

    def train_step(state, batch):
        x = normalize(batch["image"], mean, std)

        def loss_fn(params):
            logits, updates = state.apply_fn(state.variables(params), x, train=True, mutable=["batch_stats"])
            return S.cross_entropy(logits, batch["label"]).mean(), (logits, updates)

        (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        opt_updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, opt_updates),
                                  opt_state=opt_state, batch_stats=updates.get("batch_stats", state.batch_stats))
        return new_state, {"loss": loss, "accuracy": (logits.argmax(-1) == batch["label"]).mean()}

    return train_step


def _eval_step_before(mean, std):
    def eval_step(state, batch):
        logits = state.apply_fn(state.variables(), normalize(batch["image"], mean, std), train=False)
        weight = batch.get("mask", jnp.ones(batch["label"].shape, bool)).astype(jnp.float32)
        loss = S.cross_entropy(logits, batch["label"])
        correct = (logits.argmax(-1) == batch["label"]).astype(jnp.float32)
        return {"loss": (loss * weight).sum(), "correct": (correct * weight).sum(), "count": weight.sum()}

    return eval_step


def _assert_trees_equal(a, b):
    """Same structure, dtypes and shapes, bit-identical leaves."""
    chex.assert_trees_all_equal(a, b, strict=True)


def _float_dtypes(tree) -> set:
    return {np.dtype(x.dtype).name for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def _matmul_input_dtypes(jaxpr) -> list:
    """The input dtypes of every dot_general / convolution of `jaxpr` (sub-jaxprs included)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            found.append({np.dtype(v.aval.dtype).name for v in eqn.invars})
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    found += _matmul_input_dtypes(sub)
    return found


TX = make_optimizer(Recipe(num_epochs=1, learning_rate=0.1, schedule="constant"), 10)  # SGD, Nesterov 0.9, wd


@pytest.mark.parametrize("name", ["lenet300_100", "convbn"])
def test_float32_steps_are_bit_identical_to_the_steps_before(name):
    model, shape = ((create_model("lenet300_100", 3, widths=(16, 8)), (4, 4, 1)) if name == "lenet300_100"
                    else (ConvBN(), (6, 6, 1)))
    state, batch = _state(model, shape, TX), _batch(8, shape)
    before, before_metrics = jax.jit(_train_step_before(MEAN, STD))(state, batch)
    for step in (make_train_step(MEAN, STD), make_train_step(MEAN, STD, compute_dtype="float32")):
        new, metrics = jax.jit(step)(state, batch)
        _assert_trees_equal((new, metrics), (before, before_metrics))
    _assert_trees_equal(jax.jit(make_eval_step(MEAN, STD, compute_dtype="float32"))(state, batch),
                        jax.jit(_eval_step_before(MEAN, STD))(state, batch))


def test_bfloat16_step_keeps_float32_state_and_equals_the_hand_rolled_mixed_step():
    model, shape = ConvBN(), (6, 6, 1)
    state, batch = _state(model, shape, TX), _batch(16, shape, seed=1)
    new, metrics = exact_jit(make_train_step(MEAN, STD, compute_dtype="bfloat16"))(state, batch)

    # float32 master weights, optimizer state and BatchNorm statistics
    for tree in (new.params, new.opt_state, new.batch_stats):
        assert _float_dtypes(tree) == {"float32"}, tree
    assert metrics["loss"].dtype == jnp.float32

    # Hand-rolled: cast the parameters and the normalised input to bfloat16, apply the
    # model, loss on float32 logits; gradients w.r.t. the float32 parameters (through the
    # cast), then the same optimiser

    def hand_loss(params, image):
        x = normalize(image, MEAN, STD).astype(BF16)
        cast = jax.tree.map(lambda p: p.astype(BF16), params)
        logits, updates = model.apply({"params": cast, "batch_stats": state.batch_stats, "masks": state.masks}, x,
                                      train=True, mutable=["batch_stats"])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -logp[jnp.arange(16), batch["label"]].mean(), (logits, updates)

    (loss, (logits, updates)), grads = exact_jit(jax.value_and_grad(hand_loss, has_aux=True))(state.params,
                                                                                              batch["image"])
    assert logits.dtype == BF16 and _float_dtypes(grads) == {"float32"}
    assert _float_dtypes(updates["batch_stats"]) == {"float32"}  # Flax: float32 statistics of bfloat16 inputs
    hand_params = optax.apply_updates(state.params, TX.update(grads, state.opt_state, state.params)[0])
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new.params, hand_params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new.batch_stats,
                 updates["batch_stats"])

    # close to the float32 step (but not equal to it: the pass really ran in bfloat16)
    f32, f32_metrics = jax.jit(make_train_step(MEAN, STD))(state, batch)
    np.testing.assert_allclose(metrics["loss"], f32_metrics["loss"], rtol=2e-2)
    assert float(metrics["loss"]) != float(f32_metrics["loss"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=5e-2, atol=5e-3), new.params, f32.params)
    # every matrix product and convolution reads bfloat16: conv and dense forward; dense
    # input and weight gradients, conv weight gradient backward
    products = _matmul_input_dtypes(jax.make_jaxpr(make_train_step(MEAN, STD, compute_dtype="bfloat16"))(
        state, batch).jaxpr)
    assert len(products) == 5 and all(p == {"bfloat16"} for p in products), products


def test_bfloat16_eval_step_equals_the_hand_rolled_mixed_forward():
    model, shape = ConvBN(), (6, 6, 1)
    state, batch = _state(model, shape, TX, seed=2), _batch(16, shape, seed=3)
    sums = jax.device_get(jax.jit(make_eval_step(MEAN, STD, compute_dtype="bfloat16"))(state, batch))
    variables = {**state.variables(), "params": jax.tree.map(lambda p: p.astype(BF16), state.params)}
    forward = jax.jit(lambda v, image: model.apply(v, normalize(image, MEAN, STD).astype(BF16), train=False))
    logits = forward(variables, batch["image"]).astype(jnp.float32)
    logp = np.asarray(jax.nn.log_softmax(logits))
    np.testing.assert_allclose(sums["loss"], -logp[np.arange(16), batch["label"]].sum(), rtol=1e-5)
    assert float(sums["correct"]) == float((np.asarray(logits).argmax(-1) == batch["label"]).sum())
    f32 = jax.device_get(jax.jit(make_eval_step(MEAN, STD))(state, batch))
    np.testing.assert_allclose(sums["loss"], f32["loss"], rtol=2e-2)


def test_bfloat16_distillation_step_is_close_to_the_float32_one():
    """The teacher runs in the compute dtype too; the distillation loss is taken on float32
    logits of both networks."""
    student, teacher = create_model("lenet300_100", 3, widths=(16, 8)), create_model("lenet300_100", 3, widths=(12, 5))
    state, batch = _state(student, (4, 4, 1), TX), _batch(16, (4, 4, 1), seed=5)
    t_vars = create_train_state(teacher, TX, (4, 4, 1), 7).variables()
    kw = dict(teacher_apply=teacher.apply, distill_weight=0.7, temperature=3.0)
    new, metrics = jax.jit(make_train_step(MEAN, STD, compute_dtype="bfloat16", **kw))(state, batch, t_vars)
    f32, f32_metrics = jax.jit(make_train_step(MEAN, STD, **kw))(state, batch, t_vars)
    assert _float_dtypes((new.params, new.opt_state)) == {"float32"} and metrics["loss"].dtype == jnp.float32
    np.testing.assert_allclose(metrics["loss"], f32_metrics["loss"], rtol=2e-2)
    assert float(metrics["loss"]) != float(f32_metrics["loss"])


def test_unknown_compute_dtype_is_refused():
    with pytest.raises(ValueError, match="compute_dtype='float16'"):
        make_train_step(MEAN, STD, compute_dtype="float16")
    with pytest.raises(ValueError, match="compute_dtype='int8'"):
        make_eval_step(MEAN, STD, compute_dtype="int8")


# ------------------------------------------------------------------------------ prefetching


@pytest.mark.parametrize("size", [0, 1, 2, 5])
def test_prefetcher_yields_the_plain_iterators_batches_and_positions(size):
    x, y = np.arange(30 * 2, dtype=np.uint8).reshape(30, 2, 1, 1), np.arange(30, dtype=np.int32)
    mesh = S.make_mesh()
    plain = BatchIterator(x, y, batch_size=4, seed=3)  # 7 batches per epoch, so 20 batches span 3 epochs
    wrapped = BatchIterator(x, y, batch_size=4, seed=3)
    wrapped.set_state({"epoch": 0, "index": 2})
    plain.set_state({"epoch": 0, "index": 2})
    pf = DevicePrefetcher(wrapped, S.batch_sharded(mesh), size, limit=20)
    for i in range(20):
        got, want = next(pf), next(plain)
        assert all(isinstance(v, jax.Array) for v in got.values())
        _assert_trees_equal(jax.device_get(got), want)
        # the position and count of the batches handed out, never of those in the buffer
        assert pf.get_state() == plain.get_state() and pf.examples_read == plain.examples_read == 4 * (i + 1)
        assert wrapped.examples_read == 4 * min(i + 1 + size, 20)
        if i == 9:  # a resume from the prefetcher's position continues with the same batches
            resumed = BatchIterator(x, y, batch_size=4, seed=3)
            resumed.set_state(pf.get_state())
            _assert_trees_equal(next(resumed), _peek(plain))
    with pytest.raises(StopIteration):  # `limit` batches in all: nothing drawn past the last step
        next(pf)
    assert wrapped.examples_read == 80


def _peek(it: BatchIterator) -> dict:
    """The next batch of `it`, leaving `it` where it was."""
    state, read = it.get_state(), it.examples_read
    batch = next(it)
    it.set_state(state)
    it.examples_read = read
    return batch


@pytest.fixture(scope="module")
def tiny_experiment():
    """LeNet-300-100 on the embedded 8x8 digits (1238 training images: 19 steps of 64 per
    epoch); one Experiment, so every fit below shares its compiled steps."""
    from configs import quickstart
    from jaxcompress.train import setup_experiment
    c = quickstart.get_config()
    c.data.image_size = 8
    c.model.name = "lenet300_100"
    exp = setup_experiment(c)
    recipe = Recipe(num_epochs=2, learning_rate=0.05, batch_size=64, eval_batch_size=200, checkpoint_every=5)
    state = create_train_state(exp.model, make_optimizer(recipe, 1), exp.input_shape, 0)
    return exp, recipe, state


class _Killed(Exception):
    pass


def _stop_after(monkeypatch, n: int, stop):
    """The training steps of the next fits raise `stop` instead of running from the
    (n+1)-th on; returns a function putting the real steps back."""
    original, calls = loop._train_step, []

    def stopping(*args, **kwargs):
        step, extra = original(*args, **kwargs)

        def wrapped(*a):
            calls.append(1)
            if len(calls) > n:
                raise stop
            return step(*a)
        return wrapped, extra

    monkeypatch.setattr(loop, "_train_step", stopping)
    return lambda: monkeypatch.setattr(loop, "_train_step", original)


def _saved_steps(directory):
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


@pytest.mark.parametrize("every, stop, after, resumed_at", [
    (5, _Killed, 12, 10),              # killed: from the mid-epoch checkpoint of step 10
    (0, _Killed, 23, 19),              # killed: from epoch 1's end checkpoint
    (5, KeyboardInterrupt, 12, 12),    # Ctrl-C: from the checkpoint the interrupt saves
])
def test_resumed_fit_with_prefetch_equals_an_uninterrupted_fit(tiny_experiment, tmp_path, monkeypatch, every, stop,
                                                               after, resumed_at):
    exp, recipe, state = tiny_experiment
    recipe = recipe.replace(checkpoint_every=every)
    ref, ref_info = fit(state, exp, recipe.replace(prefetch=0), str(tmp_path / "plain"))
    workdir = str(tmp_path / "run")
    restore = _stop_after(monkeypatch, after, stop)
    with pytest.raises(stop):
        fit(state, exp, recipe.replace(prefetch=2), workdir)
    restore()
    assert _saved_steps(os.path.join(workdir, "checkpoints"))[-1] == resumed_at
    got, info = fit(state, exp, recipe.replace(prefetch=2), workdir)
    assert int(got.step) == int(ref.step) == 38
    _assert_trees_equal((got.params, got.batch_stats, got.opt_state), (ref.params, ref.batch_stats, ref.opt_state))
    assert info["examples_read_per_process"] == [(38 - resumed_at) * 64]
    assert ref_info["examples_read_per_process"] == [38 * 64]
    assert info["best_val_accuracy"] == ref_info["best_val_accuracy"]


def test_bfloat16_fit_keeps_float32_weights_and_compiles_its_own_steps(tiny_experiment, tmp_path):
    exp, recipe, state = tiny_experiment
    new, info = fit(state, exp, recipe.replace(num_epochs=1, dtype="bfloat16"), str(tmp_path / "bf16"))
    assert _float_dtypes((new.params, new.opt_state)) == {"float32"}
    assert info["best_val_accuracy"] > 0.5  # it learned (10 classes)
    keys = [k for k in exp.steps if k[0] in ("train", "eval")]
    assert ("eval", "bfloat16") in keys and any(k[0] == "train" and k[-1] == "bfloat16" for k in keys)


# ------------------------------------------------------------------------------------ config


def test_dtype_and_prefetch_are_config_fields_refused_in_one_line_before_any_work(tmp_path):
    specs = dict(SCHEMA.walk())
    assert set(specs["train.dtype"].choices()) == set(S.COMPUTE_DTYPES)
    c = get_config()
    c.train.dtype, c.train.prefetch = "bfloat16", 0
    assert (Recipe.from_config(c).dtype, Recipe.from_config(c).prefetch) == ("bfloat16", 0)
    for field, value, allowed in (("dtype", "float16", "one of float32, bfloat16"), ("prefetch", -1, "in 0..64")):
        c = get_config()
        c.train[field] = value
        workdir = tmp_path / field
        with pytest.raises(ConfigError, match=f"^train.{field}=") as e:
            jobs.run(c, str(workdir))
        assert "\n" not in str(e.value) and allowed in str(e.value), str(e.value)
        assert not workdir.exists()
