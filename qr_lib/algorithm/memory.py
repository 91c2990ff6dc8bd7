"""What an allocation costs, by formula from the model's shapes and by measuring a built model,
and what a run's training really held at its peak.

The search's memory objective and budget are the formula bytes of the allocated part: the seven
linears of every block (quantized codes + quantization metadata) plus their LoRA adapters.
Embeddings, norms and lm_head stay unquantized and are reported separately ("other"). Everything
unquantized, and every scale and zero, is counted in the 16-bit storage dtype (quant.STORAGE_DTYPE),
whatever dtype the machine computes in, so a budget is the same number on every machine.
"""
from __future__ import annotations

import ctypes
import gc
import os
import resource
from dataclasses import dataclass

import torch
from torch import nn

from ..config import UNQUANTIZED, Profile, QuantConfig
from ..models import block_linears, torch_dtype, transformer_blocks
from .allocation import Allocation, uniform
from .quant import get_backend, storage_bytes
from .quant.storage import STORAGE_DTYPE

STORAGE_BYTES = STORAGE_DTYPE.itemsize


@dataclass(frozen=True)
class ModelShapes:
    """(out_features, in_features) of the seven linears per block, and the bytes of everything else."""
    linears: tuple[tuple[tuple[int, int], ...], ...]
    other_bytes: int  # everything else, in the storage dtype (tied embeddings once)
    n_weights: int    # weights in the allocated linears

    @property
    def n_blocks(self) -> int:
        return len(self.linears)


def model_shapes(model: nn.Module) -> ModelShapes:
    """Shapes of an unquantized base model. `other` counts each tensor once (tied embeddings)."""
    blocks = transformer_blocks(model)
    linears, in_linears = [], set()
    for i, block in enumerate(blocks):
        mods = block_linears(block, i)
        linears.append(tuple((m.out_features, m.in_features) for _, m in mods.values()))
        in_linears |= {id(p) for _, m in mods.values() for p in m.parameters()}
    seen, other = set(), 0
    for p in model.parameters():
        if id(p) in in_linears or id(p) in seen:
            continue
        seen.add(id(p))
        other += p.numel() * STORAGE_BYTES
    n = sum(o * i for blk in linears for o, i in blk)
    return ModelShapes(tuple(linears), other, n)


def block_bytes(shapes: ModelShapes, allocation: Allocation, qcfg: QuantConfig,
                adapter_dtype: str = "float32") -> list[dict]:
    """Formula bytes per block: weights (codes + metadata) and LoRA adapters."""
    allocation.check_blocks(shapes.n_blocks)
    backend = get_backend(qcfg)
    lora_bytes = torch_dtype(adapter_dtype).itemsize
    out = []
    for blk, bits, rank in zip(shapes.linears, allocation.bits, allocation.ranks):
        if bits == UNQUANTIZED:
            weights = sum(o * i * STORAGE_BYTES for o, i in blk)
        else:
            weights = sum(backend.formula_bytes(o, i, bits) for o, i in blk)
        lora = sum(rank * (o + i) for o, i in blk) * lora_bytes
        out.append({"weights": weights, "lora": lora, "total": weights + lora})
    return out


def formula_bytes(shapes: ModelShapes, allocation: Allocation, qcfg: QuantConfig,
                  adapter_dtype: str = "float32") -> dict:
    per_block = block_bytes(shapes, allocation, qcfg, adapter_dtype)
    weights = sum(b["weights"] for b in per_block)
    lora = sum(b["lora"] for b in per_block)
    return {"weights": weights, "lora": lora, "blocks": weights + lora, "other": shapes.other_bytes,
            "total": weights + lora + shapes.other_bytes, "per_block": per_block,
            "avg_bits": average_bits(shapes, allocation)}


def average_bits(shapes: ModelShapes, allocation: Allocation) -> float:
    """Nominal bits per allocated weight (codes only), weighted by each block's size."""
    total = sum(sum(o * i for o, i in blk) * b for blk, b in zip(shapes.linears, allocation.bits))
    return total / shapes.n_weights


def budget_bytes(shapes: ModelShapes, qcfg: QuantConfig, bits: int = 4, rank: int = 8,
                 adapter_dtype: str = "float32") -> int:
    """The paper's "4-bit budget": the block bytes of uniform `bits` at the reference `rank`."""
    return formula_bytes(shapes, uniform(shapes.n_blocks, bits, rank), qcfg, adapter_dtype)["blocks"]


def profile_budget(profile: Profile, shapes: ModelShapes) -> int:
    """A profile's memory budget in bytes: uniform budget_bits at budget_rank."""
    return budget_bytes(shapes, profile.quant, profile.budget_bits, profile.budget_rank)


def measured_bytes(model: nn.Module) -> dict:
    """Sum the storage of a built model's tensors, split like formula_bytes. Needs the packed modules
    (build(..., dense=False)) and a model loaded in the storage dtype, as the formula assumes."""
    blocks = transformer_blocks(model.get_base_model() if hasattr(model, "get_base_model") else model)
    per_block, counted = [], set()
    for i, block in enumerate(blocks):
        weights = lora = 0
        for _, module in block_linears(block, i).values():
            base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            weights += storage_bytes(base)
            counted |= {id(p) for p in module.parameters()}  # HQQ's W_q is a Parameter too
            for name, p in module.named_parameters():
                if "lora_" in name:
                    lora += p.numel() * p.element_size()
        per_block.append({"weights": weights, "lora": lora, "total": weights + lora})
    other, seen = 0, set()
    for p in model.parameters():
        if id(p) not in counted and id(p) not in seen:
            seen.add(id(p))
            other += p.numel() * p.element_size()
    w = sum(b["weights"] for b in per_block)
    l = sum(b["lora"] for b in per_block)
    return {"weights": w, "lora": l, "blocks": w + l, "other": other, "total": w + l + other,
            "per_block": per_block}


class PeakMemory:
    """The peak memory of one piece of work, its own even when many runs share a process.

    GPU: the CUDA allocator's peak since the start. CPU (Linux): the peak resident set since the
    start: freed heap is returned to the system (malloc_trim) and the kernel's high-water mark reset
    (/proc/self/clear_refs), so it includes what the process already held (the base model) but no
    earlier run. Elsewhere: the process's lifetime peak, said so in `scope`.
        with PeakMemory("cpu") as peak: ...;  peak.result -> {"peak_bytes", "start_bytes", "scope"}
    """

    def __init__(self, device: str = "cpu"):
        self.device, self.result = device, {}

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.scope, self.start = "run (CUDA allocator peak)", torch.cuda.memory_allocated()
            return self
        self.scope = "run (peak RSS since the run started)" if _reset_rss_peak() else "process lifetime (ru_maxrss)"
        self.start = _status_bytes("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            peak = torch.cuda.max_memory_allocated()
        elif self.scope.startswith("run"):
            peak = _status_bytes("VmHWM")
        else:
            # ru_maxrss is KiB on Linux, bytes on macOS.
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if os.uname().sysname == "Darwin" else 1024)
        self.result = {"peak_bytes": int(peak), "start_bytes": self.start, "scope": self.scope}
        return False


def _status_bytes(field: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_rss_peak() -> bool:
    """Return freed heap to the system and reset the kernel's peak-RSS mark; False where unsupported."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5 = reset the peak resident set size (Linux >= 4.0)
        return True
    except OSError:
        return False
