import pytest
import torch

from qr_lib.algorithm import memory
from qr_lib.algorithm.allocation import Allocation, uniform
from qr_lib.algorithm.build import build
from qr_lib.algorithm.quant.cache import BlockCache
from qr_lib.config import QuantConfig
from qr_lib.models import tiny_llama

CASES = [(QuantConfig(backend="hqq", group_size=64, hqq_optimize=False), b) for b in (2, 3, 4, 8, 16)]
CASES += [(QuantConfig(backend="bnb"), b) for b in (4, 8)]
CASES += [(QuantConfig(backend="bnb", bnb_double_quant=False), 4)]


@pytest.fixture
def stored():
    """The tiny model in the 16-bit storage dtype: what the formula counts and a packed build holds."""
    return tiny_llama(n_blocks=4, hidden=64, intermediate=128, vocab=256, dtype=torch.bfloat16)


@pytest.mark.parametrize("qcfg,bits", CASES)
def test_formula_equals_the_packed_models_bytes(stored, tmp_path, qcfg, bits):
    alloc = uniform(4, bits, 8)
    model = build(stored, alloc, qcfg, cache=BlockCache(tmp_path, qcfg), progress=False, dense=False)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 256, (1, 8)))  # int8 moves its scales on the first forward
    shapes = memory.model_shapes(stored)
    formula, measured = memory.formula_bytes(shapes, alloc, qcfg), memory.measured_bytes(model)
    for key in ("weights", "lora", "other", "total"):
        assert measured[key] == formula[key], key


def test_mixed_allocation_per_block(stored, tmp_path):
    qcfg = CASES[0][0]
    alloc = Allocation(bits=(2, 3, 4, 8), ranks=(4, 8, 16, 4))
    model = build(stored, alloc, qcfg, cache=BlockCache(tmp_path, qcfg), progress=False, dense=False)
    f = memory.formula_bytes(memory.model_shapes(stored), alloc, qcfg)
    m = memory.measured_bytes(model)
    assert [b["total"] for b in f["per_block"]] == [b["total"] for b in m["per_block"]]
    assert f["avg_bits"] == pytest.approx(4.25)


def test_the_compute_dtype_never_changes_an_allocations_bytes(stored, tiny):
    """Budgets and memory figures are in the storage dtype, whatever dtype the machine computes in."""
    allocs = [uniform(4, b, r) for b in (2, 3, 4, 8, 16) for r in (4, 16)]
    allocs.append(Allocation(bits=(2, 3, 4, 8), ranks=(4, 8, 16, 4)))
    for qcfg in (CASES[0][0], QuantConfig(backend="bnb")):
        for alloc in allocs:
            if qcfg.backend == "bnb" and set(alloc.bits) - {4, 8, 16}:
                continue
            assert memory.formula_bytes(memory.model_shapes(tiny), alloc, qcfg) == \
                memory.formula_bytes(memory.model_shapes(stored), alloc, qcfg)


def test_a_dense_build_is_not_measured(tiny, tmp_path):
    from qr_lib.errors import QRError
    qcfg = CASES[0][0]
    model = build(tiny, uniform(4, 4, 8), qcfg, cache=BlockCache(tmp_path, qcfg), progress=False)
    with pytest.raises(QRError, match="build it with dense=False"):
        memory.measured_bytes(model)


def test_bytes_grow_with_bits_and_rank(tiny):
    shapes, q = memory.model_shapes(tiny), QuantConfig(group_size=64)
    by_bits = [memory.formula_bytes(shapes, uniform(4, b, 8), q)["weights"] for b in (2, 3, 4, 8, 16)]
    assert by_bits == sorted(by_bits) and len(set(by_bits)) == 5
    assert memory.formula_bytes(shapes, uniform(4, 4, 16), q)["lora"] == 2 * memory.formula_bytes(shapes, uniform(4, 4, 8), q)["lora"]
    assert memory.budget_bytes(shapes, q) == memory.formula_bytes(shapes, uniform(4, 4, 8), q)["blocks"]


def test_tied_embeddings_counted_once_in_16_bits(tiny):
    emb = tiny.model.embed_tokens.weight
    norms = sum(p.numel() for n, p in tiny.named_parameters() if "norm" in n)
    assert memory.model_shapes(tiny).other_bytes == (emb.numel() + norms) * 2


def test_peak_memory_is_each_runs_own():
    with memory.PeakMemory("cpu") as first:
        big = torch.ones(300 * 2**20 // 4)
        del big
    if not first.result["scope"].startswith("run"):
        pytest.skip("this system cannot reset the peak resident set (no /proc/self/clear_refs)")
    with memory.PeakMemory("cpu") as second:
        small = torch.ones(20 * 2**20 // 4)
        del small
    assert first.result["peak_bytes"] - first.result["start_bytes"] >= 250 * 2**20
    assert second.result["peak_bytes"] < first.result["peak_bytes"] - 200 * 2**20  # not the earlier peak
    assert second.result["peak_bytes"] >= second.result["start_bytes"] + 15 * 2**20


@pytest.mark.integration
def test_shapes_come_from_the_config_without_weights(embedded32):
    from qr_lib.algorithm.memory import model_shapes
    from qr_lib.models import load_model, load_skeleton
    for name, (model, _) in (("tiny", load_model("tiny", "float32")), ("embedded", embedded32)):
        skeleton = load_skeleton(name)
        assert next(skeleton.parameters()).device.type == "meta"
        assert model_shapes(skeleton) == model_shapes(model)
