"""Do the final verdicts survive longer training? The final runs of the claims' methods again, at
`sizing.check_factor` x the fine-tuning pairs (one epoch each, the same recipe), scored on the same
test examples, and every test-loss claim judged at both lengths.

The final length comes from the sizing curves (the order of the key methods stops changing from L on,
on dev); this is the one look at test that checks it held for the methods the claims compare. A claim
whose verdict differs between the lengths is named: a verdict of this workbook is one that survives.
The runs live in the layout's longer/ folder (a Layout of their own); the selections are read from
the main run's search, so both lengths train the same allocations.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd

from ..config import ComparisonConfig, Profile
from ..layout import Layout
from ..store import save_figure, save_table
from . import comparison, finetune, stats
from .plots import caption, figure_caption, length_intervals


def longer(profile: Profile) -> Profile:
    """The profile at check_factor x the fine-tuning pairs: the final recipe over that many, with no
    lm-eval and no dev scoring (the check reads the test loss only)."""
    f = profile.sizing.check_factor
    return replace(profile, data=replace(profile.data, n_train=f * profile.data.n_train),
                   finetune=replace(profile.finetune, dev_seeds=(), max_steps=None if profile.finetune.max_steps is None
                                    else f * profile.finetune.max_steps),
                   eval=replace(profile.eval, tasks=()))


def plan(profile: Profile) -> list:
    """(method, seed) pairs of the check: the check methods the profile's final runs also cover."""
    planned = {m.id for m, _ in finetune.plan(profile)}
    return finetune.plan(profile, [m for m in profile.sizing.check_methods if m in planned])


def run(profile: Profile, layout: Layout, base, tok, progress: bool = True) -> Layout:
    """Every run of the check (finished ones read back); returns its layout."""
    todo = plan(profile)
    prof, out = longer(profile), layout.longer
    data = finetune.run_data(prof)
    for k, (method, seed) in enumerate(todo, 1):
        if progress:
            print(f"[length check {k}/{len(todo)}] {method.name}, seed {seed}", flush=True)
        finetune.run(prof, layout, method, seed, base, tok, progress, data, runs=out)
    return out


def table(layout: Layout, cfg: ComparisonConfig = ComparisonConfig(), claims_file: Path = comparison.CLAIMS) -> pd.DataFrame:
    """Every test-loss claim whose methods ran at both lengths: the difference, 95% interval, Holm-adjusted
    p and verdict at each length, the steps of each, whether the verdict held and whether the estimate
    kept its sign. Both lengths are corrected for the same family: the final claims table, and that table
    with the longer runs' p-values in place of the final ones (a smaller family of its own would make
    the longer verdicts easier to reach)."""
    final = comparison.claims(layout, cfg, claims_file)
    longer_claims = comparison.claims(layout.longer, cfg, claims_file)
    if final.empty or longer_claims.empty:
        return pd.DataFrame()
    at = {"L": final[final["metric"] == "test loss"].set_index("claim")}
    checked = longer_claims[longer_claims["metric"] == "test loss"].set_index("claim")
    swapped = (final["metric"] == "test loss") & final["claim"].isin(checked.index)
    p_values = final["p"].where(~swapped, final["claim"].map(checked["p"]))
    adjusted = pd.Series(stats.holm(p_values), index=final["claim"])[swapped.values]
    at["longer"] = checked.assign(p_holm=adjusted, verdict=[
        stats.verdict(r["ci95_low"], r["ci95_high"], r["margin"], True, adjusted.get(claim, 1.0), cfg.alpha)
        for claim, r in checked.iterrows()])
    steps = {"L": _steps(layout), "longer": _steps(layout.longer)}
    rows = []
    for claim in [c for c in at["L"].index if c in at["longer"].index]:
        row = {"claim": claim, "seeds_longer": int(at["longer"].loc[claim, "seeds"])}
        for name in ("L", "longer"):
            r = at[name].loc[claim]
            row.update({f"steps_{name}": steps[name], f"a_minus_b_{name}": r["a_minus_b"],
                        f"ci95_low_{name}": r["ci95_low"], f"ci95_high_{name}": r["ci95_high"],
                        f"p_holm_{name}": r["p_holm"], f"verdict_{name}": r["verdict"]})
        row["holds"] = row["verdict_L"] == row["verdict_longer"]
        # With few seeds most verdicts are "can't tell" at both lengths, which holds trivially; whether
        # the estimate keeps its direction is what the longer run says about the order of the methods.
        row["same_sign"] = bool((row["a_minus_b_L"] > 0) == (row["a_minus_b_longer"] > 0))
        rows.append(row)
    return pd.DataFrame(rows)


def save(profile: Profile, layout: Layout, claims_file: Path = comparison.CLAIMS) -> pd.DataFrame:
    """The check's table and figure under the layout, from whatever runs have finished (an empty
    table, nothing written, when no claim has runs at both lengths)."""
    robust = table(layout, profile.comparison, claims_file)
    if len(robust):
        save_table(robust.round(4), layout, "length_check")
        seeds = int(robust["seeds_longer"].min())
        save_figure(caption(length_intervals(robust), f"{figure_caption(profile)}\npaired over {seeds} seeds and the "
                            "same test examples · 95% t intervals · verdicts after Holm over the final claims "
                            "table at both lengths"),
                    layout, "length_check")
    return robust


def _steps(layout: Layout) -> int | None:
    """The optimizer steps of the runs under a layout (one recipe: every run has the same)."""
    found = {r.train["steps"] for r in finetune.results(layout)}
    return found.pop() if len(found) == 1 else None
