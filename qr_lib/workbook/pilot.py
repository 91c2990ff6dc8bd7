"""The pilot study (Configs A-D): can adapter rank buy back fidelity lost to quantization?

Four configurations at the same memory, fine-tuned and scored the same way (test loss after a short
fine-tune, plus any lm-eval tasks configured), over several seeds, with `pilot.bits` = (low, high):
  A  uniform high                        B  uniform low
  C  shallow half high / deep half low   D  shallow half low / deep half high
The paper's pilot uses (2, 4) and records one of them: C at rank 16 (deep blocks at 2 bits) fails
against D. The default profile uses the lowest rung the embedded model survives (3 bits, measured by
the sizing curves): at 2 bits every config is a destroyed model and the comparison says nothing about
where low-bit blocks should sit. C at rank 16 sets the memory; every other config gets the one rank
(all blocks) that brings it closest, and must land within `memory_tolerance` of it. So A against B asks whether rank buys back bits at equal memory
(B gets several times A's rank), and C against D, whose bits are mirrored, whether it matters where
the low-bit blocks sit; mirrored bits at equal memory force equal rank, so unlike the paper's C and D
they do not also differ in rank. Both are judged by paired comparisons (comparison.paired), a family
of two. A sweep over uniform (bits, rank) shows where adding rank stops helping as bits fall.

The pilot trains `pilot.steps` steps, one epoch of fresh pairs, long enough that no config is
destroyed by the project's own rule (more than comparison.destroyed_gap nats above 16-bit LoRA at the
same length, measured by a 16-bit reference run at the first seed): a verdict against a destroyed
config would only say that it is destroyed. On the default model uniform 3-bit is still more than a
nat behind after 96 steps (the length check's runs), so the default pilot trains 192.
Every run goes through finetune.run_planned (cached per run under the layout's pilot/).
"""
from __future__ import annotations

from dataclasses import replace

import pandas as pd

from ..algorithm.allocation import split
from ..algorithm.memory import formula_bytes, model_shapes
from ..algorithm.runner import SERIAL, Runner
from ..config import ComparisonConfig, PilotConfig, Profile
from ..errors import QRError
from ..layout import Layout
from ..store import save_figure, save_table
from . import comparison, finetune, stats
from .methods import Method, load_method
from .plots import caption, figure_caption, pilot_bars, rank_bits_heatmap, rank_sweep
from .work import Work, lm_eval_work

TARGET = ("C", 16)   # the paper's recorded config and rank: the memory every config matches


def configs(bits) -> dict:
    """config -> (label, bits of the shallow half, bits of the deep half), for `bits` = (low, high)."""
    lo, hi = bits
    return {"A": (f"uniform {hi}-bit", hi, hi), "B": (f"uniform {lo}-bit", lo, lo),
            "C": (f"shallow {hi}-bit / deep {lo}-bit", hi, lo), "D": (f"shallow {lo}-bit / deep {hi}-bit", lo, hi)}


def matched_ranks(shapes, qcfg, tolerance: float, bits=PilotConfig.bits) -> dict:
    """config -> (rank, bytes / target bytes): the rank whose memory is closest to the target's."""
    n = shapes.n_blocks
    table = configs(bits)

    def mem(sh, dp, r):
        return formula_bytes(shapes, split(n, (sh, r), (dp, r)), qcfg)["blocks"]
    k, r0 = TARGET
    target = mem(table[k][1], table[k][2], r0)
    out = {}
    for key, (label, sh, dp) in table.items():
        r = r0 if key == k else min(range(1, 257), key=lambda r: abs(mem(sh, dp, r) - target))
        ratio = mem(sh, dp, r) / target
        if abs(ratio - 1) > tolerance:
            raise QRError(f"pilot config {key} ({label}) reaches only {ratio:.3f} x the target memory at its "
                          f"closest rank {r}; raise pilot.memory_tolerance (now {tolerance}) or change pilot.bits")
        out[key] = (r, ratio)
    return out


def config_methods(ranks: dict, bits=PilotConfig.bits) -> list[Method]:
    """The four configs at their matched ranks (matched_ranks)."""
    return [Method(id=f"config_{k}", name=f"Config {k}: {label} r{ranks[k][0]}",
                   allocation={"shallow": [sh, ranks[k][0]], "deep": [dp, ranks[k][0]]})
            for k, (label, sh, dp) in configs(bits).items()]


def sweep_methods(cfg: PilotConfig) -> list[Method]:
    return [Method(id=f"sweep_{b}bit_r{r}", name=f"{b}-bit r{r}", allocation={"bits": b, "rank": r})
            for b in cfg.sweep_bits for r in cfg.sweep_ranks]


def pilot_profile(profile: Profile) -> Profile:
    """The profile at the pilot's length (pilot.steps, one epoch of fresh pairs: finetune.trained_for)
    and evaluation (the dev split is not scored: the pilot chooses nothing)."""
    p, f = profile.pilot, profile.finetune
    longer = finetune.trained_for(profile, p.steps * f.batch_size * f.grad_accum / profile.data.n_train)
    return replace(longer, finetune=replace(longer.finetune, n_test=p.n_test),
                   eval=replace(profile.eval, tasks=tuple(p.tasks), limit=p.limit, task_limits={}, seeds=None))


def work(profile: Profile) -> Work:
    """The pilot's work: Configs A-D at every pilot seed, the 16-bit reference and the sweep, each trained,
    scored on its test pairs and held-out text, and benchmarked on the pilot's tasks."""
    p, d = profile.pilot, profile.data
    runs = len(configs(p.bits)) * len(p.seeds) + 1 + len(sweep_methods(p))
    tasks = replace(profile.eval, tasks=tuple(p.tasks), limit=p.limit, task_limits={})
    return Work(steps=runs * p.steps, models_built=runs, examples=runs * ((p.n_test or d.n_test) + d.n_heldout),
                model_loads=1, notebooks=1, counts={"runs": runs}) + lm_eval_work(tasks, runs)


def run(profile: Profile, layout: Layout, base, tok, runner: Runner = SERIAL, progress: bool = True) -> Layout:
    """Every pilot run (configs x seeds, the 16-bit reference at the first seed, then the sweep at the
    first seed) through the runner; returns the pilot's layout."""
    cfg, pilot = profile.pilot, layout.pilot
    prof = pilot_profile(profile)
    four = config_methods(matched_ranks(model_shapes(base), profile.quant, cfg.memory_tolerance, cfg.bits), cfg.bits)
    todo = [(m, s) for m in four for s in cfg.seeds] + [(load_method(cfg.reference), cfg.seeds[0])] + \
        [(m, cfg.seeds[0]) for m in sweep_methods(cfg)]
    finetune.run_planned(layout, [finetune.Planned(prof, m, s, pilot) for m, s in todo], base, tok, runner, progress,
                         label="pilot")
    return pilot


def tables(profile: Profile, pilot: Layout):
    """(Configs A-D summarized over seeds, with each one's gap to the 16-bit reference and whether that
    gap destroys it by the project's rule; the sweep's runs with bits and rank columns)."""
    per_run = comparison.runs(pilot)
    configs = per_run[per_run["method"].str.startswith("config_")]
    summary = comparison.summary(configs)
    target = summary.loc[summary["method"] == f"config_{TARGET[0]}", "memory_MiB"].iloc[0]
    summary.insert(3, f"memory / {TARGET[0]}", summary["memory_MiB"] / target)
    ref = per_run[per_run["method"] == profile.pilot.reference]
    if len(ref):      # the reference ran at the first seed: every config's first seed against it
        first = configs[configs["seed"] == profile.pilot.seeds[0]].set_index("method")["test_loss"]
        summary[f"gap_to_{profile.pilot.reference}"] = summary["method"].map(first) - float(ref["test_loss"].iloc[0])
        summary["destroyed"] = summary[f"gap_to_{profile.pilot.reference}"] > profile.comparison.destroyed_gap
    spec = {m.id: m.allocation for m in sweep_methods(profile.pilot)}
    sw = per_run[per_run["method"].isin(list(spec))].copy()
    sw["bits"] = [spec[m]["bits"] for m in sw["method"]]
    sw["rank"] = [spec[m]["rank"] for m in sw["method"]]
    return summary, sw


def verdicts(runs: list[finetune.RunResult], cfg: ComparisonConfig | None = None,
             reference: str = PilotConfig.reference) -> pd.DataFrame:
    """Paired comparisons of the pilot (comparison.paired on the test loss), a declared family of two
    judged together: C against D (the paper finds C worse) and B against A (can rank buy back bits at
    equal memory?) over the pilot's finished runs; `destroyed` names a config more than destroyed_gap
    nats above the reference."""
    data = comparison.per_example(runs)
    cfg = cfg or ComparisonConfig()
    ruined = comparison.destroyed(comparison._test_losses(data), cfg.destroyed_gap, reference)
    pairs = [("config_C", "config_D"), ("config_B", "config_A")]
    found = [(a, b, r) for a, b in pairs if (r := comparison.paired(data, a, [b], "test loss", cfg=cfg)) is not None]
    judged = stats.judge_family([r for *_, r in found], cfg.alpha, "pilot")
    return pd.DataFrame([{**r.as_row(), "destroyed": ", ".join(m for m in (a, b) if m in ruined)}
                         for (a, b, _), r in zip(found, judged)])


def finding(verdict: str) -> str:
    """What the pilot's C-against-D verdict says of the paper's finding (C worse than D)."""
    return {"worse": "holds", "better": "is contradicted (C better than D)"}.get(
        verdict, f"is not shown either way (the verdict is '{verdict}')")


def save(profile: Profile, layout: Layout) -> dict:
    """The pilot's tables and figures under the layout, from its finished runs: pilot_configs (and its
    figure), pilot_verdict, the sweep if the profile has one; returns them and the reading."""
    pilot = layout.pilot
    configs, sweep = tables(profile, pilot)
    cols = [c for c in ["name", "seeds", "memory_MiB", "memory / C", "avg_bits", "test_loss", "test_loss_std",
                        f"gap_to_{profile.pilot.reference}", "destroyed", "heldout_ppl", "heldout_ppl_std"]
            if c in configs]
    save_table(configs[cols].round(4), layout, "pilot_configs")
    finished = finetune.results(pilot)
    judged = verdicts(finished, profile.comparison, profile.pilot.reference)
    save_table(judged.round(4), layout, "pilot_verdict")
    steps = {r.train["steps"] for r in finished}
    said = tuple(f"{r['a'].split(':')[0]} - {r['b'].split(':')[0]}: {r['a_minus_b']:+.3f} [{r['ci95_low']:+.3f}, "
                 f"{r['ci95_high']:+.3f}] nats, {r['verdict']}" for _, r in judged.iterrows())
    if len(judged):
        said += (f"the paper's finding (C worse than D) {finding(judged.iloc[0]['verdict'])}",)
    ref = next(((f"{r.name} (first seed)", r.test_loss) for r in finished
                if r.method == profile.pilot.reference and r.seed == profile.pilot.seeds[0]), None)
    save_figure(caption(pilot_bars(configs, f"Configs A-D at equal memory, {'/'.join(map(str, sorted(steps)))} steps",
                                   reference=ref, verdicts=said),
                        f"{figure_caption(profile)} · error bars: std over {len(profile.pilot.seeds)} seeds · "
                        "verdicts: paired over seeds and test examples, 95% intervals"),
                layout, "pilot_configs")
    out = {"configs": configs[cols], "verdicts": judged, "sweep": sweep,
           "finding": finding(judged.iloc[0]["verdict"]) if len(judged) else None}
    if len(sweep):
        save_figure(caption(rank_sweep(sweep), f"{figure_caption(profile)} · first seed"), layout, "pilot_rank_sweep")
        out["grid"] = sweep.pivot_table(index="bits", columns="rank", values="test_loss")
        save_table(out["grid"].reset_index(), layout, "pilot_rank_sweep")
        save_figure(caption(rank_bits_heatmap(out["grid"], ref[1] if ref else None),
                            f"{figure_caption(profile)} · first seed"), layout, "pilot_rank_heatmap")
    return out
