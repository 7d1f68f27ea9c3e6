"""Tests for jaxcompress.train: optimisers and schedules, loss, steps, checkpoints.

Numbers are checked against hand computation (NumPy log-softmax, the SGD / Adam
update formulas, the schedule formulas) rather than against the library itself.
"""
import functools
import gc
import glob
import math
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from jaxcompress.models import create_model
from jaxcompress.train import (Checkpointer, CheckpointError, TrainState, create_train_state, cross_entropy,
                               distillation_loss, make_eval_step, make_optimizer, make_train_step)
from jaxcompress.train.checkpoint import state_tree
from jaxcompress.train.optim import learning_rate_schedule

# Orbax leaves un-awaited read coroutines behind when a corrupt checkpoint fails to
# load; the corrupt-checkpoint test collects them itself so they are reported (and
# ignored) here rather than during whichever test runs next.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def train_cfg(**overrides) -> ml_collections.ConfigDict:
    cfg = default.get_config().train
    cfg.update(overrides)
    return cfg


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_normalize(x_uint8, mean, std):
    return (np.asarray(x_uint8, np.float64) / 255.0 - mean) / std


def assert_trees_equal(a, b):
    """Same structure, same dtypes and bit-identical leaves."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------- schedules


def _lrs_through_optimizer(cfg, steps_per_epoch, num_steps):
    """Learning rate actually used by `make_optimizer` at steps 0..num_steps-1:
    SGD without momentum or decay on a scalar with gradient 1 moves it by -lr(t)."""
    tx = make_optimizer(cfg, steps_per_epoch)
    p = jnp.zeros(())
    update = jax.jit(tx.update)
    opt_state = tx.init(p)
    lrs = []
    for _ in range(num_steps):
        u, opt_state = update(jnp.ones(()), opt_state, p)
        lrs.append(-float(u))
    return np.array(lrs)


def _sgd_plain(**kw):
    return train_cfg(**{**dict(optimizer="sgd", momentum=0.0, nesterov=False, weight_decay=0.0,
                               learning_rate=0.1, num_epochs=4), **kw})


def test_cosine_schedule_without_warmup():
    spe, total = 10, 40
    lrs = _lrs_through_optimizer(_sgd_plain(schedule="cosine", warmup_epochs=0.0), spe, total + 3)
    hand = [0.1 * 0.5 * (1 + math.cos(math.pi * min(t, total) / total)) for t in range(total + 3)]
    np.testing.assert_allclose(lrs, hand, rtol=1e-5, atol=1e-7)
    # A few values by hand: start, quarter, half, end (and it stays at 0 afterwards).
    np.testing.assert_allclose(lrs[[0, 10, 20, 40, 42]], [0.1, 0.05 * (1 + math.sqrt(0.5)), 0.05, 0.0, 0.0],
                               atol=1e-7)


@pytest.mark.parametrize("warmup_epochs, warmup_steps", [(1.0, 10), (0.5, 5)])
def test_cosine_schedule_with_linear_warmup(warmup_epochs, warmup_steps):
    spe, total = 10, 40
    lrs = _lrs_through_optimizer(_sgd_plain(schedule="cosine", warmup_epochs=warmup_epochs), spe, total + 1)
    hand = [0.1 * t / warmup_steps if t < warmup_steps else
            0.1 * 0.5 * (1 + math.cos(math.pi * (t - warmup_steps) / (total - warmup_steps)))
            for t in range(total + 1)]
    np.testing.assert_allclose(lrs, hand, rtol=1e-5, atol=1e-7)
    assert lrs[0] == 0.0
    np.testing.assert_allclose(lrs[warmup_steps], 0.1, rtol=1e-6)  # the peak, reached after warm-up
    np.testing.assert_allclose(lrs[total], 0.0, atol=1e-7)


def test_step_schedule():
    spe = 10
    cfg = _sgd_plain(schedule="step", decay_epochs=(2, 3), decay_factor=0.1)
    lrs = _lrs_through_optimizer(cfg, spe, 45)
    hand = np.array([0.1] * 20 + [0.01] * 10 + [0.001] * 15)
    np.testing.assert_allclose(lrs, hand, rtol=1e-5)
    # Fractional decay epochs are converted to steps by int(epoch * steps_per_epoch).
    sched = learning_rate_schedule(_sgd_plain(schedule="step", decay_epochs=(1.5,), decay_factor=0.5), spe)
    np.testing.assert_allclose([float(sched(14)), float(sched(15))], [0.1, 0.05], rtol=1e-6)


def test_constant_schedule():
    lrs = _lrs_through_optimizer(_sgd_plain(schedule="constant", learning_rate=0.03), 10, 45)
    np.testing.assert_allclose(lrs, np.full(45, 0.03), rtol=1e-6)


# ----------------------------------------------------------------------------- optimizers


def _tiny_tree():
    params = {"dense": {"kernel": jnp.array([[1.0, -2.0, 3.0], [0.5, 0.25, -1.0]]),
                        "bias": jnp.array([1.0, 2.0, -3.0])},
              "bn": {"scale": jnp.array([2.0, -1.0, 0.5])}}
    grads1 = {"dense": {"kernel": jnp.array([[0.1, 0.2, -0.3], [0.0, 1.0, 0.5]]),
                        "bias": jnp.array([0.3, -0.1, 0.2])},
              "bn": {"scale": jnp.array([-0.2, 0.4, 0.1])}}
    grads2 = jax.tree.map(lambda g: -2.0 * g + 0.05, grads1)
    return params, grads1, grads2


def _np(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def test_sgd_weight_decay_only_on_kernels():
    lr, wd = 0.1, 0.01
    params, g, _ = _tiny_tree()
    tx = make_optimizer(_sgd_plain(schedule="constant", learning_rate=lr, weight_decay=wd), 10)
    updates, _ = tx.update(g, tx.init(params), params)
    p, g = _np(params), _np(g)
    hand = {"dense": {"kernel": -lr * (g["dense"]["kernel"] + wd * p["dense"]["kernel"]),
                      "bias": -lr * g["dense"]["bias"]},  # ndim 1: no decay
            "bn": {"scale": -lr * g["bn"]["scale"]}}
    jax.tree.map(lambda u, h: np.testing.assert_allclose(u, h, rtol=1e-6, atol=1e-9), updates, hand)


def test_sgd_nesterov_momentum_two_steps():
    lr, wd, mu = 0.1, 0.01, 0.9
    params, g1, g2 = _tiny_tree()
    tx = make_optimizer(train_cfg(optimizer="sgd", momentum=mu, nesterov=True, weight_decay=wd,
                                  learning_rate=lr, schedule="constant"), 10)
    state = tx.init(params)
    u1, state = tx.update(g1, state, params)
    params1 = jax.tree.map(lambda a, b: a + b, params, u1)
    u2, _ = tx.update(g2, state, params1)

    def decayed(g, p):
        return {"dense": {"kernel": g["dense"]["kernel"] + wd * p["dense"]["kernel"], "bias": g["dense"]["bias"]},
                "bn": {"scale": g["bn"]["scale"]}}

    p0, g1, g2 = _np(params), _np(g1), _np(g2)
    d1 = decayed(g1, p0)
    m1 = d1                                                       # m_1 = g_1
    h1 = jax.tree.map(lambda d, m: -lr * (d + mu * m), d1, m1)    # Nesterov: -lr (g + mu m)
    p1 = jax.tree.map(lambda a, b: a + b, p0, h1)
    d2 = decayed(g2, p1)
    m2 = jax.tree.map(lambda d, m: d + mu * m, d2, m1)
    h2 = jax.tree.map(lambda d, m: -lr * (d + mu * m), d2, m2)
    jax.tree.map(lambda u, h: np.testing.assert_allclose(u, h, rtol=1e-5, atol=1e-8), u1, h1)
    jax.tree.map(lambda u, h: np.testing.assert_allclose(u, h, rtol=1e-5, atol=1e-8), u2, h2)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_first_step_weight_decay_on_kernels_only(name):
    # First Adam step: m_hat = g, v_hat = g^2, so the direction is g / (|g| + eps).
    lr, wd, eps = 0.01, 0.03, 1e-8
    params, g, _ = _tiny_tree()
    tx = make_optimizer(train_cfg(optimizer=name, weight_decay=wd, learning_rate=lr, schedule="constant"), 10)
    updates, _ = tx.update(g, tx.init(params), params)
    p, g = _np(params), _np(g)
    adam_dir = lambda x: x / (np.abs(x) + eps)
    if name == "adam":  # L2: decay added to the gradient before Adam's normalisation
        kernel = -lr * adam_dir(g["dense"]["kernel"] + wd * p["dense"]["kernel"])
    else:  # AdamW: decoupled decay added after it
        kernel = -lr * (adam_dir(g["dense"]["kernel"]) + wd * p["dense"]["kernel"])
    hand = {"dense": {"kernel": kernel, "bias": -lr * adam_dir(g["dense"]["bias"])},
            "bn": {"scale": -lr * adam_dir(g["bn"]["scale"])}}
    jax.tree.map(lambda u, h: np.testing.assert_allclose(u, h, rtol=1e-5, atol=1e-9), updates, hand)


# ----------------------------------------------------------------------------- loss


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_cross_entropy_matches_numpy_log_softmax(smoothing):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 5)).astype(np.float32) * 3
    labels = rng.integers(0, 5, size=7)
    logp = np_log_softmax(logits)
    targets = np.full((7, 5), smoothing / 5)
    targets[np.arange(7), labels] += 1.0 - smoothing
    hand = -(targets * logp).sum(-1)
    got = cross_entropy(jnp.asarray(logits), jnp.asarray(labels), smoothing)
    assert got.shape == (7,)
    np.testing.assert_allclose(got, hand, rtol=1e-5, atol=1e-6)
    if smoothing == 0.0:
        np.testing.assert_allclose(got, -logp[np.arange(7), labels], rtol=1e-5)
    # Checked by hand on one example: logits (0, ln 3) -> p = (1/4, 3/4).
    one = cross_entropy(jnp.array([[0.0, math.log(3.0)]]), jnp.array([1]), smoothing)
    np.testing.assert_allclose(one, [-(1 - smoothing / 2) * math.log(0.75) - smoothing / 2 * math.log(0.25)],
                               rtol=1e-6)


# ----------------------------------------------------------------------------- steps


IMG = (4, 4, 1)  # lenet300_100 flattens its input: a 4x4 image keeps it tiny
MEAN, STD = np.array([0.4], np.float32), np.array([0.3], np.float32)


def _batch(n, seed=0, num_classes=3, shape=IMG):
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, size=(n, *shape), dtype=np.uint8),
            "label": rng.integers(0, num_classes, size=n).astype(np.int32)}


def _np_init(model, input_shape, seed):
    """Variables of `model` drawn with NumPy (He-style normal kernels, small random
    biases, all-ones masks): no XLA compilation of `model.init`, which is slow on CPU."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *input_shape))))
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        if "'masks'" in name:
            return jnp.ones(s.shape, s.dtype)
        if name.endswith("['kernel']"):
            return jnp.asarray(rng.normal(size=s.shape) * np.sqrt(2.0 / np.prod(s.shape[:-1])), s.dtype)
        return jnp.asarray(rng.normal(size=s.shape) * 0.1, s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.lru_cache(maxsize=None)
def _tiny_model_and_variables(seed):
    model = create_model("lenet300_100", 3, widths=(8, 6))
    return model, _np_init(model, IMG, seed)


def _tiny_state(tx, seed=0):
    model, variables = _tiny_model_and_variables(seed)
    return model, create_train_state(model, tx, IMG, seed, variables=variables)


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_train_step_equals_hand_rolled_sgd(jit, smoothing):
    lr, wd = 0.05, 1e-3
    tx = make_optimizer(_sgd_plain(schedule="constant", learning_rate=lr, weight_decay=wd), 10)
    model, state = _tiny_state(tx)
    batch = _batch(16)
    step = make_train_step(MEAN, STD, augment=False, label_smoothing=smoothing)
    step = jax.jit(step) if jit else step
    new_state, metrics = step(state, batch)

    # Hand-rolled: NumPy normalisation, NumPy-built smoothed targets, jax.grad, the SGD formula.
    x = jnp.asarray(np_normalize(batch["image"], MEAN, STD), jnp.float32)
    targets = np.full((16, 3), smoothing / 3)
    targets[np.arange(16), batch["label"]] += 1 - smoothing

    def loss_fn(params):
        logits = model.apply({"params": params, "masks": state.masks}, x)
        return -(targets * jax.nn.log_softmax(logits)).sum(-1).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    hand_params = jax.tree.map(lambda p, g: p - lr * (g + (wd * p if p.ndim > 1 else 0.0)), state.params, grads)

    assert int(new_state.step) == 1
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], np.mean(np.argmax(logits, -1) == batch["label"]))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), new_state.params,
                 hand_params)
    # The update really moved the parameters (the comparison above is not vacuous).
    assert max(float(jnp.abs(a - b).max()) for a, b in
               zip(jax.tree.leaves(new_state.params), jax.tree.leaves(state.params))) > 1e-4


def test_distillation_loss_and_gradient_equal_hinton_formulas():
    """T^2 KL(softmax(t/T) || softmax(s/T)) against NumPy, and its gradient against
    Hinton et al.'s T (q - p) (q, p: the student's and teacher's softened softmax)."""
    rng = np.random.default_rng(0)
    s, t, T = rng.normal(size=(5, 7)) * 3, rng.normal(size=(5, 7)) * 3, 2.5
    log_p, log_q = np_log_softmax(t / T), np_log_softmax(s / T)
    hand = T * T * (np.exp(log_p) * (log_p - log_q)).sum(-1)
    got = distillation_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), T)
    np.testing.assert_allclose(got, hand, rtol=1e-5)
    assert hand.min() > 0.01  # distinct logits: the loss is not trivially zero
    np.testing.assert_allclose(distillation_loss(jnp.asarray(t), jnp.asarray(t), T), 0.0, atol=1e-6)
    grad = jax.grad(lambda z: distillation_loss(z, jnp.asarray(t, jnp.float32), T).sum())(jnp.asarray(s, jnp.float32))
    np.testing.assert_allclose(grad, T * (np.exp(log_q) - np.exp(log_p)), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("weight", [0.0, 0.7, 1.0])
def test_train_step_with_teacher_equals_hand_rolled_distillation(weight):
    """(1 - w) CE + w T^2 KL against a teacher (another network: other shapes are
    allowed) on the same inputs, then the SGD formula; the teacher is an argument of
    the jitted step (replicated), not a constant baked into it."""
    lr, T = 0.1, 3.0
    tx = make_optimizer(_sgd_plain(schedule="constant", learning_rate=lr, weight_decay=0.0), 10)
    model, state = _tiny_state(tx)
    teacher = create_model("lenet300_100", 3, widths=(12, 5))
    t_vars = _np_init(teacher, IMG, seed=7)
    batch = _batch(16, seed=2)
    step = jax.jit(make_train_step(MEAN, STD, teacher_apply=teacher.apply, distill_weight=weight, temperature=T))
    new_state, metrics = step(state, batch, t_vars)

    x = jnp.asarray(np_normalize(batch["image"], MEAN, STD), jnp.float32)
    t_logits = np.asarray(teacher.apply(t_vars, x), np.float64)
    p_t = np.exp(np_log_softmax(t_logits / T))

    def loss_fn(params):
        logits = model.apply({"params": params, "masks": state.masks}, x)
        ce = -jax.nn.log_softmax(logits)[jnp.arange(16), batch["label"]].mean()
        kd = (T * T * (p_t * (jnp.log(p_t) - jax.nn.log_softmax(logits / T))).sum(-1)).mean()
        return (1 - weight) * ce + weight * kd

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    jax.tree.map(lambda a, p, g: np.testing.assert_allclose(a, p - lr * g, rtol=1e-5, atol=1e-7),
                 new_state.params, state.params, grads)
    if weight == 0.0:  # no pull from the teacher: the plain step
        plain, _ = jax.jit(make_train_step(MEAN, STD))(state, batch)
        assert_trees_equal(new_state.params, plain.params)


def test_eval_step_counts_only_real_examples():
    tx = make_optimizer(_sgd_plain(schedule="constant"), 10)
    model, state = _tiny_state(tx, seed=3)
    batch = _batch(8, seed=4)
    x = np_normalize(batch["image"], MEAN, STD).astype(np.float32)
    logits = np.asarray(model.apply(state.variables(), jnp.asarray(x)))
    pred = logits.argmax(-1)
    real = np.array([True] * 5 + [False] * 3)
    # Padded rows get labels their prediction matches, so counting them would change `correct`.
    labels = pred.astype(np.int32).copy()
    labels[[1, 3, 4]] = (pred[[1, 3, 4]] + 1) % 3  # real rows: only 0 and 2 are right
    batch = {"image": batch["image"], "label": labels, "mask": real}

    for step in (make_eval_step(MEAN, STD), jax.jit(make_eval_step(MEAN, STD))):
        sums = jax.device_get(step(state, batch))
        assert float(sums["count"]) == 5.0
        assert float(sums["correct"]) == 2.0
        hand_loss = -np_log_softmax(logits)[np.arange(5), labels[:5]].sum()
        np.testing.assert_allclose(sums["loss"], hand_loss, rtol=1e-5)

    # No mask: every row counts.
    sums = jax.device_get(make_eval_step(MEAN, STD)(state, {"image": batch["image"], "label": labels}))
    assert float(sums["count"]) == 8.0 and float(sums["correct"]) == 5.0


# LeNet-5 with compression decisions at real layers: a channel mask everywhere
# (from init), an element mask on conv2's kernel and bit widths at three layers.
# One optimizer and one jitted step serve every LeNet-5 test (compiled once).
LENET_SHAPE = (28, 28, 1)
LENET_MEAN, LENET_STD = np.array([0.1], np.float32), np.array([0.3], np.float32)


@functools.lru_cache(maxsize=None)
def _lenet5():
    model = create_model("lenet5", 10)
    tx = make_optimizer(train_cfg(learning_rate=0.1, schedule="constant"), 10)  # SGD Nesterov 0.9, wd 5e-4
    variables = _np_init(model, LENET_SHAPE, 0)
    step = jax.jit(make_train_step(LENET_MEAN, LENET_STD))
    apply = jax.jit(lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"]))
    return model, tx, variables, step, apply


def _lenet5_state(masks_fn, quant_values=(4.0, 8.0, 2.0, 5.0, 8.0)):
    model, tx, variables, _, _ = _lenet5()
    state = create_train_state(model, tx, LENET_SHAPE, 0, variables=variables)
    masks = {k: dict(v) for k, v in state.masks.items()}
    masks["conv2"]["kernel"] = jnp.ones_like(state.params["conv2"]["kernel"])
    masks = masks_fn(masks)
    b = [jnp.float32(v) for v in quant_values]
    quant = {"conv2": {"bits_w": b[0], "bits_a": b[1]}, "fc1": {"bits_w": b[2], "bits_a": b[3]},
             "fc3": {"bits_w": b[4]}}
    return state.replace(masks=masks, quant=quant)


def _lenet5_x(n, seed):
    return jnp.asarray(np_normalize(_batch(n, seed, 10, LENET_SHAPE)["image"], LENET_MEAN, LENET_STD),
                       jnp.float32)


def test_masked_channels_stay_exactly_zero_during_training():
    model, _, _, step, apply = _lenet5()

    def set_masks(m):
        m["conv1"]["channel"] = m["conv1"]["channel"].at[2].set(0.0)
        m["fc1"]["channel"] = m["fc1"]["channel"].at[np.array([0, 5, 77])].set(0.0)
        return m

    state = _lenet5_state(set_masks, quant_values=(8.0, 8.0, 8.0, 8.0, 8.0))
    masks0 = jax.tree.map(np.array, state.masks)
    quant0 = jax.tree.map(np.array, state.quant)
    bias0 = np.array(state.params["conv1"]["bias"])

    kernel0 = np.array(state.params["conv1"]["kernel"], np.float64)
    fc1_0 = np.array(state.params["fc1"]["kernel"], np.float64)
    for i in range(3):
        state, _ = step(state, _batch(32, seed=10 + i, num_classes=10, shape=LENET_SHAPE))
    assert int(state.step) == 3
    assert_trees_equal(state.masks, masks0)
    assert_trees_equal(state.quant, quant0)

    # A masked channel gets no gradient from the loss: its kernel slice moves by weight
    # decay alone (SGD, Nesterov momentum mu, by hand), its bias (no decay) not at all.
    def decay_only(p, lr=0.1, wd=5e-4, mu=0.9):
        m = 0.0
        for _ in range(3):
            g = wd * p
            m = g + mu * m
            p = p - lr * (g + mu * m)
        return p

    new_kernel = np.asarray(state.params["conv1"]["kernel"])
    np.testing.assert_allclose(new_kernel[..., 2], decay_only(kernel0[..., 2]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(state.params["fc1"]["kernel"])[:, [0, 5, 77]],
                               decay_only(fc1_0[:, [0, 5, 77]]), rtol=1e-6)
    assert np.abs(new_kernel[..., [0, 1, 3, 4, 5]] - kernel0[..., [0, 1, 3, 4, 5]]).max() > 1e-3
    new_bias = np.asarray(state.params["conv1"]["bias"])
    assert new_bias[2] == bias0[2]
    assert np.abs(new_bias[[0, 1, 3, 4, 5]] - bias0[[0, 1, 3, 4, 5]]).min() > 0

    # The masked channels produce exact zeros.
    x = _lenet5_x(32, seed=1)
    _, inter = apply(state.variables(), x)
    conv1 = np.asarray(inter["intermediates"]["conv1"]["__call__"][0])
    fc1 = np.asarray(inter["intermediates"]["fc1"]["__call__"][0])
    assert np.all(conv1[..., 2] == 0.0)
    assert np.all(fc1[:, [0, 5, 77]] == 0.0)
    assert np.abs(conv1[..., [0, 1, 3, 4, 5]]).max() > 0


# ----------------------------------------------------------------------------- checkpoints


def _compressed_state(seed=0):
    """A LeNet-5 TrainState after one step, with random 0/1 channel and element masks
    and bit widths at real layers."""
    model, tx, _, step, _ = _lenet5()
    rng = np.random.default_rng(seed + 100)
    state = _lenet5_state(lambda m: jax.tree.map(
        lambda a: jnp.asarray(rng.integers(0, 2, a.shape), jnp.float32), m))
    state, _ = step(state, _batch(16, seed=seed, num_classes=10, shape=LENET_SHAPE))
    return model, tx, state


def _template_like(state):
    """Same structure as `state`, different values in every leaf."""
    return jax.tree.map(lambda a: (a + 1).astype(a.dtype), state)


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    model, tx, state = _compressed_state()
    meta = {"iterator": {"epoch": 3, "index": 7}, "best_val_accuracy": 0.8125, "note": "x"}
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(state, meta)
    ckpt.save(state, {"ignored": True})  # same step again: a no-op, not an error
    ckpt.close()
    assert os.path.isdir(tmp_path / "ckpt" / "1")

    template = _template_like(state)
    # The template really differs, so equality below is not vacuous.
    assert not np.array_equal(template.params["conv1"]["kernel"], state.params["conv1"]["kernel"])
    assert not np.array_equal(template.masks["conv2"]["kernel"], state.masks["conv2"]["kernel"])

    reader = Checkpointer(str(tmp_path / "ckpt"))
    assert reader.latest_step() == 1
    restored, restored_meta = reader.restore(template)
    reader.close()
    assert isinstance(restored, TrainState)
    assert restored_meta == meta
    assert_trees_equal(state_tree(restored), state_tree(state))
    assert restored.quant["fc1"]["bits_w"] == 2.0 and restored.quant["conv2"]["bits_a"] == 8.0
    # The restored state computes what the saved one computes (masks and bits in force).
    _, _, _, _, apply = _lenet5()
    x = _lenet5_x(4, seed=5)
    np.testing.assert_array_equal(apply(restored.variables(), x)[0], apply(state.variables(), x)[0])


def test_checkpoint_no_checkpoint_raises(tmp_path):
    model, tx, state = _compressed_state()
    ckpt = Checkpointer(str(tmp_path / "empty"))
    assert ckpt.latest_step() is None
    with pytest.raises(CheckpointError, match="no checkpoint"):
        ckpt.restore(state)
    ckpt.close()


@pytest.fixture(scope="module")
def saved_lenet5(tmp_path_factory):
    model, tx, state = _compressed_state()
    directory = str(tmp_path_factory.mktemp("saved") / "ckpt")
    ckpt = Checkpointer(directory)
    ckpt.save(state, {"best_val_accuracy": 0.5})
    ckpt.close()
    return directory, model, tx, state


def _one_line_checkpoint_error(directory, template):
    reader = Checkpointer(directory)
    try:
        with pytest.raises(CheckpointError) as excinfo:
            reader.restore(template)
    finally:
        reader.close()
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.strip() == msg
    assert "step 1" in msg and directory in msg
    return msg


@pytest.mark.parametrize("name, widths", [("lenet300_100", None), ("lenet5", (6, 16, 120, 80))])
def test_restore_into_other_model_raises_checkpoint_error(saved_lenet5, name, widths):
    directory, _, tx, state = saved_lenet5
    other = create_model(name, 10, widths=widths)
    shapes = jax.eval_shape(lambda: other.init(jax.random.PRNGKey(0), jnp.zeros((1, *LENET_SHAPE))))
    variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    template = create_train_state(other, tx, LENET_SHAPE, 0, variables=variables)
    if name == "lenet5":  # same layers and decisions, one layer narrower
        masks = {k: dict(v) for k, v in template.masks.items()}
        masks["conv2"]["kernel"] = jnp.ones_like(template.params["conv2"]["kernel"])
        template = template.replace(masks=masks, quant=state.quant)
    _one_line_checkpoint_error(directory, template)


def _largest(pattern):
    files = [f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f)]
    assert files, pattern
    return max(files, key=os.path.getsize)


@pytest.mark.parametrize("how", ["truncate_array_data", "overwrite_metadata", "overwrite_meta_json"])
def test_corrupt_checkpoint_raises_checkpoint_error(saved_lenet5, tmp_path, how):
    src, model, tx, state = saved_lenet5
    directory = str(tmp_path / "ckpt")
    shutil.copytree(src, directory)
    step_dir = os.path.join(directory, "1")
    if how == "truncate_array_data":  # the biggest data file holds the parameters
        victim = _largest(os.path.join(step_dir, "state", "**", "d", "*"))
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)
    elif how == "overwrite_metadata":
        with open(os.path.join(step_dir, "state", "_METADATA"), "wb") as f:
            f.write(b"\x00garbage")
    else:
        with open(os.path.join(step_dir, "meta", "metadata"), "wb") as f:
            f.write(b"{not json")
    _one_line_checkpoint_error(directory, _template_like(state))
    gc.collect()  # Orbax's abandoned read coroutines (module comment)


def test_fits_and_evaluations_of_one_experiment_compile_each_step_once(tmp_path):
    """Two fits of the same network (a gradual-pruning step's pattern) and the evaluations
    around them reuse one jitted train step and one eval step: one compiled program each
    (`Experiment.compiled`); a fit with other static settings gets its own."""
    from configs import quickstart
    from jaxcompress.train import Recipe, fit, make_optimizer, setup_experiment
    from jaxcompress.train.loop import make_eval_fn
    c = quickstart.get_config()
    c.data.image_size = 8
    c.model.name = "lenet300_100"
    exp = setup_experiment(c)
    recipe = Recipe(num_epochs=1, learning_rate=0.05, batch_size=256, eval_batch_size=400)
    state = create_train_state(exp.model, make_optimizer(recipe, 1), exp.input_shape, 0)
    state, _ = fit(state, exp, recipe, str(tmp_path / "a"))
    state, _ = fit(state, exp, recipe, str(tmp_path / "b"))  # same shapes and settings
    make_eval_fn(exp, recipe.eval_batch_size)(state, exp.test)
    steps = {k[0]: f for k, f in exp.steps.items() if k[0] != "optimizer"}
    assert sorted(steps) == ["eval", "train"] and len(exp.steps) == 3
    assert all(f._cache_size() == 1 for f in steps.values()), {k: f._cache_size() for k, f in steps.items()}
    fit(state, exp, recipe.replace(label_smoothing=0.1, learning_rate=0.01), str(tmp_path / "c"))
    assert len(exp.steps) == 5  # another train step and another optimiser
