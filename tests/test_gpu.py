"""The CUDA path end to end on the embedded model: packed HQQ and bitsandbytes kernels (no dense
twins on a GPU), LoRA gradients through them, the CUDA allocator's peak per run, a smoke-sized search
and a final fine-tune with lm-eval. Skipped without CUDA (conftest.py). On a machine without the
embedded model's package (a GPU lent without a network, benchmarks/gpu_check.sh), the same code runs on
the tiny random model; the NF4 and int8 cases skip where bitsandbytes is not installed."""
import importlib.util

import pytest
import torch

from qr_lib.algorithm.allocation import uniform
from qr_lib.models import EMBEDDED, EMBEDDED_PACKAGE, TINY

pytestmark = [pytest.mark.gpu, pytest.mark.integration]
MODEL = EMBEDDED if importlib.util.find_spec(EMBEDDED_PACKAGE) else TINY


@pytest.fixture(scope="module")
def cuda_model():
    from qr_lib.models import load_model
    return load_model(MODEL, "auto", "cuda")


@pytest.mark.parametrize("backend, bits", [("hqq", 2), ("hqq", 3), ("hqq", 4), ("hqq", 8), ("bnb", 4), ("bnb", 8)])
def test_packed_backends_train_on_cuda_and_the_peak_is_the_runs_own(cuda_model, backend, bits):
    from qr_lib.algorithm.build import build, lora_parameters, use_dense
    from qr_lib.algorithm.memory import (
        PeakMemory,
        formula_bytes,
        measured_bytes,
        model_shapes,
    )
    from qr_lib.algorithm.train import train
    from qr_lib.config import DataConfig, QuantConfig, TrainConfig
    from qr_lib.data import load_finetune

    if backend == "bnb":
        pytest.importorskip("bitsandbytes")
    model, tok = cuda_model
    qcfg = QuantConfig(backend=backend, group_size=64)
    assert not use_dense(qcfg, model)                              # a GPU keeps the packed kernels
    alloc = uniform(model.config.num_hidden_layers, bits, 8)
    with PeakMemory("cuda") as peak:
        peft_model = build(model, alloc, qcfg, progress=False)
        data = load_finetune(DataConfig(n_train=8, n_val=0, n_test=0))
        log = train(peft_model, tok, data.train, TrainConfig(steps=2, batch_size=4, max_len=64), progress=False)
    assert not log["diverged"] and peak.result["scope"].startswith("run (CUDA")
    assert peak.result["peak_bytes"] > peak.result["start_bytes"]
    grads = [p.grad for n, p in lora_parameters(peft_model) if "lora_A" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    if backend == "hqq":                                           # formula == packed, as on CPU
        from qr_lib.models import load_model
        stored, _ = load_model(MODEL, "bfloat16", "cuda")
        packed = build(stored, alloc, qcfg, progress=False, dense=False)
        assert measured_bytes(packed)["blocks"] == formula_bytes(model_shapes(model), alloc, qcfg)["blocks"]


def test_a_smoke_sized_search_and_a_final_run_with_lm_eval_on_cuda(cuda_model, tmp_path):
    from qr_lib.algorithm import search
    from qr_lib.layout import Layout
    from qr_lib.workbook import finetune
    from qr_lib.workbook.methods import load_method
    from qr_lib.workbook.profiles import load_profile

    profile = load_profile("gpu", {"model": MODEL, "nsga.pop_size": 4, "nsga.generations": 1, "nsga.n_random": 1, "bo.iterations": 1,
                                   "proxy.steps": 2, "nsga.low_steps": 1, "data.n_train": 16, "data.n_val": 8,
                                   "data.n_test": 16, "data.n_calib": 2, "finetune.max_steps": 2,
                                   "eval.limit": 4, "eval.tasks": ["qr_arc_easy"], "eval.task_limits": {},
                                   "parallel.backend": "serial"})
    base, tok = cuda_model
    layout = Layout(tmp_path)
    result = search.run(profile, layout, base, tok, progress=False)
    assert result.selected_scores["budget_ratio"] <= 1
    run = finetune.run(profile, layout, load_method("qr_adaptor"), 0, base, tok, progress=False)
    assert run.benchmarks["qr_arc_easy"]["n"] == 4 and run.train["peak_memory"]["scope"].startswith("run (CUDA")
