"""benchmarks/compare_results.py: what it ignores, what it reports, and a comparison across a rename."""
import json
import runpy
import sys
from pathlib import Path

import pytest

SCRIPT = str(Path(__file__).resolve().parents[1] / "benchmarks" / "compare_results.py")


def _write(root: Path, name: str, obj) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _compare(monkeypatch, capsys, *args) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", [SCRIPT, *map(str, args)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(SCRIPT, run_name="__main__")
    return done.value.code, capsys.readouterr().out


def test_time_keys_and_checksums_are_ignored_a_result_is_not(tmp_path, monkeypatch, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    _write(a, "x.json", {"config": {"key": "0123456789abcdef"}, "result": {"loss": 1.0, "seconds": 3},
                         "checksum": "1", "environment": {"time": "then"}})
    _write(b, "x.json", {"config": {"key": "fedcba9876543210"}, "result": {"loss": 1.0, "seconds": 9},
                         "checksum": "2", "environment": {"time": "now"}})
    assert _compare(monkeypatch, capsys, a, b)[0] == 0
    _write(b, "x.json", {"config": {"key": "fedcba9876543210"}, "result": {"loss": 1.00001}})
    code, out = _compare(monkeypatch, capsys, a, b)
    assert code == 1 and "/result/loss" in out
    assert _compare(monkeypatch, capsys, a, b, "--digits", "4")[0] == 0


def test_a_rename_reads_keys_strings_and_paths_under_their_new_names(tmp_path, monkeypatch, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    _write(a, "calibration/0123456789abcdef.json", {"result": {"fidelity": "low"}})
    _write(a, "calibration.json", {"config": {"calibration": {"top_k": 5}}})
    _write(a, "manifest.json", {"files": {"tables/proxy_calibration.md": {}}, "runs": [["calibration"]]})
    _write(b, "proxy_check/fedcba9876543210.json", {"result": {"level": "low"}})
    _write(b, "proxy_check.json", {"config": {"proxy_check": {"top_k": 5}}})
    _write(b, "manifest.json", {"files": {"tables/proxy_check.md": {}}, "runs": [["proxy_check"]]})
    code, out = _compare(monkeypatch, capsys, a, b)
    assert code == 1 and "only before: calibration.json" in out
    renames = ["--rename", "fidelity=level", "--rename", "calibration=proxy_check",
               "--rename", "proxy_calibration=proxy_check"]
    code, out = _compare(monkeypatch, capsys, a, b, *renames)
    assert code == 0, out
    assert _compare(monkeypatch, capsys, a, b, "--rename", "calibration")[0] == 2      # not OLD=NEW: refused
