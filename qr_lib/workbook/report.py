"""What a run found, then every table and figure under the notebook that wrote it (as `make reproduce`'s
manifest records), for notebook 07; and the compute time the artifacts record. Only reads files the other
notebooks wrote; it trains nothing."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..layout import Layout
from ..store import read_artifact, read_json

# What to read in each figure: one line, shown under it.
READING = {
    "learning_curves": "Right panel: a gap to 16-bit LoRA that shrinks with tokens is one rank and training buy "
                       "back; one that stays is what the bits cost. The dashed line: where the key methods' order settles.",
    "pilot_configs": "Configs A-D at equal memory: does moving bits between shallow and deep blocks (C vs D), or "
                     "trading bits for rank (B vs A), change the test loss? Bars: mean over seeds.",
    "sensitivity_kl": "Which blocks the lowest rung hurts most (KL to the unquantized model's outputs): Phase I's "
                      "ordering, the only thing the knapsack and the first generation know.",
    "sensitivity_knapsack": "What Phase I alone would choose: the least-KL allocation within the budget.",
    "nsga_objective_space": "Every scored allocation: proxy loss against memory; the front is what Phase II "
                            "hands to Phase III. Uniform allocations are marked for reference.",
    "nsga_hypervolume": "Whether later generations improved the front at all (a flat line: they did not).",
    "bo_objective_space": "Phase III's steps among the front: where the GP's expected improvement looked.",
    "search_selected_allocation": "The selected allocation per block (bits and rank) at the main budget.",
    "search_selected_allocation_3p5": "The selected allocation per block at 3.5 average bits.",
    "finetune_loss_curves": "Training loss of the final runs (smoothed): all methods converge or none.",
    "benchmarks_claims": "Each claim's paired difference with its 95% interval, a panel per family, coloured by its "
                         "verdict in that family (Holm within the primary and the benchmark families; the exploratory "
                         "ones unadjusted); read the interval, not the point.",
    "accuracy_vs_memory": "Benchmark average against memory: what each method buys per MiB.",
    "test_loss_vs_memory": "Test loss against memory (lower is better): the trade-off the search optimizes.",
    "benchmark_bars": "Per-task accuracy with binomial standard errors and chance lines.",
    "lengths": "Each primary claim's interval at every training length, coloured by verdict: a difference that "
               "moves more than its interval is one the final length had not settled; the dashed trend is an extrapolation.",
    "base_grid": "Each rung's cost on the embedded base (weights on a Q4_1 grid) and on a control off that grid: "
                 "a 4-bit rung much cheaper on the embedded base than on the control is the grid's gift to 4 bits.",
    "proxy_check": "Does the short proxy order allocations as the final fine-tune does (on the dev "
                   "split)? Left: rank agreement by proxy length on the full -1..1 axis; right: the search's own proxy.",
}


def _title(layout: Layout, notebook: str) -> str:
    """A notebook's own heading (its first Markdown line, '# 01 · Pilot: ...'), from its executed copy."""
    path = layout.notebooks / notebook
    if path.exists():
        for cell in read_json(path)["cells"]:
            if cell["cell_type"] == "markdown" and (text := "".join(cell["source"]).strip()):
                return text.splitlines()[0].lstrip("# ").strip()
    return notebook


def items(layout: Layout):
    """(section title, notebook, path, exists) for every table (Markdown) and figure that `make reproduce`
    recorded in the manifest, a section per notebook in the notebooks' order, each notebook's tables then
    its figures by name. The sections are whatever the notebooks wrote: nothing here lists them."""
    files = read_json(layout.manifest)["files"] if layout.manifest.exists() else {}
    by_notebook: dict[str, list[Path]] = {}
    for name, entry in files.items():
        if Path(name).suffix in (".md", ".png"):
            by_notebook.setdefault(entry["notebook"], []).append(layout.root / name)
    for notebook in sorted(by_notebook):
        title = _title(layout, notebook)
        for path in sorted(by_notebook[notebook], key=lambda p: (p.suffix != ".md", p.name)):
            yield title, Path(notebook).stem, path, path.exists()


def _csv(layout: Layout, name: str) -> pd.DataFrame | None:
    path = layout.table(name, ".csv")
    return pd.read_csv(path) if path.exists() else None


def _interval(r) -> str:
    return f"{r['a_minus_b']:+.3f} [{r['ci95_low']:+.3f}, {r['ci95_high']:+.3f}]"


def summary(layout: Layout) -> str:
    """What this run found, in a few lines of Markdown, every number read from the tables it cites:
    the primary claims and the power behind the undecided ones, each claim across training length, the
    pilot's verdicts, what the search selected, and the work it took. Missing tables are skipped."""
    lines = []
    claims, power = _csv(layout, "benchmarks_claims"), _csv(layout, "claims_power")
    if claims is not None:
        primary = claims[claims["family"] == "primary"]
        lines.append(f"**Primary claims** (test loss, nats per answer token, a - b with its 95% interval; Holm over "
                     f"{len(primary)}; `tables/benchmarks_claims.md`):")
        for _, r in primary.iterrows():
            need = power.set_index("id")["reading"].get(r["id"], "") if power is not None else ""
            lines.append(f"- {r['claim']}: {_interval(r)}, **{r['verdict']}**"
                         + (f" ({need}; `tables/claims_power.md`)" if r["verdict"] == "can't tell" and need else ""))
    if (lengths := _csv(layout, "lengths")) is not None:
        lines.append("\n**Across training length** (`tables/lengths.md`):")
        for cid, g in lengths.groupby("id", sort=False):
            g = g.sort_values("steps")
            lines.append(f"- {g['claim'].iloc[0]}: " + ", ".join(f"{v} at {s} steps" for s, v in zip(g["steps"], g["verdict"])))
    if (pilot := _csv(layout, "pilot_verdict")) is not None:
        lines.append("\n**Pilot, Configs A-D at equal memory** (`tables/pilot_verdict.md`): "
                     + "; ".join(f"{r['a'].split(':')[0]} - {r['b'].split(':')[0]} {_interval(r)}, {r['verdict']}"
                                 for _, r in pilot.iterrows()))
    if (search := _csv(layout, "search_summary")) is not None:
        q = search.set_index("quantity")["value"]
        lines.append(f"\n**Search** (`tables/search_summary.md`): the selection averages {float(q['avg_bits']):.2f} bits "
                     f"at {float(q['budget_ratio']):.3f} of the memory budget, proxy {q['metric']} "
                     f"{float(q['objective']):.4f}.")
    if rows := compute_time(layout):
        lines.append(f"\n**Work** (`tables/compute_time.md`): {rows[-1]['seconds'] / 3600:.1f} h that the artifacts record.")
    return "\n".join(lines)


def show(layout: Layout) -> None:
    """Display what the run found (summary), then every table and figure, under the notebook that wrote
    it (in a notebook), naming the missing ones."""
    from IPython.display import Markdown, display

    if text := summary(layout):
        display(Markdown("## In short\n" + text))
    current = None
    for title, notebook, path, exists in items(layout):
        if title != current:
            display(Markdown(f"## {title}\n*from `{notebook}`*"))
            current = title
        if not exists:
            display(Markdown(f"*`{path.name}` is listed in the manifest but missing: run `{notebook}` again.*"))
        else:
            _display(path)
    if current is None:
        display(Markdown(f"*No table or figure is recorded in `{layout.manifest}` yet: `make reproduce` writes "
                         "it, notebook by notebook.*"))
    if rows := compute_time(layout):
        display(Markdown("## Compute time\n*seconds of work the artifacts record (2 CPU cores for the "
                         "default profile); `make reproduce` writes the same to `tables/compute_time.md`*\n\n"
                         + pd.DataFrame(rows).to_markdown(index=False)))


def _display(path: Path) -> None:
    from IPython.display import Image, Markdown, display
    if path.suffix == ".png":
        display(Image(filename=str(path)))
        if path.stem in READING:
            display(Markdown(f"*What to read:* {READING[path.stem]}"))
    else:
        display(Markdown(path.read_text()))


def _recorded(paths) -> tuple[int, float]:
    """How many whole artifacts, and the seconds of work their results record (a damaged one is named
    in a warning and left out)."""
    seconds = [r["result"]["seconds"] for r in map(read_artifact, paths) if r is not None]
    return len(seconds), round(sum(seconds), 1)


def compute_time(layout: Layout) -> list[dict]:
    """Seconds of work each stage's artifacts record, however many sessions or reruns they took.

    A rerun that reads artifacts back costs little, so `make reproduce`'s own wall time is not the
    cost of the results; this is. Search evaluations are counted once each (variant searches share
    the cache), and the notebooks that only read artifacts are counted by their last run."""
    # The manifest is make reproduce's own bookkeeping (which notebook ran how long), not a stage artifact.
    notebooks = read_json(layout.manifest)["notebooks"] if layout.manifest.exists() else {}
    rows = []

    def add(stage, what, n, seconds, source: Path):
        rows.append({"stage": stage, "work": what, "count": n, "seconds": seconds,
                     "source": str(source.relative_to(layout.root)) if source else ""})

    if "00_setup.ipynb" in notebooks:
        add("00", "load model and data, held-out perplexity", 1, notebooks["00_setup.ipynb"]["seconds"], layout.manifest)
    if runs := layout.pilot.runs():
        add("01", "pilot fine-tuning runs", *_recorded([r.result for r in runs]), layout.pilot.run("*", "*").result)
    if layout.sensitivity.exists():
        add("02", "Phase I: KL sensitivity profiling", *_recorded([layout.sensitivity]), layout.sensitivity)
    if evals := sorted(layout.evaluations.glob("*.json")):
        add("03-04", "proxy fine-tunes of every search (each allocation once)", *_recorded(evals),
            layout.evaluation("*"))
    if runs := layout.runs():
        add("05", "final fine-tuning runs with lm-eval", *_recorded([r.result for r in runs]), layout.run("*", "*").result)
    checked = 0.0
    if curves := sorted(layout.proxy_check_curve("*").parent.glob("*.json")):
        n, checked = _recorded(curves)
        add("06 proxy check", "proxy check: proxy fine-tunes of its allocations", n, checked,
            layout.proxy_check_curve("*"))
    for at in layout.lengths():
        if runs := at.runs():
            add(f"lengths {at.root.name}", f"primary methods at {at.root.name[1:]} x the training (make lengths)",
                *_recorded([r.result for r in runs]), at.run("*", "*").result)
    if curves := layout.sizing_curves():
        add("sizing", "learning curves (make sizing; training only)", *_recorded(curves), layout.sizing_curve("*"))
    for nb in ("06_benchmarks", "07_report", "08_fidelity_plasticity_explorer"):
        if f"{nb}.ipynb" in notebooks:
            seconds = notebooks[f"{nb}.ipynb"]["seconds"]
            # Notebook 06 runs the proxy check when it is not there yet: its last run then took at least
            # the proxy check's recorded seconds, which the row above already counts.
            if nb == "06_benchmarks" and checked <= seconds:
                seconds = round(seconds - checked, 1)
            add(nb[:2], f"notebook {nb} (reads artifacts)", 1, seconds, layout.manifest)
    if rows:
        add("all", "total", "", round(sum(r["seconds"] for r in rows), 1), None)
    return rows
