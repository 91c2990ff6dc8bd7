"""`make lab` opens anywhere: as root (here) and as an ordinary user, on a chosen port, printing the URL
with its token, with the project's kernel as the server's default. The server is started, asked for its
kernels over HTTP with the token it printed, and stopped by stopping make alone: the server goes with it."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _serve(env, prefix=()) -> dict:
    """Start `make lab PORT=<free>`, read the token from the URL it prints, return /api/kernelspecs
    after stopping make (its pid alone, as a user's `kill` would): the server must stop listening."""
    port = _free_port()
    server = subprocess.Popen([*prefix, "make", "-s", "lab", f"PORT={port}"], cwd=ROOT, env=env,
                              start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(server.stdout), daemon=True).start()
    url = re.compile(rf"http://(?:127\.0\.0\.1|localhost):{port}/lab\?token=(\w+)")
    try:
        deadline = time.time() + 120
        while time.time() < deadline and server.poll() is None:
            tokens = [m.group(1) for line in list(lines) if (m := url.search(line))]
            if tokens:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/kernelspecs?token={tokens[0]}",
                                            timeout=10) as r:
                    specs = json.loads(r.read())
                server.send_signal(signal.SIGTERM)
                server.wait(timeout=30)
                stopped = time.time() + 30
                while _listening(port) and time.time() < stopped:
                    time.sleep(0.5)
                assert not _listening(port), "JupyterLab still listens after its make was stopped"
                return specs
            time.sleep(1)
        raise AssertionError("make lab printed no URL with a token:\n" + "".join(lines)[-3000:])
    finally:
        try:                                       # whatever is left of the session (nothing, when it works)
            os.killpg(server.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        server.wait(timeout=30)


def test_make_lab_serves_the_project_kernel_as_default_on_a_chosen_port():
    specs = _serve({k: v for k, v in os.environ.items() if k != "DISPLAY"})
    assert specs["default"] == "qr-adaptor" and "qr-adaptor" in specs["kernelspecs"], specs


def _user_can_run_the_venv() -> bool:
    prefix = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    return (os.geteuid() == 0 and shutil.which("setpriv") is not None
            and subprocess.run([*prefix, "sh", "-c", ".venv/bin/python -c pass"], cwd=ROOT, capture_output=True,
                               env={"PATH": os.environ["PATH"]}).returncode == 0)


@pytest.mark.skipif(not _user_can_run_the_venv(),
                    reason="needs root, and a .venv whose interpreter another user may run (here it lives in /root)")
def test_make_lab_opens_for_an_ordinary_user_too():
    # The user's home directly under the system temp folder: pytest's tmp_path sits in a folder only
    # root may enter, where Jupyter could not write its runtime files and stops at once.
    home = Path(tempfile.mkdtemp(prefix="lab-home-"))
    shutil.chown(home, "nobody")
    env = {"PATH": os.environ["PATH"], "HOME": str(home)}
    try:
        specs = _serve(env, ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"))
    finally:
        shutil.rmtree(home, ignore_errors=True)
    assert specs["default"] == "qr-adaptor"
