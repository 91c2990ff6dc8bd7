"""Paired comparisons: a mean difference with a 95% interval, a p-value, and a verdict that says what
it shows.

Two methods are compared on the same test examples under the same seeds (same data order and LoRA
initialization per seed), so the unit of comparison is the pair. Two things would change in a rerun:
the fine-tuning runs (another seed moves a whole run) and the examples (another test set). The
interval accounts for both, each at its own level:

- seeds: the per-seed differences d_s (each over all examples) vary from run to run; their variance
  over the S seeds, divided by S, is the run-level part. With 2-3 seeds this is estimated from very
  few values, so the interval uses Student's t with S - 1 degrees of freedom, not a normal quantile.
  Resampling 3 seeds by a bootstrap cannot widen an interval beyond their observed range; it covered
  the truth only 75% of the time at a run-level SD of 0.3 in this project's simulation, which is why it
  is not used.
- examples: the seed-averaged per-example differences vary from example to example; the variance of
  their token-weighted mean (a ratio estimator, linearized) is the example-level part.

What the interval guarantees: for normally distributed run effects and many examples, it covers the
true difference (infinitely many seeds and examples) with probability 0.95; tests/test_stats.py checks
that by simulation at run-level SDs of 0.02, 0.1 and 0.3 with 3 seeds and 512 examples. With one seed the
run-level part cannot be estimated: the interval then speaks for these runs only, and says so
(`seed_variance` is False).

A baseline of several random draws ([draws, seeds, examples]) adds a third level, the draws, with its
own variance and degrees of freedom; a baseline whose draw k ran at seed k arrives averaged per seed
([seeds, examples]), and the draws' spread then enters through the per-seed differences.

The estimand is the difference of the two methods' token-weighted means (test loss is summed NLL over
summed answer tokens; an accuracy has one unit per document), oriented so that a negative difference
means `a` is better when lower is better. A verdict reads the interval against a stated margin:

- "equivalent": the whole interval lies within +-margin (the difference is too small to matter),
- "better" / "worse": the interval excludes 0 (and is not within the margin), and, where a family of
  comparisons is judged together (comparison.claims), the Holm-adjusted p-value is below 0.05,
- "can't tell": anything else.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats as scipy_stats

VERDICTS = ("better", "worse", "equivalent", "can't tell")


@dataclass(frozen=True)
class Paired:
    """One paired comparison of `a` against `b` (difference = a - b, in the metric's units)."""
    metric: str
    a: str
    b: str
    a_mean: float
    b_mean: float
    difference: float
    low: float
    high: float
    margin: float
    lower_is_better: bool
    seeds: int
    examples: int
    draws: int
    verdict: str
    p: float = 1.0                 # two-sided, for a difference of 0
    df: float = math.inf           # degrees of freedom of the t interval
    seed_variance: bool = True     # False with one seed: run-to-run variation not estimated
    p_holm: float | None = None    # p adjusted across a family of comparisons (holm), where one was judged

    def as_row(self) -> dict:
        return {"a": self.a, "b": self.b, "metric": self.metric, "a_mean": self.a_mean, "b_mean": self.b_mean,
                "a_minus_b": self.difference, "ci95_low": self.low, "ci95_high": self.high,
                "margin": self.margin, "seeds": self.seeds, "examples": self.examples, "draws": self.draws,
                "p": self.p, "p_holm": self.p_holm, "df": self.df, "verdict": self.verdict}


def verdict(low: float, high: float, margin: float, lower_is_better: bool, p_adjusted: float | None = None,
            alpha: float = 0.05) -> str:
    """Classify a 95% interval of a - b (see the module docstring); `p_adjusted`, where given, must also
    be below `alpha` for "better" or "worse"."""
    # Bounds carry float noise (1e-17 where the exact bound is 0, as for accuracies, whose differences
    # are multiples of 1/n): a bound at 0 must read as 0.
    low, high = round(low, 12), round(high, 12)
    if -margin < low and high < margin:
        return "equivalent"
    if (high < 0 or low > 0) and (p_adjusted is None or p_adjusted < alpha):
        a_lower = high < 0
        return "better" if a_lower == lower_is_better else "worse"
    return "can't tell"


def paired_interval(a, b, tokens=None, level: float = 0.95) -> dict:
    """The difference of token-weighted means with its two-level t interval (module docstring).

    a: [seeds, examples] sums per example (NLL summed over its answer tokens, or 0/1 correctness);
    b: the same shape, or [draws, seeds, examples] for a baseline of several random draws (averaged
    per seed); tokens: [examples] weights (answer tokens), identical for both sides; None = 1 each."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if b.ndim == 2:
        b = b[None]
    if a.ndim != 2 or b.shape[1:] != a.shape:
        raise ValueError(f"a must be [seeds, examples] and b [draws, seeds, examples] of the same seeds "
                         f"and examples; got {a.shape} and {b.shape}")
    n_seeds, n_ex = a.shape
    n_draws = b.shape[0]
    w = np.ones(n_ex) if tokens is None else np.asarray(tokens, dtype=float)
    diff = a - b.mean(0)                                        # [S, E] per-example sums
    per_seed = diff.sum(1) / w.sum()                            # d_s
    point = float(per_seed.mean())
    residual = diff.mean(0) - point * w                         # linearized ratio estimator, per example
    v = n_ex / max(n_ex - 1, 1) * float((residual ** 2).sum()) / w.sum() ** 2
    df = float(n_ex - 1)
    if n_seeds > 1:
        v += float(per_seed.var(ddof=1)) / n_seeds
        df = float(n_seeds - 1)
    if n_draws > 1:                                             # which draws came up is uncertain too
        per_draw = (a[None] - b).sum(2).mean(1) / w.sum()
        v += float(per_draw.var(ddof=1)) / n_draws
        df = min(df, float(n_draws - 1))
    # The degrees of freedom are those of the scarcest level (2 with 3 seeds): Satterthwaite's
    # combination covered only 91% at a run-level SD of 0.1 in the simulation, because a seed variance
    # estimated small by chance also raises its degrees of freedom. This is conservative when the
    # examples dominate.
    if v <= 0:                                                  # identical runs: no uncertainty to speak of
        return {"point": point, "low": point, "high": point, "p": 0.0 if point else 1.0, "df": df,
                "seed_variance": n_seeds > 1}
    se = math.sqrt(v)
    q = float(scipy_stats.t.ppf(0.5 + level / 2, df))
    p = float(2 * scipy_stats.t.sf(abs(point) / se, df))
    return {"point": point, "low": point - q * se, "high": point + q * se, "p": p, "df": df,
            "seed_variance": n_seeds > 1}


def compare(metric: str, a_name: str, a, b_name: str, b, tokens=None, margin: float = 0.0,
            lower_is_better: bool = True) -> Paired:
    """The paired comparison of two methods (see paired_interval for the shapes)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    r = paired_interval(a, b, tokens)
    w = np.ones(a.shape[-1]) if tokens is None else np.asarray(tokens, dtype=float)
    b3 = b if b.ndim == 3 else b[None]
    return Paired(metric, a_name, b_name, float(a.mean(0).sum() / w.sum()), float(b3.mean((0, 1)).sum() / w.sum()),
                  r["point"], r["low"], r["high"], margin, lower_is_better, a.shape[0], a.shape[1], b3.shape[0],
                  verdict(r["low"], r["high"], margin, lower_is_better), r["p"], r["df"], r["seed_variance"])


def holm(p_values) -> list[float]:
    """Holm's step-down adjustment: family-wise error below alpha when every adjusted p below alpha is
    declared, whatever the dependence between the comparisons."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p)
    adjusted = np.empty_like(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def judge_family(results: list[Paired], alpha: float = 0.05) -> list[Paired]:
    """The comparisons of one table judged together: Holm-adjusted p-values, and verdicts that declare a
    difference only where the adjusted p is below `alpha`."""
    adjusted = holm([r.p for r in results]) if results else []
    return [replace(r, p_holm=q, verdict=verdict(r.low, r.high, r.margin, r.lower_is_better, q, alpha))
            for r, q in zip(results, adjusted)]
