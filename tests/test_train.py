import math

import numpy as np
import pytest
import torch

from qr_lib.algorithm import train as training
from qr_lib.algorithm.allocation import uniform
from qr_lib.algorithm.build import build
from qr_lib.algorithm.quant.cache import BlockCache
from qr_lib.algorithm.train import (
    IGNORE,
    _batches,
    collate,
    encode,
    eval_loss,
    example_losses,
    lr_factor,
    mean_loss,
    perplexity,
    row_losses,
    train,
)
from qr_lib.config import QuantConfig, TrainConfig
from qr_lib.data import Example
from qr_lib.errors import QRError
from qr_lib.models import split_head

EXAMPLES = [Example(f"Question: what is {i} plus one?\nAnswer:", f" {i + 1}", "toy") for i in range(16)]


def test_prompt_and_padding_are_masked(tok):
    rows = encode(tok, EXAMPLES[:2], max_len=64)
    p = tok(EXAMPLES[0].prompt, add_special_tokens=False)["input_ids"]
    assert rows[0]["labels"][: len(p)] == [IGNORE] * len(p)
    assert rows[0]["labels"][len(p):] == rows[0]["input_ids"][len(p):]
    assert rows[0]["labels"][-1] == tok.eos_token_id
    batch = collate(rows + encode(tok, [Example("a", " b", "toy")], 64), tok.pad_token_id)
    assert (batch["labels"][2][batch["attention_mask"][2] == 0] == IGNORE).all()
    assert batch["attention_mask"][2, -1] == 1 and batch["attention_mask"][2, 0] == 0  # padded on the left
    n_real = int(batch["attention_mask"][2].sum())
    assert batch["position_ids"][2, -n_real:].tolist() == list(range(n_real))  # positions start at each row's first token


def test_truncation_keeps_the_answer(tok):
    long = Example("word " * 500, " answer", "toy")
    row = encode(tok, [long], max_len=32)[0]
    assert len(row["input_ids"]) == 32 and row["labels"][-1] == tok.eos_token_id


def _tiny_for(tok):
    from qr_lib.models import tiny_llama
    return tiny_llama(vocab=len(tok))


def test_training_lowers_held_out_loss(tok, tmp_path):
    q = QuantConfig(group_size=64, hqq_optimize=False)
    model = build(_tiny_for(tok), uniform(4, 4, 8), q, cache=BlockCache(tmp_path, q), progress=False)
    before = eval_loss(model, tok, EXAMPLES[:8])
    log = train(model, tok, EXAMPLES, TrainConfig(steps=15, batch_size=4, lr=1e-2, max_len=32), progress=False)
    assert len(log["losses"]) == 15 and not log["diverged"] and log["train_tokens"] > 0
    assert log["peak_memory"]["peak_bytes"] > 0
    assert eval_loss(model, tok, EXAMPLES[:8]) < before


def test_divergence_is_reported_not_raised(tok, tmp_path):
    q = QuantConfig(group_size=64, hqq_optimize=False)
    model = build(_tiny_for(tok), uniform(4, 4, 8), q, cache=BlockCache(tmp_path, q), progress=False)
    for n, p in model.named_parameters():
        if "lora_A" in n:
            with torch.no_grad():
                p.fill_(float("inf"))
    log = train(model, tok, EXAMPLES, TrainConfig(steps=5, batch_size=4, max_len=32), progress=False)
    assert log["diverged"] and log["losses"] == []


def test_perplexity_of_random_model_is_near_vocab(tok):
    ppl = perplexity(_tiny_for(tok), tok, ["The cat sat on the mat and looked at the dog."] * 2)
    assert math.isfinite(ppl) and ppl > 1000


@pytest.mark.parametrize("head", ["labelled positions", "from the first labelled position"])
def test_a_padded_batch_scores_each_row_as_if_it_were_alone(tok, monkeypatch, head):
    """Left padding, position ids and the head on labelled positions only change nothing, on the split
    head (a plain family) and on the fallback that asks the whole model (any other family)."""
    if head != "labelled positions":
        monkeypatch.setattr(training, "split_head", lambda model: None)
    model = _tiny_for(tok)
    mixed = EXAMPLES[:3] + [Example("word " * 40 + "Question: and now?\nAnswer:", " a longer answer here", "toy")]
    rows = encode(tok, mixed, 96)
    with torch.no_grad():
        sums, counts = row_losses(model, collate(rows, tok.pad_token_id))
        for i, r in enumerate(rows):
            ids, labels = torch.tensor([r["input_ids"]]), torch.tensor([r["labels"]])
            logits = model(input_ids=ids).logits[:, :-1]  # the plain, unpadded, full-head reference
            ref = torch.nn.functional.cross_entropy(logits[0], labels[0, 1:], ignore_index=IGNORE, reduction="sum")
            assert sums[i].item() == pytest.approx(ref.item(), rel=1e-5)
            assert counts[i] == (labels[0, 1:] != IGNORE).sum()


def test_the_head_is_split_only_for_plain_families(tok):
    model = _tiny_for(tok)
    decoder, head = split_head(model)
    assert decoder is model.model and head is model.lm_head
    model.config.model_type = "gemma2"      # soft-caps its logits after the head
    assert split_head(model) is None


def test_example_losses_keep_the_given_order_and_average_by_token(tok):
    model = _tiny_for(tok)
    per = example_losses(model, tok, EXAMPLES[:6], max_len=32, batch_size=4)
    again = example_losses(model, tok, EXAMPLES[:6][::-1], max_len=32, batch_size=4)
    assert [s for s, _ in per] == pytest.approx([s for s, _ in again[::-1]], rel=1e-5)
    assert eval_loss(model, tok, EXAMPLES[:6], max_len=32) == pytest.approx(mean_loss(per), rel=1e-6)


def test_schedules_warm_up_then_decay():
    lin = TrainConfig(steps=100, warmup_steps=10)
    f = [lr_factor(s, lin) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[10] == 1.0
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] == pytest.approx(1 / 90)
    cos = [lr_factor(s, TrainConfig(steps=100, warmup_steps=10, schedule="cosine")) for s in range(100)]
    assert cos[55] == pytest.approx(0.5) and cos[-1] < 0.001
    assert lr_factor(80, TrainConfig(steps=100, warmup_steps=10, schedule="constant")) == 1.0
    with pytest.raises(QRError, match="not one of"):
        lr_factor(0, TrainConfig(schedule="step"))


def test_batches_cover_each_epoch_once_and_group_by_length():
    rows = [{"input_ids": [0] * n} for n in range(1, 401)]
    stream = _batches(rows, 4, seed=0)
    epoch = [next(stream) for _ in range(100)]
    assert sorted(len(r["input_ids"]) for b in epoch for r in b) == list(range(1, 401))
    spread = [max(len(r["input_ids"]) for r in b) - min(len(r["input_ids"]) for r in b) for b in epoch]
    assert sum(spread) / len(spread) < 10  # random batches of 4 out of 1..400 would spread ~240


def test_dropout_masks_are_the_portable_mersenne_twister_draws():
    """'The same numbers on any CPU' needs the same dropout masks everywhere. torch draws a CPU mask
    element by element from its Mersenne Twister (a double from two 32-bit draws, kept where it falls
    under 1 - p), which numpy's MT19937 reproduces bit for bit; a build that drew them otherwise (a
    vendor library's generator) would train other runs, and this says so."""
    n, p = 4096, 0.05
    torch.manual_seed(7)
    kept = torch.nn.functional.dropout(torch.ones(n), p, training=True) != 0
    generator = np.random.MT19937()
    generator.state = {"bit_generator": "MT19937",            # torch seeds it as numpy's legacy seeding does
                       "state": {"key": np.random.RandomState(7).get_state()[1], "pos": 624}}
    draws = generator.random_raw(2 * n).astype(np.uint64)
    bits = (draws[0::2] << np.uint64(32)) | draws[1::2]
    uniform = (bits & np.uint64(2**53 - 1)).astype(np.float64) * 2.0**-53
    assert (kept.numpy() == (uniform < 1 - p)).all()
