"""Benchmark: how much of the default design's work this machine does per hour, configuration by
configuration, measured side by side in one run.

The unit of work is a final run of the default profile's recipe: a build, its LoRA steps on the real
fine-tuning stream, and the examples it scores (test and dev pairs). Each configuration is timed in
fresh processes on the same data (16-bit LoRA, the default's batch and length):

- today's:        one process with 2 intra-op threads; scoring in batches of 16 under no_grad;
                  glibc's default allocator settings
- two workers:    two processes at once, one thread each, each doing the same unit (work per hour
                  is their combined rate)
- allocator:      glibc told never to hand big blocks back to the kernel (MALLOC_MMAP_MAX_=0, a high
                  MALLOC_TRIM_THRESHOLD_): every large tensor otherwise comes from a fresh mmap whose
                  pages fault in again, a quarter of the processes' time in the kernel on these VMs
- both:           two workers with that allocator
- scoring:        batches of 8, or of 64, under inference_mode
- fused AdamW:    torch's fused CPU AdamW for the LoRA parameters
- today again:    the first configuration once more, last: how far the machine drifted meanwhile

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
         fused: bool) -> dict:
    """One process's unit of work, timed piece by piece (run in a subprocess by main)."""
    torch.set_num_threads(threads)
    import dataclasses

    from torch.utils.flop_counter import FlopCounterMode

    from qr_lib.algorithm import train as training
    from qr_lib.algorithm.allocation import uniform
    from qr_lib.algorithm.build import build
    from qr_lib.algorithm.memory import model_shapes
    from qr_lib.data import load_finetune
    from qr_lib.models import load_model
    from qr_lib.workbook.profiles import load_profile

    profile = load_profile(profile_name)
    base, tok = load_model(profile.model, profile.dtype, profile.device)
    splits = load_finetune(profile.data)
    t = time.perf_counter()
    model = build(base, uniform(model_shapes(base).n_blocks, 16, profile.budget_rank), profile.quant, profile.lora,
                  progress=False)
    built = time.perf_counter() - t
    if fused:                            # the loop builds its own AdamW: give it the fused kernel
        real = torch.optim.AdamW
        training.torch.optim.AdamW = lambda params, **kw: real(params, fused=True, **kw)
    tcfg = dataclasses.replace(profile.finetune.train_config(len(splits.train), 0), steps=steps)
    training.train(model, tok, splits.train, dataclasses.replace(tcfg, steps=2), progress=False)     # warm-up
    log = training.train(model, tok, splits.train, tcfg, progress=False)
    if fused:
        training.torch.optim.AdamW = real
    pairs = (splits.test + splits.dev)[:examples]
    context = torch.inference_mode if inference else torch.no_grad
    with context():
        training.example_losses(model, tok, pairs[:score_batch], tcfg.max_len, batch_size=score_batch)  # warm-up
        t = time.perf_counter()
        training.example_losses(model, tok, pairs, tcfg.max_len, batch_size=score_batch)
        scored = time.perf_counter() - t
    rows = training.encode(tok, splits.train[:tcfg.batch_size], tcfg.max_len)
    batch = training.collate(rows, tok.pad_token_id)
    model.train()
    with FlopCounterMode(display=False) as counter:
        loss, n = training.token_loss(model, batch)
        (loss / n).backward()
    flops_per_token = counter.get_total_flops() / int(batch["attention_mask"].sum())
    return {"threads": threads, "build_s": built, "train_s": log["seconds"], "train_tokens": log["train_tokens"],
            "step_s": log["seconds"] / steps, "score_s": scored, "examples": len(pairs),
            "flops_per_token": flops_per_token}


# glibc's settings of the allocator variant (environment variables read when a process starts).
ALLOCATOR = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**36)}


def _spawn(args: list[str], allocator: bool = False) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR}
    env.update({"OMP_NUM_THREADS": args[args.index("--threads") + 1]}, **(ALLOCATOR if allocator else {}))
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
    a = ap.parse_args(argv)
    if a.unit:
        print(json.dumps(unit(a.profile, a.threads, a.steps, a.examples, a.score_batch, a.inference, a.fused)))
        return 0
    from qr_lib.layout import benchmarks_dir
    from qr_lib.store import write_artifact
    common = ["--profile", a.profile, "--steps", str(a.steps), "--examples", str(a.examples)]
    cores = os.cpu_count() or 2
    two = str(min(2, cores))
    plan = [("today", 1, [*common, "--threads", two], False),
            ("two workers", 2, [*common, "--threads", "1"], False),
            ("allocator", 1, [*common, "--threads", two], True),
            ("two workers + allocator", 2, [*common, "--threads", "1"], True),
            ("scoring: batch 8, inference_mode", 1, [*common, "--threads", two, "--score-batch", "8", "--inference"],
             False),
            ("scoring: batch 64, inference_mode", 1, [*common, "--threads", two, "--score-batch", "64", "--inference"],
             False),
            ("fused AdamW", 1, [*common, "--threads", two, "--fused"], False),
            ("today again (drift control)", 1, [*common, "--threads", two], False)]
    variants = {}
    for name, processes, args, allocator in plan:
        print(name, flush=True)
        variants[name] = [_result(p) for p in [_spawn(args, allocator) for _ in range(processes)]]
    machine = matmul_rate(min(2, cores))
    rows = []
    for name, units in variants.items():
        tokens = sum(u["train_tokens"] / u["train_s"] for u in units)
        flops = sum(u["flops_per_token"] * u["train_tokens"] / u["train_s"] for u in units)
        rows.append({"configuration": name, "processes": len(units), "threads each": units[0]["threads"],
                     "train tokens/s": tokens, "GFLOP/s": flops / 1e9, "of matmul rate": flops / machine,
                     "examples scored/s": sum(u["examples"] / u["score_s"] for u in units),
                     "final runs/hour": sum(runs_per_hour(u) for u in units)})
    today = rows[0]["final runs/hour"]
    for r in rows:
        r["over today"] = r["final runs/hour"] / today
    out = a.out or benchmarks_dir(a.profile) / "throughput.json"
    write_artifact(out, {"profile": a.profile, "steps": a.steps, "examples": a.examples},
                   {"rows": rows, "matmul_flops_per_s": machine, "cores": cores, "units": variants})
    lines = [f"Written by `make benchmark` (benchmarks/throughput.py), profile `{a.profile}`, {cores} cores: each "
             f"configuration trains {a.steps} LoRA steps of the final recipe (16-bit LoRA) and scores {a.examples} "
             "examples in fresh processes; 'final runs/hour' prices a default final run (a build, 48 steps, 512 scored "
             f"examples) at the measured rates; 'today again' ran last and shows the machine's drift over the run. Matrix-product rate here: {machine / 1e9:.1f} GFLOP/s (float32, "
             "256 x 576 @ 576 x 1536).", "",
             "| configuration | processes | threads each | train tokens/s | GFLOP/s | of matmul rate | examples scored/s "
             "| final runs/hour | / today |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['configuration']} | {r['processes']} | {r['threads each']} | {r['train tokens/s']:.1f} | "
                     f"{r['GFLOP/s']:.1f} | {r['of matmul rate']:.2f} | {r['examples scored/s']:.2f} | "
                     f"{r['final runs/hour']:.1f} | **{r['over today']:.2f}** |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
