"""What a stage will do, counted from the profile before it runs, in the units a machine's measured speed
prices (estimate.Speed). Each stage module that trains or scores says its own (`work(profile)`);
estimate.py sums them and prices them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..config import EvalConfig

# lm-eval requests per document: one log-likelihood per answer choice (multiple choice); GSM8K
# generates instead (counted in tokens, up to eval.max_gen_toks).
CHOICES = {"qr_arc_easy": 4, "qr_arc_challenge": 4, "qr_hellaswag": 4, "qr_openbookqa": 4, "qr_mmlu": 4,
           "qr_piqa": 2, "qr_winogrande": 2, "qr_boolq": 2}


@dataclass(frozen=True)
class Work:
    steps: int = 0                 # LoRA optimizer steps
    examples: int = 0              # prompt/answer pairs scored
    lm_eval_requests: int = 0      # lm-eval log-likelihood requests
    generated_tokens: int = 0      # tokens generated (GSM8K)
    models_built: int = 0          # quantized models with their adapters
    model_loads: int = 0
    lm_eval_calls: int = 0         # lm-eval's fixed cost: building its tasks, once per call
    notebooks: int = 0             # kernels started
    counts: dict = field(default_factory=dict)   # what else the stage counts (runs, candidates), to read

    def __add__(self, other: "Work") -> "Work":
        return Work(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)
                       if f.name != "counts"}, counts={**self.counts, **other.counts})

    def priced(self) -> dict:
        """The units a speed prices, by field name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "counts"}

    def describe(self) -> str:
        label = {"examples": "examples scored", "lm_eval_requests": "lm-eval requests", "lm_eval_calls": "lm-eval calls"}
        shown = {**self.counts, **{label.get(k, k.replace("_", " ")): v for k, v in self.priced().items() if v}}
        return ", ".join(f"{k} {v:,}" for k, v in shown.items())


def lm_eval_work(cfg: EvalConfig, runs: int) -> Work:
    """lm-eval's work in `runs` benchmarked runs under `cfg`: requests, generated tokens, calls."""
    docs = {t: cfg.task_limits.get(t, cfg.limit) or 0 for t in cfg.tasks}
    return Work(lm_eval_requests=runs * sum(n * CHOICES.get(t, 0) for t, n in docs.items()),
                generated_tokens=runs * sum(n * cfg.max_gen_toks for t, n in docs.items() if t not in CHOICES),
                lm_eval_calls=runs * len({cfg.task_limits.get(t, cfg.limit) for t in cfg.tasks}))
