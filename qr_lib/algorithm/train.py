"""The LoRA training loop shared by proxy tuning and the final fine-tune, and loss-based evaluation.

Prompt and padding tokens are masked out of the loss: only answer tokens are learned and scored.
Rows are padded on the left, with explicit position ids. The language-model head (576 x 49,152 on
the embedded model, the largest matmul per token) runs only on the positions that carry a label,
about a fifth of them on the commonsense mix. Training batches are grouped by length (as Hugging
Face's `group_by_length`), so a batch pads little.
"""
from __future__ import annotations

import math
import random
import time

import torch

from ..config import SCHEDULES, TrainConfig
from ..errors import QRError
from ..models import split_head
from ..progress import tqdm
from .memory import PeakMemory

IGNORE = -100
# Rows per length-sorted window = LENGTH_GROUP x batch size (Hugging Face's LengthGroupedSampler
# uses 50): batches are cut from sorted windows, then shuffled.
LENGTH_GROUP = 50


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
    """Left-padded ids, labels and mask, with position ids that start at 0 on each row's first token."""
    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        ids[i, n - k:] = torch.tensor(r["input_ids"])
        labels[i, n - k:] = torch.tensor(r["labels"])
        mask[i, n - k:] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def _batches(rows, batch_size, seed):
    """An endless, seeded stream of batches: every epoch a new permutation, sorted by length within
    windows of LENGTH_GROUP batches, cut into batches whose order is shuffled again."""
    rng = random.Random(seed)
    window = batch_size * LENGTH_GROUP
    while True:
        order = rng.sample(range(len(rows)), len(rows))
        grouped = [j for w in range(0, len(order), window)
                   for j in sorted(order[w:w + window], key=lambda j: len(rows[j]["input_ids"]))]
        batches = [grouped[i:i + batch_size] for i in range(0, len(grouped) - batch_size + 1, batch_size)]
        rng.shuffle(batches)
        for b in batches:
            yield [rows[j] for j in b]


def row_losses(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: summed next-token NLL over labelled tokens, and their count. The head runs on the
    labelled positions alone where the family allows it (models.split_head), else from the earliest
    labelled position on (all of them when every token is labelled)."""
    shift_labels = batch["labels"][:, 1:]
    labelled = shift_labels != IGNORE
    counts = labelled.sum(dim=1)
    if not labelled.any():
        return torch.zeros(len(shift_labels), device=shift_labels.device), counts
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    if (parts := split_head(model)) is not None:
        decoder, head = parts
        hidden = decoder(**inputs, use_cache=False).last_hidden_state[:, :-1]
        nll = torch.nn.functional.cross_entropy(head(hidden[labelled]).float(), shift_labels[labelled],
                                                reduction="none")
        return torch.zeros(len(shift_labels), dtype=nll.dtype, device=nll.device).index_add(
            0, labelled.nonzero()[:, 0], nll), counts
    first = int(labelled.float().argmax(dim=1)[labelled.any(dim=1)].min())
    keep = shift_labels.shape[1] - first
    logits = model(**inputs, use_cache=False, logits_to_keep=keep + 1).logits[:, :-1].float()
    labels = shift_labels[:, -keep:]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                            ignore_index=IGNORE, reduction="none").view(labels.shape)
    return nll.sum(dim=1), counts


def token_loss(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over labelled tokens, and their count."""
    sums, counts = row_losses(model, batch)
    return sums.sum(), int(counts.sum())


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """The learning-rate multiplier of optimizer step `step` (0-based): linear warm-up, then the schedule."""
    if cfg.schedule not in SCHEDULES:
        raise QRError(f"schedule {cfg.schedule!r} is not one of {list(SCHEDULES)}")
    warmup = max(1, cfg.warmup_steps)
    if step < warmup or cfg.schedule == "constant":
        return min(1.0, (step + 1) / warmup)
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return 1.0 - progress if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def _to(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def train(model, tok, examples, cfg: TrainConfig, progress: bool = True, desc: str = "train",
          on_step=None) -> dict:
    """AdamW on the trainable (LoRA) parameters. Returns the loss curve, token counts (`tokens_seen`:
    the tokens read by the end of each step, prompts included) and the peak
    memory of this run; a non-finite loss stops training and is reported as diverged, never raised.
    `on_step(step)` runs after each optimizer step, gradients still in place (AdaLoRA's rank
    re-allocation)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise QRError("the model has no trainable parameters; build it with qr_lib.algorithm.build.build()")
    if len(examples) < cfg.batch_size:
        raise QRError(f"{len(examples)} training examples is fewer than batch_size {cfg.batch_size}")
    lr_factor(0, cfg)  # an unknown schedule fails here, before any work
    torch.manual_seed(cfg.seed)
    device = next(model.parameters()).device
    rows = encode(tok, examples, cfg.max_len)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    stream = _batches(rows, cfg.batch_size, cfg.seed)
    model.train()
    losses, step_tokens_seen, tokens, t0 = [], [], 0, time.time()
    diverged = False
    with PeakMemory(str(device)) as peak:
        for step in (bar := tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=False)):
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
            step_tokens_seen.append(tokens)
            bar.set_postfix(loss=f"{mean:.3f}", refresh=False)  # drawn at the next refresh, not every step
    model.eval()
    return {"losses": losses, "train_tokens": tokens, "tokens_seen": step_tokens_seen, "seconds": time.time() - t0,
            "diverged": diverged, "peak_memory": peak.result}


@torch.no_grad()
def example_losses(model, tok, examples, max_len: int = 128, batch_size: int = 16,
                   progress: bool = False) -> list[tuple[float, int]]:
    """(summed NLL, answer tokens) of every example, in the order given: the paired comparisons'
    unit. Batches are cut from the examples sorted by length, so they pad little."""
    model.eval()
    device = next(model.parameters()).device
    rows = encode(tok, examples, max_len)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    out: list = [None] * len(rows)
    for i in tqdm(range(0, len(order), batch_size), desc="eval loss", disable=not progress, leave=False):
        idx = order[i:i + batch_size]
        sums, counts = row_losses(model, _to(collate([rows[j] for j in idx], tok.pad_token_id), device))
        for j, s_, c in zip(idx, sums.tolist(), counts.tolist()):
            out[j] = (s_, int(c))
    return out


def mean_loss(per_example: list[tuple[float, int]]) -> float:
    """Mean NLL per answer token over examples (each token counts once)."""
    return sum(s for s, _ in per_example) / max(sum(c for _, c in per_example), 1)


def eval_loss(model, tok, examples, max_len: int = 128, batch_size: int = 16, progress: bool = False) -> float:
    """Mean NLL per answer token on held-out examples (the proxy metric, lower is better)."""
    return mean_loss(example_losses(model, tok, examples, max_len, batch_size, progress))


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
