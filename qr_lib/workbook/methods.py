"""What a final run fine-tunes: a method is a small JSON file in qr_lib/methods/ (or anywhere, by path).

A method names its allocation, quantization overrides and adapter kind. The allocation is one of six
kinds, each a typed spec parsed (and checked) when the method loads:

    {"bits": 4, "rank": 8}                        Uniform: every block the same (the baselines)
    {"shallow": [4, 16], "deep": [2, 16]}         Split: shallow half / deep half (the pilot's configs)
    "search" | {"search_at": 3.5}                 Searched: what the search selected (search.json)
    {"search": {"rank_ladder": [8]}}              Variant: a search with other top-level settings
    {"knapsack": {"bits": 4, "rank": 4}}          Knapsack: what Phase I alone would choose
    {"random": {"bits": 4, "draw": 0}}            Random: a memory-matched chance draw

Resolving a spec reads artifacts through the layout (the search's SearchResult, Phase I's profile);
it never runs a stage. A variant's search runs in notebook 04 (or `qr-adaptor search`) beside the
main one: `run_variant_searches`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import PACKAGE_DIR
from ..algorithm import search
from ..algorithm.adapters import ADAPTERS
from ..algorithm.allocation import Allocation, split, uniform
from ..algorithm.memory import ModelShapes
from ..algorithm.runner import SERIAL, Runner
from ..algorithm.search.problem import budget_rank_rung, knapsack, level_bytes, random_allocation, space_for
from ..config import Profile, QuantConfig
from ..errors import QRError
from ..layout import Layout
from ..store import stored_result

METHOD_DIR = PACKAGE_DIR / "methods"


@dataclass(frozen=True)
class Context:
    """What resolving an allocation may read: the profile, the model's shapes and the results folder."""
    profile: Profile
    shapes: ModelShapes
    layout: Layout


class Spec:
    """An allocation kind: `resolve` makes the allocation; `needs` names the artifact it is read from
    (path, what makes it), or None when the profile alone decides it."""

    def needs(self, layout: Layout) -> tuple[Path, str] | None:
        return None


@dataclass(frozen=True)
class Uniform(Spec):
    bits: int
    rank: int

    def resolve(self, ctx: Context, method: "Method") -> Allocation:
        p = ctx.profile
        return uniform(ctx.shapes.n_blocks, self.bits, self.rank, p.bit_ladder, p.rank_ladder, name=method.name)


@dataclass(frozen=True)
class Split(Spec):
    shallow: tuple
    deep: tuple
    boundary: int | None = None

    def resolve(self, ctx: Context, method: "Method") -> Allocation:
        p = ctx.profile
        return split(ctx.shapes.n_blocks, self.shallow, self.deep, self.boundary, p.bit_ladder, p.rank_ladder,
                     name=method.name)


@dataclass(frozen=True)
class Searched(Spec):
    bits: float | None = None      # None: Phase III's selection at the profile's budget

    def needs(self, layout: Layout) -> tuple[Path, str] | None:
        return layout.search, "the search (notebooks 02-04, or `qr-adaptor search`)"

    def resolve(self, ctx: Context, method: "Method") -> Allocation:
        result = search.load_result(ctx.layout)
        chosen = result.selected if self.bits is None else result.at(self.bits)
        return dataclasses.replace(chosen, name=method.name)


@dataclass(frozen=True)
class Variant(Spec):
    settings: dict                 # top-level profile settings the variant search changes

    def profile(self, profile: Profile) -> Profile:
        # A variant selects at the main budget only: its ladders may not reach the others.
        return dataclasses.replace(profile, select_at=(), **{k: tuple(v) if isinstance(v, list) else v
                                                             for k, v in self.settings.items()})

    def resolve(self, ctx: Context, method: "Method") -> Allocation:
        return dataclasses.replace(search.load_result(ctx.layout.variant(method.id)).selected, name=method.name)


@dataclass(frozen=True)
class Knapsack(Spec):
    bits: float
    rank: int

    def needs(self, layout: Layout) -> tuple[Path, str] | None:
        return layout.sensitivity, "Phase I (notebook 02, or `qr-adaptor sensitivity`)"

    def resolve(self, ctx: Context, method: "Method") -> Allocation:
        p = ctx.profile
        phase1 = stored_result(ctx.layout.sensitivity)
        if phase1 is None:
            raise QRError(f"{ctx.layout.sensitivity} is missing or damaged; method {method.id} needs Phase I first "
                          f"(notebook 02_sensitivity_profiling or `qr-adaptor sensitivity --profile {p.name}`)")
        if self.rank not in p.rank_ladder:
            raise QRError(f"method {method.id}: knapsack rank {self.rank} is not on the rank ladder "
                          f"{sorted(p.rank_ladder)}")
        space = space_for(p, ctx.shapes, phase1)
        level = level_bytes(space, self.bits, budget_rank_rung(p))
        return space.allocation(knapsack(space, level, space.rank_ladder.index(self.rank)), name=method.name)


@dataclass(frozen=True)
class Random(Spec):
    bits: float
    draw: int

    def resolve(self, ctx: Context, method: "Method") -> Allocation:
        p = ctx.profile
        space = space_for(dataclasses.replace(p, quant=method.quant_config(p)), ctx.shapes, None)
        level = level_bytes(space, self.bits, budget_rank_rung(p))
        genes = random_allocation(space, level, np.random.default_rng([int(self.draw), int(round(10 * self.bits))]))
        return space.allocation(genes, name=method.name)


def parse_allocation(method_id: str, spec):
    """The typed spec of a method file's "allocation" value, or a QRError naming the six kinds."""
    def bad(why: str):
        return QRError(f"method {method_id}: allocation {spec!r} {why}; write one of {{\"bits\": b, \"rank\": r}}, "
                       "{\"shallow\": [b, r], \"deep\": [b, r]}, \"search\", {\"search_at\": bits}, "
                       "{\"search\": {profile settings}}, {\"knapsack\": {\"bits\": b, \"rank\": r}}, "
                       "{\"random\": {\"bits\": b, \"draw\": k}} (docs/EXTENDING.md)")
    if spec == "search":
        return Searched()
    if not isinstance(spec, dict) or len(spec) == 0:
        raise bad("is none of the allocation kinds")
    kind = next(iter(spec))
    if "bits" in spec and "rank" in spec and set(spec) == {"bits", "rank"}:
        if not (isinstance(spec["bits"], int) and isinstance(spec["rank"], int)):
            raise bad("is a uniform allocation with bits and rank that are not both integers (per-block choices "
                      "are what the search selects)")
        return Uniform(spec["bits"], spec["rank"])
    if "shallow" in spec and "deep" in spec:
        return Split(tuple(spec["shallow"]), tuple(spec["deep"]), spec.get("boundary"))
    if kind == "search_at" and len(spec) == 1:
        return Searched(float(spec["search_at"]))
    if kind == "search" and len(spec) == 1 and isinstance(spec["search"], dict):
        fields = {f.name for f in dataclasses.fields(Profile)}
        unknown = sorted(set(spec["search"]) - fields)
        if unknown:
            raise QRError(f"method {method_id}: {unknown} are not profile fields; a variant search may set "
                          "top-level fields such as bit_ladder or rank_ladder")
        return Variant(dict(spec["search"]))
    if kind == "knapsack" and len(spec) == 1 and set(spec["knapsack"]) == {"bits", "rank"}:
        return Knapsack(spec["knapsack"]["bits"], spec["knapsack"]["rank"])
    if kind == "random" and len(spec) == 1 and set(spec["random"]) == {"bits", "draw"}:
        return Random(spec["random"]["bits"], int(spec["random"]["draw"]))
    raise bad("is none of the allocation kinds")


@dataclass(frozen=True)
class Method:
    id: str
    name: str
    allocation: object             # as the method file writes it; `spec` is its typed form
    quant: dict = field(default_factory=dict)
    adapter: str = "lora"
    multi_seed: bool = False
    benchmarks: bool = True        # False: test loss and perplexity only, no lm-eval (chance draws)
    description: str = ""

    def __post_init__(self):
        if self.adapter not in ADAPTERS:
            raise QRError(f"method {self.id}: adapter {self.adapter!r} is not one of {list(ADAPTERS)}")
        parse_allocation(self.id, self.allocation)

    @property
    def spec(self):
        return parse_allocation(self.id, self.allocation)

    def quant_config(self, profile: Profile) -> QuantConfig:
        return dataclasses.replace(profile.quant, **self.quant)

    def resolve(self, ctx: Context) -> Allocation:
        return self.spec.resolve(ctx, self)


def method_ids() -> list[str]:
    return sorted(p.stem for p in METHOD_DIR.glob("*.json"))


def load_method(method_id: str) -> Method:
    """A method by id (a file under qr_lib/methods/) or the path of a method JSON anywhere (its id is
    the file's stem)."""
    path = Path(method_id) if method_id.endswith(".json") else METHOD_DIR / f"{method_id}.json"
    if not path.exists():
        raise QRError(f"method {method_id!r} does not exist; choose one of {method_ids()} or give the path "
                      "of a method JSON (see docs/EXTENDING.md)")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise QRError(f"method file {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                      "fix the file") from None
    known = {f.name for f in dataclasses.fields(Method)} - {"id"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise QRError(f"{path}: unknown field(s) {unknown}; known: {sorted(known)}")
    return Method(id=path.stem, **values)


def check_prerequisites(profile: Profile, layout: Layout, methods: list[Method]) -> None:
    """Before any work: every artifact the methods' allocations are read from (a search, Phase I) is
    there and whole; one message names each missing one and the command that makes it. A variant's
    search and the allocations made from the profile alone need nothing."""
    missing = {}
    for m in methods:
        need = m.spec.needs(layout)
        if need is not None and stored_result(need[0]) is None:
            missing.setdefault(need, []).append(m.id)
    if missing:
        raise QRError("; ".join(f"{', '.join(ids)} need{'s' if len(ids) == 1 else ''} {how}, and {path} is missing "
                                f"or damaged" for (path, how), ids in missing.items())
                      + f" (profile {profile.name}); run that first, or drop the method")


def run_variant_searches(profile: Profile, layout: Layout, methods: list[Method], base, tok,
                         runner: Runner = SERIAL, progress: bool = True) -> None:
    """The search each variant method needs (its own ladders), in layout.variant(<method>), sharing
    Phase I and the proxy evaluations of the main search; finished ones are read back."""
    for m in methods:
        if isinstance(m.spec, Variant):
            search.run(m.spec.profile(profile), layout.variant(m.id), base, tok, runner, progress)
