"""The final fine-tune of a method (the searched allocation or a baseline), saved and evaluated.

`run(profile, layout, method, seed, base, tok)` trains one (method, seed), saves the adapter (peft
`save_pretrained`) beside a JSON of the allocation and quantization, evaluates it (loss on the held-out
test split, example by example, held-out perplexity, lm-eval) and writes its result.json through the
stage protocol: a finished run whose configuration and allocation are unchanged is read back, so an
interrupted `make reproduce` resumes run by run. The test split is read here and nowhere in the search.

The recipe follows the paper's code where the CPU allows: lr 2e-4, at least one full epoch of the
fine-tuning set, linear warm-up then linear decay to zero (Hugging Face Trainer's default schedule,
on which such LoRA recipes run; a constant rate would leave every method at the noise level of its
last steps), alpha = 2 x rank, dropout 0.05.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from ..algorithm.adapters import merge_for_scoring, prepare
from ..algorithm.allocation import Allocation, AllocationRecord
from ..algorithm.build import build
from ..algorithm.memory import ModelShapes, formula_bytes, model_shapes
from ..algorithm.runner import SERIAL, Runner, each
from ..algorithm.train import example_losses, mean_loss, perplexity, train
from ..config import LoraSettings, Profile, QuantConfig
from ..data import load_finetune, load_texts
from ..errors import QRError
from ..evaluate import run_tasks
from ..layout import Layout, RunDir
from ..models import load_model, worker_model
from ..store import (LEFT_OUT, cached, content_hash, file_sha256, follow_umask, keyed, read_artifact, read_json,
                     stored_result, write_artifact, write_json)
from .methods import Context, Method, load_method, method_ids
from .work import Work, lm_eval_work


@dataclass(frozen=True)
class RunResult(AllocationRecord):
    """One finished run, as its result.json holds it."""
    method: str
    name: str
    seed: int
    allocation: Allocation
    memory_bytes: float
    avg_bits: float
    trainable_parameters: int
    train: dict                    # losses, train_tokens, steps, epochs, seconds, peak_memory, diverged
    adapter_notes: dict
    test_loss: float
    test_examples: dict            # nll_sum and tokens per test example, in test-split order
    heldout_perplexity: float
    benchmarks: dict               # task -> lm-eval metrics, with per_document values
    seconds: float
    # Everything that decides the trained model and its scores except the method's name: two methods
    # whose allocations coincide (a search that selects a uniform allocation) share it, and train once.
    training_key: str | None = None
    same_run_as: str | None = None  # the method whose run this one's result is (its adapter lives there)
    # The same scores on the dev split (data.n_dev > 0): what the proxy check compares with, so
    # that choosing the proxy never reads the test split.
    dev_loss: float | None = None
    dev_examples: dict | None = None


def results(layout: Layout, method_id: str = "*") -> list[RunResult]:
    """Every finished run under the layout (of one method, or all), checksum-checked: a damaged or
    edited result is named in a warning and left out (the next run of the stage recomputes it)."""
    out = []
    for run_dir in layout.runs(method_id):
        record = read_artifact(run_dir.result, then=LEFT_OUT)
        if record is not None:
            out.append(RunResult.from_dict(record["result"]))
    return out


@dataclass(frozen=True)
class RunData:
    """What a final run reads: the fine-tuning set, the test and dev splits and the held-out passages."""
    train: list
    test: list
    heldout: list
    dev: list


def run_data(profile: Profile) -> RunData:
    splits = load_finetune(profile.data)
    return RunData(splits.train, splits.test, load_texts(profile.data)[1], splits.dev)


def _per_example(scores: list) -> dict:
    return {"nll_sum": [x for x, _ in scores], "tokens": [n for _, n in scores]}


def run(profile: Profile, layout: Layout, method: Method, seed: int, base, tok, progress: bool = True,
        data: RunData | None = None, runs: Layout | None = None) -> RunResult:
    """Fine-tune, save and evaluate one (method, seed), or read it back. `data` = run_data(profile),
    when the caller runs many (it is the same for all). Test losses are kept example by example (summed
    NLL and answer tokens, in test-split order), so methods can be compared pair by pair. The method's
    allocation is resolved from `layout` (its search, Phase I); the run is written under `runs`
    (default: `layout`)."""
    qcfg = method.quant_config(profile)
    # Which seeds and methods a profile plans does not change this run, so its key holds the recipe alone;
    # what it scores does (lm-eval, the dev split), as flags of this run.
    benchmarked = method.benchmarks and profile.eval.benchmarks(seed, method.id)
    scores_dev = profile.finetune.scores_dev(seed)
    config = keyed({"model": profile.model, "dtype": profile.dtype, "data": profile.data, "method": method,
                    "quant": qcfg, "lora": profile.lora,
                    "finetune": profile.finetune.recipe(),
                    "eval": dataclasses.replace(profile.eval, seeds=None, methods=None) if benchmarked else None,
                    "dev": scores_dev, "seed": seed})
    shapes = model_shapes(base)
    allocation = method.resolve(Context(profile, shapes, layout))
    runs = runs or layout
    where = runs.run(method.id, seed)
    training = content_hash({**{k: v for k, v in config.items() if k not in ("method", "key")},
                             "allocation": allocation.pairs(), "adapter": method.adapter})

    def compute() -> dict:
        twin = next((r for r in results(runs) if r.training_key == training and r.seed == seed
                     and r.method != method.id and r.same_run_as is None), None)
        if twin is not None:                       # trained once, reported under both names
            return dataclasses.replace(twin, method=method.id, name=method.name, same_run_as=twin.method).to_dict()
        stage = {"key": config["key"], "allocation": allocation.pairs()}
        scored = stored_result(where.trained, stage, then="training the run again") \
            if method.adapter != "adalora" else None
        if scored is not None and where.allocation.exists() and damaged_adapter(where) is None:
            # stopped during lm-eval: the trained adapter and its scores are kept, only lm-eval runs again
            model = _rebuild(where, base, allocation, qcfg, profile, method, seed, scored["train"]["steps"])
        else:
            model, scored = _train_and_score(profile, method, seed, base, tok, allocation, qcfg, shapes, where,
                                             data or run_data(profile), progress)
            scored = {**scored, "training_key": training}
            if benchmarked:
                write_artifact(where.trained, stage, scored)
        if not benchmarked:
            return scored
        t0 = time.time()
        benchmarks = run_tasks(model, tok, profile.eval, progress=progress, log_dir=where.lm_eval)
        return {**scored, "benchmarks": benchmarks, "seconds": round(scored["seconds"] + time.time() - t0, 1)}

    # A new search selection is a new run, though the method's configuration is the same; a run whose
    # adapter no longer matches its recorded checksum (truncated, edited) is retrained.
    def still_valid(result: dict) -> bool:
        if Allocation.from_dict(result["allocation"]).pairs() != allocation.pairs():
            return False
        damaged = damaged_adapter(where)
        if damaged:
            warnings.warn(f"{damaged} does not match the checksum its run recorded (truncated or edited); "
                          "retraining the run", stacklevel=2)
        return not damaged
    result = RunResult.from_dict(cached(where.result, config, compute, valid=still_valid))
    where.trained.unlink(missing_ok=True)           # the result holds all of it now
    return result


def _train_and_score(profile: Profile, method: Method, seed: int, base, tok, allocation: Allocation,
                     qcfg: QuantConfig, shapes: ModelShapes, where: RunDir, d: RunData, progress: bool):
    """Train one run, save its adapter, and score it on the test split, the dev split (where this seed
    does) and the held-out passages: (model, the RunResult's fields but lm-eval's)."""
    tcfg = profile.finetune.train_config(len(d.train), seed)
    t0 = time.time()
    model, hook, notes = prepare(base, allocation, qcfg, profile.lora, method.adapter, seed, tcfg.steps)
    log = train(model, tok, d.train, tcfg, progress=progress, desc=f"{method.id} seed {seed}", on_step=hook)
    train_seconds = time.time() - t0
    merge_for_scoring(model)            # training is over: test, dev, held-out and lm-eval score it merged
    per_example = example_losses(model, tok, d.test[:profile.finetune.n_test], tcfg.max_len)
    dev = example_losses(model, tok, d.dev, tcfg.max_len) if d.dev and profile.finetune.scores_dev(seed) else None
    save_adapter(model, where, allocation, qcfg, profile, method)
    memory = formula_bytes(shapes, allocation, qcfg)
    return model, RunResult(
        method=method.id, name=method.name, seed=seed, allocation=allocation,
        memory_bytes=memory["blocks"], avg_bits=memory["avg_bits"],
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        train={**log, "steps": tcfg.steps, "epochs": tcfg.steps * tcfg.batch_size * tcfg.grad_accum / len(d.train),
               "seconds": round(train_seconds, 1)},
        adapter_notes=notes, test_loss=mean_loss(per_example), test_examples=_per_example(per_example),
        heldout_perplexity=perplexity(model, tok, d.heldout, max_len=256), benchmarks={},
        seconds=round(time.time() - t0, 1),
        dev_loss=mean_loss(dev) if dev else None, dev_examples=_per_example(dev) if dev else None).to_dict()


def _rebuild(where: RunDir, base, allocation: Allocation, qcfg: QuantConfig, profile: Profile, method: Method,
             seed: int, steps: int):
    """The trained model of a run whose adapter is saved: built as training built it (same seed, so a
    LoftQ initialisation of the quantized weights is the same), the trained adapter weights loaded."""
    model, _, _ = prepare(base, allocation, qcfg, profile.lora, method.adapter, seed, steps)
    model = _with_adapter(model, where)
    merge_for_scoring(model)            # as the run scored it
    return model


def _with_adapter(model, where: RunDir):
    """`model` (built as the run built it) with the run's trained adapter weights, for inference."""
    set_peft_model_state_dict(model, load_file(str(where.adapter / "adapter_model.safetensors")))
    model.eval()
    return model


def save_adapter(model, where: RunDir, allocation: Allocation, qcfg: QuantConfig, profile: Profile,
                 method: Method) -> None:
    """peft's adapter files plus what rebuilds the quantized model they sit on. The adapter names its
    base as the profile does (peft would write the folder the base was loaded from, this machine's);
    no embedding layer is trained, so peft is told so rather than left to look the name up on the Hub."""
    for config in model.peft_config.values():
        config.base_model_name_or_path = profile.model
    model.save_pretrained(str(where.adapter), save_embedding_layers=False)
    follow_umask(where.adapter)
    write_json(where.allocation, {"allocation": allocation, "quant": qcfg, "lora": profile.lora,
                                  "model": profile.model, "dtype": profile.dtype, "adapter": method.adapter,
                                  "adapter_sha256": {p.name: file_sha256(p)
                                                     for p in sorted(where.adapter.glob("*.safetensors"))}})


def damaged_adapter(where: RunDir) -> Path | None:
    """The adapter file of a run that no longer matches the checksum its run recorded, if any. Only
    files that are there are checked: the committed results carry no adapters (they are not tracked),
    and runs saved before checksums were recorded have none to check."""
    if not where.allocation.exists():
        return None
    recorded = read_json(where.allocation).get("adapter_sha256", {})
    for name, digest in recorded.items():
        path = where.adapter / name
        if path.exists() and file_sha256(path) != digest:
            return path
    return None


def check_adapter(where: RunDir) -> None:
    """Refuse to use a run's adapter that no longer matches its recorded checksum."""
    damaged = damaged_adapter(where)
    if damaged is not None:
        raise QRError(f"{damaged} does not match the checksum its run recorded (truncated or edited); rerun the "
                      "run's `qr-adaptor finetune --method ...` to retrain it (the damaged run is redone)")


def load_finetuned(where: RunDir, base=None, tok=None):
    """Rebuild a saved run for inference: same quantized blocks, the trained adapter weights."""
    if not where.allocation.exists() and (record := read_artifact(where.result)) is not None \
            and record["result"].get("same_run_as"):
        twin = where.path.parent.parent / record["result"]["same_run_as"] / where.path.name
        raise QRError(f"{where.path} is the same run as {twin} (one training, two names); load that folder")
    meta = read_json(where.allocation)
    check_adapter(where)
    if meta["adapter"] == "adalora":
        raise QRError("reloading AdaLoRA runs is not supported; load them with peft.PeftModel.from_pretrained")
    if base is None:
        base, tok = load_model(meta["model"], meta["dtype"])
    model = build(base, Allocation.from_dict(meta["allocation"]), QuantConfig(**meta["quant"]),
                  LoraSettings(**meta["lora"]), progress=False)
    return _with_adapter(model, where), tok


def plan(profile: Profile, methods: list[str] | None = None) -> list[tuple[Method, int]]:
    """(method, seed) pairs: every seed of the profile for multi-seed methods, the first otherwise.
    Seed-major, so a run stopped half-way already has one result for (nearly) every method."""
    chosen = [load_method(m) for m in (methods or profile.finetune.methods or method_ids())]
    return [(m, s) for k, s in enumerate(profile.finetune.seeds) for m in chosen if k == 0 or m.multi_seed]


def work(profile: Profile) -> Work:
    """The final runs' work: every planned run trains, scores its test pairs, held-out text and (on the
    dev seeds) the dev split; the benchmarked ones run lm-eval. Runs two methods share count twice."""
    f, d = profile.finetune, profile.data
    runs = plan(profile)
    benchmarked = sum(1 for m, seed in runs if m.benchmarks and profile.eval.benchmarks(seed, m.id))
    return Work(steps=len(runs) * f.steps(d.n_train), models_built=len(runs), model_loads=1, notebooks=1,
                examples=sum((f.n_test or d.n_test) + d.n_heldout + (d.n_dev if f.scores_dev(seed) else 0)
                             for _, seed in runs),
                counts={"runs (at most)": len(runs)}) + lm_eval_work(profile.eval, benchmarked)


@dataclass(frozen=True)
class Planned:
    """One run a stage asks for: the profile it runs under (a stage's own length or scoring), the
    method, the seed, and the layout it is written under (None: the main one)."""
    profile: Profile
    method: Method
    seed: int
    runs: Layout | None = None


def run_on_worker(profile: Profile, layout: Layout, method: Method, seed: int, runs: Layout | None) -> None:
    """On a runner's worker: one run, written into its run folder (the caller reads it back)."""
    base, tok = worker_model(profile.model, profile.dtype, profile.device)
    run(profile, layout, method, seed, base, tok, progress=False, runs=runs)


def run_planned(layout: Layout, planned: list[Planned], base, tok, runner: Runner = SERIAL, progress: bool = True,
                label: str = "run") -> list[RunResult]:
    """Every planned run through the runner (runner.each): finished ones are read back, not redone."""
    data: dict = {}

    def here(profile, layout_, method, seed, runs):
        key = content_hash(profile.data)
        if key not in data:             # the same for every run of one data setting
            data[key] = run_data(profile)
        return run(profile, layout_, method, seed, base, tok, progress, data[key], runs=runs)
    return each(runner, label, [(p.profile, layout, p.method, p.seed, p.runs) for p in planned], run_on_worker, here,
                [f"{p.method.name}, seed {p.seed}" for p in planned], progress)


def trained_for(profile: Profile, factor: float) -> Profile:
    """The final recipe over `factor` x the fine-tuning pairs, one epoch of fresh pairs (so `factor` x the
    steps), scored on the test split alone: no lm-eval, no dev split. The stages that train at another
    length (the pilot, the length study) say so by this factor."""
    n_train = round(factor * profile.data.n_train)
    cap = profile.finetune.max_steps
    return dataclasses.replace(
        profile, data=dataclasses.replace(profile.data, n_train=n_train),
        finetune=dataclasses.replace(profile.finetune, dev_seeds=(),
                                     max_steps=None if cap is None else max(1, round(factor * cap))),
        eval=dataclasses.replace(profile.eval, tasks=()))


def run_all(profile: Profile, layout: Layout, base, tok, methods: list[str] | None = None,
            runner: Runner = SERIAL, progress: bool = True) -> list[RunResult]:
    """Every planned run, in order; finished ones are read back, not redone."""
    todo = plan(profile, methods)
    # Every method's allocation first: one that needs an artifact not there yet (the search, Phase I)
    # fails now, not after the methods before it have trained.
    context = Context(profile, model_shapes(base), layout)
    for method in {m.id: m for m, _ in todo}.values():
        method.resolve(context)
    return run_planned(layout, [Planned(profile, m, s) for m, s in todo], base, tok, runner, progress)
