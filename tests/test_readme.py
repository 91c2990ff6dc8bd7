"""Every number the README quotes is read here from the committed table it cites, so the README cannot
drift from the results."""
import json
from collections import Counter
from pathlib import Path

import pandas as pd

from qr_lib.workbook.reproduce import notebooks

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TABLES = ROOT / "results" / "default" / "tables"


def _interval(row) -> str:
    return f"{row['a_minus_b']:+.4f} [{row['ci95_low']:+.4f}, {row['ci95_high']:+.4f}]"


def _adjusted(row) -> str:
    return f"p {row['p_holm']:.2f}"


def describe(bits, ranks) -> str:
    """An allocation in the README's words: how many blocks at each bit-width, the common rank and the
    blocks that differ from it."""
    counts = Counter(bits)
    if len(counts) == 1:
        text = f"{bits[0]} bits on every block"
    else:
        parts = [f"{n} block{'s' if n > 1 else ''} at {b} bits" for b, n in sorted(counts.items())]
        text = ", ".join(parts[:-1]) + " and " + parts[-1]
    common = Counter(ranks).most_common(1)[0][0]
    odd = [f"rank {r} on block {i}" for i, r in enumerate(ranks) if r != common]
    return f"{text}, rank {common}" + (" except " + ", ".join(odd) if odd else "")


def test_the_primary_family_is_quoted_row_by_row_with_its_size_and_sample():
    claims = pd.read_csv(TABLES / "benchmarks_claims.csv")
    primary = claims[claims["family"] == "primary"]
    for _, row in primary.iterrows():
        assert f"| {row['claim']} | {_interval(row)} | {row['p_holm']:.2f} | {row['verdict']} |" in README, row["claim"]
    text = " ".join(README.split())                       # the README wraps lines anywhere
    assert f"Holm over the {len(primary)} primary claims" in text
    n, seeds = int(primary["examples"].iloc[0]), int(primary["seeds"].iloc[0])
    assert set(primary["examples"]) == {n} and f"{n} held-out pairs" in text and f"{seeds} seeds" in text
    exploratory = claims[claims["family"] == "exploratory"]
    assert f"{len(exploratory)} exploratory comparisons" in text


def test_what_each_undecided_primary_claim_would_need_is_quoted_from_the_power_table():
    power = pd.read_csv(TABLES / "claims_power.csv")
    text = " ".join(README.split())
    for _, row in power[power["power_now"] < 0.8].iterrows():
        assert f"{row['claim']}: {row['reading']}" in text, row["claim"]


def test_the_pilot_verdicts_its_gaps_and_the_setup_they_quote():
    text = " ".join(README.split())
    for _, row in pd.read_csv(TABLES / "pilot_verdict.csv").iterrows():
        assert f"{_interval(row)} ({row['seeds']} seeds, adjusted {_adjusted(row)}" in text, row["a"]
    configs = pd.read_csv(TABLES / "pilot_configs.csv")
    assert not configs["destroyed"].any() and "no configuration is destroyed" in text
    assert f"the largest gap to 16-bit LoRA is {configs['gap_to_lora16'].max():.2f} nats" in text
    runs = pd.read_csv(TABLES / "finetune_runs.csv")
    steps = int(runs["steps"].iloc[0])
    assert set(runs["steps"]) == {steps} and f"**{steps} steps**" in text and f"one epoch of {4 * steps} pairs" in text
    sizes = pd.read_csv(TABLES / "benchmarks_sample_sizes.csv").set_index("name")
    n = sizes.stack().str.extract(r"n=(\d+)")[0].astype(int).groupby(level=1).max()
    assert f"{n.drop('qr_gsm8k').max()} documents" in text and f"GSM8K {n['qr_gsm8k']}" in text


def test_the_selections_the_search_cost_and_the_time_the_readme_quotes():
    search = json.loads((ROOT / "results" / "default" / "search.json").read_text())["result"]
    text = " ".join(README.split())
    assert f"selects **{describe(search['selected']['bits'], search['selected']['ranks'])}**" in text
    low = search["selected_at"]["3.5"]["allocation"]
    assert f"**{describe(low['bits'], low['ranks'])}**" in text
    assert f"{search['cost']['epoch_equivalents']:.2f} epoch-equivalents" in text
    origins = pd.read_csv(TABLES / "search_front_origins.csv").set_index("origin")["on_final_front"]
    assert f"generation 2 put {origins['generation 2']} of the final front's {origins.sum()} points" in text
    shapes = json.loads((ROOT / "results" / "benchmarks" / "paper_shapes" / "meta-llama--Meta-Llama-3-8B-formula.json")
                        .read_text())["result"]["rows"]
    mixed = next(r for r in shapes if r["method"] == "mixed3p5")
    assert f"stores {mixed['weights_over_nf4']:.3f} of NF4's quantized weights" in text
    # The cost the README quotes: the seconds of work the artifacts of `make reproduce`'s stages record
    # (compute_time), without the learning curves, a run of their own.
    work = pd.read_csv(TABLES / "compute_time.csv")
    studies = work["stage"].isin(["all", "sizing"]) | work["stage"].str.startswith("lengths")
    assert f"**{work[~studies]['seconds'].sum():.0f} s** of work" in text
    # The wall clock it quotes: the last run of every notebook from nothing (a resumed run that reads every
    # artifact back costs a minute and says nothing of the cost), else the last run of every notebook, as
    # the run itself recorded it, and whether it started from nothing.
    clock = pd.read_csv(TABLES / "reproduce_wall_clock.csv")
    runs = clock[clock["notebooks"] == len(notebooks())]
    whole = (runs[runs["from nothing"]] if runs["from nothing"].any() else runs).iloc[-1]
    assert f"**{whole['wall seconds']:.0f} s** of wall clock" in text
    assert ("from nothing" if whole["from nothing"] else "resumed") in text


def test_the_proxy_check_the_readme_quotes_is_on_dev_at_the_searchs_proxy():
    from qr_lib.workbook.profiles import load_profile
    profile = load_profile("default")
    check = pd.read_csv(TABLES / "proxy_check.csv")
    row = check[(check["length"] == profile.proxy.steps) & (check["n_val"] == profile.data.n_val)].iloc[0]
    text = " ".join(README.split())
    assert (f"Spearman {row['spearman']:.2f} over {int(row['allocations'])} allocations; {int(row['close_pairs'])} of "
            f"its {int(row['pairs'])} pairs are close, and it orders {int(row['close_pairs_ordered_right'])} of them "
            "right") in text
    gain = pd.read_csv(TABLES / "search_phase3_gain.csv").iloc[0]["gain"]
    assert f"proxy loss by {-gain:.4f}, less than the proxy's own seed noise there ({row['seed_noise']:.4f})" in text


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
        assert phrase in text or f"{row['name']} +" not in text, f"{row['name']} is quoted with other numbers"
    assert quoted >= 4, "the rungs the findings rest on are quoted with their gaps"
    changes = pd.read_csv(TABLES / "sizing_order_changes.csv")
    flips = changes.groupby("L")["flips"].sum()
    stable = [int(L) for L, n in flips.items() if n == 0]
    if stable:
        assert f"from {min(stable)} steps on" in text
    else:
        assert f"still changes between {int(flips.index.max())} and {2 * int(flips.index.max())} steps" in text


def test_the_length_study_is_quoted_claim_by_claim_at_every_length_it_has():
    """One row per primary claim: the difference and verdict at each length, as tables/lengths.csv
    holds them, "-" where that length has not run; and each claim's trend, labelled as extrapolation."""
    from qr_lib.workbook.profiles import load_profile
    lengths = pd.read_csv(TABLES / "lengths.csv")
    factors = list(load_profile("default").lengths.factors)
    steps = {f: int(lengths.loc[lengths["factor"] == f, "steps"].iloc[0]) for f in factors if f in set(lengths["factor"])}
    assert len(steps) >= 2
    header = "| claim | " + " | ".join(f"{steps[f]} steps" if f in steps else f"{f}x" for f in factors) + " |"
    assert header in README
    for cid, g in lengths.groupby("id", sort=False):
        at = g.set_index("factor")
        cells = [f"{at.loc[f, 'a_minus_b']:+.3f} {at.loc[f, 'verdict']}" if f in at.index else "-" for f in factors]
        assert f"| {g['claim'].iloc[0]} | " + " | ".join(cells) + " |" in README, cid
    trends = pd.read_csv(TABLES / "lengths_trends.csv")
    text = " ".join(README.split())
    assert "extrapolation" in text
    for _, t in trends[trends["lengths"] >= 2].iterrows():           # a line needs two lengths
        assert f"{t['slope_per_doubling']:+.3f} per doubling" in text, t["id"]


def test_the_base_grid_is_quoted_beside_the_verdict():
    grid = pd.read_csv(TABLES / "base_grid.csv")
    text = " ".join(README.split())
    for rung in ("hqq 4-bit", "hqq 3-bit", "QLoRA NF4"):
        rows = grid[grid["rung"] == rung].set_index(grid[grid["rung"] == rung]["base"].str.split().str[0])
        assert f"{rung} {rows.loc['embedded', 'kl']:.3f} against {rows.loc['control', 'kl']:.3f}" in text, rung


def test_the_training_throughput_the_readme_quotes():
    text = " ".join(README.split())
    floor = json.loads((ROOT / "results" / "benchmarks" / "step_floor.json").read_text())["result"]
    assert f"a compiled step adds only **{floor['best_measured']:.2f}** x" in text
    rows = json.loads((ROOT / "results" / "benchmarks" / "throughput.json").read_text())["result"]["rows"]
    default = next(r for r in rows if r["configuration"].startswith("the default"))
    assert f"**{default['over today']:.2f}** x the final-run work per hour" in text


def test_the_first_screen_starts_you_and_the_page_stays_short():
    first = "\n".join(README.splitlines()[:60])
    for needed in ("Bottom line", "Requirements", "make reproduce", "make test", "make lab", "Q4_1",
                   "docs/GLOSSARY.md"):
        assert needed in first, needed
    assert len(README.encode()) <= 10 * 1024
