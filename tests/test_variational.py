"""Tests for information dropout (layer + KL terms) and variational kernel pruning."""
import math
import types

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from jaxcompress.data import BatchIterator, channel_stats, load_dataset, normalize
from jaxcompress.errors import ConfigError
from jaxcompress.layers import Conv, Dense
from jaxcompress.layers.information_dropout import (InformationDropout, information_dropout_alpha,
                                                    information_dropout_kl_relu,
                                                    information_dropout_kl_softplus)
from jaxcompress.models import describe
from jaxcompress.pruning.surgery import shrink
from jaxcompress.pruning.variational import (fit_variational, init_noise_logits, log_alpha_from_logits,
                                             perturb_kernels, train_variational, variational_masks,
                                             variational_prune, weight_noise_kl)
from jaxcompress.train import create_train_state, make_mesh, make_train_step

VARIANTS = [pytest.param(lambda f: f, id="nojit"), pytest.param(jax.jit, id="jit")]


def _norm_logpdf(x, m, s):
    return -0.5 * ((x - m) / s) ** 2 - np.log(s) - 0.5 * np.log(2 * np.pi)


# ----------------------------------------------------------------------------- KL formulas

@pytest.mark.parametrize("variant", VARIANTS)
def test_kl_relu_matches_hand_computation(variant):
    alpha = jnp.array([[0.001 + 1e-6, 0.1], [0.35, 0.701]], jnp.float32)
    got = variant(lambda a: information_dropout_kl_relu(a, 0.7))(alpha)
    want = -np.log(np.asarray(alpha, np.float64) / 0.701)
    chex.assert_trees_all_close(got, want.astype(np.float32), rtol=1e-5, atol=1e-6)
    assert abs(float(got[1, 1])) < 1e-6  # zero at the largest allowed noise


def test_kl_relu_differences_equal_entropy_differences():
    """Against a log-uniform (flat in log z) prior, KL(q_a) - KL(q_b) = H(q_b) - H(q_a),
    with H the differential entropy of log z ~ N(m, alpha^2), here by Monte Carlo."""
    rng = np.random.default_rng(0)
    def mc_entropy(a, m=0.3):
        u = m + a * rng.standard_normal(400_000)
        return -np.mean(_norm_logpdf(u, m, a))
    for a, b in [(0.05, 0.6), (0.2, 0.4), (0.01, 0.1)]:
        kl = information_dropout_kl_relu(jnp.array([a, b]))
        assert float(kl[0] - kl[1]) == pytest.approx(mc_entropy(b) - mc_entropy(a), abs=1e-2)


@pytest.mark.parametrize("variant", VARIANTS)
def test_kl_softplus_matches_hand_computation(variant):
    alpha = jnp.array([0.05, 0.3, 0.7])
    f = jnp.array([0.2, 1.0, 3.5])
    mu, sigma = 0.4, 1.7
    got = variant(information_dropout_kl_softplus)(alpha, f, mu, sigma)
    a, lf = np.asarray(alpha, np.float64), np.log(np.asarray(f, np.float64))
    want = 0.5 * ((a / sigma) ** 2 + (lf - mu) ** 2 / sigma ** 2 - 1 + 2 * (np.log(sigma) - np.log(a)))
    chex.assert_trees_all_close(got, want.astype(np.float32), rtol=1e-5)
    # f is floored at 1e-4 before the log, so a vanishing softplus stays finite
    assert np.isfinite(float(information_dropout_kl_softplus(jnp.array(0.1), jnp.array(0.0), 0.0, 1.0)))


@pytest.mark.parametrize("alpha,f,mu,sigma", [(0.1, 0.5, 0.0, 1.0), (0.6, 2.0, -0.5, 0.8), (0.3, 0.05, 1.0, 2.0)])
def test_kl_softplus_equals_monte_carlo_kl_of_lognormals(alpha, f, mu, sigma):
    """KL between the log-normal posterior of z = f * eps and the log-normal prior,
    estimated in z space: E_q[log q(z) - log p(z)] (the Jacobians cancel)."""
    rng = np.random.default_rng(1)
    z = f * np.exp(alpha * rng.standard_normal(1_000_000))
    log_q = _norm_logpdf(np.log(z), np.log(f), alpha) - np.log(z)
    log_p = _norm_logpdf(np.log(z), mu, sigma) - np.log(z)
    mc = np.mean(log_q - log_p)
    got = float(information_dropout_kl_softplus(jnp.array(alpha), jnp.array(f), mu, sigma))
    assert got == pytest.approx(mc, abs=1e-2)


# ----------------------------------------------------------------------------- InformationDropout layer

HEAD_INIT = nn.initializers.normal(0.3)  # cheaper to compile than the default truncated normal


def _init(jit, layer, h):
    return jit(lambda k, h: layer.init(k, h, deterministic=True))(jax.random.key(1), h)


def _noisy_apply(jit, layer):
    return jit(lambda v, h, key: layer.apply(v, h, deterministic=False, rngs={"dropout": key}))


def _fixed_alpha_params(params, bias):
    head = params["alpha_head"]
    return {**params, "alpha_head": {"kernel": jnp.zeros_like(head["kernel"]),
                                     "bias": jnp.full_like(head["bias"], bias)}}


@pytest.mark.parametrize("activation", ["relu", "softplus"])
@pytest.mark.parametrize("shape", [(3, 4, 4, 5), (6, 7)])
def test_information_dropout_is_deterministic_at_test(zoo, activation, shape):
    layer = InformationDropout(activation=activation, head_kernel_init=HEAD_INIT)
    h = jax.random.normal(jax.random.key(0), shape)
    variables = _init(zoo.jit, layer, h)
    z, kl = zoo.jit(lambda v, h: layer.apply(v, h, deterministic=True))(variables, h)
    f = nn.relu(h) if activation == "relu" else nn.softplus(h)
    chex.assert_trees_all_close(z, f, rtol=1e-6, atol=0)  # eps = 1 (up to softplus rounding under jit)
    chex.assert_shape(kl, (shape[0],))
    head = variables["params"]["alpha_head"]["kernel"]
    assert head.shape == ((1, 1, shape[-1], shape[-1]) if len(shape) == 4 else (shape[-1], shape[-1]))
    if activation == "softplus":
        assert set(variables["params"]) == {"alpha_head", "prior_mu", "prior_log_sigma"}


def test_information_dropout_noise_is_lognormal_with_alpha(zoo):
    layer = InformationDropout(alpha_max=0.7, head_kernel_init=HEAD_INIT)
    h = jnp.abs(jax.random.normal(jax.random.key(0), (4096, 16))) + 0.1  # f(h) = h > 0
    params = _fixed_alpha_params(_init(zoo.jit, layer, h)["params"], bias=0.5)
    alpha = float(information_dropout_alpha(jnp.array(0.5), 0.7))
    apply = _noisy_apply(zoo.jit, layer)
    z, kl = apply({"params": params}, h, jax.random.key(3))
    log_eps = np.log(np.asarray(z) / np.asarray(h)).reshape(-1)  # 65536 samples of N(0, alpha^2)
    assert abs(log_eps.mean()) < 4 * alpha / math.sqrt(log_eps.size)
    assert log_eps.std() == pytest.approx(alpha, rel=0.02)
    chex.assert_trees_all_close(kl, jnp.full((4096,), 16 * -math.log(alpha / 0.701)), rtol=1e-4)
    z2, _ = apply({"params": params}, h, jax.random.key(3))
    z3, _ = apply({"params": params}, h, jax.random.key(4))
    chex.assert_trees_all_equal(z, z2)
    assert not np.allclose(z, z3)


@pytest.mark.parametrize("activation,shape", [("relu", (4, 6, 6, 3)), ("softplus", (8, 5))])
def test_information_dropout_gradient_reaches_alpha_head(zoo, activation, shape):
    layer = InformationDropout(activation=activation, head_kernel_init=HEAD_INIT)
    h = jax.random.normal(jax.random.key(0), shape)
    params = _init(zoo.jit, layer, h)["params"]

    def loss(p):
        z, kl = layer.apply({"params": p}, h, deterministic=False, rngs={"dropout": jax.random.key(2)})
        return jnp.sum(z ** 2) + jnp.mean(kl)

    grads = zoo.jit(jax.grad(loss))(params)
    assert float(jnp.abs(grads["alpha_head"]["kernel"]).sum()) > 0
    assert float(jnp.abs(grads["alpha_head"]["bias"]).sum()) > 0
    if activation == "softplus":
        assert abs(float(grads["prior_mu"])) > 0 and abs(float(grads["prior_log_sigma"])) > 0


def test_information_dropout_rejects_bad_input():
    with pytest.raises(ValueError, match="activation"):
        InformationDropout(activation="tanh").init(jax.random.key(0), jnp.ones((2, 3)), deterministic=True)
    with pytest.raises(ValueError, match="NHWC"):
        InformationDropout().init(jax.random.key(0), jnp.ones((2, 3, 4)), deterministic=True)


# ----------------------------------------------------------------------------- weight noise

class TinyRes(nn.Module):
    """Group 0 is a stream written by three convs (3x3 stem, 3x3 out, 1x1 proj)."""

    widths: tuple[int, ...] = (8, 4)
    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train: bool = False):
        a = nn.relu(Conv(self.widths[0], (3, 3), name="stem")(x))
        b = nn.relu(Conv(self.widths[1], (3, 3), name="inner")(a))
        x = nn.relu(a + Conv(self.widths[0], (3, 3), name="out")(b) + Conv(self.widths[0], (1, 1), name="proj")(b))
        return Dense(self.num_classes, name="head")(x.mean(axis=(1, 2)))


@pytest.fixture(scope="module")
def tiny():
    model = TinyRes()
    table = describe(model, (6, 6, 2))
    # Random weights from numpy (no compilation needed): only shapes and masks matter here.
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 6, 6, 2)))
    rng = np.random.default_rng(0)
    variables = {col: jax.tree.map(lambda s: jnp.ones(s.shape) if col == "masks" else
                                   jnp.asarray(rng.standard_normal(s.shape), jnp.float32), tree)
                 for col, tree in shapes.items()}
    return model, table, variables


def test_noise_layout_and_kl_weighting(tiny):
    _, table, variables = tiny
    logits = init_noise_logits(table, init_alpha=0.05)
    assert set(logits) == {"stem", "inner", "out", "proj"}  # the classifier carries none
    assert set(logits["proj"]) == {"channel"}  # a 1x1 kernel has no position to prune
    assert logits["stem"]["spatial"].shape == (3, 3) and logits["out"]["channel"].shape == (8,)
    la = log_alpha_from_logits(logits)
    chex.assert_trees_all_close(jax.tree.leaves(la), [np.full(x.shape, math.log(0.05)) for x in jax.tree.leaves(la)],
                                rtol=1e-6)
    with_dense = init_noise_logits(table, include_dense=True)
    assert "head" not in with_dense  # its outputs are the classes, not a channel group
    # KL: every multiplier weighted by the number of weights it covers.
    kl1 = -math.log(0.05 / 0.701)
    covered = {"stem": 9 * (2 * 8) + 8 * (9 * 2), "inner": 9 * (8 * 4) + 4 * (9 * 8),
               "out": 9 * (4 * 8) + 8 * (9 * 4), "proj": 8 * 4}
    assert float(weight_noise_kl(logits, variables["params"])) == pytest.approx(kl1 * sum(covered.values()), rel=1e-5)


def test_perturb_kernels_is_a_separable_lognormal_multiplier(zoo, tiny):
    _, table, variables = tiny
    logits = jax.tree.map(lambda r: r + jax.random.normal(jax.random.key(5), r.shape), init_noise_logits(table))
    noisy = zoo.jit(perturb_kernels)(variables["params"], logits, jax.random.key(7))
    for path in ("stem", "out"):
        ratio = np.log(np.asarray(noisy[path]["kernel"]) / np.asarray(variables["params"][path]["kernel"]))
        spatial = ratio[:, :, 0, 0] - ratio[0, 0, 0, 0]
        channel = ratio[0, 0, 0, :]
        np.testing.assert_allclose(ratio - (spatial[:, :, None, None] + channel), 0.0, atol=1e-5)
        assert np.std(spatial) > 0 and np.std(channel) > 0
    chex.assert_trees_all_equal(noisy["head"], variables["params"]["head"])
    chex.assert_trees_all_equal(noisy["inner"]["bias"], variables["params"]["inner"]["bias"])


# ----------------------------------------------------------------------------- masks from log alpha

def _hand_log_alpha(table, seed=0):
    rng = np.random.default_rng(seed)
    la = log_alpha_from_logits(init_noise_logits(table))
    return {p: {k: rng.permutation(v.size).reshape(v.shape).astype(np.float64) for k, v in e.items()}
            for p, e in la.items()}


def test_variational_masks_prune_highest_alpha_positions(tiny):
    _, table, variables = tiny
    la = _hand_log_alpha(table)
    masks = variational_masks(table, la, element_rate=0.45, channel_rate=0.0, masks=variables["masks"])
    flat = traverse_util.flatten_dict(masks)
    for path in ("stem", "inner", "out"):
        m = np.asarray(flat[(path, "kernel")])
        assert m.shape == variables["params"][path]["kernel"].shape
        assert np.all(m == m[:, :, :1, :1])  # constant over (cin, cout)
        pruned = set(zip(*np.nonzero(m[:, :, 0, 0] == 0)))
        assert len(pruned) == round(0.45 * 9) == 4
        top = np.argsort(-la[path]["spatial"].reshape(-1))[:4]
        assert pruned == {divmod(int(i), 3) for i in top}
    assert ("proj", "kernel") not in flat
    chex.assert_trees_all_equal(masks["stem"]["channel"], jnp.ones(8))  # channel_rate 0


def test_variational_masks_prune_groups_consistently_by_mean_score(tiny):
    _, table, variables = tiny
    la = _hand_log_alpha(table)
    # Members of group 0 disagree: the mean over stem, out and proj decides.
    la["stem"]["channel"] = np.array([7., 0, 0, 0, 0, 0, 0, 0])  # alone, stem would prune 0
    la["out"]["channel"] = np.array([0., 5, 0, 0, 0, 0, 0, 4])
    la["proj"]["channel"] = np.array([0., 5, 1, 0, 0, 0, 0, 4])
    masks = variational_masks(table, la, channel_rate=0.25, masks=variables["masks"])
    table.check_masks_consistent(masks)
    g0 = np.asarray(masks["stem"]["channel"])
    np.testing.assert_array_equal(np.flatnonzero(g0 == 0), [1, 7])  # means 10/3, 8/3 beat 7/3
    for path in ("out", "proj"):
        np.testing.assert_array_equal(masks[path]["channel"], g0)
    g1 = np.asarray(masks["inner"]["channel"])
    assert g1.sum() == 3 and g1[int(np.argmax(la["inner"]["channel"]))] == 0
    np.testing.assert_array_equal(masks["head"]["channel"], np.ones(3))  # classes untouched
    # Never every channel: a rate near 1 keeps exactly one, the least noisy.
    masks = variational_masks(table, la, channel_rate=0.99, masks=variables["masks"])
    assert int(np.sum(masks["inner"]["channel"])) == 1
    assert masks["inner"]["channel"][int(np.argmin(la["inner"]["channel"]))] == 1
    assert int(np.sum(masks["stem"]["channel"])) == 1
    # `groups` restricts channel pruning; dict rates address groups by name.
    masks = variational_masks(table, la, channel_rate=0.5, masks=variables["masks"], groups=[1])
    assert int(np.sum(masks["stem"]["channel"])) == 8 and int(np.sum(masks["inner"]["channel"])) == 2
    masks = variational_masks(table, la, channel_rate={"inner": 0.5}, masks=variables["masks"])
    assert int(np.sum(masks["stem"]["channel"])) == 8 and int(np.sum(masks["inner"]["channel"])) == 2


def test_variational_masks_count_only_what_is_still_alive(tiny):
    _, table, variables = tiny
    la = _hand_log_alpha(table, seed=3)
    first = variational_masks(table, la, element_rate=0.34, channel_rate=0.5, masks=variables["masks"])
    again = variational_masks(table, la, element_rate=0.34, channel_rate=0.5, masks=first)
    assert int(np.sum(np.asarray(first["stem"]["kernel"])[:, :, 0, 0])) == 6
    assert int(np.sum(np.asarray(again["stem"]["kernel"])[:, :, 0, 0])) == 4  # 6 alive, round(0.34 * 6) = 2 more
    assert int(np.sum(first["stem"]["channel"])) == 4 and int(np.sum(again["stem"]["channel"])) == 2
    assert np.all(np.asarray(again["stem"]["kernel"]) <= np.asarray(first["stem"]["kernel"]))
    table.check_masks_consistent(again)


def test_variational_masks_survive_surgery(zoo, tiny):
    """Element + channel masks -> `shrink`: the smaller network computes what the masked one does."""
    model, table, variables = tiny
    masks = variational_masks(table, _hand_log_alpha(table), element_rate=0.3, channel_rate=0.5,
                              masks=variables["masks"])
    x = jax.random.normal(jax.random.key(2), (3, 6, 6, 2))
    small, small_vars = shrink(table, {**variables, "masks": masks})
    assert small.widths == (4, 2)
    assert small_vars["masks"]["out"]["kernel"].shape == (3, 3, 2, 4)
    chex.assert_trees_all_close(zoo.jit(model.apply)({**variables, "masks": masks}, x),
                                zoo.jit(small.apply)(small_vars, x), atol=1e-5)


def test_variational_masks_reject_bad_rates_and_layers(tiny):
    _, table, variables = tiny
    la = _hand_log_alpha(table)
    with pytest.raises(ConfigError, match="outside"):
        variational_masks(table, la, element_rate=1.0)
    with pytest.raises(ConfigError, match="no noise"):
        variational_masks(table, la, element_rate={"proj": 0.5})
    with pytest.raises(ConfigError, match="does not have"):
        variational_masks(table, {**la, "nope": la["stem"]})


# ----------------------------------------------------------------------------- training on digits

IMAGE = 16  # 16x16 digits keep LeNet-5 (conv1 SAME, conv2 VALID 5x5) valid at 1/3 of the cost of 28x28


@pytest.fixture(scope="module")
def digits_lenet(zoo):
    ds = load_dataset("digits", image_size=IMAGE)
    mean, std = channel_stats(ds.x_train)
    table = zoo.table("lenet5", (IMAGE, IMAGE, 1))
    model = table.model
    state = create_train_state(model, optax.sgd(0.05, momentum=0.9), (IMAGE, IMAGE, 1), seed=0,
                               variables=zoo.variables("lenet5", (IMAGE, IMAGE, 1)))  # He-normal, no compile
    step = jax.jit(make_train_step(mean, std))
    it = BatchIterator(ds.x_train, ds.y_train, 64, seed=0)
    for _ in range(250):
        state, _ = step(state, next(it))
    return ds, mean, std, model, table, jax.device_get(state.variables())


def _accuracy(zoo, variables, ds, mean, std):
    logits = zoo.forward("lenet5", (IMAGE, IMAGE, 1))(variables, normalize(ds.x_test, mean, std))
    return float(np.mean(np.asarray(logits.argmax(-1)) == ds.y_test))


# Information-free elements: kernel positions (3, 0), (4, 1) of conv1 and conv1's channel 2 are
# masked during variational training, so their noise cannot change the loss and only the KL term
# moves their alpha. Without the masks the same run ranks them the 2nd / 3rd least noisy positions
# and the least noisy channel (checked once by hand), so the test cannot pass by accident.
MASKED_POSITIONS = {(3, 0), (4, 1)}
MASKED_CHANNEL = 2


@pytest.fixture(scope="module")
def masked_variables(digits_lenet):
    *_, variables = digits_lenet
    flat = traverse_util.flatten_dict(variables["masks"])
    kernel = np.ones((5, 5, 1, 6), np.float32)
    for pos in MASKED_POSITIONS:
        kernel[pos] = 0.0
    flat[("conv1", "kernel")] = kernel
    channel = np.ones(6, np.float32)
    channel[MASKED_CHANNEL] = 0.0
    flat[("conv1", "channel")] = channel
    return {**variables, "masks": traverse_util.unflatten_dict(flat)}


@pytest.fixture(scope="module")
def runs(digits_lenet, masked_variables):
    ds, mean, std, _, table, _ = digits_lenet
    out = {}
    for beta in (0.1, 10.0):
        it = BatchIterator(ds.x_train, ds.y_train, 64, seed=1)
        out[beta] = fit_variational(table, masked_variables, it, mean, std, num_steps=200, learning_rate=0.01,
                                    beta=beta, seed=0, progress=False)
    return out


def test_variational_training_gives_information_free_elements_the_most_noise(digits_lenet, runs):
    ds, mean, std, model, table, variables = digits_lenet
    la = runs[0.1].log_alpha["conv1"]
    top_positions = {divmod(int(i), 5) for i in np.argsort(-la["spatial"].reshape(-1))[:len(MASKED_POSITIONS)]}
    assert top_positions == MASKED_POSITIONS
    assert int(np.argmax(la["channel"])) == MASKED_CHANNEL
    # ... and variational_masks at the matching rates prunes exactly those.
    masks = variational_masks(table, runs[0.1].log_alpha, element_rate={"conv1": 2 / 25},
                              channel_rate={"conv1": 1 / 6}, masks=variables["masks"])
    assert set(zip(*np.nonzero(np.asarray(masks["conv1"]["kernel"])[:, :, 0, 0] == 0))) == MASKED_POSITIONS
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(masks["conv1"]["channel"]) == 0), [MASKED_CHANNEL])
    table.check_masks_consistent(masks)


def test_variational_training_objective_and_beta(zoo, digits_lenet, runs):
    ds, mean, std, model, _, variables = digits_lenet
    for beta, res in runs.items():
        h = res.history
        assert len(h["loss"]) == 200 and np.all(np.isfinite(h["loss"]))
        assert h["loss"][-20:].mean() < h["loss"][:20].mean()  # the objective goes down
        assert h["mean_log_alpha"][-1] > h["mean_log_alpha"][0]  # noise grows from its small start
        assert _accuracy(zoo, res.variables, ds, mean, std) > 0.85  # deterministic net still works
    # A larger beta (KL weight) pulls every kind of alpha up: mean log alpha is monotone in beta.
    for path in ("conv1", "conv2"):
        for kind in ("spatial", "channel"):
            assert runs[10.0].log_alpha[path][kind].mean() > runs[0.1].log_alpha[path][kind].mean()
    assert runs[10.0].history["ce"][-50:].mean() > runs[0.1].history["ce"][-50:].mean()
    assert _accuracy(zoo, variables, ds, mean, std) > 0.9  # the reference network was trained


def test_train_variational_returns_log_alpha_and_prune_entry_point(digits_lenet, masked_variables):
    ds, mean, std, model, table, _ = digits_lenet
    variables = masked_variables  # the structure `runs` compiled for
    la = train_variational(table, variables, BatchIterator(ds.x_train, ds.y_train, 64, seed=2), mean, std,
                           num_steps=0, learning_rate=0.01, beta=1.0, seed=0, progress=False, init_alpha=0.1)
    assert set(la) == {"conv1", "conv2"} and la["conv2"]["spatial"].shape == (5, 5)
    assert la["conv2"]["channel"].dtype == np.float64
    np.testing.assert_allclose(la["conv1"]["channel"], math.log(0.1), rtol=1e-6)  # no step: the initial noise
    exp = types.SimpleNamespace(train=(ds.x_train, ds.y_train), mean=mean, std=std, table=table, mesh=make_mesh())
    # the batch shape and rates of `runs`: no new compilation
    masks, params = variational_prune(exp, variables, 0.5, groups=[0, 1], batch_size=64, learning_rate=0.01,
                                      settings=dict(num_steps=5, spatial_rate=0.2, beta=1.0))
    # conv1 enters with 5 of 6 channels and 23 of 25 positions alive: rates count alive ones.
    assert int(np.sum(masks["conv1"]["channel"])) == 5 - round(0.5 * 5)
    assert masks["conv1"]["channel"][MASKED_CHANNEL] == 0
    assert int(np.sum(masks["conv2"]["channel"])) == 8
    assert int(np.sum(masks["fc1"]["channel"])) == 120  # outside `groups`
    assert int(np.sum(np.asarray(masks["conv1"]["kernel"])[:, :, 0, 0])) == 23 - round(0.2 * 23)
    assert int(np.sum(np.asarray(masks["conv2"]["kernel"])[:, :, 0, 0])) == 20
    table.check_masks_consistent(masks)
    chex.assert_trees_all_equal_shapes(params, variables["params"])
