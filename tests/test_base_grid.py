"""The base-grid control: Q4_1 bytes decoded as ggml writes them, and weights moved within their bins."""
import numpy as np
import pytest
import torch

from qr_lib.models import block_linears, load_model, transformer_blocks
from qr_lib.workbook import base_grid


def _q4_1_bytes(step, low, codes):
    """ggml's Q4_1 layout: per 32 weights an fp16 step, an fp16 minimum, then 16 bytes whose low nibbles
    hold weights 0-15 and high nibbles weights 16-31."""
    rows, blocks = step.shape
    out = np.zeros((rows, blocks, 20), dtype=np.uint8)
    out[..., 0:2] = step.astype(np.float16)[..., None].view(np.uint8)
    out[..., 2:4] = low.astype(np.float16)[..., None].view(np.uint8)
    c = codes.reshape(rows, blocks, 32)
    out[..., 4:] = c[..., :16] | (c[..., 16:] << 4)
    return out.reshape(rows, -1)


def test_q4_1_blocks_decode_to_step_times_code_plus_minimum():
    rng = np.random.default_rng(0)
    step = rng.uniform(0.01, 0.1, size=(3, 2)).astype(np.float16).astype(np.float64)
    low = rng.uniform(-0.5, 0, size=(3, 2)).astype(np.float16).astype(np.float64)
    codes = rng.integers(0, 16, size=(3, 64)).astype(np.uint8)
    weight, per_weight = base_grid._q4_1(_q4_1_bytes(step, low, codes), 3, 64)
    expected = np.repeat(step, 32, axis=1) * codes + np.repeat(low, 32, axis=1)
    assert np.allclose(weight, expected) and np.allclose(per_weight, np.repeat(step, 32, axis=1))


def test_the_control_moves_every_allocated_weight_within_its_own_bin_and_nothing_else():
    model, _ = load_model("tiny", "float32")
    steps = {(i, short): torch.full(m.weight.shape, 0.01, dtype=torch.float64)
             for i, b in enumerate(transformer_blocks(model)) for short, (_, m) in block_linears(b, i).items()}
    twin = base_grid.spread_within_bins(model, steps, seed=0)
    for (i, short), step in steps.items():
        before = block_linears(transformer_blocks(model)[i], i)[short][1].weight.double()
        after = block_linears(transformer_blocks(twin)[i], i)[short][1].weight.double()
        moved = (after - before).abs()
        # within half a step, up to the bf16 storage's rounding of the moved weight
        assert (moved <= 0.005 + (before.abs() + 0.005) * 2 ** -8).all() and moved.mean() > 0.001
    assert torch.equal(model.lm_head.weight, twin.lm_head.weight)   # only the allocated linears move


@pytest.mark.integration
def test_the_embedded_models_linears_are_its_gguf_q4_1_values():
    model, _ = load_model("embedded", "float32")
    steps = base_grid.q4_1_steps(model)
    assert len(steps) == 7 * len(transformer_blocks(model))
    step = steps[(0, "q_proj")]
    w = block_linears(transformer_blocks(model)[0], 0)["q_proj"][1].weight
    assert step.shape == w.shape and (step > 0).all()
