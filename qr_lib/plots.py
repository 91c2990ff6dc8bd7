"""Every figure, drawn from artifacts or values passed in; nothing here computes results."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless by default; notebooks still display returned figures
import matplotlib.pyplot as plt
import numpy as np

from .allocation import Allocation


def allocation_heatmap(allocation: Allocation, title: str | None = None):
    """Two rows over block index: bit-width and LoRA rank, each cell labelled with its value."""
    n = allocation.n_blocks
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.32 * n + 1.5), 2.4), sharex=True)
    for ax, values, ladder, label, cmap in (
        (axes[0], allocation.bits, allocation.bit_ladder, "bits", "viridis"),
        (axes[1], allocation.ranks, allocation.rank_ladder, "rank", "magma"),
    ):
        idx = np.array([[ladder.index(v) for v in values]])
        ax.imshow(idx, aspect="auto", cmap=cmap, vmin=0, vmax=max(1, len(ladder) - 1))
        for i, v in enumerate(values):
            ax.text(i, 0, str(v), ha="center", va="center", fontsize=7, color="white")
        ax.set_yticks([0], [label])
    axes[1].set_xticks(range(n), [str(i) for i in range(n)], fontsize=7)
    axes[1].set_xlabel("transformer block")
    fig.suptitle(title or allocation.name or "allocation", fontsize=10)
    fig.tight_layout()
    return fig


def sensitivity_plot(result: dict):
    """Phase I: KL divergence per block, one line per profiled bit-width (log scale)."""
    fig, ax = plt.subplots(figsize=(7, 3))
    for bits, kl in sorted(result["kl"].items(), key=lambda kv: int(kv[0])):
        ax.plot(range(len(kl)), kl, marker="o", ms=3, label=f"{bits}-bit")
    ax.set_yscale("log")
    ax.set_xlabel("transformer block (quantized alone)")
    ax.set_ylabel("KL(full || quantized) per token")
    ax.legend(title="block quantized to", bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
