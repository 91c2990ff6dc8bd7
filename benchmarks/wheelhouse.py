"""A folder of wheels for the GPU check on a machine without a network (`make wheelhouse`).

A GPU lent for a check has python3 with torch, transformers and peft, no network, and room for about
64 MiB of carried files. This script writes, into wheelhouse/ (git-ignored):

  *.whl            the wheels of what the check needs (the project's dependencies and theirs, at the
                   versions this checkout's .venv holds) that the target lacks: for the lent GPUs, what
                   benchmarks/gpu_image_packages.txt does not list; for a bare interpreter (--have none),
                   everything beyond torch, transformers and peft
  tokenizer/       the embedded model's tokenizer (3.4 MB): the tiny random model the check trains reads it
  wheels.json      each wheel's size, and each package left out with the reason (no wheel for the target's
                   Python, or over the size cap)

Wheels are taken for the target's Python (--python, 3.12 on the lent GPUs) and manylinux x86-64;
a package published only as source is built here into a wheel when that wheel is pure Python. The
largest wheels are left out first until the folder fits the cap (50 MB): bitsandbytes' CUDA wheel
is the usual one, and the check then skips the NF4 parts with one line saying so.

    .venv/bin/python benchmarks/wheelhouse.py                      # for the lent GPUs (Python 3.12)
    .venv/bin/python benchmarks/wheelhouse.py --python 3.11 --have none   # for a bare local venv
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

from qr_lib.models import tokenizer_dir

REPO = Path(__file__).resolve().parent.parent
# What every target already has (the check's precondition), with what those three need.
BASE = ("torch", "transformers", "peft")
# The interactive parts (JupyterLab, its widgets, the browser test): the check runs none of them.
INTERACTIVE = ("jupyterlab", "ipywidgets", "selenium")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64")


def project_requirements() -> list[Requirement]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return [r for r in map(Requirement, deps) if canonicalize_name(r.name) not in INTERACTIVE]


def closure(roots: list[Requirement], python: str) -> dict[str, str]:
    """{name: version installed here} of the roots and everything they need on the target's Python."""
    env = {"python_version": python, "python_full_version": python + ".0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "os_name": "posix"}
    found, extras_seen, todo = {}, {}, [(r.name, set(r.extras)) for r in roots]
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        if key in found and extras <= extras_seen[key]:
            continue
        extras_seen[key] = extras_seen.get(key, set()) | extras
        dist = md.distribution(name)
        found[key] = dist.version
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in extras_seen[key] or {""}):
                todo.append((req.name, set(req.extras)))
    return found


def have_list(arg: str) -> set[str]:
    if arg == "none":
        return set()
    lines = Path(arg).read_text().splitlines()
    return {canonicalize_name(x.strip()) for x in lines if x.strip() and not x.startswith("#")}


def download(pins: list[str], python: str, out: Path) -> bool:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           python, "--implementation", "cp", "-d", str(out)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    return subprocess.run(cmd + pins, capture_output=True, text=True).returncode == 0


def build_pure(pin: str, out: Path) -> str | None:
    """Build a wheel from source; keep it only if it is pure Python (it then runs on any target)."""
    with tempfile.TemporaryDirectory() as tmp:
        # hqq compiles CUDA kernels unless told not to; its Python fallback is what the check uses then.
        done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                               "-w", tmp, pin], capture_output=True, text=True, env={**os.environ, "DISABLE_CUDA": "1"})
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode or not wheels:
            return "no wheel for the target and its source did not build here"
        tags = parse_wheel_filename(wheels[0].name)[3]
        if not any(t.abi == "none" and t.platform == "any" for t in tags):
            return f"published as source only, and it builds a {sorted(map(str, tags))[0]} wheel, not pure Python"
        shutil.move(str(wheels[0]), out / wheels[0].name)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", default="3.12", help="the target's Python (3.12 on the lent GPUs)")
    ap.add_argument("--have", default=str(REPO / "benchmarks" / "gpu_image_packages.txt"),
                    help="a file naming the packages the target already has, or 'none' for a bare interpreter")
    ap.add_argument("--cap-mb", type=float, default=50.0, help="the folder's size cap (the device tool carries 64 MiB)")
    ap.add_argument("--out", type=Path, default=REPO / "wheelhouse")
    args = ap.parse_args()

    roots = project_requirements()
    base = closure([Requirement(n) for n in BASE], args.python)
    have = have_list(args.have)
    wanted = closure(roots, args.python)
    needed = {n: v for n, v in wanted.items() if n not in base and n not in have}
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    pins = [f"{n}=={v}" for n, v in sorted(needed.items())]
    print(f"{len(needed)} packages the target lacks (of the check's {len(wanted)}); "
          f"fetching wheels for Python {args.python}", flush=True)
    left_out = {}
    if not download(pins, args.python, args.out):     # one call is fast; on a failure, find which one by one
        for pin in pins:
            if not download([pin], args.python, args.out):
                reason = build_pure(pin, args.out)
                if reason:
                    left_out[pin.split("==")[0]] = reason
    wheels = {parse_wheel_filename(w.name)[0]: w for w in args.out.glob("*.whl")}
    cap = args.cap_mb * 1e6
    tok = args.out / "tokenizer"
    shutil.copytree(tokenizer_dir(), tok)
    room = cap - sum(f.stat().st_size for f in tok.iterdir())
    for name, w in sorted(wheels.items(), key=lambda kv: kv[1].stat().st_size):   # the smallest first
        size = w.stat().st_size
        if size > room:
            left_out[name] = f"its wheel is {size / 1e6:.1f} MB, over what is left of the {args.cap_mb:.0f} MB cap"
            w.unlink()
        else:
            room -= size
    kept = {w.name: w.stat().st_size for w in sorted(args.out.glob("*.whl"))}
    (args.out / "wheels.json").write_text(json.dumps(
        {"python": args.python, "have": args.have, "wheels": kept, "left_out": left_out,
         "megabytes": round((cap - room) / 1e6, 1)}, indent=1) + "\n")
    print(f"{len(kept)} wheels and the tokenizer, {(cap - room) / 1e6:.1f} MB, in {args.out}")
    for name, why in sorted(left_out.items()):
        print(f"  left out {name}: {why}")


if __name__ == "__main__":
    main()
