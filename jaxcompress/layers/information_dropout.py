"""Information dropout (Achille & Soatto 2018): learned, input-dependent
multiplicative log-normal noise on activations, with its KL regulariser.

Achille & Soatto, "Information Dropout: Learning Optimal Representations Through
Noisy Computation", IEEE TPAMI 40(12), 2018 (arXiv 1611.01353), section
"Information Dropout"; restated as Eqs. 6-8 of the two-stage paper (Zhan, Lin,
Cao 2021, Sec. 3.2). A layer computes a representation

    z = f(h) * eps,    log eps ~ N(0, alpha(h)^2),
    alpha(h) = alpha_min + alpha_max * sigmoid(g(h)),   alpha_min = 0.001, alpha_max = 0.7,

with g a learned head of the same width as h, and is trained on the Information
Bottleneck Lagrangian  cross-entropy + beta * KL(p(z|x) || p(z)). The paper gives
two closed forms of the KL term, one proposition per activation (equation
numbers differ between the arXiv and TPAMI versions, so we cite by content):

* ReLU, log-uniform (scale-invariant) prior p(log z) = const: the KL is
  -log alpha(h) + const; we use the constant of the authors' reference code,
  `-log(alpha / (alpha_max + alpha_min))`, which is >= 0 on the allowed range.
  See `information_dropout_kl_relu`.
* softplus, log-normal prior log z ~ N(mu, sigma^2): the KL between the two
  Gaussians of log z, 0.5 [(alpha/sigma)^2 + (log f(h) - mu)^2 / sigma^2 - 1
  + 2 (log sigma - log alpha)]. See `information_dropout_kl_softplus`.

At test time the layer is deterministic (eps = 1, z = f(h)). Note that E[eps] =
exp(alpha^2 / 2), not 1: the paper's noise has unit *median*, not unit mean (the
two-stage paper, Zhan et al. 2021 Sec. 5.4, speaks of unit mean; we follow the
original). The same log-normal noise on weight multipliers, with the same
log-uniform prior, is Kingma et al. 2015's variational dropout (and Molchanov et
al. 2017's sparse variational dropout); `jaxcompress.pruning.variational` uses it
to prune kernels.

Loss scaling: the KL returned is per example, summed over the units of the layer.
The authors' reference code averages it over the batch and divides by the number
of training examples: loss = CE + beta * mean_batch(KL) / N_train (METHODS.md,
Sec. 3). Hand-written: no JAX library provides this layer.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

ALPHA_MIN = 0.001
"""Floor added to alpha for numerical stability (Achille & Soatto's 0.001)."""
ALPHA_MAX = 0.7
"""Achille & Soatto's default cap on the noise scale alpha."""
ACTIVATIONS = ("relu", "softplus")


def information_dropout_alpha(logits: Array, alpha_max: float = ALPHA_MAX,
                              alpha_min: float = ALPHA_MIN) -> Array:
    """alpha = alpha_min + alpha_max * sigmoid(logits), in (alpha_min, alpha_min + alpha_max)."""
    return alpha_min + alpha_max * jax.nn.sigmoid(logits)


def information_dropout_kl_relu(alpha: Array, alpha_max: float = ALPHA_MAX,
                                alpha_min: float = ALPHA_MIN) -> Array:
    """Elementwise KL for ReLU units with a log-uniform prior: -log(alpha / (alpha_max + alpha_min)).

    Achille & Soatto 2018 (ReLU proposition): with p(log z) uniform the KL of the log-normal
    posterior is -log alpha up to a constant (minus the entropy of N(., alpha^2));
    the constant log(alpha_max + alpha_min) makes it zero at the largest allowed
    noise, as in the authors' code. Differences between two alphas are exact.
    """
    return -jnp.log(alpha / (alpha_max + alpha_min))


def information_dropout_kl_softplus(alpha: Array, f: Array, mu, sigma, f_min: float = 1e-4) -> Array:
    """Elementwise KL( N(log f, alpha^2) || N(mu, sigma^2) ) for softplus units.

    Achille & Soatto 2018 (softplus proposition, log-normal prior on z):
    0.5 [(alpha/sigma)^2 + (log f - mu)^2 / sigma^2 - 1 + 2 (log sigma - log alpha)].
    As log z = log f + log eps is invertible, this is also the KL between the
    log-normal distributions of z. `f` is floored at `f_min` before the log (the
    authors' code uses 1e-4) so a vanishing softplus cannot produce -inf.
    """
    log_f = jnp.log(jnp.maximum(f, f_min))
    return 0.5 * ((alpha / sigma) ** 2 + (log_f - mu) ** 2 / sigma ** 2 - 1.0
                  + 2.0 * (jnp.log(sigma) - jnp.log(alpha)))


class InformationDropout(nn.Module):
    """Activation + information dropout: `z, kl = InformationDropout()(h, deterministic)`.

    `h` is the pre-activation (NHWC feature map or (batch, features) matrix). The
    noise scale alpha(h) comes from a learned head g of the same width as `h`: a
    1x1 convolution for 4-D inputs, a dense layer for 2-D inputs (plain Flax
    layers, so they are not seen as prunable layers by `ModelTable`). Training
    (`deterministic=False`) draws n ~ N(0, 1) from the `'dropout'` RNG stream and
    returns f(h) * exp(alpha * n); `deterministic=True` returns f(h).

    Returns `(z, kl)` with `kl` of shape (batch,): the KL summed over every unit
    of the example (also computed when deterministic, for monitoring). For
    `relu` the log-uniform prior is used (units with f(h) = 0 are included: their
    noise multiplies zero, so only alpha there is affected). For `softplus` the
    log-normal prior N(mu, sigma^2) has *learned* scalars (`prior_mu`, init
    `prior_mu`; `prior_log_sigma`, init log `prior_sigma`: sigma is kept positive
    through the log, where the reference code learns sigma directly) unless
    `learn_prior=False`, which fixes them at `prior_mu`, `prior_sigma`.
    """

    activation: str = "relu"
    alpha_max: float = ALPHA_MAX
    alpha_min: float = ALPHA_MIN
    deterministic: bool | None = None
    learn_prior: bool = True
    prior_mu: float = 0.0
    prior_sigma: float = 1.0
    head_kernel_init: Any = nn.initializers.lecun_normal()
    head_bias_init: Any = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, h: Array, deterministic: bool | None = None) -> tuple[Array, Array]:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"InformationDropout: unknown activation '{self.activation}'; "
                             f"choose one of {', '.join(ACTIVATIONS)}")
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        width = h.shape[-1]
        if h.ndim == 4:
            head = nn.Conv(width, (1, 1), kernel_init=self.head_kernel_init,
                           bias_init=self.head_bias_init, name="alpha_head")
        elif h.ndim == 2:
            head = nn.Dense(width, kernel_init=self.head_kernel_init,
                            bias_init=self.head_bias_init, name="alpha_head")
        else:
            raise ValueError(f"InformationDropout expects NHWC or (batch, features) inputs, "
                             f"got shape {h.shape}")
        alpha = information_dropout_alpha(head(h), self.alpha_max, self.alpha_min)
        f = nn.relu(h) if self.activation == "relu" else nn.softplus(h)
        if self.activation == "relu":
            kl = information_dropout_kl_relu(alpha, self.alpha_max, self.alpha_min)
        else:
            if self.learn_prior:
                mu = self.param("prior_mu", nn.initializers.constant(self.prior_mu), ())
                log_sigma = self.param("prior_log_sigma",
                                       nn.initializers.constant(jnp.log(self.prior_sigma)), ())
                sigma = jnp.exp(log_sigma)
            else:
                mu, sigma = self.prior_mu, self.prior_sigma
            kl = information_dropout_kl_softplus(alpha, f, mu, sigma)
        kl = kl.reshape(kl.shape[0], -1).sum(axis=1)
        if deterministic:
            return f, kl
        n = jax.random.normal(self.make_rng("dropout"), f.shape, f.dtype)
        return f * jnp.exp(alpha * n), kl
