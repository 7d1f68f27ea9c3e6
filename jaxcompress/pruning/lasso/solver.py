"""Step (i) of He et al. 2017: the LASSO channel selection of Eq. (3).

He, Zhang, Sun, "Channel Pruning for Accelerating Very Deep Neural Networks" (ICCV
2017) relax the channel count constraint to

    Eq. (3)  beta(lambda) = argmin 1/(2N) ||Y - sum_i beta_i Z_i||_F^2 + lambda ||beta||_1,

and increase lambda until ||beta||_0 = c', the number of channels to keep.

Hand-written: FISTA (Beck & Teboulle 2009) with adaptive restart (O'Donoghue &
Candes 2015) on the c x c Gram matrix (`gram.py`), so the whole lambda bisection is
one jitted XLA program; scikit-learn's coordinate descent is used only as the test
oracle.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.pruning.lasso.gram import _HIGHEST, _TINY, _gram_from_z


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
