"""The Gram form of He et al. 2017's LASSO, Eq. (3), built from sampled patches.

He, Zhang, Sun, "Channel Pruning for Accelerating Very Deep Neural Networks" (ICCV
2017). With Z_i = X_i W_i^T the contribution of input channel i to a layer's output
Y, the LASSO objective 1/(2N) ||Y - sum_i beta_i Z_i||_F^2 depends on the data only
through G_ij = <Z_i, Z_j> and b_i = <Z_i, Y>; the solver (`solver.py`) works on
(G, b), whose size is c x c whatever the number of samples. Shapes follow the
package's layout: patches X (n, r, c), kernels W (r, c, m), targets Y (n, m).

`gram_fns(mesh)` gives the jitted target and Gram functions data parallel over a
('data',) mesh: X and Y split by rows (`P('data')`), kernels and masks replicated, so
the sums over samples in G and b (and ||Y||^2) become all-reduces; zero rows (batch
padding, `sampling.py`) add nothing to them.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxcompress.train.steps import batch_sharded, replicated

_HIGHEST = jax.lax.Precision.HIGHEST
_TINY = 1e-30


def _gram_from_z(Z, Y):
    """(G, b, rows) of Eq. (3) from explicit Z (n, c, m) and Y (n, m); rows = n * m."""
    G = jnp.einsum("nim,njm->ij", Z, Z, precision=_HIGHEST)
    b = jnp.einsum("nim,nm->i", Z, Y, precision=_HIGHEST)
    return G, b, Z.shape[0] * Z.shape[2]


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


def _target_impl(X, W, out_mask):
    """The consumer's pre-bias output at the sampled positions: sum_i X_i W_i^T."""
    return jnp.einsum("nrc,rcm->nm", X, W * out_mask, precision=_HIGHEST)


def _consumer_gram_impl(X, W, Y, out_mask):
    """One consumer's term of Eq. (3) as (G, b), over its kept outputs only, with
    ||W_i||_F = 1 (Eq. 2) and divided by ||Y||_F^2 (relative reconstruction error)."""
    W = W * out_mask
    W = W / jnp.maximum(jnp.sqrt(jnp.sum(W * W, axis=(0, 2), keepdims=True)), _TINY)
    Y = Y * out_mask
    scale = jnp.maximum(jnp.sum(Y * Y), _TINY)
    G, b = _gram_from_patches(X, W, Y)
    return G / scale, b / scale


_target = jax.jit(_target_impl)
_consumer_gram = jax.jit(_consumer_gram_impl)


@functools.lru_cache(maxsize=8)
def gram_fns(mesh=None):
    """(target(X, W, out_mask) -> Y, consumer_gram(X, W, Y, out_mask) -> (G, b)), jitted;
    with a `mesh`, data parallel: X and Y split by rows over 'data', W, the mask, G and
    b replicated (the single-device functions without one)."""
    if mesh is None:
        return _target, _consumer_gram
    rows, rep = batch_sharded(mesh), replicated(mesh)
    return (jax.jit(_target_impl, in_shardings=(rows, rep, rep), out_shardings=rows),
            jax.jit(_consumer_gram_impl, in_shardings=(rows, rep, rows, rep), out_shardings=rep))
