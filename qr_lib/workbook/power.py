"""How many seeds and test examples a claim needs: power from the variance the runs measured.

A primary claim's per-example differences give three variance components (stats.components): how a
whole run moves with its seed, Var(u); how the effect differs from example to example, Var(v); and
their interaction, Var(w). A design of S seeds and E test examples then has the standard error

    SE(S, E) = sqrt(Var(u)/S + Var(v)/E + Var(w)/(S E))

and decides a claim with power p when the gap it must clear is at least (t_{1-a/2} + t_p) SE, where
a is the claim's level after Holm's strictest step (alpha / family size: the worst case, whatever the
other claims' p-values) and the gap is |difference| for "better"/"worse", or margin - |difference| for
"equivalent" (two one-sided tests at a/2 each). A difference near the margin needs a design near
infinite: the table says so rather than pricing it.

Prices come from the runs themselves: a run's training seconds, and its scoring seconds per test
example, averaged over the claim's runs.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from ..config import ComparisonConfig
from ..layout import Layout
from . import comparison, stats
from .finetune import RunResult, results

SEED_CHOICES = tuple(range(2, 21))
EXAMPLE_STEP = 64          # designs are priced at multiples of this many test examples
# Designs are priced up to this many times the test split: what a claim would need from more data.
BEYOND_SPLIT = 16


def parts(diff, tokens) -> dict:
    """Var(u), Var(v), Var(w) (nats per token, squared) from [seeds, examples] per-example sums."""
    c = stats.components(diff, tokens)
    S, E = c["seeds"], c["examples"]
    var_w = c["a3"] * S * E
    return {"u": max(S * (c["a1"] - c["a3"]), 0.0), "v": max(c["a2"] - c["a3"], 0.0) * E, "w": var_w}


def design(p: dict, seeds: int, examples: int) -> tuple[float, float]:
    """(standard error, degrees of freedom) a design of `seeds` x `examples` would have, if the runs
    vary as `p` (parts) says."""
    c = {"seeds": seeds, "examples": examples, "a3": p["w"] / (seeds * examples),
         "a1": p["u"] / seeds + p["w"] / (seeds * examples), "a2": p["v"] / examples + p["w"] / (seeds * examples)}
    v, df = stats.variance_and_df(c)
    return math.sqrt(v), df


def needed_multiple(gap: float, se: float, df: float, level: float, power: float) -> float:
    """How many standard errors the gap must span: t_{1-level/2} + t_power at df."""
    return float(scipy_stats.t.ppf(1 - level / 2, df) + scipy_stats.t.ppf(power, df))


def achieved_power(gap: float, se: float, df: float, level: float) -> float:
    if se == 0:
        return 1.0 if gap > 0 else 0.0
    return float(scipy_stats.t.cdf(gap / se - scipy_stats.t.ppf(1 - level / 2, df), df))


def _prices(runs: list[RunResult], methods: list[str]) -> tuple[float, float]:
    """(training seconds per run, scoring seconds per test example) over these methods' runs."""
    train, score = [], []
    for r in runs:
        if r.method in methods and r.same_run_as is None and not r.benchmarks and not r.dev_examples:
            train.append(r.train["seconds"])
            score.append((r.seconds - r.train["seconds"]) / max(len(r.test_examples["tokens"]), 1))
    return (float(np.mean(train)), float(np.mean(score))) if train else (float("nan"), float("nan"))


def cheapest(p: dict, gap: float, level: float, power: float, train_s: float, score_s: float,
             max_examples: int) -> dict | None:
    """The design of least compute (two methods' runs) that reaches `power` on `gap`, up to 20 seeds
    and `max_examples` test examples; None if none does."""
    best = None
    for s in SEED_CHOICES:
        for e in range(EXAMPLE_STEP, max_examples + 1, EXAMPLE_STEP):
            se, df = design(p, s, e)
            if gap >= needed_multiple(gap, se, df, level, power) * se:
                cost = 2 * s * (train_s + e * score_s)
                if best is None or cost < best["seconds"]:
                    best = {"seeds": s, "examples": e, "seconds": cost}
                break                       # more examples at this many seeds only cost more
    return best


def table(layout: Layout, cfg: ComparisonConfig, test_split: int) -> pd.DataFrame:
    """One row per primary claim: what the current design detects, whether it decides the observed
    difference, and the least design (seeds x test examples, runs, hours at the runs' own speed) that
    decides it with cfg.power, priced up to BEYOND_SPLIT x the test split's `test_split` examples."""
    runs = results(layout)
    claims = comparison.claims(runs, cfg)
    if claims.empty:
        return pd.DataFrame()
    primary = claims[(claims["family"] == "primary")]
    data = comparison.per_example(runs)
    by_id = {c["id"]: c for c in comparison.read_claims(cfg)}
    level = cfg.alpha / max(len(primary), 1)
    rows = []
    for _, row in primary.iterrows():
        c = by_id[row["id"]]
        A, B, w, _ = comparison._paired_arrays(data, c["a"], c["b"], "test loss")
        B2 = B if B.ndim == 2 else B.mean(0)
        p = parts(A - B2, w)
        S, E = A.shape
        se, df = design(p, S, E)
        d = abs(row["a_minus_b"])
        equivalence = d < cfg.margin_loss
        gap = cfg.margin_loss - d if equivalence else d
        train_s, score_s = _prices(runs, [c["a"], *c["b"]])
        need = cheapest(p, gap, level, cfg.power, train_s, score_s, BEYOND_SPLIT * test_split)
        now = achieved_power(gap, se, df, level)
        rows.append({
            "id": row["id"], "claim": row["claim"], "seeds": S, "examples": E, "a_minus_b": row["a_minus_b"],
            "sd_run": math.sqrt(p["u"]), "sd_example_effect": math.sqrt(p["v"]), "sd_interaction": math.sqrt(p["w"]),
            "se": se, "df": df, "level": level,
            "detectable": needed_multiple(d, se, df, level, cfg.power) * se,
            "to_show": "equivalence" if equivalence else "a difference", "gap": gap,
            "power_now": now, "verdict": row["verdict"],
            "seeds_needed": need["seeds"] if need else None, "examples_needed": need["examples"] if need else None,
            "runs_needed": 2 * need["seeds"] if need else None,
            "hours_needed": need["seconds"] / 3600 if need else None,
            "reading": _reading(now, cfg.power, need, test_split, S, E),
        })
    return pd.DataFrame(rows)


def _reading(now: float, power: float, need: dict | None, test_split: int, seeds: int, examples: int) -> str:
    if now >= power:
        return "decided by this design"
    if need is None:
        return f"no design within {SEED_CHOICES[-1]} seeds and {BEYOND_SPLIT * test_split} test examples decides it"
    more = (f"; the test split holds {test_split}, so {need['examples'] - test_split} more test pairs"
            if need["examples"] > test_split else "")
    return (f"needs {need['seeds']} seeds x {need['examples']} test examples (this design: {seeds} x {examples}), "
            f"{2 * need['seeds']} runs, {need['seconds'] / 3600:.1f} h{more}")
