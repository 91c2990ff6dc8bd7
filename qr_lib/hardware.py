"""What the machine computes fast: the compute dtype `dtype: auto` resolves to.

On CPUs without native bf16 (AVX2 only: no AVX512-BF16, no AMX) bf16 matmuls are emulated: the
embedded model's LoRA step on 4 x 128 tokens took 119 s in bf16 and 6.0 s in float32 on a 2-core
AMD EPYC (AVX2), while on an AVX512-BF16 CPU bf16 was the faster one (`make benchmark` measures both). So `auto` picks
bf16 where the CPU has it natively, float32 otherwise, and bf16 on GPUs that support it. The choice
changes how the model computes, never what it stores: memory is accounted in the storage dtype
(memory.STORAGE_BYTES), so budgets and memory figures are the same on every machine.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    path = Path("/proc/cpuinfo")
    if not path.exists():
        return frozenset()
    for line in path.read_text().splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def auto_dtype(device: str = "cpu") -> tuple[str, str]:
    """(dtype name, why) for `dtype: auto` on `device`."""
    import torch

    if device.startswith("cuda"):
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bfloat16", "GPU with bf16 support"
        return "float16", "GPU without bf16 support"
    native = sorted(set(NATIVE_BF16_FLAGS) & cpu_flags())
    if native:
        return "bfloat16", f"CPU has native bf16 ({', '.join(native)})"
    return "float32", (f"CPU lacks native bf16 ({' / '.join(NATIVE_BF16_FLAGS)}; capability "
                       f"{torch.backends.cpu.get_cpu_capability()}): bf16 would be emulated, many times slower")


def resolve_dtype(name: str, device: str = "cpu") -> str:
    return auto_dtype(device)[0] if name == "auto" else name


def memory_bytes(device: str = "cpu") -> int | None:
    """The memory a run on `device` can use: the GPU's, or the machine's physical memory capped by a
    cgroup (container) limit; None where it cannot be read."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory if torch.cuda.is_available() else None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    for limit in (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")):
        try:
            total = min(total, int(limit.read_text().strip()))
        except (OSError, ValueError):    # absent, or "max"
            pass
    return total


def describe() -> dict:
    """The facts every artifact's environment records about the compute."""
    import torch

    dtype, why = auto_dtype("cpu")
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_native_bf16": dtype == "bfloat16", "auto_dtype_cpu": dtype, "auto_dtype_cpu_why": why}
