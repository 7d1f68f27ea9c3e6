"""Matplotlib figures (Agg backend: no display needed)."""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jaxcompress import files  # noqa: E402
from jaxcompress.distributed import is_primary  # noqa: E402


def plot_layer_bars(path: str, names: Sequence[str], series: Mapping[str, Sequence[float]], ylabel: str,
                    title: str) -> str:
    """Grouped bar chart, one group of bars per layer (e.g. dense vs pruned widths)."""
    x = np.arange(len(names))
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(names) + 2), 4))
    for i, (label, values) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=label)
    ax.set_xticks(x, names, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    if is_primary():  # one writer on many hosts
        files.save_figure(fig, path)
    plt.close(fig)
    return path
