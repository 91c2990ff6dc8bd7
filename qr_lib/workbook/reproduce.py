"""`make reproduce`: run every notebook in order with papermill, for one profile.

Executed copies go to results/<profile>/notebooks/, and results/<profile>/README.md indexes every
table and figure with the notebook that wrote it. Stages cache their artifacts, so a rerun after an
interruption redoes only unfinished work; the first failing notebook stops the run, named.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import sys
import tempfile
import time
import weakref
from pathlib import Path

import pandas as pd
from jupyter_client.manager import AsyncKernelManager

from .. import REPO_DIR
from ..config import Profile
from ..errors import QRError
from ..layout import Cache, Layout, portable
from ..store import atomic_write_bytes, hold_lock, read_json, save_table, write_json
from . import estimate
from .profiles import check_device, load_profile, other_settings
from .report import compute_time


def starting_state(layout: Layout) -> dict:
    """What a run starts from: which stage artifacts and caches (converted model, quantized blocks,
    parsed data) already exist. A run from nothing has none of them."""
    artifacts = layout.started()
    caches = Cache.here().filled()
    return {"artifacts": artifacts, "caches": caches, "from_nothing": not artifacts and not caches}


def refuse_other_settings(profile: Profile, layout: Layout) -> None:
    """A run never silently replaces results made with other settings (another dtype on a CPU with
    native bf16, an edited profile, a --set): it stops before anything is written."""
    differ = other_settings(profile, layout)
    if differ:
        shown = "; ".join(differ[:6]) + (f"; and {len(differ) - 6} more" if len(differ) > 6 else "")
        raise QRError(f"{layout.root} holds results made with other settings ({shown}). Nothing was run. To browse "
                      "them, load the profile with the settings they record (e.g. --set dtype=float32); to replace "
                      "them, run again with --overwrite (make ... OVERWRITE=1); to keep both, give this run a "
                      "profile of its own name.")


def admit(profile: Profile, overwrite: bool = False) -> None:
    """The refusals every command that writes makes before it writes anything: a device this machine
    lacks, and (unless `overwrite`) results of other settings in the profile's folder."""
    check_device(profile)
    if not overwrite:
        refuse_other_settings(profile, Layout.of(profile.name))


def claim(name: str) -> Layout:
    """The profile's results folder, made, checked writable and locked for this process (one run per
    folder): the last step before a command writes into it."""
    layout = Layout.for_profile(name)
    hold_lock(layout.lock)
    return layout


NOTEBOOK_DIR = REPO_DIR / "notebooks"
# The project's Jupyter kernel: this environment's Python, registered inside the environment (not the
# user's home), named in every notebook's metadata; JupyterLab and papermill both run it.
KERNEL, KERNEL_DISPLAY = "qr-adaptor", "QR-Adaptor (.venv)"


def ensure_kernel() -> str:
    """Register KERNEL for this interpreter under sys.prefix if it is missing; returns its name."""
    from jupyter_client.kernelspec import KernelSpecManager

    if KERNEL not in KernelSpecManager().find_kernel_specs():
        from ipykernel.kernelspec import install
        install(kernel_name=KERNEL, display_name=KERNEL_DISPLAY, prefix=sys.prefix)
    return KERNEL


class IPCKernelManager(AsyncKernelManager):
    """The notebooks' kernel reached over Unix sockets in a private temporary folder instead of TCP on
    127.0.0.1: it needs no loopback network (a namespace with `lo` down used to wait 60 s and fail with
    "Kernel didn't respond"), and the kernel has no reason to warn that TCP is unencrypted. Its five
    channels open no port; ipykernel itself still binds one on 127.0.0.1 for the output of processes
    the kernel forks (its IOPub pipe, messages checked against a random token, no switch to turn it
    off), and goes without it where there is no loopback."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        folder = tempfile.mkdtemp(prefix="qr-kernel-")          # mode 0700: the user's alone
        weakref.finalize(self, shutil.rmtree, folder, True)
        self.transport, self.ip = "ipc", str(Path(folder) / "kernel")


def execute(notebook: Path, out: Path, parameters: dict, kernel: str, log_output: bool = False) -> None:
    """Run one notebook with papermill on the project's kernel (over IPC); its executed copy, tidied,
    replaces `out` (with the error, where a cell failed). papermill saves its copy after every cell, so it
    writes a hidden partial file: a run killed or out of disk mid-save leaves `out` as it was."""
    import papermill as pm

    partial = out.with_name(f".{out.stem}.partial{out.suffix}")
    try:
        pm.execute_notebook(str(notebook), str(partial), parameters=parameters, cwd=str(NOTEBOOK_DIR),
                            kernel_name=kernel, progress_bar=False, log_output=log_output,
                            kernel_manager_class=IPCKernelManager)
    except pm.PapermillExecutionError:
        tidy(partial, out)
        raise
    else:
        tidy(partial, out)
    finally:
        partial.unlink(missing_ok=True)


def notebooks() -> list[Path]:
    return sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


def _outputs(layout: Layout) -> dict[str, float]:
    return {str(p.relative_to(layout.root)): p.stat().st_mtime
            for d in (layout.tables, layout.figures) if d.exists() for p in d.iterdir()}


def write_index(layout: Layout, profile: str, manifest: dict) -> None:
    lines = [f"# Results of the `{profile}` profile", "",
             "Written by `make reproduce` (qr_lib/workbook/reproduce.py); every file below was written by the "
             "notebook named beside it. Executed notebooks are under `notebooks/`.", ""]
    for nb in sorted({v["notebook"] for v in manifest["files"].values()}):
        run = manifest["notebooks"].get(nb, {})
        lines += [f"## {nb}", f"Ran for {run.get('seconds', 0):.0f} s; executed copy: `notebooks/{nb}`.", ""]
        lines += [f"- [`{f}`]({f})" for f, v in sorted(manifest["files"].items()) if v["notebook"] == nb]
        lines.append("")
    if (f := layout.table("reproduce_wall_clock")).exists():
        rel = f.relative_to(layout.root)
        lines += ["## Wall-clock time", "Every `make reproduce` of this folder, how long it took and whether it started "
                  f"from nothing (no artifacts, no caches): [`{rel}`]({rel}).", ""]
    if (f := layout.table("compute_time")).exists():
        rel = f.relative_to(layout.root)
        lines += ["## Compute time", "Seconds of work each stage's artifacts record, written by `make reproduce` "
                  f"after the last notebook: [`{rel}`]({rel}).", ""]
    layout.index.write_text("\n".join(lines))


def run(profile: str, only: list[str] | None = None, log_output: bool = False,
        overrides: dict | None = None, skip: list[str] | None = None,
        begun: tuple[dict, float] | None = None, loaded: Profile | None = None, overwrite: bool = False) -> None:
    """Run the notebooks for a profile (a name or a path, with dotted `overrides`; the notebooks get
    both and load it themselves); with `log_output` their output (stage progress) streams to the
    terminal. `begun`: (starting_state, time.time()) taken by a caller that did work of its own first;
    `loaded`: the profile that caller already loaded from the same name and overrides. Results made
    with other settings are replaced only with `overwrite` (refuse_other_settings)."""
    import papermill as pm

    overrides = overrides or {}
    todo = [nb for nb in notebooks() if (not only or any(nb.name.startswith(o) for o in only))
            and not any(nb.name.startswith(k) for k in skip or ())]
    if not todo:
        raise QRError(f"--only {' '.join(only or [])} --skip {' '.join(skip or [])} leaves no notebook; give prefixes of "
                      f"{[nb.name for nb in notebooks()]}, e.g. --only 02 03")
    loaded = loaded or load_profile(profile, overrides)  # a bad profile fails here, before any notebook
    name = loaded.name
    admit(loaded, overwrite)
    # The starting state before the size check, which may convert the model on a fresh machine.
    start, started = begun or (starting_state(Layout.of(name)), time.time())
    estimate.check_size(loaded, Layout.of(name))          # an absurd size fails here, before anything is written
    layout = claim(name)
    manifest = read_json(layout.manifest) if layout.manifest.exists() else {"files": {}, "notebooks": {}}
    layout.notebooks.mkdir(exist_ok=True)
    kernel = ensure_kernel()
    log = _log_to(layout.log) if log_output else None
    print(f"{len(todo)} notebooks of profile {name}" + (f"; their full output goes to {layout.log}" if log else ""),
          flush=True)
    for i, nb in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {nb.name}", flush=True)
        before, t0 = _outputs(layout), time.time()
        try:
            execute(nb, layout.notebooks / nb.name, {"PROFILE": profile, "OVERRIDES": overrides}, kernel, log_output)
        except pm.PapermillExecutionError as e:
            print(f"\nnotebook {nb.name} failed: {e.ename}: {e.evalue}\n"
                  f"the executed copy with the error is {layout.notebooks / nb.name}", file=sys.stderr)
            raise SystemExit(1)
        after = _outputs(layout)
        written = [f for f, mtime in after.items() if before.get(f) != mtime]
        for f in written:
            manifest["files"][f] = {"notebook": nb.name}
        manifest["notebooks"][nb.name] = {"seconds": round(time.time() - t0, 1)}
        print(f"      {nb.name}: {time.time() - t0:.0f} s, {len(written)} tables and figures in {layout.tables.parent}",
              flush=True)
        write_json(layout.manifest, manifest)
        write_index(layout, name, manifest)
    wall = round(time.time() - started, 1)
    manifest.setdefault("runs", []).append({
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)), "wall_seconds": wall,
        "notebooks": [nb.name for nb in todo], **start})
    write_json(layout.manifest, manifest)
    save_table(pd.DataFrame(wall_clock(manifest)), layout, "reproduce_wall_clock")
    cost = compute_time(layout)
    if cost:
        save_table(pd.DataFrame(cost), layout, "compute_time")
    write_index(layout, name, manifest)
    if log is not None:
        logging.getLogger("papermill").removeHandler(log)
        log.close()
    total = f"; work the artifacts record: {cost[-1]['seconds']:.0f} s (tables/compute_time.md)" if cost else ""
    print(f"done: {len(todo)} notebooks in {wall:.0f} s of wall-clock time{total}; results in {layout.root}")


def _log_to(path: Path) -> logging.Handler:
    """Every streamed cell output of this run appended to `path` (the run's full log)."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("papermill").addHandler(handler)
    return handler


WIDGET = "application/vnd.jupyter.widget-view+json"
# A progress bar's line: tqdm's "42%|####  |" or its rate "[00:03<00:01, 2.1it/s]".
PROGRESS_LINE = re.compile(r"\d+%\||\d+/\d+ \[\d")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")   # a terminal's cursor moves, left by nested bars


def tidy(path: Path, to: Path | None = None) -> None:
    """The executed copy at `path` as it is committed, written atomically to `to` (default: in place):
    without frozen widgets (a progress bar saved mid-way, all a widget output holds), without progress-bar
    lines in stderr (they carry no result), and without the absolute paths of the machine that ran it (the
    repository and results roots become relative)."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    if to is not None and "papermill" in nb.get("metadata", {}):
        nb["metadata"]["papermill"]["output_path"] = str(to)
    for cell in nb["cells"]:
        kept = []
        for out in cell.get("outputs", []):
            if WIDGET in out.get("data", {}):
                continue
            if out.get("name") == "stderr":
                lines = [ln for ln in re.split(r"[\r\n]", "".join(out["text"]))
                         if ANSI.sub("", ln).strip() and not PROGRESS_LINE.search(ln)]
                if not lines:
                    continue
                out["text"] = [ln + "\n" for ln in lines]
            kept.append(out)
        if "outputs" in cell:
            cell["outputs"] = kept
    atomic_write_bytes(to or path, portable(json.dumps(nb, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


def wall_clock(manifest: dict) -> list[dict]:
    """Every `make reproduce` run of this results folder: when, how long, and from what state."""
    return [{"started": r["started"], "wall seconds": r["wall_seconds"], "wall hours": round(r["wall_seconds"] / 3600, 2),
             "notebooks": len(r["notebooks"]), "from nothing": r["from_nothing"],
             "artifacts present at start": ", ".join(r["artifacts"]) or "none",
             "caches present at start": ", ".join(r["caches"]) or "none"} for r in manifest.get("runs", [])]
