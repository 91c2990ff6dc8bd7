"""The final comparison's tables and figures (notebooks 05 and 06), from the finished runs, computing nothing.

One function per notebook section: each saves that section's tables and figures under the layout and
returns what the notebook shows; a figure saved inside a notebook is shown there too (store.save_figure).
"""
from __future__ import annotations

import pandas as pd

from ..algorithm.memory import model_shapes, profile_budget
from ..config import Profile
from ..layout import Layout
from ..models import load_skeleton
from ..store import save_figure, save_table
from . import comparison, finetune, power
from .finetune import RunResult
from .plots import caption, figure_caption, loss_curves, metric_vs_memory, paired_intervals, task_bars


def _apart_note(profile: Profile) -> str:
    return f"drawn apart: test loss more than {profile.comparison.destroyed_gap:g} nat above 16-bit LoRA"


def runs(layout: Layout, records: list[RunResult]) -> pd.DataFrame:
    """One row per run: its training, test loss and memory (finetune_runs)."""
    table = pd.DataFrame([{
        "method": r.name, "seed": r.seed, "steps": r.train["steps"], "train tokens": r.train["train_tokens"],
        "train s": r.train["seconds"], "final train loss": r.train["losses"][-1] if r.train["losses"] else None,
        "diverged": r.train["diverged"], "test loss": r.test_loss, "memory MiB": r.memory_bytes / 2**20,
        "avg bits": r.avg_bits, "trainable": r.trainable_parameters,
        "peak GiB": r.train["peak_memory"]["peak_bytes"] / 2**30} for r in records])
    save_table(table, layout, "finetune_runs")
    return table


def peak_memory(layout: Layout) -> pd.DataFrame:
    """Measured peak memory per method against NF4's (finetune_peak_memory)."""
    peaks = comparison.peak_memory(comparison.runs(layout)).round(3)
    save_table(peaks, layout, "finetune_peak_memory")
    return peaks


def training_curves(profile: Profile, layout: Layout, records: list[RunResult]) -> None:
    """Every run's training loss (finetune_loss_curves); a run reported under two names (an allocation
    two methods share) is drawn once, under both."""
    twins = {r.same_run_as: r.name for r in records if r.same_run_as}
    curves = [(r.method, r.name + (f" = {twins[r.method]}" if r.method in twins else ""), r.seed, r.train["losses"])
              for r in records if not r.same_run_as]
    apart = comparison.destroyed(comparison.summary(comparison.runs(layout)), profile.comparison.destroyed_gap)
    save_figure(caption(loss_curves(curves, apart=apart), f"{figure_caption(profile)} · {_apart_note(profile)}"),
                layout, "finetune_loss_curves")


def benchmarks(profile: Profile, layout: Layout) -> dict:
    """Per-seed rows (benchmarks_per_seed) and the per-method table (benchmarks); returns both and the
    table as printed."""
    per_seed = comparison.runs(layout)
    table = comparison.summary(per_seed)
    shown = comparison.formatted(table, list(profile.eval.tasks))
    save_table(per_seed, layout, "benchmarks_per_seed")
    save_table(shown, layout, "benchmarks")
    return {"per_seed": per_seed, "table": table, "formatted": shown}


def claims(profile: Profile, layout: Layout) -> pd.DataFrame:
    """Every claim, paired, in its family (benchmarks_claims, table and figure)."""
    judged = comparison.claims(finetune.results(layout), profile.comparison)
    shown = judged.drop(columns="where").round(4)
    save_table(shown, layout, "benchmarks_claims")
    if len(judged):
        save_figure(caption(paired_intervals(judged), f"{figure_caption(profile)} · bars: 95% intervals over seeds and "
                            "examples; colour: the verdict in its family (Holm within the primary and benchmark "
                            "families)"), layout, "benchmarks_claims")
    return shown


def claims_power(profile: Profile, layout: Layout) -> pd.DataFrame:
    """What each claim's design detects and what deciding it would need (claims_power)."""
    design = power.table(layout, profile.comparison, profile.data.n_test).round(4)
    save_table(design, layout, "claims_power")
    return design


def sample_sizes(profile: Profile, layout: Layout, per_seed: pd.DataFrame) -> dict:
    """Each benchmark's documents and standard error per method (benchmarks_sample_sizes) and the
    smallest accuracy difference each can detect (benchmarks_power)."""
    tasks = list(profile.eval.tasks)
    # Methods scored by the test loss only (the random draws) have no benchmark columns.
    first = per_seed.dropna(subset=[t + "_n" for t in tasks]).groupby("method").head(1)
    se = pd.DataFrame({t: [f"n={int(r[t + '_n'])}, se={100 * r[t + '_stderr']:.1f}" for _, r in first.iterrows()]
                       for t in tasks}, index=first["name"])
    save_table(se.reset_index(), layout, "benchmarks_sample_sizes")
    seed = profile.eval.seeds[0] if profile.eval.seeds else profile.finetune.seeds[0]
    detectable = comparison.task_power(comparison.per_example(finetune.results(layout)), seed=seed)
    save_table(detectable.round(4), layout, "benchmarks_power")
    return {"sample_sizes": se, "power": detectable}


def memory_figures(profile: Profile, layout: Layout, shown: dict, detectable: pd.DataFrame) -> None:
    """Benchmark average and test loss against memory, and every task's accuracy (accuracy_vs_memory,
    test_loss_vs_memory, benchmark_bars); `shown` is benchmarks()'s, `detectable` sample_sizes()'s power."""
    tasks, table, per_seed = list(profile.eval.tasks), shown["table"], shown["per_seed"]
    budget = profile_budget(profile, model_shapes(load_skeleton(profile.model))) / 2**20
    apart = comparison.destroyed(table, profile.comparison.destroyed_gap)
    note = f"{figure_caption(profile)} · {_apart_note(profile)}"
    chance = detectable.set_index("task").loc[tasks, "chance"].mean()   # of the average: its tasks' mean
    save_figure(caption(metric_vs_memory(table, "average", "benchmark average (%)", budget, scale=100, apart=apart,
                                         chance=chance), f"{note} · dotted: chance"), layout, "accuracy_vs_memory")
    save_figure(caption(metric_vs_memory(table, "test_loss", "test loss (nats/token; lower is better)", budget,
                                         apart=apart), note), layout, "test_loss_vs_memory")
    n_docs = {t: int(per_seed[f"{t}_n"].max()) for t in tasks if f"{t}_n" in per_seed}
    save_figure(caption(task_bars(table, tasks, n_docs), f"{figure_caption(profile)} · dashed: chance"), layout,
                "benchmark_bars")
