"""The headline tables and figures, in reading order, for notebook 07 and the README.
Only lists files the other notebooks wrote; it computes nothing."""
from __future__ import annotations

from pathlib import Path

SECTIONS = [
    ("The model and data", "00_setup", ["tables/setup_model.md", "tables/setup_datasets.md"]),
    ("Pilot: can rank buy back fidelity? (Configs A-D)", "01_pilot_fidelity_plasticity",
     ["tables/pilot_configs.md", "tables/pilot_verdict.md", "figures/pilot_configs.png", "figures/pilot_rank_sweep.png"]),
    ("Phase I: sensitivity", "02_sensitivity_profiling",
     ["figures/sensitivity_kl.png", "figures/sensitivity_seed_allocation.png"]),
    ("Phase II: NSGA-II", "03_nsga2_search",
     ["figures/nsga_objective_space.png", "figures/nsga_hypervolume.png", "tables/nsga_pareto.md"]),
    ("Phase III: refinement and the selected allocation", "04_bo_refinement",
     ["figures/bo_objective_space.png", "tables/bo_steps.md", "tables/search_summary.md",
      "tables/search_vs_uniform.md", "figures/search_selected_allocation.png"]),
    ("Final fine-tune", "05_final_finetune", ["tables/finetune_runs.md", "figures/finetune_loss_curves.png"]),
    ("Benchmarks", "06_benchmarks",
     ["tables/benchmarks.md", "tables/benchmarks_claims.md", "tables/benchmarks_sample_sizes.md",
      "figures/accuracy_vs_memory.png", "figures/val_loss_vs_memory.png", "figures/benchmark_bars.png",
      "tables/proxy_vs_final.md"]),
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
