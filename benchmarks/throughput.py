"""Benchmark: how much of the default design's work this machine does per hour, configuration by
configuration, measured side by side in one run.

The unit of work is a final run of the default profile's recipe: a build, its LoRA steps on the real
fine-tuning stream, and the examples it scores (test and dev pairs). Each configuration is timed in
fresh processes on the same data (16-bit LoRA, the default's batch and length):

- today's:        the configuration of dd24dce, which the goal (issue 33) is measured against: one
                  process with 2 intra-op threads; the language-model head from the first labelled
                  position on (`logits_to_keep`); scoring in batches of 16 under no_grad; glibc's
                  default allocator settings
- two workers:    two processes at once, one thread each, each doing the same unit (work per hour
                  is their combined rate)
- labelled head:  the head on the labelled positions alone (train.row_losses, models.split_head)
- workers + head: two workers and the labelled head (the default of 18f8693)
- allocator:      glibc told never to hand big blocks back to the kernel (MALLOC_MMAP_MAX_=0, a high
                  MALLOC_TRIM_THRESHOLD_): every large tensor otherwise comes from a fresh mmap whose
                  pages fault in again, a quarter of the processes' time in the kernel on these VMs
- Dask's nanny:   two workers with the MALLOC_TRIM_THRESHOLD_=65536 that Dask's nanny gives its workers
                  (the default's runner until it was told not to, runner.py)
- both:           two workers with that allocator
- scoring:        batches of 8, or of 64, under inference_mode
- fused AdamW:    torch's fused CPU AdamW for the LoRA parameters
- the default:    two workers, the labelled head, and each trained adapter merged into its dense weight
                  before scoring (adapters.merge_for_scoring: one matrix product per adapted linear
                  instead of three; the merge's own time counts as scoring);
                  this changes the arithmetic, so the table also gives how far each configuration's mean
                  scored loss lies from today's; and the same in one process with two threads

The machine drifts by as much as most variants differ (another tenant's load), so the plan runs in
rounds, every configuration once per round, and each ratio to today's is taken within its round: the
table gives the mean over rounds and their range.

For each: training tokens per second, the LoRA step's GFLOP/s and its fraction of this machine's own
matrix-product rate (at the model's MLP shape, in float32), examples scored per second, and the final
runs per hour it gives (48 steps and 512 scored examples each, plus a build), set against today's. It
reports; it does not assert. `make benchmark` runs it after memory_step_time.py; alone:
`python benchmarks/throughput.py [--profile NAME] [--steps N] [--examples N]`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def unit(profile_name: str, threads: int, steps: int, examples: int, score_batch: int, inference: bool,
         fused: bool, head: str, merged: bool = False) -> dict:
    """One process's unit of work, timed piece by piece (run in a subprocess by main)."""
    torch.set_num_threads(threads)
    import dataclasses

    from torch.utils.flop_counter import FlopCounterMode

    from recipe import final_run_recipe

    from qr_lib.algorithm import train as training
    from qr_lib.algorithm.adapters import merge_for_scoring

    _, model, tok, splits, tcfg, built = final_run_recipe(profile_name, steps)
    if head == "first":                  # dd24dce's head: every position from the first labelled one
        training.split_head = lambda model: None
    if fused:                            # the loop builds its own AdamW: give it the fused kernel
        real = torch.optim.AdamW
        training.torch.optim.AdamW = lambda params, **kw: real(params, fused=True, **kw)
    training.train(model, tok, splits.train, dataclasses.replace(tcfg, steps=2), progress=False)     # warm-up
    log = training.train(model, tok, splits.train, tcfg, progress=False)
    if fused:
        training.torch.optim.AdamW = real
    rows = training.encode(tok, splits.train[:tcfg.batch_size], tcfg.max_len)
    batch = training.collate(rows, tok.pad_token_id)
    model.train()
    with FlopCounterMode(display=False) as counter:
        loss, n = training.token_loss(model, batch)
        (loss / n).backward()
    flops_per_token = counter.get_total_flops() / int(batch["attention_mask"].sum())
    pairs = (splits.test + splits.dev)[:examples]
    context = torch.inference_mode if inference else torch.no_grad
    with context():
        t = time.perf_counter()
        if merged and not merge_for_scoring(model):
            raise SystemExit("the profile's model is not dense: there is nothing to merge the adapter into")
        merging = time.perf_counter() - t
        training.example_losses(model, tok, pairs[:score_batch], tcfg.max_len, batch_size=score_batch)  # warm-up
        t = time.perf_counter()
        losses = training.example_losses(model, tok, pairs, tcfg.max_len, batch_size=score_batch)
        scored = time.perf_counter() - t + merging
    return {"threads": threads, "build_s": built, "train_s": log["seconds"], "train_tokens": log["train_tokens"],
            "step_s": log["seconds"] / steps, "score_s": scored, "examples": len(pairs),
            "scored_loss": training.mean_loss(losses),
            "flops_per_token": flops_per_token}


# glibc's settings of the allocator variants (environment variables read when a process starts): big
# blocks never handed back; and what Dask's nanny gives its workers unless told otherwise (runner.py).
ALLOCATOR = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**36)}
DASK_NANNY = {"MALLOC_TRIM_THRESHOLD_": "65536"}


def _spawn(args: list[str], allocator: dict | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR}
    env.update({"OMP_NUM_THREADS": args[args.index("--threads") + 1]}, **(allocator or {}))
    return subprocess.Popen([sys.executable, __file__, "--unit", *args], stdout=subprocess.PIPE, text=True, env=env)


def _result(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"a benchmark process failed (exit {proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def matmul_rate(threads: int) -> float:
    """This machine's float32 FLOP/s for one product at the embedded model's MLP shape (256 tokens)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(256, 576), torch.randn(576, 1536)
    times = []
    for k in range(23):
        t = time.perf_counter()
        a @ b
        if k >= 3:
            times.append(time.perf_counter() - t)
    return 2 * 256 * 576 * 1536 / statistics.median(times)


def runs_per_hour(u: dict, steps: int = 48, examples: int = 512) -> float:
    return 3600 / (u["build_s"] + steps * u["step_s"] + examples * u["score_s"] / u["examples"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="default")
    ap.add_argument("--steps", type=int, default=16, help="timed LoRA steps per unit")
    ap.add_argument("--examples", type=int, default=128, help="examples scored per unit")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--unit", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--score-batch", type=int, default=16, help=argparse.SUPPRESS)
    ap.add_argument("--inference", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--fused", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--head", choices=["first", "labelled"], default="labelled", help=argparse.SUPPRESS)
    ap.add_argument("--merged", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=2, help="times the whole plan runs (ratios are taken within a round)")
    a = ap.parse_args(argv)
    if a.unit:
        print(json.dumps(unit(a.profile, a.threads, a.steps, a.examples, a.score_batch, a.inference, a.fused,
                              a.head, a.merged)))
        return 0
    from qr_lib.layout import benchmarks_dir
    from qr_lib.store import write_artifact
    common = ["--profile", a.profile, "--steps", str(a.steps), "--examples", str(a.examples)]
    cores = os.cpu_count() or 2
    two = str(min(2, cores))
    before = ["--head", "first"]
    plan = [("today (dd24dce)", 1, [*common, "--threads", two, *before], None),
            ("two workers", 2, [*common, "--threads", "1", *before], None),
            ("two workers, Dask's nanny allocator", 2, [*common, "--threads", "1", *before], DASK_NANNY),
            ("labelled head", 1, [*common, "--threads", two], None),
            ("two workers + labelled head", 2, [*common, "--threads", "1"], None),
            ("allocator", 1, [*common, "--threads", two, *before], ALLOCATOR),
            ("two workers + allocator", 2, [*common, "--threads", "1", *before], ALLOCATOR),
            ("scoring: batch 8, inference_mode", 1,
             [*common, "--threads", two, *before, "--score-batch", "8", "--inference"], None),
            ("scoring: batch 64, inference_mode", 1,
             [*common, "--threads", two, *before, "--score-batch", "64", "--inference"], None),
            ("fused AdamW", 1, [*common, "--threads", two, *before, "--fused"], None),
            ("labelled head + merged scoring", 1, [*common, "--threads", two, "--merged"], None),
            ("the default: two workers + labelled head + merged scoring", 2, [*common, "--threads", "1", "--merged"],
             None)]
    rounds = []
    for r in range(a.rounds):
        variants = {}
        for name, processes, args, allocator in plan:
            print(f"round {r + 1}/{a.rounds}: {name}", flush=True)
            variants[name] = [_result(p) for p in [_spawn(args, allocator) for _ in range(processes)]]
        rounds.append(variants)
    machine = matmul_rate(min(2, cores))

    def rates(units: list[dict]) -> dict:
        flops = sum(u["flops_per_token"] * u["train_tokens"] / u["train_s"] for u in units)
        return {"train tokens/s": sum(u["train_tokens"] / u["train_s"] for u in units), "GFLOP/s": flops / 1e9,
                "of matmul rate": flops / machine,
                "examples scored/s": sum(u["examples"] / u["score_s"] for u in units),
                "final runs/hour": sum(runs_per_hour(u) for u in units)}
    today = plan[0][0]
    rows = []
    for name, processes, args, _ in plan:
        per_round = [rates(v[name]) for v in rounds]
        ratios = [x["final runs/hour"] / rates(v[today])["final runs/hour"] for x, v in zip(per_round, rounds)]
        # the same examples scored after the same training: how far a variant's arithmetic moves the loss
        moved = max(abs(u["scored_loss"] - t["scored_loss"]) for v in rounds for u, t in zip(v[name], v[today]))
        threads = int(args[args.index("--threads") + 1])
        rows.append({"configuration": name, "processes": processes, "threads each": threads,
                     **{k: statistics.mean(x[k] for x in per_round) for k in per_round[0]},
                     "over today": statistics.mean(ratios), "low": min(ratios), "high": max(ratios),
                     "scored loss moved": moved})
    out = a.out or benchmarks_dir(a.profile) / "throughput.json"
    write_artifact(out, {"profile": a.profile, "steps": a.steps, "examples": a.examples, "rounds": a.rounds},
                   {"rows": rows, "matmul_flops_per_s": machine, "cores": cores, "rounds": rounds})
    lines = [f"Written by `make benchmark` (benchmarks/throughput.py), profile `{a.profile}`, {cores} cores: each "
             f"configuration trains {a.steps} LoRA steps of the final recipe (16-bit LoRA) and scores {a.examples} "
             "examples in fresh processes; 'final runs/hour' prices a default final run (a build, 48 steps, 512 scored "
             f"examples) at the measured rates; the plan ran {a.rounds} times, each ratio to today's (dd24dce's "
             "configuration) taken within its round: mean over rounds [range]. Matrix-product rate here: "
             f"{machine / 1e9:.1f} GFLOP/s (float32, 256 x 576 @ 576 x 1536). 'scored loss moved': the largest "
             "difference, over rounds, between the mean loss it scored and today's on the same examples after the "
             "same training (a variant that changes the arithmetic moves it).", "",
             "| configuration | processes | threads each | train tokens/s | GFLOP/s | of matmul rate | examples scored/s "
             "| final runs/hour | / today [range] | scored loss moved |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['configuration']} | {r['processes']} | {r['threads each']} | {r['train tokens/s']:.1f} | "
                     f"{r['GFLOP/s']:.1f} | {r['of matmul rate']:.2f} | {r['examples scored/s']:.2f} | "
                     f"{r['final runs/hour']:.1f} | **{r['over today']:.2f}** [{r['low']:.2f}, {r['high']:.2f}] | "
                     f"{r['scored loss moved']:.1e} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
