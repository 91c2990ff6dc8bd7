"""HQQ (half-quadratic quantization): 2, 3, 4 and 8 bits on CPU and GPU, grouped along the input axis."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import QRError

# How HQQ 0.2.x packs codes: (codes per storage word, bytes per word) for each bit-width.
PACKING = {8: (1, 1), 4: (2, 1), 3: (10, 4), 2: (4, 1)}


class HqqBackend:
    supported_bits = (2, 3, 4, 8)
    cacheable = True

    def __init__(self, cfg):
        self.cfg = cfg

    def quant_config(self, bits: int) -> dict:
        from hqq.core.quantize import BaseQuantizeConfig

        qc = BaseQuantizeConfig(nbits=bits, group_size=self.cfg.group_size, axis=1)
        qc["weight_quant_params"]["optimize"] = self.cfg.hqq_optimize
        return qc

    def quantize(self, linear: nn.Linear, bits: int) -> nn.Module:
        from hqq.core.quantize import HQQLinear

        if (linear.in_features * linear.out_features) % self.cfg.group_size:
            raise QRError(f"a {linear.out_features}x{linear.in_features} weight does not split into groups of "
                          f"{self.cfg.group_size}; choose a group_size that divides {linear.in_features}")
        w = linear.weight
        return HQQLinear(linear, self.quant_config(bits), compute_dtype=w.dtype, device=str(w.device),
                         del_orig=False)

    def state(self, module) -> dict:
        return {k: v for k, v in module.state_dict().items()}

    def restore(self, state: dict, bits: int, dtype: torch.dtype, device: str = "cpu") -> nn.Module:
        from hqq.core.quantize import HQQLinear

        module = HQQLinear(None, self.quant_config(bits), compute_dtype=dtype, device=device,
                           initialize=False)
        module.load_state_dict(dict(state))
        return module

    def formula_bytes(self, out_features: int, in_features: int, bits: int, dtype_bytes: int) -> int:
        """Packed codes (rows padded to whole storage words) plus a scale and a zero per group."""
        groups = out_features * in_features // self.cfg.group_size
        per_word, word_bytes = PACKING[bits]
        codes = math.ceil(groups / per_word) * self.cfg.group_size * word_bytes
        meta = 2 * groups * dtype_bytes
        return codes + meta

    @staticmethod
    def measured_bytes(module) -> int:
        total = module.W_q.numel() * module.W_q.element_size()
        total += sum(v.numel() * v.element_size() for v in module.meta.values() if torch.is_tensor(v))
        if module.bias is not None:
            total += module.bias.numel() * module.bias.element_size()
        return total
