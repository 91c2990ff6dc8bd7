"""Every number the README quotes is read here from the committed table it cites, so the README cannot
drift from the results."""
import json
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TABLES = ROOT / "results" / "default" / "tables"


def _interval(row) -> str:
    return f"{row['a_minus_b']:+.4f} [{row['ci95_low']:+.4f}, {row['ci95_high']:+.4f}]"


def _adjusted(row) -> str:
    return f"p {row['p_holm']:.2f}"


@pytest.mark.parametrize("claim", ["QR-Adaptor beats QLoRA NF4", "QR-Adaptor matches 16-bit LoRA",
                                   "QR-Adaptor beats random allocations at the 4-bit budget",
                                   "QR-Adaptor (3.5 bits) beats QLoRA NF4 (4 bits)"])
def test_the_claims_the_readme_quotes_are_the_tables(claim):
    claims = pd.read_csv(TABLES / "benchmarks_claims.csv")
    row = claims[(claims["claim"] == claim) & (claims["metric"] == "test loss")].iloc[0]
    text = " ".join(README.split())                       # the README wraps lines anywhere
    assert f"{_interval(row)} (adjusted {_adjusted(row)}" in text, claim
    assert row["examples"] == 512 and "512 held-out" in text
    claims = pd.read_csv(TABLES / "benchmarks_claims.csv")
    assert f"across the table's {len(claims)} comparisons" in text


def test_the_pilot_verdict_and_the_setup_it_quotes():
    row = pd.read_csv(TABLES / "pilot_verdict.csv").iloc[0]
    assert row["a"].startswith("Config C") and row["b"].startswith("Config D")
    text = " ".join(README.split())
    assert f"{_interval(row)} ({row['seeds']} seeds, adjusted {_adjusted(row)}" in text
    runs = pd.read_csv(TABLES / "finetune_runs.csv")
    assert set(runs["steps"]) == {24} and "(24 steps)" in README and "96 pairs" in README
    assert set(pd.read_csv(TABLES / "benchmarks_sample_sizes.csv").filter(like="qr_").stack().str.extract(
        r"n=(\d+)")[0].astype(int)) == {60} and "60 documents" in README


def test_the_selection_and_the_time_the_readme_quotes():
    search = json.loads((ROOT / "results" / "default" / "search.json").read_text())["result"]
    assert set(search["selected"]["bits"]) == {4} and set(search["selected"]["ranks"]) == {8}
    assert "selects **uniform HQQ 4-bit r8**" in README
    shapes = json.loads((ROOT / "results" / "benchmarks" / "paper_shapes" / "meta-llama--Meta-Llama-3-8B-formula.json")
                        .read_text())["result"]["rows"]
    mixed = next(r for r in shapes if r["method"] == "mixed3p5")
    assert f"stores {mixed['weights_over_nf4']:.3f} of NF4's quantized weights" in " ".join(README.split())
    first = pd.read_csv(TABLES / "reproduce_wall_clock.csv").iloc[0]
    assert bool(first["from nothing"]) and f"**{first['wall seconds']:.0f} s**" in README


def test_the_memory_at_the_1b_shape_the_readme_quotes():
    rows = {r["method"]: r for r in json.loads((ROOT / "results" / "benchmarks" / "paper_shapes" /
                                                "meta-llama--Llama-3.2-1B.json").read_text())["result"]["rows"]}
    assert all(r["measured_over_formula"] == 1 for r in rows.values())
    assert f"peaks at {rows['mixed3p5']['peak_over_nf4']:.3f} x NF4's memory" in " ".join(README.split())


def test_the_learning_curves_the_readme_quotes():
    """The sizing paragraph: each rung's gap to 16-bit LoRA before training and at the last checkpoint,
    as tables/sizing_rungs.csv holds it, and the length statement of tables/sizing_order_changes.csv."""
    rungs = pd.read_csv(TABLES / "sizing_rungs.csv")
    last = int(next(c for c in rungs.columns if c.startswith("gap_to_lora16_step")).rsplit("step", 1)[1])
    first = rungs.set_index("method")
    text = " ".join(README.split())
    assert f"after {last} steps" in text
    base = first.loc["lora16", "dev_loss_step0"]
    quoted = 0
    for method, row in first.drop(index="lora16").iterrows():
        phrase = f"{row['name']} {row[f'gap_to_lora16_step{last}']:+.3f} ({row['dev_loss_step0'] - base:+.3f})"
        quoted += phrase in text
    assert quoted == len(first) - 1, "every measured rung is quoted with its gap"
    changes = pd.read_csv(TABLES / "sizing_order_changes.csv")
    flips = changes.groupby("L")["flips"].sum()
    stable = [int(L) for L, n in flips.items() if n == 0]
    if stable:
        assert f"from {min(stable)} steps on" in text
    else:
        assert f"still changes between {int(flips.index.max())} and {2 * int(flips.index.max())} steps" in text
