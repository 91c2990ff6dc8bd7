"""Every figure, drawn from artifacts or values passed in; nothing here computes results.

One colour and marker per method (STYLE), used by every figure that shows methods; notebooks add a
caption naming the model, the profile and what the error bars are (caption()).
"""
from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")  # headless everywhere; notebooks show figures through store.save_figure or show()
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..algorithm.allocation import Allocation
from ..algorithm.phases import PhaseI, PhaseII, PhaseIII
from ..config import Profile
from ..evaluate import CHANCE
from ..models import EMBEDDED, EMBEDDED_GGUF

# method id -> (colour, marker); methods not listed (pilot configs, new methods) get GREYS in order.
STYLE = {
    "qr_adaptor": ("#d62728", "*"), "qr_adaptor_3p5": ("#ff7f0e", "*"),
    "lora16": ("#1f77b4", "o"), "nf4": ("#2ca02c", "s"),
    "hqq4": ("#9467bd", "D"), "hqq3": ("#8c564b", "v"), "hqq2": ("#7f7f7f", "^"),
    "hqq4_r4": ("#c5b0d5", "d"), "hqq4_r16": ("#5b3a8c", "D"), "hqq3_g32": ("#e6550d", "v"),
    "hqq3_r16": ("#5e3a2b", "v"), "phase1_knapsack4": ("#e7ba52", "h"),
    "adalora_nf4": ("#17becf", "P"), "loftq_hqq4": ("#bcbd22", "X"),
    "bits_only": ("#e377c2", "<"), "rank_only": ("#aec7e8", ">"),
}
RANDOM_STYLE = ("#b0b0b0", "x")      # every random draw: one look, they are one baseline
LINESTYLES = ("-", "--", "-.", ":")  # told apart where colours repeat
GREYS = ["#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd"]
HIGHLIGHT = ("qr_adaptor", "qr_adaptor_3p5")

TEST_LOSS = "test loss after fine-tuning\n(nats per answer token; lower is better)"


def style(method: str, k: int = 0) -> tuple[str, str]:
    if method in STYLE:
        return STYLE[method]
    if method.startswith("random"):
        return RANDOM_STYLE
    return GREYS[k % len(GREYS)], "o"


def figure_caption(profile: Profile) -> str:
    """Model, profile and compute dtype: what every figure of a run was made with."""
    model = f"SmolLM2-135M-Instruct ({EMBEDDED_GGUF}, dequantized)" if profile.model == EMBEDDED else profile.model
    mechanics = " · random weights: checks the mechanics, not the paper" if profile.random_weights else ""
    return f"{model} · profile {profile.name} · {profile.dtype} on {profile.device}{mechanics}"


def caption(fig, text: str):
    """A footer line under the axes (the model, the profile, what the error bars are)."""
    fig.text(0.01, -0.02, text, fontsize=7, color="#555555", ha="left", va="top")
    return fig


def show(fig) -> None:
    """Display a figure inline as PNG (the Agg backend shows nothing by itself) and close it."""
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
        top = max(1, len(ladder) - 1)
        ax.imshow(idx, aspect="auto", cmap=cmap, vmin=0, vmax=top)
        for i, v in enumerate(values):
            r, g, b, _ = plt.get_cmap(cmap)(idx[0, i] / top)
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5   # readable text on any cell
            ax.text(i, 0, str(v), ha="center", va="center", fontsize=7, color="white" if dark else "black")
        ax.set_yticks([0], [label])
    axes[1].set_xticks(range(n), [str(i) for i in range(n)], fontsize=7)
    axes[1].set_xlabel("transformer block")
    fig.suptitle(title or allocation.name or "allocation", fontsize=10)
    fig.tight_layout()
    return fig


def sensitivity_plot(result: PhaseI):
    """Phase I: KL divergence per block, one line per profiled bit-width (log scale)."""
    fig, ax = plt.subplots(figsize=(7, 3))
    for bits, kl in sorted(result.kl.items(), key=lambda kv: int(kv[0])):
        ax.plot(range(len(kl)), kl, marker="o", ms=3, label=f"{bits}-bit")
    ax.set_yscale("log")
    ax.set_xlabel("transformer block (quantized alone)")
    ax.set_ylabel("KL(full || quantized) per token")
    ax.legend(title="block quantized to", bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def mark_uniform(ax, members: list[dict], records: list[dict]) -> None:
    """Open diamonds, labelled, on the uniform allocations among `members` ({"origin", "key"}) that
    have a record here."""
    by_key = {r["key"]: r for r in records}
    uniform = [(m["origin"].removeprefix("uniform "), by_key[m["key"]]) for m in members
               if m["origin"].startswith("uniform") and m["key"] in by_key and not by_key[m["key"]]["failed"]]
    if uniform:
        ax.scatter([r["budget_ratio"] for _, r in uniform], [r["objective"] for _, r in uniform], marker="D", s=40,
                   facecolors="none", edgecolors="tab:purple", label="uniform allocations")
        for label, r in uniform:
            ax.annotate(label, (r["budget_ratio"], r["objective"]), fontsize=6, xytext=(3, -8), textcoords="offset points")


def objective_space(phase2: PhaseII, phase3: PhaseIII | None = None):
    """Proxy loss against memory, one panel per proxy level (a 4-step and a 16-step loss never share an
    axis). Search level: every candidate by generation, the uniform allocations marked. Full level:
    promoted candidates, the Pareto set, and with Phase III its candidates and the selection."""
    evals, level = phase2.evaluations, phase2.search_level
    multi = level != "full"
    fig, axes = plt.subplots(1, 2 if multi else 1, figsize=(12 if multi else 7, 4), squeeze=False)
    metric = evals[0]["metric"] if evals else "loss"
    ylabel = "proxy validation loss (nats/token; lower is better)" if metric == "loss" else \
        f"proxy error rate on {metric} (lower is better)"
    steps = {name: f["train"]["steps"] for name, f in phase2.levels.items()}
    ax = axes[0][0]
    gens = sorted({r["generation"] for r in evals})
    cmap = plt.get_cmap("viridis", max(len(gens), 2))
    for k, g in enumerate(gens):
        pts = [(r["budget_ratio"], r["objective"]) for r in evals if r["generation"] == g and not r["failed"]]
        if pts:
            ax.scatter(*zip(*pts), s=18, color=cmap(k), alpha=0.8, label=f"generation {g}")
    mark_uniform(ax, phase2.first_generation, evals)
    ax.set_title(f"{level} proxy ({steps[level]} steps)", fontsize=9)
    if multi:
        ax = axes[0][1]
        full = [(r["budget_ratio"], r["objective"]) for r in phase2.promoted if not r["failed"]]
        if full:
            ax.scatter(*zip(*full), s=30, color="k", alpha=0.6, label="promoted")
        mark_uniform(ax, phase2.anchors, phase2.promoted)
        ax.set_title(f"full proxy ({steps['full']} steps)", fontsize=9)
    front = sorted((r["budget_ratio"], r["objective"]) for r in (phase3 or phase2).pareto)
    if front:
        ax.plot(*zip(*front), "r-", marker="s", ms=5, label="Pareto set")
    if phase3:
        bo_pts = [(r["budget_ratio"], r["objective"]) for r in phase3.candidates()]
        if bo_pts:
            ax.scatter(*zip(*bo_pts), marker="*", s=140, color="orange", edgecolors="k", label="BO candidates")
        sel = phase3.selected
        ax.scatter([sel["budget_ratio"]], [sel["objective"]], marker="X", s=120, color="red", label="selected")
    for ax in axes[0]:
        ax.axvline(1.0, color="grey", ls="--", lw=1, label="budget")
        ax.set_xlabel("block memory / budget (uniform 4-bit, rank 8)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def hypervolume_curve(phase2: PhaseII):
    """The front's hypervolume per generation (normalized objectives), on an axis from 0, with the
    change from the first generation written on it: a flat line is a finding (later generations did
    not move the front), not a zoomed wiggle."""
    fig, ax = plt.subplots(figsize=(5, 3))
    gens = [g["generation"] for g in phase2.generations]
    hv = [g["hv"] for g in phase2.generations]
    ax.plot(gens, hv, marker="o")
    ax.set_xticks(gens)
    ax.set_ylim(0, 1.05)          # a normalized hypervolume is at most 1
    if len(hv) > 1 and hv[0]:
        change = 100 * (hv[-1] - hv[0]) / hv[0]
        note = (f"generation {gens[0]} -> {gens[-1]}: {hv[0]:.3f} -> {hv[-1]:.3f} ({change:+.1f}%)"
                + ("\nlater generations did not move the front" if abs(change) < 1 else ""))
        ax.annotate(note, (0.03, 0.05), xycoords="axes fraction", fontsize=7)
    ax.set_xlabel("generation")
    ax.set_ylabel("hypervolume (normalized; higher is better)")
    ax.set_title(f"NSGA-II front, {phase2.search_level} proxy", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def bo_trace(phase3: PhaseIII):
    """Each BO candidate's utility (points) and the best utility so far (step line), against the best
    that Phase II had found; integer iterations."""
    fig, ax = plt.subplots(figsize=(5, 3))
    steps = [s for s in phase3.steps if "candidate" in s]
    earlier = [r["utility"] for r in phase3.observed if r["generation"] is not None]   # Phase II's points
    best = max(earlier) if earlier else -np.inf
    its = [s["iteration"] for s in steps]
    util = [s["observed_utility"] for s in steps]
    ax.scatter(its, util, color="orange", edgecolors="k", zorder=3, label="BO candidate")
    if its:
        ax.step(its, np.maximum.accumulate(np.maximum(util, best)), where="post", color="k", lw=1,
                label="best so far")
    if earlier:
        ax.axhline(best, color="grey", ls="--", label="best of Phase II")
    values = util + ([best] if earlier else [])
    if values:
        lo, hi = min(values), max(values)
        pad = 0.15 * (hi - lo) or 0.1
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xticks(its or [1])
    if earlier:
        final = max(util + [best])
        ax.annotate(f"best utility: Phase II {best:.4f}, after Phase III {final:.4f}"
                    + ("\nPhase III found nothing better" if final <= best + 1e-12 else ""),
                    (0.03, 0.05), xycoords="axes fraction", fontsize=7)
    ax.set_xlabel("BO iteration")
    ax.set_ylabel(f"utility (a = {phase3.alpha})")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _merged(table):
    """The table with every run reported under two names (finetune's same_run_as) drawn once: the row
    keeps the first method and takes both names."""
    table = table.copy()
    names = set(table["method"])
    twins = table["same_run_as"].items() if "same_run_as" in table else []
    link = {i: twin for i, twin in twins if isinstance(twin, str) and twin in names}
    drop = []
    for i, twin in link.items():
        at = table.index[table["method"] == twin][0]
        keep, gone = (i, at) if table.loc[i, "method"] in HIGHLIGHT else (at, i)   # QR-Adaptor keeps its star
        table.loc[keep, "name"] = f"{table.loc[keep, 'name']} = {table.loc[gone, 'name']}"
        drop.append(gone)
    return table.drop(index=drop)


def _errors(row, metric: str, scale: float):
    """(error bar, what it is): a benchmark's binomial standard error, else the std over seeds where
    there are several, else none."""
    se = row.get(f"{metric}_stderr")
    if se is not None and se == se:
        return se * scale, "binomial s.e."
    std = row.get(f"{metric}_std")
    return (std * scale, "std over seeds") if row.get("seeds", 1) > 1 and std == std else (None, None)


def metric_vs_memory(table, metric: str, ylabel: str, budget_mib=None, scale: float = 1.0, apart=frozenset(),
                     chance: float | None = None):
    """One point per method (mean over seeds) against block memory, in each method's colour and marker,
    QR-Adaptor enlarged, identical runs drawn once under both names; the budget line, and the chance
    level (in the metric's units, before `scale`) where given. With a budget, a
    second panel zooms on the methods within 10% of it, where the paper's comparison is made. Methods
    in `apart` (destroyed by their quantization: comparison.destroyed) get a panel of their own, so
    they never stretch the axes of the real comparison. The caption says what the error bars are."""
    table = _merged(table)
    table = table[table[metric].notna()]   # methods without the score (random draws have no benchmarks)
    main, far = table[~table["method"].isin(apart)], table[table["method"].isin(apart)]
    near = main[(main["memory_MiB"] - budget_mib).abs() <= 0.1 * budget_mib] if budget_mib else main.iloc[:0]
    panels = [("all methods", main)] + ([("near the budget", near)] if 1 < len(near) < len(main) else [])
    panels += [("destroyed (drawn apart)", far)] if len(far) else []
    widths = [1.0] * (len(panels) - bool(len(far))) + ([0.6] if len(far) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * sum(widths) + 1, 4), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    kinds, labelled = set(), set()
    for ax, (title, rows) in zip(axes[0], panels):
        for k, (_, row) in enumerate(rows.iterrows()):
            colour, marker = style(row["method"], k)
            err, kind = _errors(row, metric, scale)
            kinds.add(kind)
            big = row["method"] in HIGHLIGHT
            label = "random allocations" if row["method"].startswith("random") else row["name"]
            # QR-Adaptor's star is large and see-through, under the others: a method at its point stays visible.
            ax.errorbar(row["memory_MiB"], row[metric] * scale, yerr=err, fmt=marker, color=colour,
                        ms=12 if big else 6, capsize=3, mec="k" if big else colour, alpha=0.55 if big else 1.0,
                        zorder=2 if big else 3, label=None if label in labelled else label)
            labelled.add(label)
        if budget_mib:
            ax.axvline(budget_mib, color="grey", ls="--", lw=1, label="budget" if "budget" not in labelled else None)
            labelled.add("budget")
        if chance is not None and title == "all methods":
            ax.axhline(chance * scale, color="k", ls=":", lw=1, label="chance")
        ax.set_xlabel("block memory (MiB, quantized weights + adapters)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    if len(panels) > 1 and panels[1][0] == "near the budget":
        ax, rows = axes[0][1], near
        bars = [(_errors(r, metric, scale)[0] or 0.0) for _, r in rows.iterrows()]   # the drawn bars fit too
        lo, hi = (rows[metric] * scale - bars).min(), (rows[metric] * scale + bars).max()
        pad = 0.15 * (hi - lo) or 0.05 * abs(hi)
        ax.set_xlim(0.88 * budget_mib, 1.03 * budget_mib)
        ax.set_ylim(lo - pad, hi + pad)
    fig.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 0.95))
    kinds.discard(None)
    if kinds:
        fig.text(0.01, 0.01, "error bars: " + "; ".join(sorted(kinds)), fontsize=7, color="#555555")
    fig.tight_layout()
    return fig


def task_bars(table, tasks: list[str], n_docs: dict | None = None):
    """Grouped bars: headline metric per task (%), one bar per method that has benchmark results (in the
    table's order and each method's colour; identical runs once, under both names), error bars = the
    binomial standard error (lm-eval's, mean over seeds); a dashed line at each task's chance level and
    the documents scored under each task name."""
    table = _merged(table)
    table = table.dropna(subset=[t for t in tasks if t in table], how="all")
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(tasks) + 2), 3.8))
    width = 0.8 / max(len(table), 1)
    x = np.arange(len(tasks))
    for k, (_, row) in enumerate(table.iterrows()):
        vals = [row[t] * 100 for t in tasks]
        errs = [0 if row.get(f"{t}_stderr") != row.get(f"{t}_stderr") else row.get(f"{t}_stderr", 0) * 100 for t in tasks]
        ax.bar(x + k * width - 0.4 + width / 2, vals, width, yerr=errs, capsize=2, label=row["name"],
               color=style(row["method"], k)[0], edgecolor="k" if row["method"] in HIGHLIGHT else "none")
    for i, t in enumerate(tasks):
        if (chance := CHANCE.get(t.removeprefix("qr_").removeprefix("stock_"))) is not None:
            ax.hlines(100 * chance, i - 0.45, i + 0.45, colors="k", linestyles="--", lw=1,
                      label="chance" if i == 0 else None)
    names = [f"{t}\n(n={n_docs[t]})" if n_docs and t in n_docs else t for t in tasks]
    ax.set_xticks(x, names)
    ax.set_ylabel("accuracy / exact match (%; bars: binomial s.e.)")
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def loss_curves(runs, window: int = 5, apart=frozenset(), reference: str = "lora16"):
    """Training loss per step (trailing mean over `window` steps). `runs`: [(method id, name, seed,
    losses)], one per run; a run reported under two names arrives once, its name saying both. Left: each
    method minus `reference` on the same seed, so on the same batches (the batch-to-batch noise every
    method shares cancels): the mean over seeds, the band their range. Middle: the raw curves (means over
    seeds). Random draws are one baseline: one colour, one legend entry. Methods in `apart` (destroyed)
    get a panel of their own."""
    by_method: dict = {}
    for method, name, seed, losses in runs:
        by_method.setdefault((method, name), {})[seed] = np.asarray(losses, dtype=float)
    ref = next((seeds for (m, _), seeds in by_method.items() if m == reference), {})
    ref_name = next((n for m, n in by_method if m == reference), reference)
    has_far = any(m in apart for m, _ in by_method)
    fig, axes = plt.subplots(1, 3 if has_far else 2, figsize=(17 if has_far else 12, 4.2), squeeze=False)
    gap_ax, raw_ax = axes[0][0], axes[0][1]
    labelled: dict = {}

    def smooth(x):
        return pd.Series(x).rolling(window, min_periods=1).mean().to_numpy()
    for k, ((method, name), seeds) in enumerate(by_method.items()):
        colour, _ = style(method, k)
        ls = LINESTYLES[k % len(LINESTYLES)] if not method.startswith("random") else "-"
        lw = 2.2 if method in HIGHLIGHT else 1.2
        label = "random allocations" if method.startswith("random") else (
            f"{name} ({len(seeds)} seeds)" if len(seeds) > 1 else name)
        n = min(len(c) for c in seeds.values())
        steps = np.arange(1, n + 1)
        ax = axes[0][2] if method in apart else raw_ax
        ax.plot(steps, np.mean([smooth(c[:n]) for c in seeds.values()], 0), color=colour, ls=ls, lw=lw,
                label=None if label in labelled.get(id(ax), set()) else label)
        labelled.setdefault(id(ax), set()).add(label)
        paired = [smooth(seeds[s][:n] - ref[s][:n]) for s in seeds if s in ref and len(ref[s]) >= n]
        if method == reference or method in apart or not paired:
            continue
        gap = np.array(paired)
        gap_ax.plot(steps, gap.mean(0), color=colour, ls=ls, lw=lw,
                    label=None if label in labelled.get(id(gap_ax), set()) else label)
        labelled.setdefault(id(gap_ax), set()).add(label)
        if len(gap) > 1:
            gap_ax.fill_between(steps, gap.min(0), gap.max(0), color=colour, alpha=0.12, lw=0)
    gap_ax.axhline(0, color=REFERENCE_COLOUR, lw=1)
    gap_ax.set_ylabel(f"train loss minus {ref_name}, same seed and batches")
    gap_ax.set_title(f"the gap to {ref_name} on the same batches (band: range over seeds)", fontsize=9)
    raw_ax.set_ylabel(f"train loss, nats/token (trailing mean of {window})")
    raw_ax.set_title("train loss (mean over seeds; the batches make it jump for every method alike)", fontsize=9)
    for ax in axes[0]:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if has_far:
        axes[0][2].set_title("destroyed (drawn apart)", fontsize=9)
        axes[0][2].set_ylabel(f"train loss, nats/token (trailing mean of {window})")
    fig.tight_layout()
    return fig


def pilot_bars(table, title: str = "", metric: str = "test_loss", ylabel: str = TEST_LOSS,
               reference: tuple[str, float] | None = None, verdicts: tuple[str, ...] = ()):
    """Configs A-D: mean over seeds, error bars = std over seeds; the y axis starts at 0 so bar
    heights compare; the config and its memory under each bar; `reference` (name, value) a dashed line;
    `verdicts` (one line each, e.g. the paired C - D difference and what it says) under the title."""
    fig, ax = plt.subplots(figsize=(8, 4.2 if verdicts else 3.8))
    ax.set_title(title + "".join(f"\n{v}" for v in verdicts), fontsize=10 if not verdicts else 9)
    if reference is not None:
        ax.axhline(reference[1], color=REFERENCE_COLOUR, ls="--", lw=1, label=reference[0])
        ax.legend(fontsize=7, loc="lower right")
    x = np.arange(len(table))
    ax.bar(x, table[metric], yerr=table.get(f"{metric}_std"), capsize=4,
           color=[GREYS[k % len(GREYS)] for k in range(len(table))], alpha=0.85)
    labels = [f"{n.replace(': ', chr(10))}\n{m:.0f} MiB" for n, m in zip(table["name"], table["memory_MiB"])]
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylim(0, 1.12 * (table[metric] + table.get(f"{metric}_std", 0).fillna(0)).max())
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def rank_sweep(per_run, metric: str = "test_loss", ylabel: str = TEST_LOSS):
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


def rank_bits_heatmap(grid, reference: float | None = None, label: str = TEST_LOSS):
    """The measured bits x rank grid (rows bits, columns rank) as a heatmap, each cell's loss written in
    it, with its gap to the 16-bit reference where one ran: the trade-off in one picture (down a column
    fidelity falls, along a row plasticity grows)."""
    fig, ax = plt.subplots(figsize=(1.3 * len(grid.columns) + 2.2, 0.8 * len(grid.index) + 1.6))
    values = grid.to_numpy(float)
    im = ax.imshow(values, cmap="viridis_r", aspect="auto")
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            text = f"{values[i, j]:.3f}" + (f"\n{values[i, j] - reference:+.3f}" if reference is not None else "")
            dark = values[i, j] > np.nanmean(values)
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xticks(range(len(grid.columns)), [str(r) for r in grid.columns])
    ax.set_yticks(range(len(grid.index)), [f"{b}-bit" for b in grid.index])
    ax.set_xlabel("LoRA rank (every block)")
    ax.set_ylabel("weights")
    ax.set_title("measured loss" + (" and its gap to 16-bit LoRA" if reference is not None else ""), fontsize=9)
    bar = fig.colorbar(im, ax=ax, label=label)
    bar.formatter.set_useOffset(False)      # absolute losses on the scale, not an offset above it
    bar.update_ticks()
    fig.tight_layout()
    return fig


VERDICT_COLOURS = {"better": "tab:green", "worse": "tab:red", "equivalent": "tab:blue", "can't tell": "tab:gray"}


def _interval_legend(ax) -> None:
    """One legend entry per verdict label (every interval carries one) and the x grid of an interval axis."""
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="best")
    ax.grid(axis="x", alpha=0.3)


def _claim_panels(claims) -> list[tuple[str, object, float, str]]:
    """(title, rows, scale, unit) per panel: one per family (comparison.FAMILIES), the exploratory
    claims against random draws on their own axis (draws sit several nats away and would squash every
    other interval), accuracies in points."""
    panels = []
    for family in dict.fromkeys(claims["family"]):
        rows = claims[claims["family"] == family]
        n = len(rows)
        if family == "primary":
            panels.append((f"primary family: test loss (Holm over {n})", rows, 1.0, "nats per answer token"))
        elif family == "benchmarks":
            panels.append((f"benchmark average, a family of its own (Holm over {n})", rows, 100.0, "points"))
        else:
            near, chance = rows[rows["b_methods"] <= 1], rows[rows["b_methods"] > 1]
            panels += [(t, r, 1.0, "nats per answer token") for t, r in
                       (("exploratory: test loss, unadjusted", near),
                        ("exploratory: against random allocations, unadjusted", chance)) if len(r)]
    return panels


def paired_intervals(claims):
    """Each claim's paired difference (a - b) with its 95% interval and margin, a panel per family on an
    axis scaled to it; the colour is the verdict in its family. A method compared with itself (one
    allocation, two names: identical runs) is drawn in light grey and said so, not reported as a
    finding; a destroyed side is named under the claim."""
    panels = _claim_panels(claims)
    # One column, each panel as tall as its claims: no panel of one row stretched to another's height.
    heights = [len(rows) + 1.4 for _, rows, _, _ in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8.5, 0.5 * sum(heights) + 0.6), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    fig.suptitle("better / worse: the whole interval lies beyond the shaded margin on one side; equivalent: inside "
                 "it;\ncan't tell: the interval reaches across the margin (more seeds or examples would decide)",
                 fontsize=8)
    for ax, (title, rows, scale, unit) in zip(axes.flat, panels):
        rows = rows.reset_index(drop=True)
        y = np.arange(len(rows))[::-1]
        for yi, (_, r) in zip(y, rows.iterrows()):
            same = r["ci95_low"] == r["ci95_high"] == r["a_minus_b"] == 0
            colour, label = ("lightgrey", "same allocation (identical runs)") if same else \
                (VERDICT_COLOURS[r["verdict"]], r["verdict"])
            d, lo, hi = (scale * r[k] for k in ("a_minus_b", "ci95_low", "ci95_high"))
            ax.errorbar(d, yi, xerr=[[d - lo], [hi - d]], fmt="o", capsize=4, color=colour, label=label)
        margin = scale * rows["margin"].iloc[0]
        ax.axvspan(-margin, margin, color="tab:blue", alpha=0.18, lw=0)
        for edge in (-margin, margin):
            ax.axvline(edge, color="tab:blue", lw=0.6, ls=":")
        ax.axvline(0, color="black", lw=0.8)
        destroyed = rows["destroyed"].fillna("") if "destroyed" in rows else [""] * len(rows)
        ax.set_yticks(y, [f"{r['a']}\nvs {r['b']}" + (f"\n(destroyed: {gone})" if gone else "")
                          for (_, r), gone in zip(rows.iterrows(), destroyed)], fontsize=7)
        better = "lower" if unit.startswith("nats") else "higher"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(f"a - b, {unit} ({better} is better for a); shaded: +-margin {margin:g}", fontsize=8)
        ax.set_ylim(-0.6, len(rows) - 0.4)
        _interval_legend(ax)
    fig.tight_layout()
    return fig


def length_trends(lengths, trends):
    """Each primary claim across training length (`lengths.table`, `lengths.trends`): the paired
    difference with its 95% interval at every length, coloured by the verdict there; dashed, the
    weighted straight line in log2(steps) carried to 4x the longest run: an extrapolation."""
    ids = list(dict.fromkeys(lengths["id"]))
    cols = min(2, len(ids))
    rows_ = math.ceil(len(ids) / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(5.2 * cols, 3.3 * rows_), squeeze=False)
    for ax, cid in zip(axes.flat, ids):
        g = lengths[lengths["id"] == cid].sort_values("steps")
        for _, r in g.iterrows():
            ax.errorbar(r["steps"], r["a_minus_b"], yerr=[[r["a_minus_b"] - r["ci95_low"]], [r["ci95_high"] - r["a_minus_b"]]],
                        fmt="o", capsize=4, color=VERDICT_COLOURS[r["verdict"]], label=r["verdict"])
        t = trends.set_index("id").loc[cid]
        if np.isfinite(float(t["slope_per_doubling"])):
            x = np.geomspace(g["steps"].min(), 4 * g["steps"].max(), 50)
            ax.plot(x, t["intercept"] + t["slope_per_doubling"] * np.log2(x), ls="--", color="0.4", lw=1,
                    label="trend (extrapolation)")
        margin = g["margin"].iloc[0]
        ax.axhspan(-margin, margin, color="tab:blue", alpha=0.08)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(g["steps"].unique()), [str(int(v)) for v in sorted(g["steps"].unique())])
        ax.set_title(g["claim"].iloc[0], fontsize=8)
        ax.set_xlabel("fine-tuning steps (one epoch of fresh pairs each)", fontsize=8)
        ax.set_ylabel("a - b, test loss (nats/token)", fontsize=8)
        handles, labels = ax.get_legend_handles_labels()
        ax.legend(dict(zip(labels, handles)).values(), dict(zip(labels, handles)).keys(), fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(ids):]:
        ax.axis("off")
    fig.suptitle("Primary claims across training length (shaded: +-margin; lower is better for a)", fontsize=10)
    fig.tight_layout()
    return fig


def base_grid_bars(table):
    """Each rung's cost on the embedded base (its weights on a Q4_1 grid) and on the off-grid control
    (`base_grid.table`): KL to the rung's own base (log axis) and perplexity relative to that base."""
    rows = table[table["bits"] != 16]
    rungs = list(dict.fromkeys(rows["rung"]))
    bases = list(dict.fromkeys(rows["base"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    x = np.arange(len(rungs))
    width = 0.8 / len(bases)
    for k, (base, colour) in enumerate(zip(bases, ("#8c564b", "#1f77b4"))):
        g = rows[rows["base"] == base].set_index("rung").loc[rungs]
        for ax, col in zip(axes, ("kl", "perplexity_over_base")):
            ax.bar(x + (k - (len(bases) - 1) / 2) * width, g[col], width, color=colour, label=base)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("KL(base || quantized), nats per token (log)")
    axes[1].set_ylabel("held-out perplexity / the base's own")
    axes[1].axhline(1, color="black", lw=0.8)
    for ax in axes:
        ax.set_xticks(x, rungs, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("What each rung costs on the embedded base and on a control whose weights are off its Q4_1 grid "
                 "(lower is better)", fontsize=9)
    fig.tight_layout()
    return fig


# Learning curves: the colour says what the frozen weights keep (a quantizer at a bit-width, from most
# bits to fewest), the line style what the adapter can add.
REFERENCE_COLOUR = "#1f77b4"
FIDELITY_PALETTE = ("#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#7f7f7f", "#17becf", "#bcbd22")
RANK_STYLE = {4: ":", 8: "-", 16: "--"}


def learning_curves(table, length: int | None = None, reference: str = "lora16"):
    """Dev loss against fine-tuning tokens for every sizing setting (left), and each setting's paired
    difference to `reference` with its 95% interval over dev examples (right, the reference's own line at 0).
    Colour is the quantizer's bits, line style the rank; the top axis counts optimizer steps at the scored
    checkpoints. A vertical line marks where the order settles (sizing.length), where given."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 5.2))
    reference_name = reference
    kept = table.assign(rounded=table["bits"].round().astype(int))
    fidelities = sorted(set(zip(kept["quantizer"], kept["rounded"])), key=lambda f: (-f[1], f[0]))
    colours = dict(zip(fidelities, FIDELITY_PALETTE))
    for method, g in kept.groupby("method", sort=False):
        g = g.sort_values("step")
        colour = colours.get((g["quantizer"].iloc[0], g["rounded"].iloc[0]), "#444444")
        if "g32" in method:
            colour = "#e6550d"
        ls = RANK_STYLE.get(g["rank"].iloc[0], "-.")
        x = g["train_tokens"].clip(lower=1)
        a.plot(x, g["dev_loss"], ls=ls, color=colour, marker="o", ms=3, label=g["name"].iloc[0])
        if method == reference:
            reference_name = g["name"].iloc[0]
        elif f"minus_{reference}" in g:
            b.plot(x, g[f"minus_{reference}"], ls=ls, color=colour, marker="o", ms=3)
            b.fill_between(x, g["ci95_low"], g["ci95_high"], color=colour, alpha=0.12, lw=0)
    checkpoints = table.groupby("step")["train_tokens"].mean().clip(lower=1)
    for ax in (a, b):
        ax.set_xscale("symlog", linthresh=max(1, table.loc[table["step"] > 0, "train_tokens"].min()))
        ax.set_xlabel("fine-tuning tokens seen (log; 0 = before training)")
        ax.grid(alpha=0.3)
        top = ax.twiny()                 # the same axis, labelled in optimizer steps at each checkpoint
        top.set_xscale("symlog", linthresh=max(1, table.loc[table["step"] > 0, "train_tokens"].min()))
        top.set_xlim(ax.get_xlim())
        top.set_xticks(list(checkpoints.values), [str(int(s)) for s in checkpoints.index], fontsize=7)
        top.minorticks_off()
        top.set_xlabel("optimizer steps", fontsize=8)
        if length is not None and length in checkpoints.index:
            ax.axvline(float(checkpoints[length]), color="k", lw=0.8, ls="--")
            ax.annotate(f"order settles: {length} steps", (float(checkpoints[length]), 0.98),
                        xycoords=("data", "axes fraction"), fontsize=7, ha="right", va="top", rotation=90)
    a.set_ylabel("dev loss (nats per answer token; lower is better)")
    a.set_title("learning curves (constant rate after warm-up, one seed)", fontsize=9)
    b.axhline(0, color=REFERENCE_COLOUR, lw=1)
    b.set_ylabel(f"dev loss minus {reference_name} (nats/token)")
    b.set_title(f"the gap to {reference_name}: does rank close it, or does it stay?\n"
                "(band: 95% paired interval over dev examples)", fontsize=9)
    top = table.loc[table["method"] != reference, "ci95_high"] if "ci95_high" in table else None
    if top is not None and len(top):
        # Destroyed rungs (gaps of several nats) would flatten the rest: clip and say so.
        limit = min(float(top.max()), 2.0)
        b.set_ylim(min(-0.1, float(table["ci95_low"].min()) - 0.05), limit + 0.05)
        if float(top.max()) > limit:
            b.annotate("axis clipped at +2 nats:\nhigher curves are off the top", (0.99, 0.98), xycoords="axes fraction",
                       fontsize=7, va="top", ha="right")
    # Below both panels, so no curve sits under it; it says what colour and line style encode.
    ranks = ", ".join(f"{'solid' if st == '-' else 'dotted' if st == ':' else 'dashed'} r{r}"
                      for r, st in sorted(RANK_STYLE.items()) if r in set(table["rank"]))
    handles, labels = a.get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.11), ncol=5, fontsize=7, frameon=False,
               title=f"colour: the quantizer and its bits; line: the rank ({ranks})", title_fontsize=7)
    return fig


def proxy_check_plot(result: dict, length: int | None = None, n_val: int | None = None):
    """Left: Spearman between the proxy and the final runs' dev loss by proxy length, on the full -1..1
    axis (over all allocations, and over the best top_k). Right: the proxy at (`length`, `n_val`),
    the search's own setting where given (else the recommended one), against the final dev loss, the
    allocations numbered and listed beside it so no label covers another."""
    table, scores = pd.DataFrame(result["table"]), pd.DataFrame(result["scores"])
    finals = pd.DataFrame(result["finals"]).set_index("method")
    rec = result["recommendation"]
    length = rec["length"] if length is None else length
    n_val = rec["n_val"] if n_val is None or n_val not in set(table["n_val"]) else n_val
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 1.2]})
    for k, (nv, g) in enumerate(table.groupby("n_val")):
        a.plot(g["length"], g["spearman"], marker="o", color=f"C{k}", label=f"{nv} validation pairs")
        if "spearman_top" in g:
            a.plot(g["length"], g["spearman_top"], marker="x", ls=":", color=f"C{k}",
                   label=f"{nv} pairs, best {int(g['top_k'].iloc[0])} by final loss")
    a.axhline(0.8, color="gray", ls="--", lw=0.8)
    a.axhline(0, color="k", lw=0.6)
    a.set_ylim(-1.05, 1.05)
    a.set_xlabel("proxy length (LoRA steps; 0 = before training)")
    a.set_ylabel("Spearman with the final runs' dev loss")
    a.legend(fontsize=7)
    a.grid(alpha=0.3)
    g = scores[(scores["length"] == length) & (scores["n_val"] == n_val)]
    stats = g.groupby("method")["proxy_loss"].agg(["mean", "min", "max"])
    y = finals.loc[stats.index, "final_dev_loss"]
    b.errorbar(stats["mean"], y, xerr=[stats["mean"] - stats["min"], stats["max"] - stats["mean"]], fmt="o", capsize=3)
    listing = []
    for k, (m, xv, yv) in enumerate(zip(stats.index, stats["mean"], y), 1):
        same = finals.loc[m].get("same_as") or []
        listing.append(f"{k}  {finals.loc[m, 'name']}" + (f" (= {', '.join(same)})" if len(same) else ""))
        b.annotate(str(k), (xv, yv), fontsize=8, xytext=(4, 3), textcoords="offset points")
    b.text(1.03, 1.0, "\n".join(listing), transform=b.transAxes, fontsize=7, va="top")
    b.set_xlabel(f"proxy loss ({length} steps, {n_val} pairs; bars: range over proxy seeds)")
    b.set_ylabel("final runs' dev loss (nats/token, lower is better)")
    b.grid(alpha=0.3)
    fig.tight_layout()
    return fig
