"""Every figure, drawn from artifacts or values passed in; nothing here computes results."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless everywhere; notebooks show figures through store.save_figure or show()
import matplotlib.pyplot as plt
import numpy as np

from .allocation import Allocation


def show(fig) -> None:
    """Display a figure inline as PNG (the Agg backend shows nothing by itself) and close it."""
    import io

    from IPython.display import Image, display

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    display(Image(data=buf.getvalue()))


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


def objective_space(phase2: dict, phase3: dict | None = None):
    """Every scored candidate (validation loss vs memory), coloured by generation; full-fidelity
    scores, the Pareto set and the BO candidates marked. Fidelities are drawn, never mixed, apart."""
    fig, ax = plt.subplots(figsize=(7, 4))
    evals = phase2["evaluations"]
    gens = sorted({r["generation"] for r in evals})
    cmap = plt.get_cmap("viridis", max(len(gens), 2))
    for k, g in enumerate(gens):
        pts = [(r["budget_ratio"], r["objective"]) for r in evals if r["generation"] == g and not r["failed"]]
        ax.scatter(*zip(*pts), s=18, color=cmap(k), alpha=0.8,
                   label=f"gen {g} ({phase2['search_fidelity']} fidelity)")
    full = [(r["budget_ratio"], r["objective"]) for r in phase2["promoted"]]
    if full:
        ax.scatter(*zip(*full), s=40, facecolors="none", edgecolors="k", label="full fidelity (promoted)")
    front = sorted((r["budget_ratio"], r["objective"]) for r in (phase3 or phase2)["pareto"])
    ax.plot(*zip(*front), "r-", marker="s", ms=5, label="Pareto set (full fidelity)")
    if phase3:
        bo_pts = [(s["candidate"]["budget_ratio"], s["candidate"]["objective"]) for s in phase3["steps"]
                  if "candidate" in s]
        if bo_pts:
            ax.scatter(*zip(*bo_pts), marker="*", s=140, color="orange", edgecolors="k", label="BO candidates")
        sel = phase3["selected"]
        ax.scatter([sel["budget_ratio"]], [sel["objective"]], marker="X", s=120, color="red", label="selected")
    by_key = {r["key"]: r for r in evals}
    uniform = [(m["origin"].removeprefix("uniform "), by_key[m["key"]]) for m in phase2.get("first_generation", [])
               if m["origin"].startswith("uniform") and m["key"] in by_key and not by_key[m["key"]]["failed"]]
    if uniform:
        ax.scatter([r["budget_ratio"] for _, r in uniform], [r["objective"] for _, r in uniform], marker="D", s=36,
                   facecolors="none", edgecolors="tab:purple", label="uniform allocations")
        for label, r in uniform:
            ax.annotate(label, (r["budget_ratio"], r["objective"]), fontsize=6, xytext=(3, -8), textcoords="offset points")
    ax.axvline(1.0, color="grey", ls="--", lw=1, label="budget")
    ax.set_xlabel("block memory / budget (uniform 4-bit, rank 8)")
    metric = evals[0]["metric"] if evals else "loss"
    ax.set_ylabel("proxy validation loss" if metric == "loss" else f"proxy error rate on {metric}")
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def hypervolume_curve(phase2: dict):
    fig, ax = plt.subplots(figsize=(5, 3))
    gens = [g["generation"] for g in phase2["generations"]]
    ax.plot(gens, [g["hv"] for g in phase2["generations"]], marker="o")
    ax.set_xticks(gens)
    ax.set_xlabel("generation")
    ax.set_ylabel("hypervolume (normalized)")
    ax.set_title(f"NSGA-II front, {phase2['search_fidelity']} fidelity", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def bo_trace(phase3: dict):
    """Utility of each BO candidate against the best utility Phase II had found."""
    fig, ax = plt.subplots(figsize=(5, 3))
    steps = [s for s in phase3["steps"] if "candidate" in s]
    phase2_best = max(r["utility"] for r in phase3["observed"] if r["generation"] is not None) \
        if any(r["generation"] is not None for r in phase3["observed"]) else None
    ax.plot([s["iteration"] for s in steps], [s["observed_utility"] for s in steps], "o-", label="BO candidate")
    if phase2_best is not None:
        ax.axhline(phase2_best, color="grey", ls="--", label="best of Phase II")
    ax.set_xlabel("BO iteration")
    ax.set_ylabel(f"utility (a = {phase3['alpha']})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def metric_vs_memory(table, metric: str, ylabel: str, pareto_mib=None, budget_mib=None, scale: float = 1.0):
    """One point per method (mean over seeds, error bar = std) against block memory; the search's
    Pareto-set memories as a rug on the x axis, and the budget line. With a budget, a second panel
    zooms on the methods within 10% of it, where the comparison the paper makes happens."""
    near = table[(table["memory_MiB"] - budget_mib).abs() <= 0.1 * budget_mib] if budget_mib else table.iloc[:0]
    zoom = 1 < len(near) < len(table)
    fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(12 if zoom else 7, 4), squeeze=False)
    markers = "osD^vP*Xhp"
    for ax in axes[0]:
        for k, (_, row) in enumerate(table.iterrows()):
            err = row.get(f"{metric}_std")
            ax.errorbar(row["memory_MiB"], row[metric] * scale, yerr=None if err != err else err * scale,
                        fmt=markers[k % len(markers)], capsize=3, label=row["name"])
        ax.set_xlabel("block memory (MiB, quantized weights + adapters)")
        ax.grid(alpha=0.3)
    if zoom:
        ax = axes[0][1]
        std = near[f"{metric}_std"].fillna(0) if f"{metric}_std" in near else 0
        lo, hi = ((near[metric] - std) * scale).min(), ((near[metric] + std) * scale).max()
        pad = 0.1 * (hi - lo) or 0.05 * abs(hi)
        ax.set_xlim(0.9 * budget_mib, 1.03 * budget_mib)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_title("near the budget", fontsize=9)
    for ax in axes[0]:
        if pareto_mib:
            lo = ax.get_ylim()[0]
            ax.plot(pareto_mib, [lo] * len(pareto_mib), "r|", ms=14, mew=2, label="search Pareto set (memory)")
        if budget_mib:
            ax.axvline(budget_mib, color="grey", ls="--", lw=1, label="budget")
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    return fig


def task_bars(table, tasks: list[str]):
    """Grouped bars: headline metric per task (%), one bar per method, error bars = std over seeds."""
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(tasks) + 2), 3.6))
    width = 0.8 / max(len(table), 1)
    x = np.arange(len(tasks))
    for k, (_, row) in enumerate(table.iterrows()):
        vals = [row[t] * 100 for t in tasks]
        errs = [0 if row.get(f"{t}_std") != row.get(f"{t}_std") else row.get(f"{t}_std", 0) * 100 for t in tasks]
        ax.bar(x + k * width - 0.4 + width / 2, vals, width, yerr=errs, capsize=2, label=row["name"])
    ax.set_xticks(x, tasks, rotation=20)
    ax.set_ylabel("accuracy / exact match (%)")
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def loss_curves(curves: dict, window: int = 10):
    """Training loss per step (moving average over `window` steps), one line per run label."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for label, losses in curves.items():
        y = np.convolve(losses, np.ones(window) / window, mode="valid") if len(losses) >= window else losses
        ax.plot(range(len(y)), y, label=label, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(f"train loss (moving avg, {window})")
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def pilot_bars(table, metric: str = "test_loss", ylabel: str = "test loss after fine-tuning"):
    """Configs A-D: mean over seeds with std error bars, memory / budget under each label."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = np.arange(len(table))
    ax.bar(x, table[metric], yerr=table.get(f"{metric}_std"), capsize=4, color="tab:blue", alpha=0.8)
    labels = [f"{n.split(':')[0]}\n{m:.0f} MiB" for n, m in zip(table["name"], table["memory_MiB"])]
    ax.set_xticks(x, labels)
    lo = (table[metric] - table.get(f"{metric}_std", 0).fillna(0)).min()
    hi = (table[metric] + table.get(f"{metric}_std", 0).fillna(0)).max()
    ax.set_ylim(lo - 0.15 * (hi - lo + 1e-9), hi + 0.15 * (hi - lo + 1e-9))
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def rank_sweep(per_run, metric: str = "test_loss", ylabel: str = "test loss after fine-tuning"):
    """Uniform (bits, rank) sweep: one line per bit-width over rank."""
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for bits, grp in per_run.groupby("bits"):
        grp = grp.sort_values("rank")
        ax.plot(grp["rank"], grp[metric], marker="o", label=f"{bits}-bit")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(per_run["rank"].unique()), [str(r) for r in sorted(per_run["rank"].unique())])
    ax.set_xlabel("LoRA rank (every block)")
    ax.set_ylabel(ylabel)
    ax.legend(title="weights")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


VERDICT_COLOURS = {"better": "tab:green", "worse": "tab:red", "equivalent": "tab:blue", "can't tell": "tab:gray"}


def paired_intervals(claims):
    """Each claim's paired difference (a - b) with its 95% interval and margin, one panel per metric;
    the colour is the verdict."""
    metrics = list(dict.fromkeys(claims["metric"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 0.55 * claims["claim"].nunique() + 1.6),
                             squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        rows = claims[claims["metric"] == metric].reset_index(drop=True)
        y = np.arange(len(rows))[::-1]
        for yi, (_, r) in zip(y, rows.iterrows()):
            ax.errorbar(r["a_minus_b"], yi, xerr=[[r["a_minus_b"] - r["ci95_low"]], [r["ci95_high"] - r["a_minus_b"]]],
                        fmt="o", capsize=4, color=VERDICT_COLOURS[r["verdict"]], label=r["verdict"])
        margin = rows["margin"].iloc[0]
        ax.axvspan(-margin, margin, color="tab:blue", alpha=0.08)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(y, [f"{r['a']}\nvs {r['b']}" for _, r in rows.iterrows()], fontsize=8)
        better = "lower" if metric == "test loss" else "higher"
        ax.set_xlabel(f"{metric}: a - b ({better} is better for a); shaded: +-margin")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=8, loc="best")
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def calibration_plot(result: dict):
    """Left: Spearman (proxy vs final test loss) against proxy length, one line per n_val. Right: the
    recommended proxy's score (mean over proxy seeds, bars = the seeds' range) against the final loss."""
    import pandas as pd

    table, scores = pd.DataFrame(result["table"]), pd.DataFrame(result["scores"])
    finals = pd.DataFrame(result["finals"]).set_index("method")
    rec = result["recommendation"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for n_val, g in table.groupby("n_val"):
        a.plot(g["length"], g["spearman"], marker="o", label=f"{n_val} validation pairs")
    a.axhline(0.8, color="gray", ls="--", lw=0.8)
    a.set_xlabel("proxy length (LoRA steps; 0 = before training)")
    a.set_ylabel("Spearman with the final test loss")
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
    g = scores[(scores["length"] == rec["length"]) & (scores["n_val"] == rec["n_val"])]
    stats = g.groupby("method")["proxy_loss"].agg(["mean", "min", "max"])
    y = finals.loc[stats.index, "final_test_loss"]
    b.errorbar(stats["mean"], y, xerr=[stats["mean"] - stats["min"], stats["max"] - stats["mean"]], fmt="o", capsize=3)
    for m, xv, yv in zip(stats.index, stats["mean"], y):
        b.annotate(finals.loc[m, "name"], (xv, yv), fontsize=7, xytext=(3, 3), textcoords="offset points")
    b.set_xlabel(f"proxy loss ({rec['length']} steps, {rec['n_val']} pairs; bars: proxy seeds)")
    b.set_ylabel("final test loss")
    b.grid(alpha=0.3)
    fig.tight_layout()
    return fig
