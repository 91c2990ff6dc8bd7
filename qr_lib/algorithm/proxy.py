"""The proxy, the fitness of the search: a real short LoRA fine-tune, then a validation score.

The objective (lower is better) is the validation loss per answer token by default, or with
`proxy_metric` set to a benchmark task, that task's error rate (1 - accuracy, lm-eval on the first
`proxy_metric_limit` documents); the validation loss is recorded either way. The proxy reads the
train and validation splits only: the test split is the final comparison's.

Every score is an artifact named by the content hash of everything that changes it (allocation,
model, backend, data, proxy settings, seed, library versions), written through the stage protocol
(store.cached): a repeated candidate is never trained twice, a damaged record is recomputed, and a
search killed midway resumes from what is on disk. A level is a named proxy setting ("full", or the
search's cheap "low"; the optimization literature says fidelity, a word kept here for what a quantized
weight retains); records say which level made them, and rankings only compare records of one level.

Candidates are scored through a runner (runner.py): in-process, or on Dask workers that write the
same records into the shared folder, which the caller then reads back in its own order.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from ..config import EvalConfig, Profile, TrainConfig
from ..data import load_finetune
from ..evaluate import headline, run_tasks
from ..layout import Layout
from ..models import load_model
from ..progress import tqdm
from ..store import LEFT_OUT, cached, content_hash, read_artifact, same_versions
from .allocation import Allocation, AllocationRecord
from .build import build
from .memory import formula_bytes, model_shapes, profile_budget
from .runner import SERIAL, Runner
from .train import encode, eval_loss, train

# A diverged candidate scores this objective: worse than any real one, yet finite, so pymoo's
# sorting and crowding stay well defined.
FAILED_LOSS = 1e3


@dataclass(frozen=True)
class ProxyLevel:
    name: str                 # "full" or "low"
    train: TrainConfig        # the proxy fine-tune
    n_val: int                # validation examples scored (the first n of the validation split)


def proxy_context(profile: Profile) -> dict:
    """Everything besides the allocation, the level and the library versions (store.versions, checked
    by the stage protocol) that changes a proxy score: records of another context (model, dtype,
    quantizer, LoRA, data) are never compared."""
    return {"model": profile.model, "dtype": profile.dtype, "quant": profile.quant,
            "lora": profile.lora, "data": profile.data}


def stored_evaluations(layout: Layout, profile: Profile, level: str | None = None) -> list[Evaluation]:
    """Every whole proxy record under the layout of this profile's context, made under today's library
    versions (optionally of one level), in key order: what a reader that cannot score compares."""
    context_key = content_hash(proxy_context(profile))
    out = []
    for path in sorted(layout.evaluations.glob("*.json")):
        rec = read_artifact(path, then=LEFT_OUT)
        if rec is not None and rec["config"].get("context_key") == context_key and same_versions(rec) and \
                (level is None or rec["result"]["level"] == level):
            out.append(Evaluation.from_dict(rec["result"]))
    return out


def full_level(profile: Profile) -> ProxyLevel:
    return ProxyLevel("full", profile.proxy, profile.data.n_val)


@dataclass(frozen=True)
class Evaluation(AllocationRecord):
    """One scored candidate, as its artifact's result holds it."""
    key: str
    allocation: Allocation
    level: str
    metric: str
    objective: float
    val_loss: float | None
    accuracy: float | None
    failed: bool
    bytes: float
    avg_bits: float
    budget_ratio: float
    train_tokens: int
    final_train_loss: float | None
    seconds: float
    peak_memory: dict

    def summary(self, generation: int | None = None) -> dict:
        """The flat row the search's artifacts keep (nsga.json, bo.json): scores, memory and genes' values."""
        a = self.allocation
        return {"generation": generation, "key": self.key, "level": self.level,
                "objective": self.objective, "metric": self.metric,
                "val_loss": self.val_loss, "accuracy": self.accuracy,
                "failed": self.failed, "budget_ratio": self.budget_ratio,
                "avg_bits": self.avg_bits, "mean_rank": a.mean_rank(),
                "bits": list(a.bits), "ranks": list(a.ranks), "train_tokens": self.train_tokens,
                "seconds": self.seconds}


class ProxyEvaluator:
    """Scores allocations for one profile: lower validation loss and fewer bytes are better."""

    def __init__(self, profile: Profile, layout: Layout, base, tok, runner: Runner = SERIAL,
                 progress: bool = True):
        self.profile, self.layout, self.base, self.tok = profile, layout, base, tok
        self.runner, self.progress = runner, progress
        splits = load_finetune(profile.data)
        self.train_set, self.val_set = splits.train, splits.val
        self.shapes = model_shapes(base)
        self.budget = profile_budget(profile, self.shapes)
        self.context = proxy_context(profile)
        self.context_key = content_hash(self.context)
        self.metric, self.metric_limit = profile.proxy_metric, profile.proxy_metric_limit
        self.hits = self.misses = 0

    def memory(self, allocation: Allocation) -> dict:
        m = formula_bytes(self.shapes, allocation, self.profile.quant)
        return {"bytes": m["blocks"], "avg_bits": m["avg_bits"], "budget_ratio": m["blocks"] / self.budget}

    def key(self, allocation: Allocation, level: ProxyLevel) -> str:
        parts = {"context": self.context_key, "allocation": allocation.text(), "level": level}
        if self.metric != "loss":  # the default adds nothing, so loss-scored caches keep their keys
            parts["metric"] = [self.metric, self.metric_limit]
        return content_hash(parts)

    def evaluate(self, allocation: Allocation, level: ProxyLevel) -> Evaluation:
        """One scored candidate: read back from its artifact, or trained, scored and written."""
        key = self.key(allocation, level)
        config = {"context": self.context, "context_key": self.context_key, "level": level}
        computed = []

        def compute():
            computed.append(key)
            return self._score(key, allocation, level).to_dict()
        record = Evaluation.from_dict(cached(self.layout.evaluation(key), config, compute))
        self.hits, self.misses = self.hits + (not computed), self.misses + bool(computed)
        return record

    def _score(self, key: str, allocation: Allocation, level: ProxyLevel) -> Evaluation:
        t0 = time.time()
        model = build(self.base, allocation, self.profile.quant, self.profile.lora, progress=False,
                      seed=level.train.seed)
        log = train(model, self.tok, self.train_set, level.train, progress=self.progress,
                    desc=f"proxy ({level.name})")
        loss = accuracy = None
        if not log["diverged"]:
            loss = eval_loss(model, self.tok, self.val_set[:level.n_val], level.train.max_len)
            if self.metric != "loss":
                cfg = EvalConfig(tasks=(self.metric,), limit=self.metric_limit)
                accuracy = headline(run_tasks(model, self.tok, cfg, progress=False)[self.metric])[0]
        del model
        if log["diverged"]:
            objective = FAILED_LOSS
        else:
            objective = loss if self.metric == "loss" else 1.0 - accuracy
        return Evaluation(key=key, allocation=allocation, level=level.name, metric=self.metric,
                          objective=objective, val_loss=loss, accuracy=accuracy, failed=log["diverged"],
                          **self.memory(allocation), train_tokens=log["train_tokens"],
                          final_train_loss=(log["losses"] or [None])[-1], seconds=round(time.time() - t0, 2),
                          peak_memory=log["peak_memory"])

    def evaluate_many(self, allocations: list[Allocation], level: ProxyLevel, desc: str) -> list[Evaluation]:
        """Records in the order given. A parallel runner scores the unscored candidates on its workers
        first (each writes its own record); every record is then read back here, as a serial run would."""
        if self.runner.parallel:
            todo = {k: a for a in allocations
                    if read_artifact(self.layout.evaluation(k := self.key(a, level)), quiet=True) is None}
            self.runner.map(score_on_worker, [(self.profile, self.layout, a, level) for a in todo.values()])
        return [self.evaluate(a, level)
                for a in tqdm(allocations, desc=desc, disable=not self.progress, leave=False)]

    def records(self, level: str | None = None) -> list[Evaluation]:
        """Every stored record of this context (optionally of one level), in key order."""
        return stored_evaluations(self.layout, self.profile, level)


# One evaluator per (profile, results folder) in each worker process, kept for the worker's life, so
# the model loads once per worker.
_WORKER_EVALUATORS: dict = {}


def score_on_worker(profile: Profile, layout: Layout, allocation: Allocation, level: ProxyLevel) -> str:
    """On a runner's worker: score one candidate into the shared folder; returns its key."""
    key = content_hash([profile, str(layout.root), str(layout.shared)])
    if key not in _WORKER_EVALUATORS:
        base, tok = load_model(profile.model, profile.dtype, profile.device)
        _WORKER_EVALUATORS[key] = ProxyEvaluator(profile, layout, base, tok, progress=False)
    return _WORKER_EVALUATORS[key].evaluate(allocation, level).key


def epoch_tokens(examples, tok, max_len: int) -> int:
    """Tokens in one epoch over `examples` (prompt + answer + EOS, truncated like training)."""
    return sum(len(r["input_ids"]) for r in encode(tok, examples, max_len))
