"""Faults, as a hostile environment makes them: kill -9 mid-search with the network cut, then rerun.

One search runs in a child process whose sockets refuse everything but loopback (and whose
HF_*_OFFLINE variables are unset): it is killed with SIGKILL once a few candidates are on disk, then
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

SCRIPT = r"""
import socket, sys
from pathlib import Path

LOCAL = ("127.0.0.1", "::1", "localhost")
real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo


def connect(self, address):
    if isinstance(address, tuple) and address[0] not in LOCAL:
        raise OSError(f"the test cut the network: connect to {address}")
    return real_connect(self, address)


def getaddrinfo(host, *args, **kwargs):
    if host not in LOCAL and host is not None:
        raise OSError(f"the test cut the network: resolve {host}")
    return real_getaddrinfo(host, *args, **kwargs)


socket.socket.connect, socket.getaddrinfo = connect, getaddrinfo
from qr_lib import search
from qr_lib.config import load_profile

search.run(load_profile("smoke"), Path(sys.argv[1]), progress=False)
print("search finished")
"""


def _child(out, env):
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(out)], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.integration
def test_a_search_killed_offline_resumes_to_the_uninterrupted_pareto_set(smoke_run, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    out = tmp_path / "killed"
    child = _child(out, env)
    evaluations = out / "evaluations"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(evaluations.glob("*.json"))) < 3 and child.poll() is None:
        time.sleep(0.2)
    assert child.poll() is None, child.stdout.read()            # still running: kill it mid-search
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in evaluations.glob("*.json")}
    assert len(before) >= 3
    for p in evaluations.glob("*.json"):                          # atomic writes: no half a record
        json.loads(p.read_text())

    rerun = _child(out, env)
    log, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0 and "search finished" in log, log[-3000:]
    assert "cut the network" not in log
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in evaluations.glob("*.json")}
    assert all(after[name] == seen for name, seen in before.items())    # nothing finished was redone

    serial = json.loads((smoke_run[0] / "nsga.json").read_text())["result"]["pareto"]
    resumed = json.loads((out / "nsga.json").read_text())["result"]["pareto"]
    assert [r["key"] for r in resumed] == [r["key"] for r in serial]
    assert [r["objective"] for r in resumed] == pytest.approx([r["objective"] for r in serial], abs=0)
    selected = [json.loads((d / "search.json").read_text())["result"]["selected"] for d in (smoke_run[0], out)]
    assert selected[0] == selected[1]
