"""The STAMP report plot: accuracy against target-side wall time, one point per method."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_accuracy_vs_time(path: str, results: dict, title: str) -> str:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, r in results.items():
        ax.scatter(r["target_time_s"], 100 * r["accuracy"], s=40, marker="*" if name == "stamp" else "o",
                   zorder=3)
        ax.annotate(f"{name} ({r['params_pct']:.0f}% p)", (r["target_time_s"], 100 * r["accuracy"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("target-side wall time (s, log)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
