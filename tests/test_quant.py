"""Backends: HQQ groups stay inside one output row; dense-once weights are the backend's own
dequantization, and compute the same logits as the packed modules."""
import pytest
import torch

from qr_lib.algorithm.allocation import uniform
from qr_lib.algorithm.build import build, lora_parameters
from qr_lib.algorithm.memory import budget_bytes, model_shapes
from qr_lib.algorithm.quant import BACKENDS, DenseQuantLinear, QuantBackend, dequantize, get_backend
from qr_lib.config import QuantConfig
from qr_lib.errors import QRError
from qr_lib.models import tiny_llama


def _rows_of_two_scales(out_features=8, in_features=192):
    """Even rows 100x smaller than odd rows: a group that mixed two rows would crush the small one."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(in_features, out_features, bias=False)
    scale = torch.tensor([0.01 if r % 2 == 0 else 1.0 for r in range(out_features)])[:, None]
    with torch.no_grad():
        lin.weight.copy_(scale * torch.randn(out_features, in_features))
    return lin


def _row_errors(approx, w):
    return ((approx.float() - w).norm(dim=1) / w.norm(dim=1)).tolist()


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_every_backend_answers_the_whole_protocol(name):
    backend = get_backend(QuantConfig(backend=name))
    assert isinstance(backend, QuantBackend)                # every member is there
    assert all(b in (2, 3, 4, 8) for b in backend.supported_bits)
    if backend.cacheable:                                   # the block cache's two extra members
        assert callable(backend.state) and callable(backend.restore)


def test_hqq_refuses_a_group_that_spans_two_rows():
    lin = _rows_of_two_scales(in_features=192)  # 192 = 1.5 x 128
    backend = get_backend(QuantConfig(group_size=128, hqq_optimize=False))
    with pytest.raises(QRError, match=r"group_size 128 does not divide in_features 192.*e\.g\. \[16, 32, 64, 192\]"):
        backend.quantize(lin, 4)
    with pytest.raises(QRError, match="does not divide in_features"):  # the budget fails before any work
        budget_bytes(model_shapes(tiny_llama(hidden=96, intermediate=192)), QuantConfig(group_size=128))


def test_each_hqq_group_holds_codes_of_one_row_only():
    lin = _rows_of_two_scales(in_features=192)
    q = get_backend(QuantConfig(group_size=64, hqq_optimize=False)).quantize(lin, 4)
    w = lin.weight.detach().float()
    assert q.meta["scale"].numel() == 8 * 3  # one scale per (row, group of 64)
    assert max(_row_errors(dequantize(q), w)) < 0.2  # 4-bit error inside a row is about 0.1
    # The same check sees the damage when HQQ is given a straddling group (bypassing our guard):
    # a small row that shares groups with a large one loses everything.
    from hqq.core.quantize import Quantizer
    codes, meta = Quantizer.quantize(w, nbits=4, group_size=128, optimize=False, axis=1, device="cpu",
                                     compute_dtype=torch.float32)
    assert max(_row_errors(Quantizer.dequantize(codes, meta), w)) > 0.9


CASES = [("hqq", b) for b in (2, 3, 4, 8)] + [("bnb", 4)]


def _pair(base, backend, bits):
    """The same allocation built packed and dense, with identical non-zero LoRA weights, in eval mode."""
    q = QuantConfig(backend=backend, group_size=64, hqq_optimize=False)
    alloc = uniform(len(base.model.layers), bits, 8)
    packed = build(base, alloc, q, progress=False, dense=False).eval()
    dense = build(base, alloc, q, progress=False, dense=True).eval()
    g = torch.Generator().manual_seed(0)
    for (name, a), (_, b) in zip(lora_parameters(packed), lora_parameters(dense)):
        if "lora_B" in name:
            v = 0.01 * torch.randn(a.shape, generator=g)
            a.data.copy_(v)
            b.data.copy_(v)
    return packed, dense


def _check(packed, dense, x):
    blocks = zip(packed.get_base_model().model.layers, dense.get_base_model().model.layers)
    for pb, db in blocks:
        p_lin, d_lin = pb.mlp.down_proj.base_layer, db.mlp.down_proj.base_layer
        assert isinstance(d_lin, DenseQuantLinear) and not isinstance(p_lin, DenseQuantLinear)
        assert torch.equal(d_lin.weight, dequantize(p_lin).to(d_lin.weight.dtype))
    with torch.no_grad():
        a, b = packed(input_ids=x).logits, dense(input_ids=x).logits
    # Stated tolerance: both paths multiply by the same float32 weights, through different matmul
    # kernels (HQQ's torch.matmul, bitsandbytes' CPU path, nn.Linear): float32 rounding only.
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()


@pytest.mark.parametrize("backend,bits", CASES)
def test_dense_weights_are_the_backends_dequantization_and_give_its_logits(backend, bits):
    _check(*_pair(tiny_llama(vocab=256), backend, bits), torch.randint(0, 256, (2, 24)))


@pytest.mark.integration
@pytest.mark.parametrize("backend,bits", [("hqq", 2), ("hqq", 3), ("hqq", 4), ("hqq", 8), ("bnb", 4)])
def test_dense_matches_packed_on_the_embedded_model(embedded32, backend, bits):
    model, tok = embedded32
    x = tok(["The capital of France is Paris, and the capital of Italy is"], return_tensors="pt")["input_ids"]
    _check(*_pair(model, backend, bits), x)


def test_int8_stays_packed_because_it_also_quantizes_activations(tiny):
    model = build(tiny, uniform(4, 8, 8), QuantConfig(backend="bnb"), progress=False, dense=True)
    layer = model.get_base_model().model.layers[0].mlp.up_proj.base_layer
    assert not isinstance(layer, DenseQuantLinear) and hasattr(layer.weight, "SCB")


def test_dense_is_the_cpu_default_and_trains(tiny):
    from qr_lib.algorithm.build import use_dense
    q = QuantConfig(group_size=64, hqq_optimize=False)
    assert use_dense(q, tiny) and not use_dense(QuantConfig(dequantize_once=False), tiny)
    model = build(tiny, uniform(4, 3, 8), q, progress=False)
    assert isinstance(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer, DenseQuantLinear)
    frozen = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert frozen and not any(p.requires_grad for p in frozen)
