"""The QR-Adaptor search: Phase I (sensitivity) -> Phase II (NSGA-II) -> Phase III (BO).

`run(profile)` runs all three, each reusing its artifact under results/<profile>/ while its config
matches, and writes search.json: the selected allocation and what the search cost.
"""
from __future__ import annotations

from pathlib import Path

from .. import sensitivity
from ..allocation import Allocation
from ..fitness import ProxyEvaluator, epoch_tokens
from ..store import read_json, write_artifact
from . import bo, nsga


def run(profile, out_dir: Path, base=None, tok=None, progress: bool = True) -> dict:
    """Phase I -> II -> III; returns the search.json result (its "selected" is an Allocation dict)."""
    out_dir = Path(out_dir)
    evaluator = ProxyEvaluator(profile, out_dir / "evaluations", base, tok, progress)
    phase1 = sensitivity.run(profile, out_dir, evaluator.base, evaluator.tok, progress)
    phase1_key = read_json(out_dir / "sensitivity.json")["config"]["key"]
    phase2 = nsga.run(profile, out_dir, evaluator, phase1, phase1_key, progress)
    phase2_key = read_json(out_dir / "nsga.json")["config"]["key"]
    space = nsga.make_space(profile, evaluator, phase1)
    phase3 = bo.run(profile, out_dir, evaluator, space, phase2, phase2_key, progress)
    chosen = phase3["selected"]
    selected = Allocation(chosen["bits"], chosen["ranks"], profile.bit_ladder, profile.rank_ladder,
                          name="QR-Adaptor")
    search_tokens = phase2["train_tokens"] + phase3["train_tokens"]
    epoch = epoch_tokens(evaluator.train_set, evaluator.tok, profile.proxy.max_len)
    result = {
        "selected": selected.to_dict(),
        "selected_scores": {k: chosen[k] for k in ("val_loss", "budget_ratio", "avg_bits", "mean_rank", "utility")},
        "cost": {"phase1_seconds": phase1["seconds"], "phase2_seconds": phase2["seconds"],
                 "phase3_seconds": phase3["seconds"],
                 "total_seconds": round(phase1["seconds"] + phase2["seconds"] + phase3["seconds"], 1),
                 "unique_evaluations": phase2["n_unique_evaluations"] + sum("candidate" in s for s in phase3["steps"]),
                 "search_train_tokens": search_tokens, "epoch_tokens": epoch,
                 "epoch_equivalents": search_tokens / epoch},
    }
    write_artifact(out_dir / "search.json", {"phase1": phase1_key, "phase2": phase2_key,
                                             "profile": profile.name}, result)
    return result


def main(argv=None) -> None:
    import argparse

    from ..config import load_profile, profile_names
    from ..errors import QRError
    from ..store import results_dir

    ap = argparse.ArgumentParser(description="Run the three-phase QR-Adaptor search for a profile.")
    ap.add_argument("--profile", default="default", choices=profile_names())
    args = ap.parse_args(argv)
    try:
        result = run(load_profile(args.profile), results_dir(args.profile))
    except QRError as e:
        raise SystemExit(f"error: {e}")
    sel = Allocation.from_dict(result["selected"])
    print(sel.table())
    print(result["cost"])
