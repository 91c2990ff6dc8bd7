"""HQQ (half-quadratic quantization): 2, 3, 4 and 8 bits on CPU and GPU.

HQQ 0.2.x groups the flattened weight (`W.reshape(-1, group_size)` with axis=1), so a group stays
inside one output row only when group_size divides in_features. Otherwise half the groups of a
576-wide SmolLM2 linear at group 128 mix the end of one row with the start of the next, and a row
of small weights beside one of large weights is crushed. check_shape refuses such a group size.
Scales and zeros are stored in STORAGE_DTYPE (16-bit), as the memory formula counts them; a module
restored in another compute dtype holds the same values, cast.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ...errors import QRError
from .storage import STORAGE_DTYPE

# How HQQ 0.2.x packs codes: (codes per storage word, bytes per word) for each bit-width.
PACKING = {8: (1, 1), 4: (2, 1), 3: (10, 4), 2: (4, 1)}


def _divisors(n: int, upto: int = 256) -> list[int]:
    return [d for d in (16, 32, 64, 128, 192, 256) if d <= upto and n % d == 0]


class HqqBackend:
    supported_bits = (2, 3, 4, 8)
    cacheable = True

    def __init__(self, cfg):
        self.cfg = cfg

    @staticmethod
    def owns(module) -> bool:
        return hasattr(module, "W_q")

    def check_shape(self, out_features: int, in_features: int) -> None:
        g = self.cfg.group_size
        if g <= 0 or in_features % g:
            raise QRError(
                f"HQQ group_size {g} does not divide in_features {in_features} of a {out_features}x{in_features} "
                f"linear, so its groups would span two output rows; set quant.group_size to one that divides "
                f"every in_features of the model, e.g. {_divisors(in_features) or 'a divisor of ' + str(in_features)}")

    @staticmethod
    def dense_is_exact(bits: int) -> bool:
        """HQQ computes with its dequantized weight at every bit-width."""
        return True

    @staticmethod
    def mark_for_peft(model, bits, dense: bool) -> None:
        """peft wraps HQQLinear by type; nothing to declare."""

    @staticmethod
    def check_adapter(adapter: str) -> None:
        if adapter == "adalora":
            raise QRError("peft's AdaLoRA has no HQQ layer; give this method quant.backend = 'bnb' (NF4)")

    @staticmethod
    def check_export() -> None:
        """HQQ modules export as codes, scales and zeros (export())."""

    def quant_config(self, bits: int) -> dict:
        from hqq.core.quantize import BaseQuantizeConfig

        qc = BaseQuantizeConfig(nbits=bits, group_size=self.cfg.group_size, axis=1)
        qc["weight_quant_params"]["optimize"] = self.cfg.hqq_optimize
        return qc

    def quantize(self, linear: nn.Linear, bits: int) -> nn.Module:
        """The packed module as stored: quantized from the 16-bit weight, scales and zeros in 16 bits."""
        from hqq.core.quantize import HQQLinear

        self.check_shape(linear.out_features, linear.in_features)
        w = linear.weight
        stored = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                           device="meta")
        stored.weight = nn.Parameter(w.detach().to(STORAGE_DTYPE), requires_grad=False)
        if linear.bias is not None:
            stored.bias = nn.Parameter(linear.bias.detach().to(STORAGE_DTYPE), requires_grad=False)
        return HQQLinear(stored, self.quant_config(bits), compute_dtype=STORAGE_DTYPE, device=str(w.device),
                         del_orig=False)

    def state(self, module) -> dict:
        return {k: v for k, v in module.state_dict().items()}

    def restore(self, state: dict, bits: int, dtype: torch.dtype, device: str = "cpu") -> nn.Module:
        """The packed module computing in `dtype` (HQQ casts scales and zeros to it on load)."""
        from hqq.core.quantize import HQQLinear

        module = HQQLinear(None, self.quant_config(bits), compute_dtype=dtype, device=device,
                           initialize=False)
        module.load_state_dict(dict(state))
        return module

    @staticmethod
    def dequantize(module) -> torch.Tensor:
        """HQQ's own dequantization, (out, in) in the module's compute dtype."""
        return module.dequantize()

    @staticmethod
    def export(module) -> dict:
        """The module in a form any framework can read: one uint8 code per weight [out, in], and the
        16-bit scale and zero of each group [out, in / group_size], such that
        W[o, i] = (codes[o, i] - zero[o, i // group_size]) * scale[o, i // group_size]."""
        from hqq.core.quantize import Quantizer

        meta = module.meta
        if meta.get("quant_zero") or meta.get("quant_scale") or meta["axis"] != 1:
            raise QRError("export handles HQQ modules with plain 16-bit scales and zeros grouped along the input "
                          "axis (this project's settings); this module was quantized otherwise")
        out_f, in_f = meta["shape"]
        g = meta["group_size"]
        w_q = module.W_q.view(meta["unpack_view_dtype"]) if meta.get("view_as_float") else module.W_q
        codes = Quantizer.unpack[meta["packing"]](w_q, dtype=torch.uint8)[: out_f * in_f // g]  # 3-bit pads
        return {"codes": codes.reshape(out_f, in_f).contiguous(),
                "scale": meta["scale"].reshape(out_f, in_f // g).to(STORAGE_DTYPE).contiguous(),
                "zero": meta["zero"].reshape(out_f, in_f // g).to(STORAGE_DTYPE).contiguous(),
                "settings": {"backend": "hqq", "bits": meta["nbits"], "group_size": g, "shape": [out_f, in_f]}}

    def formula_bytes(self, out_features: int, in_features: int, bits: int) -> int:
        """Packed codes (the group count padded to whole storage words) plus a 16-bit scale and a
        16-bit zero per group."""
        self.check_shape(out_features, in_features)
        groups = out_features * in_features // self.cfg.group_size
        per_word, word_bytes = PACKING[bits]
        codes = math.ceil(groups / per_word) * self.cfg.group_size * word_bytes
        meta = 2 * groups * STORAGE_DTYPE.itemsize
        return codes + meta

    @staticmethod
    def measured_bytes(module) -> int:
        total = module.W_q.numel() * module.W_q.element_size()
        total += sum(v.numel() * v.element_size() for v in module.meta.values() if torch.is_tensor(v))
        if module.bias is not None:
            total += module.bias.numel() * module.bias.element_size()
        return total
