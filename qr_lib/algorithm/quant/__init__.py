"""Weight quantization backends behind one small interface, and the on-disk block cache.

A backend turns one nn.Linear into its quantized module at a given bit-width, says how many bytes
that module stores (by formula from shapes alone, and by measuring the module), and dequantizes it.

Storage and compute are separate. What a quantized model stores is fixed by the paper's accounting:
16-bit scales and zeros (STORAGE_DTYPE), whatever the machine computes in. How it computes is the
model's compute dtype (hardware.py). On CPU, with `dequantize_once`, each frozen quantized weight is
replaced after quantization by the dense tensor the backend's own dequantization produces
(DenseQuantLinear): the frozen weight never changes during LoRA training, so dequantizing it on every
forward, as the packed modules do, is pure overhead there. Memory is still the packed formula;
GPUs keep the packed kernels.
"""
from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from ...config import QuantConfig
from ...errors import QRError
from .bnb import BnbBackend
from .hqq import HqqBackend


@runtime_checkable
class QuantBackend(Protocol):
    """What every backend answers; nothing outside quant/ asks which backend it is talking to.
    A `cacheable` backend also has `state(module) -> dict` and `restore(state, bits, dtype, device)`
    for the block cache (cache.py)."""
    supported_bits: ClassVar[tuple[int, ...]]
    cacheable: ClassVar[bool]          # worth caching quantized blocks on disk (quantizing takes seconds)
    cfg: QuantConfig

    @staticmethod
    def owns(module: nn.Module) -> bool: ...               # is this a packed module of mine?
    def check_shape(self, out_features: int, in_features: int) -> None: ...   # QRError if it cannot
    @staticmethod
    def dense_is_exact(bits: int) -> bool: ...             # does a dense twin compute the same?
    def mark_for_peft(self, model: nn.Module, bits: int, dense: bool) -> None: ...
    @staticmethod
    def check_adapter(adapter: str) -> None: ...           # QRError if peft has no such layer here
    @staticmethod
    def check_export() -> None: ...                        # QRError if runs cannot leave qr_lib
    def quantize(self, linear: nn.Linear, bits: int) -> nn.Module: ...
    @staticmethod
    def dequantize(module: nn.Module) -> torch.Tensor: ...
    def formula_bytes(self, out_features: int, in_features: int, bits: int) -> int: ...
    @staticmethod
    def measured_bytes(module: nn.Module) -> int: ...


BACKENDS: dict[str, type[QuantBackend]] = {"hqq": HqqBackend, "bnb": BnbBackend}


def get_backend(cfg: QuantConfig) -> QuantBackend:
    """The dispatch: the backend object of a quantization config."""
    backends = BACKENDS
    if cfg.backend not in backends:
        raise QRError(f"quantization backend {cfg.backend!r} is not one of {sorted(backends)}; "
                      "use 'hqq' (2/3/4/8-bit) or 'bnb' (NF4 4-bit / int8)")
    return backends[cfg.backend](cfg)


def check_bits(backend, bits) -> None:
    bad = sorted({b for b in bits if b != 16 and b not in backend.supported_bits})
    if bad:
        other = [name for name, b in BACKENDS.items() if name != backend.cfg.backend and set(bad) <= set(b.supported_bits)]
        fix = f"use backend {other[0]!r} for them" if other else "choose bits from that list"
        raise QRError(f"backend {backend.cfg.backend!r} cannot quantize to {bad} bits; it supports "
                      f"{list(backend.supported_bits)} (and 16 = unquantized); {fix}")


class DenseQuantLinear(nn.Linear):
    """A frozen quantized linear kept as its dequantized weight in the compute dtype. It remembers
    what it stands for (backend, bits), so memory is accounted packed and never measured from it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, backend: str, bits: int):
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias=bias is not None, device="meta")
        self.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            self.bias = nn.Parameter(bias, requires_grad=False)
        self.quant_backend, self.quant_bits = backend, bits

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dequantized from {self.quant_backend} {self.quant_bits}-bit"


def dequantize(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight a linear computes with: the backend's own dequantization for a packed
    module, the weight itself for a dense one."""
    for backend in BACKENDS.values():
        if backend.owns(module):
            return backend.dequantize(module)
    return module.weight


def is_dense(module: nn.Module) -> bool:
    """Whether a linear computes with a plain float weight (unquantized, or a dense dequantized twin),
    into which an adapter folds exactly up to float rounding; a backend's packed module does not."""
    return isinstance(module, nn.Linear) and not any(b.owns(module) for b in BACKENDS.values())


def densify(module: nn.Module, backend: str, bits: int, dtype: torch.dtype) -> DenseQuantLinear:
    """The dense twin of a packed quantized module: weight = its dequantization, cast to `dtype`."""
    bias = module.bias.detach().to(dtype) if module.bias is not None else None
    return DenseQuantLinear(dequantize(module).detach().to(dtype), bias, backend, bits)


def storage_bytes(module: nn.Module) -> int:
    """Bytes a built linear really stores (packed codes, scales, zeros, bias)."""
    if isinstance(module, DenseQuantLinear):
        raise QRError("this model computes with dense dequantized weights (quant.dequantize_once on CPU), "
                      "so its tensors do not show what it stores; build it with dense=False to measure")
    for backend in BACKENDS.values():
        if backend.owns(module):
            return backend.measured_bytes(module)
    return sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
