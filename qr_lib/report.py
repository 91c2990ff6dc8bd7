"""The headline tables and figures, in reading order, for notebook 07 and the README, and the
compute time the artifacts record. Only reads files the other notebooks wrote; it trains nothing."""
from __future__ import annotations

import json
from pathlib import Path

SECTIONS = [
    ("The model and data", "00_setup", ["tables/setup_model.md", "tables/setup_datasets.md"]),
    ("Pilot: can rank buy back fidelity? (Configs A-D)", "01_pilot_fidelity_plasticity",
     ["tables/pilot_configs.md", "tables/pilot_verdict.md", "figures/pilot_configs.png"]),
    ("Phase I: sensitivity", "02_sensitivity_profiling",
     ["figures/sensitivity_kl.png", "figures/sensitivity_knapsack.png"]),
    ("Phase II: NSGA-II", "03_nsga2_search",
     ["tables/nsga_first_generation.md", "figures/nsga_objective_space.png", "figures/nsga_hypervolume.png",
      "tables/nsga_fidelity_agreement.md", "tables/nsga_pareto.md"]),
    ("Phase III: refinement and the selected allocation", "04_bo_refinement",
     ["figures/bo_objective_space.png", "tables/bo_steps.md", "tables/search_summary.md",
      "tables/search_vs_uniform.md", "figures/search_selected_allocation.png"]),
    ("Final fine-tune", "05_final_finetune", ["tables/finetune_runs.md", "tables/finetune_peak_memory.md",
                                              "figures/finetune_loss_curves.png"]),
    ("Benchmarks", "06_benchmarks",
     ["tables/benchmarks.md", "tables/benchmarks_claims.md", "figures/benchmarks_claims.png",
      "tables/benchmarks_sample_sizes.md",
      "figures/accuracy_vs_memory.png", "figures/test_loss_vs_memory.png", "figures/benchmark_bars.png",
      "tables/proxy_calibration.md", "figures/proxy_calibration.png"]),
]
# Written by commands outside `make reproduce` (hours on a CPU): shown when present, never required.
OPTIONAL = [
    ("The base model in lm-eval's stock formats, beside published numbers", "make stock-eval",
     "tables/stock_lm_eval.md"),
]


def items(out_dir: Path):
    """(section title, notebook, path, exists) for every headline file."""
    for title, notebook, files in SECTIONS:
        for f in files:
            yield title, notebook, Path(out_dir) / f, (Path(out_dir) / f).exists()


def show(out_dir: Path) -> None:
    """Display every headline table and figure (in a notebook), naming the missing ones."""
    from IPython.display import Image, Markdown, display

    current = None
    for title, notebook, path, exists in items(out_dir):
        if title != current:
            display(Markdown(f"## {title}\n*from `{notebook}`*"))
            current = title
        if not exists:
            display(Markdown(f"*`{path.name}` has not been written yet: run `{notebook}`.*"))
        elif path.suffix == ".png":
            display(Image(filename=str(path)))
        else:
            display(Markdown(path.read_text()))
    for title, command, f in OPTIONAL:
        if (Path(out_dir) / f).exists():
            display(Markdown(f"## {title}\n*from `{command}`, not part of `make reproduce`*\n\n"
                             + (Path(out_dir) / f).read_text()))
    if rows := compute_time(out_dir):
        import pandas as pd
        display(Markdown("## Compute time\n*seconds of work the artifacts record (2 CPU cores for the "
                         "default profile); `make reproduce` writes the same to `tables/compute_time.md`*\n\n"
                         + pd.DataFrame(rows).to_markdown(index=False)))


def _recorded(paths) -> tuple[int, float]:
    """How many artifacts, and the seconds of work their results record."""
    seconds = [json.loads(p.read_text())["result"]["seconds"] for p in paths]
    return len(seconds), round(sum(seconds), 1)


def compute_time(out_dir: Path) -> list[dict]:
    """Seconds of work each stage's artifacts record, however many sessions or reruns they took.

    A rerun that reads artifacts back costs little, so `make reproduce`'s own wall time is not the
    cost of the results; this is. Search evaluations are counted once each (variant searches share
    the cache), and the notebooks that only read artifacts are counted by their last run."""
    out = Path(out_dir)
    notebooks = json.loads((out / "manifest.json").read_text())["notebooks"] if (out / "manifest.json").exists() else {}
    rows = []

    def add(stage, what, n, seconds, source):
        rows.append({"stage": stage, "work": what, "count": n, "seconds": seconds, "source": source})

    if "00_setup.ipynb" in notebooks:
        add("00", "load model and data, held-out perplexity", 1, notebooks["00_setup.ipynb"]["seconds"], "manifest.json")
    if (runs := sorted(out.glob("pilot/runs/*/seed*/result.json"))):
        add("01", "pilot fine-tuning runs", *_recorded(runs), "pilot/runs/*/seed*/result.json")
    if (out / "sensitivity.json").exists():
        add("02", "Phase I: KL sensitivity profiling", *_recorded([out / "sensitivity.json"]), "sensitivity.json")
    if (evals := sorted(out.glob("evaluations/*.json"))):
        add("03-04", "proxy fine-tunes of every search (each allocation once)", *_recorded(evals),
            "evaluations/*.json")
    if (runs := sorted(out.glob("runs/*/seed*/result.json"))):
        add("05", "final fine-tuning runs with lm-eval", *_recorded(runs), "runs/*/seed*/result.json")
    for nb in ("06_benchmarks", "07_report", "08_fidelity_plasticity_explorer"):
        if f"{nb}.ipynb" in notebooks:
            add(nb[:2], f"notebook {nb} (reads artifacts)", 1, notebooks[f"{nb}.ipynb"]["seconds"], "manifest.json")
    if rows:
        add("all", "total", "", round(sum(r["seconds"] for r in rows), 1), "")
    return rows
