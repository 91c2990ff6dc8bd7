"""Benchmark: memory (formula vs measured) and LoRA step time per allocation on one model.

Prints one row per allocation and the step-time ratio mixed / uniform-4 measured in the same run;
writes the figures as an artifact. Not a timed test: it reports, it does not assert.
    python -m qr_lib.bench_memory --out results/benchmarks/memory_step_time.json
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from . import memory
from .allocation import Allocation, uniform
from .build import build
from .config import load_profile
from .data import load_finetune
from .models import load_model
from .quant import QuantConfig
from .store import write_artifact
from .train import collate, encode, token_loss


def allocations(n: int) -> list[tuple[Allocation, QuantConfig]]:
    hqq = QuantConfig(backend="hqq")
    third = n // 3
    mixed = Allocation(bits=(3,) * third + (4,) * (n - 2 * third) + (8,) * third,
                       ranks=(4,) * third + (8,) * (n - 2 * third) + (16,) * third, name="mixed-3/4/8")
    rows = [(uniform(n, b, 8), hqq) for b in (2, 3, 4, 8, 16)]
    rows.append((mixed, hqq))
    rows += [(uniform(n, 4, 8, name="nf4-r8 (bnb)"), QuantConfig(backend="bnb")),
             (uniform(n, 8, 8, name="int8-r8 (bnb)"), QuantConfig(backend="bnb"))]
    return rows


def step_times(model, batch, steps: int, warmup: int) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss, n = token_loss(model, batch)
        (loss / n).backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def run(profile_name: str, out: Path, steps: int, warmup: int, batch_size: int, seq_len: int) -> dict:
    profile = load_profile(profile_name)
    base, tok = load_model(profile.model, profile.dtype, profile.device)
    shapes = memory.model_shapes(base)
    train, _ = load_finetune(profile.data.finetune, 64, 8, 0)
    rows_enc = encode(tok, train, seq_len)
    # Fixed-length rows so every allocation times the same work: pad nothing, cut to seq_len.
    rows_enc = [r for r in rows_enc if len(r["input_ids"]) == seq_len][:batch_size] or rows_enc[:batch_size]
    batch = collate(rows_enc, tok.pad_token_id)
    rows = []
    for alloc, qcfg in allocations(shapes.n_blocks):
        t0 = time.perf_counter()
        model = build(base, alloc, qcfg, lora=profile.lora)
        build_s = time.perf_counter() - t0
        f, m = memory.formula_bytes(shapes, alloc, qcfg), memory.measured_bytes(model)
        times = step_times(model, batch, steps, warmup)
        rows.append({"allocation": alloc.name, "backend": qcfg.backend, "avg_bits": round(f["avg_bits"], 3),
                     "mean_rank": alloc.mean_rank(), "formula_bytes": f["blocks"], "measured_bytes": m["blocks"],
                     "measured_over_formula": m["blocks"] / f["blocks"], "other_bytes": m["other"],
                     "step_s_median": statistics.median(times), "step_s_all": times,
                     "build_s": round(build_s, 2)})
        print(f"{alloc.name:>18} {qcfg.backend:>4}  bits {f['avg_bits']:5.2f}  formula {f['blocks'] / 2**20:7.2f} MiB  "
              f"measured {m['blocks'] / 2**20:7.2f} MiB  ratio {m['blocks'] / f['blocks']:.4f}  "
              f"step {statistics.median(times):.3f} s  build {build_s:.1f} s", flush=True)
        del model
    ref = next(r for r in rows if r["allocation"] == "uniform-4bit-r8")["step_s_median"]
    mixed = next(r for r in rows if r["allocation"].startswith("mixed"))["step_s_median"]
    for r in rows:
        r["step_ratio_vs_uniform4"] = r["step_s_median"] / ref
    result = {"rows": rows, "step_ratio_mixed_over_uniform4": mixed / ref,
              "peak_rss_bytes": memory.peak_memory_bytes(profile.device)}
    print(f"step-time ratio mixed / uniform-4 (HQQ): {mixed / ref:.3f}")
    write_artifact(out, {"profile": profile_name, "steps": steps, "warmup": warmup,
                         "batch_size": batch_size, "seq_len": seq_len}, result)
    write_markdown(out.with_suffix(".md"), result, batch_size, seq_len)
    return result


def write_markdown(path: Path, result: dict, batch_size: int, seq_len: int) -> None:
    lines = [f"Written by `make benchmark` (qr_lib/bench_memory.py); LoRA step = forward, backward and "
             f"AdamW on a batch of {batch_size} x {seq_len} tokens, median of the timed steps.", "",
             "| allocation | backend | avg bits | formula MiB | measured MiB | measured/formula | step s | step / uniform-4 |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['allocation']} | {r['backend']} | {r['avg_bits']:.2f} | {r['formula_bytes'] / 2**20:.2f} | "
                     f"{r['measured_bytes'] / 2**20:.2f} | {r['measured_over_formula']:.4f} | "
                     f"{r['step_s_median']:.3f} | {r['step_ratio_vs_uniform4']:.2f} |")
    lines += ["", f"Step-time ratio mixed / uniform-4 (HQQ): **{result['step_ratio_mixed_over_uniform4']:.3f}**; "
              f"peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB."]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="default")
    ap.add_argument("--out", type=Path, default=Path("results/benchmarks/memory_step_time.json"))
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    a = ap.parse_args(argv)
    run(a.profile, a.out, a.steps, a.warmup, a.batch_size, a.seq_len)


if __name__ == "__main__":
    main()
