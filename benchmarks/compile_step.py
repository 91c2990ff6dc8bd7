"""Benchmark: does `torch.compile` of the training step pay back its compile time within a run?

The default trains on two workers of one thread each, so each configuration runs in a fresh process
with one thread, on the default profile's recipe (16-bit LoRA, its batch, its data stream):

- eager:              the step as the runs take it
- compiled, cold:     the decoder under torch.compile (inductor, dynamic shapes: batches differ in length),
                      an empty compile cache
- compiled, warm:     the same, a second process reading the first one's compile cache (what every run
                      after the first would pay: a compiled module belongs to one model object, and each
                      run builds its own)

The compiled step keeps eager's random numbers (`fallback_random`: dropout masks drawn by aten, as in
eager), so its losses can be held to eager's; inductor's own generator would draw other masks, a
different run. For each: the first step's time, the median of the steps from the third on, the compile
time (what all steps took beyond that median), the losses of every step against eager's, and the steps a
run must take before compiling pays back (compile time / time saved per step), set against the default
final run's 48 steps and the longest run's 384. It reports; it does not assert. `make benchmark` runs it; alone:
`python benchmarks/compile_step.py [--profile NAME] [--steps N]`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def unit(profile_name: str, steps: int, compiled: bool) -> dict:
    """One process's run of `steps` LoRA steps, timed step by step (run in a subprocess by main)."""
    torch.set_num_threads(1)
    import torch._inductor.config as inductor
    from recipe import final_run_recipe

    from qr_lib.algorithm import train as training
    from qr_lib.models import split_head

    _, model, tok, splits, tcfg, _ = final_run_recipe(profile_name, steps)
    if compiled:
        inductor.fallback_random = True
        decoder, head = split_head(model)
        fast = torch.compile(decoder, dynamic=True)
        training.split_head = lambda m: (fast, head)
    marks = []
    real = training.token_loss

    def timed(m, batch):                 # one call per step (grad_accum 1): the start of each step
        marks.append(time.perf_counter())
        return real(m, batch)
    training.token_loss = timed
    log = training.train(model, tok, splits.train, tcfg, progress=False)
    marks.append(time.perf_counter())
    gaps = [b - a for a, b in zip(marks, marks[1:])]
    return {"first_step_s": gaps[0], "total_s": sum(gaps), "step_s": statistics.median(gaps[2:]),
            "losses": log["losses"]}


def _run(args: list[str], cache: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_CACHE_DIR": cache}
    out = subprocess.run([sys.executable, __file__, "--unit", *args], env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"a benchmark process failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="default")
    ap.add_argument("--steps", type=int, default=12, help="LoRA steps per process (the median takes step 3 on)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--unit", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.unit:
        print(json.dumps(unit(a.profile, a.steps, a.compiled)))
        return 0
    from qr_lib.layout import benchmarks_dir
    from qr_lib.store import write_artifact
    common = ["--profile", a.profile, "--steps", str(a.steps)]
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        units = {}
        for name, args in [("eager", common), ("compiled, cold cache", [*common, "--compiled"]),
                           ("compiled, warm cache", [*common, "--compiled"]), ("eager, again", common)]:
            print(f"{name} ...", flush=True)
            units[name] = _run(args, cache)
    # eager ran before and after the compiled ones: its step is their mean, the drift their difference
    eager = statistics.mean(units[k]["step_s"] for k in ("eager", "eager, again"))
    drift = abs(units["eager"]["step_s"] - units["eager, again"]["step_s"]) / eager
    rows = []
    for name, u in units.items():
        # compile time: what the steps took beyond their median (a recompile at step 2 counts too)
        compile_s = max(0.0, u["total_s"] - len(u["losses"]) * u["step_s"])
        saved = eager - u["step_s"]
        diff = max(abs(x - y) for x, y in zip(u["losses"], units["eager"]["losses"]))
        rows.append({"configuration": name, "first step s": u["first_step_s"], "step s": u["step_s"],
                     "step / eager": u["step_s"] / eager, "compile s": compile_s if "compiled" in name else 0.0,
                     "pays back after steps": (compile_s / saved if saved > 0 else float("inf"))
                     if "compiled" in name else None,
                     "48-step run / eager": (compile_s * ("compiled" in name) + 48 * u["step_s"]) / (48 * eager),
                     "384-step run / eager": (compile_s * ("compiled" in name) + 384 * u["step_s"]) / (384 * eager),
                     "largest loss difference": diff})
    out = a.out or benchmarks_dir(a.profile) / "compile_step.json"
    write_artifact(out, {"profile": a.profile, "steps": a.steps, "threads": 1},
                   {"rows": rows, "eager_drift": drift, "units": units})
    lines = [f"Written by `make benchmark` (benchmarks/compile_step.py), profile `{a.profile}`: {a.steps} LoRA steps of "
             "the final recipe (16-bit LoRA) per fresh process, one thread (as each of the default's two workers); "
             "'step s' is the median from the third step on; eager ran first and last, its step is their mean "
             f"(they differ by {100 * drift:.1f}%, this run's drift). The compiled decoder keeps eager's dropout "
             "masks (inductor's fallback_random). A run's ratio counts its row's compile once: the cold cache's is "
             "what the first run pays, the warm cache's what every later one does.", "",
             "| configuration | first step s | step s | step / eager | compile s | pays back after (steps) "
             "| 48-step run / eager | 384-step run / eager | largest loss difference |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        back = "-" if r["pays back after steps"] is None else (
            "never" if r["pays back after steps"] == float("inf") else f"{r['pays back after steps']:.0f}")
        lines.append(f"| {r['configuration']} | {r['first step s']:.2f} | {r['step s']:.3f} | {r['step / eager']:.2f} | "
                     f"{r['compile s']:.1f} | {back} | {r['48-step run / eager']:.2f} | {r['384-step run / eager']:.2f} | "
                     f"{r['largest loss difference']:.1e} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
