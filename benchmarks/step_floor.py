"""Benchmark: the least time a LoRA step and a scored example can take on this machine while every run
stays the same, and so the most that any change keeping the runs could buy.

Issue 33 asks for twice today's (dd24dce's) final runs per hour with every test loss unchanged. A run
stays the same only if its matrix products are done (they are its arithmetic) and its dropout masks are
drawn as they are: torch draws a CPU mask serially from its Mersenne Twister, element by element (the
same on every CPU: tests/test_train.py), and another generator or another order would draw other
masks, a different run. So, on the default profile's recipe (16-bit LoRA, its batch and data stream,
one thread: one worker of the default layout), this measures:

- the step as the runs take it, and where its time goes in torch's profiler: matrix products (mm,
  addmm, bmm), dropout masks (bernoulli_), everything else (elementwise work, attention's own kernels,
  the optimizer, the framework);
- the floor: every matrix product and every mask the same steps make, replayed alone with the same
  shapes, strides and probabilities, inputs already in cache (a generous floor: nothing is that fast
  inside a step);
- the same for scoring (merged adapters, as the default scores): a forward pass has no masks.

It prices a default final run (a build, 48 steps, 512 scored examples) at the measured rates and at the
floors: their ratio is the most a change that keeps the runs could give this configuration. On a
shared machine the rest (elementwise work over the activations, the framework) moves from one run to
the next more than the floor does, and the ratio with it. Where the same `make benchmark` wrote them, it
reads compile_step.json (the best measured change to the rest: a compiled step, its compile time left
out) and throughput.json (the default's runs per hour over today's, so 2x today's is 2 / that over the
default) and sets the goal against both. It reports; it does not assert. `make benchmark` runs it last;
alone:
`python benchmarks/step_floor.py [--profile NAME] [--steps N] [--examples N] [--threads N]`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from recipe import final_run_recipe

from qr_lib.algorithm import train as training
from qr_lib.algorithm.adapters import merge_for_scoring
from qr_lib.layout import benchmarks_dir
from qr_lib.store import write_artifact

aten = torch.ops.aten
PRODUCTS = {aten.mm.default, aten.addmm.default, aten.bmm.default}
MASKS = {aten.bernoulli_.float}
PRODUCT_NAMES = {"aten::mm", "aten::addmm", "aten::bmm"}
MASK_NAMES = {"aten::bernoulli_"}
DEFAULT_ROW = "the default: two workers + labelled head + merged scoring"   # throughput.py's row
COMPILED_ROW = "compiled, warm cache"                                         # compile_step.py's row


class Spec(NamedTuple):
    """A recorded tensor argument: what a replay needs to make one like it."""
    shape: tuple
    stride: tuple


class Calls(TorchDispatchMode):
    """Records every matrix product and mask draw below autograd (forward and backward alike)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in PRODUCTS or func in MASKS:
            self.calls.append((func, [Spec(tuple(a.shape), a.stride()) if isinstance(a, torch.Tensor) else a
                                      for a in args], dict(kwargs or {})))
        return func(*args, **(kwargs or {}))


def replay(calls: list, repeats: int = 3) -> tuple[float, float]:
    """Seconds the recorded products and masks take alone (the fastest of `repeats` passes), each input
    made once per shape and stride and so in cache."""
    made: dict = {}

    def tensor(spec):
        if spec not in made:
            made[spec] = torch.empty_strided(*spec).normal_()
        return made[spec]
    ready = [(func, [tensor(a) if isinstance(a, Spec) else a for a in args], kwargs) for func, args, kwargs in calls]
    best = {"products": float("inf"), "masks": float("inf")}
    for _ in range(repeats):
        spent = dict.fromkeys(best, 0.0)
        for func, args, kwargs in ready:
            t = time.perf_counter()
            func(*args, **kwargs)
            spent["products" if func in PRODUCTS else "masks"] += time.perf_counter() - t
        best = {k: min(best[k], spent[k]) for k in best}
    return best["products"], best["masks"]


def profiled(fn) -> dict:
    """Self time, in seconds, of the products, the masks and everything else while `fn` runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    split = {"products": 0.0, "masks": 0.0, "total": 0.0}
    for e in prof.key_averages():
        split["total"] += e.self_cpu_time_total / 1e6
        if e.key in PRODUCT_NAMES:
            split["products"] += e.self_cpu_time_total / 1e6
        elif e.key in MASK_NAMES:
            split["masks"] += e.self_cpu_time_total / 1e6
    return split


def measure(profile_name: str, steps: int, examples: int) -> dict:
    """A default final run's pieces (build, step, scored example), each measured and floored."""
    _, model, tok, splits, tcfg, built = final_run_recipe(profile_name, steps)

    def train():
        return training.train(model, tok, splits.train, tcfg, progress=False)
    training.train(model, tok, splits.train, dataclasses.replace(tcfg, steps=2), progress=False)   # warm-up
    log = train()                  # each call replays the same batches and draws the same masks
    step_split = profiled(train)
    with Calls() as step_calls:
        train()
    step_products, step_masks = replay(step_calls.calls)
    # timed again after the replay: the machine drifts, and the ratio should not rest on one moment
    step_times = [log["seconds"] / steps, train()["seconds"] / steps]

    pairs = (splits.test + splits.dev)[:examples]
    with torch.no_grad():
        t = time.perf_counter()
        if not merge_for_scoring(model):
            raise SystemExit("the profile's model is not dense: this floor is for a merged, dense scorer")
        merging = time.perf_counter() - t

        def score():
            return training.example_losses(model, tok, pairs, tcfg.max_len)
        def timed_score():
            t = time.perf_counter()
            score()
            return (time.perf_counter() - t) / len(pairs)
        score()                    # warm-up
        example_times = [timed_score()]
        score_split = profiled(score)
        with Calls() as score_calls:
            score()
        score_products, _ = replay(score_calls.calls)
        example_times.append(timed_score())
    return {"build_s": built, "merge_s": merging, "steps": steps, "train_tokens": log["train_tokens"],
            "step_s": statistics.mean(step_times), "step_times": step_times, "examples": len(pairs),
            "example_s": statistics.mean(example_times), "example_times": example_times,
            "step_profiled": {k: v / steps for k, v in step_split.items()},
            "step_floor": {"products": step_products / steps, "masks": step_masks / steps},
            "step_calls": {"products": sum(f in PRODUCTS for f, _, _ in step_calls.calls) / steps,
                           "masks": sum(f in MASKS for f, _, _ in step_calls.calls) / steps},
            "example_profiled": {k: v / len(pairs) for k, v in score_split.items()},
            "example_floor": {"products": score_products / len(pairs)}}


def sibling_row(out: Path, name: str, row: str) -> tuple[dict | None, str | None]:
    """A row of another benchmark's artifact beside `out` (the same `make benchmark` run writes them
    first), and when it was written; (None, None) where it is not there."""
    path = out.with_name(name)
    if not path.exists():
        return None, None
    record = json.loads(path.read_text())
    rows = {r["configuration"]: r for r in record["result"]["rows"]}
    return (rows[row], record["environment"]["time"]) if row in rows else (None, None)


def drift(times: list[float]) -> float:
    return max(times) / min(times) - 1


def ms(seconds: float) -> str:
    return f"{1e3 * seconds:.1f}"


def run_seconds(fixed_s: float, step_s: float, example_s: float, steps: int = 48, examples: int = 512) -> float:
    """A default final run's seconds (as throughput.runs_per_hour prices it)."""
    return fixed_s + steps * step_s + examples * example_s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="default")
    ap.add_argument("--steps", type=int, default=12, help="timed LoRA steps")
    ap.add_argument("--examples", type=int, default=128, help="examples scored")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (the default's workers take 1)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    m = measure(a.profile, a.steps, a.examples)
    step_floor = sum(m["step_floor"].values())
    example_floor = m["example_floor"]["products"]
    fixed = m["build_s"] + m["merge_s"]   # neither is priced below what it took
    measured = run_seconds(fixed, m["step_s"], m["example_s"])
    floor = run_seconds(fixed, step_floor, example_floor)
    out = a.out or benchmarks_dir(a.profile) / "step_floor.json"
    throughput, throughput_written = sibling_row(out, "throughput.json", DEFAULT_ROW)
    compiled, compiled_written = sibling_row(out, "compile_step.json", COMPILED_ROW)
    goal = 2 / throughput["over today"] if throughput else None
    # the share of everything but the products and masks (step and scoring) that the goal needs gone
    needed = (1 - 1 / goal) / (1 - floor / measured) if goal and goal > 1 else None
    # the compiled step's time with its compile time left out: what the best measured change to the rest gives
    best = measured / run_seconds(fixed, m["step_s"] * compiled["step / eager"], m["example_s"]) if compiled else None
    result = {**m, "threads": a.threads, "run_s": measured, "run_floor_s": floor, "bound": measured / floor,
              "compiled_step_over_eager": compiled["step / eager"] if compiled else None, "best_measured": best,
              "goal_over_default": goal, "goal_needs_rest_gone": needed, "throughput_written": throughput_written,
              "compile_step_written": compiled_written}
    write_artifact(out, {"profile": a.profile, "steps": a.steps, "examples": a.examples, "threads": a.threads},
                   result)

    p, f = m["step_profiled"], m["step_floor"]
    ep = m["example_profiled"]
    lines = [f"Written by `make benchmark` (benchmarks/step_floor.py), profile `{a.profile}`, {a.threads} thread(s) "
             f"({os.cpu_count()} cores): {a.steps} LoRA steps of the default final recipe (16-bit LoRA, "
             f"{m['train_tokens'] / a.steps:.0f} tokens a step, {m['step_calls']['products']:.0f} matrix products and "
             f"{m['step_calls']['masks']:.0f} dropout masks a step) and {m['examples']} examples scored with merged "
             "adapters. 'Measured': without the profiler, the mean of two timings, before and after the replay "
             f"(they differ by {drift(m['step_times']):.0%} for the step, {drift(m['example_times']):.0%} for "
             "scoring: the machine's drift). 'In the step': torch's profiler's self time (it slows what it "
             "watches). 'Alone': the same products and masks replayed one by one, same shapes, inputs in "
             "cache: the least they can take. Milliseconds.", "",
             "| | measured | products in it | masks in it | everything else in it | products alone | masks alone "
             "| floor | measured / floor |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| a LoRA step | {ms(m['step_s'])} | {ms(p['products'])} | {ms(p['masks'])} | "
             f"{ms(p['total'] - p['products'] - p['masks'])} | {ms(f['products'])} | {ms(f['masks'])} | "
             f"{ms(step_floor)} | **{m['step_s'] / step_floor:.2f}** |",
             f"| a scored example | {ms(m['example_s'])} | {ms(ep['products'])} | - | "
             f"{ms(ep['total'] - ep['products'])} | {ms(example_floor)} | - | {ms(example_floor)} | "
             f"**{m['example_s'] / example_floor:.2f}** |",
             f"| a default final run (build and merge {fixed:.1f} s, 48 steps, 512 examples) | {1e3 * measured:.0f} | | | "
             f"| | | {1e3 * floor:.0f} | **{measured / floor:.2f}** |", "",
             f"So no change that keeps every run can make a final run more than {measured / floor:.2f}x as fast as "
             "the default on this machine, and only by making everything but the products and masks free."]
    if best is not None:
        lines.append(f"The best measured change to the rest, torch.compile's fused step ({compiled['step / eager']:.2f}x "
                     f"eager's time; compile_step.md, written {compiled_written}), would make a final run {best:.2f}x "
                     "as fast with its compile time left out.")
    if goal is not None:
        lines.append(f"The goal, twice today's final runs per hour, is {goal:.2f}x the default's (throughput.md, written "
                     f"{throughput_written}: the default at {2 / goal:.2f}x today's): "
                     + ("reached." if goal <= 1 else "beyond the floor." if goal > measured / floor else
                        f"it needs {needed:.0%} of everything but the products and masks gone"
                        + ("." if best is None else ", beyond the best measured change." if goal > best else
                           ", within the best measured change.")))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
