import pytest

from qr_lib import memory
from qr_lib.allocation import Allocation, uniform
from qr_lib.build import build
from qr_lib.quant import QuantConfig
from qr_lib.quant.cache import BlockCache

CASES = [(QuantConfig(backend="hqq", group_size=64, hqq_optimize=False), b) for b in (2, 3, 4, 8, 16)]
CASES += [(QuantConfig(backend="bnb"), b) for b in (4, 8)]
CASES += [(QuantConfig(backend="bnb", bnb_double_quant=False), 4)]


@pytest.mark.parametrize("qcfg,bits", CASES)
def test_formula_matches_measured_within_one_percent(tiny, tmp_path, qcfg, bits):
    alloc = uniform(4, bits, 8)
    model = build(tiny, alloc, qcfg, cache=BlockCache(tmp_path, qcfg), progress=False)
    shapes = memory.model_shapes(tiny)
    formula, measured = memory.formula_bytes(shapes, alloc, qcfg), memory.measured_bytes(model)
    for key in ("weights", "lora", "other", "total"):
        assert measured[key] == pytest.approx(formula[key], rel=0.01), key


def test_mixed_allocation_per_block(tiny, tmp_path):
    qcfg = CASES[0][0]
    alloc = Allocation(bits=(2, 3, 4, 8), ranks=(4, 8, 16, 4))
    model = build(tiny, alloc, qcfg, cache=BlockCache(tmp_path, qcfg), progress=False)
    f = memory.formula_bytes(memory.model_shapes(tiny), alloc, qcfg)
    m = memory.measured_bytes(model)
    assert [b["total"] for b in f["per_block"]] == [b["total"] for b in m["per_block"]]
    assert f["avg_bits"] == pytest.approx(4.25)


def test_bytes_grow_with_bits_and_rank(tiny):
    shapes, q = memory.model_shapes(tiny), QuantConfig(group_size=64)
    by_bits = [memory.formula_bytes(shapes, uniform(4, b, 8), q)["weights"] for b in (2, 3, 4, 8, 16)]
    assert by_bits == sorted(by_bits) and len(set(by_bits)) == 5
    assert memory.formula_bytes(shapes, uniform(4, 4, 16), q)["lora"] == 2 * memory.formula_bytes(shapes, uniform(4, 4, 8), q)["lora"]
    assert memory.budget_bytes(shapes, q) == memory.formula_bytes(shapes, uniform(4, 4, 8), q)["blocks"]


def test_tied_embeddings_counted_once(tiny):
    emb = tiny.model.embed_tokens.weight
    norms = sum(p.numel() for n, p in tiny.named_parameters() if "norm" in n)
    assert memory.model_shapes(tiny).other_bytes == (emb.numel() + norms) * emb.element_size()


def test_peak_memory_is_positive():
    assert memory.peak_memory_bytes("cpu") > 10 * 2**20
