"""The QR-Adaptor search: Phase I (sensitivity) -> Phase II (NSGA-II) -> Phase III (BO).

`run(profile, layout, base, tok)` runs all three, each reusing its artifact while its config matches,
and returns (and writes to search.json) a SearchResult: the selected allocation at each budget and
what the search cost. Later stages read it back with `load_result(layout)`; they never search.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from ...config import Profile, TrainConfig
from ...errors import QRError
from ...layout import Layout
from ...store import cached, read_artifact, stored_result
from .. import sensitivity
from ..allocation import Allocation
from ..phases import PhaseI, PhaseII, PhaseIII, Phases
from ..proxy import ProxyEvaluator, ProxyLevel, epoch_tokens, full_level
from ..runner import SERIAL, Runner
from . import bo, nsga
from .problem import budget_rank_rung, level_bytes, space_for


@dataclass(frozen=True)
class Selection:
    """The best full-level proxy score within one budget (average bits at the budget's rank)."""
    allocation: Allocation
    max_budget_ratio: float
    scored_for_selection: bool     # no full-level score fitted, so its best low-level one was scored
    record: dict                   # the proxy record (Evaluation.summary) it was chosen by

    def to_dict(self) -> dict:
        return {"allocation": self.allocation.to_dict(), "max_budget_ratio": self.max_budget_ratio,
                "scored_for_selection": self.scored_for_selection, "record": self.record}

    @classmethod
    def from_dict(cls, d: dict) -> "Selection":
        return cls(Allocation.from_dict(d["allocation"]), d["max_budget_ratio"], d["scored_for_selection"], d["record"])


@dataclass(frozen=True)
class SearchResult:
    """What search.json holds: the selection (Phase III's pick at the main budget), the selection at
    each budget from one front, the selection's proxy scores, and the cost of the search."""
    selected: Allocation
    selected_at: dict              # "<bits as float>" -> Selection, e.g. "4.0", "3.5"
    selected_scores: dict
    cost: dict
    # The phases behind it (sensitivity.json, nsga.json, bo.json), where they are whole: carried, not
    # written into search.json.
    phases: Phases | None = field(default=None, compare=False)

    def at(self, bits: float) -> Allocation:
        chosen = self.selected_at.get(str(float(bits)))
        if chosen is None:
            raise QRError(f"the search selected nothing at {bits} bits (it selected at {sorted(self.selected_at)}); "
                          "add the budget to the profile's select_at and rerun the search")
        return chosen.allocation

    def to_dict(self) -> dict:
        return {"selected": self.selected.to_dict(),
                "selected_at": {k: v.to_dict() for k, v in self.selected_at.items()},
                "selected_scores": self.selected_scores, "cost": self.cost}

    @classmethod
    def from_dict(cls, d: dict) -> "SearchResult":
        return cls(Allocation.from_dict(d["selected"]), {k: Selection.from_dict(v) for k, v in d["selected_at"].items()},
                   d["selected_scores"], d["cost"])


def load_result(layout: Layout) -> SearchResult:
    """The finished search of a layout, checksum-checked, with its phases where their artifacts are
    whole; a QRError that says how to run it otherwise."""
    record = read_artifact(layout.search, quiet=True)      # the error below says what to do
    if record is None:
        raise QRError(f"{layout.search} is missing or damaged; run the search first (notebook 04_bo_refinement or "
                      "`qr-adaptor search`)")
    parts = [stored_result(path) for path in (layout.sensitivity, layout.nsga, layout.bo)]
    phases = None if None in parts else Phases(PhaseI.from_dict(parts[0]), PhaseII.from_dict(parts[1]),
                                               PhaseIII.from_dict(parts[2]))
    return replace(SearchResult.from_dict(record["result"]), phases=phases)


def evaluator(profile: Profile, layout: Layout, base, tok, runner: Runner = SERIAL,
              progress: bool = True) -> ProxyEvaluator:
    """The proxy of a profile, scoring into the layout's evaluations/ through `runner`."""
    return ProxyEvaluator(profile, layout, base, tok, runner, progress)


def phase1(profile: Profile, layout: Layout, ev: ProxyEvaluator, progress: bool = True) -> PhaseI:
    return sensitivity.run(profile, layout, ev.base, ev.tok, progress)


def phase2(profile: Profile, layout: Layout, ev: ProxyEvaluator, progress: bool = True) -> PhaseII:
    return nsga.run(profile, layout, ev, phase1(profile, layout, ev, progress), sensitivity.config(profile)["key"])


def _phases(profile: Profile, layout: Layout, ev: ProxyEvaluator, progress: bool) -> tuple[Phases, dict]:
    """(Phase I, II and III results, and the keys that chain their configs), each read back or run."""
    keys = {"sensitivity": sensitivity.config(profile)["key"]}
    keys["nsga"] = nsga.config(profile, ev, keys["sensitivity"])["key"]
    keys["bo"] = bo.config(profile, keys["nsga"])["key"]
    p1 = phase1(profile, layout, ev, progress)
    p2 = nsga.run(profile, layout, ev, p1, keys["sensitivity"])
    p3 = bo.run(profile, layout, ev, space_for(profile, ev.shapes, p1), p2, keys["nsga"], progress)
    return Phases(p1, p2, p3), keys


def select_at(profile: Profile, ev: ProxyEvaluator, p1: PhaseI, p2: PhaseII, p3: PhaseIII) -> dict[str, Selection]:
    """The best full-level proxy score within each budget (profile.budget_bits and select_at, in
    average bits), from one front. A budget with no full-level score inside it gets its best
    low-level candidate scored at the full level, so every budget has a selection."""
    space = space_for(profile, ev.shapes, p1)
    rank_rung = budget_rank_rung(profile)
    out = {}
    for bits in (profile.budget_bits, *profile.select_at):
        ratio = level_bytes(space, bits, rank_rung) / space.budget
        rec, scored = bo.select(p3.observed, ratio), False
        if rec is None:
            low = bo.select(p2.evaluations, ratio)
            if low is None:
                raise QRError(f"nothing the search scored fits {bits} average bits; lower select_at or widen the "
                              "first generation (nsga.n_random)")
            rec, scored = ev.evaluate(space.allocation(space.genes(low)), full_level(profile)).summary(), True
        alloc = Allocation(rec["bits"], rec["ranks"], profile.bit_ladder, profile.rank_ladder,
                           name=f"QR-Adaptor at {bits} bits")
        out[str(float(bits))] = Selection(alloc, ratio, scored, rec)
    return out


def front_origins(p2: PhaseII, p3: PhaseIII) -> list[dict]:
    """Where the final front's points (Phase III's Pareto set, full level) were born: the first
    generation (by its seed kind: uniform, knapsack, random), a later NSGA-II generation (the first in
    which the allocation was scored at any level), or Phase III. One row per origin, with the number of
    front points and of allocations scored there: whether later generations and Phase III reach the front."""
    def alloc(r):
        return tuple(r["bits"]), tuple(r["ranks"])
    kinds = {"uniform": "uniform", "Phase I knapsack": "knapsack", "random": "random"}
    seeded = {alloc(r): next((v for k, v in kinds.items() if r["origin"].startswith(k)), "other")
              for r in p2.first_generation}
    born: dict = {}
    for r in p2.evaluations + p2.promoted:
        born[alloc(r)] = min(born.get(alloc(r), r["generation"]), r["generation"])
    bo_points = {alloc(r) for r in p3.candidates()}

    def origin(a):
        if a in bo_points and a not in born:
            return "Phase III (BO)"
        if born.get(a) == 1:
            return f"generation 1 ({seeded.get(a, 'offspring')})"
        return f"generation {born.get(a)}"
    rows: dict = {}
    for a in set(born) | bo_points:
        rows.setdefault(origin(a), {"origin": origin(a), "scored": 0, "on_final_front": 0})["scored"] += 1
    for r in p3.pareto:
        rows[origin(alloc(r))]["on_final_front"] += 1
    return sorted(rows.values(), key=lambda r: (r["origin"].startswith("Phase"), r["origin"]))


def phase3_gain(p2: PhaseII, p3: PhaseIII, max_ratio: float = 1.0) -> dict:
    """What Phase III changed within a budget (`max_ratio` x the main one): the best full-level proxy
    objective that fits before it (Phase II's records) and after it (with its candidates), and the
    difference (negative = Phase III found better). Whether that exceeds the proxy's seed noise is for
    the proxy check to say."""
    before = bo.select(p2.full_rows(), max_ratio)
    after = bo.select(p3.observed, max_ratio)
    return {"max_budget_ratio": max_ratio, "phase2_best": before["objective"] if before else None,
            "phase3_best": after["objective"] if after else None,
            "gain": after["objective"] - before["objective"] if before and after else None,
            "changed": before is None or after is None
            or (before["bits"], before["ranks"]) != (after["bits"], after["ranks"])}


def cited(p2: PhaseII, p3: PhaseIII) -> dict:
    """Every proxy record Phases II and III cite (their scored candidates, promotions and BO steps), by key."""
    return {r["key"]: r for r in p2.evaluations + p2.promoted + p3.candidates()}


def repair_records(layout: Layout, ev: ProxyEvaluator, p2: PhaseII, p3: PhaseIII) -> int:
    """Recompute every proxy record a finished search cites whose file is missing, damaged or edited
    (read_artifact names it in a warning): nsga.json and bo.json keep summaries, and the evaluations
    they cite are what the explorer and the compute-time table read. Returns how many were redone."""
    levels = {name: ProxyLevel(f["name"], TrainConfig(**f["train"]), f["n_val"])
              for name, f in p2.levels.items()}
    redone = 0
    for key, r in cited(p2, p3).items():
        if read_artifact(layout.evaluation(key)) is None:
            ev.evaluate(Allocation(r["bits"], r["ranks"], ev.profile.bit_ladder, ev.profile.rank_ladder),
                        levels[r["level"]])
            redone += 1
    return redone


def run(profile: Profile, layout: Layout, base, tok, runner: Runner = SERIAL, progress: bool = True) -> SearchResult:
    """Phase I -> II -> III, then the selections; candidates are scored through `runner`. A variant
    search (other ladders) runs in layout.variant(<method>), sharing Phase I and the evaluations."""
    ev = evaluator(profile, layout, base, tok, runner, progress)
    phases, keys = _phases(profile, layout, ev, progress)
    p1, p2, p3 = phases.sensitivity, phases.nsga, phases.bo
    repair_records(layout, ev, p2, p3)

    def compute() -> dict:
        chosen = p3.selected
        selected_at = select_at(profile, ev, p1, p2, p3)
        # Cost from the records themselves, so a resumed search still reports what its scores cost.
        unique = cited(p2, p3) | {v.record["key"]: v.record for v in selected_at.values() if v.scored_for_selection}
        tokens = sum(r["train_tokens"] for r in unique.values())
        proxy_seconds = sum(r["seconds"] for r in unique.values())
        epoch = epoch_tokens(ev.train_set, ev.tok, profile.proxy.max_len)
        return SearchResult(
            selected=Allocation(chosen["bits"], chosen["ranks"], profile.bit_ladder, profile.rank_ladder,
                                name="QR-Adaptor"),
            selected_at=selected_at,
            selected_scores={k: chosen[k] for k in ("objective", "metric", "val_loss", "accuracy", "budget_ratio",
                                                    "avg_bits", "mean_rank")},
            cost={"phase1_seconds": p1.seconds, "proxy_seconds": round(proxy_seconds, 1),
                  "total_seconds": round(p1.seconds + proxy_seconds, 1),
                  "unique_evaluations": len(unique),
                  "by_level": {f: sum(r["level"] == f for r in unique.values()) for f in ("low", "full")},
                  "search_train_tokens": tokens, "epoch_tokens": epoch, "epoch_equivalents": tokens / epoch},
        ).to_dict()
    config = {**keys, "profile": profile.name}
    return replace(SearchResult.from_dict(cached(layout.search, config, compute)), phases=phases)
