import pytest
import torch

from qr_lib.algorithm.allocation import Allocation, uniform
from qr_lib.algorithm.build import build, lora_parameters
from qr_lib.algorithm.quant.cache import BlockCache
from qr_lib.config import QuantConfig
from qr_lib.errors import QRError

HQQ = QuantConfig(backend="hqq", group_size=64, hqq_optimize=False)
BNB = QuantConfig(backend="bnb")
X = torch.randint(0, 256, (2, 12))


def assert_all_lora_grads(model):
    model.train()
    model(input_ids=X, labels=X).loss.backward()
    params = lora_parameters(model)
    assert params
    missing = [n for n, p in params if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert not missing, missing[:5]


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("qcfg,alloc", [
    (HQQ, Allocation(bits=(2, 3, 4, 8), ranks=(4, 8, 16, 4))),
    (BNB, Allocation(bits=(4, 8, 4, 8), ranks=(16, 8, 4, 8))),
])
def test_every_lora_parameter_gets_a_gradient(tiny, tmp_path, qcfg, alloc, dense):
    model = build(tiny, alloc, qcfg, cache=BlockCache(tmp_path, qcfg), progress=False, dense=dense)
    # set B != 0 so gradients reach A as well (peft initializes B to zero)
    for n, p in lora_parameters(model):
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.01)
    assert_all_lora_grads(model)


@pytest.mark.parametrize("qcfg", [HQQ, BNB])
def test_evaluate_then_train_keeps_gradients(tiny, tmp_path, qcfg):
    """bitsandbytes on AVX512-BF16 CPUs repacks 4-bit weights on the first eval forward and then
    silently drops LoRA gradients; the backend must guard against it (packed modules)."""
    model = build(tiny, uniform(4, 4, 8), qcfg, cache=BlockCache(tmp_path, qcfg), progress=False, dense=False)
    model.eval()
    with torch.no_grad():
        model(input_ids=X)
    for n, p in lora_parameters(model):
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.01)
    assert_all_lora_grads(model)


def test_blocks_really_store_low_bit_codes(tiny, tmp_path):
    model = build(tiny, Allocation(bits=(2, 3, 4, 8), ranks=(4, 4, 4, 4)), HQQ,
                  cache=BlockCache(tmp_path, HQQ), progress=False, dense=False)
    layers = model.get_base_model().model.layers
    assert [layers[i].mlp.up_proj.base_layer.meta["nbits"] for i in range(4)] == [2, 3, 4, 8]
    assert layers[0].mlp.up_proj.base_layer.W_q.dtype == torch.uint8


def test_unquantized_blocks_and_rank_zero(tiny, tmp_path):
    alloc = Allocation(bits=(16, 4, 4, 16), ranks=(0, 8, 0, 4), bit_ladder=(4, 16), rank_ladder=(0, 4, 8))
    model = build(tiny, alloc, HQQ, cache=BlockCache(tmp_path, HQQ), progress=False)
    layers = model.get_base_model().model.layers
    assert type(layers[0].self_attn.q_proj) is torch.nn.Linear  # rank 0: no adapter at all
    assert not hasattr(layers[2].self_attn.q_proj, "lora_A")
    assert layers[1].self_attn.q_proj.lora_A["default"].weight.shape[0] == 8
    assert layers[3].self_attn.q_proj.lora_A["default"].weight.shape[0] == 4
    assert isinstance(layers[3].self_attn.q_proj.base_layer, torch.nn.Linear)


def test_alpha_is_twice_the_rank(tiny, tmp_path):
    model = build(tiny, Allocation(bits=(4,) * 4, ranks=(4, 8, 16, 4)), HQQ, cache=BlockCache(tmp_path, HQQ),
                  progress=False)
    layer = model.get_base_model().model.layers[2].mlp.down_proj
    assert layer.r["default"] == 16 and layer.lora_alpha["default"] == 32
    assert layer.scaling["default"] == 2.0


def test_base_model_is_not_modified(tiny, tmp_path):
    before = tiny.model.layers[0].self_attn.q_proj.weight.clone()
    build(tiny, uniform(4, 2, 4), HQQ, cache=BlockCache(tmp_path, HQQ), progress=False)
    assert type(tiny.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert torch.equal(before, tiny.model.layers[0].self_attn.q_proj.weight)


def test_cache_reuses_blocks_and_rebuilds_corrupted_files(tiny, tmp_path):
    cache = BlockCache(tmp_path, HQQ)
    alloc = Allocation(bits=(2, 4, 4, 8), ranks=(4,) * 4)
    first = build(tiny, alloc, HQQ, cache=cache, progress=False)
    assert (cache.hits, cache.misses) == (0, 4)
    second = build(tiny, alloc, HQQ, cache=cache, progress=False)
    assert (cache.hits, cache.misses) == (4, 4)
    with torch.no_grad():
        assert torch.equal(first(input_ids=X).logits, second(input_ids=X).logits)
    victim = sorted(tmp_path.glob("*.pt"))[0]
    victim.write_bytes(victim.read_bytes()[:-10] + b"corrupted!")
    third = build(tiny, alloc, HQQ, cache=cache, progress=False)
    assert cache.misses == 5  # the corrupted file was re-quantized, not loaded
    with torch.no_grad():
        assert torch.equal(first(input_ids=X).logits, third(input_ids=X).logits)


def test_clear_errors(tiny, tmp_path):
    with pytest.raises(QRError, match=r"cannot quantize to \[2\] bits.*use backend 'hqq'"):
        build(tiny, uniform(4, 2, 8), BNB, progress=False)
    with pytest.raises(QRError, match="allocation has 3 blocks but the model has 4"):
        build(tiny, uniform(3, 4, 8), HQQ, progress=False)
    with pytest.raises(QRError, match="not one of"):
        build(tiny, uniform(4, 4, 8), QuantConfig(backend="gptq"), progress=False)
    tiny.model.layers[1].mlp.up_proj = torch.nn.Identity()
    with pytest.raises(QRError, match=r"block 1 lacks linear modules \['up_proj'\]"):
        build(tiny, uniform(4, 4, 8), HQQ, cache=BlockCache(tmp_path, HQQ), progress=False)
