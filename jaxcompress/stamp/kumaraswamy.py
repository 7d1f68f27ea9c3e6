"""Beta-Bernoulli channel gates with a Kumaraswamy keep probability (BBDropout).

Lee, Kim, Yang, Hwang, *Adaptive Network Sparsification with Dependent Variational
Beta-Bernoulli Dropout* (arXiv:1805.10896), as used by STAMP (Song, Yoon, Yang,
Hwang, arXiv:2006.12139) for its mask generator:

* keep probability pi ~ Kumaraswamy(a, b), a Beta(a, b) look-alike with a
  closed-form inverse CDF: pi = (1 - u^(1/b))^(1/a), u ~ U(0, 1)
  (reparameterised, so gradients reach a and b);
* gate z ~ RelaxedBernoulli(pi, temperature) while training (concrete / Gumbel
  relaxation, temperature 0.1), hard mask E[pi] >= threshold at test;
* prior pi ~ Beta(alpha, 1) with small alpha (1e-4) pushing towards sparsity; the
  KL(Kumaraswamy(a, b) || Beta(alpha, beta)) is the closed form of Nalisnick &
  Smyth 2017 (Stick-breaking VAEs, Eq. 12), whose infinite series vanishes for
  beta = 1.

Hand-written: distrax has no Kumaraswamy distribution (and TFP is not a dependency).
Every function is elementwise jnp, so it works under jit / vmap / grad.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import digamma, gammaln

EULER_GAMMA = 0.5772156649015329
_EPS = 1e-6


def kumaraswamy_sample(key, a, b, shape=None):
    """pi = (1 - u^(1/b))^(1/a) with u ~ U(0, 1), computed in log space."""
    shape = jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b)) if shape is None else shape
    u = jax.random.uniform(key, shape, minval=_EPS, maxval=1.0 - _EPS)
    log_pi = jnp.log1p(-jnp.exp(jnp.log(u) / b)) / a
    return jnp.clip(jnp.exp(log_pi), _EPS, 1.0 - _EPS)


def kumaraswamy_mean(a, b):
    """E[pi] = b * B(1 + 1/a, b)."""
    return jnp.exp(jnp.log(b) + gammaln(1.0 + 1.0 / a) + gammaln(b) - gammaln(1.0 + 1.0 / a + b))


def kumaraswamy_moment(a, b, n: int):
    """E[pi^n] = b * B(1 + n/a, b)."""
    return jnp.exp(jnp.log(b) + gammaln(1.0 + n / a) + gammaln(b) - gammaln(1.0 + n / a + b))


def kumaraswamy_log_prob(x, a, b):
    """log of a b x^(a-1) (1 - x^a)^(b-1) on (0, 1)."""
    return jnp.log(a) + jnp.log(b) + (a - 1) * jnp.log(x) + (b - 1) * jnp.log1p(-x ** a)


def kl_kumaraswamy_beta(a, b, alpha: float = 1e-4):
    """KL(Kumaraswamy(a, b) || Beta(alpha, 1)), closed form (Nalisnick & Smyth 2017):

        (1 - alpha/a) (-gamma - psi(b) - 1/b) + log(a b) - log(alpha) - (b - 1)/b.
    """
    return ((1.0 - alpha / a) * (-EULER_GAMMA - digamma(b) - 1.0 / b) + jnp.log(a * b)
            - jnp.log(alpha) - (b - 1.0) / b)


def relaxed_bernoulli(key, pi, temperature: float = 0.1):
    """Concrete relaxation of Bernoulli(pi): sigmoid((logit pi + logit u) / temperature)."""
    u = jax.random.uniform(key, jnp.shape(pi), minval=_EPS, maxval=1.0 - _EPS)
    logits = jnp.log(pi) - jnp.log1p(-pi) + jnp.log(u) - jnp.log1p(-u)
    return jax.nn.sigmoid(logits / temperature)


def sample_gates(key, a, b, temperature: float = 0.1):
    """One training-time gate per channel: pi ~ Kuma(a, b), z ~ RelaxedBernoulli(pi, T)."""
    k_pi, k_z = jax.random.split(key)
    return relaxed_bernoulli(k_z, kumaraswamy_sample(k_pi, a, b), temperature)
