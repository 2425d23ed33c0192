"""LoRA fine-tuning and evaluation on tokenized rows (plain torch; no Ray).

Loss: the causal-LM cross-entropy on training targets only (``loss_mask[t] = 1`` where token t
is a response token, or every token but the first for plain text):

    L = sum_{b, t: loss_mask[b, t]} -log p(x_{b,t} | x_{b,<t}) / sum loss_mask

averaged over the target tokens of an optimizer step. The warm-up of NTK-Selector and
``ntk-ray finetune`` use ``train_lora``; ``ntk-ray evaluate`` uses ``mean_token_loss``.

Gradient accumulation (``grad_accum_steps = k``): an optimizer step sums the gradients of k
consecutive batches B_1..B_k, each backward taken on sum_{tokens of B_i} loss / N with N the
target tokens of all k batches (counted from the masks before the step), so the step's gradient
is that of L over the union of the k batches: k batches of one row train exactly as one batch
of k rows (up to float summation order). The last step of an epoch takes the batches left.

Learning rate (``lr_factor``): optimizer step s = 0..S-1 of S steps (every epoch's steps,
known before training) uses lr * f(s), with W = ceil(warmup_ratio * S) warm-up steps:

    f(s) = (s + 1) / W                           s < W   (linear ramp; no step at lr 0)
    f(s) = 1                                     s >= W, constant
    f(s) = 1 - p                                 s >= W, linear,  p = (s - W) / (S - W)
    f(s) = (1 + cos(pi p)) / 2                   s >= W, cosine

The select warm-up uses the defaults of ``TrainConfig``: constant, no warm-up steps, one batch
per step (its ranking is what it was); ``ntk-ray finetune`` defaults to cosine with 3% warm-up
steps (``config.LocalModelOptions``), the common LoRA recipe.

Precision: the model may be bfloat16/float16 (``--dtype``); the LoRA weights, their gradients
and AdamW's moments are float32 (``models.lora``), and the logits are cast to float32 before
the cross-entropy, so the loss and its sums are float32 (the epoch totals float64 in Python).
A float16 model trains with loss scaling (``torch.amp.GradScaler``: float16 gradients of small
losses underflow); bfloat16 has float32's exponent range and needs none.

For LESS (``selectors.adam_gradient_transform``) ``train_lora(..., keep_optimizer_state=True)``
also hands back the optimizer's Adam moments after the last step (``adam_moments``: m_t, v_t,
the step count t, betas, eps, per trainable parameter), which ``save_adam_moments`` /
``load_adam_moments`` keep on disk keyed by parameter name.

Why a 40-line loop instead of ``transformers.Trainer``: batches are packed by a token budget
(``features.pack_by_tokens``), the order of batches is a pure function of the seed, and there
is nothing else to configure; Trainer would add ``accelerate`` and a dozen hidden defaults
(schedulers, logging, checkpoint dirs) for the same AdamW step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ntk_ray.core.features import pack_by_tokens, pad_batch


LR_SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class TrainConfig:
    """``train_lora``'s settings. The defaults of the schedule fields are the select warm-up's
    (constant learning rate, no warm-up steps, one batch per optimizer step)."""
    epochs: float = 2.0
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_tokens: int = 4096
    max_batch_rows: int = 16
    seed: int = 0
    lr_schedule: str = "constant"
    warmup_ratio: float = 0.0
    grad_accum_steps: int = 1

    def __post_init__(self):
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule {self.lr_schedule!r}: choose {', '.join(LR_SCHEDULES)}")
        if not 0 <= self.warmup_ratio <= 1:
            raise ValueError(f"warmup_ratio must be between 0 and 1 (got {self.warmup_ratio})")
        if self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be at least 1 (got {self.grad_accum_steps})")


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """W = ceil(warmup_ratio * S) (at most S)."""
    return min(total_steps, math.ceil(warmup_ratio * total_steps - 1e-9)) if warmup_ratio > 0 else 0


def lr_factor(step: int, total_steps: int, schedule: str = "constant", warmup_ratio: float = 0.0) -> float:
    """f(s): the multiple of the base learning rate that optimizer step ``step`` (0-based) of
    ``total_steps`` uses (module docstring)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule {schedule!r}: choose {', '.join(LR_SCHEDULES)}")
    w = warmup_steps(total_steps, warmup_ratio)
    if step < w:
        return (step + 1) / w
    if schedule == "constant":
        return 1.0
    p = (step - w) / max(1, total_steps - w)
    if schedule == "linear":
        return 1.0 - p
    return 0.5 * (1.0 + math.cos(math.pi * p))


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


def _epoch_batches(sequences, cfg: TrainConfig) -> list[list[list[int]]]:
    """Every epoch's batches, in training order (a fractional last epoch keeps the first share
    of its shuffled batches, at least one)."""
    epochs = []
    for epoch in range(math.ceil(cfg.epochs)):
        batches = _batches(sequences, cfg, epoch)
        if epoch + 1 > cfg.epochs:  # fractional last epoch
            batches = batches[: max(1, int(len(batches) * (cfg.epochs - epoch)))]
        epochs.append(batches)
    return epochs


def _target_tokens(loss_masks, rows) -> int:
    """Target tokens of ``rows`` as ``batch_loss`` counts them (mask positions 1..T-1)."""
    return sum(int(sum(loss_masks[i][1:])) for i in rows)


def train_lora(model, sequences: list[list[int]], loss_masks: list[list[int]], cfg: TrainConfig,
               device="cpu", log=print, keep_optimizer_state: bool = False, on_batch=None, on_step=None) -> dict:
    """AdamW on the trainable (LoRA) parameters for ``cfg.epochs`` passes (a fraction is allowed:
    0.5 = the first half of the shuffled batches), ``cfg.grad_accum_steps`` batches per optimizer
    step, the learning rate of step s being ``cfg.lr * lr_factor(s, ...)`` (module docstring).
    Returns losses per epoch (mean per target token), the optimizer step count and the batches
    run; with ``keep_optimizer_state`` also ``"adam"``: the ``AdamMoments`` after the last step
    (tensors: not JSON-serialisable, so it is absent by default). ``on_batch(done, total, loss)``,
    if given, is called after every batch: batches done and in the whole run, the batch's mean
    token loss (live progress). ``on_step(step, total_steps, lr)``, if given, is called after
    every optimizer step (1-based step count, the learning rate that step used): e.g. to save
    warm-up checkpoints."""
    if not sequences:
        raise ValueError("no training rows")
    torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    half = any(p.dtype == torch.float16 for p in model.parameters())
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=half)  # float16 model: loss scaling
    k = cfg.grad_accum_steps
    epochs = _epoch_batches(sequences, cfg)
    total_steps = sum(math.ceil(len(b) / k) for b in epochs)
    model.train()
    history, steps, micro, started = [], 0, 0, time.time()
    for epoch, batches in enumerate(epochs):
        total, count = 0.0, 0.0
        for first in range(0, len(batches), k):
            group = batches[first:first + k]
            n_step = max(_target_tokens(loss_masks, [i for b in group for i in b]), 1)
            for g in optimizer.param_groups:
                g["lr"] = cfg.lr * lr_factor(steps, total_steps, cfg.lr_schedule, cfg.warmup_ratio)
            optimizer.zero_grad(set_to_none=True)
            for batch in group:
                ids, attn, mask = pad_batch([sequences[i] for i in batch], [loss_masks[i] for i in batch], device=device)
                loss_sum, n = batch_loss(model, ids, attn, mask)
                scaler.scale(loss_sum / n_step).backward()
                total, count, micro = total + loss_sum.item(), count + n.item(), micro + 1
                if on_batch is not None:
                    on_batch(micro, sum(map(len, epochs)), loss_sum.item() / max(n.item(), 1))
            scaler.step(optimizer)
            scaler.update()
            steps += 1
            if on_step is not None:
                on_step(steps, total_steps, optimizer.param_groups[0]["lr"])
        history.append(total / max(count, 1))
        log(f"  epoch {epoch + 1}: loss {history[-1]:.4f} ({steps} steps, {time.time() - started:.0f}s)")
    model.eval()
    out = {"epoch_loss": history, "steps": steps, "batches": micro, "seconds": time.time() - started}
    if keep_optimizer_state:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        out["adam"] = adam_moments(optimizer, params, names)
    return out


# ----------------------------------------------------------------------------------------------
# Adam moments for LESS

_MOMENTS_FORMAT = "ntk-ray-adam-moments/1"


class AdamMoments(NamedTuple):
    """The state of Adam/AdamW after ``step`` steps, per parameter (in the order given to
    ``adam_moments``: for ``train_lora``, ``[p for p in model.parameters() if p.requires_grad]``):
    exp_avg = m_t, exp_avg_sq = v_t (float32, on the CPU), the step count t, (b1, b2), eps and the
    parameter names (``model.named_parameters()``; None when not given). Pass
    ``exp_avg, exp_avg_sq, step, betas, eps`` to ``selectors.adam_gradient_transform``."""

    exp_avg: list
    exp_avg_sq: list
    step: int
    betas: tuple
    eps: float
    names: list | None = None

    def select(self, names: list[str]) -> "AdamMoments":
        """The moments of the parameters ``names``, in that order (e.g. ``f"{module}.weight"`` for
        ``features.trainable_linears``). A peft prefix ``base_model.model.`` is ignored on both
        sides, so a PeftModel's and its base model's names match."""
        if self.names is None:
            raise ValueError("these Adam moments carry no parameter names")
        index = {_stable(n): i for i, n in enumerate(self.names)}
        missing = [n for n in names if _stable(n) not in index]
        if missing:
            raise ValueError(f"no Adam moments for {len(missing)} parameters, e.g. {missing[:3]}")
        pick = [index[_stable(n)] for n in names]
        return AdamMoments([self.exp_avg[i] for i in pick], [self.exp_avg_sq[i] for i in pick], self.step,
                           self.betas, self.eps, list(names))


def _stable(name: str) -> str:
    return name.removeprefix("base_model.model.")


def adam_moments(optimizer: torch.optim.Optimizer, params: list, names: list[str] | None = None) -> AdamMoments:
    """(exp_avg list, exp_avg_sq list, step, betas, eps[, names]) of ``params`` in ``optimizer``
    (Adam or AdamW without amsgrad). A parameter that was never stepped has zero moments; all the
    stepped ones must share one step count, betas and eps (one transform uses one t)."""
    params = list(params)
    if names is not None and len(names) != len(params):
        raise ValueError(f"{len(names)} names for {len(params)} parameters")
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    exp_avg, exp_avg_sq, steps, hyper = [], [], set(), set()
    for i, p in enumerate(params):
        group = group_of.get(id(p))
        if group is None:
            raise ValueError(f"parameter {names[i] if names else i} is not in the optimizer")
        if group.get("amsgrad", False):
            raise ValueError("Adam with amsgrad is not supported (LESS preconditions with v_t, not max v)")
        hyper.add((tuple(float(b) for b in group["betas"]), float(group["eps"])))
        state = optimizer.state.get(p, {})
        if "exp_avg" in state:
            exp_avg.append(state["exp_avg"].detach().float().cpu().clone())
            exp_avg_sq.append(state["exp_avg_sq"].detach().float().cpu().clone())
            steps.add(int(state["step"]))
        else:
            exp_avg.append(torch.zeros(p.shape, dtype=torch.float32))
            exp_avg_sq.append(torch.zeros(p.shape, dtype=torch.float32))
    if len(steps) > 1:
        raise ValueError(f"parameters were stepped different numbers of times: {sorted(steps)}")
    if len(hyper) > 1:
        raise ValueError(f"parameter groups with different betas/eps: {sorted(hyper)}")
    betas, eps = hyper.pop() if hyper else ((0.9, 0.999), 1e-8)
    return AdamMoments(exp_avg, exp_avg_sq, steps.pop() if steps else 0, betas, eps,
                       list(names) if names is not None else None)


def save_adam_moments(path, moments: AdamMoments) -> None:
    """torch.save of {"format", "names", "exp_avg": {name: tensor}, "exp_avg_sq": {name: tensor},
    "step", "betas", "eps"} (tensors on the CPU)."""
    if moments.names is None:
        raise ValueError("Adam moments without parameter names cannot be saved by name")
    if len(set(moments.names)) != len(moments.names):
        raise ValueError("duplicate parameter names in the Adam moments")
    torch.save({
        "format": _MOMENTS_FORMAT,
        "names": list(moments.names),
        "exp_avg": {n: t.detach().cpu() for n, t in zip(moments.names, moments.exp_avg)},
        "exp_avg_sq": {n: t.detach().cpu() for n, t in zip(moments.names, moments.exp_avg_sq)},
        "step": int(moments.step),
        "betas": [float(b) for b in moments.betas],
        "eps": float(moments.eps),
    }, path)


def load_adam_moments(path) -> dict:
    """The dict ``save_adam_moments`` wrote (``exp_avg`` / ``exp_avg_sq`` keyed by parameter
    name, ``names`` in the saved order, ``step`` int, ``betas`` tuple, ``eps`` float).
    ``as_moments(load_adam_moments(path))`` gives the ``AdamMoments`` back."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != _MOMENTS_FORMAT:
        raise ValueError(f"{path} is not an ntk-ray Adam moments file")
    saved["betas"] = tuple(saved["betas"])
    return saved


def as_moments(saved: dict) -> AdamMoments:
    """``AdamMoments`` (in the saved order) from ``load_adam_moments``'s dict."""
    names = list(saved["names"])
    return AdamMoments([saved["exp_avg"][n] for n in names], [saved["exp_avg_sq"][n] for n in names],
                       int(saved["step"]), tuple(saved["betas"]), float(saved["eps"]), names)


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
