"""LASSO channel selection with least-squares reconstruction (He, Zhang, Sun 2017).

He et al., "Channel Pruning for Accelerating Very Deep Neural Networks" (ICCV 2017),
prune the *input* channels of a layer: with X_i the sampled input patches of channel
i (N x k_h k_w) and W_i its kernel slice (n x k_h k_w), the layer output is
Y = sum_i X_i W_i^T, and they solve

    Eq. (1)  min_{beta, W} 1/(2N) ||Y - sum_i beta_i X_i W_i^T||_F^2   s.t. ||beta||_0 <= c'

in two steps: (i) the LASSO relaxation over beta with W fixed,

    Eq. (2)  ... + lambda ||beta||_1,  s.t. ||W_i||_F = 1,
    Eq. (3)  beta(lambda) = argmin 1/(2N) ||Y - sum_i beta_i Z_i||_F^2 + lambda ||beta||_1,
             Z_i = X_i W_i^T,

increasing lambda until ||beta||_0 = c'; then (ii) the kept weights are refitted by
least squares,

    Eq. (4)  min_{W'} ||Y - X' W'^T||_F^2   (X' = the kept channels' patches),

once (the paper's "in practice" schedule: step (i) until the count is met, then step
(ii) once). For the whole network (their Eq. 5 / Sec. 3.2) the target Y' is the
*original* network's output while X is sampled from the *current*, already pruned
network, so each layer's reconstruction also absorbs the error accumulated upstream.

Here a layer's input channels are one channel group of `jaxcompress.models.table`
(the producer(s) of the group lose those output channels, recorded in the `masks`
collection). A group may feed several layers (a residual stream feeds every block of
its stage and the next projection): the LASSO objective sums over all of them, each
consumer's term divided by ||Y_l||_F^2 so that every consumer counts by its relative
reconstruction error (*our choice*; He et al. treat one layer at a time).

Layout used throughout: patches X have shape (n, r, c) -- n samples, r taps (k_h k_w
for a conv, in HWIO order; H*W positions for a Dense fed by a flattened NHWC map,
row index = position * C + channel), c input channels -- and a kernel is viewed as
(r, c, m), which is `kernel.reshape(r, c, m)` for both HWIO conv kernels and
(r * c, m) dense kernels.

Other choices of ours: groups are processed in network order, i.e. by the call order
of their first consumer (stream 0 of a ResNet before block 0's inner group), each
once; a consumer read later in the network (a stream's next-stage projection) is
refitted on features sampled before the groups between them are pruned. The refit's
ridge defaults to "auto" (exact leave-one-out choice, 0 included), which matters for
Dense layers fed by a flattened map (one sample per image). Depthwise / grouped
consumers are not handled (`lasso_groups` skips their groups), nor consumers with
element (kernel) masks, and the `quant` collection is ignored while sampling.

Hand-written: FISTA (Beck & Teboulle 2009) with adaptive restart (O'Donoghue &
Candes 2015) on the c x c Gram matrix, so the whole lambda bisection is one jitted
XLA program; scikit-learn's coordinate descent is used only as the test oracle.
"""
from __future__ import annotations

import functools
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxcompress.layers import Conv, Dense
from jaxcompress.models.table import LayerInfo, ModelTable

_HIGHEST = jax.lax.Precision.HIGHEST
_TINY = 1e-30

__all__ = ["lasso_fista", "select_channels", "least_squares_refit", "lasso_groups", "lasso_prune"]


# --------------------------------------------------------------------------------------
# Step (i): the LASSO of Eq. (3)
# --------------------------------------------------------------------------------------

def _soft_threshold(x, t):
    return jnp.sign(x) * jnp.maximum(jnp.abs(x) - t, 0.0)


def _fista_gram(G, b, lam, beta0, lipschitz, num_iters, tol):
    """min_beta 1/2 beta^T G beta - b^T beta + lam ||beta||_1 by FISTA with restart.

    With G = A^T A / n and b = A^T y / n this is (1/2n)||y - A beta||^2 + lam||beta||_1
    up to a constant. Stops after `num_iters` steps or when the largest coefficient
    change falls below `tol` times the largest coefficient.
    """
    step = 1.0 / jnp.maximum(lipschitz, _TINY)

    def cond(state):
        k, _, _, _, delta = state
        return (k < num_iters) & (delta > tol)

    def body(state):
        k, x, z, t, _ = state
        grad = jnp.dot(G, z, precision=_HIGHEST) - b
        x_new = _soft_threshold(z - step * grad, step * lam)
        t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
        # Gradient-based adaptive restart: drop the momentum when it points uphill.
        restart = jnp.vdot(z - x_new, x_new - x) > 0.0
        z_new = jnp.where(restart, x_new, x_new + ((t - 1.0) / t_new) * (x_new - x))
        t_new = jnp.where(restart, 1.0, t_new)
        delta = jnp.max(jnp.abs(x_new - x)) / jnp.maximum(jnp.max(jnp.abs(x_new)), _TINY)
        return k + 1, x_new, z_new, t_new, delta

    init = (jnp.int32(0), beta0, beta0, jnp.float32(1.0), jnp.float32(jnp.inf))
    _, x, _, _, _ = jax.lax.while_loop(cond, body, init)
    return x


def _lipschitz(G):
    return jnp.linalg.eigvalsh(G)[-1]


@jax.jit
def lasso_fista(A, y, lam, num_iters: int = 5000, beta0=None, tol: float = 1e-7):
    """LASSO by FISTA: argmin_beta (1/2n) ||y - A beta||_2^2 + lam ||beta||_1.

    The relaxed channel-selection problem of He et al. 2017, Eq. (3), for one
    flattened output (A's column i = Z_i flattened). Same scaling as
    `sklearn.linear_model.Lasso(alpha=lam, fit_intercept=False)`.

    Args:
      A: (n, c) design matrix; y: (n,) target; lam: lambda >= 0.
      num_iters: maximum FISTA iterations; tol: relative stopping tolerance (both traced,
        changing them does not recompile).
      beta0: (c,) warm start (zeros if None).
    Returns:
      beta (c,) float32, with exact zeros off the support (proximal step).
    """
    A = jnp.asarray(A, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    n = A.shape[0]
    G = jnp.dot(A.T, A, precision=_HIGHEST) / n
    b = jnp.dot(A.T, y, precision=_HIGHEST) / n
    beta0 = jnp.zeros(A.shape[1], jnp.float32) if beta0 is None else jnp.asarray(beta0, jnp.float32)
    return _fista_gram(G, b, jnp.float32(lam), beta0, _lipschitz(G), jnp.int32(num_iters), jnp.float32(tol))


@jax.jit
def _select_from_gram(G, b, keep, candidates, num_bisect: int, num_iters: int, tol, lam_min_ratio):
    """Bisection on lambda (geometric, in [lam_max * lam_min_ratio, lam_max]) until
    the LASSO solution has exactly `keep` non-zeros; returns (mask, beta, lam, exact).

    `beta` is the solution at the largest lambda seen with >= keep non-zeros (or at
    the smallest lambda tried if none had enough). The mask keeps the `keep`
    channels ranked by (candidate, |beta|, |b|, lower index): when the count is hit
    exactly this is the LASSO support; otherwise ties are broken by |beta| and, for
    channels with beta = 0, by their correlation |Z_i^T Y| with the target.
    """
    cand = candidates.astype(G.dtype)
    G = G * cand[:, None] * cand[None, :]  # non-candidates are decoupled and stay at 0
    b = b * cand
    lipschitz = _lipschitz(G)
    lam_max = jnp.max(jnp.abs(b))  # beta = 0 is optimal for every lambda >= lam_max
    solve = lambda lam, beta0: _fista_gram(G, b, lam, beta0, lipschitz, num_iters, tol)
    nnz = lambda beta: jnp.sum((beta != 0) & candidates)

    # Step 0 solves at the bottom of the bracket, lam_max * lam_min_ratio; if even there
    # fewer than `keep` channels are active, stop (ranking below fills the rest).
    # Later steps bisect geometrically, warm-started from the previous solution.
    def cond(state):
        step, _, _, _, _, done, _, _ = state
        return (step <= num_bisect) & ~done

    def body(state):
        step, lo, hi, beta_lo, beta_prev, _, _, lam_lo = state
        first = step == 0
        mid = jnp.where(first, lo, jnp.sqrt(lo * hi))
        beta = solve(mid, beta_prev)
        count = nnz(beta)
        more = count >= keep
        take = more | first
        beta_lo, lam_lo = jnp.where(take, beta, beta_lo), jnp.where(take, mid, lam_lo)
        lo, hi = jnp.where(more, mid, lo), jnp.where(more, hi, mid)
        exact = count == keep
        return step + 1, lo, hi, beta_lo, beta, exact | (first & ~more), exact, lam_lo

    zeros = jnp.zeros_like(b)
    init = (jnp.int32(0), lam_max * lam_min_ratio, lam_max, zeros, zeros, jnp.bool_(False), jnp.bool_(False),
            lam_max)
    _, _, _, beta, _, _, exact, lam = jax.lax.while_loop(cond, body, init)
    index = jnp.arange(b.shape[0])
    order = jnp.lexsort((index, -jnp.abs(b), -jnp.abs(beta), ~candidates))
    mask = jnp.zeros(b.shape[0], bool).at[order].set(index < keep)
    return mask, beta, lam, exact


def _select_padded(G, b, keep, candidates, *, num_bisect=60, num_iters=3000, tol=1e-6, lam_min_ratio=1e-6):
    """`_select_from_gram` on a problem zero-padded to a multiple of 128 channels,
    padding channels not candidates (decoupled, they stay at 0): one compilation
    serves every width up to 128."""
    c = G.shape[0]
    size = -(-c // 128) * 128
    pad = size - c
    G = np.pad(np.asarray(G, np.float32), ((0, pad), (0, pad)))
    b = np.pad(np.asarray(b, np.float32), (0, pad))
    candidates = np.pad(np.asarray(candidates, bool), (0, pad))
    mask, beta, lam, exact = _select_from_gram(G, b, jnp.int32(keep), candidates, jnp.int32(num_bisect),
                                               jnp.int32(num_iters), jnp.float32(tol), jnp.float32(lam_min_ratio))
    return mask[:c], beta[:c], lam, exact


def _gram_from_z(Z, Y):
    G = jnp.einsum("nim,njm->ij", Z, Z, precision=_HIGHEST)
    b = jnp.einsum("nim,nm->i", Z, Y, precision=_HIGHEST)
    return G, b, Z.shape[0] * Z.shape[2]


def select_channels(Z, Y, keep: int, *, candidates=None, num_bisect: int = 60, num_iters: int = 3000,
                    tol: float = 1e-6, lam_min_ratio: float = 1e-6, return_info: bool = False):
    """LASSO channel selection, He et al. 2017 Eq. (3): the `keep` channels to retain.

    Solves min_beta 1/(2 n m) ||Y - sum_i beta_i Z_i||_F^2 + lambda ||beta||_1 on the
    flattened problem (rows n * m) and increases lambda by bisection (geometric, at
    most `num_bisect` steps) until exactly `keep` coefficients are non-zero. If the
    budget cannot hit `keep` exactly (e.g. two channels leave the support at the same
    lambda, or fewer than `keep` channels carry any signal), the solution at the
    largest lambda with more than `keep` non-zeros is used and its coefficients are
    ranked by |beta| (then by |Z_i^T Y|, then by lower index).

    Args:
      Z: (n, c, m), Z[:, i, :] = X_i W_i^T, the contribution of input channel i to the
        m outputs at n sampled positions; or a sequence of such arrays (one per
        consumer layer, same c), whose objectives are summed.
      Y: (n, m) target outputs, or a sequence matching Z.
      keep: number of channels to keep, 1 <= keep <= c.
      candidates: optional (c,) bool; only these channels may be kept.
      return_info: also return a dict with `beta`, `lam` and `exact`.
    Returns:
      (c,) bool keep mask (and the info dict if `return_info`).
    """
    Zs = [Z] if not isinstance(Z, (list, tuple)) else list(Z)
    Ys = [Y] if not isinstance(Y, (list, tuple)) else list(Y)
    if len(Zs) != len(Ys):
        raise ValueError(f"select_channels: {len(Zs)} Z arrays but {len(Ys)} Y arrays")
    G = b = None
    rows = 0
    for z, y in zip(Zs, Ys):
        g_, b_, r_ = _gram_from_z(jnp.asarray(z, jnp.float32), jnp.asarray(y, jnp.float32))
        G, b, rows = (g_, b_, r_) if G is None else (G + g_, b + b_, rows + r_)
    c = G.shape[0]
    candidates = np.ones(c, bool) if candidates is None else np.asarray(candidates, bool)
    if candidates.shape != (c,):
        raise ValueError(f"select_channels: candidates of shape {candidates.shape} for {c} channels")
    if not 1 <= keep <= int(candidates.sum()):
        raise ValueError(f"select_channels: keep={keep} must be in [1, {int(candidates.sum())}] "
                         f"(the number of candidate channels)")
    mask, beta, lam, exact = _select_padded(G / rows, b / rows, keep, candidates, num_bisect=num_bisect,
                                            num_iters=num_iters, tol=tol, lam_min_ratio=lam_min_ratio)
    if return_info:
        return mask, dict(beta=beta, lam=float(lam), exact=bool(exact))
    return mask


# --------------------------------------------------------------------------------------
# Step (ii): least-squares reconstruction, Eq. (4)
# --------------------------------------------------------------------------------------

RIDGE_GRID = (0.0,) + tuple(float(10.0 ** e) for e in np.arange(-8.0, -0.5, 0.5))
"""Ridge values tried by `ridge="auto"`, relative to the largest squared singular value."""


def _svd_ridge(Xf, Y, ridge, auto: bool):
    """min_W ||Y - Xf W||^2 + ridge * n * ||W||^2 by thin SVD (minimum norm at ridge 0).

    With `auto`, the ridge is chosen from RIDGE_GRID (times s_max^2) by the exact
    leave-one-out (PRESS) error e_i = r_i / (1 - h_ii) of ridge regression.
    """
    n, p = Xf.shape
    U, s, Vt = jnp.linalg.svd(Xf, full_matrices=False)
    valid = s > s[0] * jnp.finfo(Xf.dtype).eps * max(n, p)
    UtY = jnp.dot(U.T, Y, precision=_HIGHEST)
    s2 = s * s
    if auto:
        def press(lam):
            f = jnp.where(valid, s2 / jnp.maximum(s2 + lam, _TINY), 0.0)
            fitted = jnp.dot(U, f[:, None] * UtY, precision=_HIGHEST)
            lev = jnp.dot(U * U, f, precision=_HIGHEST)
            resid = (Y - fitted) / jnp.maximum(1.0 - lev, 1e-6)[:, None]
            return jnp.sum(resid * resid)
        grid = jnp.asarray(RIDGE_GRID, jnp.float32) * s2[0]
        lam = grid[jnp.argmin(jax.vmap(press)(grid))]
    else:
        lam = ridge * n
    d = jnp.where(valid, s / jnp.maximum(s2 + lam, _TINY), 0.0)
    return jnp.dot(Vt.T, d[:, None] * UtY, precision=_HIGHEST)


@functools.partial(jax.jit, static_argnames=("kernel_shape", "auto"))
def _refit(X, Y, kept, ridge, kernel_shape, auto):
    X = jnp.asarray(X, jnp.float32)
    if X.ndim == 2:
        X = X[:, None, :]
    Y = jnp.asarray(Y, jnp.float32)
    n, r, c = X.shape
    keepf = jnp.asarray(kept, jnp.float32)
    Xf = (X * keepf[None, None, :]).reshape(n, r * c)
    W = _svd_ridge(Xf, Y, jnp.float32(ridge), auto).reshape(r, c, -1) * keepf[None, :, None]
    return W if kernel_shape is None else W.reshape(kernel_shape)


def least_squares_refit(X, Y, kept, *, ridge: float | str = 0.0, kernel_shape: tuple | None = None):
    """Refits the kept channels' weights by least squares, He et al. 2017 Eq. (4).

    W = argmin_W ||Y - X_kept W||_F^2 (+ ridge * n * ||W||_F^2), solved by a thin SVD
    of the patch matrix (minimum-norm solution when rank deficient, like
    `jnp.linalg.lstsq`) with the pruned channels' columns zeroed, so shapes stay
    static; the pruned channels' rows of W are exactly 0. `ridge="auto"` (*our
    choice*, not in He et al.) picks the ridge by exact leave-one-out error over
    RIDGE_GRID, 0 included: it matters when the samples are few for the kept
    weights, e.g. a Dense layer fed by a flattened conv map, which gets one row per
    image.

    Args:
      X: (n, r, c) patches (r taps in HWIO order, or r flattened positions), or (n, c).
      Y: (n, m) target outputs (pre-bias).
      kept: (c,) bool mask of the kept input channels.
      ridge: float >= 0, or "auto".
      kernel_shape: optional layer kernel shape (HWIO conv or (r * c, m) dense) to
        reshape the result to.
    Returns:
      W of shape (r, c, m) (or `kernel_shape`), float32.
    """
    auto = isinstance(ridge, str)
    if auto and ridge != "auto":
        raise ValueError(f"least_squares_refit: ridge must be a float >= 0 or 'auto', got '{ridge}'")
    if not auto and ridge < 0:
        raise ValueError(f"least_squares_refit: ridge must be >= 0, got {ridge}")
    kernel_shape = None if kernel_shape is None else tuple(int(d) for d in kernel_shape)
    return _refit(X, Y, kept, 0.0 if auto else float(ridge), kernel_shape, auto)


# --------------------------------------------------------------------------------------
# Feature sampling
# --------------------------------------------------------------------------------------

def _explicit_padding(padding, in_hw, kernel, strides):
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    if isinstance(padding, str):
        if padding.upper() == "VALID":
            return ((0, 0), (0, 0))
        if padding.upper() == "SAME":
            pads = []
            for size, k, s in zip(in_hw, kernel, strides):
                out = -(-size // s)
                total = max((out - 1) * s + k - size, 0)
                pads.append((total // 2, total - total // 2))
            return tuple(pads)
        raise ValueError(f"LASSO channel pruning supports SAME / VALID / explicit padding, got '{padding}'")
    return tuple(tuple(int(v) for v in p) for p in padding)


def _conv_patches(x, mod: Conv, positions, out_w: int):
    """(B*P, kh*kw, C) input patches of `mod` at flat output positions (B, P)."""
    kh, kw = mod.kernel_size
    strides = (mod.strides,) * 2 if isinstance(mod.strides, int) else tuple(mod.strides)
    pads = _explicit_padding(mod.padding, x.shape[1:3], (kh, kw), strides)
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    rows, cols = (positions // out_w) * strides[0], (positions % out_w) * strides[1]
    window = lambda img, i, j: jax.lax.dynamic_slice(img, (i, j, 0), (kh, kw, img.shape[-1]))
    patches = jax.vmap(jax.vmap(window, in_axes=(None, 0, 0)))(xp, rows, cols)  # (B, P, kh, kw, C)
    B, P = positions.shape
    return patches.reshape(B * P, kh * kw, x.shape[-1])


_BUCKET = 32


def _bucket(size: int) -> int:
    """Channel counts are zero-padded to multiples of _BUCKET inside the driver, so one
    compilation of each per-layer function serves layers of similar widths."""
    return -(-size // _BUCKET) * _BUCKET


def _pad_axis(x, axis: int, size: int, np_=jnp):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return np_.pad(x, pad)


_np_pad = functools.partial(_pad_axis, np_=np)


@functools.lru_cache(maxsize=16)
def _make_sampler(table: ModelTable):
    """Jitted `sample(variables, images, positions, paths) -> {path: (n, r, c_padded)}`
    recording the inputs of the layers in `paths` (static) with
    `flax.linen.intercept_methods`; channels are zero-padded to a _BUCKET multiple."""
    info = {l.path: l for l in table.layers}

    @functools.partial(jax.jit, static_argnames=("paths",))
    def sample(variables, images, positions, paths):
        out = {}

        def interceptor(next_fun, args, kwargs, context):
            mod = context.module
            if context.method_name == "__call__" and isinstance(mod, (Conv, Dense)):
                path = "/".join(mod.path)
                if path in paths:
                    x = args[0]
                    if isinstance(mod, Conv):
                        patches = _conv_patches(x, mod, positions[path], info[path].out_hw[1])
                    else:
                        patches = x.reshape(x.shape[0], info[path].in_repeat, -1)
                    out[path] = _pad_axis(patches, 2, _bucket(patches.shape[2]))
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            table.model.apply(variables, images, train=False)
        return out

    return sample


def _sample_inputs(sample, variables, images, positions, paths, batch_size, keep_paths):
    """Runs `sample` over `images` in fixed-size batches (last one padded); returns the
    patches of `keep_paths`. `paths` (all consumers) stays fixed so that one compiled
    sampler serves every pass."""
    n = images.shape[0]
    chunks = {p: [] for p in keep_paths}
    for start in range(0, n, batch_size):
        batch = images[start:start + batch_size]
        nb = batch.shape[0]
        if nb < batch_size and n > batch_size:
            batch = np.concatenate([batch, np.zeros((batch_size - nb, *batch.shape[1:]), batch.dtype)])
        pos = {p: v[start:start + batch_size] for p, v in positions.items() if p in paths}
        pos = {p: np.concatenate([v, np.zeros((batch.shape[0] - nb, v.shape[1]), v.dtype)]) for p, v in pos.items()}
        out = sample(variables, jnp.asarray(batch), pos, paths)
        for p in keep_paths:
            per_image = out[p].shape[0] // batch.shape[0]
            chunks[p].append(out[p][:nb * per_image])
    return {p: jnp.concatenate(v) for p, v in chunks.items()}


# --------------------------------------------------------------------------------------
# Model-level driver
# --------------------------------------------------------------------------------------

def _consumers(table: ModelTable, group: int) -> list[LayerInfo]:
    return [l for l in table.layers if l.in_group == group]


def _kernel_path(path: str) -> tuple[str, ...]:
    return tuple(path.split("/")) + ("kernel",)


def lasso_groups(table: ModelTable, params: Mapping | None = None) -> list[int]:
    """Groups LASSO can prune, in network order (first consumer's call order).

    A group qualifies when it has at least one consumer (a layer with in_group == g)
    and every consumer is a dense or ordinary (not depthwise, not grouped) conv, i.e.
    a layer whose output is a sum over the group's channels (He et al.'s Z_i).
    `params` (optional) lets grouped convs be detected from kernel shapes.
    """
    flat = traverse_util.flatten_dict(dict(params)) if params is not None else None
    first = {}
    for g in range(table.num_groups):
        cons = _consumers(table, g)
        if not cons or any(l.depthwise for l in cons):
            continue
        if flat is not None and any(
                _kernel_path(l.path) in flat and
                flat[_kernel_path(l.path)].shape[-2 if l.kind == "conv" else 0] != table.widths[g] * l.in_repeat
                for l in cons):
            continue
        first[g] = min(table.layers.index(l) for l in cons)
    return sorted(first, key=first.get)


def _gram_from_patches(X, W, Y):
    """Gram G_ij = <Z_i, Z_j> and b_i = <Z_i, Y> of Eq. (3) without forming Z.

    Z[n, i, :] = sum_r X[n, r, i] W[r, i, :]; with C = X^T X over the (r, i) columns
    and K = W W^T, G_ij = sum_{r,s} C[(r,i),(s,j)] K[(r,i),(s,j)] and
    b_i = sum_{r,m} (X^T Y)[(r,i), m] W[(r,i), m]: memory O((r c)^2), not O(n c m).
    """
    n, r, c = X.shape
    Xf, Wf = X.reshape(n, r * c), W.reshape(r * c, -1)
    cov = jnp.dot(Xf.T, Xf, precision=_HIGHEST)
    ker = jnp.dot(Wf, Wf.T, precision=_HIGHEST)
    G = (cov * ker).reshape(r, c, r, c).sum(axis=(0, 2))
    b = (jnp.dot(Xf.T, Y, precision=_HIGHEST) * Wf).reshape(r, c, -1).sum(axis=(0, 2))
    return G, b


@jax.jit
def _target(X, W, out_mask):
    """The consumer's pre-bias output at the sampled positions: sum_i X_i W_i^T."""
    return jnp.einsum("nrc,rcm->nm", X, W * out_mask, precision=_HIGHEST)


@jax.jit
def _consumer_gram(X, W, Y, out_mask):
    """One consumer's term of Eq. (3) as (G, b), over its kept outputs only, with
    ||W_i||_F = 1 (Eq. 2) and divided by ||Y||_F^2 (relative reconstruction error)."""
    W = W * out_mask
    W = W / jnp.maximum(jnp.sqrt(jnp.sum(W * W, axis=(0, 2), keepdims=True)), _TINY)
    Y = Y * out_mask
    scale = jnp.maximum(jnp.sum(Y * Y), _TINY)
    G, b = _gram_from_patches(X, W, Y)
    return G / scale, b / scale


def lasso_prune(table: ModelTable, variables: Mapping, images, keep_counts: Sequence[int],
                groups: Sequence[int] | None = None, positions_per_image: int = 10, seed: int = 0, *,
                batch_size: int = 256, ridge: float | str = "auto", num_bisect: int = 60, num_iters: int = 3000):
    """Channel pruning of He et al. 2017 over a whole network; returns (group_masks, variables).

    For every group g in `groups` (default: every group of `lasso_groups` whose kept
    count would shrink), in network order:

    1. sample the inputs of g's consumer layers with the *current* network (earlier
       groups already pruned and refitted: He et al.'s sequential pruning, Sec. 3.2)
       on `images`, at `positions_per_image` random output positions per image for a
       conv (one row per image for a dense layer);
    2. take as targets the consumers' outputs (pre-bias) in the *original* network at
       the same positions (Eq. 5: Y' from the un-pruned model);
    3. pick exactly `keep_counts[g]` of the currently kept channels by the LASSO of
       Eq. (3) with ||W_i||_F = 1 (Eq. 2), summed over consumers (each divided by its
       ||Y_l||^2), restricted to outputs the current masks keep;
    4. write the group mask, and refit every consumer's kernel on the kept channels by
       least squares (Eq. 4); rows of pruned channels are set to 0, so the masked
       network and `jaxcompress.pruning.shrink`'s smaller network agree.

    Biases and BatchNorm statistics are unchanged (the refit reconstructs the
    original pre-bias outputs). The `quant` collection is ignored while sampling
    (full-precision reconstruction) and passed through unchanged.

    Args:
      table: the model's `ModelTable`.
      variables: `params` (+ `batch_stats`, `masks`, `quant`) of the network.
      images: float32 NHWC batch, normalised, shaped like the table's input (a few
        hundred images; He et al. sample 5000 images x 10 positions on ImageNet).
      keep_counts: channels to keep, one entry per group (entries of groups not
        processed are ignored).
      groups: groups to process (each must be in `lasso_groups`); processed in
        network order whatever order is given.
      positions_per_image: sampled output positions per image (all if fewer exist).
      seed: seed of the position sampling.
      batch_size: images per forward pass while sampling.
      ridge: ridge of the refit (`least_squares_refit`): "auto" (default; leave-one-out
        choice, 0 included) or a fixed float (0.0 = He et al.'s plain least squares).
    Returns:
      (group_masks, new_variables): one float32 0/1 mask per group and the variables
      with refitted kernels and the new `masks` collection.
    """
    images = np.asarray(images, np.float32)
    if tuple(images.shape[1:]) != tuple(table.input_shape):
        raise ValueError(f"lasso_prune: images of shape {images.shape[1:]} but the table was built for "
                         f"{tuple(table.input_shape)}")
    if len(keep_counts) != table.num_groups:
        raise ValueError(f"lasso_prune: {len(keep_counts)} keep counts for {table.num_groups} channel groups")
    params_flat = traverse_util.flatten_dict(dict(variables["params"]))
    masks = variables.get("masks")
    masks_flat = traverse_util.flatten_dict(dict(masks)) if masks is not None else {}
    group_masks = [jnp.asarray(m, jnp.float32) for m in (
        table.group_masks(masks) if masks is not None else [np.ones(w, np.float32) for w in table.widths])]
    alive = [np.asarray(m) > 0 for m in group_masks]

    eligible = lasso_groups(table, variables["params"])
    if groups is None:
        groups = [g for g in eligible if keep_counts[g] < alive[g].sum()]
    else:
        bad = [g for g in groups if g not in eligible]
        if bad:
            raise ValueError(f"lasso_prune: groups {[table.group_names[g] for g in bad]} cannot be pruned by "
                             f"LASSO (no consumer, or a depthwise / grouped consumer); eligible groups: "
                             f"{[table.group_names[g] for g in eligible]}")
        groups = [g for g in eligible if g in set(groups)]
    for g in groups:
        if not 1 <= keep_counts[g] <= alive[g].sum():
            raise ValueError(f"lasso_prune: keep count {keep_counts[g]} for group {table.group_names[g]} must be "
                             f"in [1, {int(alive[g].sum())}] (its currently kept channels)")
    if not groups:
        return group_masks, dict(variables)
    for g in groups:
        for l in _consumers(table, g):
            if (tuple(l.path.split("/")) + ("kernel",)) in masks_flat:
                raise ValueError(f"lasso_prune: layer {l.path} has an element (kernel) mask; LASSO channel "
                                 f"pruning refits dense kernels, run it before element pruning")

    # Fixed sampled positions per conv consumer (same for the original and current
    # net). The sampler records every eligible consumer, so one compiled program
    # serves every pass and every call on this table.
    rng = np.random.default_rng(seed)
    consumers = {g: _consumers(table, g) for g in groups}
    all_paths = tuple(l.path for l in table.layers if l.in_group in eligible)
    positions = {}
    for l in table.layers:
        if l.path in all_paths and l.kind == "conv":
            hw = l.out_hw[0] * l.out_hw[1]
            p = min(positions_per_image, hw)
            positions[l.path] = np.argsort(rng.random((images.shape[0], hw)), axis=1)[:, :p].astype(np.int32)

    sample = _make_sampler(table)
    base = {k: v for k, v in variables.items() if k != "quant"}
    if "masks" not in base:
        base["masks"] = table.layer_masks(group_masks)
    batch_size = min(batch_size, images.shape[0])
    sample_inputs = lambda v, keep: _sample_inputs(sample, v, images, positions, all_paths, batch_size, keep)

    # Targets: the original consumers' outputs (pre-bias), He et al. Eq. (5). Kernels
    # are viewed as (r, c, m) and, like the patches, zero-padded to _BUCKET multiples.
    processed = tuple(l.path for g in groups for l in consumers[g])
    orig_x = sample_inputs(base, processed)
    targets, kernels = {}, {}
    # (Host-side numpy for these small pads and slices: no per-shape compilations.)
    out_mask = lambda flat, l, m: _np_pad(np.asarray(
        flat.get(tuple(l.path.split("/")) + ("channel",), np.ones(m)), np.float32), 0, _bucket(m))
    for g in groups:
        for l in consumers[g]:
            kernel = params_flat[_kernel_path(l.path)]
            m = kernel.shape[-1]
            W = np.asarray(kernel, np.float32).reshape(-1, table.widths[g], m)
            kernels[l.path] = (_np_pad(_np_pad(W, 1, _bucket(W.shape[1])), 2, _bucket(m)), kernel)
            targets[l.path] = _target(orig_x[l.path], kernels[l.path][0], out_mask(masks_flat, l, m))
    del orig_x

    current = dict(base)
    for g in groups:
        c = table.widths[g]
        xs = sample_inputs(current, tuple(l.path for l in consumers[g]))
        cur_masks = traverse_util.flatten_dict(dict(current["masks"]))
        G = b = 0.0
        for l in consumers[g]:
            W, kernel = kernels[l.path]
            G_l, b_l = _consumer_gram(xs[l.path], W, targets[l.path], out_mask(cur_masks, l, kernel.shape[-1]))
            G, b = G + np.asarray(G_l)[:c, :c], b + np.asarray(b_l)[:c]
        kept = np.asarray(_select_padded(G, b, keep_counts[g], alive[g], num_bisect=num_bisect,
                                         num_iters=num_iters)[0])
        group_masks[g] = jnp.asarray(kept, jnp.float32)
        alive[g] = kept
        kept_padded = _np_pad(kept, 0, _bucket(c))
        for l in consumers[g]:  # Eq. (4)
            _, kernel = kernels[l.path]
            W = np.asarray(least_squares_refit(xs[l.path], targets[l.path], kept_padded, ridge=ridge))
            params_flat[_kernel_path(l.path)] = jnp.asarray(
                W[:, :c, :kernel.shape[-1]].reshape(kernel.shape), kernel.dtype)
        current["params"] = traverse_util.unflatten_dict(params_flat)
        current["masks"] = table.layer_masks(group_masks, current["masks"])
        del xs

    new_variables = dict(variables)
    new_variables["params"] = current["params"]
    new_variables["masks"] = current["masks"]
    return group_masks, new_variables
