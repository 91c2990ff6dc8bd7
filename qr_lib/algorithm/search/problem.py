"""The search problem in pymoo's terms: genes, objectives, the budget, and the paper's operators.

An individual is 2 integer genes per block: (bit-ladder index, rank-ladder index). Objectives
(both minimized): the proxy fine-tune's objective (proxy.py), and block bytes / budget. Constraint:
bytes / budget - 1 <= 0. Operators: layer-wise crossover (a block's pair is inherited whole),
neighbour mutation (one rung up or down), and a repair that touches only what is over the budget.

No weight here is invented. Phase I measures what each bit rung costs a block (KL); it measures
nothing about rank, so nothing converts a rank rung into KL: the Phase I seeds are knapsack optima of
the additive KL at a fixed rank, and the repair downgrades random rungs (selection, not a guessed
exchange rate, decides which allocations survive).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pymoo.core.crossover import Crossover
from pymoo.core.mutation import Mutation
from pymoo.core.problem import Problem
from pymoo.core.repair import Repair
from pymoo.indicators.hv import HV
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

from ...config import UNQUANTIZED, Profile
from ...errors import QRError
from ..allocation import Allocation, uniform
from ..memory import block_bytes, profile_budget
from ..phases import PhaseI


@dataclass(frozen=True)
class SearchSpace:
    """What the operators need to know: ladders, block bytes per (bits, rank), sensitivity per bits."""
    bit_ladder: tuple
    rank_ladder: tuple
    cost: np.ndarray        # [block, bit index, rank index] -> formula bytes (weights + LoRA)
    kl: np.ndarray          # [block, bit index] -> KL lost by quantizing the block alone to that rung
    budget: float           # bytes

    @property
    def n_blocks(self) -> int:
        return self.cost.shape[0]

    @property
    def upper(self) -> np.ndarray:
        return np.array([len(self.bit_ladder) - 1, len(self.rank_ladder) - 1] * self.n_blocks)

    def bytes(self, genes) -> float:
        g = np.asarray(genes, dtype=int)
        return float(self.cost[np.arange(self.n_blocks), g[0::2], g[1::2]].sum())

    def genes(self, record) -> np.ndarray:
        """Genes of an Allocation, or of a record with "bits" and "ranks" lists, on this space's ladders
        (Allocation.to_genes is the one encoding)."""
        if not isinstance(record, Allocation):
            record = Allocation(record["bits"], record["ranks"], self.bit_ladder, self.rank_ladder)
        return np.array(record.to_genes())

    def allocation(self, genes, name: str = "") -> Allocation:
        return Allocation.from_genes(genes, self.bit_ladder, self.rank_ladder, name=name)


def kl_by_rung(kl_by_bits: dict, bit_ladder, n_blocks: int) -> np.ndarray:
    """KL per block for every rung of the bit ladder. Unprofiled rungs are estimated from the
    nearest profiled lower rung: each extra bit quarters the quantization noise power, and KL is
    about proportional to it for small noise. Unquantized blocks lose nothing."""
    profiled = {int(b): np.asarray(v, dtype=float) for b, v in kl_by_bits.items()}
    if not profiled:
        raise QRError("Phase I's KL scores are empty; run Phase I (qr_lib.algorithm.sensitivity.run) first")
    for b, v in profiled.items():
        if len(v) != n_blocks:
            raise QRError(f"Phase I's KL scores have {len(v)} blocks at {b} bits but the model has "
                          f"{n_blocks}; rerun Phase I for this model")
    out = np.zeros((n_blocks, len(bit_ladder)))
    for j, b in enumerate(bit_ladder):
        if b == UNQUANTIZED:
            continue
        if b in profiled:
            out[:, j] = profiled[b]
            continue
        below = [p for p in profiled if p < b]
        ref = max(below) if below else min(profiled)
        out[:, j] = profiled[ref] * 4.0 ** (ref - b)
    return out


def budget_rank_rung(profile: Profile) -> int:
    """The budget's rank as an index on the sorted rank ladder (profiles.validate checked it is there)."""
    return tuple(sorted(profile.rank_ladder)).index(profile.budget_rank)


def space_for(profile: Profile, shapes, sensitivity: PhaseI | None) -> SearchSpace:
    """The search space of a profile: its ladders, its budget and the Phase I profile (None: memory
    alone, every KL 0, as the random allocations and the work estimate need)."""
    return search_space(shapes, profile.quant, profile.bit_ladder, profile.rank_ladder,
                        None if sensitivity is None else sensitivity.kl, profile_budget(profile, shapes))


def search_space(shapes, qcfg, bit_ladder, rank_ladder, kl_by_bits: dict | None, budget: float) -> SearchSpace:
    """kl_by_bits=None: a space for memory alone (random allocations), every KL 0."""
    bit_ladder, rank_ladder = tuple(sorted(bit_ladder)), tuple(sorted(rank_ladder))
    n = shapes.n_blocks
    cost = np.zeros((n, len(bit_ladder), len(rank_ladder)))
    for j, b in enumerate(bit_ladder):
        for k, r in enumerate(rank_ladder):
            per_block = block_bytes(shapes, uniform(n, b, r, bit_ladder, rank_ladder), qcfg)
            cost[:, j, k] = [blk["total"] for blk in per_block]
    kl = np.zeros((n, len(bit_ladder))) if kl_by_bits is None else kl_by_rung(kl_by_bits, bit_ladder, n)
    space = SearchSpace(bit_ladder, rank_ladder, cost, kl, float(budget))
    floor = space.bytes(np.zeros(2 * n, dtype=int))
    if floor > budget:
        raise QRError(f"even every block at {bit_ladder[0]} bits and rank {rank_ladder[0]} needs "
                      f"{floor / 2**20:.1f} MiB, over the budget of {budget / 2**20:.1f} MiB; raise "
                      "budget_bits/budget_rank or add lower rungs to the ladders")
    return space


def uniform_genes(space: SearchSpace, bit_rung: int, rank_rung: int) -> np.ndarray:
    return np.array([bit_rung, rank_rung] * space.n_blocks)


def uniform_label(bits: int, rank: int) -> str:
    """How a uniform allocation is named in the search's records (plots read the "uniform " prefix)."""
    return f"uniform {bits}-bit r{rank}"


def knapsack(space: SearchSpace, budget: float, rank_rung: int) -> np.ndarray:
    """The allocation with the least total Phase I KL whose bytes fit `budget`, every block at rank
    rung `rank_rung`: a multiple-choice knapsack, solved exactly by dynamic programming over the
    partial allocations that no other beats in both bytes and KL (a few thousand at most: blocks of
    one shape differ only in how many sit at each rung)."""
    n, nb = space.n_blocks, len(space.bit_ladder)
    cost = space.cost[:, :, rank_rung]
    if cost[:, 0].sum() > budget:
        raise QRError(f"no allocation at rank {space.rank_ladder[rank_rung]} fits {budget / 2**20:.1f} MiB, "
                      "not even every block at the lowest bits; raise the budget or lower the rank")
    used, kl, picks = np.zeros(1), np.zeros(1), np.zeros((1, 0), dtype=int)
    for i in range(n):
        used = (used[:, None] + cost[i][None, :]).ravel()
        kl = (kl[:, None] + space.kl[i][None, :]).ravel()
        picks = np.column_stack([np.repeat(picks, nb, axis=0), np.tile(np.arange(nb), len(picks))])
        order = np.lexsort((kl, used))
        order = order[used[order] <= budget]
        used, kl, picks = used[order], kl[order], picks[order]
        best_before = np.minimum.accumulate(np.concatenate([[np.inf], kl[:-1]]))
        keep = kl < best_before             # more bytes only if they buy less KL
        used, kl, picks = used[keep], kl[keep], picks[keep]
    genes = np.full(2 * n, rank_rung)
    genes[0::2] = picks[-1]                 # the last kept state has the least KL
    return genes


def repair(space: SearchSpace, genes, rng=None) -> np.ndarray:
    """Random one-rung downgrades (bits or rank, any block) until the allocation fits; a feasible
    allocation is returned unchanged."""
    rng = rng if rng is not None else np.random.default_rng(0)
    g = np.asarray(genes, dtype=int).copy()
    while space.bytes(g) > space.budget:
        g[rng.choice(np.flatnonzero(g > 0))] -= 1   # search_space() checked the all-minimum fits
    return g


def random_allocation(space: SearchSpace, budget: float, rng) -> np.ndarray:
    """A random allocation that spends `budget`: random genes, random downgrades until it fits, then
    random one-rung upgrades while one still fits. Its bytes lie within one rung's step below
    `budget`: the memory-matched chance baseline of a searched allocation."""
    g = rng.integers(0, space.upper + 1)
    while space.bytes(g) > budget:
        g[rng.choice(np.flatnonzero(g > 0))] -= 1
    while True:
        up = [i for i in np.flatnonzero(g < space.upper) if space.bytes(g + np.eye(len(g), dtype=int)[i]) <= budget]
        if not up:
            return g
        g[rng.choice(up)] += 1


def check_budget(bits, bit_ladder) -> None:
    """A budget in average bits is a number within the bit ladder (level_bytes interpolates between rungs)."""
    lo, hi = min(bit_ladder), max(bit_ladder)
    if not (isinstance(bits, (int, float)) and not isinstance(bits, bool) and lo <= bits <= hi):
        raise QRError(f"a budget of {bits!r} average bits lies outside bit_ladder {sorted(bit_ladder)}; choose a "
                      f"number between {lo} and {hi}")


def check_ranks(rank_ladder, budget_rank) -> None:
    """A rank ladder of positive integers that holds the budget's rank."""
    bad = [r for r in rank_ladder if not (isinstance(r, int) and not isinstance(r, bool) and r > 0)]
    if bad:
        raise QRError(f"rank_ladder holds {bad}; ranks are positive integers, e.g. [4, 8, 16]")
    if budget_rank not in rank_ladder:
        raise QRError(f"budget_rank {budget_rank} is not on rank_ladder {list(rank_ladder)}")


def level_bytes(space: SearchSpace, bits: float, rank_rung: int) -> float:
    """The memory of `bits` average bits at `rank_rung`: a uniform allocation's bytes when `bits` is a
    rung, linear between the neighbouring rungs otherwise (3.5 bits = halfway from 3 to 4)."""
    check_budget(bits, space.bit_ladder)
    rungs = list(space.bit_ladder)
    return float(np.interp(bits, rungs, [space.bytes(uniform_genes(space, j, rank_rung)) for j in range(len(rungs))]))


def memory_levels(space: SearchSpace, rank_rung: int) -> list[float]:
    """The memory range the first generation covers: each uniform allocation at `rank_rung` (the
    budget's rank) that fits the budget, and the midpoints between consecutive ones (2, 2.5, 3, 3.5
    and 4 bits at rank 8 under the default 4-bit budget)."""
    points = [space.bytes(uniform_genes(space, j, rank_rung)) for j in range(len(space.bit_ladder))]
    points = [p for p in points if p <= space.budget]
    return sorted(points + [(a + b) / 2 for a, b in zip(points, points[1:])])


def initial_population(space: SearchSpace, rank_rung: int, n_random: int, rng) -> list[tuple[str, np.ndarray]]:
    """The first generation, spanning the memory range rather than one point: every uniform
    allocation that fits the budget, the Phase I knapsack optimum at the budget for each rank rung that
    fits at all and at every memory level (memory_levels) at `rank_rung` (the budget's rank), and
    `n_random` random allocations spread over those levels. Labelled by origin; duplicates are dropped
    (the first label stays)."""
    members = []
    for j, b in enumerate(space.bit_ladder):
        for k, r in enumerate(space.rank_ladder):
            g = uniform_genes(space, j, k)
            if space.bytes(g) <= space.budget:
                members.append((uniform_label(b, r), g))
    for k, r in enumerate(space.rank_ladder):
        if space.bytes(uniform_genes(space, 0, k)) <= space.budget:
            members.append((f"Phase I knapsack r{r} at the budget", knapsack(space, space.budget, k)))
    levels, k = memory_levels(space, rank_rung), rank_rung
    for level in levels:
        members.append((f"Phase I knapsack r{space.rank_ladder[k]} at {level / space.budget:.2f} x budget",
                        knapsack(space, level, k)))
    for i in range(n_random):
        level = levels[i % len(levels)]
        members.append((f"random at {level / space.budget:.2f} x budget", random_allocation(space, level, rng)))
    seen, out = set(), []
    for label, g in members:
        if tuple(g) not in seen:
            seen.add(tuple(g))
            out.append((label, g))
    return out


class BudgetRepair(Repair):
    def __init__(self, space: SearchSpace):
        super().__init__()
        self.space = space

    def _do(self, problem, X, random_state=None, **kwargs):
        return np.array([repair(self.space, x, random_state) for x in X])


class BlockCrossover(Crossover):
    """Uniform crossover over blocks: each child block takes one parent's (bits, rank) pair whole."""

    def __init__(self, prob: float = 0.9):
        super().__init__(2, 2, prob=prob)

    def _do(self, problem, X, *args, random_state=None, **kwargs):
        _, n_matings, n_var = X.shape
        swap = random_state.random((n_matings, n_var // 2)) < 0.5
        swap = np.repeat(swap, 2, axis=1)
        a, b = X[0].copy(), X[1].copy()
        a[swap], b[swap] = X[1][swap], X[0][swap]
        return np.stack([a, b])


class NeighbourMutation(Mutation):
    """Each block mutates with prob. `block_prob`: its bits or its rank moves one rung up or down."""

    def __init__(self, block_prob: float):
        super().__init__()
        self.block_prob = block_prob

    def _do(self, problem, X, *args, random_state=None, **kwargs):
        X = X.copy()
        n, n_var = X.shape
        for row in range(n):
            for blk in np.flatnonzero(random_state.random(n_var // 2) < self.block_prob):
                gene = 2 * blk + random_state.integers(2)
                step = random_state.choice([-1, 1])
                if not 0 <= X[row, gene] + step <= problem.xu[gene]:
                    step = -step
                X[row, gene] = np.clip(X[row, gene] + step, 0, problem.xu[gene])
        return X


class AllocationProblem(Problem):
    """Minimize (proxy objective, bytes / budget) subject to bytes <= budget.
    `score(list[Allocation]) -> list[float]` returns the proxy objectives."""

    def __init__(self, space: SearchSpace, score):
        super().__init__(n_var=2 * space.n_blocks, n_obj=2, n_ieq_constr=1, xl=0, xu=space.upper,
                         vtype=int)
        self.space, self.score = space, score

    def _evaluate(self, X, out, *args, **kwargs):
        X = np.asarray(X, dtype=int)
        losses = self.score([self.space.allocation(x) for x in X])
        ratio = np.array([self.space.bytes(x) / self.space.budget for x in X])
        out["F"] = np.column_stack([losses, ratio])
        out["G"] = (ratio - 1.0)[:, None]


def pareto_mask(points) -> np.ndarray:
    """True for the non-dominated rows of an (n, 2) array of minimized objectives."""
    points = np.asarray(points, dtype=float)
    mask = np.zeros(len(points), dtype=bool)
    if len(points):
        mask[NonDominatedSorting().do(points, only_non_dominated_front=True)] = True
    return mask


def pareto_set(records: list[dict]) -> list[dict]:
    """Non-dominated feasible, non-failed records (objective, budget_ratio), by memory."""
    ok = [r for r in records if r["budget_ratio"] <= 1 + 1e-12 and not r["failed"]]
    unique = list({r["key"]: r for r in ok}.values())
    mask = pareto_mask([[r["objective"], r["budget_ratio"]] for r in unique])
    return sorted((r for r, m in zip(unique, mask) if m), key=lambda r: r["budget_ratio"])


def hypervolume(points, ref) -> float:
    """2-D hypervolume (minimization) of `points` against reference point `ref` (pymoo's HV)."""
    points = np.asarray(points, dtype=float).reshape(-1, 2)
    inside = points[(points < np.asarray(ref)).all(axis=1)]
    return float(HV(ref_point=np.asarray(ref, dtype=float))(inside)) if len(inside) else 0.0
