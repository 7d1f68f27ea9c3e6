"""The STAMP report plot: accuracy against target-side wall time, per method."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from jaxcompress import files  # noqa: E402
from jaxcompress.distributed import is_primary  # noqa: E402


def plot_accuracy_vs_time(path: str, results: dict, title: str) -> str:
    """Left: final test accuracy against target-side wall time, one point per method.
    Right: validation accuracy after each fine-tune epoch against target-side time
    (`val_curve`), the curves behind the time-to-STAMP's-accuracy ratios."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in results.items():
        star = name == "stamp"
        ax.scatter(r["target_time_s"], 100 * r["accuracy"], s=40, marker="*" if star else "o", zorder=3)
        ax.annotate(f"{name} ({r['params_pct']:.0f}% p)", (r["target_time_s"], 100 * r["accuracy"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
        curve = r.get("val_curve") or []
        if curve:
            ax2.plot([t for t, _ in curve], [100 * a for _, a in curve], marker=".", lw=2.5 if star else 1.2,
                     label=name)
    ax.set_xlabel("target-side wall time (s, log)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax2.set_xlabel("target-side wall time (s, log)")
    ax2.set_ylabel("validation accuracy after each epoch (%)")
    ax2.set_title("fine-tune curves", fontsize=9)
    if ax2.lines:
        ax2.legend(fontsize=7)
    for a in (ax, ax2):
        a.set_xscale("log")
        a.grid(alpha=0.3)
    fig.tight_layout()
    if is_primary():  # one writer on many hosts
        files.save_figure(fig, path)
    plt.close(fig)
    return path
