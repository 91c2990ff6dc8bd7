"""Paired comparisons: a mean difference with a 95% interval, and a verdict that says what it shows.

Two methods are compared on the same test examples under the same seeds (same data order and LoRA
initialization per seed), so the unit of comparison is the pair. The interval is a paired bootstrap
that resamples examples and seeds (and, for a baseline made of several random draws, the draws):
every level that would change in a rerun is resampled, so the interval is not just example noise.
With 2-3 seeds and little seed-to-seed variation, resampling seeds makes the interval conservative
(wider than 95%), never narrower.

The estimand is the difference of the two methods' token-weighted means (test loss is summed NLL over
summed answer tokens; an accuracy has one unit per document), oriented so that a negative difference
means `a` is better when lower is better. A verdict reads the interval against a stated margin:

- "equivalent": the whole interval lies within +-margin (the difference is too small to matter),
- "better" / "worse": the interval excludes 0 (and is not within the margin),
- "can't tell": the interval holds 0 and reaches beyond the margin.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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

    def as_row(self) -> dict:
        return {"a": self.a, "b": self.b, "metric": self.metric, "a_mean": self.a_mean, "b_mean": self.b_mean,
                "a_minus_b": self.difference, "ci95_low": self.low, "ci95_high": self.high,
                "margin": self.margin, "seeds": self.seeds, "examples": self.examples, "draws": self.draws,
                "verdict": self.verdict}


def verdict(low: float, high: float, margin: float, lower_is_better: bool) -> str:
    """Classify a 95% interval of a - b (see the module docstring)."""
    # Bootstrap bounds are ratios of weighted sums and carry float noise (1e-17 where the exact bound is
    # 0, as for accuracies, whose differences are multiples of 1/n): a bound at 0 must read as 0.
    low, high = round(low, 12), round(high, 12)
    if -margin < low and high < margin:
        return "equivalent"
    if high < 0 or low > 0:
        a_lower = high < 0
        return "better" if a_lower == lower_is_better else "worse"
    return "can't tell"


def _weights(rng, n: int, size: int) -> np.ndarray:
    """Bootstrap resampling of n units as multinomial counts, one row per replicate."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=size).astype(float)


def bootstrap_difference(a, b, tokens=None, n_boot: int = 4000, seed: int = 0, level: float = 0.95):
    """Paired bootstrap of the difference of token-weighted means.

    a: [seeds, examples] sums per example (NLL summed over its answer tokens, or 0/1 correctness);
    b: the same shape, or [draws, seeds, examples] for a baseline of several random draws (averaged);
    tokens: [examples] weights (answer tokens), identical for both sides; None = 1 per example.
    Returns (point estimate, low, high)."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if b.ndim == 2:
        b = b[None]
    if a.ndim != 2 or b.shape[1:] != a.shape:
        raise ValueError(f"a must be [seeds, examples] and b [draws, seeds, examples] of the same seeds "
                         f"and examples; got {a.shape} and {b.shape}")
    n_seeds, n_ex = a.shape
    w = np.ones(n_ex) if tokens is None else np.asarray(tokens, dtype=float)
    point = (a.mean(0) - b.mean((0, 1))).sum() / w.sum()
    rng = np.random.default_rng(seed)
    ws = _weights(rng, n_seeds, n_boot)                       # [B, S]
    we = _weights(rng, n_ex, n_boot)                          # [B, E]
    wd = _weights(rng, b.shape[0], n_boot)                    # [B, D]
    b_draws = np.einsum("bd,dse->bse", wd, b) / b.shape[0]    # resampled draws' mean, [B, S, E]
    diff_se = a[None] - b_draws                               # [B, S, E]
    num = np.einsum("bs,bse,be->b", ws, diff_se, we)
    den = ws.sum(1) * (we @ w)
    reps = num / den
    alpha = (1 - level) / 2
    low, high = np.quantile(reps, [alpha, 1 - alpha])
    return float(point), float(low), float(high)


def compare(metric: str, a_name: str, a, b_name: str, b, tokens=None, margin: float = 0.0,
            lower_is_better: bool = True, n_boot: int = 4000, seed: int = 0) -> Paired:
    """The paired comparison of two methods (see bootstrap_difference for the shapes)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    point, low, high = bootstrap_difference(a, b, tokens, n_boot, seed)
    w = np.ones(a.shape[-1]) if tokens is None else np.asarray(tokens, dtype=float)
    b3 = b if b.ndim == 3 else b[None]
    return Paired(metric, a_name, b_name, float(a.mean(0).sum() / w.sum()), float(b3.mean((0, 1)).sum() / w.sum()),
                  point, low, high, margin, lower_is_better, a.shape[0], a.shape[1], b3.shape[0],
                  verdict(low, high, margin, lower_is_better))
