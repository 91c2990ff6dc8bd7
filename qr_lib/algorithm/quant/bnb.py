"""bitsandbytes: NF4 (QLoRA's 4-bit, double-quantized absmax) and LLM.int8 (8-bit)."""
from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ...errors import QRError

# On AVX512-BF16 CPUs bitsandbytes looks for an optional hub kernel package ("kernels") and warns that
# it is missing; its own CPU kernels, which it falls back to, are what runs. Offline the warning is noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

NF4_BLOCK = 64          # weights per absmax in bitsandbytes' 4-bit quantization
DOUBLE_QUANT_BLOCK = 256  # absmax values per second-level scale under double quantization


class BnbBackend:
    supported_bits = (4, 8)
    # Quantizing with bitsandbytes takes milliseconds; caching would only add I/O.
    cacheable = False

    def __init__(self, cfg):
        self.cfg = cfg

    @staticmethod
    def owns(module) -> bool:
        w = getattr(module, "weight", None)
        return hasattr(w, "quant_state") or hasattr(w, "SCB")

    def check_shape(self, out_features: int, in_features: int) -> None:
        """bitsandbytes blocks the flattened weight itself; every shape is accepted."""

    @staticmethod
    def dense_is_exact(bits: int) -> bool:
        """NF4 computes with its dequantized weight, so a dense twin computes the same; LLM.int8
        also quantizes the activations (about 0.5% off the dense result on the tiny model), so
        int8 layers stay packed."""
        return bits == 4

    def mark_for_peft(self, model, bits, dense: bool) -> None:
        """peft picks its bitsandbytes LoRA layers only when the model says it is loaded in 4/8 bits."""
        model.is_loaded_in_4bit = 4 in bits and not (dense and self.dense_is_exact(4))
        model.is_loaded_in_8bit = 8 in bits

    @staticmethod
    def check_adapter(adapter: str) -> None:
        """peft has bitsandbytes layers for LoRA and AdaLoRA."""

    @staticmethod
    def check_export() -> None:
        raise QRError("bitsandbytes allocations are uniform: load such a run with transformers' BitsAndBytesConfig "
                      "and the peft adapter in adapter/; export writes HQQ runs")

    @staticmethod
    def dequantize(module) -> torch.Tensor:
        """bitsandbytes' own dequantization, (out, in): NF4 in the layer's compute dtype, int8 in float32."""
        import bitsandbytes.functional as F

        w = module.weight
        if hasattr(w, "quant_state"):
            return F.dequantize_4bit(w.data, w.quant_state)
        return F.int8_vectorwise_dequant(w.data, _int8_scales(module))

    def quantize(self, linear: nn.Linear, bits: int) -> nn.Module:
        import bitsandbytes as bnb

        w = linear.weight.data
        has_bias = linear.bias is not None
        if bits == 4:
            q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                  compute_dtype=w.dtype,
                                  compress_statistics=self.cfg.bnb_double_quant, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=self.cfg.bnb_double_quant)
            # On CPUs with AVX512-BF16 the first eval forward repacks 4-bit weights in place, after
            # which LoRA gradients through the layer are silently None (tests/test_build.py shows it).
            q.support_avx512bf16_for_cpu = False
        else:
            q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                    has_fp16_weights=False, threshold=0.0)
            q.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
        if has_bias:
            q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        return q.to(w.device)

    def formula_bytes(self, out_features: int, in_features: int, bits: int) -> int:
        n = out_features * in_features
        if bits == 8:
            return n + 4 * out_features  # int8 codes + one float32 scale per row
        blocks = math.ceil(n / NF4_BLOCK)
        total = n // 2 + 16 * 4  # packed 4-bit codes + the 16-entry NF4 code book
        if self.cfg.bnb_double_quant:
            # uint8 absmax per block, float32 absmax per 256 blocks, a 256-entry code book, an offset
            total += blocks + 4 * math.ceil(blocks / DOUBLE_QUANT_BLOCK) + 256 * 4 + 4
        else:
            total += 4 * blocks
        return total

    @staticmethod
    def measured_bytes(module) -> int:
        def size(t):
            return t.numel() * t.element_size() if torch.is_tensor(t) else 0

        w = module.weight
        total = size(w.data) + (size(module.bias.data) if module.bias is not None else 0)
        qs = getattr(w, "quant_state", None)
        if qs is not None:
            total += size(qs.absmax) + size(qs.code)
            if qs.nested:
                total += size(qs.state2.absmax) + size(qs.state2.code) + size(qs.offset)
        return total + (size(_int8_scales(module)) if hasattr(w, "SCB") else 0)


def _int8_scales(module) -> torch.Tensor:
    """The per-row scales of an int8 layer: on the weight until the first forward, which moves them
    into the layer's state (bitsandbytes' init_8bit_state)."""
    scb = module.weight.SCB
    return scb if scb is not None else module.state.SCB
