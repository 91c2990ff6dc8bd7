"""The command line: every command documented, bad input exits 2 before any work, --help is quick."""
import os
import subprocess
import sys
import time

import pytest

from qr_lib import cli


def test_every_stage_and_tool_is_a_command_with_its_options_documented(capsys):
    for command in (*cli.STAGES, "estimate", "export", "stock", "sizing", "lengths", "base-grid"):
        with pytest.raises(SystemExit) as done:
            cli.main([command, "--help"])
        assert done.value.code == 0
        text = " ".join(capsys.readouterr().out.split())   # argparse wraps lines
        if command != "export":
            assert "--profile" in text and "--set" in text and "(default: default)" in text


@pytest.mark.parametrize("argv, message", [
    (["reproduce", "--profile", "nope"], "choose one of"),
    (["reproduce", "--profile", "smoke", "--set", "nsga.pop_size=\"4\""], "must be int"),
    (["reproduce", "--profile", "smoke", "--set", "proxy.stepz=4"], "did you mean 'steps'"),
    (["reproduce", "--profile", "smoke", "--only", "99"], "leaves no notebook"),
    (["reproduce", "--profile", "smoke", "--only", "01", "--skip", "01"], "leaves no notebook"),
    (["finetune", "--profile", "smoke", "--set", "finetune.seeds"], "not KEY=VALUE"),
    (["reproduce", "--profile", "smoke", "--set", "finetune.methods=[lora16,nf4]"], "quote each string"),
])
def test_bad_input_exits_2_naming_the_problem(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("QR_RESULTS_DIR", str(tmp_path))
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.rglob("*.json"))                     # nothing written


def test_help_answers_without_loading_the_heavy_libraries():
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "qr_lib", "--help"], capture_output=True, text=True, check=True)
    assert "reproduce" in out.stdout and time.time() - t0 < 5
    loaded = subprocess.run([sys.executable, "-c", "import sys, qr_lib.cli; print('torch' in sys.modules)"],
                            capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "False"


def test_the_paper_profile_plans_offline_without_a_gpu(capsys):
    assert cli.main(["reproduce", "--profile", "paper", "--dry-run", "--step-seconds", "1.5"]) == 0
    text = capsys.readouterr().out
    assert "meta-llama/Meta-Llama-3-8B" in text and "Phases II-III" in text
    assert "model parameters: 8,030,261,248" in text               # LLaMA-3-8B, from its shipped config
    assert " h" in text.split("time at 1.50 s per step")[1]


def test_a_whole_run_takes_its_starting_state_before_the_time_estimate(monkeypatch, tmp_path):
    """The estimate may read the model, which converts and caches it on a fresh machine: the default
    run of 2026-12-02 recorded "from nothing: False" and lost that conversion from its clock."""
    from qr_lib import cli
    from qr_lib.workbook import reproduce
    monkeypatch.setenv("QR_LIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("QR_RESULTS_DIR", str(tmp_path / "results"))

    def estimate(args, profile):
        (tmp_path / "cache" / "models" / "converted").mkdir(parents=True)

    seen = {}
    monkeypatch.setattr(cli, "_say_expected_time", estimate)
    monkeypatch.setattr(reproduce, "run", lambda *a, begun=None, **k: seen.update(begun=begun))
    assert cli.main(["reproduce", "--profile", "smoke"]) == 0
    assert seen["begun"][0]["from_nothing"] and seen["begun"][1] > 0


def _no_loopback_namespace() -> bool:
    """`unshare -rn`: a user and network namespace of our own, whose `lo` is down."""
    import shutil
    return bool(shutil.which("unshare")) and subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _no_loopback_namespace(), reason="user namespaces (unshare -rn) not available")
def test_the_notebooks_run_in_a_network_namespace_without_loopback(tmp_path):
    """The kernel is reached over Unix sockets (reproduce.IPCKernelManager): before, a namespace
    without `lo` waited 60 s and failed with "Kernel didn't respond", and every kernel warned that TCP
    is unencrypted."""
    import json
    notebook = tmp_path / "one.ipynb"
    notebook.write_text(json.dumps({"cells": [{"cell_type": "code", "execution_count": None, "metadata": {},
                                               "outputs": [], "source": ["print(6 * 7)"]}],
                                    "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    script = ("import sys; from pathlib import Path; from qr_lib.workbook import reproduce; "
              "reproduce.execute(Path(sys.argv[1]), Path(sys.argv[2]), {}, reproduce.ensure_kernel(), True)")
    out = subprocess.run(["unshare", "-rn", sys.executable, "-c", script, str(notebook), str(tmp_path / "run.ipynb")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    cells = json.loads((tmp_path / "run.ipynb").read_text())["cells"]
    assert cells[0]["outputs"][0]["text"] == ["42\n"]
    assert "without encryption" not in out.stderr + out.stdout


def test_a_streamed_run_keeps_the_cells_output_and_drops_papermills_cell_markers():
    import logging
    logger = logging.getLogger("papermill.test")
    make = logging.getLogger("papermill").makeRecord
    assert not cli._no_cell_markers(make("papermill", logging.INFO, "", 0, "Executing Cell 3-----", None, None))
    assert not cli._no_cell_markers(make("papermill", logging.INFO, "", 0, "Ending Cell 3-------", None, None))
    assert cli._no_cell_markers(make(logger.name, logging.INFO, "", 0, "[run 1/4] LoRA (16-bit), seed 0", None, None))


@pytest.mark.integration
@pytest.mark.parametrize("content, message", [
    (b'{"prompt": "Q: 1?", "answer": " 1"}\n{"prompt": "Q: 2?"}\n', "needs non-empty string fields"),
    (b"", "holds no usable example"),
    (b'{"prompt": "caf\xe9", "answer": " x"}\n', "not UTF-8"),
    (b'{"prompt": "Q: 1?", "answer": " 1"}\n', "fewer than"),
    (b'{"prompt": "Q: 1?", "answer": " 1", "source": ["x"]}\n', "optional 'source', a string"),
])
def test_bad_fine_tuning_data_exits_2_before_any_work(content, message, tmp_path, monkeypatch, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_bytes(content)
    monkeypatch.setenv("QR_RESULTS_DIR", str(tmp_path / "results"))
    assert cli.main(["reproduce", "--profile", "smoke", "--set", f"data.finetune={data}"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results").exists()                   # nothing written


def test_an_absurd_size_is_refused_with_its_estimate_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QR_RESULTS_DIR", str(tmp_path))
    assert cli.main(["reproduce", "--profile", "smoke", "--set", "nsga.pop_size=1000000000"]) == 2
    err = capsys.readouterr().err
    assert "hours" in err and "--set limits.max_hours=" in err
    assert not any(tmp_path.rglob("*"))                           # nothing written


@pytest.mark.parametrize("settings, message", [
    (["quant.group_size=-64"], "quant.group_size is -64"),
    (["quant.group_size=0"], "quant.group_size is 0"),
    (["quant.group_size=96"], "does not divide"),
    (["proxy.lr=NaN"], "proxy.lr is nan"),
    (["bit_ladder=[2,4,4]"], "repeats a rung"),
    (["model.name=/x"], "a single value"),
    (["nsga.pop_size=1000000000"], "limits.max_hours"),
    (["limits.max_memory_gib=0.001"], "--set limits.max_memory_gib="),
    # The hostile-user report's values: each once exited 0 with a wrong result or ended in a traceback.
    (["finetune.epochs=-1"], "finetune.epochs is -1.0"), (["proxy.steps=-3"], "proxy.steps is -3"),
    (["proxy.steps=0"], "proxy.steps is 0"), (["finetune.batch_size=0"], "finetune.batch_size is 0"),
    (["proxy.max_len=0"], "proxy.max_len is 0"), (["lora.dropout=1.5"], "lora.dropout is 1.5"),
    (["dtype=\"float8\""], "dtype is 'float8'"), (["finetune.schedule=\"bogus\""], "finetune.schedule is 'bogus'"),
    (["finetune.max_steps=-5"], "finetune.max_steps is -5"), (["eval.limit=-1"], "eval.limit is -1"),
    (["data.n_train=0"], "data.n_train is 0"), (["nsga.pop_size=0"], "nsga.pop_size is 0"),
    (["nsga.generations=-1"], "nsga.generations is -1"), (["finetune.seeds=[]"], "finetune.seeds is ()"),
    (["bo.iterations=-2"], "bo.iterations is -2"), (["finetune.grad_accum=0"], "finetune.grad_accum is 0"),
    (["parallel.backend=\"ray\""], "parallel.backend is 'ray'"), (["proxy.lr=1e308"], "proxy.lr is 1e+308"),
    (["device=\"cuda:99\""], "CUDA device(s)"),
    (["proxy.steps=null"], "proxy.steps is null"), (["data=null"], "data must be a mapping"),
    (["nsga.pop_size=null"], "pop_size is null"), (["finetune.seeds=null"], "seeds is null"),
    (["model=null"], "model is null"), (["proxy.lr=null"], "lr is null"), (["quant.group_size=null"], "group_size is null"),
])
def test_every_load_time_refusal_exits_2_from_the_command_line_with_nothing_written(settings, message, tmp_path,
                                                                                    monkeypatch, capsys):
    monkeypatch.setenv("QR_RESULTS_DIR", str(tmp_path))
    argv = ["search", "--profile", "smoke"] + [x for s in settings for x in ("--set", s)]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.rglob("*"))


# Method files the report fed a run: each trained, or trained another run, or failed after minutes.
BAD_METHODS = [
    ({"bits": 5, "rank": 8}, {}, "method bad: backend 'hqq' cannot quantize to [5] bits"),
    ({"shallow": [4], "deep": [2, 16]}, {}, "gives shallow [4]"),
    ({"shallow": [4, -8], "deep": [4, 16]}, {}, "gives shallow [4, -8]"),
    ({"shallow": [4, 0], "deep": [4, 0]}, {}, "rank 0 in both halves"),
    ({"bits": 4, "rank": -8}, {}, "bits > 0 and rank >= 1"),
    ({"bits": 4, "rank": 8}, {"quant": {"group_size": 0}}, "method bad: quant.group_size is 0"),
    ({"bits": 4, "rank": 8}, {"quant": {"groupsize": 64}}, "keys are among"),
    ({"bits": 4, "rank": 8}, {"adapter": "ia3"}, "adapter 'ia3' is not one of"),
    ({"search_at": 3.7}, {}, "search_at 3.7 is not a budget the search selects at"),
    ({"random": {"bits": 9, "draw": 0}}, {}, "a budget of 9 average bits lies outside bit_ladder"),
    ({"random": {"bits": 4, "draw": -1}}, {}, "draw that is not a non-negative integer"),
    ({"knapsack": {"bits": 4, "rank": 5}}, {}, "knapsack rank 5 is not on the rank ladder"),
    ({"search": {"rank_ladder": [0]}}, {}, "its search's rank_ladder holds [0]; ranks are positive"),
]


@pytest.mark.parametrize("where", ["profile", "command"])
@pytest.mark.parametrize("allocation, extra, message", BAD_METHODS)
def test_a_bad_method_file_is_refused_before_any_work_whether_the_profile_or_the_command_names_it(
        allocation, extra, message, where, tmp_path, monkeypatch, capsys):
    import json
    results = tmp_path / "results"
    monkeypatch.setenv("QR_RESULTS_DIR", str(results))
    method = tmp_path / "bad.json"
    method.write_text(json.dumps({"name": "bad", "allocation": allocation, **extra}))
    argv = (["search", "--profile", "smoke", "--set", f'finetune.methods=["{method}"]'] if where == "profile"
            else ["finetune", "--profile", "smoke", "--method", str(method)])
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not results.exists()                                   # nothing written, no model loaded


def test_pilot_rungs_the_backend_cannot_build_are_refused_at_load(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QR_RESULTS_DIR", str(tmp_path))
    assert cli.main(["pilot", "--profile", "smoke", "--set", "pilot.sweep_bits=[3,5]"]) == 2
    assert "cannot quantize to [5] bits" in capsys.readouterr().err
    assert not any(tmp_path.rglob("*"))


@pytest.mark.parametrize("argv", [
    ["finetune", "--profile", "smoke", "--method", "hqq4", "phase1_knapsack4", "qr_adaptor"],
    ["finetune", "--profile", "smoke", "--set", "finetune.methods=[\"lora16\",\"qr_adaptor\"]"],
])
def test_a_batch_whose_methods_need_missing_artifacts_is_refused_before_the_first_trains(argv, tmp_path,
                                                                                         monkeypatch, capsys):
    monkeypatch.setenv("QR_RESULTS_DIR", str(tmp_path))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "qr_adaptor needs the search" in err and "search.json is missing" in err
    if "phase1_knapsack4" in argv:
        assert "phase1_knapsack4 needs Phase I" in err
    assert not any(tmp_path.rglob("*"))                           # nothing written, nothing trained


def _older_rows(tmp):
    """The older rows of docs/BAD_INPUT.md as command lines: (argv, what the message says)."""
    bad_profile = tmp / "broken.json"
    bad_profile.write_text('{"model": "tiny",\n "nsga": {"pop_size": 4,}}')
    latin = tmp / "latin.json"
    latin.write_bytes(b'{"name": "caf\xe9"}')
    bad_method = tmp / "broken_method.json"
    bad_method.write_text('{"name": "x", "allocation": {"bits": 4, "rank": 8},}')
    per_block = tmp / "per_block.json"
    per_block.write_text('{"name": "x", "allocation": {"bits": [4, 4], "rank": [8, 8]}}')
    empty = tmp / "not-a-model"
    empty.mkdir()
    blocker = tmp / "a-file"
    blocker.write_text("")
    config_only = tmp / "config-only"                  # the report's case: a folder with config.json alone
    config_only.mkdir()
    (config_only / "config.json").write_text('{"model_type": "llama"}')
    no_weights = tmp / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text('{"model_type": "llama"}')
    (no_weights / "tokenizer.json").write_text("{}")
    smoke = ["--profile", "smoke"]
    return [
        (["search", "--profile", str(bad_profile)], "line 2"),
        (["search", "--profile", str(latin)], "UTF-8"),
        (["finetune", *smoke, "--method", str(bad_method)], "is not valid JSON (line 1"),
        (["finetune", *smoke, "--method", str(per_block)], "per-block choices are what the search selects"),
        (["search", *smoke, "--set", "bit_ladder=[2,4,5]"], "cannot quantize to [5] bits"),
        (["search", *smoke, "--set", "budget_bits=-4"], "a budget of -4 average bits"),
        (["search", *smoke, "--set", "rank_ladder=[-8,8]"], "rank_ladder"),
        (["search", *smoke, "--set", "budget_rank=12"], "budget_rank"),
        (["search", *smoke, "--set", "finetune.lr=-0.1"], "finetune.lr"),
        (["search", *smoke, "--set", f"model={empty}"], "not a model folder"),
        (["search", *smoke, "--set", f"model={config_only}"], "no tokenizer in"),
        (["search", *smoke, "--set", f"model={no_weights}"], "no weights in"),
        (["finetune", *smoke, "--method", "hqq4"], "cannot write results", blocker),
    ]


@pytest.mark.parametrize("row", range(13))
def test_the_older_bad_input_rows_exit_2_from_the_command_line_with_nothing_written(row, tmp_path, monkeypatch,
                                                                                    capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    argv, message, *results = _older_rows(inputs)[row]
    results_dir = results[0] if results else tmp_path / "results"
    monkeypatch.setenv("QR_RESULTS_DIR", str(results_dir))
    before = sorted(tmp_path.rglob("*"))
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert sorted(tmp_path.rglob("*")) == before                  # nothing written


def test_a_folder_or_an_array_given_as_profile_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QR_RESULTS_DIR", str(tmp_path / "results"))
    folder = tmp_path / "named.json"
    folder.mkdir()
    array = tmp_path / "array.json"
    array.write_text("[1]")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text('{"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, '
                                      '"num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 100}')
    (bert / "tokenizer.json").write_text("{}")          # present, so the check reaches the architecture
    (bert / "model.safetensors").write_bytes(b"")
    for argv, message in ((["estimate", "--profile", str(folder)], "is a folder"),
                          (["estimate", "--profile", str(array)], "not an object"),
                          (["estimate", "--profile", "smoke", "--set", f"model={bert}"], "LLaMA-like decoder")):
        assert cli.main(argv) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_the_terminal_shows_the_stages_progress_lines_and_errors_of_a_streamed_notebook():
    import logging

    from qr_lib.cli import _progress_only

    def record(msg, level=logging.INFO):
        return logging.LogRecord("papermill", level, __file__, 1, msg, (), None)
    chunk = record("<IPython.core.display.Markdown object>\n[run 3/33] QLoRA NF4, seed 1\n 42%|####  | 3/7\n")
    assert _progress_only(chunk) and chunk.getMessage() == "[run 3/33] QLoRA NF4, seed 1"
    assert _progress_only(record("[lengths 1/30] LoRA (16-bit), seed 0"))
    assert _progress_only(record("[base grid] embedded, hqq 4-bit: KL 0.2136"))
    for quiet in ("   method  seeds  test_loss\n0  lora16  3  3.33", "VBox(children=(HTML(value=''),))",
                  "Failed to load CPU gemm_4bit_forward from kernels-community"):
        assert not _progress_only(record(quiet)), quiet
    assert not _progress_only(record("Unable to parse line 3 'METHODS = None'", logging.WARNING))
    assert _progress_only(record("Traceback: the kernel died", logging.ERROR))


def _results_of(profile, tmp_path, monkeypatch):
    """A results folder whose setup artifact records `profile`, as every run's first stage writes it."""
    from qr_lib import store
    from qr_lib.layout import Layout
    monkeypatch.setenv("QR_RESULTS_DIR", str(tmp_path))
    layout = Layout.for_profile(profile.name)
    store.write_artifact(layout.setup, {"profile": profile}, {"model": {}, "datasets": []})
    return layout


@pytest.mark.parametrize("command", [["reproduce"], ["search"], ["base-grid"], ["lengths"], ["sizing"],
                                     ["finetune", "--method", "lora16"]])
def test_results_made_with_other_settings_are_never_overwritten_without_the_flag(command, tmp_path, monkeypatch,
                                                                                 capsys):
    from qr_lib.workbook.profiles import load_profile
    layout = _results_of(load_profile("smoke"), tmp_path, monkeypatch)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert cli.main([*command, "--profile", "smoke", "--set", "finetune.seeds=[7]", "--set", "dtype=bfloat16"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "dtype: 'float32' there, 'bfloat16' here" in err and "finetune.seeds: [0] there, [7] here" in err
    assert "--overwrite" in err and "Nothing was run" in err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before     # nothing touched
    assert layout.setup.exists()


def test_an_auto_profile_on_a_cpu_with_native_bf16_is_told_the_float32_results_differ(tmp_path, monkeypatch):
    """Profiles hold their dtype resolved: where "auto" means bf16, float32 results are other settings;
    the same profile pinned to float32 reads them."""
    from qr_lib.workbook import profiles, reproduce
    layout = _results_of(profiles.load_profile("smoke", {"dtype": "float32"}), tmp_path, monkeypatch)
    monkeypatch.setattr(profiles, "resolve_dtype", lambda name, device="cpu": "bfloat16" if name == "auto" else name)
    assert reproduce.other_settings(profiles.load_profile("smoke", {"dtype": "float32"}), layout) == []
    assert reproduce.other_settings(profiles.load_profile("smoke", {"dtype": "auto"}), layout) == [
        "dtype: 'float32' there, 'bfloat16' here"]


def test_one_command_per_results_folder_and_a_killed_holder_leaves_no_stale_lock(tmp_path, monkeypatch, capsys):
    """A second command on a folder another process is running on stops at once (exit 2), naming the
    holder; once that process is killed (SIGKILL: no cleanup of its own) the folder is free again."""
    import signal

    from qr_lib.layout import Layout
    monkeypatch.setenv("QR_RESULTS_DIR", str(tmp_path))
    lock = Layout.of("smoke").lock
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from qr_lib.store import hold_lock; "
                               "hold_lock(sys.argv[1]); print('held', flush=True); time.sleep(600)", str(lock)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cli.main(["base-grid", "--profile", "smoke"]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"is in use by pid {holder.pid}" in err and "wait for it to finish" in err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    from qr_lib.store import hold_lock
    hold_lock(lock)                                              # taken over: no stale lock in the way
    assert f"pid {os.getpid()}" in lock.read_text()


def test_sigterm_mid_run_prints_the_tools_line_and_exits_143_keeping_finished_work(tmp_path):
    """SIGTERM during a search: the tool's own line, exit 143, the lock released with the process, and
    every proxy record already written intact (a rerun reads them back)."""
    import signal

    from qr_lib.layout import Layout
    from qr_lib.store import read_artifact
    env = {**os.environ, "QR_RESULTS_DIR": str(tmp_path)}
    child = subprocess.Popen([sys.executable, "-m", "qr_lib", "search", "--profile", "smoke"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    evaluations = Layout(tmp_path / "smoke").evaluations
    deadline = time.time() + 300
    while time.time() < deadline and child.poll() is None and not list(evaluations.glob("*.json")):
        time.sleep(0.2)
    assert child.poll() is None, child.communicate()
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 143, err[-2000:]
    # The tool's line, not a traceback of its own (the notebook kernel, shut down mid-cell, may still log
    # its closed channel and nbclient its dead kernel).
    assert "stopped; every finished run and artifact is kept" in err and "qr_lib.cli.Stopped" not in err
    assert all(read_artifact(p) is not None for p in evaluations.glob("*.json"))
