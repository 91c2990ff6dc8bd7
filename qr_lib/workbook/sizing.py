"""Sizing the experiment from measurements: learning curves of uniform settings on the dev split.

The question of the workbook (can a layer's adapter rank buy back what its bits lost?) has an answer
that depends on how long one fine-tunes: after a few steps every loss mostly measures the quantized
model's fidelity, later the adapter's plasticity. Before choosing the final fine-tune's length and the
search's ladder, this stage measures both, for a grid of uniform settings (`SizingConfig.methods`:
16-bit LoRA, NF4, HQQ rungs at several ranks and group sizes):

- one fine-tune per setting under the final recipe (rate, batch, length of sequence), with the rate
  held constant after warm-up, scored on the dev split at every checkpoint in `SizingConfig.checkpoints`.
  A constant rate makes one run give every length (the loss at step s is what a run of s steps at that
  rate reaches); a final run of s steps decays its rate to zero and ends somewhat lower, for every
  method alike, so the curves are read for where the methods' ORDER settles, not for final values;
- held-out perplexity before training and at the last checkpoint: the rung's fidelity, and how much
  of it training recovers.

Nothing here reads the test split. The fine-tuning pairs are the train split extended to the longest
checkpoint, so every curve sees each pair at most once.

`length(curves, methods)` is the smallest checkpoint L from which on the order of the key methods no
longer changes between a checkpoint and its double (paired over dev examples), and the final length
that gives a decaying schedule as much training; `ladder(curves, ...)` the rungs whose curve stays
within a gap of 16-bit LoRA's, after the longest training and at the final length.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import pandas as pd

from ..algorithm.adapters import prepare
from ..algorithm.memory import formula_bytes, model_shapes
from ..algorithm.runner import SERIAL, Runner, each
from ..algorithm.train import example_losses, perplexity, train
from ..config import Profile, QuantConfig, SizingConfig, TrainConfig
from ..data import load_finetune, load_texts
from ..errors import QRError
from ..layout import Layout
from ..models import worker_model
from ..store import LEFT_OUT, cached, read_artifact, save_figure, save_table
from . import stats
from .methods import Context, Method, load_method
from .plots import caption, figure_caption, learning_curves


def recipe(profile: Profile, cfg: SizingConfig) -> TrainConfig:
    """The final fine-tune's recipe, run to the longest checkpoint at a constant rate after warm-up (the
    final recipe's warm-up fraction of the longest checkpoint)."""
    steps = max(cfg.checkpoints)
    final = profile.finetune.train_config(1, cfg.seed)
    return dataclasses.replace(final, steps=steps, warmup_steps=max(1, round(profile.finetune.warmup_ratio * steps)),
                               schedule="constant")


def data(profile: Profile, cfg: SizingConfig):
    """(fine-tuning pairs for the longest checkpoint, dev pairs, held-out passages)."""
    if profile.data.n_dev < 2:
        raise QRError(f"the sizing curves are scored on the dev split, and data.n_dev is {profile.data.n_dev}; "
                      "set data.n_dev (e.g. --set data.n_dev=256): the test split is never read to size the run")
    splits = load_finetune(data_config(profile, cfg))
    return splits.train, splits.dev, load_texts(profile.data)[1]


def data_config(profile: Profile, cfg: SizingConfig):
    """The data settings the curves read: the profile's, with as many fine-tuning pairs as the longest
    checkpoint needs in one epoch (the final runs read the first data.n_train of them)."""
    tcfg = recipe(profile, cfg)
    need = tcfg.steps * tcfg.batch_size * tcfg.grad_accum
    return dataclasses.replace(profile.data, n_train=max(profile.data.n_train, need))


def curve(profile: Profile, layout: Layout, method: Method, cfg: SizingConfig, base, tok, train_set, dev, heldout,
          progress: bool = True) -> dict:
    """One setting's learning curve: per checkpoint, the dev split's per-example (summed NLL, tokens)
    and the fine-tuning tokens seen; held-out perplexity before and after."""
    tcfg = recipe(profile, cfg)
    shapes = model_shapes(base)
    allocation = method.resolve(Context(profile, shapes, layout))
    qcfg = method.quant_config(profile)
    model, hook, _ = prepare(base, allocation, qcfg, profile.lora, method.adapter, cfg.seed, tcfg.steps)
    checkpoints, scoring = {}, [0.0]

    def score(step: int) -> None:
        t = time.time()
        checkpoints[str(step)] = {"dev": example_losses(model, tok, dev, tcfg.max_len)}
        scoring[0] += time.time() - t

    if 0 in cfg.checkpoints:
        score(0)
    before = perplexity(model, tok, heldout, max_len=256)

    def on_step(step: int) -> None:
        if step + 1 in cfg.checkpoints:
            score(step + 1)
            model.train()
        if hook is not None:
            hook(step)

    t0 = time.time()
    log = train(model, tok, train_set, tcfg, progress=progress, desc=f"sizing {method.id}",
                on_step=on_step)
    seconds = time.time() - t0 - scoring[0]
    if log["diverged"]:
        raise QRError(f"the sizing run of {method.id} diverged; lower finetune.lr")
    for step, point in checkpoints.items():
        point["tokens"] = log["tokens_seen"][int(step) - 1] if int(step) else 0
    memory = formula_bytes(shapes, allocation, qcfg)
    return {"method": method.id, "name": method.name, "memory_MiB": memory["blocks"] / 2**20,
            "avg_bits": memory["avg_bits"], "checkpoints": checkpoints, "train_losses": log["losses"],
            "perplexity_before": before, "perplexity_after": perplexity(model, tok, heldout, max_len=256),
            "seconds": round(seconds, 1), "scoring_seconds": round(scoring[0], 1), "steps": tcfg.steps}


def _context(profile: Profile, cfg: SizingConfig) -> dict:
    return {"model": profile.model, "dtype": profile.dtype, "data": data_config(profile, cfg), "lora": profile.lora,
            "recipe": recipe(profile, cfg), "checkpoints": cfg.checkpoints}


def setting(profile: Profile, method: Method) -> dict:
    """What of a method decides its curve: its allocation, adapter and quantization, not its name,
    description or how many seeds a final run gives it."""
    return {"method": {"id": method.id, "allocation": method.allocation, "adapter": method.adapter},
            "quant": method.quant_config(profile)}


def measured(profile: Profile, layout: Layout, method: Method, base, tok, progress: bool = True) -> dict:
    """One setting's curve: its artifact under the layout's sizing/, read back when its configuration
    is unchanged (the stage protocol)."""
    cfg = profile.sizing
    config = {**_context(profile, cfg), **setting(profile, method)}

    def compute():
        train_set, dev, heldout = data(profile, cfg)
        return curve(profile, layout, method, cfg, base, tok, train_set, dev, heldout, progress)
    return cached(layout.sizing_curve(method.id), config, compute)


def measured_on_worker(profile: Profile, layout: Layout, method: Method) -> None:
    """On a runner's worker: one setting's curve, written as its artifact (the caller reads it back)."""
    measured(profile, layout, method, *worker_model(profile.model, profile.dtype, profile.device), progress=False)


def run(profile: Profile, layout: Layout, base, tok, runner: Runner = SERIAL, progress: bool = True) -> list[dict]:
    """Every setting's curve through the runner (an artifact each, read back when unchanged)."""
    methods = [load_method(m) for m in profile.sizing.methods]
    if len(methods) < 2:
        raise QRError(f"sizing.methods holds {len(methods)} setting; the curves compare at least two")
    data(profile, profile.sizing)         # a missing dev split fails here, before any work
    return each(runner, "sizing", [(profile, layout, m) for m in methods], measured_on_worker,
                lambda p, lay, m: measured(p, lay, m, base, tok, progress), [m.name for m in methods], progress)


def curves(layout: Layout, methods=None) -> list[dict]:
    """The finished curves under the layout (checksum-checked; a damaged one is named and left out)."""
    out = []
    for path in layout.sizing_curves():
        record = read_artifact(path, then=LEFT_OUT)
        if record is not None and (methods is None or record["result"]["method"] in methods):
            out.append(record["result"])
    if methods is not None:
        out.sort(key=lambda c: list(methods).index(c["method"]))
    return out


def _arrays(c: dict, step: int):
    per = c["checkpoints"][str(step)]["dev"]
    return np.array([x for x, _ in per], dtype=float), np.array([n for _, n in per], dtype=float)


def _loss(c: dict, step: int) -> float:
    """The dev loss of a curve at a checkpoint, nats per answer token."""
    nll, tokens = _arrays(c, step)
    return float(nll.sum() / tokens.sum())


def table(curves_: list[dict], reference: str = "lora16") -> pd.DataFrame:
    """One row per (setting, checkpoint): dev loss (nats per answer token), tokens seen, the setting's
    rank and quantizer, and the paired difference to `reference` at that checkpoint with its 95%
    interval over dev examples (one seed: these runs only)."""
    ref = {c["method"]: c for c in curves_}.get(reference)
    rows = []
    for c in curves_:
        method = load_method(c["method"])
        for step, point in sorted(c["checkpoints"].items(), key=lambda kv: int(kv[0])):
            nll, tokens = _arrays(c, int(step))
            row = {"method": c["method"], "name": c["name"], "rank": getattr(method.spec, "rank", None),
                   "quantizer": QuantConfig(**method.quant).backend, "bits": c["avg_bits"],
                   "memory_MiB": c["memory_MiB"], "step": int(step), "train_tokens": point["tokens"],
                   "dev_loss": nll.sum() / tokens.sum()}
            if ref is not None and str(step) in ref["checkpoints"]:
                d = stats.paired_interval(nll[None], _arrays(ref, int(step))[0][None], tokens)
                row.update({f"minus_{reference}": d["point"], "ci95_low": d["low"], "ci95_high": d["high"]})
            rows.append(row)
    return pd.DataFrame(rows)


def rungs(curves_: list[dict], reference: str = "lora16") -> pd.DataFrame:
    """Each setting's fidelity: held-out perplexity before and after, dev loss at step 0 and at the last
    checkpoint, and the gap to `reference` (16-bit LoRA) at the last checkpoint."""
    ref = next((c for c in curves_ if c["method"] == reference), None)
    rows = []
    for c in curves_:
        first, last = min(map(int, c["checkpoints"])), max(map(int, c["checkpoints"]))
        loss = {s: _loss(c, s) for s in (first, last)}
        gap = loss[last] - _loss(ref, last) if ref else float("nan")
        rows.append({"method": c["method"], "name": c["name"], "avg_bits": c["avg_bits"], "memory_MiB": c["memory_MiB"],
                     "perplexity_before": c["perplexity_before"], "perplexity_after": c["perplexity_after"],
                     f"dev_loss_step{first}": loss[first], f"dev_loss_step{last}": loss[last],
                     f"gap_to_{reference}_step{last}": gap, "seconds_per_step": c["seconds"] / c["steps"]})
    return pd.DataFrame(rows)


def order_changes(curves_: list[dict], methods) -> pd.DataFrame:
    """For every checkpoint L whose double 2L is also a checkpoint, and every pair of `methods`: the
    paired dev-loss difference at L and at 2L (95% interval over dev examples, one seed) and whether the
    order flips: the difference at 2L is resolved (its interval excludes 0) and its sign differs from
    the one at L."""
    by_id = {c["method"]: c for c in curves_ if c["method"] in methods}
    ids = [m for m in methods if m in by_id]
    steps = sorted(set.intersection(*(set(map(int, by_id[m]["checkpoints"])) for m in ids))) if ids else []
    rows = []
    for L in steps:
        if 2 * L not in steps or L == 0:
            continue
        for i, a in enumerate(ids):
            for b in ids[i + 1:]:
                d = {}
                for s in (L, 2 * L):
                    (na, ta), (nb, _) = _arrays(by_id[a], s), _arrays(by_id[b], s)
                    d[s] = stats.paired_interval(na[None], nb[None], ta)
                resolved = d[2 * L]["low"] > 0 or d[2 * L]["high"] < 0
                rows.append({"L": L, "a": a, "b": b, "a_minus_b_L": d[L]["point"], "a_minus_b_2L": d[2 * L]["point"],
                             "ci95_low_2L": d[2 * L]["low"], "ci95_high_2L": d[2 * L]["high"],
                             "flips": bool(resolved and np.sign(d[L]["point"]) != np.sign(d[2 * L]["point"]))})
    return pd.DataFrame(rows)


def length(curves_: list[dict], methods, schedule: str = "linear") -> dict:
    """The smallest checkpoint L from which on no pair of `methods` flips between any checkpoint and its
    double (order_changes), or, if the last doubling measured still flips, the largest L measured, said
    plainly. `final_steps` carries L over to the final recipe: the curves hold the rate constant after
    warm-up, and a final run that decays it linearly to zero over S steps takes as much total step size
    as a constant run of S/2 steps, so it needs 2L steps ("constant": L)."""
    changes = order_changes(curves_, methods)
    if changes.empty:
        raise QRError("no checkpoint L has its double 2L among sizing.checkpoints; add checkpoints "
                      "(e.g. 12, 24, 48 ...)")
    per_L = changes.groupby("L")["flips"].sum()
    flips = {int(k): int(v) for k, v in per_L.items()}
    settled = [L for L in flips if all(n == 0 for k, n in flips.items() if k >= L)]
    factor = 1 if schedule == "constant" else 2
    if settled:
        L = min(settled)
        return {"L": L, "stable": True, "flips_by_L": flips, "final_steps": factor * L,
                "statement": f"from {L} steps on, no pair of {list(methods)} changes order between a checkpoint and "
                             f"its double on the dev split: a final run of {factor * L} steps at a {schedule} "
                             "schedule takes that much training"}
    L = max(flips)
    return {"L": L, "stable": False, "flips_by_L": flips, "final_steps": None,
            "statement": f"the order of {list(methods)} still changes between {L} and {2 * L} steps, the longest "
                         "checkpoints measured: longer curves are needed to size the final fine-tune"}


def ladder(curves_: list[dict], max_gap: float, reference: str = "lora16", at: int | None = None) -> pd.DataFrame:
    """The rungs (settings at the grid's reference rank) whose dev loss at the last checkpoint stays
    within `max_gap` nats of `reference`'s: survivable, or not. With `at` (the checkpoint that stands
    for the final run's length), the same at that checkpoint: a rung that survives long training may
    still be far behind after the training the final runs get."""
    r = rungs(curves_, reference)
    gap = [c for c in r.columns if c.startswith("gap_to_")][0]
    r["survives"] = r[gap] <= max_gap
    if at is not None:
        ref = next((c for c in curves_ if c["method"] == reference), None)
        r[f"gap_to_{reference}_step{at}"] = [_loss(c, at) - _loss(ref, at) if ref and str(at) in c["checkpoints"]
                                             else float("nan") for c in curves_]
        r[f"survives_at_step{at}"] = r[f"gap_to_{reference}_step{at}"] <= max_gap
    return r


def save(profile: Profile, layout: Layout, curves_: list[dict]) -> tuple[pd.DataFrame, dict]:
    """The learning-curve figure and the tables that size the experiment (each rung at the last checkpoint
    and at the chosen length; where the key methods' order changes) under the layout; returns the
    rung table and the chosen length (`length`)."""
    keys = [m for m in profile.sizing.key_methods if m in {c["method"] for c in curves_}]
    chosen = length(curves_, keys, profile.finetune.schedule)
    rung_table = ladder(curves_, profile.sizing.max_gap, at=chosen["L"])
    save_table(rung_table, layout, "sizing_rungs")
    save_table(order_changes(curves_, keys), layout, "sizing_order_changes")
    save_figure(caption(learning_curves(table(curves_), chosen["L"]), f"{figure_caption(profile)} · one seed per "
                        f"setting · dev split ({profile.data.n_dev} pairs)"), layout, "learning_curves")
    return rung_table, chosen
