"""Memory at a published shape on a random-weight model: the path benchmarks/paper_shapes.py runs at the
1B and 8B shapes, here on a small config (and the 8B formula table, which builds nothing)."""
import json
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "benchmarks" / "paper_shapes.py")
SMALL = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256}


def _run(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", [SCRIPT, *args])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(SCRIPT, run_name="__main__")
    return done.value.code


def test_a_random_model_of_a_shipped_shape_needs_no_hub():
    from qr_lib.algorithm.memory import model_shapes
    from qr_lib.models import load_skeleton, random_model
    for name, blocks in (("meta-llama/Meta-Llama-3-8B", 32), ("Qwen/Qwen3-8B", 36), ("meta-llama/Llama-3.2-1B", 16)):
        assert model_shapes(load_skeleton(name)).n_blocks == blocks
    small = random_model(str(ROOT / "qr_lib" / "reference" / "configs" / "meta-llama--Llama-3.2-1B.json"), device="meta")
    assert small.config.hidden_size == 2048


def test_formula_equals_measured_for_every_method_on_a_small_config(tmp_path, monkeypatch):
    config = tmp_path / "small.json"
    config.write_text(json.dumps(SMALL))
    monkeypatch.setenv("QR_RESULTS_DIR", str(tmp_path / "results"))
    out = tmp_path / "small-memory.json"
    assert _run(monkeypatch, "--model", str(config), "--in-process", "--seq-len", "16", "--out", str(out)) == 0
    record = json.loads(out.read_text())
    assert record["result"]["weights"].startswith("random weights")
    rows = {r["method"]: r for r in record["result"]["rows"]}
    assert set(rows) == {"lora16", "hqq4", "nf4", "hqq3", "mixed3p5"}
    for r in rows.values():
        assert r["measured_over_formula"] == 1 and r["peak_bytes"] > 0 and r["loss_finite"]
    assert rows["nf4"]["peak_over_nf4"] == 1 and rows["mixed3p5"]["avg_bits"] == 3.5
    assert rows["mixed3p5"]["blocks_over_nf4"] < rows["hqq4"]["blocks_over_nf4"] < rows["lora16"]["blocks_over_nf4"]
    md = out.with_suffix(".md").read_text()
    assert "random weights" in md and "12.8 GB" in md and "14.2 GB" in md       # the paper's, labelled


def test_the_8b_formula_table_builds_nothing(tmp_path, monkeypatch):
    out = tmp_path / "llama8b.json"
    assert _run(monkeypatch, "--model", "meta-llama/Meta-Llama-3-8B", "--formula-only", "--out", str(out)) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["result"]["rows"]}
    assert rows["mixed3p5"]["nominal_bits_over_4"] == 0.875                    # the paper's "12% less"
    assert 0.9 < rows["mixed3p5"]["weights_over_nf4"] < 1                       # with metadata and packing


@pytest.mark.integration
def test_each_method_is_measured_in_a_process_of_its_own(tmp_path, monkeypatch):
    config = tmp_path / "small.json"
    config.write_text(json.dumps(SMALL))
    out = tmp_path / "isolated.json"
    assert _run(monkeypatch, "--model", str(config), "--methods", "nf4", "mixed3p5", "--seq-len", "16",
                "--out", str(out)) == 0
    record = json.loads(out.read_text())
    assert record["config"]["process_per_method"] and len(record["result"]["rows"]) == 2
    assert all(r["measured_over_formula"] == 1 for r in record["result"]["rows"])
