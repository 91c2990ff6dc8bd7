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


def _kernelspecs(port: int, token: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/kernelspecs?token={token}", timeout=10) as r:
        return json.loads(r.read())


def _serve(env, prefix=(), use=_kernelspecs):
    """Start `make lab PORT=<free>`, read the token from the URL it prints, call use(port, token) (default:
    /api/kernelspecs) and return what it returns after stopping make (its pid alone, as a user's `kill`
    would): the server must stop listening."""
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
                answer = use(port, tokens[0])
                server.send_signal(signal.SIGTERM)
                server.wait(timeout=30)
                stopped = time.time() + 30
                while _listening(port) and time.time() < stopped:
                    time.sleep(0.5)
                assert not _listening(port), "JupyterLab still listens after its make was stopped"
                return answer
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


def _browser_missing() -> str:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (make venv installs it)"
    missing = [c for c in ("chromium", "chromedriver") if shutil.which(c) is None]
    return f"{' and '.join(missing)} not installed (Debian: apt-get install chromium chromium-driver)" if missing else ""


@pytest.mark.integration
@pytest.mark.skipif(bool(_browser_missing()), reason=_browser_missing() or "a browser is installed")
def test_the_explorer_renders_and_answers_a_slider_in_jupyterlab_in_a_real_browser(tmp_path):
    """make lab in headless Chromium: notebook 08 run there on the committed default results, its widget
    drawn (no "Error displaying widget"), and a slider moved by the keyboard redraws the numbers. A copy of
    the notebook runs (JupyterLab autosaves what it runs; the tracked notebook stays as it is), and the
    page is saved as a screenshot (to $QR_SCREENSHOT where set: docs/explorer_in_jupyterlab.png is one)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    folder = ROOT / "build" / f"browser-{os.getpid()}"       # inside the server's root; /build/ is ignored
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "notebooks" / "08_fidelity_plasticity_explorer.ipynb", folder / "explorer.ipynb")

    def wait_for(find, seconds: float):
        deadline = time.time() + seconds
        while time.time() < deadline:
            if found := find():
                return found
            time.sleep(1)
        raise AssertionError(f"not found in {seconds} s; the page says:\n{driver.find_element(By.TAG_NAME, 'body').text[-2000:]}")

    def use(port: int, token: str):
        driver.get(f"http://127.0.0.1:{port}/lab/tree/{folder.relative_to(ROOT)}/explorer.ipynb?token={token}")
        wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell"), 120)
        wait_for(lambda: "Idle" in driver.find_element(By.TAG_NAME, "body").text, 120)     # the kernel is up
        next(e for e in driver.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-itemLabel") if e.text == "Run").click()
        wait_for(lambda: [e for e in driver.find_elements(By.CSS_SELECTOR, ".lm-Menu-itemLabel")
                          if e.text == "Run All Cells"], 10)[0].click()
        handles = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, ".widget-slider .noUi-handle"), 240)
        before = wait_for(lambda: [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".widget-output")
                                   if "memory" in e.text], 120)[0]
        handles[0].click()
        handles[0].send_keys(Keys.ARROW_LEFT)        # the shallow group one rung lower
        after = wait_for(lambda: [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".widget-output")
                                  if "memory" in e.text and e.text != before], 120)[0]
        driver.save_screenshot(os.environ.get("QR_SCREENSHOT") or str(tmp_path / "explorer.png"))
        return before, after, driver.find_element(By.TAG_NAME, "body").text

    # A workspace of its own (no tab of an earlier session reopened, so nothing tracked is autosaved) and
    # no news prompt over the page.
    settings = tmp_path / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    env = {**{k: v for k, v in os.environ.items() if k != "DISPLAY"}, "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "ws"),
           "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings")}
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1700"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        before, after, page = _serve(env, use=use)
    finally:
        driver.quit()
        shutil.rmtree(folder, ignore_errors=True)
        if not any(folder.parent.iterdir()):
            folder.parent.rmdir()
    assert "Error displaying widget" not in page
    assert "1.000 x budget (fits)" in before and "x budget" in after and after != before
    assert "predicted dev loss after" in before           # the learning curves' prediction is drawn
