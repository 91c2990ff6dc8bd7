"""The search problem in pymoo's terms: genes, objectives, the budget, and the paper's operators.

An individual is 2 integer genes per block: (bit-ladder index, rank-ladder index). Objectives
(both minimized): the proxy fine-tune's objective (fitness.py), and block bytes / budget. Constraint:
bytes / budget - 1 <= 0. Operators: layer-wise crossover (a block's pair is inherited whole),
neighbour mutation (one rung up or down), and a greedy repair that downgrades, one rung at a time,
whatever loses the least sensitivity per byte saved until the child fits the budget.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pymoo.core.crossover import Crossover
from pymoo.core.mutation import Mutation
from pymoo.core.problem import Problem
from pymoo.core.repair import Repair
from pymoo.core.sampling import Sampling
from pymoo.indicators.hv import HV
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

from ..allocation import UNQUANTIZED, Allocation, uniform
from ..errors import QRError
from ..memory import block_bytes


@dataclass(frozen=True)
class SearchSpace:
    """What the operators need to know: ladders, block bytes per (bits, rank), sensitivity per bits."""
    bit_ladder: tuple
    rank_ladder: tuple
    cost: np.ndarray        # [block, bit index, rank index] -> formula bytes (weights + LoRA)
    kl: np.ndarray          # [block, bit index] -> KL lost by quantizing the block alone to that rung
    budget: float           # bytes
    rank_weight: float      # how much KL a block loses per unit fraction of its rank removed

    @property
    def n_blocks(self) -> int:
        return self.cost.shape[0]

    @property
    def upper(self) -> np.ndarray:
        return np.array([len(self.bit_ladder) - 1, len(self.rank_ladder) - 1] * self.n_blocks)

    def bytes(self, genes) -> float:
        g = np.asarray(genes, dtype=int)
        return float(self.cost[np.arange(self.n_blocks), g[0::2], g[1::2]].sum())

    def genes(self, record: dict) -> np.ndarray:
        """Genes of a record (or anything with "bits" and "ranks" lists) on this space's ladders."""
        return np.array([x for b, r in zip(record["bits"], record["ranks"])
                         for x in (self.bit_ladder.index(b), self.rank_ladder.index(r))])

    def allocation(self, genes, name: str = "") -> Allocation:
        return Allocation.from_genes(genes, self.bit_ladder, self.rank_ladder, name=name)


def kl_by_rung(kl_by_bits: dict, bit_ladder, n_blocks: int) -> np.ndarray:
    """KL per block for every rung of the bit ladder. Unprofiled rungs are estimated from the
    nearest profiled lower rung: each extra bit quarters the quantization noise power, and KL is
    about proportional to it for small noise. Unquantized blocks lose nothing."""
    profiled = {int(b): np.asarray(v, dtype=float) for b, v in kl_by_bits.items()}
    if not profiled:
        raise QRError("the sensitivity profile is empty; run Phase I (qr_lib.sensitivity.run) first")
    for b, v in profiled.items():
        if len(v) != n_blocks:
            raise QRError(f"the sensitivity profile has {len(v)} blocks at {b} bits but the model has "
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


def search_space(shapes, qcfg, bit_ladder, rank_ladder, kl_by_bits: dict, budget: float,
                 rank_weight: float = 0.02) -> SearchSpace:
    bit_ladder, rank_ladder = tuple(sorted(bit_ladder)), tuple(sorted(rank_ladder))
    n = shapes.n_blocks
    cost = np.zeros((n, len(bit_ladder), len(rank_ladder)))
    for j, b in enumerate(bit_ladder):
        for k, r in enumerate(rank_ladder):
            per_block = block_bytes(shapes, uniform(n, b, r, bit_ladder, rank_ladder), qcfg)
            cost[:, j, k] = [blk["total"] for blk in per_block]
    space = SearchSpace(bit_ladder, rank_ladder, cost, kl_by_rung(kl_by_bits, bit_ladder, n),
                        float(budget), rank_weight)
    floor = space.bytes(np.zeros(2 * n, dtype=int))
    if floor > budget:
        raise QRError(f"even every block at {bit_ladder[0]} bits and rank {rank_ladder[0]} needs "
                      f"{floor / 2**20:.1f} MiB, over the budget of {budget / 2**20:.1f} MiB; raise "
                      "budget_bits/budget_rank or add lower rungs to the ladders")
    return space


def _moves(space: SearchSpace, g: np.ndarray, direction: int):
    """Every one-rung move (gene index, sensitivity changed, bytes changed) of allocation `g`:
    downgrades (direction -1) lose sensitivity, upgrades (+1) recover it. A bit move changes the
    block's KL (Phase I); a rank move is charged rank_weight x the block's lowest-bit KL x the
    fraction of rank it changes (fragile blocks need their adapters more)."""
    out = []
    for i in range(space.n_blocks):
        b, r = g[2 * i], g[2 * i + 1]
        nb, nr = b + direction, r + direction
        if 0 <= nb < len(space.bit_ladder):
            lo, hi = min(b, nb), max(b, nb)
            out.append((2 * i, max(space.kl[i, lo] - space.kl[i, hi], 0.0),
                        abs(space.cost[i, nb, r] - space.cost[i, b, r])))
        if 0 <= nr < len(space.rank_ladder):
            lo, hi = min(r, nr), max(r, nr)
            fraction = 1 - space.rank_ladder[lo] / space.rank_ladder[hi]
            out.append((2 * i + 1, space.rank_weight * space.kl[i, 0] * fraction,
                        abs(space.cost[i, b, nr] - space.cost[i, b, r])))
    return out


def repair(space: SearchSpace, genes) -> np.ndarray:
    """Greedy downgrades until the allocation fits: each step takes the one-rung move (bits or
    rank, any block) with the least sensitivity lost per byte saved."""
    g = np.asarray(genes, dtype=int).copy()
    while space.bytes(g) > space.budget:
        gene, _, _ = min(_moves(space, g, -1), key=lambda m: m[1] / max(m[2], 1.0))
        g[gene] -= 1  # search_space() checked that the all-minimum allocation fits, so a move exists
    return g


def fill(space: SearchSpace, genes) -> np.ndarray:
    """Greedy upgrades while the budget allows: each step takes the affordable one-rung move with
    the most sensitivity recovered per byte spent (the mirror of repair)."""
    g = repair(space, genes)
    while True:
        room = space.budget - space.bytes(g)
        moves = [m for m in _moves(space, g, +1) if m[2] <= room]
        if not moves:
            return g
        gene, _, _ = max(moves, key=lambda m: m[1] / max(m[2], 1.0))
        g[gene] += 1


class BudgetRepair(Repair):
    def __init__(self, space: SearchSpace):
        super().__init__()
        self.space = space

    def _do(self, problem, X, **kwargs):
        return np.array([repair(self.space, x) for x in X])


class SeededSampling(Sampling):
    """The Phase I seed plus jittered copies of it (each gene moves one rung with prob. `jitter`)."""

    def __init__(self, seed_genes, jitter: float, space: SearchSpace):
        super().__init__()
        self.seed_genes, self.jitter, self.space = np.asarray(seed_genes, dtype=int), jitter, space

    def _do(self, problem, n_samples, *args, random_state=None, **kwargs):
        out = [repair(self.space, self.seed_genes)]
        for _ in range(50 * n_samples):  # jitter until the population is distinct (or give up)
            if len(out) == n_samples:
                break
            step = random_state.choice([-1, 1], size=problem.n_var)
            moved = random_state.random(problem.n_var) < self.jitter
            x = repair(self.space, np.clip(self.seed_genes + step * moved, 0, problem.xu))
            if not any(np.array_equal(x, y) for y in out):
                out.append(x)
        while len(out) < n_samples:
            out.append(out[-1])
        return np.array(out)


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
