"""Export a fine-tuned run so that it can be used without qr_lib.

transformers' HqqConfig varies quantization settings only by module type, never by block, so it cannot
express a per-block allocation. The export is therefore plain tensors and JSON, under <run>/export/:

  modules.json       format, the dequantization formula, and per quantized linear its block, backend,
                     bits, group size, shape and LoRA rank
  model.safetensors  every other parameter of the base model as it computed, and for each quantized
                     linear `<name>.codes` (uint8, one code per weight), `<name>.scale`, `<name>.zero`
                     (16-bit, one per group of `group_size` inputs in a row)
  config.json, tokenizer files   the base model's, so transformers can build the architecture
  adapter/           the peft LoRA adapter, as the run saved it

docs/EXTENDING.md has a loader that needs only torch, safetensors, transformers and peft.
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

from safetensors.torch import save_file

from ..algorithm.allocation import Allocation
from ..algorithm.build import quantize_model
from ..algorithm.quant import get_backend
from ..config import UNQUANTIZED, QuantConfig
from ..errors import QRError
from ..layout import RunDir
from ..models import linear_names, load_model
from ..store import follow_umask, read_json, write_json
from .finetune import check_adapter

FORMAT = "qr-adaptor-export/1"
FORMULA = "W[o, i] = (codes[o, i] - zero[o, i // group_size]) * scale[o, i // group_size]"


def export_run(where: RunDir, base=None, tok=None) -> Path:
    """Write the run's export/ folder (see the module docstring); returns that folder."""
    meta = read_json(where.allocation)
    check_adapter(where)
    qcfg = QuantConfig(**meta["quant"])
    backend = get_backend(qcfg)
    try:
        backend.check_export()
    except QRError as e:
        raise QRError(f"{where.path}: {e}") from None
    if meta["adapter"] != "lora":
        raise QRError(f"{where.path} trained a {meta['adapter']} adapter; export writes plain LoRA runs")
    if base is None:
        base, tok = load_model(meta["model"], meta["dtype"])
    allocation = Allocation.from_dict(meta["allocation"])
    packed = quantize_model(copy.deepcopy(base), allocation, qcfg, progress=False, dense=False)
    tensors, modules = {}, {}
    for block, (names, bits, rank) in enumerate(zip(linear_names(packed), allocation.bits, allocation.ranks)):
        if bits == UNQUANTIZED:
            continue
        for name in names:
            exported = backend.export(packed.get_submodule(name))
            modules[name] = {"block": block, **exported.pop("settings"), "rank": rank}
            tensors.update({f"{name}.{k}": v for k, v in exported.items()})
    quantized_weights = {f"{name}.weight" for name in modules}
    for key, value in base.state_dict().items():
        if key not in quantized_weights:
            tensors[key] = value.detach().clone().contiguous()  # clone: tied weights share storage
    out = where.export
    out.mkdir(exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))
    write_json(out / "modules.json", {"format": FORMAT, "dequantize": FORMULA, "base_model": meta["model"],
                                      "compute_dtype": meta["dtype"], "lora": meta["lora"], "modules": modules})
    base.config.save_pretrained(str(out))
    if tok is not None:
        tok.save_pretrained(str(out))
    shutil.copytree(where.adapter, out / "adapter", dirs_exist_ok=True)
    follow_umask(out)
    return out
