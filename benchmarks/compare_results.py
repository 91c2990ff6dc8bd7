"""Do two results folders hold the same artifacts? Every JSON file, compared after dropping what a rerun
may change without changing a result: time, machine and process (the environment block, timings, peak
memory), checksums, content-addressed keys, library-version entries, and lm-eval's own log fields (its
checkout path, function addresses, git hash). Records named by their key (proxy evaluations, proxy-check
curves) are matched by content.

    python benchmarks/compare_results.py BEFORE AFTER      # exit 1 where anything else differs
    python benchmarks/compare_results.py BEFORE AFTER --digits 4   # floats to 4 significant digits
    python benchmarks/compare_results.py BEFORE AFTER --rename fidelity=level   # a renamed name

`--digits` is for a change that alters float arithmetic (a kernel, a summation order): numbers then agree
to some digits, not bit for bit; a value near a rounding boundary can still read as a difference, shown
with both values to judge.

`--rename OLD=NEW` (repeatable) is for a change that renames a stored name: on the BEFORE side, a dict
key or string equal to OLD, and a path component (file or folder, in a file's name or in a string) whose
stem is OLD, read as NEW.

Used to show that a refactor writes the same artifacts: run `make reproduce PROFILE=smoke` from nothing
at two commits (QR_RESULTS_DIR and QR_LIB_CACHE pointing at empty folders) and compare.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
from pathlib import Path

KEY = re.compile(r"^[0-9a-f]{16}$|^[0-9a-f]{20}$")
ADDRESS = re.compile(r" at 0x[0-9a-f]+>")
DROPPED = {"environment", "checksum", "time", "date", "process", "started", "peak_memory", "versions",
           "config_source", "git_hash", "upper_git_hash"}
NAMED_BY_KEY = {"evaluations", "proxy_check"}


def renamed(name: str, renames: dict) -> str:
    """`name` with each renamed whole name, or path component whose stem is renamed, read as its new name."""
    if name in renames:
        return renames[name]
    parts = name.split("/")
    for i, part in enumerate(parts):
        stem, dot, suffix = part.partition(".")
        if stem in renames:
            parts[i] = renames[stem] + dot + suffix
    return "/".join(parts)


def normal(value, digits: int | None = None, renames: dict | None = None):
    """`value` without what a rerun may change (see the module docstring); floats to `digits`
    significant digits where given; names renamed where `renames` says."""
    renames = renames or {}
    if isinstance(value, dict):
        return {renamed(k, renames): normal(v, digits, renames) for k, v in value.items()
                if k not in DROPPED and not k.endswith("seconds")}
    if isinstance(value, list):
        if value and all(isinstance(v, str) for v in value) and "q_proj" in value:
            return sorted(value)          # peft writes target_modules from a set: the order is the hash seed's
        return [normal(v, digits, renames) for v in value]
    if isinstance(value, str):
        return "<key>" if KEY.match(value) else renamed(ADDRESS.sub(">", value), renames)
    if isinstance(value, float) and digits is not None and math.isfinite(value):
        return float(f"{value:.{digits}g}")
    return value


def records(root: Path, digits: int | None = None, renames: dict | None = None) -> dict:
    out = {}
    for path in sorted(root.rglob("*.json")):
        try:
            value = normal(json.loads(path.read_text()), digits, renames)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        name = renamed(str(path.relative_to(root)), renames or {})
        if Path(name).parent.name in NAMED_BY_KEY and Path(name).parent.parent == Path("."):
            content = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]
            name = f"{Path(name).parent.name}/<content {content}>"
        out[name] = value
    return out


def first_difference(a, b, where: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if (found := first_difference(a.get(k), b.get(k), f"{where}/{k}")) is not None:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if (found := first_difference(x, y, f"{where}[{i}]")) is not None:
                return found
        return None
    return None if a == b else f"{where}: {str(a)[:80]} | {str(b)[:80]}"


def main(before: str, after: str, digits: int | None = None, renames: dict | None = None) -> int:
    a, b = records(Path(before), digits, renames), records(Path(after), digits)
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    differ = [k for k in sorted(set(a) & set(b)) if a[k] != b[k]]
    print(f"{len(a)} JSON files before, {len(b)} after: {len(only_a)} only before, {len(only_b)} only after, "
          f"{len(differ)} differ")
    for k in only_a:
        print(f"  only before: {k}")
    for k in only_b:
        print(f"  only after: {k}")
    for k in differ:
        print(f"  differs: {k} {first_difference(a[k], b[k])}")
    return 1 if only_a or only_b or differ else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--digits", type=int, help="compare floats to this many significant digits")
    parser.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                        help="a name the change renamed (repeatable): BEFORE's OLD is read as NEW")
    args = parser.parse_args()
    if bad := [r for r in args.rename if r.count("=") != 1]:
        parser.error(f"--rename takes OLD=NEW, got {bad}")
    sys.exit(main(args.before, args.after, args.digits, dict(r.split("=") for r in args.rename)))
