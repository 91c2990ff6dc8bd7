"""The LoRA training loop shared by proxy tuning and the final fine-tune, and loss-based evaluation.

Prompt and padding tokens are masked out of the loss: only answer tokens are learned and scored.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch

from .errors import QRError
from .memory import peak_memory_bytes
from .progress import tqdm

IGNORE = -100


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 30
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    warmup_steps: int = 3
    max_len: int = 128
    weight_decay: float = 0.0
    seed: int = 0


def encode(tok, examples, max_len: int) -> list[dict]:
    """Token ids with labels = IGNORE on the prompt; answers end with EOS. Truncates from the left
    of the prompt so the answer always survives."""
    out = []
    for ex in examples:
        p = tok(ex.prompt, add_special_tokens=False)["input_ids"]
        a = tok(ex.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        a = a[:max_len]
        p = p[max(0, len(p) - (max_len - len(a))):] if max_len > len(a) else []
        out.append({"input_ids": p + a, "labels": [IGNORE] * len(p) + a})
    return out


def collate(rows: list[dict], pad_id: int) -> dict:
    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        ids[i, :k] = torch.tensor(r["input_ids"])
        labels[i, :k] = torch.tensor(r["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _batches(rows, batch_size, seed):
    """An endless, seeded stream of shuffled batches (a new permutation every epoch)."""
    rng = random.Random(seed)
    while True:
        order = rng.sample(range(len(rows)), len(rows))
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield [rows[j] for j in order[i:i + batch_size]]


def token_loss(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over labelled tokens, and their count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift_logits = logits[:, :-1].float()
    shift_labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)),
                                             shift_labels.reshape(-1), ignore_index=IGNORE,
                                             reduction="sum")
    return loss, int((shift_labels != IGNORE).sum())


def _to(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def train(model, tok, examples, cfg: TrainConfig, progress: bool = True, desc: str = "train",
          on_step=None) -> dict:
    """AdamW on the trainable (LoRA) parameters. Returns the loss curve and token counts; a
    non-finite loss stops training and is reported as diverged, never raised. `on_step(step)` runs
    after each optimizer step, gradients still in place (AdaLoRA's rank re-allocation)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise QRError("the model has no trainable parameters; build it with qr_lib.build.build()")
    if len(examples) < cfg.batch_size:
        raise QRError(f"{len(examples)} training examples is fewer than batch_size {cfg.batch_size}")
    torch.manual_seed(cfg.seed)
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows = encode(tok, examples, cfg.max_len)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    stream = _batches(rows, cfg.batch_size, cfg.seed)
    model.train()
    losses, tokens, t0 = [], 0, time.time()
    diverged = False
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        opt.zero_grad(set_to_none=True)
        step_loss, step_tokens = 0.0, 0
        for _ in range(cfg.grad_accum):
            batch = _to(collate(next(stream), tok.pad_token_id), device)
            loss_sum, n = token_loss(model, batch)
            (loss_sum / max(n, 1) / cfg.grad_accum).backward()
            step_loss += loss_sum.item()
            step_tokens += n
            tokens += int(batch["attention_mask"].sum())
        mean = step_loss / max(step_tokens, 1)
        if not math.isfinite(mean):
            diverged = True
            break
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(step)
        losses.append(mean)
        bar.set_postfix(loss=f"{mean:.3f}", refresh=False)  # drawn at the next refresh, not every step
    model.eval()
    return {"losses": losses, "train_tokens": tokens, "seconds": time.time() - t0, "diverged": diverged,
            "peak_memory_bytes": peak_memory_bytes(str(device))}


@torch.no_grad()
def eval_loss(model, tok, examples, max_len: int = 128, batch_size: int = 8, progress: bool = False) -> float:
    """Mean NLL per answer token on held-out examples (the proxy metric, lower is better)."""
    model.eval()
    device = next(model.parameters()).device
    rows = encode(tok, examples, max_len)
    total, count = 0.0, 0
    for i in tqdm(range(0, len(rows), batch_size), desc="eval loss", disable=not progress, leave=False):
        loss_sum, n = token_loss(model, _to(collate(rows[i:i + batch_size], tok.pad_token_id), device))
        total += loss_sum.item()
        count += n
    return total / max(count, 1)


@torch.no_grad()
def perplexity(model, tok, texts, max_len: int = 256, batch_size: int = 8, progress: bool = False) -> float:
    """Token-level perplexity of raw passages (every token after the first is scored)."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in tqdm(range(0, len(texts), batch_size), desc="perplexity", disable=not progress, leave=False):
        rows = []
        for t in texts[i:i + batch_size]:
            ids = tok(t, add_special_tokens=False)["input_ids"][:max_len]
            rows.append({"input_ids": ids, "labels": ids})
        loss_sum, n = token_loss(model, _to(collate(rows, tok.pad_token_id), device))
        total += loss_sum.item()
        count += n
    return math.exp(total / max(count, 1))
