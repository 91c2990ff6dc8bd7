"""Power from measured variance: the components recovered from per-example differences, the standard
error a design would have, and the least design that decides a claim."""
import numpy as np
import pytest

from qr_lib.algorithm.allocation import uniform
from qr_lib.config import ComparisonConfig
from qr_lib.layout import Layout
from qr_lib.store import write_artifact
from qr_lib.workbook import power
from qr_lib.workbook.finetune import RunResult


def _diff(rng, seeds, examples, sd_u, sd_v, sd_w, tokens):
    u = rng.normal(0, sd_u, size=(seeds, 1))
    v = rng.normal(0, sd_v, size=examples)
    w = rng.normal(0, sd_w, size=(seeds, examples))
    return (0.1 + u + v + w) * tokens


def test_the_variance_components_are_recovered_and_priced_into_a_standard_error():
    rng = np.random.default_rng(0)
    tokens = np.full(4000, 5.0)
    p = power.parts(_diff(rng, 20, 4000, 0.05, 0.4, 0.2, tokens), tokens)
    assert np.sqrt(p["u"]) == pytest.approx(0.05, rel=0.35)
    assert np.sqrt(p["v"]) == pytest.approx(0.4, rel=0.05) and np.sqrt(p["w"]) == pytest.approx(0.2, rel=0.05)
    se, df = power.design(p, 3, 256)
    assert se == pytest.approx(np.sqrt(p["u"] / 3 + p["v"] / 256 + p["w"] / (3 * 256)), rel=1e-6)
    assert df > 2                              # example-dominated: more than the seeds' 2 degrees of freedom


def test_the_cheapest_design_reaches_the_power_and_more_examples_buy_an_example_dominated_gap():
    p = {"u": 0.0001, "v": 0.16, "w": 0.01}    # example-dominated, like the committed runs
    need = power.cheapest(p, gap=0.03, level=0.0125, power=0.8, train_s=60.0, score_s=0.1, max_examples=8192)
    se, df = power.design(p, need["seeds"], need["examples"])
    assert 0.03 >= power.needed_multiple(0.03, se, df, 0.0125, 0.8) * se
    assert power.achieved_power(0.03, se, df, 0.0125) >= 0.8
    assert need["examples"] > 256               # the examples, not the seeds, are what is short
    assert power.cheapest(p, gap=1e-4, level=0.0125, power=0.8, train_s=60, score_s=0.1, max_examples=512) is None


def test_the_table_says_what_each_primary_claim_needs(tmp_path):
    rng = np.random.default_rng(1)
    tokens = rng.integers(2, 12, size=256).astype(float)
    difficulty = rng.gamma(2.0, 1.5, size=256)

    def write(method, seed, per_token):
        result = RunResult(method=method, name=method, seed=seed, allocation=uniform(4, 4, 8), memory_bytes=0,
                           avg_bits=4, trainable_parameters=0, train={"seconds": 60.0, "steps": 48}, adapter_notes={},
                           test_loss=0.0, test_examples={"nll_sum": (per_token * tokens).tolist(),
                                                         "tokens": tokens.tolist()},
                           heldout_perplexity=0.0, benchmarks={}, seconds=90.0)
        write_artifact(Layout(tmp_path).run(method, seed).result, {}, result.to_dict())
    effect = rng.normal(0, 0.5, size=256)
    for seed in (0, 1, 2):
        write("lora16", seed, difficulty)
        write("qr_adaptor", seed, difficulty + 0.6 + effect + rng.normal(0, 0.05, size=256))   # decided
        write("nf4", seed, difficulty + 0.6 + effect + 0.02 + rng.normal(0, 0.05, size=256))   # near the margin
    got = power.table(Layout(tmp_path), ComparisonConfig(primary=("qr4_vs_lora16", "qr4_vs_nf4")), 512)
    rows = got.set_index("id")
    assert set(rows.index) == {"qr4_vs_lora16", "qr4_vs_nf4"} and (rows["level"] == 0.025).all()
    assert rows.loc["qr4_vs_lora16", "reading"] == "decided by this design"
    assert rows.loc["qr4_vs_lora16", "power_now"] >= 0.8
    near = rows.loc["qr4_vs_nf4"]
    assert near["to_show"] == "equivalence" and near["power_now"] < 0.8
    assert near["reading"].startswith(("needs", "no design"))
