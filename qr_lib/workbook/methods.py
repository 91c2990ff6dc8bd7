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
from ..algorithm.phases import PhaseI
from ..algorithm.quant import check_bits, get_backend
from ..algorithm.runner import SERIAL, Runner
from ..algorithm.search.problem import (budget_rank_rung, check_budget, check_ranks, knapsack, level_bytes,
                                        random_allocation, space_for)
from ..config import Profile, QuantConfig
from ..errors import QRError
from ..layout import Layout
from ..store import stored_result

METHOD_DIR = PACKAGE_DIR / "methods"


@dataclass(frozen=True)
class Context:
    """What resolving an allocation may read: the profile, the model's shapes and the results folder
    (None when a method is checked at load, where only the kinds the profile decides resolve)."""
    profile: Profile
    shapes: ModelShapes
    layout: Layout | None


class Spec:
    """An allocation kind: `resolve` makes the allocation; `needs` names the artifact it is read from
    (path, what makes it), or None when the profile alone decides it; `check` says, before any work,
    whether the profile can make it at all."""

    def needs(self, layout: Layout) -> tuple[Path, str] | None:
        return None

    def check(self, ctx: Context, method: "Method") -> None:
        """Kinds the profile alone decides are resolved now (against the block count and the ladders)
        and their bits checked against the method's backend; kinds read from an artifact override this."""
        _check_bits(method, method.quant_config(ctx.profile), set(self.resolve(ctx, method).bits))


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

    def check(self, ctx: Context, method: "Method") -> None:
        budgets = (ctx.profile.budget_bits, *ctx.profile.select_at)
        if self.bits is not None and float(self.bits) not in map(float, budgets):
            raise QRError(f"method {method.id}: search_at {self.bits} is not a budget the search selects at "
                          f"({list(budgets)}: budget_bits and select_at); add it to the profile's select_at")


@dataclass(frozen=True)
class Variant(Spec):
    settings: dict                 # top-level profile settings the variant search changes

    def profile(self, profile: Profile) -> Profile:
        # A variant selects at the main budget only: its ladders may not reach the others.
        return dataclasses.replace(profile, select_at=(), **{k: tuple(v) if isinstance(v, list) else v
                                                             for k, v in self.settings.items()})

    def resolve(self, ctx: Context, method: "Method") -> Allocation:
        return dataclasses.replace(search.load_result(ctx.layout.variant(method.id)).selected, name=method.name)

    def check(self, ctx: Context, method: "Method") -> None:
        variant = self.profile(ctx.profile)
        _check_bits(method, variant.quant, variant.bit_ladder)
        try:
            check_ranks(variant.rank_ladder, variant.budget_rank)
        except QRError as e:
            raise QRError(f"method {method.id}: its search's {e}; set both in the method's search settings") from None


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
        space = space_for(p, ctx.shapes, PhaseI.from_dict(phase1))
        level = level_bytes(space, self.bits, budget_rank_rung(p))
        return space.allocation(knapsack(space, level, space.rank_ladder.index(self.rank)), name=method.name)

    def check(self, ctx: Context, method: "Method") -> None:
        p = ctx.profile
        if self.rank not in p.rank_ladder:
            raise QRError(f"method {method.id}: knapsack rank {self.rank} is not on the rank ladder "
                          f"{sorted(p.rank_ladder)}; choose one of those")
        _check_budget(method, self.bits, p)


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

    def check(self, ctx: Context, method: "Method") -> None:
        _check_budget(method, self.bits, ctx.profile)
        super().check(ctx, method)


def _check_bits(method: "Method", qcfg: QuantConfig, bits) -> None:
    try:
        check_bits(get_backend(qcfg), bits)
    except QRError as e:
        raise QRError(f"method {method.id}: {e}") from None


def _check_budget(method: "Method", bits, profile: Profile) -> None:
    try:
        check_budget(bits, profile.bit_ladder)
    except QRError as e:
        raise QRError(f"method {method.id}: {e}") from None


def parse_allocation(method_id: str, spec):
    """The typed spec of a method file's "allocation" value, or a QRError naming the six kinds."""
    def bad(why: str):
        return QRError(f"method {method_id}: allocation {spec!r} {why}; write one of {{\"bits\": b, \"rank\": r}}, "
                       "{\"shallow\": [b, r], \"deep\": [b, r]}, \"search\", {\"search_at\": bits}, "
                       "{\"search\": {profile settings}}, {\"knapsack\": {\"bits\": b, \"rank\": r}}, "
                       "{\"random\": {\"bits\": b, \"draw\": k}} (docs/EXTENDING.md)")
    def integer(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def pair(v, what: str, min_rank: int) -> tuple:
        if not (isinstance(v, list) and len(v) == 2 and all(map(integer, v)) and v[0] > 0 and v[1] >= min_rank):
            raise bad(f"gives {what} {v!r}; it is one [bits, rank] pair of integers, bits > 0 and rank >= {min_rank}, "
                      "e.g. [4, 16] (per-block choices are what the search selects)")
        return tuple(v)
    if spec == "search":
        return Searched()
    if not isinstance(spec, dict) or len(spec) == 0:
        raise bad("is none of the allocation kinds")
    kind = next(iter(spec))
    if "bits" in spec and "rank" in spec and set(spec) == {"bits", "rank"}:
        return Uniform(*pair([spec["bits"], spec["rank"]], "a uniform (bits, rank)", 1))
    if "shallow" in spec and "deep" in spec and set(spec) <= {"shallow", "deep", "boundary"}:
        boundary = spec.get("boundary")
        if boundary is not None and not integer(boundary):
            raise bad(f"gives boundary {boundary!r}; it is the first deep block's index, an integer")
        # rank 0 leaves a half without adapters (a baseline); both halves at 0 would train nothing
        shallow, deep = pair(spec["shallow"], "shallow", 0), pair(spec["deep"], "deep", 0)
        if shallow[1] == deep[1] == 0:
            raise bad("has rank 0 in both halves, which trains nothing; give one half a rank of at least 1")
        return Split(shallow, deep, boundary)
    if kind == "search_at" and len(spec) == 1:
        if not isinstance(spec["search_at"], (int, float)) or isinstance(spec["search_at"], bool):
            raise bad("gives search_at as no number; it is a budget in average bits, e.g. 3.5")
        return Searched(float(spec["search_at"]))
    if kind == "search" and len(spec) == 1 and isinstance(spec["search"], dict):
        fields = {f.name for f in dataclasses.fields(Profile)}
        unknown = sorted(set(spec["search"]) - fields)
        if unknown:
            raise QRError(f"method {method_id}: {unknown} are not profile fields; a variant search may set "
                          "top-level fields such as bit_ladder or rank_ladder")
        return Variant(dict(spec["search"]))
    if kind == "knapsack" and len(spec) == 1 and isinstance(spec["knapsack"], dict) \
            and set(spec["knapsack"]) == {"bits", "rank"}:
        return Knapsack(spec["knapsack"]["bits"], spec["knapsack"]["rank"])
    if kind == "random" and len(spec) == 1 and isinstance(spec["random"], dict) \
            and set(spec["random"]) == {"bits", "draw"}:
        if not (integer(spec["random"]["draw"]) and spec["random"]["draw"] >= 0):
            raise bad("gives a draw that is not a non-negative integer; draws are numbered 0, 1, 2, ...")
        return Random(spec["random"]["bits"], spec["random"]["draw"])
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
        known = {f.name for f in dataclasses.fields(QuantConfig)}
        if not isinstance(self.quant, dict) or set(self.quant) - known:
            raise QRError(f"method {self.id}: quant {self.quant!r} is not a dict of quantization settings; "
                          f"its keys are among {sorted(known)}")
        parse_allocation(self.id, self.allocation)

    @property
    def spec(self):
        return parse_allocation(self.id, self.allocation)

    def quant_config(self, profile: Profile) -> QuantConfig:
        return dataclasses.replace(profile.quant, **self.quant)

    def resolve(self, ctx: Context) -> Allocation:
        return self.spec.resolve(ctx, self)


def check_method(method: Method, profile: Profile, shapes: ModelShapes) -> None:
    """Before any work: the method's allocation fits this profile (model blocks, ladders, budgets) and
    its backend can quantize to its bits; what only an artifact decides is checked when it is read."""
    method.spec.check(Context(profile, shapes, None), method)


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
