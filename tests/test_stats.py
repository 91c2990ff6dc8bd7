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


def test_the_interval_covers_the_true_difference_at_least_95_percent_of_the_time():
    """Runs differ by seed (a whole run shifts) and by example; the interval must cover the true 0.1."""
    rng = np.random.default_rng(4)
    hits, trials = 0, 200
    for t in range(trials):
        base = rng.normal(0, 1, size=(3, 120))
        run_shift = rng.normal(0, 0.02, size=(2, 3, 1))
        a = base + 0.1 + run_shift[0] + rng.normal(0, 0.5, size=(3, 120))
        b = base + run_shift[1] + rng.normal(0, 0.5, size=(3, 120))
        _, low, high = stats.bootstrap_difference(a, b, n_boot=1000, seed=t)
        hits += low <= 0.1 <= high
    assert hits / trials >= 0.92


def test_random_draws_are_averaged_and_resampled():
    rng = np.random.default_rng(5)
    a = rng.normal(0, 0.1, size=(1, 300))
    draws = np.stack([a + d for d in (0.1, 0.3, 0.5)])        # three baselines, mean 0.3 worse than a
    r = stats.compare("loss", "a", a, "random", draws)
    assert r.difference == pytest.approx(-0.3) and r.draws == 3
    assert r.low < -0.3 < r.high                              # which draws came up is uncertain too
    with pytest.raises(ValueError, match="same seeds"):
        stats.compare("loss", "a", a, "random", draws[:, :, :10])


def test_an_interval_that_touches_zero_is_not_a_difference():
    """Float noise in a bootstrap bound (1e-17 where the exact bound is 0) must not turn 'can't tell'
    into 'better': the default run's first claims table had such a row."""
    assert stats.verdict(2.8e-17, 0.12, 0.01, lower_is_better=False) == "can't tell"
    assert stats.verdict(-0.12, -2.8e-17, 0.01, lower_is_better=True) == "can't tell"
    assert stats.verdict(0.006, 0.12, 0.01, lower_is_better=False) == "better"
