"""LoRA fine-tuning and evaluation on tokenized rows (plain torch; no Ray).

Loss: the causal-LM cross-entropy on training targets only (``loss_mask[t] = 1`` where token t
is a response token, or every token but the first for plain text):

    L = sum_{b, t: loss_mask[b, t]} -log p(x_{b,t} | x_{b,<t}) / sum loss_mask

averaged over the tokens of a batch. The warm-up of NTK-Selector and ``ntk-ray finetune`` use
``train_lora``; ``ntk-ray evaluate`` uses ``mean_token_loss``.

Why a 40-line loop instead of ``transformers.Trainer``: batches are packed by a token budget
(``features.pack_by_tokens``), the order of batches is a pure function of the seed, and there
is nothing else to configure; Trainer would add ``accelerate`` and a dozen hidden defaults
(schedulers, logging, checkpoint dirs) for the same AdamW step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from .features import pack_by_tokens, pad_batch


@dataclass
class TrainConfig:
    epochs: float = 2.0
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_tokens: int = 4096
    max_batch_rows: int = 16
    seed: int = 0


def batch_loss(model, input_ids, attention_mask, loss_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed token loss, number of target tokens) of one padded batch."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = input_ids[:, 1:]
    mask = loss_mask[:, 1:]
    token_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    token_loss = token_loss.view_as(mask) * mask
    return token_loss.sum(), mask.sum()


def _batches(sequences, cfg: TrainConfig, epoch: int) -> list[list[int]]:
    """Token-budget batches, their order shuffled by (seed, epoch)."""
    batches = pack_by_tokens([len(s) for s in sequences], cfg.batch_tokens, cfg.max_batch_rows)
    order = np.random.default_rng([cfg.seed, epoch]).permutation(len(batches))
    return [batches[i] for i in order]


def train_lora(model, sequences: list[list[int]], loss_masks: list[list[int]], cfg: TrainConfig,
               device="cpu", log=print) -> dict:
    """AdamW on the trainable (LoRA) parameters for ``cfg.epochs`` passes (a fraction is allowed:
    0.5 = the first half of the shuffled batches). Returns losses per epoch and the step count."""
    if not sequences:
        raise ValueError("no training rows")
    torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    history, steps, started = [], 0, time.time()
    for epoch in range(math.ceil(cfg.epochs)):
        batches = _batches(sequences, cfg, epoch)
        if epoch + 1 > cfg.epochs:  # fractional last epoch
            batches = batches[: max(1, int(len(batches) * (cfg.epochs - epoch)))]
        total, count = 0.0, 0.0
        for batch in batches:
            ids, attn, mask = pad_batch([sequences[i] for i in batch], [loss_masks[i] for i in batch], device=device)
            loss_sum, n = batch_loss(model, ids, attn, mask)
            loss = loss_sum / n.clamp(min=1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, count, steps = total + loss_sum.item(), count + n.item(), steps + 1
        history.append(total / max(count, 1))
        log(f"  epoch {epoch + 1}: loss {history[-1]:.4f} ({steps} steps, {time.time() - started:.0f}s)")
    model.eval()
    return {"epoch_loss": history, "steps": steps, "seconds": time.time() - started}


@torch.no_grad()
def mean_token_loss(model, sequences, loss_masks, batch_tokens: int = 8192, device="cpu") -> dict:
    """Mean per-token loss over all target tokens, and its perplexity."""
    model.eval()
    total, count = 0.0, 0.0
    for batch in pack_by_tokens([len(s) for s in sequences], batch_tokens):
        ids, attn, mask = pad_batch([sequences[i] for i in batch], [loss_masks[i] for i in batch], device=device)
        loss_sum, n = batch_loss(model, ids, attn, mask)
        total, count = total + loss_sum.item(), count + n.item()
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "tokens": int(count), "rows": len(sequences)}
