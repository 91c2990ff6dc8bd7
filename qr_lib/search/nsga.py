"""Phase II: NSGA-II over (bits, rank) per block, seeded by Phase I, scored by proxy fine-tunes.

pymoo runs the algorithm (constrained domination, crowding distance); this module supplies the
seeded population and the paper's operators (problem.py) and records what happened: every scored
candidate, each generation's front and hypervolume, and the final Pareto set.
With `low_steps > 0` (multi-fidelity) NSGA-II ranks children by a cheap proxy and the best
`promote` of every generation's front are re-scored by the full proxy; the Pareto set handed to
Phase III holds full-fidelity scores only.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.callback import Callback
from pymoo.optimize import minimize

from ..fitness import FAILED_LOSS, Fidelity, ProxyEvaluator, full_fidelity, summarize
from ..sensitivity import seed_allocation
from ..store import content_hash, read_json, write_artifact
from .problem import (AllocationProblem, BlockCrossover, BudgetRepair, NeighbourMutation,
                      SeededSampling, SearchSpace, fill, hypervolume, pareto_mask, pareto_set, search_space)


@dataclass(frozen=True)
class NSGAConfig:
    pop_size: int = 8
    generations: int = 3
    seed: int = 0
    jitter: float = 0.3             # prob. that a gene of a seeded copy moves one rung
    mutation_prob: float = 0.1      # prob. that a block mutates
    crossover_prob: float = 0.9
    max_lowest: int | None = None   # at most this many blocks at the lowest bits in the seed
    # KL charged per unit fraction of a block's rank, in units of its lowest-bit KL. Small: the
    # paper's premise is that rank cannot buy back fidelity, so repair and the seed trade bits first.
    repair_rank_weight: float = 0.02
    low_steps: int = 0              # > 0: multi-fidelity, children scored with this many steps
    low_n_val: int = 32
    promote: int = 2                # full-fidelity re-scores per generation (multi-fidelity only)


def low_fidelity(profile, cfg: NSGAConfig) -> Fidelity:
    return Fidelity("low", dataclasses.replace(profile.proxy, steps=cfg.low_steps),
                    min(cfg.low_n_val, profile.data.n_val))


def make_space(profile, evaluator: ProxyEvaluator, sensitivity: dict) -> SearchSpace:
    return search_space(evaluator.shapes, profile.quant, profile.bit_ladder, profile.rank_ladder,
                        sensitivity["kl"], evaluator.budget, profile.nsga.repair_rank_weight)


def seed_genes(profile, sensitivity: dict, space: SearchSpace) -> np.ndarray:
    """Phase I's seed: normalized sensitivity mapped onto the ladders, then brought to the budget
    (repaired if over, filled by the most KL recovered per byte if under), so the first individual
    spends the memory the budget allows."""
    lowest = str(min(int(b) for b in sensitivity["kl"]))
    seed = seed_allocation(sensitivity["kl"][lowest], profile.bit_ladder, profile.rank_ladder,
                           profile.nsga.max_lowest)
    return fill(space, seed.to_genes())


class _Recorder(Callback):
    """Per generation: the front of the population, and promotions to the full proxy.
    `generation` is the one being scored now (pymoo calls notify after each one)."""

    def __init__(self, space, evaluator, search: Fidelity, full: Fidelity, promote: int):
        super().__init__()
        self.space, self.evaluator, self.search, self.full, self.promote = space, evaluator, search, full, promote
        self.generation, self.generations, self.promoted = 1, [], []

    def notify(self, algorithm):
        pop = algorithm.pop
        feasible = pop.get("CV")[:, 0] <= 0
        F = pop.get("F")
        front = [i for i in np.flatnonzero(pareto_mask(F)) if feasible[i]]
        keys = [self.evaluator.key(self.space.allocation(pop[i].X), self.search) for i in front]
        self.generations.append({"generation": algorithm.n_gen, "front": keys, "F": F[front].tolist()})
        if self.search.name != self.full.name:
            for i in sorted(front, key=lambda i: F[i, 0])[:self.promote]:
                rec = self.evaluator.evaluate(self.space.allocation(pop[i].X), self.full)
                self.promoted.append(summarize(rec, algorithm.n_gen))
        self.generation = algorithm.n_gen + 1


def hv_curve(generations: list[dict]) -> tuple[list[float], dict]:
    """HV per generation after min-max normalizing both objectives over every generation's front
    (so the curve is comparable across generations); reference point (1.1, 1.1)."""
    pts = np.array([f for g in generations for f in g["F"]]).reshape(-1, 2)
    if pts.size == 0:
        return [0.0 for _ in generations], {}
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    curve = [hypervolume((np.array(g["F"]).reshape(-1, 2) - lo) / span, (1.1, 1.1)) for g in generations]
    return curve, {"min": lo.tolist(), "max": hi.tolist(), "ref": [1.1, 1.1]}


def search(profile, evaluator: ProxyEvaluator, sensitivity: dict) -> dict:
    """Run NSGA-II; returns the Phase II result (see module docstring)."""
    cfg = profile.nsga
    space = make_space(profile, evaluator, sensitivity)
    full = full_fidelity(profile)
    fidelity = low_fidelity(profile, cfg) if cfg.low_steps > 0 else full
    recorder = _Recorder(space, evaluator, fidelity, full, cfg.promote)
    scored: list[dict] = []

    def score(allocations):
        recs = evaluator.evaluate_many(allocations, fidelity, desc=f"generation {recorder.generation}")
        scored.extend(summarize(r, recorder.generation) for r in recs)
        return [min(r["objective"], FAILED_LOSS) for r in recs]

    seed = seed_genes(profile, sensitivity, space)
    algorithm = NSGA2(pop_size=cfg.pop_size, sampling=SeededSampling(seed, cfg.jitter, space),
                      crossover=BlockCrossover(cfg.crossover_prob),
                      mutation=NeighbourMutation(cfg.mutation_prob),
                      repair=BudgetRepair(space), eliminate_duplicates=True)
    t0 = time.time()
    minimize(AllocationProblem(space, score), algorithm, ("n_gen", cfg.generations), seed=cfg.seed,
             callback=recorder, verbose=False)
    full_records = [r for r in scored if r["fidelity"] == full.name] + recorder.promoted
    curve, norm = hv_curve(recorder.generations)
    for g, hv in zip(recorder.generations, curve):
        g["hv"] = hv
    unique = {r["key"]: r for r in scored + full_records}
    return {"search_fidelity": fidelity.name, "fidelities": {fidelity.name: fidelity, full.name: full},
            "budget_bytes": space.budget, "seed_genes": seed.tolist(),
            "evaluations": scored, "promoted": recorder.promoted,
            "generations": recorder.generations, "hv_normalization": norm,
            "pareto": pareto_set(full_records),
            "train_tokens": sum(r["train_tokens"] for r in unique.values()),
            "n_unique_evaluations": len(unique),
            # what the scores cost when computed (a resumed run reads most from the cache)
            "proxy_seconds": round(sum(r["seconds"] for r in unique.values()), 1),
            "wall_seconds": round(time.time() - t0, 1)}


def run(profile, out_dir: Path, evaluator: ProxyEvaluator, sensitivity: dict, sensitivity_key: str) -> dict:
    """Phase II for a Profile; reuses results/<profile>/nsga.json while its config matches."""
    config = {"context": evaluator.context, "proxy": profile.proxy, "nsga": profile.nsga,
              "ladders": [profile.bit_ladder, profile.rank_ladder],
              "budget": [profile.budget_bits, profile.budget_rank], "sensitivity_key": sensitivity_key}
    key = content_hash(config)
    out = Path(out_dir) / "nsga.json"
    if out.exists() and read_json(out)["config"].get("key") == key:
        return read_json(out)["result"]
    result = search(profile, evaluator, sensitivity)
    write_artifact(out, {**config, "key": key}, result)
    return result
