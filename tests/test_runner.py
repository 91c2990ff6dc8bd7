"""Every stage that trains runs through one loop on the runner (runner.each): on two Dask workers its
artifacts equal a serial run's, stage by stage."""
import json
import os

import pytest

from qr_lib.algorithm.runner import SERIAL, each, open_runner
from qr_lib.config import ParallelConfig
from qr_lib.layout import Layout
from qr_lib.workbook import proxy_check, finetune, lengths, pilot, sizing
from qr_lib.workbook.profiles import load_profile


def test_each_runs_every_call_here_in_order_with_a_line_each(capsys):
    out = each(SERIAL, "stage", [(1,), (2,)], worker=None, here=lambda x: 10 * x, names=["one", "two"])
    assert out == [10, 20]
    assert capsys.readouterr().out.splitlines() == ["[stage 1/2] one", "[stage 2/2] two"]


class _Reversed:
    """A parallel runner in miniature: every call runs, and they finish last first."""
    parallel = True

    def map(self, fn, calls, done=None):
        out = [fn(*args) for args in calls]
        for k in reversed(range(len(calls))):
            done(k)
        return out


def test_each_says_which_call_finished_as_workers_finish_then_reads_back_quietly(capsys):
    written = []
    out = each(_Reversed(), "stage", [(1,), (2,)], worker=written.append, here=lambda x: 10 * x, names=["one", "two"])
    assert out == [10, 20] and written == [1, 2]
    assert capsys.readouterr().out.splitlines() == ["[stage 1/2] two: finished on a worker",
                                                    "[stage 2/2] one: finished on a worker"]


def _stages(profile, layout, base, tok, runner):
    """Every training stage of a small profile, each through the runner: final runs, pilot, length
    study, sizing curves, proxy-check proxies."""
    finetune.run_all(profile, layout, base, tok, runner=runner, progress=False)
    pilot.run(profile, layout, base, tok, runner, progress=False)
    lengths.run(profile, layout, base, tok, runner, progress=False)
    sizing.run(profile, layout, base, tok, runner, progress=False)
    proxy_check.run(profile, layout, base, tok, runner, progress=False)


def _losses(layout):
    runs = {(stage, r.method, r.seed): r.test_loss for stage, sub in
            (("final", layout), ("pilot", layout.pilot), ("x2", layout.at_length(2))) for r in finetune.results(sub)}
    curves = {c["method"]: c["checkpoints"] for c in sizing.curves(layout)}
    proxies = json.loads(layout.proxy_check.read_text())["result"]["scores"]
    return runs, curves, proxies


@pytest.mark.integration
def test_two_dask_workers_write_what_a_serial_run_writes_in_every_training_stage(tmp_path, tok):
    pytest.importorskip("dask.distributed")
    from qr_lib.models import load_model
    claims = tmp_path / "claims.json"
    claims.write_text(json.dumps({"claims": [
        {"id": "q", "a": "hqq4", "relation": "beats", "b": ["lora16"], "label": "16-bit LoRA", "where": "a test"}]}))
    got = {}
    for backend in ("serial", "dask"):
        profile = load_profile("smoke", {
            "finetune.methods": ["lora16", "hqq4", "hqq4_r4", "hqq3"], "finetune.seeds": [0], "eval.tasks": [],
            "data.n_train": 32,                        # equality, not learning, is the question: short runs do
            "lengths.factors": [1, 2], "comparison.claims_file": str(claims), "comparison.primary": ["q"],
            "sizing.methods": ["lora16", "hqq4"], "sizing.key_methods": ["lora16", "hqq4"],
            "proxy_check.methods": ["hqq4", "hqq4_r4", "hqq3"], "parallel.backend": backend, "parallel.workers": 2})
        layout = Layout(tmp_path / backend)
        base, tok_ = load_model("tiny", "float32")
        with open_runner(profile.parallel, profile.device) as runner:
            _stages(profile, layout, base, tok_, runner)
        got[backend] = _losses(layout)
    runs, curves, proxies = got["serial"]
    assert len(runs) == 4 + 5 + 2 and len(curves) == 2 and proxies
    assert got["dask"] == got["serial"]


def _worker_environment():
    import os

    import torch
    return os.environ.get("MALLOC_TRIM_THRESHOLD_"), torch.get_num_threads()


def test_local_workers_keep_glibcs_allocator_and_one_thread_each():
    """Dask's nanny would start workers with MALLOC_TRIM_THRESHOLD_=65536 (every freed block handed back
    to the kernel: a LoRA step 1.27x slower); the runner's workers keep what the caller has (glibc's own
    threshold unless the caller's environment sets one)."""
    pytest.importorskip("dask.distributed")
    with open_runner(ParallelConfig(backend="dask", workers=2, threads_per_worker=1), "cpu") as runner:
        got = runner.map(_worker_environment, [()] * 2)
    assert got == [(os.environ.get("MALLOC_TRIM_THRESHOLD_"), 1)] * 2
