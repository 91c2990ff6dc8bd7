"""The command line: `qr-adaptor <command>` (or `python -m qr_lib <command>`), every entry point.

Each stage command executes the notebook that owns the stage, headlessly (papermill), so a shell run
writes exactly the artifacts, tables and figures a JupyterLab run writes, and the Makefile calls these
same commands. `finetune --method`, `estimate`, `export` and `stock` call library functions directly.
Every command takes `--profile NAME|PATH.json` and repeatable `--set KEY=VALUE` (dotted settings,
values parsed as JSON where they parse).

Exit codes: 0 success; 2 bad input (the message names the problem and the fix; nothing is written);
1 any other failure (with its traceback). The commands import the package inside themselves, so
`--help` answers at once and the offline switches are set before any Hugging Face library loads.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

from . import PACKAGE_DIR
from .errors import QRError

# command -> (notebook prefixes, what it does)
STAGES = {
    "setup": (["00"], "the model and data the run uses (notebook 00)"),
    "pilot": (["01"], "Configs A-D at equal memory: can rank buy back fidelity? (notebook 01)"),
    "sensitivity": (["02"], "Phase I: KL sensitivity of every block (notebook 02)"),
    "search": (["02", "03", "04"], "Phases I-III: the allocation search (notebooks 02-04)"),
    "finetune": (["05"], "the final fine-tunes of the profile's methods (notebook 05)"),
    "evaluate": (["06"], "the comparison table, its paired claims and the proxy check (notebook 06)"),
    "report": (["07"], "what the run found, then every table and figure in one notebook (07); trains nothing"),
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
        except json.JSONDecodeError as e:
            if value.lstrip().startswith(("[", "{")):  # meant as a list or mapping, not a string
                raise QRError(f"--set {item!r}: {value!r} is not JSON ({e.msg}); quote each string in it, "
                              f"e.g. --set '{key}=[\"a\", \"b\"]'") from None
            out[key] = value
    return out


def _profile(args):
    from .workbook.profiles import load_profile
    return load_profile(args.profile, parse_overrides(args.set))


def _run_notebooks(args, prefixes: list[str], begun=None, loaded=None) -> None:
    from .progress import PLAIN_ENV
    from .workbook import reproduce

    # papermill streams every cell's output as log records: the whole of it goes to the results folder's
    # log (reproduce.run), and the terminal shows the stages' progress lines and errors alone.
    terminal = logging.StreamHandler()
    terminal.addFilter(_progress_only)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[terminal], force=True)
    logging.getLogger("papermill").addFilter(_no_cell_markers)
    os.environ[PLAIN_ENV] = "1"  # inherited by the kernels: text progress bars, kept in the log
    reproduce.run(args.profile, prefixes or None, log_output=True, overrides=parse_overrides(args.set),
                  skip=getattr(args, "skip", None), begun=begun, loaded=loaded, overwrite=getattr(args, "overwrite", False))


# A stage's progress line, as runner.each and the stages print them: "[run 3/33] QLoRA NF4, seed 1".
PROGRESS = re.compile(r"^\[[A-Za-z][\w .-]* (\d+/\d+\]|grid\])")


def _progress_only(record) -> bool:
    """The terminal's share of a streamed cell output: its progress lines (the record is cut to them),
    or the whole record where it is an error."""
    if record.levelno >= logging.ERROR:
        return True
    lines = [ln for ln in record.getMessage().splitlines() if PROGRESS.match(ln.strip())]
    if not lines:
        return False
    record.msg, record.args = "\n".join(ln.strip() for ln in lines), ()
    return True


def _no_cell_markers(record) -> bool:
    """papermill logs "Executing Cell N" and "Ending Cell N" around every cell whenever it streams
    output, with no switch of its own: those lines go, the cells' output stays."""
    return not record.getMessage().startswith(("Executing Cell", "Ending Cell"))


def cmd_finetune(args) -> None:
    from .algorithm.runner import open_runner
    from .layout import Layout
    from .models import load_model
    from .workbook import finetune, methods, profiles

    profile = _profile(args)
    if args.method:         # the profile's own methods were checked when it loaded
        profiles.check_methods(profile, dict.fromkeys(args.method, "--method"))
    # Unlike reproduce, this command makes none of what its methods read: all of it must be there first.
    chosen = [methods.load_method(m) for m in args.method or profile.finetune.methods or methods.method_ids()]
    methods.check_prerequisites(profile, Layout.of(profile.name), chosen)
    if not args.method:
        return _run_notebooks(args, STAGES["finetune"][0], loaded=profile)
    _guard(args, profile)
    layout = Layout.for_profile(profile.name)
    base, tok = load_model(profile.model, profile.dtype, profile.device)
    with open_runner(profile.parallel, profile.device) as runner:
        methods.run_variant_searches(profile, layout, chosen, base, tok, runner)
        for r in finetune.run_all(profile, layout, base, tok, args.method, runner):
            print(f"{r.name} seed {r.seed}: test loss {r.test_loss:.4f}, {r.memory_bytes / 2**20:.1f} MiB")


def cmd_estimate(args) -> None:
    from .layout import Layout
    from .workbook import estimate
    profile = _profile(args)
    layout = Layout.of(profile.name)
    remeasure = getattr(args, "remeasure", False)
    speed = (estimate.measure_speed(profile, fresh=remeasure) if getattr(args, "measure", False) or remeasure
             else estimate.cached_speed(profile))
    step = args.step_seconds or (None if speed else estimate.measured_step_seconds(layout))
    result = estimate.estimate(profile, step, None if args.step_seconds else speed, estimate.cached_worker_speed(profile))
    print(estimate.describe(result, estimate.recorded_seconds(layout, result)))


def cmd_stage(args) -> None:
    if getattr(args, "dry_run", False):
        return cmd_estimate(args)
    profile, begun = _profile(args), None
    if args.command == "reproduce" and not args.only:
        # The run's starting state and clock come first: the estimate may read the model, which
        # converts and caches it on a machine that has never seen it.
        from .layout import Layout
        from .workbook.reproduce import starting_state
        begun = (starting_state(Layout.of(profile.name)), time.time())
        _say_expected_time(args, profile)
    prefixes = list(args.only) if getattr(args, "only", None) else STAGES[args.command][0]
    _run_notebooks(args, prefixes, begun, profile)


def _say_expected_time(args, profile) -> None:
    """Before a whole run: its size, and its time where a finished run of the profile measured one."""
    from .layout import Layout
    from .workbook import estimate
    speed = estimate.cached_speed(profile)
    step = None if speed else estimate.measured_step_seconds(Layout.of(profile.name))
    p = estimate.estimate(profile, step, speed, estimate.cached_worker_speed(profile))
    if speed:
        when = f", about {p.minutes['total']:.0f} min on this machine (its measured speed)"
    elif step:
        when = f", about {p.training_hours['total']:.1f} h of training at the {step:.2f} s per step " \
               "the last run measured"
    else:
        when = ""
    print(f"profile {profile.name}: {profile.model} in {profile.dtype} on {profile.device}, runner {p.runner}; "
          f"{p.steps:,} LoRA steps{when} "
          f"(`qr-adaptor estimate --profile {args.profile} --measure` for the breakdown)", flush=True)


def cmd_export(args) -> None:
    from .layout import RunDir
    from .workbook.export import export_run
    for run in args.runs:
        print(export_run(RunDir(run)))


def cmd_stock(args) -> None:
    from .layout import Layout
    from .models import load_model
    from .workbook import stock
    profile = _profile(args)
    _guard(args, profile)
    base, tok = load_model(profile.model, profile.dtype, profile.device)
    table = stock.run(profile, Layout.for_profile(profile.name), base, tok, args.max_docs)
    print(table.round(2).to_string(index=False))


def cmd_sizing(args) -> None:
    from .algorithm.runner import open_runner
    from .layout import Layout
    from .models import load_model
    from .workbook import sizing
    profile = _profile(args)
    cfg = profile.sizing
    if args.finished:          # what has finished so far, computing nothing (a long run still going)
        layout = Layout.of(profile.name)
        curves = sizing.curves(layout, cfg.methods)
        if len(curves) < 2:
            raise QRError(f"{len(curves)} sizing curve(s) finished under {layout.root}; the tables compare at least two")
        missing = [m for m in cfg.methods if m not in {c["method"] for c in curves}]
        if missing:
            print(f"not finished yet (left out): {missing}")
    else:
        _guard(args, profile)
        layout = Layout.for_profile(profile.name)
        base, tok = load_model(profile.model, profile.dtype, profile.device)
        with open_runner(profile.parallel, profile.device) as runner:
            curves = sizing.run(profile, layout, base, tok, runner)
    ladder, length = sizing.save(profile, layout, curves)
    print(ladder.round(3).to_string(index=False))
    print(length["statement"])


def cmd_lengths(args) -> None:
    from .algorithm.runner import open_runner
    from .layout import Layout
    from .models import load_model
    from .workbook import lengths
    profile = _profile(args)
    _guard(args, profile)
    layout = Layout.for_profile(profile.name)
    if not args.finished:
        base, tok = load_model(profile.model, profile.dtype, profile.device)
        with open_runner(profile.parallel, profile.device) as runner:
            lengths.run(profile, layout, base, tok, runner)
    table, trend = lengths.save(profile, layout)
    if trend.empty:
        raise QRError(f"no primary claim has runs at two lengths under {layout.root}; run `qr-adaptor finetune` and "
                      "`qr-adaptor lengths` first")
    print(trend[["claim", "steps", "verdicts", "slope_per_doubling", "crosses_zero_at_steps"]].to_string(index=False))


def cmd_base_grid(args) -> None:
    from .layout import Layout
    from .models import load_model
    from .workbook import base_grid
    profile = _profile(args)
    _guard(args, profile)
    layout = Layout.for_profile(profile.name)
    base, tok = load_model(profile.model, profile.dtype, profile.device)
    table = base_grid.save(profile, layout, base_grid.run(profile, layout, base, tok))
    print(table.drop(columns=["seconds"]).round(4).to_string(index=False))


def _profile_names() -> list[str]:
    return sorted(p.stem for p in (PACKAGE_DIR / "profiles").glob("*.json"))


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="default",
                   help=f"a profile name (qr_lib/profiles/: {', '.join(_profile_names())}) or the path of a profile JSON")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a dotted profile setting for this run, repeatable, e.g. --set finetune.seeds=[0]")


def _overwrite(p: argparse.ArgumentParser) -> None:
    """For the commands that write into results/<profile>/."""
    p.add_argument("--overwrite", action="store_true",
                   help="replace results made with other settings (without it such a run stops before it starts, "
                        "naming them)")


def _guard(args, profile) -> None:
    """A command that writes stops before it starts where the profile's device is missing here, its
    results hold other settings, or another command is running on them; else it holds their lock."""
    from .workbook import reproduce
    reproduce.admit(profile, args.overwrite)
    reproduce.claim(profile.name)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    ap = argparse.ArgumentParser(prog="qr-adaptor", formatter_class=fmt,
                                 description="QR-Adaptor workbook: per-block bit-width and LoRA-rank allocation. "
                                             "Stage commands execute their notebooks headlessly.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="command")
    for name, (_, what) in STAGES.items():
        p = sub.add_parser(name, help=what, description=what, formatter_class=fmt)
        _common(p)
        p.set_defaults(func=cmd_stage)
        _overwrite(p)
        if name == "reproduce":
            p.add_argument("--only", nargs="+", metavar="PREFIX", help="notebook name prefixes, e.g. 02 03")
            p.add_argument("--skip", nargs="+", metavar="PREFIX",
                           help="notebooks to leave out, e.g. 01 (the pilot: 21 long runs at the paper's scale)")
            p.add_argument("--dry-run", action="store_true",
                           help="print the estimate (work, memory, time) instead of running; see `estimate`")
            p.add_argument("--step-seconds", type=float, default=None,
                           help="with --dry-run: seconds per LoRA step on the target machine")
        if name == "finetune":
            p.add_argument("--method", nargs="+", metavar="ID|PATH",
                           help="run only these methods (ids in qr_lib/methods/ or method JSON paths), directly, "
                                "without the notebook's tables; default: the notebook, every method of the profile")
            p.set_defaults(func=cmd_finetune)
    p = sub.add_parser("estimate", formatter_class=fmt, help="what a profile's run will do: work, memory, time",
                       description="Counts every stage's work from the profile, the memory from the formula on "
                                   "the model's config (no weights loaded) and, with a step time, the hours.")
    _common(p)
    p.add_argument("--step-seconds", type=float, default=None,
                   help="seconds per LoRA step on another target machine (training hours only); default: this "
                        "machine's measured speed, if measured, else what a finished run of this profile measured")
    p.add_argument("--measure", action="store_true",
                   help="time every unit of work once on this machine (about half a minute; cached) and estimate "
                        "every stage in minutes")
    p.add_argument("--remeasure", action="store_true",
                   help="as --measure, but time again and replace the cached speed (measure on an idle machine: "
                        "other work on the cores makes every stage look slower)")
    p.set_defaults(func=cmd_estimate)
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
    _overwrite(p)
    p.set_defaults(func=cmd_stock)
    p = sub.add_parser("sizing", formatter_class=fmt, help="learning curves that size the final fine-tune and the ladder",
                       description="One fine-tune per uniform setting (sizing.methods) at a constant rate, scored on "
                                   "the dev split at every checkpoint (sizing.checkpoints): the order of the methods by "
                                   "length, each rung's fidelity, and the length at which the order settles. "
                                   "Resumes setting by setting.")
    _common(p)
    p.add_argument("--finished", action="store_true",
                   help="write the tables and figure from the curves finished so far; compute nothing")
    _overwrite(p)
    p.set_defaults(func=cmd_sizing)
    p = sub.add_parser("lengths", formatter_class=fmt, help="the primary claims across training length",
                       description="The primary claims' methods fine-tuned again at lengths.factors x the final "
                                   "fine-tune's pairs (one epoch each, the same recipe, seeds and test examples), each "
                                   "primary claim judged at every length, with a trend labelled as extrapolation "
                                   "(tables lengths, lengths_trends; figure lengths). Needs the final runs; resumes "
                                   "run by run; runs on profile.parallel's workers.")
    _common(p)
    p.add_argument("--finished", action="store_true",
                   help="write the tables and figure from the runs finished so far; train nothing")
    _overwrite(p)
    p.set_defaults(func=cmd_lengths)
    p = sub.add_parser("base-grid", formatter_class=fmt, help="does the embedded base's Q4_1 grid favour 4-bit rungs?",
                       description="Every rung of the ladder and NF4 on the embedded base (dequantized Q4_1) and on a "
                                   "control with every weight spread within its Q4_1 bin: KL to that base and held-out "
                                   "perplexity (table and figure base_grid). About 5 minutes on 2 CPU cores.")
    _common(p)
    _overwrite(p)
    p.set_defaults(func=cmd_base_grid)
    return ap


OFFLINE = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline_unless_hub(args) -> None:
    """No network unless the profile reads the hub (a hub model id, Alpaca, WikiText-2, C4): set before
    any Hugging Face library is imported, since they read these variables once, on import."""
    from .workbook.profiles import needs_hub, profile_values  # light: no Hugging Face library

    if getattr(args, "profile", None) and not needs_hub(profile_values(args.profile, parse_overrides(args.set))[1]):
        for var in OFFLINE:
            os.environ.setdefault(var, "1")


class Stopped(Exception):
    """SIGTERM, raised where the command is, so that every `with` on the way out closes (the notebook's
    kernel, the Dask workers, the lock) as Ctrl-C's KeyboardInterrupt does."""


def _stop(signum, frame):
    raise Stopped()


STOPPED = "stopped; every finished run and artifact is kept: run the same command again to resume"


def exit_code(work) -> int:
    """Run `work()`: 0 when it finishes, 2 with its message when the input is bad (a QRError), 143 on
    SIGTERM and 130 on Ctrl-C with the tool's own line; any other failure keeps its traceback. The
    benchmark scripts answer the same way."""
    try:
        work()
    except QRError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Stopped:
        print(STOPPED + " (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(STOPPED + " (Ctrl-C)", file=sys.stderr)
        return 128 + signal.SIGINT
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def work():
        offline_unless_hub(args)
        args.func(args)
    if threading.current_thread() is not threading.main_thread():   # signals reach the main thread only
        return exit_code(work)
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        return exit_code(work)
    finally:
        signal.signal(signal.SIGTERM, previous)


def run() -> None:
    """The console script's entry point."""
    sys.exit(main())
