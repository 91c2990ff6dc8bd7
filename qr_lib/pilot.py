"""The pilot study (Configs A-D): can adapter rank buy back fidelity lost to quantization?

Four configurations on the same model, fine-tuned and scored the same way (test loss after a short
fine-tune, plus any lm-eval tasks configured), over several seeds:
  A  uniform 4-bit, rank 8 (the budget)            B  uniform 2-bit, rank 16
  C  shallow half 4-bit r16 / deep half 2-bit r16   D  shallow half 2-bit r8 / deep half 4-bit r8
C and D hold the same bits, mirrored; C has twice D's rank. The paper finds C fails against D.
A sweep over uniform (bits, rank) shows where adding rank stops helping as bits fall.
Every run goes through finetune.run (cached per run under results/<profile>/pilot/).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from . import finetune
from .comparison import seed_spread
from .finetune import Method

CONFIGS = {
    "A": ("uniform 4-bit r8", {"bits": 4, "rank": 8}),
    "B": ("uniform 2-bit r16", {"bits": 2, "rank": 16}),
    "C": ("shallow 4-bit r16 / deep 2-bit r16", {"shallow": [4, 16], "deep": [2, 16]}),
    "D": ("shallow 2-bit r8 / deep 4-bit r8", {"shallow": [2, 8], "deep": [4, 8]}),
}


@dataclass(frozen=True)
class PilotConfig:
    steps: int = 40
    seeds: tuple = (0, 1, 2)
    tasks: tuple = ()              # lm-eval tasks per run; the test loss is always measured
    limit: int = 100
    n_test: int | None = 256       # test pairs scored per run (the first n of the test split)
    sweep_bits: tuple = (2, 3, 4)
    sweep_ranks: tuple = (4, 8, 16)


def methods(cfg: PilotConfig) -> tuple[list[Method], list[Method]]:
    configs = [Method(id=f"config_{k}", name=f"Config {k}: {label}", allocation=spec) for k, (label, spec) in CONFIGS.items()]
    sweep = [Method(id=f"sweep_{b}bit_r{r}", name=f"{b}-bit r{r}", allocation={"bits": b, "rank": r})
             for b in cfg.sweep_bits for r in cfg.sweep_ranks]
    return configs, sweep


def pilot_profile(profile):
    """The profile with the pilot's fine-tune length and evaluation."""
    p = profile.pilot
    return replace(profile, finetune=replace(profile.finetune, max_steps=p.steps, n_test=p.n_test),
                   eval=replace(profile.eval, tasks=tuple(p.tasks), limit=p.limit, task_limits={}, seeds=None))


def run(profile, out_dir: Path, progress: bool = True) -> Path:
    """Every pilot run (configs x seeds, then the sweep at the first seed); returns the pilot folder."""
    from .models import load_model

    cfg, where = profile.pilot, Path(out_dir) / "pilot"
    prof = pilot_profile(profile)
    configs, sweep = methods(cfg)
    todo = [(m, s) for m in configs for s in cfg.seeds] + [(m, cfg.seeds[0]) for m in sweep]
    base, tok = load_model(profile.model, profile.dtype, profile.device)
    data = finetune.run_data(profile)
    for k, (method, seed) in enumerate(todo, 1):
        if progress:
            print(f"[pilot {k}/{len(todo)}] {method.name}, seed {seed}", flush=True)
        finetune.run(prof, method, seed, where, base, tok, progress, data)
    return where


def tables(profile, where: Path):
    """(Configs A-D summarized over seeds, the sweep's runs with bits and rank columns)."""
    from . import comparison

    per_run = comparison.runs(where)
    configs, sweep = methods(profile.pilot)
    summary = comparison.summary(per_run[per_run["method"].isin([m.id for m in configs])])
    budget = summary.loc[summary["method"] == "config_A", "memory_MiB"].iloc[0]
    summary.insert(3, "memory / A", summary["memory_MiB"] / budget)
    spec = {m.id: m.allocation for m in sweep}
    sw = per_run[per_run["method"].isin(list(spec))].copy()
    sw["bits"] = [spec[m]["bits"] for m in sw["method"]]
    sw["rank"] = [spec[m]["rank"] for m in sw["method"]]
    return summary, sw


def verdict(summary, metric: str = "test_loss") -> dict:
    """C against D on a lower-is-better metric: the gap, and whether it exceeds the seeds' spread."""
    row = {k: summary.loc[summary["method"] == f"config_{k}"].iloc[0] for k in "CD"}
    gap = row["C"][metric] - row["D"][metric]
    spread = seed_spread(row["C"], row["D"], metric)
    return {"C": float(row["C"][metric]), "D": float(row["D"][metric]), "C_minus_D": float(gap),
            "spread": spread, "C_worse_than_D": bool(gap > spread), "seeds": int(row["C"]["seeds"])}
