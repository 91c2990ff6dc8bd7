"""The QR-Adaptor search: Phase I (sensitivity) -> Phase II (NSGA-II) -> Phase III (BO).

`run(profile)` runs all three, each reusing its artifact under results/<profile>/ while its config
matches, and writes search.json: the selected allocation and what the search cost.
"""
from __future__ import annotations

from pathlib import Path

from .. import parallel, sensitivity
from ..allocation import Allocation
from ..errors import QRError
from ..fitness import ProxyEvaluator, epoch_tokens, full_fidelity, summarize
from ..store import read_json, write_artifact
from . import bo, nsga
from .problem import level_bytes


def evaluator(profile, cache_dir: Path, base=None, tok=None, progress: bool = True) -> ProxyEvaluator:
    """The proxy evaluator of a profile, caching under `cache_dir` (results/<profile>/evaluations)."""
    return ProxyEvaluator(profile, Path(cache_dir), base, tok, progress)


def _key(path: Path) -> str:
    return read_json(path)["config"]["key"]


def phase1(profile, out_dir: Path, ev: ProxyEvaluator, progress: bool = True) -> dict:
    return sensitivity.run(profile, out_dir, ev.base, ev.tok, progress)


def _phase2(profile, out_dir: Path, ev: ProxyEvaluator, p1: dict, sdir: Path) -> dict:
    return nsga.run(profile, out_dir, ev, p1, _key(sdir / "sensitivity.json"))


def _phase3(profile, out_dir: Path, ev: ProxyEvaluator, p1: dict, p2: dict, progress: bool) -> dict:
    space = nsga.make_space(profile, ev.shapes, p1)
    return bo.run(profile, out_dir, ev, space, p2, _key(Path(out_dir) / "nsga.json"), progress)


def phase2(profile, out_dir: Path, ev: ProxyEvaluator, progress: bool = True, sensitivity_dir: Path | None = None) -> dict:
    sdir = Path(sensitivity_dir or out_dir)
    return _phase2(profile, out_dir, ev, phase1(profile, sdir, ev, progress), sdir)


def phase3(profile, out_dir: Path, ev: ProxyEvaluator, progress: bool = True, sensitivity_dir: Path | None = None) -> dict:
    sdir = Path(sensitivity_dir or out_dir)
    p1 = phase1(profile, sdir, ev, progress)
    return _phase3(profile, out_dir, ev, p1, _phase2(profile, out_dir, ev, p1, sdir), progress)


def select_at(profile, ev: ProxyEvaluator, p1: dict, p2: dict, p3: dict) -> dict:
    """The best full-fidelity proxy score within each budget (profile.budget_bits and select_at, in
    average bits), from one front. A budget with no full-fidelity score inside it gets its best
    low-fidelity candidate scored at full fidelity, so every budget has a selection."""
    space = nsga.make_space(profile, ev.shapes, p1)
    rank_rung = nsga.budget_rank_rung(profile)
    out = {}
    for bits in (profile.budget_bits, *profile.select_at):
        ratio = level_bytes(space, bits, rank_rung) / space.budget
        rec, scored = bo.select(p3["observed"], ratio), False
        if rec is None:
            low = bo.select(p2["evaluations"], ratio)
            if low is None:
                raise QRError(f"nothing the search scored fits {bits} average bits; lower select_at or widen the "
                              "first generation (nsga.n_random)")
            rec, scored = summarize(ev.evaluate(space.allocation(space.genes(low)), full_fidelity(profile))), True
        alloc = Allocation(rec["bits"], rec["ranks"], profile.bit_ladder, profile.rank_ladder,
                           name=f"QR-Adaptor at {bits} bits")
        out[str(float(bits))] = {"allocation": alloc.to_dict(), "max_budget_ratio": ratio,
                                 "scored_for_selection": scored, "record": rec}
    return out


def run(profile, out_dir: Path, base=None, tok=None, progress: bool = True,
        sensitivity_dir: Path | None = None, evaluations_dir: Path | None = None) -> dict:
    """Phase I -> II -> III; returns the search.json result (its "selected" is an Allocation dict).
    A variant search (other ladders) can share Phase I and the evaluation cache of the main one."""
    out_dir = Path(out_dir)
    sdir = Path(sensitivity_dir or out_dir)
    ev = evaluator(profile, evaluations_dir or out_dir / "evaluations", base, tok, progress)
    p1 = phase1(profile, sdir, ev, progress)
    with parallel.executor(profile.parallel, profile.device) as client:  # None: serial
        ev.client = client
        p2 = _phase2(profile, out_dir, ev, p1, sdir)
        p3 = _phase3(profile, out_dir, ev, p1, p2, progress)
        ev.client = None
    chosen = p3["selected"]
    selected = Allocation(chosen["bits"], chosen["ranks"], profile.bit_ladder, profile.rank_ladder,
                          name="QR-Adaptor")
    selected_at = select_at(profile, ev, p1, p2, p3)
    # Cost from the records themselves, so a resumed search still reports what its scores cost.
    unique = {r["key"]: r for r in p2["evaluations"] + p2["promoted"]
              + [s["candidate"] for s in p3["steps"] if "candidate" in s]
              + [v["record"] for v in selected_at.values() if v["scored_for_selection"]]}
    tokens = sum(r["train_tokens"] for r in unique.values())
    proxy_seconds = sum(r["seconds"] for r in unique.values())
    epoch = epoch_tokens(ev.train_set, ev.tok, profile.proxy.max_len)
    result = {
        "selected": selected.to_dict(),
        # the best full-fidelity proxy score within each budget, from one front
        "selected_at": selected_at,
        "selected_scores": {k: chosen[k] for k in ("objective", "metric", "val_loss", "accuracy", "budget_ratio",
                                                   "avg_bits", "mean_rank")},
        "cost": {"phase1_seconds": p1["seconds"], "proxy_seconds": round(proxy_seconds, 1),
                 "total_seconds": round(p1["seconds"] + proxy_seconds, 1),
                 "unique_evaluations": len(unique),
                 "by_fidelity": {f: sum(r["fidelity"] == f for r in unique.values()) for f in ("low", "full")},
                 "search_train_tokens": tokens, "epoch_tokens": epoch, "epoch_equivalents": tokens / epoch},
    }
    write_artifact(out_dir / "search.json", {"sensitivity": _key(sdir / "sensitivity.json"),
                                             "nsga": _key(out_dir / "nsga.json"), "bo": _key(out_dir / "bo.json"),
                                             "profile": profile.name}, result)
    return result
