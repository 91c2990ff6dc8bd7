"""What a profile's full run will do, before doing it: `qr-adaptor estimate` (or `reproduce --dry-run`).

The work is counted from the profile, stage by stage, by each stage module's `work(profile)` (a
work.Work: LoRA optimizer steps, examples scored, models built and loaded, lm-eval requests and
generated tokens, notebooks started) and the memory is the formula of memory.py on the model's
shapes, read from its config without loading weights. Time comes
from a Speed measured on the machine at hand (`estimate --measure`: every unit of work timed once,
cached per machine), in minutes for every stage; or, for another machine, from a seconds-per-step
figure given with --step-seconds (training hours only). The paper reports
8-9 minutes per proxy candidate on LLaMA-3.1-8B (arXiv 2505.03802, one version's Phase II); nothing here
turns that into a per-step figure, because the paper does not say how many steps a candidate took.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..algorithm.allocation import uniform
from ..algorithm.build import build
from ..algorithm.memory import formula_bytes, model_shapes, profile_budget
from ..algorithm.runner import open_runner
from ..algorithm.search.problem import space_for
from ..algorithm.train import encode, example_losses, train
from ..config import Profile
from ..data import load_finetune
from ..errors import QRError
from ..evaluate import run_tasks
from ..hardware import cpu_flags, memory_bytes, resolve_dtype
from ..layout import Cache, Layout
from ..models import load_model, load_skeleton
from ..store import content_hash, read_artifact, read_json, write_artifact
from . import finetune, inputs, pilot, proxy_check, search_tables
from .work import Work


@dataclass(frozen=True)
class Speed:
    """Seconds this machine takes per unit of work, measured by measure_speed (cached per machine)."""
    step: float            # one LoRA optimizer step of the final recipe
    example: float         # scoring one prompt/answer pair (or one lm-eval log-likelihood request)
    token: float           # generating one token (GSM8K)
    build: float           # quantizing a model and adding its adapters
    load: float            # loading the model
    lm_eval_call: float    # lm-eval's fixed cost per call (building its tasks)
    notebook: float        # a notebook kernel: start-up and the workbook's imports
    cluster: float = 0.0   # starting and closing a runner's local workers (parallel.backend "dask")

    # Which speed prices each field of a Work.
    UNITS = {"steps": "step", "examples": "example", "lm_eval_requests": "example", "generated_tokens": "token",
             "models_built": "build", "model_loads": "load", "lm_eval_calls": "lm_eval_call", "notebooks": "notebook"}

    def seconds(self, work: Work) -> float:
        return sum(n * getattr(self, self.UNITS[k]) for k, n in work.priced().items())


# The stages whose runs go through the runner (runner.each, the search's proxy evaluations); a worker
# does a run's work, the caller's process loads the model, starts the notebook and reads artifacts back.
PARALLEL_STAGES = ("pilot", "Phases II-III", "final fine-tunes", "proxy check")


def stage_seconds(stage: str, work: Work, speed: Speed, worker: Speed | None, workers: int) -> float:
    """A stage's seconds: all of it at `speed` on the serial runner; on local workers (`worker`: one
    worker's speed at parallel.threads_per_worker), its runs' work shared among `workers` (which each
    load the model once, at the same time), after the cluster starts."""
    if worker is None or stage not in PARALLEL_STAGES:
        return speed.seconds(work)
    light = Work(model_loads=work.model_loads, notebooks=work.notebooks)
    heavy = dataclasses.replace(work, model_loads=0, notebooks=0)
    return speed.seconds(light) + worker.cluster + worker.load + worker.seconds(heavy) / workers


def _skeleton(profile: Profile):
    """(the model without weights, its shapes, the search space with a flat Phase I: every KL 0)."""
    skeleton = load_skeleton(profile.model)
    shapes = model_shapes(skeleton)
    return skeleton, shapes, space_for(profile, shapes, None)


def work(profile: Profile, shapes=None, space=None) -> dict[str, Work]:
    """Every stage's work, counted from the profile, in notebook order: each stage module's own `work`
    (inputs, pilot, search_tables, finetune, proxy_check). Counts that depend on what the search finds
    (duplicate candidates, allocations two methods share) are upper bounds."""
    if shapes is None:
        _, shapes, space = _skeleton(profile)
    searched = search_tables.work(profile, space, shapes.n_blocks)
    return {"setup": inputs.work(profile), "pilot": pilot.work(profile), **searched,
            "final fine-tunes": finetune.work(profile), "proxy check": proxy_check.work(profile),
            "report and explorer": Work(model_loads=1, notebooks=2)}


@dataclass(frozen=True)
class Estimate:
    """What `estimate` says of a profile's run: its work per stage, its memory, and its time where a
    speed (minutes, every unit of work) or a step time (hours, training steps alone) is known."""
    profile: str
    model: str
    device: str
    dtype: str
    runner: str
    stages: dict                   # stage -> Work
    memory: dict                   # labelled quantities (bytes as GiB), printed as they are
    peak_gib: float                # a training process's peak, about (the memory check reads it)
    step_seconds: float | None
    speed: Speed | None = None
    minutes: dict | None = None    # stage -> minutes at `speed`, and "total"

    @property
    def steps(self) -> int:
        return sum(w.steps for w in self.stages.values())

    @property
    def training_hours(self) -> dict | None:
        """stage -> hours of training steps alone at step_seconds, and "total"."""
        if not self.step_seconds:
            return None
        hours = {k: w.steps * self.step_seconds / 3600 for k, w in self.stages.items()}
        return {**hours, "total": self.steps * self.step_seconds / 3600}


def estimate(profile: Profile, step_seconds: float | None = None, speed: Speed | None = None,
             worker: Speed | None = None) -> Estimate:
    """Work, memory and time of every stage of a profile's run: with a measured Speed, the seconds of
    all the work (training, scoring, lm-eval, builds, loads, notebook start-up), the runner's stages
    priced as they run on its workers where `worker` (one worker's Speed) is given; with only a step
    time (e.g. --step-seconds for another machine), the hours of training steps alone."""
    skeleton, shapes, space = _skeleton(profile)
    budget = profile_budget(profile, shapes)
    stages = work(profile, shapes, space)
    params = sum(int(np.prod(t.shape)) for t in skeleton.parameters())
    lora = formula_bytes(shapes, space.allocation(np.array([space.bit_ladder.index(profile.budget_bits),
                                                            space.rank_ladder.index(profile.budget_rank)]
                                                           * shapes.n_blocks)), profile.quant)["lora"]
    dtype_bytes = {"float32": 4, "float64": 8}.get(resolve_dtype(profile.dtype, profile.device), 2)
    # The loaded base model stays resident while a quantized copy trains; on a CPU that copy computes with
    # dequantized weights (quant.dequantize_once), so both count at the compute dtype, plus LoRA weights,
    # gradients and AdamW's two moments. Activations come on top.
    peak = (2 * params * dtype_bytes + 4 * lora) / 2**30
    memory = {"model parameters": params,
              "16-bit checkpoint (disk, GiB)": params * 2 / 2**30,
              "budget: quantized blocks + LoRA (GiB)": budget / 2**30,
              "unquantized rest: embeddings, norms, head (GiB)": shapes.other_bytes / 2**30,
              "LoRA optimizer state at the budget, AdamW fp32 (GiB)": 2 * lora / 2**30,
              "block cache (disk, GiB, at most)": sum(formula_bytes(shapes, space.allocation(
                  np.array([j, 0] * shapes.n_blocks)), profile.quant)["weights"]
                  for j, b in enumerate(space.bit_ladder) if b != 16) / 2**30,
              "training process peak, about (GiB)": peak}
    minutes = None
    if speed is not None:
        minutes = {k: stage_seconds(k, w, speed, worker, profile.parallel.workers) / 60 for k, w in stages.items()}
        minutes["total"] = sum(minutes.values())
    runner = (f"{profile.parallel.workers} local workers x {profile.parallel.threads_per_worker} thread(s)"
              if profile.parallel.backend == "dask" else f"serial, {torch.get_num_threads()} thread(s)")
    return Estimate(profile.name, profile.model, profile.device, profile.dtype, runner, stages, memory, peak,
                    step_seconds or (speed and speed.step), speed, minutes)


def measured_step_seconds(layout: Layout) -> float | None:
    """Median training seconds per step of the finished final runs in the layout, if any."""
    per_step = [r.train["seconds"] / r.train["steps"] for r in finetune.results(layout) if r.train["steps"]]
    return float(np.median(per_step)) if per_step else None


def speed_key(profile: Profile) -> str:
    """What a speed measurement depends on: this machine (its CPU or GPU, cores, torch) and what is timed."""
    device = torch.cuda.get_device_name(0) if profile.device.startswith("cuda") and torch.cuda.is_available() else None
    return content_hash({"workers timed": "together", "cpu": sorted(cpu_flags()), "cores": os.cpu_count(),
                         "threads": torch.get_num_threads(), "parallel": profile.parallel,
                         "gpu": device, "torch": torch.__version__, "model": profile.model, "dtype": profile.dtype,
                         "device": profile.device, "recipe": [profile.finetune.batch_size, profile.finetune.max_len],
                         "quant": profile.quant, "eval": [profile.eval.batch_size, sorted(profile.eval.tasks)]})


def _speed_file(key: str) -> Path:
    return Cache.here().speed(key)


def cached_speed(profile: Profile) -> Speed | None:
    """This machine's measured Speed for the profile's settings, if measure_speed has run here."""
    record = read_artifact(_speed_file(speed_key(profile)), quiet=True)
    return Speed(**record["result"]["main"]) if record is not None else None


def cached_worker_speed(profile: Profile) -> Speed | None:
    """One runner worker's measured Speed (parallel.backend "dask"), if measure_speed has run here."""
    record = read_artifact(_speed_file(speed_key(profile)), quiet=True)
    return Speed(**record["result"]["worker"]) if record is not None and record["result"]["worker"] else None


def _timing_splits(profile: Profile):
    """The data the units are timed on: the profile's splits, with at least 16 fine-tuning pairs."""
    return load_finetune(dataclasses.replace(profile.data, n_train=max(profile.data.n_train, 16)))


def _time_units(profile: Profile, base, tok, splits) -> dict:
    """Seconds of one build, one LoRA step, one scored example and one generated token, at the torch
    threads of the moment (after a warm-up each)."""
    allocation = uniform(model_shapes(base).n_blocks, profile.budget_bits, profile.budget_rank,
                         profile.bit_ladder, profile.rank_ladder)
    t = time.time()
    model = build(base, allocation, profile.quant, profile.lora, progress=False)
    built = time.time() - t
    tcfg = profile.finetune.train_config(len(splits.train), 0)
    train(model, tok, splits.train, dataclasses.replace(tcfg, steps=1), progress=False)       # warm-up
    log = train(model, tok, splits.train, dataclasses.replace(tcfg, steps=4), progress=False)
    # A step's time follows its tokens, and length-grouped batches differ by 2x: the few steps timed
    # are priced per token, at the mean batch of the fine-tuning set.
    rows = encode(tok, splits.train, tcfg.max_len)
    step_tokens = sum(len(r["input_ids"]) for r in rows) / len(rows) * tcfg.batch_size * tcfg.grad_accum
    step = log["seconds"] / max(log["train_tokens"], 1) * step_tokens
    examples = (splits.val + splits.test)[:64]
    example_losses(model, tok, examples[:16], tcfg.max_len)                                   # warm-up
    t = time.time()
    example_losses(model, tok, examples, tcfg.max_len)
    example = (time.time() - t) / len(examples)
    ids = tok(examples[0].prompt, return_tensors="pt")["input_ids"].to(profile.device)
    t = time.time()
    with torch.no_grad():
        model.generate(input_ids=ids, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                       pad_token_id=tok.pad_token_id)
    return {"step": step, "example": example, "token": (time.time() - t) / 16, "build": built, "model": model}


def units_beside_others(profile: Profile) -> dict:
    """One runner worker's units of work, timed in a process of its own at the worker's threads while
    the other workers time theirs (measure_speed starts them together)."""
    torch.set_num_threads(profile.parallel.threads_per_worker)
    base, tok = load_model(profile.model, profile.dtype, profile.device)
    units = _time_units(profile, base, tok, _timing_splits(profile))
    units.pop("model")
    return units


def measure_speed(profile: Profile, progress: bool = True, fresh: bool = False) -> Speed:
    """Time each unit of work once on this machine (about a minute for the embedded model on two CPU
    cores; again in every local worker at once where the profile runs them, and the workers' start),
    cached per machine and profile settings (speed_key) under the data cache; `fresh` measures again and
    replaces the cached speed (one measured while other work shared the cores prices every stage too high:
    1.33 x a recorded default run, against 1.06 x measured on the idle machine)."""
    if not fresh and (speed := cached_speed(profile)) is not None:
        return speed
    key = speed_key(profile)
    if progress:
        print("measuring this machine's speed (once; cached)...", flush=True)
    t = time.time()
    subprocess.run([sys.executable, "-c", "import qr_lib.workbook.reproduce, qr_lib.workbook.finetune"], check=True)
    notebook = time.time() - t
    t = time.time()
    base, tok = load_model(profile.model, profile.dtype, profile.device)
    load = time.time() - t
    units = _time_units(profile, base, tok, _timing_splits(profile))
    model = units.pop("model")
    t = time.time()
    run_tasks(model, tok, dataclasses.replace(profile.eval, tasks=("qr_piqa",), limit=1, task_limits={}), progress=False)
    lm_eval_call = max(0.0, time.time() - t - 2 * units["example"])
    speed = Speed(**units, load=load, lm_eval_call=lm_eval_call, notebook=notebook)
    worker = None
    if profile.parallel.backend == "dask" and not profile.parallel.address:
        # Every worker at once, each in a process of its own: a worker shares the cores, caches and memory
        # bandwidth with the others, so it is timed beside them, not alone.
        with multiprocessing.get_context("spawn").Pool(profile.parallel.workers) as pool:
            timed = pool.map(units_beside_others, [profile] * profile.parallel.workers)
        one = {k: float(np.mean([u[k] for u in timed])) for k in timed[0]}
        t = time.time()
        with open_runner(profile.parallel, profile.device):
            pass
        worker = dataclasses.replace(speed, **one, cluster=time.time() - t)
    write_artifact(_speed_file(key), {"key": key}, {"main": dataclasses.asdict(speed),
                                                    "worker": dataclasses.asdict(worker) if worker else None})
    return speed


def recorded_seconds(layout: Layout, result: Estimate) -> float | None:
    """The wall-clock seconds of the last run of the profile from nothing (every notebook the estimate
    `result` counts, no artifact or cache present at its start), as make reproduce recorded it; a rerun
    that read its artifacts back says nothing of the work."""
    notebooks = sum(w.notebooks for w in result.stages.values())
    manifest = read_json(layout.manifest) if layout.manifest.exists() else {}
    whole = [r for r in manifest.get("runs", []) if len(r["notebooks"]) == notebooks and r.get("from_nothing")]
    return whole[-1]["wall_seconds"] if whole else None


def describe(result: Estimate, recorded: float | None = None) -> str:
    lines = [f"estimate for profile {result.profile}: model {result.model} in {result.dtype} on "
             f"{result.device}, runner {result.runner}"]
    lines += [f"  {stage}: {w.describe()}" for stage, w in result.stages.items()]
    lines.append(f"  total LoRA optimizer steps: {result.steps:,}")
    lines.append("memory (formula, memory.py):")
    lines += [f"  {k}: {v:,.2f}" if isinstance(v, float) else f"  {k}: {v:,}" for k, v in result.memory.items()]
    hours = result.training_hours
    if result.minutes:
        lines.append("time on this machine, every stage's work (measured here: "
                     + ", ".join(f"{k} {v:.3g} s" for k, v in dataclasses.asdict(result.speed).items()) + "):")
        lines += [f"  {k}: {v:,.1f} min" for k, v in result.minutes.items()]
        if recorded:
            lines.append(f"  the last run of this profile from nothing took {recorded / 60:,.1f} min (on the machine "
                         f"that ran it): the estimate is {result.minutes['total'] * 60 / recorded:.2f} x that")
    elif hours:
        lines.append(f"time at {result.step_seconds:.2f} s per step (training only; scoring, lm-eval and "
                     "start-up come on top):")
        lines += [f"  {k}: {v:.1f} h" for k, v in hours.items()]
    else:
        lines.append("time: run `qr-adaptor estimate --measure` on the machine that will run it, or give "
                     "--step-seconds (e.g. the first proxy candidate's seconds per step on the target machine)")
    return "\n".join(lines)


def check_size(profile: Profile, layout: Layout) -> None:
    """Refuse, before any work, a run whose training steps alone would pass profile.limits.max_hours,
    at the step time a finished run measured (or the floor), or whose training process would not fit
    the machine's memory (or limits.max_memory_gib), naming the estimate and the setting."""
    step = measured_step_seconds(layout) or profile.limits.floor_step_seconds
    result = estimate(profile, step)
    peak = result.peak_gib
    limit = profile.limits.max_memory_gib
    machine = memory_bytes(profile.device)
    if limit is None and machine is not None:
        limit = machine / 2**30
    if limit is not None and peak > limit:
        raise QRError(f"profile {profile.name!r} needs about {peak:,.1f} GiB in a training process (the base model "
                      f"and a training copy at {profile.dtype}; `qr-adaptor estimate --profile {profile.name}`), "
                      f"more than the {limit:,.1f} GiB {'allowed' if profile.limits.max_memory_gib else 'this machine has'}; "
                      "choose a smaller model or a GPU, or let it through with "
                      f"--set limits.max_memory_gib={peak * 1.1:.0f}")
    hours = result.training_hours["total"]
    if hours > profile.limits.max_hours:
        raise QRError(f"profile {profile.name!r} would train for about {hours:,.0f} hours at {step:g} s per step "
                      f"(`qr-adaptor estimate --profile {profile.name}` for the breakdown), past "
                      f"limits.max_hours = {profile.limits.max_hours:g}; shrink the run, or let it through with "
                      f"--set limits.max_hours={hours * 1.1:.0f}")
