"""Step (ii) of He et al. 2017: the least-squares reconstruction of Eq. (4).

He, Zhang, Sun, "Channel Pruning for Accelerating Very Deep Neural Networks" (ICCV
2017) refit the kept channels' weights once the LASSO has chosen them,

    Eq. (4)  min_{W'} ||Y - X' W'^T||_F^2   (X' = the kept channels' patches).

Here by a thin SVD, optionally with a ridge term; `ridge="auto"` (*our choice*, not
in He et al.) picks the ridge by exact leave-one-out error over RIDGE_GRID.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.pruning.lasso.gram import _HIGHEST, _TINY

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


@functools.partial(jax.jit, static_argnames=("kernel_shape", "auto", "num_rows"))
def _refit(X, Y, kept, ridge, kernel_shape, auto, num_rows=None):
    X = jnp.asarray(X, jnp.float32)[:num_rows]
    if X.ndim == 2:
        X = X[:, None, :]
    Y = jnp.asarray(Y, jnp.float32)[:num_rows]
    n, r, c = X.shape
    keepf = jnp.asarray(kept, jnp.float32)
    Xf = (X * keepf[None, None, :]).reshape(n, r * c)
    W = _svd_ridge(Xf, Y, jnp.float32(ridge), auto).reshape(r, c, -1) * keepf[None, :, None]
    return W if kernel_shape is None else W.reshape(kernel_shape)


def least_squares_refit(X, Y, kept, *, ridge: float | str = 0.0, kernel_shape: tuple | None = None,
                        num_rows: int | None = None):
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
      num_rows: only the first `num_rows` rows of X and Y are samples (the rest: padding,
        e.g. of a batch split over devices); default all. The SVD is not data parallel:
        give X and Y on one device (`lasso_prune` gathers them).
    Returns:
      W of shape (r, c, m) (or `kernel_shape`), float32.
    """
    auto = isinstance(ridge, str)
    if auto and ridge != "auto":
        raise ValueError(f"least_squares_refit: ridge must be a float >= 0 or 'auto', got '{ridge}'")
    if not auto and ridge < 0:
        raise ValueError(f"least_squares_refit: ridge must be >= 0, got {ridge}")
    kernel_shape = None if kernel_shape is None else tuple(int(d) for d in kernel_shape)
    num_rows = None if num_rows is None or num_rows == X.shape[0] else int(num_rows)
    return _refit(X, Y, kept, 0.0 if auto else float(ridge), kernel_shape, auto, num_rows)
