"""The final fine-tune of a method (the searched allocation or a baseline), saved and evaluated.

A method is a small JSON file in qr_lib/methods/: its allocation (uniform bits/rank, the search's
selection, or a variant search with fixed ladders), quantization overrides and adapter kind.
`run(profile, method, seed)` trains it, saves the adapter (peft `save_pretrained`) beside a JSON of
the allocation and quantization, evaluates it (loss on the held-out test split, example by example,
held-out perplexity, lm-eval), and writes results/<profile>/runs/<method>/seed<k>/result.json -
skipped when it already exists for the same configuration, so an interrupted `make reproduce`
resumes run by run. The test split is read here and nowhere in the search.

The recipe follows the paper's code where the CPU allows: lr 2e-4, at least one full epoch of the
fine-tuning set, linear warm-up then linear decay to zero (Hugging Face Trainer's default schedule,
on which such LoRA recipes run; a constant rate would leave every method at the noise level of its
last steps), alpha = 2 x rank, dropout 0.05.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .adapters import prepare
from .allocation import Allocation, split, uniform
from .errors import QRError
from .memory import budget_bytes, formula_bytes, model_shapes
from .quant import QuantConfig
from .store import content_hash, read_artifact, read_json, write_artifact, write_json
from .train import TrainConfig, example_losses, mean_loss, perplexity, train

METHOD_DIR = Path(__file__).parent / "methods"


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: float = 1.0
    max_steps: int | None = None   # a cap; None = the whole `epochs` (the paper's recipe)
    batch_size: int = 4
    grad_accum: int = 1            # the authors' code: 4
    lr: float = 2e-4
    warmup_ratio: float = 0.03
    schedule: str = "linear"       # after warm-up; see train.TrainConfig
    max_len: int = 128             # the authors' code: 512
    n_test: int | None = None      # test pairs scored per run (the first n); None = the whole split
    seeds: tuple = (0, 1, 2)       # for methods with "multi_seed"; the others run seeds[0]
    methods: tuple | None = None   # method ids a full run covers; None = every file in methods/

    def train_config(self, n_train: int, seed: int) -> TrainConfig:
        steps = math.ceil(self.epochs * n_train / (self.batch_size * self.grad_accum))
        steps = min(steps, self.max_steps) if self.max_steps else steps
        return TrainConfig(steps=steps, batch_size=self.batch_size, grad_accum=self.grad_accum, lr=self.lr,
                           warmup_steps=max(1, round(self.warmup_ratio * steps)), schedule=self.schedule,
                           max_len=self.max_len, seed=seed)


@dataclass(frozen=True)
class Method:
    id: str
    name: str
    allocation: object             # {"bits": b, "rank": r} | {"shallow": [b, r], "deep": [b, r]}
                                   # | "search" | {"search_at": bits} | {"search": {profile overrides}}
                                   # | {"random": {"bits": b, "draw": k}}
                                   # | {"knapsack": {"bits": b, "rank": r}} (Phase I alone)
    quant: dict = field(default_factory=dict)
    adapter: str = "lora"
    multi_seed: bool = False
    seed_index: int | None = None  # run only at the profile's seeds[seed_index] (random draw k: seed k)
    benchmarks: bool = True        # False: test loss and perplexity only, no lm-eval (chance draws)
    description: str = ""


def method_ids() -> list[str]:
    return sorted(p.stem for p in METHOD_DIR.glob("*.json"))


def load_method(method_id: str) -> Method:
    """A method by id (a file under qr_lib/methods/) or the path of a method JSON anywhere (its id is
    the file's stem)."""
    path = Path(method_id) if method_id.endswith(".json") else METHOD_DIR / f"{method_id}.json"
    if not path.exists():
        raise QRError(f"method {method_id!r} does not exist; choose one of {method_ids()} or give the path "
                      "of a method JSON (see docs/EXTENDING.md)")
    method_id = path.stem
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise QRError(f"method file {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                      "fix the file") from None
    known = {f.name for f in dataclasses.fields(Method)} - {"id"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise QRError(f"{path}: unknown field(s) {unknown}; known: {sorted(known)}")
    return Method(id=method_id, **values)


def resolve_allocation(profile, method: Method, n_blocks: int, out_dir: Path, ev=None) -> Allocation:
    """The method's allocation; a variant search runs (or resumes) under out_dir/searches/<id>/."""
    spec = method.allocation
    if isinstance(spec, dict) and "bits" in spec and not (isinstance(spec["bits"], int) and isinstance(spec.get("rank"), int)):
        raise QRError(f"method {method.id}: a uniform allocation is {{\"bits\": b, \"rank\": r}} with two integers, got "
                      f"{spec!r}; per-block choices are what the search selects ({{\"search_at\": bits}}) or a "
                      "shallow/deep split ({\"shallow\": [b, r], \"deep\": [b, r]})")
    if isinstance(spec, dict) and "bits" in spec:
        return uniform(n_blocks, spec["bits"], spec["rank"], profile.bit_ladder, profile.rank_ladder,
                       name=method.name)
    if isinstance(spec, dict) and "shallow" in spec:
        return split(n_blocks, tuple(spec["shallow"]), tuple(spec["deep"]), spec.get("boundary"),
                     profile.bit_ladder, profile.rank_ladder, name=method.name)
    if spec == "search" or (isinstance(spec, dict) and "search_at" in spec):
        path = Path(out_dir) / "search.json"
        if not path.exists():
            raise QRError(f"{path} does not exist; run the search first (notebook 04_bo_refinement or "
                          f"`qr-adaptor search --profile {profile.name}`)")
        result = read_json(path)["result"]
        if spec == "search":
            return dataclasses.replace(Allocation.from_dict(result["selected"]), name=method.name)
        at = result["selected_at"].get(str(float(spec["search_at"])))
        if at is None:
            raise QRError(f"method {method.id}: the search selected nothing at {spec['search_at']} bits; add it to "
                          f"the profile's select_at (now {list(profile.select_at)}) and rerun the search")
        return dataclasses.replace(Allocation.from_dict(at["allocation"]), name=method.name)
    if isinstance(spec, dict) and "knapsack" in spec:
        from .search import nsga
        from .search.problem import knapsack, level_bytes

        path, k = Path(out_dir) / "sensitivity.json", spec["knapsack"]
        if not path.exists():
            raise QRError(f"{path} does not exist; method {method.id} needs Phase I first (notebook "
                          f"02_sensitivity_profiling or `qr-adaptor profile --profile {profile.name}`)")
        if k.get("rank") not in profile.rank_ladder:
            raise QRError(f"method {method.id}: knapsack rank {k.get('rank')!r} is not on the rank ladder "
                          f"{sorted(profile.rank_ladder)}")
        space = nsga.make_space(profile, model_shapes(ev[0]), read_json(path)["result"])
        level = level_bytes(space, k["bits"], nsga.budget_rank_rung(profile))
        genes = knapsack(space, level, tuple(space.rank_ladder).index(k["rank"]))
        return space.allocation(genes, name=method.name)
    if isinstance(spec, dict) and "random" in spec:
        from .search.problem import level_bytes, random_allocation, search_space

        r, shapes = spec["random"], model_shapes(ev[0]) if ev else None
        if shapes is None:
            raise QRError(f"method {method.id}: a random allocation needs the model's shapes")
        space = search_space(shapes, dataclasses.replace(profile.quant, **method.quant), profile.bit_ladder,
                             profile.rank_ladder, None, budget_bytes(shapes, profile.quant, profile.budget_bits,
                                                                     profile.budget_rank))
        level = level_bytes(space, r["bits"], tuple(sorted(profile.rank_ladder)).index(profile.budget_rank))
        genes = random_allocation(space, level, np.random.default_rng([int(r["draw"]), int(round(10 * r["bits"]))]))
        return space.allocation(genes, name=method.name)
    if isinstance(spec, dict) and "search" in spec:
        from . import search

        fields = {f.name for f in dataclasses.fields(profile)}
        unknown = sorted(set(spec["search"]) - fields)
        if unknown:
            raise QRError(f"method {method.id}: {unknown} are not profile fields; a variant search may set "
                          f"top-level fields such as bit_ladder or rank_ladder")
        # A variant selects at the main budget only: its ladders may not reach the others.
        variant = dataclasses.replace(profile, select_at=(), **{k: tuple(v) if isinstance(v, list) else v
                                                                for k, v in spec["search"].items()})
        res = search.run(variant, Path(out_dir) / "searches" / method.id, sensitivity_dir=Path(out_dir),
                         evaluations_dir=Path(out_dir) / "evaluations",
                         base=ev[0] if ev else None, tok=ev[1] if ev else None)
        return dataclasses.replace(Allocation.from_dict(res["selected"]), name=method.name)
    raise QRError(f"method {method.id}: allocation {spec!r} is not {{'bits', 'rank'}}, {{'shallow', 'deep'}}, "
                  "'search', {'search_at': bits}, {'random': {...}}, {'knapsack': {...}} or {'search': {...}}")


def run_dir(out_dir: Path, method: Method, seed: int) -> Path:
    return Path(out_dir) / "runs" / method.id / f"seed{seed}"


@dataclass(frozen=True)
class RunData:
    """What a final run reads: the fine-tuning set, the test split and the held-out passages."""
    train: list
    test: list
    heldout: list


def run_data(profile) -> RunData:
    from .data import load_finetune, load_texts

    splits = load_finetune(profile.data)
    return RunData(splits.train, splits.test, load_texts(profile.data)[1])


def run(profile, method: Method, seed: int, out_dir: Path, base=None, tok=None, progress: bool = True,
        data: tuple | None = None) -> dict:
    """Fine-tune, save and evaluate one (method, seed); returns its result.json record.
    `data` = run_data(profile), when the caller runs many (it is the same for all).
    Test losses are kept example by example (summed NLL and answer tokens, in test-split order), so
    methods can be compared pair by pair on the same examples."""
    from .evaluate import run_tasks
    from .models import load_model

    qcfg = dataclasses.replace(profile.quant, **method.quant)
    # Which seeds and methods a profile plans does not change this run, so they stay out of its key.
    config = {"model": profile.model, "dtype": profile.dtype, "data": profile.data, "method": method,
              "quant": qcfg, "lora": profile.lora,
              "finetune": dataclasses.replace(profile.finetune, seeds=(), methods=None),
              "eval": profile.eval, "seed": seed}
    key = content_hash(config)
    where = run_dir(out_dir, method, seed)
    if base is None:
        base, tok = load_model(profile.model, profile.dtype, profile.device)
    shapes = model_shapes(base)
    allocation = resolve_allocation(profile, method, shapes.n_blocks, out_dir, (base, tok))
    done = read_artifact(where / "result.json")  # None when missing, damaged or edited
    if done is not None:
        same = Allocation.from_dict(done["result"]["allocation"]).pairs() == allocation.pairs()
        if done["config"].get("key") == key and same:  # a new search selection means a new run
            return done
    data = data or run_data(profile)
    tcfg = profile.finetune.train_config(len(data.train), seed)
    t0 = time.time()
    model, hook, notes = prepare(base, allocation, qcfg, profile.lora, method.adapter, seed, tcfg.steps)
    log = train(model, tok, data.train, tcfg, progress=progress, desc=f"{method.id} seed {seed}", on_step=hook)
    train_seconds = time.time() - t0
    per_example = example_losses(model, tok, data.test[:profile.finetune.n_test], tcfg.max_len)
    save_adapter(model, where, allocation, qcfg, profile, method)
    memory = formula_bytes(shapes, allocation, qcfg)
    result = {
        "method": method.id, "name": method.name, "seed": seed, "allocation": allocation.to_dict(),
        "memory_bytes": memory["blocks"], "avg_bits": memory["avg_bits"],
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "train": {**log, "steps": tcfg.steps, "epochs": tcfg.steps * tcfg.batch_size * tcfg.grad_accum / len(data.train),
                  "seconds": round(train_seconds, 1)},
        "adapter_notes": notes,
        "test_loss": mean_loss(per_example),
        "test_examples": {"nll_sum": [x for x, _ in per_example], "tokens": [n for _, n in per_example]},
        "heldout_perplexity": perplexity(model, tok, data.heldout, max_len=256),
        "benchmarks": run_tasks(model, tok, profile.eval, progress=progress, log_dir=where / "lm_eval")
        if method.benchmarks and profile.eval.benchmarks(seed) else {},
        "seconds": round(time.time() - t0, 1),
    }
    return write_artifact(where / "result.json", {**config, "key": key}, result)


def save_adapter(model, where: Path, allocation: Allocation, qcfg: QuantConfig, profile, method: Method) -> None:
    """peft's adapter files plus what rebuilds the quantized model they sit on."""
    model.save_pretrained(str(where / "adapter"))
    write_json(where / "allocation.json", {"allocation": allocation, "quant": qcfg, "lora": profile.lora,
                                           "model": profile.model, "dtype": profile.dtype,
                                           "adapter": method.adapter})


def load_finetuned(where: Path, base=None, tok=None):
    """Rebuild a saved run for inference: same quantized blocks, the trained adapter weights."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from .build import LoraSettings, build
    from .models import load_model

    meta = read_json(Path(where) / "allocation.json")
    if meta["adapter"] == "adalora":
        raise QRError("reloading AdaLoRA runs is not supported; load them with peft.PeftModel.from_pretrained")
    if base is None:
        base, tok = load_model(meta["model"], meta["dtype"])
    model = build(base, Allocation.from_dict(meta["allocation"]), QuantConfig(**meta["quant"]),
                  LoraSettings(**meta["lora"]), progress=False)
    set_peft_model_state_dict(model, load_file(str(Path(where) / "adapter" / "adapter_model.safetensors")))
    model.eval()
    return model, tok


def plan(profile, methods: list[str] | None = None) -> list[tuple[Method, int]]:
    """(method, seed) pairs: every seed of the profile for multi-seed methods, the one at `seed_index`
    for a method that names it, the first otherwise. Seed-major, so a run stopped half-way already has
    one result for (nearly) every method."""
    chosen = [load_method(m) for m in (methods or profile.finetune.methods or method_ids())]
    seeds = profile.finetune.seeds
    for m in chosen:
        if m.seed_index is not None and not 0 <= m.seed_index < len(seeds):
            raise QRError(f"method {m.id} runs at seed index {m.seed_index} but the profile has {len(seeds)} "
                          f"seeds {list(seeds)}; add seeds (finetune.seeds) or drop the method")

    def runs_at(m, k):
        return k == m.seed_index if m.seed_index is not None else (k == 0 or m.multi_seed)
    return [(m, s) for k, s in enumerate(seeds) for m in chosen if runs_at(m, k)]


def run_all(profile, out_dir: Path, methods: list[str] | None = None, progress: bool = True) -> list[dict]:
    """Every planned run, in order; finished ones are read back, not redone. With parallel.backend
    "dask" the unfinished runs go to the workers first (each writes its own run folder)."""
    from . import parallel
    from .models import load_model

    todo = plan(profile, methods)
    with parallel.executor(profile.parallel, profile.device) as client:
        if client is not None:
            parallel.finetune_all(client, profile, out_dir, todo)
    base, tok = load_model(profile.model, profile.dtype, profile.device)
    data = run_data(profile)
    records = []
    for k, (method, seed) in enumerate(todo, 1):
        if progress:
            print(f"[run {k}/{len(todo)}] {method.name}, seed {seed}", flush=True)
        records.append(run(profile, method, seed, out_dir, base, tok, progress, data))
    return records
