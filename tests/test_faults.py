"""Faults, as a hostile environment makes them: kill -9 mid-search or mid-fine-tune with the network
cut, then rerun.

One search runs in a child process whose sockets refuse everything but loopback (tests/offline_guard;
its HF_*_OFFLINE variables unset): it is killed with SIGKILL once a few candidates are on disk, then
rerun the same way. The rerun must finish, recompute no candidate that had finished, and reach the
same Pareto set as the uninterrupted serial run (smoke_run) with the same seed: resumable, offline
and deterministic in one test.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from qr_lib.layout import Layout

SEARCH = r"""
import sys
from pathlib import Path
from qr_lib.algorithm import search
from qr_lib.layout import Layout
from qr_lib.models import load_model
from qr_lib.workbook.profiles import load_profile

profile = load_profile("smoke")
search.run(profile, Layout(Path(sys.argv[1])), *load_model(profile.model, profile.dtype), progress=False)
print("search finished")
"""

FINETUNE = r"""
import sys
from pathlib import Path
from qr_lib.layout import Layout
from qr_lib.models import load_model
from qr_lib.workbook import finetune
from qr_lib.workbook.profiles import load_profile

profile = load_profile("smoke", {"eval.tasks": [], "finetune.seeds": [0, 1], "finetune.max_steps": 8})
finetune.run_all(profile, Layout(Path(sys.argv[1])), *load_model(profile.model, profile.dtype),
                 methods=["hqq4", "lora16"], progress=False)
print("runs finished")
"""


def _child(script, out, env):
    return subprocess.Popen([sys.executable, "-c", script, str(out)], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_when(child, ready, timeout=300):
    """SIGKILL the child's whole process group once ready() holds (it must still be running then)."""
    deadline = time.time() + timeout
    while time.time() < deadline and not ready() and child.poll() is None:
        time.sleep(0.2)
    assert child.poll() is None, child.stdout.read()            # still running: kill it mid-work
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()


@pytest.mark.integration
def test_a_search_killed_offline_resumes_to_the_uninterrupted_pareto_set(smoke_run, tmp_path, network_cut):
    env, network_log = network_cut
    out = tmp_path / "killed"
    child = _child(SEARCH, out, env)
    evaluations = out / "evaluations"
    _kill_when(child, lambda: len(list(evaluations.glob("*.json"))) >= 3)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in evaluations.glob("*.json")}
    assert len(before) >= 3
    for p in evaluations.glob("*.json"):                          # atomic writes: no half a record
        json.loads(p.read_text())

    rerun = _child(SEARCH, out, env)
    log, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0 and "search finished" in log, log[-3000:]
    assert not network_log.exists(), network_log.read_text()     # not one connection was attempted
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in evaluations.glob("*.json")}
    assert all(after[name] == seen for name, seen in before.items())    # nothing finished was redone

    serial = json.loads(smoke_run[0].nsga.read_text())["result"]["pareto"]
    resumed = json.loads(Layout(out).nsga.read_text())["result"]["pareto"]
    assert [r["key"] for r in resumed] == [r["key"] for r in serial]
    assert [r["objective"] for r in resumed] == pytest.approx([r["objective"] for r in serial], abs=0)
    selected = [json.loads(d.search.read_text())["result"]["selected"] for d in (smoke_run[0], Layout(out))]
    assert selected[0] == selected[1]


@pytest.mark.integration
def test_final_runs_killed_offline_resume_run_by_run(tmp_path, network_cut):
    """Four final runs in one child process, killed with SIGKILL once the first result is on disk (the
    second run is training): the rerun keeps the finished run as it is and completes the others."""
    env, network_log = network_cut
    out = tmp_path / "runs"
    child = _child(FINETUNE, out, env)
    _kill_when(child, lambda: len(list(out.glob("runs/*/seed*/result.json"))) >= 1)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("runs/*/seed*/result.json")}
    assert 1 <= len(before) < 4
    for p in before:                                              # atomic writes: no half a record
        json.loads(p.read_text())

    rerun = _child(FINETUNE, out, env)
    log, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0 and "runs finished" in log, log[-3000:]
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("runs/*/seed*/result.json")}
    assert len(after) == 4 and all(after[p] == seen for p, seen in before.items())
    assert not network_log.exists(), network_log.read_text()
