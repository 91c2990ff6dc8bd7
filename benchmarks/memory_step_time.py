"""Benchmark: memory (formula vs measured), LoRA step time and peak training memory per allocation.

Memory is measured on the real packed model, loaded in the 16-bit storage dtype the formula counts,
so "formula == measured" checks what a GPU run would hold. Step time is measured in the machine's
compute dtype on two paths: the one training takes (dense dequantized weights on CPU with
quant.dequantize_once) for every allocation, and the packed modules for the uniform 4-bit baselines.
Every build is made first and the steps are timed round-robin, one step of each build per round; a
ratio is the median over rounds of a step's time over the 16-bit step of the same round, so the
drift of a shared machine (measured: the same step 2.4-3.7 s, 5% coefficient of variation) hits both
sides alike. A second, identical 16-bit build is timed as a control: its ratio shows the resolution
of the measurement. Peak memory is each build's own (memory.PeakMemory), measured with that build
alone. It reports; it does not assert. Run it with `make benchmark` (PROFILE= and SET= as for every
target), or `python benchmarks/memory_step_time.py --profile NAME --set KEY=VALUE`.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from qr_lib.algorithm import memory
from qr_lib.algorithm.allocation import Allocation, uniform
from qr_lib.algorithm.build import build, use_dense
from qr_lib.algorithm.quant.storage import STORAGE_DTYPE
from qr_lib.algorithm.train import collate, encode, token_loss
from qr_lib.cli import exit_code, parse_overrides
from qr_lib.config import Profile, QuantConfig
from qr_lib.data import load_finetune
from qr_lib.layout import benchmarks_dir
from qr_lib.models import load_model
from qr_lib.store import write_artifact
from qr_lib.workbook.profiles import load_profile

# The uniform 4-bit baselines are also timed packed, to show what dequantizing once saves.
PACKED_TOO = ("uniform-4bit-r8", "nf4-r8 (bnb)")
# LLM.int8 stays packed on every path (quant.bnb: it also quantizes activations).
STAYS_PACKED = ("int8-r8 (bnb)",)
CONTROL = ("uniform-16bit-r8 (control)", "train")


def allocations(n: int, qcfg: QuantConfig) -> list[tuple[Allocation, QuantConfig]]:
    hqq = dataclasses.replace(qcfg, backend="hqq")
    bnb = dataclasses.replace(qcfg, backend="bnb")
    third = n // 3
    mixed = Allocation(bits=(3,) * third + (4,) * (n - 2 * third) + (8,) * third,
                       ranks=(4,) * third + (8,) * (n - 2 * third) + (16,) * third, name="mixed-3/4/8")
    rows = [(uniform(n, b, 8), hqq) for b in (2, 3, 4, 8, 16)]
    rows.append((mixed, hqq))
    rows += [(uniform(n, 4, 8, name="nf4-r8 (bnb)"), bnb), (uniform(n, 8, 8, name="int8-r8 (bnb)"), bnb)]
    return rows


def lora_step(model, opt, batch) -> float:
    """Seconds of one LoRA step: forward, backward, AdamW."""
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss, n = token_loss(model, batch)
    (loss / n).backward()
    opt.step()
    return time.perf_counter() - t0


def _optimizer(model):
    model.train()
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def peak_alone(build_fn, batch, steps: int = 2) -> dict:
    """The peak memory of a few training steps of one build, with no other build alive."""
    device = "cuda" if torch.cuda.is_available() and batch["input_ids"].is_cuda else "cpu"
    with memory.PeakMemory(device) as peak:
        model = build_fn()
        opt = _optimizer(model)
        for _ in range(steps):
            lora_step(model, opt, batch)
        del model, opt
    return peak.result


def interleaved_step_times(models: dict, batch, rounds: int, warmup: int) -> dict:
    """Median step seconds of every model, timed one step each per round."""
    opts = {k: _optimizer(m) for k, m in models.items()}
    times = {k: [] for k in models}
    for r in range(warmup + rounds):
        for k, m in models.items():
            t = lora_step(m, opts[k], batch)
            if r >= warmup:
                times[k].append(t)
    return times


def flop_rates(model, batch, step_s: float) -> dict:
    """The LoRA step's achieved FLOP/s against this machine's own matrix-product FLOP/s in the same dtype.
    The step's FLOPs are counted by torch's FlopCounterMode (the matrix products of forward and
    backward); the machine's rate is the median of timed products at the model's own MLP shape
    (tokens x hidden @ hidden x intermediate), so the ratio says how much of what the cores can do
    in one product a training step gets (the rest: attention's small products, elementwise work,
    the optimizer, Python)."""
    with FlopCounterMode(display=False) as counter:
        lora_step(model, _optimizer(model), batch)
    flops = counter.get_total_flops()
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    tokens, cfg = batch["input_ids"].numel(), model.config
    a = torch.randn(tokens, cfg.hidden_size, dtype=dtype, device=batch["input_ids"].device)
    b = torch.randn(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, device=a.device)
    times = []
    for k in range(23):
        t = time.perf_counter()
        a @ b
        if a.is_cuda:
            torch.cuda.synchronize()
        if k >= 3:                                  # three warm-up products
            times.append(time.perf_counter() - t)
    matmul = 2 * tokens * cfg.hidden_size * cfg.intermediate_size / statistics.median(times)
    return {"step_flops": flops, "step_s": step_s, "achieved_flops_per_s": flops / step_s,
            "matmul_flops_per_s": matmul, "achieved_over_matmul": flops / step_s / matmul,
            "matmul_shape": [tokens, cfg.hidden_size, cfg.intermediate_size], "dtype": str(dtype).removeprefix("torch.")}


def dtype_check(profile, loaded: dict, n_blocks: int, batch, rounds: int) -> dict:
    """The 16-bit LoRA step in float32 and bfloat16, timed round-robin after one warm-up step each.
    `loaded` maps a dtype name to a base model already in memory; only a missing dtype is loaded."""
    builds = {}
    for dtype in ("float32", "bfloat16"):
        base = loaded.get(dtype) or load_model(profile.model, dtype, profile.device)[0]
        builds[dtype] = build(base, uniform(n_blocks, 16, 8), profile.quant, lora=profile.lora, progress=False)
    times = interleaved_step_times(builds, batch, rounds, warmup=1)
    out = {f"{d}_s": statistics.median(t) for d, t in times.items()}
    return {**out, "bfloat16_over_float32": out["bfloat16_s"] / out["float32_s"], "rounds": rounds,
            "auto_picks": profile.dtype}


def run(profile: Profile, out: Path, steps: int, warmup: int, batch_size: int, seq_len: int,
        dtype_rounds: int = 3) -> dict:
    profile_name = profile.name
    base, tok = load_model(profile.model, profile.dtype, profile.device)
    stored, _ = load_model(profile.model, str(STORAGE_DTYPE).removeprefix("torch."), profile.device)
    shapes = memory.model_shapes(base)
    train = load_finetune(dataclasses.replace(profile.data, n_train=64, n_val=0, n_test=0)).train
    rows_enc = encode(tok, train, seq_len)
    # Fixed-length rows so every allocation times the same work: pad nothing, cut to seq_len.
    rows_enc = [r for r in rows_enc if len(r["input_ids"]) == seq_len][:batch_size] or rows_enc[:batch_size]
    batch = {k: v.to(profile.device) for k, v in collate(rows_enc, tok.pad_token_id).items()}
    rows, makers = [], {}
    for alloc, qcfg in allocations(shapes.n_blocks, profile.quant):
        f = memory.formula_bytes(shapes, alloc, qcfg)
        m = memory.measured_bytes(build(stored, alloc, qcfg, lora=profile.lora, progress=False, dense=False))
        row = {"allocation": alloc.name, "backend": qcfg.backend, "avg_bits": round(f["avg_bits"], 3),
               "mean_rank": alloc.mean_rank(), "formula_bytes": f["blocks"], "measured_bytes": m["blocks"],
               "measured_over_formula": m["blocks"] / f["blocks"], "other_bytes": m["other"]}
        paths = {"train": None}
        if alloc.name in PACKED_TOO and use_dense(qcfg, base):
            paths["packed"] = False
        for path, dense in paths.items():
            def make(alloc=alloc, qcfg=qcfg, dense=dense):
                return build(base, alloc, qcfg, lora=profile.lora, progress=False, dense=dense)
            row[path] = {"peak_bytes": peak_alone(make, batch)["peak_bytes"]}
            makers[(alloc.name, path)] = make
        rows.append(row)
        print(f"{alloc.name:>18} {qcfg.backend:>4}  bits {f['avg_bits']:5.2f}  formula {f['blocks'] / 2**20:7.2f} MiB  "
              f"measured {m['blocks'] / 2**20:7.2f} MiB  ratio {m['blocks'] / f['blocks']:.4f}  "
              f"train-path peak {row['train']['peak_bytes'] / 2**30:.2f} GiB", flush=True)
    reference = ("uniform-16bit-r8", "train")
    makers[CONTROL] = makers[reference]
    builds = {k: make() for k, make in makers.items()}
    print(f"timing {len(builds)} builds round-robin: {warmup} warm-up + {steps} timed rounds", flush=True)
    times = interleaved_step_times(builds, batch, steps, warmup)

    def over(key, ref=reference):  # median over rounds of the same-round ratio
        return statistics.median(a / b for a, b in zip(times[key], times[ref]))

    for row in rows:
        for path in ("train", "packed"):
            if path in row:
                t = times[(row["allocation"], path)]
                row[path].update(step_s_median=statistics.median(t), step_s_all=t,
                                 over_16bit=over((row["allocation"], path)))
        if "packed" in row:
            row["packed_over_train"] = over((row["allocation"], "packed"), (row["allocation"], "train"))
        print(f"{row['allocation']:>18}  train step {row['train']['step_s_median']:.3f} s "
              f"({row['train']['over_16bit']:.3f} x 16-bit)"
              + (f"  packed {row['packed']['step_s_median']:.3f} s ({row['packed_over_train']:.2f} x train)"
                 if "packed" in row else ""))
    result_flops = flop_rates(builds[reference], batch, statistics.median(times[reference]))
    dense_rows = [r for r in rows if r["avg_bits"] < 16 and r["allocation"] not in STAYS_PACKED]
    result = {"rows": rows, "compute_dtype": profile.dtype, "dequantize_once": use_dense(profile.quant, base),
              "control_16bit_over_16bit": over(CONTROL),
              "worst_quantized_step_over_16bit": max(r["train"]["over_16bit"] for r in dense_rows),
              "worst_quantized_allocation": max(dense_rows, key=lambda r: r["train"]["over_16bit"])["allocation"],
              "step_ratio_mixed_over_uniform4": over(("mixed-3/4/8", "train"), ("uniform-4bit-r8", "train")),
              "flops": result_flops}
    del builds
    loaded = {str(m.dtype).removeprefix("torch."): m for m in (base, stored)}
    result["dtype_check"] = dtype_check(profile, loaded, shapes.n_blocks, batch, rounds=dtype_rounds)
    print(f"16-bit LoRA step: float32 {result['dtype_check']['float32_s']:.2f} s, bfloat16 "
          f"{result['dtype_check']['bfloat16_s']:.2f} s; auto picks {profile.dtype} here")
    print(f"slowest HQQ/NF4 step / 16-bit LoRA step: {result['worst_quantized_step_over_16bit']:.3f} "
          f"({result['worst_quantized_allocation']}); control (16-bit / 16-bit): "
          f"{result['control_16bit_over_16bit']:.3f}; mixed / uniform-4: {result['step_ratio_mixed_over_uniform4']:.3f}")
    f = result["flops"]
    print(f"16-bit LoRA step: {f['step_flops'] / 1e9:.1f} GFLOP in {f['step_s']:.3f} s = {f['achieved_flops_per_s'] / 1e9:.1f} "
          f"GFLOP/s, {f['achieved_over_matmul']:.2f} x this machine's {f['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s "
          f"matrix product at the model's shape {f['matmul_shape']} ({f['dtype']})")
    write_artifact(out, {"profile": profile, "steps": steps, "warmup": warmup,
                         "batch_size": batch_size, "seq_len": seq_len}, result)
    write_markdown(out.with_suffix(".md"), result, profile_name, batch_size, seq_len)
    return result


def write_markdown(path: Path, result: dict, profile: str, batch_size: int, seq_len: int) -> None:
    train_path = "dense dequantized weights (quant.dequantize_once)" if result["dequantize_once"] else "packed modules"
    lines = [f"Written by `make benchmark` (benchmarks/memory_step_time.py), profile `{profile}`. Memory: the packed model "
             f"loaded in the 16-bit storage dtype. LoRA step = forward, backward and AdamW on {batch_size} x {seq_len} "
             f"tokens in {result['compute_dtype']}, median of the timed steps, every build timed round-robin in the "
             f"same rounds; 'train' is the path training takes here ({train_path}), 'packed' the packed modules. "
             "Peak = peak memory (RSS on CPU) of two training steps of that build alone, from building it on "
             "(memory.PeakMemory), with the base model the process holds.", "",
             "| allocation | backend | avg bits | formula MiB | measured MiB | measured/formula | train step s "
             "| / 16-bit step (same round) | packed step s | packed / train | train peak GiB | packed peak GiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        t, p = r["train"], r.get("packed")
        cells = [r["allocation"], r["backend"], f"{r['avg_bits']:.2f}", f"{r['formula_bytes'] / 2**20:.2f}",
                 f"{r['measured_bytes'] / 2**20:.2f}", f"{r['measured_over_formula']:.4f}",
                 f"{t['step_s_median']:.3f}", f"{t['over_16bit']:.3f}",
                 f"{p['step_s_median']:.3f}" if p else "-", f"{r['packed_over_train']:.2f}" if p else "-",
                 f"{t['peak_bytes'] / 2**30:.2f}", f"{p['peak_bytes'] / 2**30:.2f}" if p else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Slowest HQQ/NF4 LoRA step / 16-bit LoRA step: **{result['worst_quantized_step_over_16bit']:.3f}** "
              f"({result['worst_quantized_allocation']}); the control, a second identical 16-bit build, measured "
              f"{result['control_16bit_over_16bit']:.3f}, the resolution of this measurement. Mixed / uniform-4 (HQQ): "
              f"{result['step_ratio_mixed_over_uniform4']:.3f}. int8 (bnb) stays packed on every path: LLM.int8 also "
              "quantizes activations, so a dense twin would compute something else."]
    f = result["flops"]
    lines += ["", f"Throughput: the 16-bit LoRA step does {f['step_flops'] / 1e9:.1f} GFLOP (torch's FlopCounterMode, "
              f"forward and backward) in {f['step_s']:.3f} s: {f['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s, "
              f"**{f['achieved_over_matmul']:.2f}** x this machine's own {f['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s for "
              f"one matrix product at the model's MLP shape {f['matmul_shape']} in {f['dtype']}."]
    d = result["dtype_check"]
    lines += ["", f"Compute dtype on this machine (16-bit LoRA step, median of {d['rounds']} round-robin steps): float32 "
              f"{d['float32_s']:.2f} s, bfloat16 {d['bfloat16_s']:.2f} s, bfloat16 / float32 = "
              f"**{d['bfloat16_over_float32']:.1f}**; `dtype: auto` picks {d['auto_picks']} here."]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--profile", default="default", help="a profile name or the path of a profile JSON")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a dotted profile setting")
    ap.add_argument("--out", type=Path, default=None,
                    help="output JSON; default results/benchmarks/memory_step_time.json for the default profile, "
                         "results/benchmarks/<profile>/ otherwise")
    ap.add_argument("--steps", type=int, default=20, help="timed round-robin rounds")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--batch-size", type=int, default=4, help="rows per LoRA step")
    ap.add_argument("--seq-len", type=int, default=64, help="tokens per row")
    ap.add_argument("--dtype-rounds", type=int, default=3, help="timed rounds of the float32/bfloat16 check")
    args = ap.parse_args(argv)

    def work():
        profile = load_profile(args.profile, parse_overrides(args.set))
        out = args.out or benchmarks_dir(profile.name) / "memory_step_time.json"
        run(profile, out, args.steps, args.warmup, args.batch_size, args.seq_len, args.dtype_rounds)
    return exit_code(work)


if __name__ == "__main__":
    sys.exit(main())
