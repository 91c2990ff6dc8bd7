"""The adapter a method trains on top of its quantized model: LoRA (per-block ranks), AdaLoRA
(peft; ranks re-allocated during training) or LoRA with a LoftQ initialization.

`prepare(...)` returns the trainable model and a per-step hook (AdaLoRA's rank re-allocation);
`merge_for_scoring(model)` folds the trained adapters into dense frozen weights once training is over.
"""
from __future__ import annotations

import copy

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from ..config import LoraSettings, QuantConfig
from ..errors import QRError
from ..models import block_linears, linear_names, transformer_blocks
from .allocation import Allocation
from .build import build, quantize_model
from .quant import dequantize, get_backend, is_dense

ADAPTERS = ("lora", "adalora", "loftq")


def _adalora(base, allocation: Allocation, qcfg: QuantConfig, lora: LoraSettings, seed: int, total_steps: int):
    """AdaLoRA starts every linear at 1.5x the allocation's mean rank and prunes to the mean."""
    from peft import AdaLoraConfig, get_peft_model

    get_backend(qcfg).check_adapter("adalora")
    target = max(1, round(allocation.mean_rank()))
    model = quantize_model(copy.deepcopy(base), allocation, qcfg, progress=False)
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = AdaLoraConfig(init_r=max(target + 1, round(1.5 * target)), target_r=target,
                        lora_alpha=lora.alpha_ratio * target, lora_dropout=lora.dropout,
                        target_modules=[n for block in linear_names(model) for n in block],
                        total_step=total_steps, tinit=max(1, total_steps // 10),
                        tfinal=max(1, total_steps // 5), deltaT=max(1, total_steps // 20), task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, cfg)
    return peft_model, lambda step: peft_model.base_model.update_and_allocate(step)


@torch.no_grad()
def loftq_init(model, base) -> dict:
    """LoftQ (Li et al., 2023) with one alternating step: A and B start as the best rank-r
    approximation of the quantization residual W - deq(Q), so base + adapter ~ W at step 0.
    (peft's own LoftQ needs a CUDA device; this works on every backend, packed or dense.)
    Returns the mean relative residual before and after."""
    blocks = transformer_blocks(model.get_base_model())
    originals = transformer_blocks(base)
    before, after = [], []
    for i, (blk, orig) in enumerate(zip(blocks, originals)):
        orig_linears = block_linears(orig, i)
        for short, (_, layer) in block_linears(blk, i).items():
            if not hasattr(layer, "lora_A") or "default" not in layer.lora_A:
                continue
            w = orig_linears[short][1].weight.float()
            deq = dequantize(layer.get_base_layer()).float().reshape(w.shape)
            r, scale = layer.r["default"], layer.scaling["default"]
            u, s, vh = torch.linalg.svd(w - deq, full_matrices=False)
            root = s[:r].sqrt()
            a = layer.lora_A["default"].weight
            b = layer.lora_B["default"].weight
            a.copy_((root[:, None] * vh[:r]) / scale ** 0.5)
            b.copy_((u[:, :r] * root[None]) / scale ** 0.5)
            norm = w.norm()
            before.append(((w - deq).norm() / norm).item())
            after.append(((w - deq - scale * b.float() @ a.float()).norm() / norm).item())
    return {"residual_before": sum(before) / len(before), "residual_after": sum(after) / len(after)}


def prepare(base, allocation: Allocation, qcfg: QuantConfig, lora: LoraSettings, adapter: str = "lora",
            seed: int = 0, total_steps: int = 1):
    """(trainable model, per-step hook or None, notes) for one method."""
    if adapter not in ADAPTERS:
        raise QRError(f"adapter {adapter!r} is not one of {list(ADAPTERS)}")
    if adapter == "adalora":
        model, hook = _adalora(base, allocation, qcfg, lora, seed, total_steps)
        return model, hook, {}
    model = build(base, allocation, qcfg, lora, progress=False, seed=seed)
    notes = loftq_init(model, base) if adapter == "loftq" else {}
    return model, None, notes


@torch.no_grad()
def merge_for_scoring(model) -> bool:
    """Fold every trained adapter into its frozen weight, so that scoring computes one matrix product per
    adapted linear instead of three (`make benchmark`: 20.7 examples scored a second against 18.5, the
    scored mean loss moved by about 1e-7: float rounding). Only where every adapted layer's base computes
    with a dense float weight (quant.is_dense: dense dequantized weights on a CPU): a packed quantized
    base would be dequantized and quantized again, losing what its bits keep. The model must not train
    after it, since unmerging does not give the weights back bit for bit. Returns whether it merged."""
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not layers or not all(is_dense(m.get_base_layer()) for m in layers):
        return False
    model.merge_adapter()
    return True
