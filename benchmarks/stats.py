"""Statistics the benchmarks report: mean +- standard error over seeds, paired
differences between methods run on the same seeds, and rank correlations with
percentile bootstrap intervals."""
from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence

import numpy as np
from scipy import stats as scipy_stats


def mean_se(values: Sequence[float]) -> dict:
    """{mean, se, n}: the sample mean and its standard error (sample std / sqrt(n); 0 for n = 1)."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return dict(mean=mean, se=math.sqrt(var / n), n=n)


def paired(a: Sequence[float], b: Sequence[float]) -> dict:
    """a - b over the same seeds: {mean, se, n} of the differences, `p` (two-sided paired
    t-test; None below 2 pairs or when every difference is equal) and `a_better_by_1se`
    (mean difference > 0 and at least one standard error)."""
    if len(a) != len(b):
        raise ValueError(f"paired needs the same seeds on both sides, got {len(a)} and {len(b)} values")
    d = mean_se([x - y for x, y in zip(a, b)])
    p = None
    if d["n"] > 1 and d["se"] > 0:
        p = float(scipy_stats.ttest_rel(a, b).pvalue)
    return dict(d, p=p, a_better_by_1se=d["mean"] > 0 and d["mean"] >= d["se"])


def bootstrap_interval(statistic: Callable[..., float], samples: Sequence[Sequence[float]], resamples: int = 2000,
                       seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic(*samples)`: the samples (equal lengths,
    paired) are resampled together, items drawn with replacement, `resamples` times from
    `numpy.random.default_rng(seed)` (the same seed gives the same interval). Resamples
    on which the statistic is undefined (NaN, e.g. a rank correlation of a constant
    resample) are left out; (nan, nan) when none is defined."""
    arrays = [np.asarray(s, np.float64) for s in samples]
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError(f"bootstrap_interval needs paired samples of one length, got {[len(a) for a in arrays]}")
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    with warnings.catch_warnings():  # a constant resample: scipy warns and returns NaN, left out below
        warnings.simplefilter("ignore")
        values = np.asarray([statistic(*(a[i] for a in arrays)) for i in idx], np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        return math.nan, math.nan
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(values, [tail, 100.0 - tail])
    return float(lo), float(hi)


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (ties counted as in `scipy.stats.kendalltau`); NaN if x or y is constant."""
    return float(scipy_stats.kendalltau(x, y).statistic)


def spearman_rho(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (`scipy.stats.spearmanr`); NaN if x or y is constant."""
    return float(scipy_stats.spearmanr(x, y).statistic)


def rank_correlations(x: Sequence[float], y: Sequence[float], resamples: int = 2000, seed: int = 0,
                      level: float = 0.95) -> dict:
    """{tau, tau_lo, tau_hi, rho, rho_lo, rho_hi, n}: Kendall's tau-b and Spearman's rho of
    x with y, each with its `level` percentile bootstrap interval over the pairs
    (`bootstrap_interval`, both over the same resamples of the same seed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tau, rho = kendall_tau(x, y), spearman_rho(x, y)
    tau_lo, tau_hi = bootstrap_interval(kendall_tau, (x, y), resamples, seed, level)
    rho_lo, rho_hi = bootstrap_interval(spearman_rho, (x, y), resamples, seed, level)
    return dict(tau=tau, tau_lo=tau_lo, tau_hi=tau_hi, rho=rho, rho_lo=rho_lo, rho_hi=rho_hi, n=len(x))
