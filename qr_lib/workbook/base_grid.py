"""Does the base's own grid favour 4-bit rungs? The embedded model against a plausible unquantized twin.

The embedded SmolLM2-135M ships only as a Q4_1 GGUF: every allocated linear holds 4-bit codes with a
step d and a minimum per 32 weights (about 5 bits a weight), dequantized and stored in bf16. Its
"16-bit" weights therefore already sit on a 4-bit grid, which may make re-quantizing them at 4 bits
nearly free and 3 bits comparatively costly: a threat to the 3.5-bit verdict, which trades 4-bit
blocks for 3-bit ones.

The control moves every allocated weight uniformly within its own Q4_1 bin (by d x U(-1/2, 1/2)):
a model whose Q4_1 quantization is the embedded one, but whose weights no longer sit on that grid, as
an unquantized original's would not. Both bases are stored as the embedded one is (bf16). Each rung
of the ladder, and NF4, then quantizes every block of each base, and we measure what it costs:
KL(base || quantized) per token on the calibration passages (Phase I's measure, for the whole model)
and held-out perplexity. If the grid favours 4 bits, 4-bit rungs cost much less on the embedded base
than on the control while 3-bit rungs cost about the same: the ratio of the two bases' 4-bit KL, set
beside their 3-bit ratio, says how much.
"""
from __future__ import annotations

import copy
import time

import gguf
import numpy as np
import pandas as pd
import torch
from torch import nn

from ..algorithm.allocation import uniform
from ..algorithm.build import quantize_model
from ..algorithm.sensitivity import calibration_batches, mean_kl, reference_distributions
from ..algorithm.train import perplexity
from ..config import Profile, QuantConfig
from ..data import load_texts
from ..errors import QRError
from ..layout import Layout
from ..models import EMBEDDED, block_linears, embedded_gguf, transformer_blocks
from ..store import cached, save_figure, save_table
from .methods import load_method
from .plots import base_grid_bars, caption, figure_caption

GGUF_LINEARS = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
                "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"}
Q4_1_WEIGHTS = 32      # weights per step and minimum
Q4_1_BYTES = 20        # fp16 step, fp16 minimum, 16 bytes of 4-bit codes
# Beside the ladder's rungs (the profile's quantizer), QLoRA's NF4: the method file the comparison trains.
NF4 = "nf4"


def _q4_1(data: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(dequantized weight, step per weight) of one Q4_1 tensor's raw bytes, float64, GGUF row order."""
    raw = np.asarray(data, dtype=np.uint8).reshape(rows, cols // Q4_1_WEIGHTS, Q4_1_BYTES)
    step = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64)
    low = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
    codes = np.concatenate([raw[..., 4:] & 0x0F, raw[..., 4:] >> 4], axis=-1)   # ggml: low nibbles first
    weight = (step[..., None] * codes + low[..., None]).reshape(rows, cols)
    return weight, np.repeat(step, Q4_1_WEIGHTS, axis=1)


def q4_1_steps(model: nn.Module) -> dict[tuple[int, str], torch.Tensor]:
    """(block, linear) -> the Q4_1 step of every weight of the embedded model's allocated linears, in the
    loaded model's layout. GGUF rows are matched to the model's by their bf16 values (the conversion
    reorders the rows of q_proj and k_proj), and every weight is checked to be its Q4_1 value."""
    tensors = {t.name: t for t in gguf.GGUFReader(embedded_gguf()).tensors}
    out = {}
    for i, block in enumerate(transformer_blocks(model)):
        linears = block_linears(block, i)
        for short_gguf, short in GGUF_LINEARS.items():
            t = tensors[f"blk.{i}.{short_gguf}.weight"]
            if t.tensor_type.name != "Q4_1":
                raise QRError(f"blk.{i}.{short_gguf} is {t.tensor_type.name}, not Q4_1; the base-grid study reads "
                              "the embedded model's Q4_1 GGUF")
            w = linears[short][1].weight.detach().to(torch.bfloat16)
            weight, step = _q4_1(t.data, *w.shape)
            gguf_rows = torch.from_numpy(weight).to(torch.bfloat16)
            index = {row.view(torch.int16).numpy().tobytes(): k for k, row in enumerate(gguf_rows)}
            order = [index.get(row.view(torch.int16).numpy().tobytes()) for row in w]
            if None in order:
                raise QRError(f"block {i} {short}: the model's weights are not the GGUF's Q4_1 values; the "
                              "base-grid study needs the embedded model as converted (models.embedded_dir)")
            out[(i, short)] = torch.from_numpy(step[order])
    return out


def spread_within_bins(model: nn.Module, steps: dict, seed: int = 0) -> nn.Module:
    """A copy of the model whose allocated weights each moved by step x U(-1/2, 1/2): the same Q4_1
    codes, off the grid; stored as the base is (bf16), computing in its dtype."""
    twin = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    for i, block in enumerate(transformer_blocks(twin)):
        for short, (_, module) in block_linears(block, i).items():
            w = module.weight.data
            noise = (torch.rand(w.shape, generator=gen, dtype=torch.float64) - 0.5) * steps[(i, short)]
            moved = (w.double() + noise).to(torch.bfloat16).to(w.dtype)
            module.weight.data.copy_(moved)
    return twin


def rungs(profile: Profile) -> list[tuple[str, QuantConfig, int]]:
    """(label, quantizer settings, bits): the ladder's rungs under the profile's quantizer, then NF4."""
    nf4 = load_method(NF4)
    return [(f"{profile.quant.backend} {b}-bit", profile.quant, b) for b in sorted(profile.bit_ladder, reverse=True)] + \
        [(nf4.name, nf4.quant_config(profile), nf4.spec.bits)]


def measure(profile: Profile, base: nn.Module, tok, progress: bool = True) -> dict:
    """Per base (embedded, control) and rung: KL(base || quantized) per token on the calibration
    passages, and held-out perplexity (the base's own too)."""
    if profile.model != EMBEDDED:
        raise QRError(f"the base-grid study is about the embedded model's Q4_1 origin; profile {profile.name!r} "
                      f"runs {profile.model!r}")
    calib, heldout = load_texts(profile.data)
    cfg = profile.sensitivity
    device = next(base.parameters()).device
    batches = calibration_batches(tok, calib, cfg.seq_len, cfg.batch_size, device)
    control = spread_within_bins(base, q4_1_steps(base), profile.data.seed)
    rows = []
    for name, model in (("embedded (Q4_1 grid)", base), ("control (spread within each Q4_1 bin)", control)):
        reference = reference_distributions(model, batches)
        rows.append({"base": name, "rung": "unquantized", "bits": 16, "kl": 0.0,
                     "perplexity": perplexity(model, tok, heldout, max_len=256)})
        for label, qcfg, bits in rungs(profile):
            t = time.time()
            q = quantize_model(copy.deepcopy(model), uniform(len(transformer_blocks(model)), bits, 8), qcfg,
                               progress=False)
            rows.append({"base": name, "rung": label, "bits": bits, "kl": mean_kl(q, batches, reference),
                         "perplexity": perplexity(q, tok, heldout, max_len=256), "seconds": round(time.time() - t, 1)})
            if progress:
                print(f"[base grid] {name}, {label}: KL {rows[-1]['kl']:.4f}", flush=True)
            del q
    return {"rows": rows, "calibration_passages": len(calib), "heldout_passages": len(heldout)}


def config(profile: Profile) -> dict:
    d = profile.data
    return {"model": profile.model, "dtype": profile.dtype, "rungs": [(label, q, b) for label, q, b in rungs(profile)],
            "text": {"source": d.text, "n_calib": d.n_calib, "n_heldout": d.n_heldout, "seed": d.seed},
            "sensitivity": profile.sensitivity}


def run(profile: Profile, layout: Layout, base, tok, progress: bool = True) -> dict:
    return cached(layout.base_grid, config(profile), lambda: measure(profile, base, tok, progress))


def table(result: dict) -> pd.DataFrame:
    """The measurements, with each rung's KL and perplexity on the embedded base relative to the
    control's (a ratio below 1: the embedded base's grid makes that rung cheaper)."""
    df = pd.DataFrame(result["rows"])
    control = df[df["base"].str.startswith("control")].set_index("rung")["kl"]
    df["kl_over_control"] = [k / control[r] if control[r] > 0 else float("nan") for k, r in zip(df["kl"], df["rung"])]
    df["perplexity_over_base"] = df["perplexity"] / df["base"].map(
        df[df["bits"] == 16].set_index("base")["perplexity"])
    return df


def save(profile: Profile, layout: Layout, result: dict) -> pd.DataFrame:
    df = table(result)
    save_table(df.round(4), layout, "base_grid")
    save_figure(caption(base_grid_bars(df), f"{figure_caption(profile)} · KL on {result['calibration_passages']} "
                        f"calibration passages, perplexity on {result['heldout_passages']} held-out passages"),
                layout, "base_grid")
    return df
