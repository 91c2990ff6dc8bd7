import math

import torch

from qr_lib.allocation import uniform
from qr_lib.build import build
from qr_lib.data import Example
from qr_lib.quant import QuantConfig
from qr_lib.quant.cache import BlockCache
from qr_lib.train import IGNORE, TrainConfig, collate, encode, eval_loss, perplexity, train

EXAMPLES = [Example(f"Question: what is {i} plus one?\nAnswer:", f" {i + 1}", "toy") for i in range(16)]


def test_prompt_and_padding_are_masked(tok):
    rows = encode(tok, EXAMPLES[:2], max_len=64)
    p = tok(EXAMPLES[0].prompt, add_special_tokens=False)["input_ids"]
    assert rows[0]["labels"][: len(p)] == [IGNORE] * len(p)
    assert rows[0]["labels"][len(p):] == rows[0]["input_ids"][len(p):]
    assert rows[0]["labels"][-1] == tok.eos_token_id
    batch = collate(rows + encode(tok, [Example("a", " b", "toy")], 64), tok.pad_token_id)
    assert (batch["labels"][2][batch["attention_mask"][2] == 0] == IGNORE).all()


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
    assert log["peak_memory_bytes"] > 0
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
