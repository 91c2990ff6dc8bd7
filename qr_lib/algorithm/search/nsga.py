"""Phase II: NSGA-II over (bits, rank) per block, seeded by Phase I, scored by proxy fine-tunes.

pymoo runs the algorithm (constrained domination, crowding distance); this module supplies the
first generation and the paper's operators (problem.py) and records what happened: every scored
candidate, each generation's front and hypervolume, and the final Pareto set.

The first generation covers the memory range (problem.initial_population: the uniform allocations
that fit, Phase I knapsack optima at several memory levels, random allocations), so the search can
find, and cannot fail to consider, the uniform 4-bit allocation at the budget; it is larger than
`pop_size`, which later generations keep. With `low_steps > 0` (two proxy levels, "low" and "full":
what the optimization literature calls multi-fidelity) NSGA-II ranks children by the cheap proxy and
`promote` members of every generation's front, spread over its memory range and never one already
scored, are re-scored by the full proxy; the Pareto set handed to
Phase III holds full-level scores only. The uniform allocations at the budget's rank that fit are
always scored at the full level too (`uniform_anchors`): the low level can rank a uniform point
below the Phase I knapsack when the full proxy prefers it (the 4-step score mostly measures the
quantized base), and the front must show the uniform points it is judged against.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.callback import Callback
from pymoo.optimize import minimize
from scipy.stats import kendalltau, spearmanr

from ...config import NSGAConfig, Profile
from ...layout import Layout
from ...store import cached, keyed
from ..phases import PhaseI, PhaseII
from ..proxy import FAILED_LOSS, ProxyEvaluator, ProxyLevel, full_level
from .problem import (
    AllocationProblem,
    BlockCrossover,
    BudgetRepair,
    NeighbourMutation,
    SearchSpace,
    budget_rank_rung,
    hypervolume,
    initial_population,
    knapsack,
    pareto_mask,
    pareto_set,
    space_for,
    uniform_genes,
    uniform_label,
)


def low_level(profile: Profile, cfg: NSGAConfig) -> ProxyLevel:
    return ProxyLevel("low", dataclasses.replace(profile.proxy, steps=cfg.low_steps),
                    min(cfg.low_n_val, profile.data.n_val))


def phase1_choice(profile: Profile, space: SearchSpace):
    """What Phase I alone would choose: the least additive KL that fits the budget, at the budget's rank."""
    return space.allocation(knapsack(space, space.budget, budget_rank_rung(profile)), name="Phase I knapsack")


def first_generation(profile: Profile, space: SearchSpace) -> list[tuple[str, np.ndarray]]:
    """problem.initial_population for a profile: the budget's rank, the profile's random count and seed."""
    return initial_population(space, budget_rank_rung(profile), profile.nsga.n_random,
                              np.random.default_rng(profile.nsga.seed))


def uniform_anchors(profile: Profile, space: SearchSpace) -> list[np.ndarray]:
    """The uniform allocations at the budget's rank that fit the budget (e.g. 2/3/4-bit r8)."""
    k = budget_rank_rung(profile)
    genes = [uniform_genes(space, j, k) for j in range(len(space.bit_ladder))]
    return [g for g in genes if space.bytes(g) <= space.budget]


def spread(items: list, k: int) -> list:
    """k items evenly spaced over a sorted list (its first and last included when k >= 2)."""
    if k >= len(items):
        return list(items)
    if k == 1:
        return [items[-1]]
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)]


class _Recorder(Callback):
    """Per generation: the front of the population, and promotions to the full proxy: after the first
    generation the `anchors` (uniform allocations), then each generation `promote` front members not
    yet scored at the full level, spread over the front's memory range.
    `generation` is the one being scored now (pymoo calls notify after each one)."""

    def __init__(self, space, evaluator, search: ProxyLevel, full: ProxyLevel, promote: int, anchors: list):
        super().__init__()
        self.space, self.evaluator, self.search, self.full, self.promote = space, evaluator, search, full, promote
        self.anchors = anchors
        self.generation, self.generations, self.promoted = 1, [], []

    def notify(self, algorithm):
        pop = algorithm.pop
        feasible = pop.get("CV")[:, 0] <= 0
        F = pop.get("F")
        front = [i for i in np.flatnonzero(pareto_mask(F)) if feasible[i]]
        keys = [self.evaluator.key(self.space.allocation(pop[i].X), self.search) for i in front]
        self.generations.append({"generation": algorithm.n_gen, "front": keys, "F": F[front].tolist()})
        if self.search.name != self.full.name:
            if algorithm.n_gen == 1:
                recs = self.evaluator.evaluate_many([self.space.allocation(g) for g in self.anchors], self.full,
                                                    desc="uniform anchors")
                self.promoted.extend(r.summary(algorithm.n_gen) for r in recs)
            done = {r["key"] for r in self.promoted}
            fresh = [i for i in sorted(front, key=lambda i: F[i, 1])
                     if self.evaluator.key(self.space.allocation(pop[i].X), self.full) not in done]
            for i in spread(fresh, self.promote):
                rec = self.evaluator.evaluate(self.space.allocation(pop[i].X), self.full)
                self.promoted.append(rec.summary(algorithm.n_gen))
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


def level_agreement(low: list[dict], full: list[dict]) -> dict:
    """Rank agreement of the low and the full level on the allocations scored at both (the anchors
    and the promoted ones): the evidence for letting the low level choose whom to promote."""
    by_alloc = {(tuple(r["bits"]), tuple(r["ranks"])): r["objective"] for r in low if not r["failed"]}
    pairs = [(by_alloc[a], r["objective"]) for r in full if not r["failed"]
             and (a := (tuple(r["bits"]), tuple(r["ranks"]))) in by_alloc]
    if len(pairs) < 3:
        return {"allocations": len(pairs), "spearman": None, "kendall": None}
    x, y = zip(*pairs)
    return {"allocations": len(pairs), "spearman": float(spearmanr(x, y)[0]), "kendall": float(kendalltau(x, y)[0])}


def search(profile: Profile, evaluator: ProxyEvaluator, sensitivity: PhaseI) -> PhaseII:
    """Run NSGA-II; returns the Phase II result (see module docstring)."""
    cfg = profile.nsga
    space = space_for(profile, evaluator.shapes, sensitivity)
    full = full_level(profile)
    two_levels = cfg.low_steps > 0
    level = low_level(profile, cfg) if two_levels else full
    recorder = _Recorder(space, evaluator, level, full, cfg.promote, uniform_anchors(profile, space))
    scored: list[dict] = []

    def score(allocations):
        recs = evaluator.evaluate_many(allocations, level, desc=f"generation {recorder.generation}")
        scored.extend(r.summary(recorder.generation) for r in recs)
        return [min(r.objective, FAILED_LOSS) for r in recs]

    first = first_generation(profile, space)
    algorithm = NSGA2(pop_size=cfg.pop_size, sampling=np.array([g for _, g in first]),
                      crossover=BlockCrossover(cfg.crossover_prob),
                      mutation=NeighbourMutation(cfg.mutation_prob),
                      repair=BudgetRepair(space), eliminate_duplicates=True)
    t0 = time.time()
    minimize(AllocationProblem(space, score), algorithm, ("n_gen", cfg.generations), seed=cfg.seed,
             callback=recorder, verbose=False)
    full_records = [r for r in scored if r["level"] == full.name] + recorder.promoted
    curve, norm = hv_curve(recorder.generations)
    for g, hv in zip(recorder.generations, curve):
        g["hv"] = hv
    unique = {r["key"]: r for r in scored + full_records}
    return PhaseII(
        search_level=level.name, levels={level.name: level, full.name: full},
        budget_bytes=space.budget,
        first_generation=[{"origin": label, "key": evaluator.key(space.allocation(g), level),
                           "bits": space.allocation(g).bits, "ranks": space.allocation(g).ranks,
                           "budget_ratio": space.bytes(g) / space.budget} for label, g in first],
        anchors=[{"origin": uniform_label(a.bits[0], a.ranks[0]), "key": evaluator.key(a, full)}
                 for a in map(space.allocation, recorder.anchors)] if two_levels else [],
        evaluations=scored, promoted=recorder.promoted, generations=recorder.generations, hv_normalization=norm,
        pareto=pareto_set(full_records),
        level_agreement=level_agreement(scored, recorder.promoted) if two_levels else None,
        train_tokens=sum(r["train_tokens"] for r in unique.values()), n_unique_evaluations=len(unique),
        # what the scores cost when computed (a resumed run reads most from the cache)
        proxy_seconds=round(sum(r["seconds"] for r in unique.values()), 1), wall_seconds=round(time.time() - t0, 1))


def config(profile: Profile, evaluator: ProxyEvaluator, sensitivity_key: str) -> dict:
    """What Phase II's result depends on (keyed: Phase III's config cites the key)."""
    return keyed({"context": evaluator.context, "proxy": profile.proxy, "nsga": profile.nsga,
                  "ladders": [profile.bit_ladder, profile.rank_ladder],
                  "budget": [profile.budget_bits, profile.budget_rank], "sensitivity_key": sensitivity_key})


def run(profile: Profile, layout: Layout, evaluator: ProxyEvaluator, sensitivity: PhaseI,
        sensitivity_key: str) -> PhaseII:
    """Phase II for a profile; reuses the layout's nsga.json while its config matches."""
    return PhaseII.from_dict(cached(layout.nsga, config(profile, evaluator, sensitivity_key),
                                    lambda: search(profile, evaluator, sensitivity)))
