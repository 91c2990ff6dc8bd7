"""Benchmarks through lm-evaluation-harness, offline, on in-memory models.

The tasks are the YAML files in qr_lib/tasks/ over the documents of qr_lib.data; a TaskManager
sees only them (no hub access). The workbook's own tasks are named qr_<source> (prompts in their
YAMLs, one shared template through lm-eval's `include:`), so their numbers are not mistaken for
lm-eval's stock tasks; stock_<task> are lm-eval's stock prompts (stock.py).
Multiple-choice tasks report acc and acc_norm (length-normalized);
tables use acc_norm for ARC, HellaSwag, OpenBookQA, PIQA and MMLU (answers of unequal length), acc
for WinoGrande and BoolQ, and exact match after the "The answer is N" extraction (strict-match)
for GSM8K.
`limit` scores the first n documents of a fixed shuffle (utils.py), i.e. a random sample.
"""
from __future__ import annotations

import json
import logging
import math
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from tqdm import tqdm

from .config import EvalConfig
from .data import BENCHMARKS, TASK_DIR
from .errors import QRError
from .layout import portable
from .store import atomic_write_bytes, to_jsonable

# Chance level of each benchmark's headline metric (multiple choice: 1 / choices; BoolQ: yes/no), by source.
CHANCE = {"arc_easy": 0.25, "arc_challenge": 0.25, "hellaswag": 0.25, "openbookqa": 0.25, "mmlu": 0.25,
          "piqa": 0.5, "winogrande": 0.5, "boolq": 0.5, "gsm8k": 0.0}
HEADLINE = {"qr_winogrande": "acc", "qr_boolq": "acc", "qr_gsm8k": "exact_match,strict-match"}  # else acc_norm


def check_tasks(tasks) -> None:
    known = sorted(p.stem for p in TASK_DIR.glob("*.yaml"))  # a task is a YAML file there
    unknown = sorted(set(tasks) - set(known))
    if unknown:
        old = [t for t in unknown if t in BENCHMARKS]
        hint = (f"; the workbook's tasks are named qr_<task> (its prompts) and stock_<task> (lm-eval's), "
                f"e.g. {['qr_' + t for t in old]}" if old else "")
        raise QRError(f"unknown benchmark(s) {unknown}{hint}; the tasks are {list(known)}")


def task_manager():
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=str(TASK_DIR), include_defaults=False)


def _metrics(task_result: dict) -> dict:
    """lm-eval's 'acc,none' / 'acc_stderr,none' keys -> {'acc': x, 'acc_stderr': s, ...}."""
    out = {}
    for key, value in task_result.items():
        if "," not in key or not isinstance(value, (int, float)):
            continue
        metric, filt = key.split(",", 1)
        name = metric if filt == "none" else f"{metric},{filt}"
        out[name] = None if isinstance(value, float) and math.isnan(value) else value
    return out


def _per_document(samples: list[dict], metric_used: str) -> dict:
    """The headline metric of every scored document, by lm-eval's doc_id (the unit of paired
    comparisons between methods, which all see the same documents)."""
    metric, _, filt = metric_used.partition(",")
    rows = sorted((s["doc_id"], float(s[metric])) for s in samples if s["filter"] == (filt or "none"))
    return {"doc_id": [d for d, _ in rows], "value": [v for _, v in rows]}


@contextmanager
def _quiet_lm_eval():
    """lm-eval draws a progress bar per task while building requests (with no switch to turn it off)
    and logs a warning for every custom, i.e. offline, dataset: dozens of lines per run in a notebook
    cell. Our own progress line per stage says what is running."""
    import lm_eval.api.task as task_module

    logger, saved = logging.getLogger("lm_eval"), task_module.tqdm
    level = logger.level
    task_module.tqdm = partial(tqdm, disable=True)
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        task_module.tqdm = saved
        logger.setLevel(level)


def _quiet_hflm():
    """HFLM whose request loops run without their progress bars (lm-eval's own `disable_tqdm`)."""
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)
    return QuietHFLM


def run_tasks(model, tok, cfg: EvalConfig, progress: bool = True, log_dir: Path | None = None,
              samples: dict[str, list[int]] | None = None) -> dict:
    """{task: {metric: value, metric_stderr: value, 'n': documents, 'metric_used': name,
    'per_document': {'doc_id': [...], 'value': [...]}}}. With `log_dir`, lm-eval's own results JSON
    and its per-document samples (prompts, answers, log-likelihoods) are kept there as lm-eval wrote
    them: results_<tasks>.json and samples_<task>.jsonl. `samples` (task -> document indices, lm-eval's
    own option) scores those documents instead of the first `limit`."""
    import lm_eval

    if not cfg.tasks:
        return {}
    check_tasks(cfg.tasks)
    if samples and (cfg.limit is not None or cfg.task_limits):
        raise QRError("give either document indices (samples) or a limit, not both")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with _quiet_lm_eval():   # it warns that a model object, not a name, was passed: that is the design here
        lm = _quiet_hflm()(pretrained=base, tokenizer=tok, batch_size=cfg.batch_size, max_length=2048,
                           device=str(next(base.parameters()).device))
    groups: dict = {}  # one lm-eval call per distinct limit
    for task in cfg.tasks:
        groups.setdefault(cfg.task_limits.get(task, cfg.limit), []).append(task)
    manager, out = task_manager(), {}
    for limit, tasks in groups.items():
        if progress:
            print(f"lm-eval: {', '.join(tasks)} (limit {limit})", flush=True)
        with _quiet_lm_eval():
            res = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                          samples={t: samples[t] for t in tasks if t in (samples or {})} or None,
                                          gen_kwargs={"max_gen_toks": cfg.max_gen_toks}, log_samples=True,
                                          verbosity="ERROR", bootstrap_iters=1000)
        if log_dir is not None:
            _keep(res, Path(log_dir), tasks)
        for task in tasks:
            metrics = _metrics(res["results"][task])
            metrics["n"] = int(res["n-samples"][task]["effective"])
            metrics["metric_used"] = HEADLINE.get(task, "acc_norm")
            metrics["per_document"] = _per_document(res["samples"][task], metrics["metric_used"])
            out[task] = metrics
    return {task: out[task] for task in cfg.tasks}


def _keep(res: dict, log_dir: Path, tasks: list[str]) -> None:
    log_dir.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in res.items() if k != "samples"}
    # lm-eval records the model's and the tasks' folders: written as any machine reads them
    atomic_write_bytes(log_dir / f"results_{'+'.join(tasks)}.json",
                       portable(json.dumps(to_jsonable(summary), indent=1, default=str)).encode())
    for task in tasks:
        lines = (json.dumps(to_jsonable(s), default=str) for s in res["samples"][task])
        atomic_write_bytes(samples_file(log_dir, task), ("\n".join(lines) + "\n").encode())


def samples_file(log_dir: Path, task: str) -> Path:
    """Where run_tasks keeps lm-eval's per-document samples of a task (prompts, answers, log-likelihoods)."""
    return log_dir / f"samples_{task}.jsonl"


def headline(task_metrics: dict) -> tuple[float, float | None]:
    """(value, standard error) of the metric the tables use for one task."""
    name = task_metrics["metric_used"]
    metric, _, filt = name.partition(",")
    stderr_key = f"{metric}_stderr" + (f",{filt}" if filt else "")
    return task_metrics[name], task_metrics.get(stderr_key)
