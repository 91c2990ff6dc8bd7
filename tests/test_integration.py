"""On the embedded SmolLM2-135M and the installed data packages (slower; `make test` runs them)."""

import copy
from pathlib import Path

import pytest
import torch

from qr_lib import data as D
from qr_lib.algorithm import memory
from qr_lib.algorithm.allocation import Allocation
from qr_lib.algorithm.build import build, lora_parameters
from qr_lib.algorithm.train import perplexity, train
from qr_lib.config import QuantConfig, TrainConfig
from qr_lib.errors import QRError
from qr_lib.layout import Layout
from qr_lib.models import load_model, tiny_llama
from qr_lib.workbook.profiles import load_profile

pytestmark = pytest.mark.integration


def test_embedded_model_is_a_trained_llama(embedded):
    model, tok = embedded
    assert type(model).__name__ == "LlamaForCausalLM" and len(model.model.layers) == 30
    assert model.config.hidden_size == 576 and model.config.tie_word_embeddings
    _, held = D.load_texts(D.DataConfig(n_calib=0, n_heldout=16))
    trained = perplexity(model, tok, held, max_len=128)
    random = perplexity(tiny_llama(vocab=len(tok)), tok, held, max_len=128)
    assert trained < 100 < 1000 < random, (trained, random)


def test_installed_data_counts():
    counts = {t: len(D.benchmark_docs(t)) for t in D.BENCHMARKS}
    assert counts == {"arc_easy": 570, "arc_challenge": 299, "piqa": 1838, "hellaswag": 10042,
                      "winogrande": 1267, "boolq": 3270, "openbookqa": 500, "mmlu": 14042, "gsm8k": 1319}
    pool = D.commonsense_pool(D.Sources.installed())
    # after dropping evaluation items and keeping each identifying text once (setup_datasets.md)
    assert len(pool["arc_easy"]) == 2243 and len(pool["winogrande"]) == 40394


def test_default_splits_are_disjoint_and_never_evaluation_items():
    p = load_profile("default").data
    splits = D.load_finetune(p)
    assert len(splits.test) >= 512
    keys = [{D.normalize(e.key) for e in part} for part in (splits.train, splits.val, splits.test)]
    assert sum(map(len, keys)) == len(keys[0] | keys[1] | keys[2])  # pairwise disjoint
    assert not (keys[0] | keys[1] | keys[2]) & D.evaluation_keys(D.Sources.installed())


def test_mixed_embedded_model_builds_trains_and_matches_its_memory_formula(embedded):
    model, tok = embedded
    q = QuantConfig(backend="hqq", group_size=64, hqq_optimize=False)  # rounding only: the test is about plumbing
    bits = (2, 3, 4, 8, 16) * 6
    alloc = Allocation(bits=bits, ranks=(4, 8, 16) * 10, bit_ladder=(2, 3, 4, 8, 16))
    f = memory.formula_bytes(memory.model_shapes(model), alloc, q)
    stored = copy.deepcopy(model).to(torch.bfloat16)  # packed, in the storage dtype the formula counts
    m = memory.measured_bytes(build(stored, alloc, q, progress=False, dense=False))
    assert m["total"] == f["total"]
    peft_model = build(model, alloc, q, progress=False)
    train_set = D.load_finetune(D.DataConfig(n_train=16, n_val=8, n_test=8)).train
    log = train(peft_model, tok, train_set, TrainConfig(steps=1, batch_size=2, max_len=48), progress=False)
    assert not log["diverged"]
    grads = [p.grad for n, p in lora_parameters(peft_model) if "lora_A" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_unknown_model_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(QRError, match="could not load model 'no-such-org/no-such-model'.*'embedded'"):
        load_model("no-such-org/no-such-model")


def test_smoke_notebooks_execute_offline_write_every_headline_and_rerun_without_redoing(tmp_path, monkeypatch,
                                                                                        network_cut_inherited, capfd):
    """The whole workbook, setup to report, from the command line, in notebook kernels whose network is
    cut (and whose HF_*_OFFLINE switches are unset): not one connection is attempted, and the terminal
    gets a line per notebook and per run, the full output going to the results folder's log."""
    from qr_lib import cli
    from qr_lib.workbook import report, reproduce
    network_log = network_cut_inherited
    monkeypatch.setenv("QR_RESULTS_DIR", str(tmp_path))
    assert cli.main(["reproduce", "--profile", "smoke"]) == 0
    assert not network_log.exists(), network_log.read_text()
    said = capfd.readouterr()
    terminal = (said.out + said.err).splitlines()
    assert len(terminal) <= 60 and not any("object>" in ln or "%|" in ln for ln in terminal), terminal
    assert sum(ln.startswith("[run ") for ln in terminal) == len(Layout(tmp_path / "smoke").runs())
    out = tmp_path / "smoke"
    # The pilot runs a 16-bit reference at its own length, so each config's gap (and the destroyed rule)
    # is measured, and its two verdicts are judged as a family of their own.
    import pandas as pd
    configs = pd.read_csv(out / "tables" / "pilot_configs.csv")
    assert {"gap_to_lora16", "destroyed"} <= set(configs.columns) and configs["gap_to_lora16"].notna().all()
    assert set(pd.read_csv(out / "tables" / "pilot_verdict.csv")["family"]) == {"pilot"}
    claims = pd.read_csv(out / "tables" / "benchmarks_claims.csv")
    assert set(claims["family"]) <= {"primary", "benchmarks", "exploratory"} and "primary" in set(claims["family"])
    assert "Executing Cell" not in Layout(out).log.read_text() and len(Layout(out).log.read_text().splitlines()) > 100
    executed = {p.name for p in (out / "notebooks").glob("*.ipynb")}
    assert executed == {p.name for p in reproduce.notebooks()}
    assert [str(p) for _, _, p, ok in report.items(Layout(out)) if not ok] == []
    # Figures show inline in the executed copies (the PNG save_figure wrote), not only on disk.
    import json
    for name in ("02_sensitivity_profiling.ipynb", "03_nsga2_search.ipynb", "06_benchmarks.ipynb"):
        cells = json.loads((out / "notebooks" / name).read_text())["cells"]
        assert any("image/png" in o.get("data", {}) for c in cells for o in c.get("outputs", [])), name
        # Quiet: no warnings dumped into cells, and a bounded amount of progress text.
        stderr = "".join("".join(o["text"]) for c in cells for o in c.get("outputs", []) if o.get("name") == "stderr")
        assert "Warning" not in stderr, (name, stderr[:500])
    for nb in (out / "notebooks").glob("*.ipynb"):
        cells = json.loads(nb.read_text())["cells"]
        lines = [ln for c in cells for o in c.get("outputs", []) if o.get("name") == "stderr"
                 for ln in "".join(o["text"]).splitlines() if ln.strip()]
        assert len(lines) <= 80, (nb.name, len(lines), lines[:20])
        assert reproduce.WIDGET not in nb.read_text() and str(tmp_path) not in nb.read_text(), nb.name
    # The estimate counts what the run did: every final run, pilot run and proxy-check curve, and at
    # least as many proxy candidates as were scored.
    from qr_lib.workbook import estimate
    from qr_lib.workbook.profiles import load_profile
    counted = estimate.work(load_profile("smoke"))
    done = Layout(out)
    assert counted["final fine-tunes"].counts["runs (at most)"] == len(done.runs())
    assert counted["pilot"].counts["runs"] == len(done.pilot.runs())
    curves = len(list(done.proxy_check_curve("x").parent.glob("*.json")))
    at_most = counted["proxy check"].counts["runs (at most)"]
    # one allocation fewer where the search selected a uniform one (two methods, one allocation)
    assert at_most - len(load_profile("smoke").proxy_check.seeds) <= curves <= at_most
    candidates = counted["Phases II-III"].counts
    assert len(list(done.evaluations.glob("*.json"))) <= (candidates["search-level candidates"]
                                                           + candidates["full-level candidates (at most)"])
    index = (out / "README.md").read_text()
    assert "tables/benchmarks.md" in index and "figures/nsga_hypervolume.png" in index
    finished = {p: p.stat().st_mtime for p in out.rglob("result.json")}
    assert len(finished) >= 5
    reproduce.run("smoke", only=["05"])  # a rerun reads every finished run back
    assert {p: p.stat().st_mtime for p in out.rglob("result.json")} == finished
    # The committed default run has the structure a fresh run writes: the same tables, figures,
    # executed notebooks and stage artifacts (runs and evaluations differ in number, not in kind).
    committed = Path(__file__).resolve().parents[1] / "results" / "default"
    # The studies' tables and figures (their save()s), written only where `make sizing`, `make lengths`,
    # `make base-grid` and `make stock-eval` ran, which the smoke run does not.
    optional = {"learning_curves", "sizing_rungs", "sizing_order_changes", "lengths", "lengths_trends", "base_grid",
                "stock_lm_eval"}

    def layout(d):
        return {str(p.relative_to(d)) for pattern in ("*.json", "*.md", "tables/*", "figures/*", "notebooks/*")
                for p in d.glob(pattern) if p.with_suffix("").name not in optional}
    assert layout(committed) == layout(out)


def test_the_shipped_config_of_the_embedded_model_has_its_shapes(embedded):
    """Shapes, memory and load-time checks read qr_lib/reference/configs/embedded.json instead of
    converting the GGUF: it must describe the model the GGUF builds."""
    from qr_lib.models import load_skeleton
    assert memory.model_shapes(load_skeleton("embedded")) == memory.model_shapes(embedded[0])
