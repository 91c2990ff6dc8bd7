"""On-disk cache of quantized blocks: each (block weights, bits, backend settings, library versions) is
quantized once per machine. A file is keyed by a hash of the block's own weight bytes, so two models can never
share an entry by accident, and carries a SHA-256 sidecar so a corrupted file is rebuilt, not used.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch

from ...store import atomic_write_bytes, content_hash, versions
from .storage import STORAGE_DTYPE


def block_hash(linears: dict) -> str:
    """A hash of the block's weights as HQQ quantizes them (in the storage dtype), so models loaded
    in different compute dtypes share their cached blocks."""
    h = hashlib.sha256()
    for name, (_, module) in linears.items():
        w = module.weight.detach().to("cpu", STORAGE_DTYPE).contiguous()
        h.update(name.encode())
        h.update(str((tuple(w.shape), str(w.dtype))).encode())
        h.update(w.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes: numpy has no bf16
    return h.hexdigest()[:20]


class BlockCache:
    def __init__(self, root: Path, qcfg):
        self.root = Path(root)
        self.qcfg = qcfg
        self.hits = 0
        self.misses = 0

    def path(self, block: str, bits: int) -> Path:
        key = content_hash({"block": block, "bits": bits, "quant": self.qcfg.quantizer_settings(),
                            "versions": versions()})
        return self.root / f"{key}.pt"

    def load(self, block: str, bits: int):
        path = self.path(block, bits)
        digest = path.with_suffix(".sha256")
        if not (path.exists() and digest.exists()):
            return None
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest.read_text().strip():
            path.unlink(missing_ok=True)  # corrupted: drop it and let the caller rebuild
            digest.unlink(missing_ok=True)
            return None
        self.hits += 1
        # weights_only: the cache may be shared, and a pickle from someone else's file could run code.
        return torch.load(io.BytesIO(data), weights_only=True)

    def save(self, block: str, bits: int, states: dict) -> None:
        self.misses += 1
        buf = io.BytesIO()
        torch.save(states, buf)
        data = buf.getvalue()
        path = self.path(block, bits)
        atomic_write_bytes(path, data)
        atomic_write_bytes(path.with_suffix(".sha256"), hashlib.sha256(data).hexdigest().encode())
