"""Artifact I/O: atomic writes, content hashes, checksums and the environment every artifact records.

One schema for every artifact: {"config": ..., "environment": ..., "result": ..., "checksum": ...},
and one stage protocol, `cached(path, config, compute)`: read back while the stored config equals
the current one, the record was made under today's versions of the tracked libraries, and the file is
untouched, else compute and write. Paths come from layout.Layout.
"""
from __future__ import annotations

import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from importlib import metadata
from pathlib import Path

from .errors import QRError
from .hardware import describe

# The libraries whose versions every cached artifact depends on: one list for every stage record and the
# block cache alike. A record made under another version of any of them is recomputed, never read back.
TRACKED_PACKAGES = ("torch", "transformers", "peft", "hqq", "bitsandbytes", "pymoo",
                    "scikit-optimize", "lm_eval", "numpy")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write through a temporary file and rename, so a killed process never leaves half a file. The
    file gets the user's umask (mkstemp alone makes it 0600: a shared cache unreadable to others)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def follow_umask(folder: Path) -> None:
    """Give every file under `folder` the user's umask: safetensors (and so peft's save_pretrained)
    creates its files 0600 whatever the umask, which leaves a shared adapter or export unreadable to others."""
    mode = 0o666 & ~_umask()
    for path in Path(folder).rglob("*"):
        if path.is_file():
            os.chmod(path, mode)


def to_jsonable(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return obj.item()
    return obj


def write_json(path: Path, obj) -> None:
    atomic_write_bytes(Path(path), (json.dumps(to_jsonable(obj), indent=1) + "\n").encode())


def read_json(path: Path):
    path = Path(path)
    if not path.exists():
        raise QRError(f"{path} does not exist; run the stage that writes it first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise QRError(f"{path} is not valid JSON ({e}); delete it and rerun the stage that writes it") from e


def content_hash(obj, length: int = 16) -> str:
    """A stable hash of anything JSON-able: the key of every cache."""
    text = json.dumps(to_jsonable(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def package_versions(names=TRACKED_PACKAGES) -> dict:
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


@functools.cache
def versions() -> dict:
    """This process's versions of the tracked libraries: with a stage's config, what its artifact depends on.
    Every record keeps them in its environment, so they are checked there rather than repeated in keys."""
    return package_versions(TRACKED_PACKAGES)


def same_versions(record: dict) -> bool:
    """Whether `record` was made under this process's versions of every tracked library."""
    made = record.get("environment", {}).get("packages", {})
    return {n: made.get(n) for n in TRACKED_PACKAGES} == versions()


def fresh(record: dict | None, config) -> bool:
    """Whether a whole record answers `config` today: its stored config equals it and it was made under
    today's library versions (the fingerprint of every cached artifact: its config and `versions()`)."""
    return record is not None and record["config"] == plain(config) and same_versions(record)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    import torch

    return {
        "packages": versions(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "process": os.getpid(),       # which process wrote it: a parallel run shows its workers here
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        **describe(),
        "git_commit": git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def checksum(config, result) -> str:
    """SHA-256 of an artifact's config and result (canonical JSON): what read_artifact checks."""
    return hashlib.sha256(json.dumps({"config": config, "result": result}, sort_keys=True).encode()).hexdigest()


def plain(obj):
    """obj as the JSON a file holds (dataclasses to dicts, tuples to lists): what a stored record compares to."""
    return json.loads(json.dumps(to_jsonable(obj)))


def write_artifact(path: Path, config, result) -> dict:
    """Write {config, environment, result, checksum}. A record whose config and result did not change
    is kept (made under today's versions), so a rerun that reads its inputs back leaves the provenance of
    the run that did the work."""
    path = Path(path)
    config, result = plain(config), plain(result)
    old = read_artifact(path, quiet=True)
    if fresh(old, config) and old["result"] == result:
        return old
    record = {"config": config, "environment": environment(), "result": result, "checksum": checksum(config, result)}
    write_json(path, record)
    return record


# What a reader that lists records does with a damaged one (the warning says so, not "recomputing").
LEFT_OUT = "leaving it out here; the stage that wrote it recomputes it on its next run"


def read_artifact(path: Path, quiet: bool = False, then: str = "recomputing it") -> dict | None:
    """The record at `path` if it is whole and untouched; None if it is missing, is not JSON, or its
    checksum does not match its content (a truncated or edited file). Such a file is named in a
    warning that says what the caller does with it (`then`): a stage recomputes it (the rewrite
    replaces it), a reader that lists records leaves it out (LEFT_OUT)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        ok = record.get("checksum") == checksum(record["config"], record["result"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        if not quiet:
            warnings.warn(f"{path} is damaged or was edited (its checksum does not match); {then}",
                          stacklevel=2)
        return None
    return record


def keyed(config: dict) -> dict:
    """`config` with its content hash as "key": the short name a later stage's config cites."""
    return {**config, "key": content_hash(config)}


def cached(path: Path, config, compute, valid=None):
    """The stage protocol: the result stored at `path` if the file is whole (its checksum), its stored
    config equals `config`, it was made under today's library versions (`fresh`), and `valid(result)`
    holds where given; else compute()'s, written there atomically with its config, provenance and
    checksum. So a stage whose config or libraries changed, or whose file is damaged or edited, is
    recomputed, and anything else is read back, never recomputed."""
    record = read_artifact(path)
    if fresh(record, config) and (valid is None or valid(record["result"])):
        return record["result"]
    return write_artifact(path, config, compute())["result"]  # JSON types, whichever way it came


def stored_result(path: Path, config=None, then: str = LEFT_OUT):
    """The result at `path` if the file is whole (and `fresh` for `config`, where given); None otherwise:
    for readers that cannot recompute a stage (tables, figures, the explorer). `then`: what the warning
    about a damaged file says the caller does instead (read_artifact)."""
    record = read_artifact(path, then=then)
    if record is None or (config is not None and not fresh(record, config)):
        return None
    return record["result"]


def save_table(df, layout, name: str) -> Path:
    """A table as CSV (for machines) and Markdown (for readers), where the layout keeps tables."""
    csv, md = layout.table(name, ".csv"), layout.table(name, ".md")
    atomic_write_bytes(csv, df.to_csv(index=False).encode())
    atomic_write_bytes(md, (df.to_markdown(index=False) + "\n").encode())
    return csv


def in_notebook() -> bool:
    """True inside a Jupyter kernel (JupyterLab, or papermill executing a notebook)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def save_figure(fig, layout, name: str) -> Path:
    """A figure as PNG under out_dir/figures/. In a notebook kernel the same PNG is also shown inline,
    so executed copies carry their figures (plots.py draws on the headless Agg backend, which shows
    nothing by itself). The figure is closed afterwards."""
    import matplotlib.pyplot as plt

    path = layout.figure(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    if in_notebook():
        from IPython.display import Image, display
        display(Image(filename=str(path)))
    return path


_HELD: dict[Path, object] = {}     # the locks this process holds, by path: taking one twice is a no-op


def hold_lock(path: Path) -> None:
    """One run per results folder: an advisory lock on `path`, held until this process ends. A second
    command on the same folder stops at once (two runs would each do all the work and one manifest
    record would be lost), naming the holder. The operating system drops the lock of a process that
    dies however it dies, so a killed run never leaves a stale lock in the way."""
    path = Path(path).resolve()
    if path in _HELD:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise QRError(f"{path.parent} is in use by {holder}; wait for it to finish (or stop it: its finished work "
                      "is kept), then run again") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} ({' '.join(sys.argv[:4])}, since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
    f.flush()
    _HELD[path] = f
