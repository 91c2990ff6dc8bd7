"""The pilot study (Configs A-D): can adapter rank buy back fidelity lost to quantization?

Four configurations at the same memory, fine-tuned and scored the same way (test loss after a short
fine-tune, plus any lm-eval tasks configured), over several seeds, with `pilot.bits` = (low, high):
  A  uniform high                        B  uniform low
  C  shallow half high / deep half low   D  shallow half low / deep half high
The paper's pilot uses (2, 4) and records one of them: C at rank 16 (deep blocks at 2 bits) fails
against D. The default profile uses the lowest rung the embedded model survives (3 bits, measured by
the sizing curves): at 2 bits every config is a destroyed model and the comparison says nothing about
where low-bit blocks should sit. C at rank 16 sets the memory; every other config gets the one rank (all blocks) that brings it closest, and must
land within `memory_tolerance` of it. So A against B asks whether rank buys back bits at equal memory
(B gets several times A's rank), and C against D, whose bits are mirrored, whether it matters where
the 2-bit blocks sit; mirrored bits at equal memory force equal rank, so unlike the paper's C and D
they do not also differ in rank. Both are judged by paired comparisons (comparison.paired).
A sweep over uniform (bits, rank) shows where adding rank stops helping as bits fall.
Every run goes through finetune.run (cached per run under the layout's pilot/).
"""
from __future__ import annotations

from dataclasses import replace

from ..algorithm.allocation import split
from ..algorithm.memory import formula_bytes, model_shapes
from ..config import ComparisonConfig, PilotConfig, Profile
from ..errors import QRError
from ..layout import Layout
from . import comparison, finetune, stats
from .methods import Method

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
    """The profile with the pilot's fine-tune length and evaluation (the dev split is not scored: the
    pilot chooses nothing)."""
    p = profile.pilot
    return replace(profile, finetune=replace(profile.finetune, max_steps=p.steps, n_test=p.n_test, dev_seeds=()),
                   eval=replace(profile.eval, tasks=tuple(p.tasks), limit=p.limit, task_limits={}, seeds=None))


def run(profile: Profile, layout: Layout, base, tok, progress: bool = True) -> Layout:
    """Every pilot run (configs x seeds, then the sweep at the first seed); returns the pilot's layout."""
    cfg, pilot = profile.pilot, layout.pilot
    prof = pilot_profile(profile)
    four = config_methods(matched_ranks(model_shapes(base), profile.quant, cfg.memory_tolerance, cfg.bits), cfg.bits)
    sweep = sweep_methods(cfg)
    todo = [(m, s) for m in four for s in cfg.seeds] + [(m, cfg.seeds[0]) for m in sweep]
    data = finetune.run_data(profile)
    for k, (method, seed) in enumerate(todo, 1):
        if progress:
            print(f"[pilot {k}/{len(todo)}] {method.name}, seed {seed}", flush=True)
        finetune.run(prof, pilot, method, seed, base, tok, progress, data)
    return pilot


def tables(profile: Profile, pilot: Layout):
    """(Configs A-D summarized over seeds, the sweep's runs with bits and rank columns)."""
    per_run = comparison.runs(pilot)
    configs = per_run[per_run["method"].str.startswith("config_")]
    summary = comparison.summary(configs)
    target = summary.loc[summary["method"] == f"config_{TARGET[0]}", "memory_MiB"].iloc[0]
    summary.insert(3, f"memory / {TARGET[0]}", summary["memory_MiB"] / target)
    spec = {m.id: m.allocation for m in sweep_methods(profile.pilot)}
    sw = per_run[per_run["method"].isin(list(spec))].copy()
    sw["bits"] = [spec[m]["bits"] for m in sw["method"]]
    sw["rank"] = [spec[m]["rank"] for m in sw["method"]]
    return summary, sw


def verdicts(pilot: Layout, cfg: ComparisonConfig | None = None) -> list:
    """Paired comparisons of the pilot (comparison.paired on the test loss): C against D (the paper
    finds C worse) and B against A (can rank buy back bits at equal memory?)."""
    data = comparison.per_example(pilot)
    pairs = [("config_C", "config_D"), ("config_B", "config_A")]
    cfg = cfg or ComparisonConfig()
    out = [comparison.paired(data, a, [b], "test loss", cfg=cfg) for a, b in pairs]
    return stats.judge_family([r for r in out if r is not None], cfg.alpha)
