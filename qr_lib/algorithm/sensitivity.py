"""Phase I: fidelity sensitivity profiling.

For each block (and each profiled bit-width), quantize that block alone, keep the rest unquantized,
and measure the token-averaged KL divergence KL(P_full || P_quantized) between the two models'
next-token distributions on calibration text. High KL = a fragile block. These scores seed Phase II.
Progress is saved after every block, so an interrupted Phase I resumes where it stopped.
The full model's distributions are kept in bf16 on the model's device: n_calib x seq_len x vocab x 2
bytes (32 x 128 x 49152 x 2 = 0.4 GB on the default profile; the paper profile's 64 x 512 x 128256
x 2 = 8.4 GB fits an 80 GB GPU).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..config import Profile, QuantConfig, SensitivityConfig
from ..data import load_texts
from ..errors import QRError
from ..layout import Layout
from ..models import block_linears, transformer_blocks
from ..progress import tqdm
from ..store import cached, fresh, keyed, read_artifact, write_artifact
from .phases import PhaseI
from .build import default_cache, quantized_linears, set_block_linears, use_dense
from .quant import check_bits, get_backend


def calibration_batches(tok, texts, seq_len: int, batch_size: int, device) -> list[dict]:
    enc = tok(list(texts), add_special_tokens=False, truncation=True, max_length=seq_len,
              padding=True, return_tensors="pt")
    return [{"input_ids": enc["input_ids"][i:i + batch_size].to(device),
             "attention_mask": enc["attention_mask"][i:i + batch_size].to(device)}
            for i in range(0, len(texts), batch_size)]


@torch.no_grad()
def _logprobs(model, batch) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.log_softmax(out.float(), dim=-1)


def reference_distributions(model, batches) -> list[torch.Tensor]:
    """The model's next-token log-probabilities on every batch, kept in bf16 (it halves their memory;
    mean_kl computes in float32): what mean_kl measures a quantized twin against."""
    return [_logprobs(model, b).to(torch.bfloat16) for b in batches]


@torch.no_grad()
def mean_kl(model, batches, reference: list[torch.Tensor]) -> float:
    """Token-averaged KL(reference || model) over non-padding positions."""
    total, count = 0.0, 0
    for batch, ref in zip(batches, reference):
        lq = _logprobs(model, batch)
        lp = ref.float()
        kl = (lp.exp() * (lp - lq)).sum(-1)
        mask = batch["attention_mask"].bool()
        total += kl[mask].sum().item()
        count += int(mask.sum())
    return total / max(count, 1)


def measure(model, tok, texts, cfg: SensitivityConfig, qcfg: QuantConfig, partial: Path | None = None,
            progress: bool = True) -> dict:
    """{"bits": [...], "kl": {bits: [per-block KL]}}; the model is restored before returning."""
    backend = get_backend(qcfg)
    check_bits(backend, cfg.bits)
    if not texts:
        raise QRError("no calibration texts; raise data.n_calib above 0")
    device = next(model.parameters()).device
    batches = calibration_batches(tok, texts, cfg.seq_len, cfg.batch_size, device)
    reference = reference_distributions(model, batches)
    blocks = transformer_blocks(model)
    # The progress file is checksummed like every artifact: a damaged or edited one is named and its
    # blocks are measured again, so no value enters sensitivity.json unchecked.
    progress_config = {"progress of": partial.name} if partial is not None else None
    record = read_artifact(partial, then="measuring its blocks again") if partial is not None else None
    done = record["result"] if fresh(record, progress_config) else {}
    cache = default_cache(qcfg) if backend.cacheable else None
    dense = use_dense(qcfg, model)  # the same weights training computes with
    todo = [(i, b) for b in cfg.bits for i in range(len(blocks)) if f"{b}:{i}" not in done]
    for i, bits in tqdm(todo, desc="Phase I: KL per block", disable=not progress):
        linears = block_linears(blocks[i], i)
        originals = {short: module for short, (_, module) in linears.items()}
        set_block_linears(blocks[i], linears, quantized_linears(linears, bits, backend, cache, dense))
        try:
            done[f"{bits}:{i}"] = mean_kl(model, batches, reference)
        finally:
            set_block_linears(blocks[i], linears, originals)
        if partial is not None:
            write_artifact(partial, progress_config, done)
    return {"bits": list(cfg.bits),
            "kl": {str(b): [done[f"{b}:{i}"] for i in range(len(blocks))] for b in cfg.bits}}


def config(profile: Profile) -> dict:
    """What Phase I's result depends on (keyed: Phase II's config cites the key). Only the calibration
    passages matter, so fine-tuning data settings do not invalidate it."""
    d = profile.data
    return keyed({"model": profile.model, "dtype": profile.dtype,
                  "text": {"source": d.text, "n_calib": d.n_calib, "n_heldout": d.n_heldout, "seed": d.seed},
                  "quant": profile.quant, "sensitivity": profile.sensitivity})


def run(profile: Profile, layout: Layout, model, tok, progress: bool = True) -> PhaseI:
    """Phase I for a profile; reuses the layout's sensitivity.json while its config matches."""
    d, cfg = profile.data, config(profile)
    partial = layout.sensitivity_progress(cfg["key"])

    def compute():
        calib, _ = load_texts(d)
        t0 = time.time()
        result = measure(model, tok, calib, profile.sensitivity, profile.quant, partial=partial, progress=progress)
        return {**result, "seconds": round(time.time() - t0, 1), "n_texts": len(calib)}
    result = PhaseI.from_dict(cached(layout.sensitivity, cfg, compute))
    partial.unlink(missing_ok=True)
    return result
