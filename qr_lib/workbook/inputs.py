"""Stage 0: what the workbook runs on - the model, the four kinds of data, and a sanity check that
the model is really trained (held-out perplexity)."""
from __future__ import annotations

import time

import pandas as pd

from .. import data as D
from ..algorithm.train import perplexity
from ..config import Profile
from ..layout import Layout
from ..models import load_model, transformer_blocks
from ..store import cached, save_table
from .work import Work


def dataset_table(profile: Profile, sources: D.Sources | None = None) -> tuple[list[dict], list[str]]:
    """Rows of (kind, source, split, count), and the held-out passages for the perplexity check."""
    dc = profile.data
    splits = D.load_finetune(dc, sources)
    calib, held = D.load_texts(dc, sources)
    rows = [
        {"kind": "calibration text (Phase I)", "source": dc.text, "split": "passages", "count": len(calib)},
        {"kind": "held-out text (perplexity)", "source": dc.text, "split": "passages", "count": len(held)},
        {"kind": "fine-tuning set", "source": dc.finetune, "split": "train", "count": len(splits.train)},
        {"kind": "search validation (the proxy's only data)", "source": dc.finetune, "split": "train, held out",
         "count": len(splits.val)},
        {"kind": "test (final comparison only)", "source": dc.finetune, "split": "train, held out",
         "count": len(splits.test)},
    ]
    if dc.finetune == "commonsense":
        pool = D.commonsense_pool(sources or D.Sources.installed())
        rows += [{"kind": "fine-tuning pool", "source": t, "split": "train", "count": len(v)} for t, v in pool.items()]
    rows += [{"kind": "benchmark", "source": t, "split": "test" if t in ("mmlu", "gsm8k") else "validation",
              "count": len(D.benchmark_docs(t, sources))} for t in D.BENCHMARKS]
    return rows, held


def work(profile: Profile) -> Work:
    """Loading the model and scoring the held-out passages."""
    return Work(examples=profile.data.n_heldout, model_loads=1, notebooks=1)


def run(profile: Profile, layout: Layout) -> dict:
    """Load the model (timed), count the data and measure held-out perplexity; setup.json."""
    def compute() -> dict:
        t0 = time.time()
        model, tok = load_model(profile.model, profile.dtype, profile.device)
        load_s = time.time() - t0
        rows, held = dataset_table(profile)
        n_params = sum(p.numel() for p in model.parameters())
        return {
            "model": {"name": profile.model, "class": type(model).__name__,
                      "blocks": len(transformer_blocks(model)), "hidden": model.config.hidden_size,
                      "parameters": n_params, "dtype": profile.dtype, "load_seconds": round(load_s, 2),
                      "heldout_perplexity": perplexity(model, tok, held, max_len=256, progress=True)},
            "datasets": rows,
        }
    return cached(layout.setup, {"profile": profile}, compute)


def save(layout: Layout, result: dict) -> dict:
    """The model's and the data's tables (setup_model, setup_datasets) from run()'s result."""
    model, datasets = pd.DataFrame([result["model"]]), pd.DataFrame(result["datasets"])
    save_table(model, layout, "setup_model")
    save_table(datasets, layout, "setup_datasets")
    return {"model": model, "datasets": datasets}
