"""The search's three phase records, typed: what sensitivity.json, nsga.json and bo.json hold.

Each is built from its artifact's result (`from_dict`, strict: a missing or unknown field is an error)
and written back by `to_dict`, the JSON form, so a record read back equals the one computed. Rows inside
them (one scored candidate each: proxy.Evaluation.summary; a generation; a BO step) stay dicts: they
are the rows of the search's tables.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import QRError
from ..store import to_jsonable


class _Record:
    """from_dict / to_dict for a flat dataclass of JSON values."""

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        if set(d) != names:
            raise QRError(f"a {cls.__name__} record has fields {sorted(d)}, expected {sorted(names)}: it was "
                          "written by another version of qr_lib; delete it and rerun the search")
        return cls(**d)

    def to_dict(self) -> dict:
        return {f.name: to_jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class PhaseI(_Record):
    """Phase I (sensitivity.json): the KL of the model's output when one block is quantized."""
    bits: list                     # the bit-widths measured
    kl: dict                       # "<bits>" -> [KL per block]
    seconds: float                 # when computed
    n_texts: int                   # calibration passages

    @property
    def n_blocks(self) -> int:
        return len(self.kl[str(self.bits[0])])


@dataclass(frozen=True)
class PhaseII(_Record):
    """Phase II (nsga.json): every candidate NSGA-II scored, its generations and its Pareto set."""
    search_level: str              # the level that ranked children ("low", or "full" alone)
    levels: dict                   # name -> proxy.ProxyLevel (its JSON form)
    budget_bytes: float
    first_generation: list         # {origin, key, bits, ranks, budget_ratio} per seeded allocation
    anchors: list                  # the uniform allocations scored at the full level too: {origin, key}
    evaluations: list              # rows scored at the search level
    promoted: list                 # rows re-scored at the full level
    generations: list              # {generation, front, F, hv}
    hv_normalization: dict
    pareto: list                   # full-level rows on the front: what Phase III refines
    level_agreement: dict | None   # rank agreement of the low and full levels (None: one level)
    train_tokens: int
    n_unique_evaluations: int
    proxy_seconds: float           # what the scores cost when computed
    wall_seconds: float

    def full_rows(self) -> list[dict]:
        """Every distinct allocation scored at the full level (searched or promoted) that did not fail."""
        return list({r["key"]: r for r in self.evaluations + self.promoted
                     if r["level"] == "full" and not r["failed"]}.values())


@dataclass(frozen=True)
class PhaseIII(_Record):
    """Phase III (bo.json): the Bayesian refinement's steps, what it observed, and its pick."""
    steps: list                    # {iteration, n_candidates, max_ei, gp, candidate, observed_utility} or a stop
    selected: dict | None          # the best row within the budget
    observed: list                 # full-level rows within the budget, with their utility
    pareto: list
    alpha: float                   # the utility's weight on the proxy score
    informative: bool              # whether the GP modelled the landscape (diagnosis says why)
    diagnosis: str
    train_tokens: int
    wall_seconds: float

    def candidates(self) -> list[dict]:
        """The rows Phase III scored itself, in order."""
        return [s["candidate"] for s in self.steps if "candidate" in s]


@dataclass(frozen=True)
class Phases:
    """The three phases of one search, as SearchResult carries them."""
    sensitivity: PhaseI
    nsga: PhaseII
    bo: PhaseIII
