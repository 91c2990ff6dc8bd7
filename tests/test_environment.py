"""The conda environment and the pip install must pin the same versions."""
import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_environment_yml_matches_pyproject_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = project["project"]["dependencies"]
    assert all("==" in d for d in deps), "every dependency is pinned exactly"
    yml = (ROOT / "environment.yml").read_text()
    yml_pins = re.findall(r"^\s+- ([A-Za-z0-9_.\-\[\]]+==[^\s]+)$", yml, flags=re.M)
    assert sorted(yml_pins) == sorted(deps)
    for pin in project["tool"]["qr_lib"]["no_deps"]:
        assert pin in yml, f"{pin} (installed with --no-deps) is named in environment.yml"


def test_top_level_layout():
    expected = {"notebooks", "qr_lib", "results", "environment.yml", "tests", "Makefile", "README.md",
                "pyproject.toml", "LICENSE", "CITATION.cff", "docs", "benchmarks", "CHANGELOG.md"}
    present = {p.name for p in ROOT.iterdir() if not p.name.startswith(".")} - {"__pycache__"}
    present -= {p for p in present if p.endswith(".egg-info")}
    # what a make target builds and git ignores (/build/, /wheelhouse/) is not the repository's layout
    ignored = {line.strip("/") for line in (ROOT / ".gitignore").read_text().splitlines()
               if line.startswith("/") and line.endswith("/")}
    assert present - ignored == expected


def test_qr_lib_is_a_regular_package_and_artifacts_follow_the_umask(tmp_path):
    import os

    import qr_lib
    from qr_lib.store import atomic_write_bytes
    assert qr_lib.__file__ is not None                      # not a namespace package
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.json", b"{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644


def test_an_unwritable_results_folder_and_a_folder_that_is_no_model_are_named(tmp_path, monkeypatch):
    import pytest

    from qr_lib.errors import QRError
    from qr_lib.layout import Layout
    from qr_lib.models import resolve
    blocker = tmp_path / "a-file"
    blocker.write_text("")                           # a folder cannot be made under a file, even by root
    monkeypatch.setenv("QR_RESULTS_DIR", str(blocker))
    with pytest.raises(QRError, match="cannot write results"):
        Layout.for_profile("smoke")
    with pytest.raises(QRError, match="not a model folder"):
        resolve(str(tmp_path))
