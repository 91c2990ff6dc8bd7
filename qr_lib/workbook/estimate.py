"""What a profile's full run will do, before doing it: `qr-adaptor estimate` (or `reproduce --dry-run`).

The work is counted from the profile (LoRA optimizer steps, examples scored, Phase I block
evaluations, lm-eval documents) and the memory is the formula of memory.py on the model's shapes,
read from its config without loading weights. Hours need a seconds-per-step figure: the one a
finished run of the same profile measured (its final runs' training time per step), or one given
with --step-seconds (e.g. timed on the first proxy candidate of the target GPU). The paper reports
8-9 minutes per proxy candidate on LLaMA-3.1-8B (arXiv 2505.03802, one version's Phase II); nothing here
turns that into a per-step figure, because the paper does not say how many steps a candidate took.
"""
from __future__ import annotations

import math

import numpy as np

from ..algorithm.memory import formula_bytes, model_shapes, profile_budget
from ..algorithm.search import nsga
from ..algorithm.search.problem import space_for
from ..config import Profile
from ..errors import QRError
from ..hardware import memory_bytes, resolve_dtype
from ..layout import Layout
from ..models import load_skeleton
from . import finetune
from .pilot import CONFIGS, sweep_methods


def search_counts(profile: Profile, space) -> dict:
    """Proxy candidates of the three phases: the first generation (its size depends on the ladders
    and the budget), offspring of later generations, the uniform anchors, promotions and BO steps."""
    first = len(nsga.first_generation(profile, space))
    cfg = profile.nsga
    multi = cfg.low_steps > 0
    search_scored = first + (cfg.generations - 1) * cfg.pop_size
    anchors = len(nsga.uniform_anchors(profile, space)) if multi else 0
    full_scored = (anchors + cfg.promote * cfg.generations if multi else search_scored) + profile.bo.iterations
    steps = (search_scored * (cfg.low_steps if multi else profile.proxy.steps)
             + (full_scored * profile.proxy.steps if multi else profile.bo.iterations * profile.proxy.steps))
    # The first generation's size depends on Phase I (duplicates are dropped), so it is counted here
    # with a flat profile: close, not exact.
    return {"first generation (about)": first, "search-fidelity candidates": search_scored,
            "full-fidelity candidates (at most)": full_scored, "proxy steps (at most)": steps}


def estimate(profile: Profile, step_seconds: float | None = None) -> dict:
    """Counts, memory and (with a step time) hours of every stage of a profile's run."""
    skeleton = load_skeleton(profile.model)
    shapes = model_shapes(skeleton)
    budget = profile_budget(profile, shapes)
    zero_kl = {str(b): [0.0] * shapes.n_blocks for b in profile.sensitivity.bits}
    space = space_for(profile, shapes, {"kl": zero_kl})
    f, d = profile.finetune, profile.data
    steps_per_run = math.ceil(f.epochs * d.n_train / (f.batch_size * f.grad_accum))
    if f.max_steps:
        steps_per_run = min(steps_per_run, f.max_steps)
    runs = finetune.plan(profile)
    p = profile.pilot
    pilot_runs = len(CONFIGS) * len(p.seeds) + len(sweep_methods(p))
    cal = profile.calibration
    stages = {
        "pilot": {"runs": pilot_runs, "steps": pilot_runs * p.steps, "examples scored": pilot_runs * (p.n_test or d.n_test)},
        "Phase I": {"block evaluations": shapes.n_blocks * len(profile.sensitivity.bits), "steps": 0,
                    "passages": d.n_calib},
        "Phases II-III": {**search_counts(profile, space), "steps": search_counts(profile, space)["proxy steps (at most)"]},
        "final fine-tunes": {"runs": len(runs), "steps": len(runs) * steps_per_run,
                             "examples scored": len(runs) * (f.n_test or d.n_test)},
        "proxy calibration": {"runs": len(cal.methods) * len(cal.seeds),
                              "steps": len(cal.methods) * len(cal.seeds) * max(cal.lengths)},
    }
    total_steps = sum(s["steps"] for s in stages.values())
    params = sum(int(np.prod(t.shape)) for t in skeleton.parameters())
    lora = formula_bytes(shapes, space.allocation(np.array([space.bit_ladder.index(profile.budget_bits),
                                                            space.rank_ladder.index(profile.budget_rank)]
                                                           * shapes.n_blocks)), profile.quant)["lora"]
    dtype_bytes = {"float32": 4, "float64": 8}.get(resolve_dtype(profile.dtype, profile.device), 2)
    memory = {"model parameters": params,
              "16-bit checkpoint (disk, GiB)": params * 2 / 2**30,
              "budget: quantized blocks + LoRA (GiB)": budget / 2**30,
              "unquantized rest: embeddings, norms, head (GiB)": shapes.other_bytes / 2**30,
              "LoRA optimizer state at the budget, AdamW fp32 (GiB)": 2 * lora / 2**30,
              "block cache (disk, GiB, at most)": sum(formula_bytes(shapes, space.allocation(
                  np.array([j, 0] * shapes.n_blocks)), profile.quant)["weights"]
                  for j, b in enumerate(space.bit_ladder) if b != 16) / 2**30,
              # The loaded base model stays resident while a quantized copy trains; on a CPU that copy
              # computes with dequantized weights (quant.dequantize_once), so both count at the compute
              # dtype, plus LoRA weights, gradients and AdamW's two moments. Activations come on top.
              "training process peak, about (GiB)": (2 * params * dtype_bytes + 4 * lora) / 2**30}
    out = {"profile": profile.name, "model": profile.model, "device": profile.device, "stages": stages,
           "total LoRA steps": total_steps, "memory": memory, "step_seconds": step_seconds}
    if step_seconds:
        out["hours (training steps only)"] = {k: s["steps"] * step_seconds / 3600 for k, s in stages.items()}
        out["hours (training steps only)"]["total"] = total_steps * step_seconds / 3600
    return out


def measured_step_seconds(layout: Layout) -> float | None:
    """Median training seconds per step of the finished final runs in the layout, if any."""
    per_step = [r.train["seconds"] / r.train["steps"] for r in finetune.results(layout) if r.train["steps"]]
    return float(np.median(per_step)) if per_step else None


def describe(result: dict) -> str:
    lines = [f"estimate for profile {result['profile']}: model {result['model']} on {result['device']}"]
    for stage, counts in result["stages"].items():
        lines.append(f"  {stage}: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    lines.append(f"  total LoRA optimizer steps: {result['total LoRA steps']:,}")
    lines.append("memory (formula, memory.py):")
    lines += [f"  {k}: {v:,.2f}" if isinstance(v, float) else f"  {k}: {v:,}" for k, v in result["memory"].items()]
    hours = result.get("hours (training steps only)")
    if hours:
        lines.append(f"time at {result['step_seconds']:.2f} s per step (training only; scoring, lm-eval and "
                     "start-up come on top):")
        lines += [f"  {k}: {v:.1f} h" for k, v in hours.items()]
    else:
        lines.append("time: give --step-seconds (e.g. the first proxy candidate's seconds per step on the target "
                     "machine); no run of this profile has measured it yet")
    return "\n".join(lines)


def check_size(profile: Profile, layout: Layout) -> None:
    """Refuse, before any work, a run whose training steps alone would pass profile.limits.max_hours,
    at the step time a finished run measured (or the floor), or whose training process would not fit
    the machine's memory (or limits.max_memory_gib), naming the estimate and the setting."""
    step = measured_step_seconds(layout) or profile.limits.floor_step_seconds
    result = estimate(profile, step)
    peak = result["memory"]["training process peak, about (GiB)"]
    limit = profile.limits.max_memory_gib
    machine = memory_bytes(profile.device)
    if limit is None and machine is not None:
        limit = machine / 2**30
    if limit is not None and peak > limit:
        raise QRError(f"profile {profile.name!r} needs about {peak:,.1f} GiB in a training process (the base model "
                      f"and a training copy at {profile.dtype}; `qr-adaptor estimate --profile {profile.name}`), "
                      f"more than the {limit:,.1f} GiB {'allowed' if profile.limits.max_memory_gib else 'this machine has'}; "
                      "choose a smaller model or a GPU, or let it through with "
                      f"--set limits.max_memory_gib={peak * 1.1:.0f}")
    hours = result["hours (training steps only)"]["total"]
    if hours > profile.limits.max_hours:
        raise QRError(f"profile {profile.name!r} would train for about {hours:,.0f} hours at {step:g} s per step "
                      f"(`qr-adaptor estimate --profile {profile.name}` for the breakdown), past "
                      f"limits.max_hours = {profile.limits.max_hours:g}; shrink the run, or let it through with "
                      f"--set limits.max_hours={hours * 1.1:.0f}")
