"""Do the primary verdicts hold across training length? The primary claims' methods fine-tuned again at
`lengths.factors` x the final fine-tune's pairs (one epoch of fresh pairs each, the same recipe, seeds
and test examples), every primary claim judged at every length as the family it is declared in.

The final length comes from the sizing curves on the dev split; a verdict that holds only there is a
statement about that length. This study follows each primary claim's paired difference from the final
length (factor 1: the final runs themselves) to 8x it, says where its sign or verdict changes, and fits
a trend per claim, labelled as extrapolation: the difference as a straight line in log2(steps)
(weighted by the intervals), and the length at which that line would cross 0, if it would. The runs of
factor f live under lengths/x<f>/ (a Layout each, like pilot/); the selections are read from the main
run's search, so every length trains the same allocations.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from ..algorithm.runner import SERIAL, Runner
from ..config import Profile
from ..layout import Layout
from ..store import save_figure, save_table
from . import comparison, finetune
from .plots import caption, figure_caption, length_trends


def methods(profile: Profile) -> list[str]:
    """The methods the primary claims compare, in the claims file's order."""
    out: list[str] = []
    for c in comparison.read_claims(profile.comparison):
        if c["id"] in profile.comparison.primary:
            out += [m for m in (c["a"], *c["b"]) if m not in out]
    return out


def at(layout: Layout, factor: float) -> Layout:
    """The runs of one factor: the final runs themselves at 1."""
    return layout if factor == 1 else layout.at_length(factor)


def plan(profile: Profile, layout: Layout) -> list[finetune.Planned]:
    """The runs of every factor above 1: the primary methods at every final seed, the longest factor
    first (so that workers start the longest runs early)."""
    todo = finetune.plan(profile, methods(profile))
    return [finetune.Planned(finetune.trained_for(profile, f), m, s, at(layout, f))
            for f in sorted(profile.lengths.factors, reverse=True) if f != 1 for m, s in todo]


def run(profile: Profile, layout: Layout, base, tok, runner: Runner = SERIAL, progress: bool = True) -> None:
    """Every run of the study through the runner (finished ones read back)."""
    finetune.run_planned(layout, plan(profile, layout), base, tok, runner, progress, label="lengths")


def table(profile: Profile, layout: Layout) -> pd.DataFrame:
    """One row per (primary claim, length) whose runs have finished: the steps, seeds, paired difference,
    95% interval, Holm-adjusted p over the primary family at that length, and verdict."""
    rows = []
    finals = finetune.results(layout)
    final = allocations(finals)
    for f in profile.lengths.factors:
        runs = finals if f == 1 else finetune.results(at(layout, f))
        here = comparison.claims(runs, profile.comparison)
        here = here[here["family"] == "primary"] if len(here) else here
        stale = superseded(final, runs) if f != 1 else set()
        if len(here) and stale:
            warnings.warn(f"at {f} x the training, the runs of {sorted(stale)} were trained on an allocation the "
                          "final runs no longer use (a search selection since replaced); their claims are left out "
                          "at that length until `make lengths` retrains them", stacklevel=2)
            here = here[~(here["a"].isin(stale) | here["b"].isin(stale))]
        steps = _steps(runs)
        for _, r in here.iterrows():
            rows.append({"id": r["id"], "claim": r["claim"], "factor": f, "steps": steps, "seeds": r["seeds"],
                         "a_minus_b": r["a_minus_b"], "ci95_low": r["ci95_low"], "ci95_high": r["ci95_high"],
                         "p_holm": r["p_holm"], "verdict": r["verdict"], "margin": r["margin"]})
    out = pd.DataFrame(rows)
    # A claim is named as the final runs name it: a longer run made before a method was renamed keeps
    # the old name in its record.
    return out.assign(claim=out.groupby("id", sort=False)["claim"].transform("first")) if len(out) else out


def trends(lengths: pd.DataFrame) -> pd.DataFrame:
    """Per claim: what changed across the lengths (the verdicts in order, whether the sign turned) and
    the weighted straight line of the difference in log2(steps), an extrapolation: its slope per
    doubling, its intercept (at 1 step) and the steps at which it would cross 0 (None where it moves
    away from 0)."""
    rows = []
    for cid, g in lengths.groupby("id", sort=False):
        g = g.sort_values("steps")
        x, y = np.log2(g["steps"].to_numpy(float)), g["a_minus_b"].to_numpy(float)
        se = ((g["ci95_high"] - g["ci95_low"]) / (2 * 1.96)).to_numpy(float)
        row = {"id": cid, "claim": g["claim"].iloc[0], "lengths": len(g),
               "steps": " / ".join(str(int(s)) for s in g["steps"]),
               "verdicts": " / ".join(g["verdict"]), "sign_turns": bool(len(set(np.sign(y[np.abs(y) > 0]))) > 1),
               "first": y[0], "last": y[-1], "slope_per_doubling": float("nan"), "intercept": float("nan"),
               "crosses_zero_at_steps": None}
        if len(g) >= 2:
            slope, icept = np.polyfit(x, y, 1, w=1 / np.maximum(se, 1e-9))
            row.update(slope_per_doubling=float(slope), intercept=float(icept))
            if slope != 0 and np.sign(slope) != np.sign(y[-1]):
                row["crosses_zero_at_steps"] = float(2 ** (-icept / slope))
        rows.append(row)
    return pd.DataFrame(rows)


def save(profile: Profile, layout: Layout) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The study's tables (lengths, lengths_trends) and figure (lengths) under the layout, from whatever
    runs have finished; nothing is written where no primary claim has runs at two lengths."""
    got = table(profile, layout)
    if got.empty or got["steps"].nunique() < 2:
        return got, pd.DataFrame()
    trend = trends(got)
    save_table(got.round(4), layout, "lengths")
    save_table(trend.round(4), layout, "lengths_trends")
    seeds = int(got["seeds"].min())
    save_figure(caption(length_trends(got, trend), f"{figure_caption(profile)}\npaired over {seeds}+ seeds and the "
                        f"same {profile.finetune.n_test or profile.data.n_test} test examples · 95% t intervals · "
                        "verdicts after Holm over the primary family at each length · dashed: extrapolation"),
                layout, "lengths")
    return got, trend


def allocations(runs: list[finetune.RunResult]) -> dict:
    """{(method, seed): allocation pairs} of runs."""
    return {(r.method, r.seed): r.allocation.pairs() for r in runs}


def superseded(final: dict, longer: list[finetune.RunResult]) -> set[str]:
    """The names of the methods whose runs `longer` (at another length) were trained on another
    allocation than their final runs (`final`: allocations() of the final runs; a search selection since
    replaced): comparing them would pair two different allocations."""
    return {r.name for r in longer
            if final.get((r.method, r.seed), r.allocation.pairs()) != r.allocation.pairs()}


def _steps(runs: list[finetune.RunResult]) -> int | None:
    """The optimizer steps of runs at one length (one recipe: every run has the same)."""
    found = {r.train["steps"] for r in runs}
    return found.pop() if len(found) == 1 else None
