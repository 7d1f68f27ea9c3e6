"""Statistics the benchmarks report: mean +- standard error over seeds, and paired
differences between methods run on the same seeds."""
from __future__ import annotations

import math
from typing import Sequence

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
