"""Base model + allocation + backend -> a trainable peft model with per-block bits and ranks."""
from __future__ import annotations

import copy
import re
import warnings

import torch
from torch import nn

from ..config import UNQUANTIZED, LoraSettings, QuantConfig
from ..errors import QRError
from ..models import block_linears, linear_names, transformer_blocks
from ..progress import tqdm
from ..layout import Cache
from .allocation import Allocation
from .quant import check_bits, densify, get_backend
from .quant.cache import BlockCache, block_hash

# peft's get_peft_model reads transformers' deprecated `is_gradient_checkpointing` property on every
# build; the warning names nothing this project can change, and it would repeat in every cell.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def _set_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent, _, child = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def quantized_linears(linears: dict, bits: int, backend, cache: BlockCache | None, dense: bool = False) -> dict:
    """The quantized twins of one block's linears, computing in the block's own dtype: packed modules,
    or with `dense` their dequantized weights (quant.DenseQuantLinear) where that computes the same
    (backend.dense_is_exact). Cacheable backends quantize once per machine (the cache holds the
    packed modules as stored) and restore them in the compute dtype."""
    w = next(iter(linears.values()))[1].weight
    if backend.cacheable:
        block = block_hash(linears)
        states = cache.load(block, bits)
        if states is None:
            states = {short: backend.state(backend.quantize(m, bits)) for short, (_, m) in linears.items()}
            cache.save(block, bits, states)
        new = {short: backend.restore(states[short], bits, w.dtype, str(w.device)) for short in linears}
    else:
        new = {short: backend.quantize(module, bits) for short, (_, module) in linears.items()}
    if dense and backend.dense_is_exact(bits):
        new = {short: densify(m, backend.cfg.backend, bits, w.dtype) for short, m in new.items()}
    return new


def set_block_linears(block: nn.Module, linears: dict, modules: dict) -> None:
    """Put `modules` (by short name) where the block's `linears` (short -> (path, module)) sit."""
    for short, (full, _) in linears.items():
        _set_module(block, full, modules[short])


def default_cache(qcfg: QuantConfig) -> BlockCache:
    return BlockCache(Cache.here().blocks, qcfg)


def use_dense(qcfg: QuantConfig, model: nn.Module) -> bool:
    """Whether a model computes with dense dequantized weights: `dequantize_once` on a CPU model."""
    return qcfg.dequantize_once and next(model.parameters()).device.type == "cpu"


def quantize_model(model: nn.Module, allocation: Allocation, qcfg: QuantConfig,
                   cache: BlockCache | None = None, progress: bool = True, dense: bool | None = None) -> nn.Module:
    """Replace each block's seven linears by the backend's quantized modules, in place.
    `dense` (default: use_dense) keeps their dequantized weights instead of the packed modules."""
    blocks = transformer_blocks(model)
    allocation.check_blocks(len(blocks))
    backend = get_backend(qcfg)
    check_bits(backend, allocation.bits)
    dense = use_dense(qcfg, model) if dense is None else dense
    if cache is None and backend.cacheable:
        cache = default_cache(qcfg)
    todo = [(i, b) for i, b in enumerate(allocation.bits) if b != UNQUANTIZED]
    for i, bits in tqdm(todo, desc=f"quantize ({qcfg.backend})", disable=not progress, leave=False):
        linears = block_linears(blocks[i], i)
        set_block_linears(blocks[i], linears, quantized_linears(linears, bits, backend, cache, dense))
    backend.mark_for_peft(model, allocation.bits, dense)
    return model


def lora_config(model: nn.Module, allocation: Allocation, lora: LoraSettings):
    """A peft LoraConfig with an exact rank and alpha for every linear; rank-0 blocks get no adapter."""
    from peft import LoraConfig

    names = linear_names(model)
    allocation.check_blocks(len(names))
    targets, ranks, alphas = [], {}, {}
    for block_names, r in zip(names, allocation.ranks):
        for name in block_names:
            if r > 0:
                targets.append(name)
                ranks[re.escape(name)] = r
                alphas[re.escape(name)] = lora.alpha_ratio * r
    if not targets:
        raise QRError("every block has rank 0, so there is nothing to train; give at least one block a rank")
    first = next(r for r in allocation.ranks if r > 0)
    return LoraConfig(r=first, lora_alpha=lora.alpha_ratio * first, lora_dropout=lora.dropout,
                      target_modules=targets, rank_pattern=ranks, alpha_pattern=alphas,
                      bias="none", task_type="CAUSAL_LM")


def build(base: nn.Module, allocation: Allocation, qcfg: QuantConfig = QuantConfig(),
          lora: LoraSettings = LoraSettings(), cache: BlockCache | None = None, progress: bool = True,
          seed: int = 0, dense: bool | None = None):
    """A trainable PeftModel; the base model is copied, never modified, so one base serves many builds.
    LoRA's A matrices are drawn from `seed` (without touching the global RNG): a build is reproducible.
    `dense`: see quantize_model (memory.measured_bytes needs dense=False, the packed modules)."""
    from peft import get_peft_model

    model = quantize_model(copy.deepcopy(base), allocation, qcfg, cache=cache, progress=progress, dense=dense)
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, lora_config(model, allocation, lora))
    return peft_model


def lora_parameters(model: nn.Module):
    return [(n, p) for n, p in model.named_parameters() if "lora_" in n]
