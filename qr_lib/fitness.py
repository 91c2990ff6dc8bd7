"""Proxy evaluation, the fitness of the search: a real short LoRA fine-tune, then a validation score.

The objective (lower is better) is the validation loss per answer token by default, or with
`proxy_metric` set to a benchmark task, that task's error rate (1 - accuracy, lm-eval on the first
`proxy_metric_limit` documents); the validation loss is recorded either way.

Every score is a JSON file named by the content hash of everything that changes it (allocation,
model, backend, data, proxy settings, seed, library versions), written atomically: a repeated
candidate is never trained twice, and a search killed midway resumes from what is on disk.
A fidelity is a named proxy setting; records say which fidelity made them, and rankings only ever
compare records of one fidelity.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .allocation import Allocation
from .build import build
from .memory import budget_bytes, formula_bytes, model_shapes
from .progress import tqdm
from .store import content_hash, package_versions, read_artifact, write_artifact
from .train import TrainConfig, eval_loss, train

# A diverged candidate scores this objective: worse than any real one, yet finite, so pymoo's
# sorting and crowding stay well defined.
FAILED_LOSS = 1e3
SCORE_PACKAGES = ("torch", "transformers", "peft", "hqq", "bitsandbytes")


@dataclass(frozen=True)
class Fidelity:
    name: str                 # "full" or "low"
    train: TrainConfig        # the proxy fine-tune
    n_val: int                # validation examples scored (the first n of the validation split)


def full_fidelity(profile) -> Fidelity:
    return Fidelity("full", profile.proxy, profile.data.n_val)


class ProxyEvaluator:
    """Scores allocations for one profile: lower validation loss and fewer bytes are better."""

    def __init__(self, profile, cache_dir: Path, base=None, tok=None, progress: bool = True):
        from .data import load_finetune
        from .models import load_model

        if base is None:
            base, tok = load_model(profile.model, profile.dtype, profile.device)
        self.profile, self.base, self.tok, self.progress = profile, base, tok, progress
        self.cache_dir = Path(cache_dir)
        d = profile.data
        splits = load_finetune(d)  # the proxy reads train and val only; test is the final comparison's
        self.train_set, self.val_set = splits.train, splits.val
        self.shapes = model_shapes(base)
        self.budget = budget_bytes(self.shapes, profile.quant, profile.budget_bits, profile.budget_rank)
        self.context = {"model": profile.model, "dtype": profile.dtype, "quant": profile.quant,
                        "lora": profile.lora, "data": d, "versions": package_versions(SCORE_PACKAGES)}
        self.context_key = content_hash(self.context)
        self.metric, self.metric_limit = profile.proxy_metric, profile.proxy_metric_limit
        self.hits = self.misses = 0
        self.client = None  # a Dask client while search.run holds one (parallel.executor)

    def memory(self, allocation: Allocation) -> dict:
        m = formula_bytes(self.shapes, allocation, self.profile.quant)
        return {"bytes": m["blocks"], "avg_bits": m["avg_bits"], "budget_ratio": m["blocks"] / self.budget}

    def key(self, allocation: Allocation, fidelity: Fidelity) -> str:
        parts = {"context": self.context_key, "allocation": allocation.key(), "fidelity": fidelity}
        if self.metric != "loss":  # the default adds nothing, so loss-scored caches keep their keys
            parts["metric"] = [self.metric, self.metric_limit]
        return content_hash(parts)

    def path(self, allocation: Allocation, fidelity: Fidelity) -> Path:
        return self.cache_dir / f"{self.key(allocation, fidelity)}.json"

    def evaluate(self, allocation: Allocation, fidelity: Fidelity) -> dict:
        """The record of one scored candidate, from the cache when it is there."""
        path = self.path(allocation, fidelity)
        stored = read_artifact(path)  # None when missing, damaged or edited: then it is recomputed
        if stored is not None:
            self.hits += 1
            return stored["result"]
        self.misses += 1
        t0 = time.time()
        model = build(self.base, allocation, self.profile.quant, self.profile.lora, progress=False,
                      seed=fidelity.train.seed)
        log = train(model, self.tok, self.train_set, fidelity.train, progress=self.progress,
                    desc=f"proxy ({fidelity.name})")
        loss = accuracy = None
        if not log["diverged"]:
            loss = eval_loss(model, self.tok, self.val_set[:fidelity.n_val], fidelity.train.max_len)
            if self.metric != "loss":
                from .evaluate import EvalConfig, headline, run_tasks
                cfg = EvalConfig(tasks=(self.metric,), limit=self.metric_limit)
                accuracy = headline(run_tasks(model, self.tok, cfg, progress=False)[self.metric])[0]
        del model
        if log["diverged"]:
            objective = FAILED_LOSS
        else:
            objective = loss if self.metric == "loss" else 1.0 - accuracy
        result = {"key": path.stem, "allocation": allocation.to_dict(), "fidelity": fidelity.name,
                  "metric": self.metric, "objective": objective, "val_loss": loss, "accuracy": accuracy,
                  "failed": log["diverged"], **self.memory(allocation),
                  "train_tokens": log["train_tokens"], "final_train_loss": (log["losses"] or [None])[-1],
                  "seconds": round(time.time() - t0, 2), "peak_memory": log["peak_memory"]}
        write_artifact(path, {"context": self.context, "context_key": self.context_key,
                              "fidelity": fidelity}, result)
        return result

    def evaluate_many(self, allocations: list[Allocation], fidelity: Fidelity, desc: str) -> list[dict]:
        """Records in the order given. With a Dask client (self.client, parallel.py) the uncached
        candidates are scored on the workers first; every record is then read back from the cache."""
        if self.client is not None:
            todo = list({self.key(a, fidelity): a for a in allocations if not self.path(a, fidelity).exists()}.values())
            if todo:
                from .parallel import evaluate_all
                evaluate_all(self.client, self.profile, self.cache_dir, todo, fidelity, self.profile.parallel.retries)
        return [self.evaluate(a, fidelity)
                for a in tqdm(allocations, desc=desc, disable=not self.progress, leave=False)]

    def records(self, fidelity: str | None = None) -> list[dict]:
        """Every cached record of this context (optionally one fidelity), in key order."""
        out = []
        for path in sorted(self.cache_dir.glob("*.json")):
            rec = read_artifact(path)
            if rec is not None and rec["config"].get("context_key") == self.context_key and \
                    (fidelity is None or rec["result"]["fidelity"] == fidelity):
                out.append(rec["result"])
        return out


def summarize(rec: dict, generation: int | None = None) -> dict:
    """The fields of a record the search artifacts keep (the allocation flattened)."""
    a = rec["allocation"]
    return {"generation": generation, "key": rec["key"], "fidelity": rec["fidelity"],
            "objective": rec["objective"], "metric": rec["metric"],
            "val_loss": rec["val_loss"], "accuracy": rec["accuracy"],
            "failed": rec["failed"], "budget_ratio": rec["budget_ratio"],
            "avg_bits": rec["avg_bits"], "mean_rank": sum(a["ranks"]) / len(a["ranks"]),
            "bits": a["bits"], "ranks": a["ranks"], "train_tokens": rec["train_tokens"],
            "seconds": rec["seconds"]}


def epoch_tokens(examples, tok, max_len: int) -> int:
    """Tokens in one epoch over `examples` (prompt + answer + EOS, truncated like training)."""
    from .train import encode
    return sum(len(r["input_ids"]) for r in encode(tok, examples, max_len))
