"""Tests for jaxcompress.pruning.lasso: LASSO channel selection + least-squares refit
(He, Zhang, Sun 2017), checked against scikit-learn, numpy and planted problems, and
end to end on LeNet-5 and a half-width ResNet-20."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import Lasso

from jaxcompress.layers import Conv, Dense
from jaxcompress.models import create_model, describe
from jaxcompress.pruning.lasso import lasso_fista, lasso_groups, lasso_prune, least_squares_refit, select_channels
from jaxcompress.pruning.lasso.gram import _gram_from_patches
from jaxcompress.pruning.lasso.prune import _consumers
from jaxcompress.pruning.lasso.sampling import _conv_patches
from jaxcompress.pruning.surgery import shrink


# ---------------------------------------------------------------------------------- solver

def _sparse_problem(seed, n, c, noise=0.1):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(n, c))
    A[:, 1:] += 0.5 * A[:, :-1]  # correlated columns, like neighbouring channels
    beta = np.zeros(c)
    beta[rng.choice(c, 3, replace=False)] = rng.normal(size=3) * 2
    y = A @ beta + noise * rng.normal(size=n)
    return A.astype(np.float32), y.astype(np.float32)


@pytest.mark.parametrize("seed,lam", [(0, 0.05), (1, 0.02), (2, 0.1)])
def test_lasso_fista_matches_sklearn(seed, lam):
    n, c = 100, 10
    A, y = _sparse_problem(seed, n, c)
    beta = np.asarray(lasso_fista(A, y, lam, num_iters=20000, tol=1e-9))
    ref = Lasso(alpha=lam, fit_intercept=False, tol=1e-12, max_iter=100000).fit(
        A.astype(np.float64), y.astype(np.float64)).coef_
    np.testing.assert_allclose(beta, ref, atol=1e-3)
    np.testing.assert_array_equal(beta != 0, np.abs(ref) > 0)
    assert 0 < np.sum(beta != 0) < c  # a genuinely sparse, non-trivial solution
    # Warm start from the answer stays there; lam >= max|A^T y| / n gives zero.
    warm = np.asarray(lasso_fista(A, y, lam, num_iters=50, beta0=jnp.asarray(ref, jnp.float32)))
    np.testing.assert_allclose(warm, ref, atol=1e-3)
    lam_max = np.max(np.abs(A.T @ y)) / n
    np.testing.assert_array_equal(np.asarray(lasso_fista(A, y, 1.01 * lam_max)), 0.0)


def _planted(seed, n=300, c=8, m=6, taps=4, planted=(1, 4, 6), noise=0.01):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, taps, c))
    W = rng.normal(size=(taps, c, m))
    Z = np.einsum("nrc,rcm->ncm", X, W)
    Y = Z[:, list(planted)].sum(1) + noise * rng.normal(size=(n, m))
    return Z.astype(np.float32), Y.astype(np.float32)


def test_select_channels_exact_count_and_planted_support():
    Z, Y = _planted(0)
    mask = np.asarray(select_channels(Z, Y, 3))
    np.testing.assert_array_equal(np.flatnonzero(mask), [1, 4, 6])
    for keep in range(1, 9):
        mask, info = select_channels(Z, Y, keep, return_info=True)
        assert mask.dtype == jnp.bool_ and mask.shape == (8,)
        assert int(np.sum(mask)) == keep
        if info["exact"]:  # the LASSO support itself
            np.testing.assert_array_equal(np.asarray(mask), np.asarray(info["beta"]) != 0)
        if keep >= 3:  # nested supports always contain the planted channels
            assert set(np.flatnonzero(mask)) >= {1, 4, 6}


def test_select_channels_sums_consumers_and_respects_candidates():
    Z, Y = _planted(1, n=200)
    whole = np.asarray(select_channels(Z, Y, 3))
    split = np.asarray(select_channels([Z[:120], Z[120:]], [Y[:120], Y[120:]], 3))
    np.testing.assert_array_equal(whole, split)
    cand = np.ones(8, bool)
    cand[4] = False
    mask = np.asarray(select_channels(Z, Y, 3, candidates=cand))
    assert int(mask.sum()) == 3 and not mask[4] and mask[1] and mask[6]
    with pytest.raises(ValueError, match="keep"):
        select_channels(Z, Y, 8, candidates=cand)


def test_least_squares_refit_equals_numpy_lstsq():
    rng = np.random.default_rng(0)
    n, r, c, m = 200, 9, 6, 5
    X = rng.normal(size=(n, r, c)).astype(np.float32)
    Y = rng.normal(size=(n, m)).astype(np.float32)
    kept = np.array([1, 0, 1, 1, 0, 1], bool)
    W = np.asarray(least_squares_refit(X, Y, kept))
    assert W.shape == (r, c, m)
    np.testing.assert_array_equal(W[:, ~kept], 0.0)
    ref = np.linalg.lstsq(X[:, :, kept].reshape(n, -1).astype(np.float64), Y.astype(np.float64), rcond=None)[0]
    np.testing.assert_allclose(W[:, kept].reshape(-1, m), ref, atol=1e-4)
    # Layout: an HWIO kernel, and a fixed ridge against its closed form.
    Wk = np.asarray(least_squares_refit(X, Y, kept, kernel_shape=(3, 3, c, m)))
    np.testing.assert_array_equal(Wk, W.reshape(3, 3, c, m))
    Xk = X[:, :, kept].reshape(n, -1).astype(np.float64)
    ridge = 0.5
    ref_r = np.linalg.solve(Xk.T @ Xk + ridge * n * np.eye(Xk.shape[1]), Xk.T @ Y)
    W_r = np.asarray(least_squares_refit(X, Y, kept, ridge=ridge))
    np.testing.assert_allclose(W_r[:, kept].reshape(-1, m), ref_r, atol=1e-4)


def test_auto_ridge_generalises_better_with_few_samples():
    rng = np.random.default_rng(1)
    n, r, c, m = 50, 9, 4, 3  # 36 weights per output from 50 noisy samples
    w = rng.normal(size=(r, c, m)) * 0.3
    X, X_test = rng.normal(size=(n, r, c)), rng.normal(size=(500, r, c))
    Y = np.einsum("nrc,rcm->nm", X, w) + rng.normal(size=(n, m))
    kept = np.ones(c, bool)
    test_err = lambda W: np.mean((np.einsum("nrc,rcm->nm", X_test, np.asarray(W) - w)) ** 2)
    plain = test_err(least_squares_refit(X, Y, kept))
    auto = test_err(least_squares_refit(X, Y, kept, ridge="auto"))
    assert auto < 0.8 * plain, (auto, plain)


def test_gram_from_patches_equals_explicit_z():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 4, 5)).astype(np.float32)
    W = rng.normal(size=(4, 5, 3)).astype(np.float32)
    Y = rng.normal(size=(50, 3)).astype(np.float32)
    Z = np.einsum("nrc,rcm->ncm", X, W)
    G, b = _gram_from_patches(jnp.asarray(X), jnp.asarray(W), jnp.asarray(Y))
    np.testing.assert_allclose(G, np.einsum("nim,njm->ij", Z, Z), rtol=1e-4)
    np.testing.assert_allclose(b, np.einsum("nim,nm->i", Z, Y), rtol=1e-4)


@pytest.mark.parametrize("strides,padding", [(1, "SAME"), (2, "SAME"), (1, "VALID"), (2, ((0, 1), (1, 0)))])
def test_conv_patches_reproduce_the_convolution(strides, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 9, 8, 3)), jnp.float32)
    conv = Conv(4, (3, 3), strides=strides, padding=padding, use_bias=False)
    params = {"params": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)}}
    y = conv.apply(params, x)
    oh, ow = y.shape[1:3]
    pos = jnp.asarray(rng.integers(0, oh * ow, size=(2, 5)), jnp.int32)
    patches = _conv_patches(x, conv, pos, ow)  # (10, 9, 3)
    kernel = params["params"]["kernel"].reshape(9, 3, 4)
    got = jnp.einsum("nrc,rcm->nm", patches, kernel)
    want = jnp.take_along_axis(y.reshape(2, oh * ow, 4), pos[:, :, None], axis=1).reshape(10, 4)
    np.testing.assert_allclose(got, want, atol=1e-5)


# ---------------------------------------------------------------------------------- models

def _random_variables(model, shape, rng):
    """A random He-normal initialisation drawn with numpy (compiling `model.init`'s
    truncated-normal initialisers costs more CPU time than the whole pruning run);
    BatchNorm gets random affine parameters and running statistics."""
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *shape)), train=False))

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(size=leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, size=leaf.shape)
        if name == "channel":
            return np.ones(leaf.shape)
        return 0.1 * rng.normal(size=leaf.shape)  # bias, BatchNorm shift and mean

    return dict(jax.tree_util.tree_map_with_path(lambda p, l: jnp.asarray(fill(p, l), jnp.float32), abstract))


def _setup(name, width_multiplier, n_train, n_test):
    model = create_model(name, 10, width_multiplier=width_multiplier)
    table = describe(model, {"lenet5": (28, 28, 1), "resnet20": (32, 32, 3)}[name])
    rng = np.random.default_rng(0)
    shape = table.input_shape
    images = rng.normal(size=(n_train, *shape)).astype(np.float32)
    held_out = rng.normal(size=(n_test, *shape)).astype(np.float32)
    return model, table, _random_variables(model, shape, rng), images, held_out


@pytest.fixture(scope="module")
def lenet():
    return _setup("lenet5", 1.0, 200, 64)


@pytest.fixture(scope="module")
def resnet():
    return _setup("resnet20", 0.5, 64, 32)


@functools.lru_cache(maxsize=None)
def _jitted_outputs(model, paths):
    @jax.jit
    def outputs(variables, x):
        out = {}

        def record(next_fun, args, kwargs, context):
            y = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and isinstance(context.module, (Conv, Dense)):
                path = "/".join(context.module.path)
                if path in paths:
                    out[path] = y
            return y

        with nn.intercept_methods(record):
            logits = model.apply(variables, x, train=False)
        return logits, out

    return outputs


def _apply(model, variables, x):
    """Eval-mode logits (jitted: one compilation per model)."""
    return _jitted_outputs(model, ())(variables, x)[0]


def _layer_outputs(model, variables, x, paths):
    return _jitted_outputs(model, tuple(paths))(variables, x)[1]


def _magnitude_masks(table, variables, group, keep):
    """The weight-magnitude baseline: L1 norm of the producers' output-channel kernels."""
    score = np.zeros(table.widths[group])
    for layer in table.layers:
        if layer.out_group == group:
            p = variables["params"]
            for part in layer.path.split("/"):
                p = p[part]
            score += np.abs(np.asarray(p["kernel"])).reshape(-1, table.widths[group]).sum(0)
    mask = np.zeros(table.widths[group], np.float32)
    mask[np.argsort(-score, kind="stable")[:keep]] = 1.0
    group_masks = table.group_masks(variables["masks"])
    group_masks[group] = jnp.asarray(mask)
    return {**variables, "masks": table.layer_masks(group_masks, variables["masks"])}


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _check_pruned(model, table, variables, group_masks, new_variables, keep, groups, x):
    for g in range(table.num_groups):
        expected = keep[g] if g in groups else table.widths[g]
        assert int(np.sum(np.asarray(group_masks[g]))) == expected, table.group_names[g]
        np.testing.assert_array_equal(table.group_masks(new_variables["masks"])[g], group_masks[g])
    # Pruned channels' kernel rows are exactly zero in every refitted consumer.
    for g in groups:
        pruned = np.asarray(group_masks[g]) == 0
        for layer in _consumers(table, g):
            p = new_variables["params"]
            for part in layer.path.split("/"):
                p = p[part]
            k = np.asarray(p["kernel"])
            assert np.all(k.reshape(-1, table.widths[g], k.shape[-1])[:, pruned] == 0)
    small_model, small_vars = shrink(table, new_variables)
    assert tuple(small_model.widths) == tuple(int(np.sum(np.asarray(m))) for m in group_masks)
    masked = _apply(model, new_variables, x)
    small = _apply(small_model, small_vars, x)
    assert _rel(small, masked) < 1e-5
    assert not np.allclose(masked, _apply(model, variables, x))  # the network did change


def _lasso_beats_magnitude(model, table, variables, images, held_out, group):
    keep = list(table.widths)
    keep[group] = table.widths[group] // 2
    group_masks, lasso_vars = lasso_prune(table, variables, images, keep, groups=[group])
    assert int(np.sum(np.asarray(group_masks[group]))) == keep[group]
    magnitude_vars = _magnitude_masks(table, variables, group, keep[group])
    paths = [layer.path for layer in _consumers(table, group)]
    ref = _layer_outputs(model, variables, held_out, paths)
    lasso = _layer_outputs(model, lasso_vars, held_out, paths)
    magnitude = _layer_outputs(model, magnitude_vars, held_out, paths)
    for path in paths:
        lasso_err, magnitude_err = _rel(lasso[path], ref[path]), _rel(magnitude[path], ref[path])
        assert lasso_err < magnitude_err, (path, lasso_err, magnitude_err)


def test_lasso_groups_order_and_depthwise_exclusion(lenet, resnet):
    assert lasso_groups(lenet[1]) == [0, 1, 2, 3]
    _, table, *_ = resnet
    groups = lasso_groups(table)
    assert sorted(groups) == list(range(table.num_groups))
    first = [min(i for i, l in enumerate(table.layers) if l.in_group == g) for g in groups]
    assert first == sorted(first) and groups[:2] == [0, 3]  # stream 0 is read before block0's inner group
    mobilenet = describe(create_model("mobilenet_v1_cifar", 10, width_multiplier=0.25), (32, 32, 3))
    assert lasso_groups(mobilenet) == [mobilenet.num_groups - 1]  # every other group feeds a depthwise conv
    model, table, variables, images, _ = lenet
    with pytest.raises(ValueError, match="keep count"):
        lasso_prune(table, variables, images, [0, 16, 120, 84], groups=[0])
    mob_vars = {"params": {}}
    with pytest.raises(ValueError, match="cannot be pruned"):
        lasso_prune(mobilenet, mob_vars, np.zeros((2, 32, 32, 3), np.float32), list(mobilenet.widths), groups=[0])


def test_lasso_prune_lenet5(lenet):
    model, table, variables, images, held_out = lenet
    keep = [3, 8, 60, 42]
    group_masks, new_variables = lasso_prune(table, variables, images, keep)
    _check_pruned(model, table, variables, group_masks, new_variables, keep, [0, 1, 2, 3], held_out)
    # Sequential LASSO + refit keeps the logits far closer than magnitude pruning of every group.
    magnitude_vars = variables
    for g in range(4):
        magnitude_vars = _magnitude_masks(table, magnitude_vars, g, keep[g])
    ref = _apply(model, variables, held_out)
    assert _rel(_apply(model, new_variables, held_out), ref) < _rel(_apply(model, magnitude_vars, held_out), ref)


@pytest.mark.parametrize("group", [0, 1])  # a conv consumer, and a Dense fed by the flattened map
def test_lasso_refit_beats_magnitude_lenet5(lenet, group):
    _lasso_beats_magnitude(*lenet, group)


def test_lasso_prune_resnet20(resnet):
    model, table, variables, images, held_out = resnet
    keep = [max(1, w // 2) for w in table.widths]
    group_masks, new_variables = lasso_prune(table, variables, images, keep)
    _check_pruned(model, table, variables, group_masks, new_variables, keep, list(range(table.num_groups)),
                  held_out)
    assert set(new_variables) == set(variables)  # batch_stats carried through


@pytest.mark.parametrize("group", [3, 0])  # a block's inner group; the stage-1 residual stream (5 consumers)
def test_lasso_refit_beats_magnitude_resnet20(resnet, group):
    _lasso_beats_magnitude(*resnet, group)


def test_lasso_prune_is_batching_invariant_and_skips_unchanged_groups(lenet):
    model, table, variables, images, _ = lenet
    keep = [3, 16, 120, 84]  # only group 0 shrinks: the default processes it alone
    masks_a, vars_a = lasso_prune(table, variables, images, keep, ridge=0.0)
    masks_b, vars_b = lasso_prune(table, variables, images, keep, ridge=0.0, batch_size=64)  # 4 batches, last padded
    for a, b in zip(masks_a, masks_b):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(vars_a["params"]["conv2"]["kernel"], vars_b["params"]["conv2"]["kernel"],
                               rtol=1e-4, atol=1e-5)
    for name in ("conv1", "fc1", "fc2", "fc3"):  # only group 0's consumer (conv2) is refitted
        np.testing.assert_array_equal(vars_a["params"][name]["kernel"], variables["params"][name]["kernel"])
    assert [int(np.sum(m)) for m in masks_a] == keep
