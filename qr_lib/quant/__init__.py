"""Weight quantization backends behind one small interface, and the on-disk block cache.

A backend turns one nn.Linear into its quantized module at a given bit-width, and says how many
bytes that module stores, both by formula (from shapes alone) and by measuring the module.
The compute dtype is the model's own dtype, so it has a single source of truth.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import QRError


@dataclass(frozen=True)
class QuantConfig:
    backend: str = "hqq"          # "hqq" (2, 3, 4, 8 bits) or "bnb" (4 = NF4, 8 = int8)
    group_size: int = 128         # HQQ group size; bitsandbytes uses its own fixed blocks
    hqq_optimize: bool = True     # HQQ's half-quadratic optimizer (slower, better) vs plain rounding
    bnb_double_quant: bool = True  # QLoRA's double quantization of NF4 absmax


def get_backend(cfg: QuantConfig):
    from .bnb import BnbBackend
    from .hqq import HqqBackend

    backends = {"hqq": HqqBackend, "bnb": BnbBackend}
    if cfg.backend not in backends:
        raise QRError(f"quantization backend {cfg.backend!r} is not one of {sorted(backends)}; "
                      "use 'hqq' (2/3/4/8-bit) or 'bnb' (NF4 4-bit / int8)")
    return backends[cfg.backend](cfg)


def check_bits(backend, bits) -> None:
    bad = sorted({b for b in bits if b != 16 and b not in backend.supported_bits})
    if bad:
        raise QRError(f"backend {backend.cfg.backend!r} cannot quantize to {bad} bits; it supports "
                      f"{list(backend.supported_bits)} (and 16 = unquantized). Use backend 'hqq' for 2/3-bit")
