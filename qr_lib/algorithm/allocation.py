"""The search variable of QR-Adaptor: one (bit-width, LoRA rank) pair per transformer block.

Bits 16 means "left unquantized" and rank 0 means "no adapter"; both exist for baselines and are
only on the ladders the configuration puts them on.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..config import DEFAULT_BIT_LADDER, DEFAULT_RANK_LADDER
from ..errors import QRError


@dataclass(frozen=True)
class Allocation:
    bits: tuple[int, ...]
    ranks: tuple[int, ...]
    bit_ladder: tuple[int, ...] = DEFAULT_BIT_LADDER
    rank_ladder: tuple[int, ...] = DEFAULT_RANK_LADDER
    name: str = field(default="", compare=False)

    def __post_init__(self):
        object.__setattr__(self, "bits", tuple(int(b) for b in self.bits))
        object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))
        object.__setattr__(self, "bit_ladder", tuple(sorted(int(b) for b in self.bit_ladder)))
        object.__setattr__(self, "rank_ladder", tuple(sorted(int(r) for r in self.rank_ladder)))
        if len(self.bits) != len(self.ranks):
            raise QRError(
                f"allocation has {len(self.bits)} bit-widths but {len(self.ranks)} ranks; "
                "give one (bits, rank) pair per transformer block"
            )
        if not self.bits:
            raise QRError("allocation is empty; give one (bits, rank) pair per transformer block")
        for i, (b, r) in enumerate(zip(self.bits, self.ranks)):
            if b not in self.bit_ladder:
                raise QRError(
                    f"block {i}: bit-width {b} is not on the bit ladder {list(self.bit_ladder)}; "
                    f"use one of those or add {b} to the ladder in the configuration"
                )
            if r not in self.rank_ladder:
                raise QRError(
                    f"block {i}: rank {r} is not on the rank ladder {list(self.rank_ladder)}; "
                    f"use one of those or add {r} to the ladder in the configuration"
                )

    @property
    def n_blocks(self) -> int:
        return len(self.bits)

    def pairs(self):
        return list(zip(self.bits, self.ranks))

    def check_blocks(self, n_blocks: int) -> None:
        if self.n_blocks != n_blocks:
            raise QRError(
                f"allocation has {self.n_blocks} blocks but the model has {n_blocks}; "
                f"build an allocation with exactly {n_blocks} (bits, rank) pairs"
            )

    def text(self) -> str:
        """The (bits, rank) pairs as short stable text: what the content hashes of its records hold."""
        return ",".join(f"{b}:{r}" for b, r in self.pairs())

    # -- gene encoding: each block is two ladder indices ---------------------------------------
    def to_genes(self) -> list[int]:
        genes = []
        for b, r in self.pairs():
            genes += [self.bit_ladder.index(b), self.rank_ladder.index(r)]
        return genes

    @classmethod
    def from_genes(cls, genes, bit_ladder, rank_ladder, name: str = "") -> "Allocation":
        genes = [int(g) for g in genes]
        bit_ladder, rank_ladder = tuple(sorted(bit_ladder)), tuple(sorted(rank_ladder))
        return cls(
            bits=tuple(bit_ladder[g] for g in genes[0::2]),
            ranks=tuple(rank_ladder[g] for g in genes[1::2]),
            bit_ladder=bit_ladder,
            rank_ladder=rank_ladder,
            name=name,
        )

    # -- summaries ----------------------------------------------------------------------------
    def mean_rank(self) -> float:
        return sum(self.ranks) / self.n_blocks

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "bits": list(self.bits),
            "ranks": list(self.ranks),
            "bit_ladder": list(self.bit_ladder),
            "rank_ladder": list(self.rank_ladder),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Allocation":
        missing = {"bits", "ranks"} - set(d)
        if missing:
            raise QRError(f"allocation JSON lacks {sorted(missing)}; it needs 'bits' and 'ranks' lists")
        return cls(
            bits=d["bits"],
            ranks=d["ranks"],
            bit_ladder=d.get("bit_ladder", DEFAULT_BIT_LADDER),
            rank_ladder=d.get("rank_ladder", DEFAULT_RANK_LADDER),
            name=d.get("name", ""),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "Allocation":
        return cls.from_dict(json.loads(text))

    def table(self) -> str:
        """A readable text table: one row per block."""
        lines = [f"{'block':>5}  {'bits':>4}  {'rank':>4}"]
        lines += [f"{i:>5}  {b:>4}  {r:>4}" for i, (b, r) in enumerate(self.pairs())]
        return "\n".join(lines)

    def __str__(self) -> str:
        label = f"{self.name}: " if self.name else ""
        return f"{label}bits={list(self.bits)} ranks={list(self.ranks)}"


class AllocationRecord:
    """Mixin for a frozen record dataclass with an `allocation` field: its JSON form is its fields, the
    allocation as Allocation.to_dict() (what evaluation and run artifacts store)."""

    def to_dict(self) -> dict:
        return {**self.__dict__, "allocation": self.allocation.to_dict()}

    @classmethod
    def from_dict(cls, d: dict):
        return cls(**{**d, "allocation": Allocation.from_dict(d["allocation"])})


def uniform(n_blocks: int, bits: int, rank: int, bit_ladder=DEFAULT_BIT_LADDER,
            rank_ladder=DEFAULT_RANK_LADDER, name: str | None = None) -> Allocation:
    """Every block at the same (bits, rank): the baselines (QLoRA 4-bit r=8, LoRA-16, ...).

    The value is added to the ladders, so `uniform(30, 16, 8)` is a valid 16-bit LoRA baseline.
    """
    return Allocation(
        bits=(bits,) * n_blocks,
        ranks=(rank,) * n_blocks,
        bit_ladder=tuple(sorted(set(bit_ladder) | {bits})),
        rank_ladder=tuple(sorted(set(rank_ladder) | {rank})),
        name=name if name is not None else f"uniform-{bits}bit-r{rank}",
    )


def split(n_blocks: int, shallow: tuple[int, int], deep: tuple[int, int], boundary: int | None = None,
          bit_ladder=DEFAULT_BIT_LADDER, rank_ladder=DEFAULT_RANK_LADDER, name: str = "") -> Allocation:
    """Shallow blocks at one (bits, rank), deep blocks at another (the pilot study's Configs C/D)."""
    boundary = n_blocks // 2 if boundary is None else boundary
    if not 0 < boundary < n_blocks:
        raise QRError(f"boundary {boundary} must lie strictly between 0 and {n_blocks}")
    pairs = [shallow] * boundary + [deep] * (n_blocks - boundary)
    used_bits = {p[0] for p in pairs}
    used_ranks = {p[1] for p in pairs}
    return Allocation(
        bits=tuple(p[0] for p in pairs),
        ranks=tuple(p[1] for p in pairs),
        bit_ladder=tuple(sorted(set(bit_ladder) | used_bits)),
        rank_ladder=tuple(sorted(set(rank_ladder) | used_ranks)),
        name=name,
    )
