"""Paired comparisons: a mean difference with a 95% interval, a p-value, and a verdict that says what
it shows.

Two methods are compared on the same test examples under the same seeds (same data order and LoRA
initialization per seed), so the unit of comparison is the pair. Two things would change in a rerun:
the fine-tuning runs (another seed moves a whole run) and the examples (another test set). The
per-example differences d[s, e] (seed s, example e, on the per-token scale) are read as a crossed
design: d = delta + u[s] + v[e] + w[s, e], with u the run-to-run shift of the difference, v how much
the effect differs from example to example, and w their interaction (an example that one seed's run
happens to get right). The variance of the estimate is

    Var = Var(u)/S + Var(v)/E + Var(w)/(S E)
        = [Var(u) + Var(w)/E]/S          the seed-level part: the spread of the S per-seed means
        + Var(v)/E                       the example-level part: column mean square minus interaction

and both parts are estimated from their mean squares (two-way ANOVA without replication). The first
has S - 1 degrees of freedom, the second about E - 1; the interval is Student's t with Satterthwaite's
degrees of freedom for the sum. Satterthwaite alone under-covers when the seed part matters and was
estimated small by chance (a seed variance that comes out small also raises the degrees of freedom):
93% at 3 seeds in this project's simulation. So the degrees of freedom are computed with the seed part
at its 75% upper confidence bound (a guard that only lowers them, GUARD_QUANTILE), while the variance
itself is the unbiased estimate. The committed runs are example-dominated (80-99% of each
difference's variance is the example part: Var(v) is large, Var(u) and Var(w) small), where the
degrees of freedom come out near E - 1; with seeds dominating they fall to S - 1, which is exact there.

What the interval guarantees, checked two-sided by tests/test_stats.py (a band of 95 +- 2 points,
4000 simulated experiments per cell): coverage of the true difference (infinitely many seeds and
examples) for seed-dominated variance (run SD 0.1, 0.3), the example-dominated composition measured in
the committed runs, heterogeneous per-example effects with skewed tails, and a strong seed-by-example
interaction, at 3 and at 5 seeds. The earlier rule (the degrees of freedom of the scarcest level, 2
with 3 seeds) covered 99-100% in the example-dominated cells: an interval twice too wide, which hides
real effects. Where a design's coverage cannot reach the band with 3 seeds, the remedy is more seeds,
not a wider interval. With one seed the run-level part cannot be estimated: the interval then speaks
for these runs only, and says so (`seed_variance` is False).

A baseline of several random draws ([draws, seeds, examples]) adds a third level, the draws, with its
own variance and D - 1 degrees of freedom (guarded like the seeds); a baseline whose draw k ran at
seed k arrives averaged per seed ([seeds, examples]), and the draws' spread then enters through the
per-seed differences.

The estimand is the difference of the two methods' token-weighted means (test loss is summed NLL over
summed answer tokens; an accuracy has one unit per document), oriented so that a negative difference
means `a` is better when lower is better. A verdict reads the interval against a stated margin:

- "equivalent": the whole interval lies within +-margin (the difference is too small to matter),
- "better" / "worse": the interval excludes 0 (and is not within the margin),
- "can't tell": anything else.

Where a family of comparisons is judged together (a declared family: comparison.claims), each verdict
must also survive Holm's adjustment of the p-value it rests on: the p of a difference of 0 for "better"
and "worse", the equivalence p (two one-sided tests against +-margin, doubled so that "the 95%
interval lies within the margin" is "p < 0.05") for "equivalent". At most one of the two null
hypotheses of a claim is true, and a true one is rejected only through its own p, so Holm over the
p-values the verdicts rest on keeps the family-wise error below alpha.
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
    p_holm: float | None = None    # the verdict's p adjusted across its family (holm), where one was judged
    p_equivalence: float = 1.0     # two one-sided tests against +-margin, doubled (module docstring)
    family: str = "exploratory"    # the family the verdict was judged in; "exploratory" = unadjusted

    @property
    def candidate(self) -> str:
        """The verdict the interval alone gives, before any adjustment for a family."""
        return verdict(self.low, self.high, self.margin, self.lower_is_better)

    @property
    def p_verdict(self) -> float:
        """The p-value the verdict rests on: equivalence p for "equivalent", p of no difference otherwise."""
        return self.p_equivalence if self.candidate == "equivalent" else self.p

    def as_row(self) -> dict:
        return {"a": self.a, "b": self.b, "metric": self.metric, "family": self.family, "a_mean": self.a_mean,
                "b_mean": self.b_mean, "a_minus_b": self.difference, "ci95_low": self.low, "ci95_high": self.high,
                "margin": self.margin, "seeds": self.seeds, "examples": self.examples, "draws": self.draws,
                "p": self.p, "p_equivalence": self.p_equivalence, "p_holm": self.p_holm, "df": self.df,
                "verdict": self.verdict}


def verdict(low: float, high: float, margin: float, lower_is_better: bool, p_adjusted: float | None = None,
            alpha: float = 0.05) -> str:
    """Classify a 95% interval of a - b (see the module docstring); `p_adjusted` (the family-adjusted p
    of the verdict the interval gives), where given, must also be below `alpha`."""
    # Bounds carry float noise (1e-17 where the exact bound is 0, as for accuracies, whose differences
    # are multiples of 1/n): a bound at 0 must read as 0.
    low, high = round(low, 12), round(high, 12)
    if p_adjusted is not None and p_adjusted >= alpha:
        return "can't tell"
    if -margin < low and high < margin:
        return "equivalent"
    if high < 0 or low > 0:
        a_lower = high < 0
        return "better" if a_lower == lower_is_better else "worse"
    return "can't tell"


# The degrees of freedom see the seed (and draw) part at this upper confidence quantile of its
# chi-square: the guard the coverage simulation needed (module docstring). 0.25 = the 75% upper bound.
GUARD_QUANTILE = 0.25


def components(diff, tokens=None) -> dict:
    """The variance parts of the token-weighted mean of `diff` ([seeds, examples] per-example sums of
    a - b): the point estimate, the seed-level part (a1, S - 1 df), the example mean square part (a2,
    E - 1 df) and the interaction part (a3, (S - 1)(E - 1) df), each already divided down to the
    variance of the mean (module docstring)."""
    diff = np.asarray(diff, dtype=float)
    n_seeds, n_ex = diff.shape
    w = np.ones(n_ex) if tokens is None else np.asarray(tokens, dtype=float)
    point = float(diff.sum() / (n_seeds * w.sum()))
    m = (diff - point * w) * n_ex / w.sum()                    # linearized ratio estimator, per-token scale
    row, col = m.mean(1), m.mean(0)
    a2 = float(col.var(ddof=1)) / n_ex if n_ex > 1 else 0.0
    if n_seeds < 2:
        return {"point": point, "a1": 0.0, "a2": a2, "a3": 0.0, "seeds": 1, "examples": n_ex}
    inter = m - row[:, None] - col[None, :] + m.mean()
    a3 = float((inter ** 2).sum()) / ((n_seeds - 1) * max(n_ex - 1, 1)) / (n_seeds * n_ex)
    return {"point": point, "a1": float(row.var(ddof=1)) / n_seeds, "a2": a2, "a3": a3, "seeds": n_seeds,
            "examples": n_ex}


def _guarded(part: float, df: int) -> float:
    return part * df / float(scipy_stats.chi2.ppf(GUARD_QUANTILE, df))


def variance_and_df(c: dict, draws: float = 0.0, n_draws: int = 1) -> tuple[float, float]:
    """The variance of the estimate and its guarded Satterthwaite degrees of freedom, from components();
    `draws` is the draw-level part (n_draws - 1 df)."""
    S, E = c["seeds"], max(c["examples"], 2)
    # (variance, the variance the df formula sees, its share of the df formula's denominator)
    parts = []
    if S < 2:                     # one run: the example part holds the interaction too
        parts.append((c["a2"], c["a2"], c["a2"] ** 2 / (E - 1)))
    else:
        seed = _guarded(c["a1"], S - 1)
        parts.append((c["a1"], seed, seed ** 2 / (S - 1)))
        heterogeneity = c["a2"] - c["a3"]
        if heterogeneity > 0:     # a difference of two mean squares: both count in the denominator
            parts.append((heterogeneity, heterogeneity, c["a2"] ** 2 / (E - 1) + c["a3"] ** 2 / ((S - 1) * (E - 1))))
    if n_draws > 1:
        draw = _guarded(draws, n_draws - 1)
        parts.append((draws, draw, draw ** 2 / (n_draws - 1)))
    den = sum(p[2] for p in parts)
    df = sum(p[1] for p in parts) ** 2 / den if den > 0 else S * E - 1
    floor = min(max(S - 1, 1) if S > 1 else E - 1, n_draws - 1 if n_draws > 1 else math.inf)
    return sum(p[0] for p in parts), float(min(max(df, floor), S * E - 1))


def paired_interval(a, b, tokens=None, level: float = 0.95) -> dict:
    """The difference of token-weighted means with its t interval (module docstring).

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
    n_seeds, n_draws = a.shape[0], b.shape[0]
    w = np.ones(a.shape[1]) if tokens is None else np.asarray(tokens, dtype=float)
    c = components(a - b.mean(0), w)
    draws = 0.0
    if n_draws > 1:                                             # which draws came up is uncertain too
        per_draw = (a[None] - b).sum(2).mean(1) / w.sum()
        draws = float(per_draw.var(ddof=1)) / n_draws
    v, df = variance_and_df(c, draws, n_draws)
    point = c["point"]
    if v <= 0:                                                  # identical runs: no uncertainty to speak of
        return {"point": point, "low": point, "high": point, "p": 0.0 if point else 1.0, "df": df, "se": 0.0,
                "seed_variance": n_seeds > 1}
    se = math.sqrt(v)
    q = float(scipy_stats.t.ppf(0.5 + level / 2, df))
    p = float(2 * scipy_stats.t.sf(abs(point) / se, df))
    return {"point": point, "low": point - q * se, "high": point + q * se, "p": p, "df": df, "se": se,
            "seed_variance": n_seeds > 1}


def equivalence_p(point: float, se: float, df: float, margin: float) -> float:
    """Two one-sided tests of |difference| >= margin, the larger p doubled (so that p < 0.05 is "the 95%
    interval lies within +-margin"); 1 with no margin."""
    if margin <= 0:
        return 1.0
    if se == 0:
        return 0.0 if abs(point) < margin else 1.0
    one_sided = max(scipy_stats.t.sf((point + margin) / se, df), scipy_stats.t.sf((margin - point) / se, df))
    return float(min(1.0, 2 * one_sided))


def compare(metric: str, a_name: str, a, b_name: str, b, tokens=None, margin: float = 0.0,
            lower_is_better: bool = True) -> Paired:
    """The paired comparison of two methods (see paired_interval for the shapes)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    r = paired_interval(a, b, tokens)
    w = np.ones(a.shape[-1]) if tokens is None else np.asarray(tokens, dtype=float)
    b3 = b if b.ndim == 3 else b[None]
    return Paired(metric, a_name, b_name, float(a.mean(0).sum() / w.sum()), float(b3.mean((0, 1)).sum() / w.sum()),
                  r["point"], r["low"], r["high"], margin, lower_is_better, a.shape[0], a.shape[1], b3.shape[0],
                  verdict(r["low"], r["high"], margin, lower_is_better), r["p"], r["df"], r["seed_variance"],
                  p_equivalence=equivalence_p(r["point"], r["se"], r["df"], margin))


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


def judge_family(results: list[Paired], alpha: float = 0.05, family: str = "family") -> list[Paired]:
    """Comparisons declared as one family, judged together: each verdict's p (Paired.p_verdict)
    Holm-adjusted across the family, and a verdict only where the adjusted p is below `alpha`."""
    adjusted = holm([r.p_verdict for r in results]) if results else []
    return [replace(r, p_holm=q, family=family, verdict=verdict(r.low, r.high, r.margin, r.lower_is_better, q, alpha))
            for r, q in zip(results, adjusted)]
