"""Search reports: Pareto fronts of evaluated candidates, best policy per budget, plots."""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jaxcompress import files  # noqa: E402
from jaxcompress.distributed import is_primary  # noqa: E402


def pareto_front(cost: Sequence[float], accuracy: Sequence[float]) -> list[int]:
    """Indices of the non-dominated points (lower cost and higher accuracy are better),
    sorted by cost. A point is dominated if another is at least as good in both and
    strictly better in one; of exact duplicates the first is kept."""
    cost, acc = np.asarray(cost, np.float64), np.asarray(accuracy, np.float64)
    order = np.lexsort((-acc, cost))  # by cost, then best accuracy first
    front, best = [], -np.inf
    for i in order:
        if acc[i] > best:
            front.append(int(i))
            best = acc[i]
    return front


def best_per_budget(cost_ratio: Sequence[float], accuracy: Sequence[float], budgets: Sequence[float]) -> list[dict]:
    """For each budget b: the most accurate evaluated point with cost_ratio <= b."""
    cost_ratio, acc = np.asarray(cost_ratio), np.asarray(accuracy)
    out = []
    for b in budgets:
        ok = np.flatnonzero(cost_ratio <= b + 1e-9)
        if ok.size:
            i = int(ok[np.argmax(acc[ok])])
            out.append(dict(budget=float(b), index=i, cost_ratio=float(cost_ratio[i]), accuracy=float(acc[i])))
        else:
            out.append(dict(budget=float(b), index=None))
    return out


def moving_best(values: Sequence[float]) -> np.ndarray:
    return np.maximum.accumulate(np.asarray(values, np.float64)) if len(values) else np.zeros(0)


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    v = np.asarray(values, np.float64)
    if v.size == 0 or window <= 1:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    out = np.empty_like(v)
    for i in range(v.size):
        lo = max(0, i + 1 - window)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


def _save(fig, path: str) -> str:
    if is_primary():  # one writer on many hosts
        fig.tight_layout()
        files.save_figure(fig, path)
    plt.close(fig)
    return path


def plot_pareto(path: str, panels: Sequence[dict]) -> str:
    """One panel per dict(x, y, front (indices), xlabel, ylabel, title): all points and the front."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, p in zip(axes[0], panels):
        x, y = np.asarray(p["x"]), np.asarray(p["y"])
        ax.scatter(x, y, s=6, alpha=0.35, label="evaluated")
        f = np.asarray(p["front"], int)
        if f.size:
            ax.plot(x[f], y[f], "r.-", label="Pareto front")
        ax.set_xlabel(p["xlabel"])
        ax.set_ylabel(p["ylabel"])
        ax.set_title(p["title"])
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_reward_curves(path: str, curves: Mapping[str, Sequence[float]], title: str, window: int = 20,
                       best: bool = True) -> str:
    """Reward per episode (moving average over `window`) and the best so far, one line each."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (label, r) in enumerate(curves.items()):
        color = f"C{i % 10}"
        ax.plot(smooth(r, window), color=color, label=f"{label} (mean of {window})" if window > 1 else label)
        if best:
            ax.plot(moving_best(r), color=color, linestyle="--", linewidth=0.8, label=f"{label} (best so far)")
    ax.set_xlabel("episode")
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_policy(path: str, layer_names: Sequence[str], rates: Sequence[float] | None, bits: Sequence[float] | None,
                title: str) -> str:
    """Per-layer bars of pruning rates and weight bits (the paper's Figure 4)."""
    panels = [(v, lab) for v, lab in ((rates, "pruning rate"), (bits, "weight bits")) if v is not None]
    x = np.arange(len(layer_names))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 0.4 * len(layer_names) + 2), 2.8 * len(panels)),
                             squeeze=False)
    for ax, (values, label) in zip(axes[:, 0], panels):
        ax.bar(x, values, color="C0" if label == "pruning rate" else "C1")
        ax.set_ylabel(label)
        ax.set_xticks(x, layer_names, rotation=70, ha="right", fontsize=7)
        if label == "pruning rate":
            ax.set_ylim(0, 1)
    axes[0, 0].set_title(title)
    return _save(fig, path)
