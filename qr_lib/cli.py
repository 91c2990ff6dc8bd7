"""The command line: `qr-adaptor <command>` (or `python -m qr_lib <command>`).

Each stage command executes the notebook that owns the stage, headlessly (papermill), so a shell run
writes exactly the artifacts, tables and figures a JupyterLab run writes, and the Makefile calls these
same commands. `finetune --method`, `export`, `stock` and `benchmark` call library functions directly.
Every command takes `--profile NAME|PATH.json` and repeatable `--set KEY=VALUE` (dotted settings,
values parsed as JSON where they parse).

Exit codes: 0 success; 2 bad input (the message names the problem and the fix; nothing is written);
1 any other failure (with its traceback). Heavy libraries load only inside the commands, so `--help`
answers at once.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .errors import QRError

# command -> (notebook prefixes, what it does)
STAGES = {
    "setup": (["00"], "the model and data the run uses (notebook 00)"),
    "pilot": (["01"], "Configs A-D at equal memory: can rank buy back fidelity? (notebook 01)"),
    "profile": (["02"], "Phase I: KL sensitivity of every block (notebook 02)"),
    "search": (["02", "03", "04"], "Phases I-III: the allocation search (notebooks 02-04)"),
    "finetune": (["05"], "the final fine-tunes of the profile's methods (notebook 05)"),
    "evaluate": (["06"], "the comparison table, its paired claims and the proxy calibration (notebook 06)"),
    "report": (["07"], "every headline table and figure in one notebook (07); trains nothing"),
    "reproduce": ([], "every notebook in order: the whole workbook"),
}


def parse_overrides(items: list[str]) -> dict:
    """KEY=VALUE pairs, VALUE as JSON where it parses ("finetune.seeds=[0]"), else a string."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise QRError(f"--set {item!r} is not KEY=VALUE; write e.g. --set finetune.seeds=[0]")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _profile(args):
    from .config import load_profile
    return load_profile(args.profile, parse_overrides(args.set))


def _run_notebooks(args, prefixes: list[str], begun=None) -> None:
    import logging

    from . import reproduce
    from .progress import PLAIN_ENV

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # papermill streams cell output here
    os.environ[PLAIN_ENV] = "1"  # inherited by the kernels: text progress bars the terminal can show
    reproduce.run(args.profile, prefixes or None, log_output=True, overrides=parse_overrides(args.set),
                  skip=getattr(args, "skip", None), begun=begun)


def cmd_finetune(args) -> None:
    if not args.method:
        return _run_notebooks(args, STAGES["finetune"][0])
    from . import finetune
    from .store import results_dir
    profile = _profile(args)
    for rec in finetune.run_all(profile, results_dir(profile.name), args.method):
        r = rec["result"]
        print(f"{r['name']} seed {r['seed']}: test loss {r['test_loss']:.4f}, {r['memory_bytes'] / 2**20:.1f} MiB")


def cmd_plan(args) -> None:
    from . import plan
    from .store import results_dir
    profile = _profile(args)
    step = args.step_seconds or plan.measured_step_seconds(results_dir(profile.name))
    print(plan.describe(plan.plan(profile, step)))


def cmd_stage(args) -> None:
    if getattr(args, "dry_run", False):
        return cmd_plan(args)
    from .reproduce import check_loopback
    check_loopback()  # before the estimate below, which may convert the model
    begun = None
    if args.command == "reproduce" and not args.only:
        # The run's starting state and clock come first: the estimate may read the model, which
        # converts and caches it on a machine that has never seen it.
        from .reproduce import starting_state
        from .store import results_dir
        begun = (starting_state(results_dir(_profile(args).name)), time.time())
        _say_expected_time(args)
    prefixes = list(args.only) if getattr(args, "only", None) else STAGES[args.command][0]
    _run_notebooks(args, prefixes, begun)


def _say_expected_time(args) -> None:
    """Before a whole run: its size, and its time where a finished run of the profile measured one."""
    from . import plan
    from .store import results_dir
    profile = _profile(args)
    step = plan.measured_step_seconds(results_dir(profile.name))
    p = plan.plan(profile, step)
    hours = p.get("hours (training steps only)", {}).get("total")
    when = f", about {hours:.1f} h of training at the {step:.2f} s per step the last run measured" if hours else ""
    print(f"profile {profile.name}: {p['total LoRA steps']:,} LoRA steps{when} "
          f"(`qr-adaptor plan --profile {args.profile}` for the breakdown)", flush=True)


def cmd_export(args) -> None:
    from .export import export_run
    for run in args.runs:
        print(export_run(run))


def cmd_stock(args) -> None:
    from . import stock
    from .store import results_dir
    profile = _profile(args)
    print(stock.run(profile, results_dir(profile.name), args.max_docs).round(2).to_string(index=False))


def cmd_benchmark(args) -> None:
    from . import bench_memory
    profile = _profile(args)
    out = args.out or bench_memory.default_out(profile.name)
    bench_memory.run(args.profile, out, args.steps, args.warmup, args.batch_size, args.seq_len, args.dtype_rounds)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="default",
                   help="a profile name (qr_lib/profiles/: smoke, default, paper) or the path of a profile JSON")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a dotted profile setting for this run, repeatable, e.g. --set finetune.seeds=[0]")


def build_parser() -> argparse.ArgumentParser:
    from pathlib import Path

    fmt = argparse.ArgumentDefaultsHelpFormatter
    ap = argparse.ArgumentParser(prog="qr-adaptor", formatter_class=fmt,
                                 description="QR-Adaptor workbook: per-block bit-width and LoRA-rank allocation. "
                                             "Stage commands execute their notebooks headlessly.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="command")
    for name, (_, what) in STAGES.items():
        p = sub.add_parser(name, help=what, description=what, formatter_class=fmt)
        _common(p)
        p.set_defaults(func=cmd_stage)
        if name == "reproduce":
            p.add_argument("--only", nargs="+", metavar="PREFIX", help="notebook name prefixes, e.g. 02 03")
            p.add_argument("--skip", nargs="+", metavar="PREFIX",
                           help="notebooks to leave out, e.g. 01 (the pilot: 21 long runs at the paper's scale)")
            p.add_argument("--dry-run", action="store_true",
                           help="print the plan (work, memory, time) instead of running; see `plan`")
            p.add_argument("--step-seconds", type=float, default=None,
                           help="with --dry-run: seconds per LoRA step on the target machine")
        if name == "finetune":
            p.add_argument("--method", nargs="+", metavar="ID|PATH",
                           help="run only these methods (ids in qr_lib/methods/ or method JSON paths), directly, "
                                "without the notebook's tables; default: the notebook, every method of the profile")
            p.set_defaults(func=cmd_finetune)
    p = sub.add_parser("plan", formatter_class=fmt, help="what a profile's run will do: work, memory, time",
                       description="Counts every stage's work from the profile, the memory from the formula on "
                                   "the model's config (no weights loaded) and, with a step time, the hours.")
    _common(p)
    p.add_argument("--step-seconds", type=float, default=None,
                   help="seconds per LoRA step on the target machine; default: what a finished run of this "
                        "profile measured, if any")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("export", formatter_class=fmt, help="write finished HQQ runs for use without qr_lib",
                       description="Write <run>/export/: per-module settings, codes, scales and zeros, config, "
                                   "tokenizer and adapter (docs/EXTENDING.md has the loader).")
    p.add_argument("runs", nargs="+", type=Path, help="run folders, e.g. results/default/runs/qr_adaptor/seed0")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("stock", formatter_class=fmt, help="lm-eval's stock task formats on the base model",
                       description="ARC-Easy/Challenge, HellaSwag and PIQA in lm-eval's stock formats on the model "
                                   "as loaded, beside published numbers; resumes task by task (`make stock-eval` passes "
                                   "--max-docs 2500: about an hour on 2 CPU cores).")
    _common(p)
    p.add_argument("--max-docs", type=int, default=None,
                   help="a split longer than this is scored on a seeded random sample of this many documents; "
                        "default: every split in full (HellaSwag's 10,042 take hours on a CPU)")
    p.set_defaults(func=cmd_stock)
    p = sub.add_parser("benchmark", formatter_class=fmt, help="memory (formula vs packed model) and step times",
                       description="Formula against measured memory of packed builds, per-build peak memory, "
                                   "LoRA step times round-robin against 16-bit, and float32 against bfloat16.")
    _common(p)
    p.add_argument("--out", type=Path, default=None,
                   help="output JSON; default results/benchmarks/memory_step_time.json for the default profile, "
                        "results/benchmarks/<profile>/ otherwise")
    p.add_argument("--steps", type=int, default=20, help="timed round-robin rounds")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--batch-size", type=int, default=4, help="rows per LoRA step")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per row")
    p.add_argument("--dtype-rounds", type=int, default=3, help="timed rounds of the float32/bfloat16 check")
    p.set_defaults(func=cmd_benchmark)
    return ap


OFFLINE = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline_unless_hub(args) -> None:
    """No network unless the profile reads the hub (a hub model id, Alpaca, WikiText-2, C4): set before
    any Hugging Face library is imported, since they read these variables once, on import."""
    from .profile_files import needs_hub, profile_values

    if getattr(args, "profile", None) and not needs_hub(profile_values(args.profile, parse_overrides(args.set))[1]):
        for var in OFFLINE:
            os.environ.setdefault(var, "1")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        offline_unless_hub(args)
        args.func(args)
    except QRError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run() -> None:
    """The console script's entry point."""
    sys.exit(main())
