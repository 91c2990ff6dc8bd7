"""What an allocation costs, by formula from the model's shapes and by measuring a built model.

The search's memory objective and budget are the formula bytes of the allocated part: the seven
linears of every block (quantized codes + quantization metadata) plus their LoRA adapters.
Embeddings, norms and lm_head stay unquantized and are reported separately ("other").
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from .allocation import UNQUANTIZED, Allocation
from .models import block_linears, torch_dtype, transformer_blocks
from .quant import QuantConfig, get_backend


@dataclass(frozen=True)
class ModelShapes:
    """(out_features, in_features) of the seven linears per block, and the bytes of everything else."""
    linears: tuple[tuple[tuple[int, int], ...], ...]
    other_bytes: int
    n_weights: int    # weights in the allocated linears
    dtype_bytes: int  # bytes per element of the model's own (compute) dtype

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
        other += p.numel() * p.element_size()
    n = sum(o * i for blk in linears for o, i in blk)
    return ModelShapes(tuple(linears), other, n, next(model.parameters()).element_size())


def block_bytes(shapes: ModelShapes, allocation: Allocation, qcfg: QuantConfig,
                adapter_dtype: str = "float32") -> list[dict]:
    """Formula bytes per block: weights (codes + metadata) and LoRA adapters."""
    allocation.check_blocks(shapes.n_blocks)
    backend = get_backend(qcfg)
    base_bytes = shapes.dtype_bytes
    lora_bytes = torch_dtype(adapter_dtype).itemsize
    out = []
    for blk, bits, rank in zip(shapes.linears, allocation.bits, allocation.ranks):
        if bits == UNQUANTIZED:
            weights = sum(o * i * base_bytes for o, i in blk)
        else:
            weights = sum(backend.formula_bytes(o, i, bits, base_bytes) for o, i in blk)
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
    from .allocation import uniform
    return formula_bytes(shapes, uniform(shapes.n_blocks, bits, rank), qcfg, adapter_dtype)["blocks"]


def _module_storage(module: nn.Module) -> int:
    from .quant.bnb import BnbBackend
    from .quant.hqq import HqqBackend

    if hasattr(module, "W_q"):
        return HqqBackend.measured_bytes(module)
    if hasattr(module.weight, "quant_state") or hasattr(module.weight, "SCB"):
        return BnbBackend.measured_bytes(module)
    return sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))


def measured_bytes(model: nn.Module) -> dict:
    """Sum the storage of a built model's tensors, split like formula_bytes."""
    blocks = transformer_blocks(model.get_base_model() if hasattr(model, "get_base_model") else model)
    per_block, counted = [], set()
    for i, block in enumerate(blocks):
        weights = lora = 0
        for _, module in block_linears(block, i).values():
            base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            weights += _module_storage(base)
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


def peak_memory_bytes(device: str = "cpu") -> int:
    """Peak memory of this process: CUDA's allocator peak on a GPU, peak RSS on CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    import resource
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if os.uname().sysname == "Darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
