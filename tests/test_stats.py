"""Paired statistics on constructed examples whose answer is known."""
import numpy as np
import pytest

from qr_lib.workbook import stats


def test_a_constant_shift_is_found_exactly_and_classified_by_the_margin():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 9, size=200)
    b = rng.gamma(2.0, 1.0, size=(3, 200)) * tokens           # summed NLL per example
    a = b + 0.2 * tokens                                      # 0.2 nats per token worse, every example
    r = stats.compare("test loss", "a", a, "b", b, tokens=tokens)
    assert r.difference == pytest.approx(0.2)
    assert r.low == pytest.approx(0.2) and r.high == pytest.approx(0.2)
    assert r.verdict == "worse"
    assert stats.compare("test loss", "a", a, "b", b, tokens=tokens, margin=0.5).verdict == "equivalent"
    assert stats.compare("accuracy", "a", a, "b", b, tokens=tokens, lower_is_better=False).verdict == "better"


def test_the_estimand_is_the_difference_of_token_weighted_means():
    rng = np.random.default_rng(1)
    tokens = rng.integers(1, 30, size=50)
    a, b = rng.random((2, 50)) * tokens, rng.random((2, 50)) * tokens
    r = stats.compare("test loss", "a", a, "b", b, tokens=tokens)
    assert r.a_mean == pytest.approx(a.sum() / (2 * tokens.sum()))
    assert r.difference == pytest.approx(r.a_mean - r.b_mean)


def test_pairing_separates_what_the_spread_rule_cannot():
    """Examples differ far more than methods do: unpaired spreads overlap, the paired interval does not."""
    rng = np.random.default_rng(2)
    difficulty = rng.normal(0, 3.0, size=(3, 400))
    b = difficulty + rng.normal(0, 0.05, size=(3, 400))
    a = difficulty - 0.05 + rng.normal(0, 0.05, size=(3, 400))
    assert abs(a.mean() - b.mean()) < a.std()                 # "within the spread"
    r = stats.compare("loss", "a", a, "b", b)
    assert r.high < 0 and r.verdict == "better"


def test_no_difference_on_few_examples_cannot_be_told():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0, 1, size=(2, 2, 30))
    r = stats.compare("loss", "a", a, "b", b, margin=0.01)
    assert r.low < 0 < r.high and r.verdict == "can't tell"


def _coverage(seeds: int, run_sd: float, het_sd: float, inter_sd: float, trials: int = 4000,
              examples: int = 256, seed: int = 0) -> float:
    """How often the interval covers the true 0.3 nats per token. Per-token differences are
    0.3 + u[s] + v[e] + w[s, e]: u ~ N(0, run_sd) shifts a whole run, v (skewed: a centred gamma) is
    how the effect differs from example to example, w ~ N(0, inter_sd) the seed-by-example interaction,
    its per-token noise shrinking with longer answers; answer lengths are skewed like the test split's
    (2 to 100 tokens, median about 7)."""
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(trials):
        tokens = np.minimum(1 + rng.geometric(0.11, size=examples), 100)
        het = (rng.gamma(2.0, 1.0, size=examples) - 2.0) / np.sqrt(2.0) * het_sd
        noise = rng.normal(0, inter_sd, size=(seeds, examples)) * np.sqrt(10.0 / tokens)
        shift = rng.normal(0, run_sd, size=(seeds, 1))
        b = rng.gamma(2.0, 1.5, size=(seeds, examples)) * tokens
        a = b + (0.3 + shift + het + noise) * tokens
        r = stats.paired_interval(a, b, tokens)
        hits += r["low"] <= 0.3 <= r["high"]
    return hits / trials


# (run SD, per-example effect SD, seed-by-example SD), nats per token. The measured ones are the
# committed default's variance components (results/default/runs, 256 test pairs, 3 seeds).
COMPOSITIONS = {
    "seed-dominated, run SD 0.1": (0.1, 0.1, 0.07),
    "seed-dominated, run SD 0.3": (0.3, 0.1, 0.07),
    "measured: 3.5 bits vs NF4 (83% example-level)": (0.033, 0.66, 0.097),
    "measured: QR-Adaptor vs HQQ 4-bit r4 (26% example-level)": (0.0375, 0.2, 0.065),
    "measured: QR-Adaptor vs HQQ 4-bit r8 (nearly one allocation)": (0.002, 0.01, 0.016),
    "examples only": (0.0, 0.5, 0.0),
    "seed-by-example interaction dominates": (0.01, 0.05, 0.5),
    "heterogeneity and interaction": (0.03, 0.2, 0.5),
}


@pytest.mark.parametrize("seeds", [3, 5])
@pytest.mark.parametrize("composition", list(COMPOSITIONS))
def test_the_interval_covers_95_percent_neither_more_nor_less(composition, seeds):
    """Coverage two-sided: 95 +- 2 points over 4000 simulated experiments (simulation error 0.35
    points), in every composition of the variance. Too wide is as wrong as too narrow: the earlier
    rule (t with seeds - 1 df) covered 99-100% in the example-dominated cells."""
    assert 0.93 <= _coverage(seeds, *COMPOSITIONS[composition]) <= 0.97


def test_example_dominated_differences_get_the_examples_degrees_of_freedom():
    rng = np.random.default_rng(11)
    tokens = rng.integers(2, 20, size=256)
    b = rng.gamma(2.0, 1.5, size=(3, 256)) * tokens
    a = b + (0.3 + rng.normal(0, 0.6, size=256)) * tokens      # the effect varies by example, not by seed
    assert stats.paired_interval(a, b, tokens)["df"] > 100
    a_seed = b + (0.3 + rng.normal(0, 0.3, size=(3, 1))) * tokens  # a whole-run shift only
    assert stats.paired_interval(a_seed, b, tokens)["df"] == pytest.approx(2, abs=0.5)


def test_one_seed_says_the_run_level_variance_is_not_estimated():
    rng = np.random.default_rng(6)
    a, b = rng.normal(0, 1, size=(2, 1, 100))
    r = stats.compare("loss", "a", a, "b", b)
    assert not r.seed_variance and r.df == pytest.approx(99, rel=0.01)


def test_holm_controls_the_family_and_a_verdict_needs_the_adjusted_p():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    rng = np.random.default_rng(7)
    base = rng.normal(0, 1, size=(3, 200))
    strong = stats.compare("loss", "a", base - 0.5, "b", base + rng.normal(0, 0.01, size=(3, 200)))
    weak = stats.compare("loss", "c", base + 0.01, "b", base + rng.normal(0, 0.05, size=(3, 200)))
    judged = stats.judge_family([strong, weak, weak, weak, weak])
    assert judged[0].verdict == "better" and judged[0].p_holm >= strong.p
    assert all(j.p_holm >= w.p for j, w in zip(judged[1:], [weak] * 4))
    assert stats.verdict(0.01, 0.2, 0.001, True, p_adjusted=0.2) == "can't tell"   # interval alone is not enough


def test_random_draws_are_averaged_and_their_spread_counts():
    rng = np.random.default_rng(5)
    a = rng.normal(0, 0.1, size=(1, 300))
    draws = np.stack([a + d for d in (0.1, 0.3, 0.5)])        # three baselines, mean 0.3 worse than a
    r = stats.compare("loss", "a", a, "random", draws)
    assert r.difference == pytest.approx(-0.3) and r.draws == 3
    assert r.low < -0.3 < r.high
    with pytest.raises(ValueError, match="same seeds"):
        stats.compare("loss", "a", a, "random", draws[:, :, :10])


def test_an_interval_that_touches_zero_is_not_a_difference():
    """Float noise in a bootstrap bound (1e-17 where the exact bound is 0) must not turn 'can't tell'
    into 'better': the default run's first claims table had such a row."""
    assert stats.verdict(2.8e-17, 0.12, 0.01, lower_is_better=False) == "can't tell"
    assert stats.verdict(-0.12, -2.8e-17, 0.01, lower_is_better=True) == "can't tell"
    assert stats.verdict(0.006, 0.12, 0.01, lower_is_better=False) == "better"


def test_draws_that_ran_at_every_seed_are_their_own_unit_in_a_claim():
    from qr_lib.workbook import comparison
    rng = np.random.default_rng(8)
    tokens = np.full(40, 4)
    base = rng.normal(12, 1, 40)

    def entry(shift, seed):
        return {"name": "x", "nll": base + shift + 0.01 * seed, "tokens": tokens, "docs": {}}
    data = {("a", s): entry(0.0, s) for s in (0, 1, 2)}
    one_each = {**data, **{(f"r{k}", k): entry(1.0 + k, k) for k in (0, 1, 2)}}
    every = {**data, **{(f"r{k}", s): entry(1.0 + k, s) for k in (0, 1, 2) for s in (0, 1, 2)}}
    draws = [f"r{k}" for k in (0, 1, 2)]
    paired_by_seed = comparison.paired(one_each, "a", draws, "test loss")
    own_unit = comparison.paired(every, "a", draws, "test loss")
    assert paired_by_seed.draws == 1 and own_unit.draws == 3
    assert own_unit.difference == pytest.approx(-2.0 / 4)        # per token: draws are 1, 2, 3 nats worse per example
    assert own_unit.high - own_unit.low > 0.5                     # the draws' spread (0.25 per token) is in it


def test_a_benchmark_column_says_what_its_size_can_detect():
    from qr_lib.workbook import comparison
    rng = np.random.default_rng(9)
    n = 400

    def entry(acc_by_task):
        return {"name": "x", "nll": np.zeros(1), "tokens": np.ones(1),
                "docs": {t: dict(enumerate((rng.random(n) < a).astype(float))) for t, a in acc_by_task.items()}}
    data = {("a", 0): entry({"qr_arc_easy": 0.70, "qr_mmlu": 0.25}), ("b", 0): entry({"qr_arc_easy": 0.45, "qr_mmlu": 0.25})}
    table = comparison.task_power(data).set_index("task")
    # independent draws: discordance ~ 0.7*0.55 + 0.3*0.45 = 0.52 -> 2.80 * sqrt(0.52 / 400) ~ 0.10
    assert table.loc["qr_arc_easy", "detectable_difference"] == pytest.approx(0.10, abs=0.015)
    assert table.loc["qr_arc_easy", "reading"].startswith("the widest gap reaches")
    assert table.loc["qr_mmlu", "reading"].startswith("at chance") and table.loc["qr_mmlu", "n"] == n
    # Every method answers every document alike (GSM8K at zero): no detectable difference can be stated.
    zero = {(m, 0): {"name": m, "nll": np.zeros(1), "tokens": np.ones(1), "docs": {"qr_gsm8k": {i: 0.0 for i in range(8)}}}
            for m in ("a", "b")}
    assert np.isnan(comparison.task_power(zero).set_index("task").loc["qr_gsm8k", "detectable_difference"])
