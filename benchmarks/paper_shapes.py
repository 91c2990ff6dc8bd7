"""The paper's memory claims at the paper's shapes, on random-weight models (nothing is downloaded).

The paper reports (Zhou et al., arXiv 2505.03802) that an allocation at about 3.5 average bits trains
with about 12% less parameter memory than 4-bit QLoRA, and a peak training memory on LLaMA-3-8B of
12.8 GB against QLoRA's 14.2 GB. Memory does not depend on what the weights are, so this script builds
models of the paper's shapes from their configs with random weights (models.random_model) and measures,
per method:

  formula     the memory model's bytes (algorithm/memory.py): the quantized linears with their metadata
              and the LoRA adapters ("blocks"), and with the 16-bit rest (embeddings, norms, head)
  measured    the bytes the packed built model really stores, in the 16-bit storage dtype
  peak        the peak memory of one LoRA training step (forward, backward, AdamW) at the paper's batch and
              length (4 x 512 tokens by default), each method in a process of its own: RSS on a CPU, the
              CUDA allocator's peak on a GPU; packed quantized weights, gradient checkpointing as stated

Methods: 16-bit LoRA r8, uniform HQQ 4-bit r8, QLoRA NF4 with double quantization r8, uniform HQQ 3-bit
r8, and a mixed allocation at 3.5 average bits (blocks alternating 3 and 4 bits, r8: memory depends only
on how many blocks sit at each rung, so it stands for any searched allocation of that make-up). HQQ uses
the paper's group of 128 weights and plain rounding (its optimizer changes the codes, not their size).

On a CPU the step computes in float32 (what `dtype: auto` picks without native bf16), so peak GiB there
are not a GPU's bf16 figures; the ratios between methods are the comparable part. Weights are random:
only memory and time mean anything. Every output says so.

    python benchmarks/paper_shapes.py --model meta-llama/Llama-3.2-1B          # build and measure
    python benchmarks/paper_shapes.py --model meta-llama/Meta-Llama-3-8B --formula-only
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from qr_lib.algorithm.allocation import Allocation, uniform
from qr_lib.algorithm.build import build
from qr_lib.algorithm.memory import PeakMemory, formula_bytes, measured_bytes, model_shapes
from qr_lib.algorithm.quant.cache import BlockCache
from qr_lib.cli import exit_code
from qr_lib.config import LoraSettings, QuantConfig
from qr_lib.hardware import resolve_dtype
from qr_lib.layout import benchmarks_dir
from qr_lib.models import load_skeleton, random_model
from qr_lib.store import read_artifact, versions, write_artifact
from qr_lib.workbook.comparison import paper_reference

RANDOM = "random weights: only memory and time are meaningful"
HQQ = QuantConfig(backend="hqq", group_size=128, hqq_optimize=False)
NF4 = QuantConfig(backend="bnb", bnb_double_quant=True)
METHODS = ("lora16", "hqq4", "nf4", "hqq3", "mixed3p5")
REFERENCE = "nf4"


def allocation(method: str, n_blocks: int) -> tuple[Allocation, QuantConfig]:
    if method == "mixed3p5":
        return Allocation(bits=[3 if i % 2 else 4 for i in range(n_blocks)], ranks=[8] * n_blocks,
                          name="mixed 3/4-bit r8 (3.5 avg bits)"), HQQ
    bits, qcfg, name = {"lora16": (16, HQQ, "16-bit LoRA r8"), "hqq4": (4, HQQ, "HQQ 4-bit r8"),
                        "nf4": (4, NF4, "QLoRA NF4 r8 (double quant)"), "hqq3": (3, HQQ, "HQQ 3-bit r8")}[method]
    return uniform(n_blocks, bits, 8, name=name), qcfg


def formula_row(method: str, shapes) -> dict:
    alloc, qcfg = allocation(method, shapes.n_blocks)
    f = formula_bytes(shapes, alloc, qcfg)
    return {"method": method, "name": alloc.name, "avg_bits": f["avg_bits"], "formula_weights": f["weights"],
            "formula_blocks": f["blocks"], "formula_lora": f["lora"], "formula_total": f["total"]}


def batch(vocab: int, batch_size: int, seq_len: int, device: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
    return {"input_ids": ids.to(device), "labels": ids.to(device)}


def measure(model_name: str, method: str, batch_size: int, seq_len: int, device: str, checkpointing: bool) -> dict:
    """Measured bytes of the packed model (storage dtype) and the peak of one LoRA step, for one method."""
    skeleton_shapes = model_shapes(load_skeleton(model_name))
    alloc, qcfg = allocation(method, skeleton_shapes.n_blocks)
    with tempfile.TemporaryDirectory() as cache_dir:            # 1B-scale blocks stay out of the user's cache
        cache = BlockCache(Path(cache_dir), qcfg)
        base = random_model(model_name, "bfloat16", device)
        packed = build(base, alloc, qcfg, LoraSettings(), cache=cache, progress=False, dense=False)
        del base
        measured = measured_bytes(packed)
        del packed
        gc.collect()
        compute = resolve_dtype("auto", device)
        base = random_model(model_name, compute, device)
        vocab = base.config.vocab_size
        model = build(base, alloc, qcfg, LoraSettings(), cache=cache, progress=False, dense=False)
        del base
        if checkpointing:
            model.enable_input_require_grads()
            model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        data = batch(vocab, batch_size, seq_len, device)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        gc.collect()
        with PeakMemory(device) as peak:
            t0 = time.perf_counter()
            loss = model(**data).loss
            loss.backward()
            opt.step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
    return {"method": method, "measured_blocks": measured["blocks"], "measured_total": measured["total"],
            "peak_bytes": peak.result["peak_bytes"], "peak_scope": peak.result["scope"],
            "step_seconds": round(seconds, 2), "compute_dtype": compute, "loss_finite": bool(torch.isfinite(loss))}


def run(model_name: str, out: Path, methods=METHODS, formula_only: bool = False, batch_size: int = 4,
        seq_len: int = 512, device: str = "cpu", checkpointing: bool = True, isolate: bool = True) -> dict:
    shapes = model_shapes(load_skeleton(model_name))
    rows = {m: formula_row(m, shapes) for m in methods}
    if not formula_only:
        for m in methods:
            print(f"{model_name}: {m} (a process of its own)" if isolate else f"{model_name}: {m}", flush=True)
            got = _isolated(model_name, m, batch_size, seq_len, device, checkpointing) if isolate else \
                measure(model_name, m, batch_size, seq_len, device, checkpointing)
            rows[m].update(got)
            rows[m]["measured_over_formula"] = got["measured_blocks"] / rows[m]["formula_blocks"]
    ref = rows.get(REFERENCE)
    for r in rows.values():
        if ref:
            r["nominal_bits_over_4"] = r["avg_bits"] / 4
            r["weights_over_nf4"] = r["formula_weights"] / ref["formula_weights"]
            r["blocks_over_nf4"] = r["formula_blocks"] / ref["formula_blocks"]
            r["total_over_nf4"] = r["formula_total"] / ref["formula_total"]
            if "peak_bytes" in r:
                r["peak_over_nf4"] = r["peak_bytes"] / ref["peak_bytes"]
    paper = [e for e in paper_reference()["entries"] if "memory" in e["claim"]]
    result = {"model": model_name, "weights": RANDOM, "rows": list(rows.values()), "paper": paper,
              "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
              "versions": versions(),
              "date": time.strftime("%Y-%m-%d")}
    config = {"model": model_name, "methods": list(methods), "formula_only": formula_only, "batch_size": batch_size,
              "seq_len": seq_len, "device": device, "gradient_checkpointing": checkpointing,
              "process_per_method": isolate, "hqq": HQQ, "nf4": NF4, "lora_rank": 8}
    write_artifact(out, config, result)
    out.with_suffix(".md").write_text(markdown(result, config))
    return result


def _isolated(model_name, method, batch_size, seq_len, device, checkpointing) -> dict:
    """One method's measurement in a fresh process: its peak is its own, not the largest so far."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "one.json"
        cmd = [sys.executable, __file__, "--one", method, "--model", model_name, "--batch-size", str(batch_size),
               "--seq-len", str(seq_len), "--device", device, "--out", str(out)]
        if not checkpointing:
            cmd.append("--no-checkpointing")
        subprocess.run(cmd, check=True)
        return json.loads(out.read_text())


def markdown(result: dict, config: dict) -> str:
    gib = 2 ** 30
    measured = "measured_blocks" in result["rows"][0]
    lines = [f"# Memory at the shape of {result['model']} ({result['weights']})", "",
             f"Written by `benchmarks/paper_shapes.py` on {result['date']} ({result['device']}). Formula: the memory "
             "model's bytes of the quantized linears with their metadata (weights), with the LoRA adapters in "
             "float32 (blocks), and with the 16-bit rest: embeddings, norms, head (total). HQQ groups of 128 "
             "weights with a 16-bit scale and zero each; NF4 with double quantization; LoRA rank 8 on all seven "
             "linears of every block. Nominal bits / 4 counts code bits alone, no metadata."]
    if measured:
        r0 = result["rows"][0]
        lines += ["", f"Measured: the packed model's stored bytes in bf16. Peak: one LoRA step (forward, backward, "
                  f"AdamW) on {config['batch_size']} x {config['seq_len']} tokens, gradient checkpointing "
                  f"{'on' if config['gradient_checkpointing'] else 'off'}, "
                  f"{'each method in its own process' if config['process_per_method'] else 'all methods in one process'} "
                  f"({r0['peak_scope']}), computing in {r0['compute_dtype']}."]
    head = ("| method | avg bits | nominal bits / 4 | weights GiB | blocks GiB | total GiB | weights / NF4 "
            "| blocks / NF4 | total / NF4 |")
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    if measured:
        head += " measured / formula | peak GiB | peak / NF4 | step s |"
        rule += "---:|---:|---:|---:|"
    lines += ["", head, rule]
    for r in result["rows"]:
        cells = [r["name"], f"{r['avg_bits']:.2f}", f"{r['avg_bits'] / 4:.3f}", f"{r['formula_weights'] / gib:.3f}",
                 f"{r['formula_blocks'] / gib:.3f}", f"{r['formula_total'] / gib:.3f}",
                 *(f"{r.get(k, float('nan')):.3f}" for k in ("weights_over_nf4", "blocks_over_nf4", "total_over_nf4"))]
        if measured:
            cells += [f"{r['measured_over_formula']:.4f}", f"{r['peak_bytes'] / gib:.2f}",
                      f"{r.get('peak_over_nf4', float('nan')):.3f}", f"{r['step_seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "The paper's numbers, for reference (LLaMA-3-8B on a GPU; not measured here):", ""]
    lines += [f"- {e['claim']}: {e['value']} {e['unit']} ({e['where']})" for e in result["paper"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="meta-llama/Llama-3.2-1B",
                    help="a shipped config (qr_lib/reference/configs/), a config JSON path or a model folder")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--formula-only", action="store_true", help="the memory model's table alone: no model is built")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-checkpointing", action="store_true", help="measure without gradient checkpointing")
    ap.add_argument("--in-process", action="store_true", help="every method in this process (tests; peaks overlap)")
    ap.add_argument("--out", type=Path, default=None,
                    help="output JSON; default results/benchmarks/paper_shapes/<model>[-formula].json "
                         "(results/benchmarks/gpu/... on a GPU)")
    ap.add_argument("--one", choices=list(METHODS), help=argparse.SUPPRESS)  # the child of an isolated run
    args = ap.parse_args(argv)

    def work():
        if args.one:
            got = measure(args.model, args.one, args.batch_size, args.seq_len, args.device, not args.no_checkpointing)
            args.out.write_text(json.dumps(got))
            return
        stem = Path(args.model).stem if args.model.endswith(".json") else args.model.replace("/", "--")
        folder = benchmarks_dir("gpu" if args.device.startswith("cuda") else "default") / "paper_shapes"
        out = args.out or folder / f"{stem}{'-formula' if args.formula_only else ''}.json"
        result = run(args.model, out, args.methods, args.formula_only, args.batch_size, args.seq_len, args.device,
                     not args.no_checkpointing, not args.in_process)
        print(markdown(result, read_artifact(out)["config"]))
    return exit_code(work)

if __name__ == "__main__":
    sys.exit(main())
