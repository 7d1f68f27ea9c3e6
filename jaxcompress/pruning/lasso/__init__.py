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
network.

Modules:
  gram.py      the (G, b) Gram form of Eq. (3), from Z or directly from patches;
  solver.py    step (i): FISTA and the lambda bisection (`lasso_fista`, `select_channels`);
  refit.py     step (ii): the least-squares / ridge refit (`least_squares_refit`);
  sampling.py  recording layer inputs (patches at random positions) in a forward pass;
  prune.py     the whole-network driver (`lasso_prune`, `lasso_groups`).

Layout used throughout: patches X have shape (n, r, c) -- n samples, r taps (k_h k_w
for a conv, in HWIO order; H*W positions for a Dense fed by a flattened NHWC map,
row index = position * C + channel), c input channels -- and a kernel is viewed as
(r, c, m), which is `kernel.reshape(r, c, m)` for both HWIO conv kernels and
(r * c, m) dense kernels.
"""
from jaxcompress.pruning.lasso.prune import lasso_groups, lasso_prune
from jaxcompress.pruning.lasso.refit import least_squares_refit
from jaxcompress.pruning.lasso.solver import lasso_fista, select_channels

__all__ = ["lasso_fista", "select_channels", "least_squares_refit", "lasso_groups", "lasso_prune"]
