"""The pilot study's bookkeeping, the report's index and the reproduce runner's plumbing."""
import dataclasses
from pathlib import Path

import pandas as pd
import pytest

from qr_lib.errors import QRError
from qr_lib.layout import Layout
from qr_lib.workbook import pilot, report, reproduce
from qr_lib.workbook.profiles import load_profile


def test_pilot_configs_are_memory_matched_and_c_mirrors_d():
    from qr_lib.algorithm.memory import model_shapes
    from qr_lib.config import QuantConfig
    from qr_lib.models import tiny_llama

    ranks = pilot.matched_ranks(model_shapes(tiny_llama()), QuantConfig(group_size=64, hqq_optimize=False), 0.03)
    assert ranks["C"][0] == 16 and all(abs(ratio - 1) <= 0.03 for _, ratio in ranks.values())
    assert ranks["B"][0] > ranks["A"][0]          # 2-bit weights leave room for more rank
    assert ranks["C"] == ranks["D"]                # mirrored bits at equal memory: equal rank
    spec = {m.id: m.allocation for m in pilot.config_methods(ranks)}
    assert list(spec) == ["config_A", "config_B", "config_C", "config_D"]
    assert spec["config_C"]["shallow"][0] == spec["config_D"]["deep"][0] == 4
    assert spec["config_C"]["deep"][0] == spec["config_D"]["shallow"][0] == 2
    assert len(pilot.sweep_methods(pilot.PilotConfig())) == 9
    with pytest.raises(QRError, match="memory_tolerance"):
        pilot.matched_ranks(model_shapes(tiny_llama()), QuantConfig(group_size=64, hqq_optimize=False), 1e-6)
    # The default profile's pilot: the lowest rung the embedded model survives (3 bits) in place of 2.
    ranks = pilot.matched_ranks(model_shapes(tiny_llama()), QuantConfig(group_size=64, hqq_optimize=False), 0.03, (3, 4))
    # On the tiny model one rank step outweighs a bit per weight: B may only match A's rank.
    assert ranks["C"] == ranks["D"] and ranks["B"][0] >= ranks["A"][0]
    spec = {m.id: m.allocation for m in pilot.config_methods(ranks, (3, 4))}
    assert spec["config_B"] == {"shallow": [3, ranks["B"][0]], "deep": [3, ranks["B"][0]]}
    assert spec["config_C"]["deep"][0] == spec["config_D"]["shallow"][0] == 3
    assert load_profile("default").pilot.bits == (3, 4)


def test_pilot_profile_trains_its_own_length_on_fresh_pairs_and_keeps_the_callers_other_settings():
    p = load_profile("smoke", {"data.n_train": 32, "pilot.steps": 12, "finetune.lr": 3e-4})
    q = pilot.pilot_profile(p)
    f = q.finetune
    assert f.train_config(q.data.n_train, 0).steps == 12 and q.data.n_train == 12 * f.batch_size * f.grad_accum
    assert f.lr == 3e-4 and q.eval.tasks == tuple(p.pilot.tasks) and f.n_test == p.pilot.n_test


def test_report_sections_are_the_notebooks_that_wrote_each_file(tmp_path):
    """The report's sections come from the manifest (which notebook wrote which file) and each executed
    notebook's own heading: a section per notebook in order, its tables before its figures, CSVs left out
    (the Markdown copy shows), a listed file gone from disk named as missing."""
    import json

    from qr_lib.store import write_json

    layout = Layout(tmp_path)
    layout.notebooks.mkdir(parents=True)
    for nb, heading in (("00_setup.ipynb", "# 00 · Setup: the model"), ("01_pilot.ipynb", "# 01 · Pilot: rank")):
        (layout.notebooks / nb).write_text(json.dumps({"cells": [
            {"cell_type": "markdown", "source": [heading + "\n", "\n**Question:** ..."]}]}))
    files = {"figures/pilot_configs.png": "01_pilot.ipynb", "tables/pilot_configs.md": "01_pilot.ipynb",
             "tables/pilot_configs.csv": "01_pilot.ipynb", "tables/setup_model.md": "00_setup.ipynb"}
    write_json(layout.manifest, {"files": {f: {"notebook": nb} for f, nb in files.items()}, "notebooks": {}})
    for f in ("tables/setup_model.md", "tables/pilot_configs.md"):
        (tmp_path / f).parent.mkdir(exist_ok=True)
        (tmp_path / f).write_text("| a |\n|---|\n| 1 |\n")
    rows = [(title, nb, str(p.relative_to(tmp_path)), ok) for title, nb, p, ok in report.items(layout)]
    assert rows == [("00 · Setup: the model", "00_setup", "tables/setup_model.md", True),
                    ("01 · Pilot: rank", "01_pilot", "tables/pilot_configs.md", True),
                    ("01 · Pilot: rank", "01_pilot", "figures/pilot_configs.png", False)]


def test_progress_bars_are_plain_text_when_reproduce_streams_to_a_terminal(monkeypatch):
    import io

    import tqdm.std

    from qr_lib import progress

    monkeypatch.setenv(progress.PLAIN_ENV, "1")
    text = io.StringIO()
    bar = progress.tqdm(range(3), desc="steps", file=text)
    assert type(bar) is tqdm.std.tqdm and bar.mininterval == progress.PLAIN_INTERVAL
    list(bar)
    assert "steps: 100%" in text.getvalue()


def test_compute_time_sums_what_each_stage_recorded_counting_search_evaluations_once(tmp_path):
    from qr_lib.store import write_artifact, write_json

    def record(path, seconds):
        write_artifact(path, {}, {"seconds": seconds})

    layout = Layout(tmp_path)
    record(layout.sensitivity, 60.0)
    for i, s in enumerate([10.0, 20.0]):
        record(layout.evaluation(f"e{i}"), s)
    record(layout.run("lora16", 0).result, 300.0)
    record(layout.run("lora16", 1).result, 200.0)
    record(layout.run("lora16", 2).result, 1e9)
    record(layout.proxy_check_curve("c0"), 40.0)
    record(layout.sizing_curve("lora16"), 900.0)
    damaged = layout.run("lora16", 2).result                # a damaged record is named and left out
    damaged.write_text(damaged.read_text()[:50])
    write_json(layout.manifest, {"files": {}, "notebooks": {"00_setup.ipynb": {"seconds": 5.0},
                                                           "06_benchmarks.ipynb": {"seconds": 7.0}}})
    with pytest.warns(UserWarning, match="damaged or was edited"):
        rows = {r["stage"]: r for r in report.compute_time(layout)}
    assert list(rows) == ["00", "02", "03-04", "05", "06 proxy check", "sizing", "06", "all"]
    assert rows["06 proxy check"]["seconds"] == 40.0 and rows["sizing"]["seconds"] == 900.0
    assert (rows["03-04"]["count"], rows["03-04"]["seconds"]) == (2, 30.0)
    assert (rows["05"]["count"], rows["05"]["seconds"]) == (2, 500.0)
    assert rows["all"]["seconds"] == 5 + 60 + 30 + 500 + 40 + 900 + 7
    assert rows["03-04"]["source"] == "evaluations/*.json" and rows["05"]["source"] == "runs/*/seed*/result.json"
    assert report.compute_time(Layout(tmp_path / "nothing")) == []
    # A notebook 06 that ran the proxy check itself is counted apart from it, never twice; the length
    # check's runs have a row of their own.
    write_json(layout.manifest, {"files": {}, "notebooks": {"06_benchmarks.ipynb": {"seconds": 52.0}}})
    record(layout.at_length(2).run("lora16", 0).result, 600.0)
    with pytest.warns(UserWarning, match="damaged or was edited"):
        rows = {r["stage"]: r for r in report.compute_time(layout)}
    assert rows["06"]["seconds"] == 12.0 and rows["lengths x2"]["seconds"] == 600.0


def test_an_unchanged_artifact_keeps_the_provenance_of_the_run_that_made_it(tmp_path, monkeypatch):
    from qr_lib import store

    path = tmp_path / "stage.json"
    first = store.write_artifact(path, {"steps": (1, 2)}, {"loss": 0.5})
    monkeypatch.setattr(store, "environment", lambda: {"time": "later"})
    assert store.write_artifact(path, {"steps": (1, 2)}, {"loss": 0.5}) == first  # a rerun that read it back
    assert store.read_json(path)["environment"] == first["environment"]
    store.write_artifact(path, {"steps": (1, 2)}, {"loss": 0.4})
    assert store.read_json(path) == {"config": {"steps": [1, 2]}, "environment": {"time": "later"},
                                     "result": {"loss": 0.4},
                                     "checksum": store.checksum({"steps": [1, 2]}, {"loss": 0.4})}


def test_every_notebook_runs_on_the_projects_kernel():
    import json
    for nb in reproduce.notebooks():
        content = json.loads(nb.read_text())
        assert content["metadata"]["kernelspec"]["name"] == reproduce.KERNEL, nb.name
        # nbformat 4.5 cells carry ids; without them papermill warns and future nbformat refuses.
        assert all("id" in c for c in content["cells"]), nb.name


def test_a_saved_figure_is_written_and_closed_outside_a_notebook(tmp_path):
    import matplotlib.pyplot as plt

    from qr_lib.store import in_notebook, save_figure
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    path = save_figure(fig, Layout(tmp_path), "line")
    assert path.exists() and path.stat().st_size > 0
    assert not plt.fignum_exists(fig.number) and not in_notebook()


def test_reproduce_refuses_a_selection_that_matches_no_notebook(tmp_path, monkeypatch):
    from qr_lib.errors import QRError
    monkeypatch.setenv("QR_RESULTS_DIR", str(tmp_path))
    with pytest.raises(QRError, match="leaves no notebook"):
        reproduce.run("smoke", only=["99"])
    assert not (tmp_path / "smoke" / "tables").exists()       # nothing written


def test_a_benchmark_of_another_profile_never_overwrites_the_committed_one():
    from qr_lib.layout import benchmarks_dir
    assert benchmarks_dir("default").name == "benchmarks" and benchmarks_dir("smoke").parent.name == "benchmarks"


def test_the_benchmark_runs_end_to_end_on_smoke_and_honours_its_settings(tmp_path, monkeypatch):
    """Every part of `make benchmark` (memory, round-robin step times, the dtype check) on the tiny
    model, from its command line, with a --set that must reach the run."""
    import json
    import runpy
    import sys

    monkeypatch.setenv("QR_RESULTS_DIR", str(tmp_path))
    script = str(Path(__file__).resolve().parents[1] / "benchmarks" / "memory_step_time.py")
    monkeypatch.setattr(sys, "argv", [script, "--profile", "smoke", "--set", "quant.group_size=32", "--steps", "1",
                                      "--warmup", "0", "--batch-size", "2", "--seq-len", "16", "--dtype-rounds", "1"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(script, run_name="__main__")
    assert done.value.code == 0
    out = tmp_path / "benchmarks" / "smoke" / "memory_step_time.json"
    record = json.loads(out.read_text())
    assert record["config"]["profile"]["quant"]["group_size"] == 32        # the override reached the run
    result = record["result"]
    assert all(r["measured_over_formula"] == 1 for r in result["rows"])
    assert result["dtype_check"]["float32_s"] > 0 and result["dtype_check"]["bfloat16_s"] > 0
    flops = result["flops"]                          # the step's FLOP/s against the machine's own matmul rate
    assert flops["step_flops"] > 0 and flops["matmul_flops_per_s"] > 0
    assert flops["achieved_over_matmul"] == pytest.approx(flops["step_flops"] / flops["step_s"] / flops["matmul_flops_per_s"])
    text = out.with_suffix(".md").read_text()
    assert "Compute dtype on this machine" in text and "GFLOP/s" in text


def test_the_report_shows_what_the_manifest_records_and_says_when_there_is_none(tmp_path, monkeypatch):
    import IPython.display

    from qr_lib.store import write_json

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda x: shown.append(str(getattr(x, "data", ""))))
    layout = Layout(tmp_path)
    report.show(layout)
    assert any("No table or figure is recorded" in s for s in shown)
    layout.tables.mkdir()
    layout.table("stock_lm_eval").write_text("| task |\n|---|\n| piqa |\n")
    write_json(layout.manifest, {"files": {"tables/stock_lm_eval.md": {"notebook": "00_setup.ipynb"}}, "notebooks": {}})
    shown.clear()
    report.show(layout)
    at = next(i for i, s in enumerate(shown) if s.startswith("## 00_setup.ipynb"))  # no executed copy: its file name
    assert "| piqa |" in shown[at + 1] and not any("No table or figure" in s for s in shown)


def test_committed_notebooks_carry_no_widget_and_no_absolute_path():
    """Every notebook in the repository, source or executed copy: no frozen widget (a progress bar
    saved mid-way) and no path of the machine that ran it (reproduce.tidy)."""
    import json
    import re

    from qr_lib import REPO_DIR
    from qr_lib.workbook.reproduce import WIDGET
    found = sorted(REPO_DIR.glob("notebooks/*.ipynb")) + sorted(REPO_DIR.glob("results/*/notebooks/*.ipynb"))
    assert len(found) >= 9
    for path in found:
        text = path.read_text(encoding="utf-8")
        outputs = [o for c in json.loads(text)["cells"] for o in c.get("outputs", [])]
        assert not any(WIDGET in o.get("data", {}) for o in outputs), path
        assert str(REPO_DIR) not in text and not re.search(r"['\"(]/(root|home|Users|tmp)/", text), path


def test_committed_lm_eval_records_carry_no_absolute_path():
    """lm-eval writes the model's and the tasks' folders into its results: kept as any machine reads them
    (layout.portable), so a record says nothing of the machine that ran it."""
    import re

    from qr_lib import REPO_DIR
    found = sorted(REPO_DIR.glob("results/**/lm_eval/results_*.json"))
    assert found
    for path in found:
        assert not re.search(r"\"/(root|home|Users|tmp|work)/", path.read_text()), path


def test_an_executed_copy_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """papermill saves its copy after every cell: a full disk once left 12 KB of invalid JSON in place of
    the executed notebook. It now writes a hidden partial file that only a whole, tidied copy replaces."""
    import json

    import papermill as pm

    from qr_lib.workbook import reproduce
    out = tmp_path / "01_x.ipynb"
    out.write_text('{"the": "last whole copy"}')
    whole = {"cells": [], "metadata": {"papermill": {"output_path": "?"}}, "nbformat": 4, "nbformat_minor": 5}

    def disk_full(notebook, output, **kwargs):
        Path(output).write_text(json.dumps(whole)[:12])
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(pm, "execute_notebook", disk_full)
    with pytest.raises(OSError):
        reproduce.execute(tmp_path / "in.ipynb", out, {}, "k")
    assert json.loads(out.read_text()) == {"the": "last whole copy"} and sorted(tmp_path.iterdir()) == [out]

    def cell_fails(notebook, output, **kwargs):
        Path(output).write_text(json.dumps(whole))
        raise pm.PapermillExecutionError(0, 1, "boom", "ValueError", "bad", [])
    monkeypatch.setattr(pm, "execute_notebook", cell_fails)
    with pytest.raises(pm.PapermillExecutionError):
        reproduce.execute(tmp_path / "in.ipynb", out, {}, "k")     # the copy with the error is kept, whole
    assert json.loads(out.read_text())["metadata"]["papermill"]["output_path"] == str(out)
    assert sorted(tmp_path.iterdir()) == [out]


def test_tidy_drops_widgets_and_progress_lines_and_makes_paths_relative(tmp_path, monkeypatch):
    import json

    from qr_lib import REPO_DIR
    from qr_lib.workbook import reproduce
    monkeypatch.setenv("QR_RESULTS_DIR", str(tmp_path / "elsewhere"))
    nb = {"cells": [{"cell_type": "code", "source": [], "metadata": {}, "outputs": [
        {"output_type": "display_data", "metadata": {}, "data": {reproduce.WIDGET: {"model_id": "x"},
                                                                  "text/plain": ["Loading weights: 0%"]}},
        {"output_type": "stream", "name": "stderr", "text": ["\r", "train:  42%|####   | 10/24 [00:03<00:04, 3.1it/s]"]},
        {"output_type": "stream", "name": "stderr", "text": ["\x1b[A\n", "\x1b[A\n"]},
        {"output_type": "stream", "name": "stderr", "text": ["a real warning\n"]},
        {"output_type": "execute_result", "metadata": {}, "execution_count": 1,
         "data": {"text/plain": [f"PosixPath('{tmp_path / 'elsewhere'}/smoke/figures/a.png')"]}}]}],
        "metadata": {"papermill": {"input_path": f"{REPO_DIR}/notebooks/01.ipynb"}}, "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(nb))
    reproduce.tidy(path)
    got = json.loads(path.read_text())
    outputs = got["cells"][0]["outputs"]
    assert [o["output_type"] for o in outputs] == ["stream", "execute_result"]
    assert outputs[0]["text"] == ["a real warning\n"]
    assert outputs[1]["data"]["text/plain"] == ["PosixPath('results/smoke/figures/a.png')"]
    assert got["metadata"]["papermill"]["input_path"] == "./notebooks/01.ipynb"


def test_the_estimate_measures_this_machine_once_and_prices_every_stage(monkeypatch, tmp_path, capsys):
    """`estimate --measure` times each unit of work (cached per machine) and gives every stage in minutes;
    the seconds are the counts times the measured unit costs."""
    from qr_lib import cli
    from qr_lib.workbook import estimate
    from qr_lib.workbook.profiles import load_profile
    monkeypatch.setenv("QR_RESULTS_DIR", str(tmp_path / "results"))
    assert cli.main(["estimate", "--profile", "smoke", "--measure"]) == 0
    out = capsys.readouterr().out
    assert "time on this machine, every stage's work" in out and "total:" in out and " min" in out
    profile = load_profile("smoke")
    speed = estimate.cached_speed(profile)
    assert speed is not None and speed.step > 0 and speed.notebook > 0
    monkeypatch.setattr(estimate, "train", lambda *a, **k: pytest.fail("measured again"))
    assert estimate.measure_speed(profile) == speed                      # cached
    with pytest.raises(pytest.fail.Exception, match="measured again"):
        estimate.measure_speed(profile, progress=False, fresh=True)     # --remeasure times again
    result = estimate.estimate(profile, speed=speed)
    assert "in float32 on cpu, runner serial" in out
    stage = result.stages["final fine-tunes"]
    expected = (stage.steps * speed.step + (stage.examples + stage.lm_eval_requests) * speed.example
                + stage.generated_tokens * speed.token + stage.models_built * speed.build
                + stage.model_loads * speed.load + stage.lm_eval_calls * speed.lm_eval_call + speed.notebook)
    assert result.minutes["final fine-tunes"] * 60 == pytest.approx(expected)
    assert not (tmp_path / "results").exists()                          # an estimate writes no results
    # On local workers a stage's runs share the workers, each at one worker's speed, after their start.
    worker = dataclasses.replace(speed, step=2 * speed.step, cluster=5.0)
    two = estimate.estimate(profile, speed=speed, worker=worker)
    heavy = expected - stage.model_loads * speed.load - speed.notebook
    light = expected - heavy
    assert two.minutes["final fine-tunes"] * 60 == pytest.approx(
        light + 5.0 + speed.load + (heavy + stage.steps * speed.step) / 2)
    assert two.minutes["Phase I"] == result.minutes["Phase I"]       # not a runner stage


@pytest.mark.integration
def test_local_workers_are_timed_together_each_in_its_own_process(monkeypatch, tmp_path):
    """A runner worker's speed is measured with every worker timing at once, in processes of their own
    (they share the cores), and cached beside the main process's."""
    from qr_lib.workbook import estimate
    profile = load_profile("smoke", {"parallel.backend": "dask", "parallel.workers": 2})
    started = []
    real = estimate.multiprocessing.get_context

    def context(method):
        started.append(method)
        return real(method)
    monkeypatch.setattr(estimate.multiprocessing, "get_context", context)
    monkeypatch.setattr(estimate, "_speed_file", lambda key: tmp_path / f"{key}.json")
    estimate.measure_speed(profile, progress=False)
    worker = estimate.cached_worker_speed(profile)
    assert started[0] == "spawn" and worker is not None and worker.step > 0 and worker.cluster > 0  # then the cluster


def test_the_pilots_bits_by_rank_sweep_is_a_grid_table_and_a_heatmap_with_the_reference_gap(tmp_path, base):
    """The teaching sweep: uniform (bits, rank) runs at the first seed, tabled as a bits x rank grid of
    test loss and drawn as a heatmap whose cells give each loss and its gap to the 16-bit reference."""
    profile = load_profile("smoke", {"pilot.steps": 2, "pilot.seeds": [0], "pilot.sweep_bits": [2, 4],
                                     "pilot.sweep_ranks": [4, 8], "pilot.n_test": 8})
    layout = Layout(tmp_path)
    pilot.run(profile, layout, *base, progress=False)
    out = pilot.save(profile, layout)
    grid = pd.read_csv(layout.table("pilot_rank_sweep", ".csv")).set_index("bits")
    assert list(grid.index) == [2, 4] and list(grid.columns) == ["4", "8"]
    assert grid.loc[4, "8"] == pytest.approx(out["sweep"].query("bits == 4 and rank == 8")["test_loss"].iloc[0], abs=1e-4)
    assert layout.figure("pilot_rank_heatmap").exists() and layout.figure("pilot_rank_sweep").exists()


def test_the_report_opens_with_a_summary_read_from_the_tables_it_cites(tmp_path):
    import pandas as pd

    from qr_lib.layout import Layout
    from qr_lib.store import save_table
    from qr_lib.workbook import report
    layout = Layout(tmp_path)
    assert report.summary(layout) == ""                              # nothing written yet, nothing said
    row = {"id": "x", "claim": "A beats B", "a": "A", "b": "B", "a_minus_b": -0.0275, "ci95_low": -0.0768,
           "ci95_high": 0.0218, "verdict": "can't tell"}
    save_table(pd.DataFrame([{**row, "family": "primary"}, {**row, "id": "y", "family": "exploratory"}]), layout,
               "benchmarks_claims")
    save_table(pd.DataFrame([{"id": "x", "reading": "needs 8 seeds"}]), layout, "claims_power")
    save_table(pd.DataFrame([{**row, "steps": s, "verdict": v} for s, v in ((96, "worse"), (48, "can't tell"))]),
               layout, "lengths")
    text = report.summary(layout)
    assert "Holm over 1" in text and "A beats B: -0.028 [-0.077, +0.022], **can't tell** (needs 8 seeds" in text
    assert "can't tell at 48 steps, worse at 96 steps" in text and "Pilot" not in text
