"""``train_lora``'s learning-rate schedule and gradient accumulation, against references.

* ``lr_factor`` against the schedule's formula written out by hand, and the learning rate each
  optimizer step of ``train_lora`` really used;
* gradient accumulation: k batches of one row accumulated into one step give the gradient of
  one batch of the k rows (loss = mean over every target token of the step), checked through
  AdamW's first moment after one step (m_1 = (1 - b1) g) against a hand-computed gradient, and
  shown to differ from the naive mean of per-batch means;
* the defaults of ``TrainConfig`` (the select warm-up's) train bit for bit as the loop before
  the schedule existed;
* a bfloat16 or float16 base model trains with float32 LoRA weights and moments.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_tiny_lora_model, random_samples

from ntk_ray.core.features import pack_by_tokens, pad_batch
from ntk_ray.core.training import (
    TrainConfig,
    batch_loss,
    lr_factor,
    train_lora,
    warmup_steps,
)

QUIET = {"log": lambda m: None}


def test_lr_factor_matches_the_hand_formula():
    S = 10  # steps; warmup_ratio 0.25 -> W = ceil(2.5) = 3
    assert warmup_steps(S, 0.25) == 3 and warmup_steps(S, 0.0) == 0 and warmup_steps(S, 0.3) == 3
    assert warmup_steps(S, 1.0) == S
    ramp = [1 / 3, 2 / 3, 1.0]
    linear = ramp + [1 - (s - 3) / 7 for s in range(3, 10)]
    cosine = ramp + [0.5 * (1 + math.cos(math.pi * (s - 3) / 7)) for s in range(3, 10)]
    constant = ramp + [1.0] * 7
    for name, expected in (("linear", linear), ("cosine", cosine), ("constant", constant)):
        got = [lr_factor(s, S, name, 0.25) for s in range(S)]
        assert got == pytest.approx(expected, abs=1e-12), name
    # spot values, written out: linear at s = 6 is 4/7; cosine at the first post-warm-up step is 1
    assert lr_factor(6, S, "linear", 0.25) == pytest.approx(4 / 7)
    assert lr_factor(3, S, "cosine", 0.25) == 1.0 and lr_factor(9, S, "cosine", 0.25) > 0  # no step at lr 0
    assert all(lr_factor(s, S, "constant", 0.0) == 1.0 for s in range(S))  # the warm-up's default: lr throughout
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_factor(0, S, "step")


def test_train_lora_uses_the_scheduled_rate_at_every_step(monkeypatch):
    seqs, masks = random_samples(14, seed=2)
    used = []
    step = torch.optim.AdamW.step

    def recording_step(self, *a, **kw):
        used.append(self.param_groups[0]["lr"])
        return step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    cfg = TrainConfig(epochs=2, lr=1e-2, batch_tokens=40, seed=3, lr_schedule="cosine", warmup_ratio=0.2,
                      grad_accum_steps=2)
    history = train_lora(build_tiny_lora_model(seed=1), seqs, masks, cfg, **QUIET)
    per_epoch = [math.ceil(len(pack_by_tokens([len(s) for s in seqs], 40, 16)) / 2)] * 2
    total = sum(per_epoch)
    assert history["steps"] == len(used) == total > 4
    assert history["batches"] == 2 * len(pack_by_tokens([len(s) for s in seqs], 40, 16))
    assert used == pytest.approx([1e-2 * lr_factor(s, total, "cosine", 0.2) for s in range(total)], rel=1e-12)
    assert used[0] < used[warmup_steps(total, 0.2)] == pytest.approx(1e-2) and used[-1] < used[0] * 2


def _lengths_differ_rows():
    """Four rows with 2, 7, 11 and 4 target tokens (so a per-row mean weighs tokens unequally)."""
    seqs, _ = random_samples(4, seed=11, min_len=16, max_len=16)
    lengths, targets = (5, 12, 16, 8), (2, 7, 11, 4)
    seqs = [s[:n] for s, n in zip(seqs, lengths)]
    masks = [[0] * (n - t) + [1] * t for n, t in zip(lengths, targets)]
    return seqs, masks


def _first_step_gradient(cfg, seqs, masks) -> list[torch.Tensor]:
    """g of the first optimizer step, read from AdamW's first moment: m_1 = (1 - b1) g."""
    history = train_lora(build_tiny_lora_model(seed=5), seqs, masks, cfg, keep_optimizer_state=True, **QUIET)
    assert history["steps"] == 1
    m = history["adam"]
    return [t / (1 - m.betas[0]) for t in m.exp_avg]


def _reference_gradient(seqs, masks, per_row_mean: bool = False) -> list[torch.Tensor]:
    """By hand: the gradient of sum over all rows' target tokens of the token loss / their number
    (``per_row_mean``: the mean of each row's mean instead, the wrong normalisation)."""
    model = build_tiny_lora_model(seed=5)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    total_tokens = sum(sum(m[1:]) for m in masks)
    loss = 0
    for s, m in zip(seqs, masks):
        ids, attn, mask = pad_batch([s], [m])
        loss_sum, n = batch_loss(model, ids, attn, mask)
        loss = loss + (loss_sum / n / len(seqs) if per_row_mean else loss_sum / total_tokens)
    return list(torch.autograd.grad(loss, params))


def test_grad_accumulation_of_single_rows_equals_one_batch_of_them():
    seqs, masks = _lengths_differ_rows()
    k = len(seqs)
    accumulated = _first_step_gradient(TrainConfig(epochs=1, lr=1e-3, batch_tokens=4096, max_batch_rows=1,
                                                   grad_accum_steps=k), seqs, masks)
    one_batch = _first_step_gradient(TrainConfig(epochs=1, lr=1e-3, batch_tokens=4096, max_batch_rows=k), seqs, masks)
    reference = _reference_gradient(seqs, masks)
    for a, b, r in zip(accumulated, one_batch, reference):
        assert torch.allclose(a, r, rtol=1e-4, atol=1e-7)
        assert torch.allclose(b, r, rtol=1e-4, atol=1e-7)
    assert sum(float(r.abs().sum()) for r in reference) > 0
    # the test can fail: the mean of per-row means (what a per-batch normalisation would give) differs
    wrong = _reference_gradient(seqs, masks, per_row_mean=True)
    worst = max(float((w - r).abs().max() / r.abs().max()) for w, r in zip(wrong, reference))
    assert worst > 1e-2


def test_the_warmup_defaults_train_exactly_as_the_loop_before_the_schedule():
    """TrainConfig's defaults (constant, no warm-up steps, one batch per step: what the select
    warm-up uses) against the loop as it was: AdamW, one step per batch, loss = per-token mean."""
    from ntk_ray.core.training import _batches

    seqs, masks = random_samples(16, seed=9)
    cfg = TrainConfig(epochs=1.5, lr=1e-2, batch_tokens=48, seed=4)
    assert (cfg.lr_schedule, cfg.warmup_ratio, cfg.grad_accum_steps) == ("constant", 0.0, 1)
    model = build_tiny_lora_model(seed=6)
    train_lora(model, seqs, masks, cfg, **QUIET)

    ref = build_tiny_lora_model(seed=6)
    torch.manual_seed(cfg.seed)
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ref.train()
    for epoch in range(math.ceil(cfg.epochs)):
        batches = _batches(seqs, cfg, epoch)
        if epoch + 1 > cfg.epochs:
            batches = batches[: max(1, int(len(batches) * (cfg.epochs - epoch)))]
        for batch in batches:
            ids, attn, mask = pad_batch([seqs[i] for i in batch], [masks[i] for i in batch])
            loss_sum, n = batch_loss(ref, ids, attn, mask)
            opt.zero_grad(set_to_none=True)
            (loss_sum / n.clamp(min=1)).backward()
            opt.step()
    got = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        if p.requires_grad:
            assert torch.equal(got[name], p), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_low_precision_model_trains_its_float32_lora_weights(dtype):
    """bfloat16, and float16 (which trains with loss scaling, ``torch.amp.GradScaler``)."""
    from ntk_ray.models import attach_lora, tiny_llama

    seqs, masks = random_samples(10, vocab=97, seed=12)
    model = attach_lora(tiny_llama(vocab_size=97).to(dtype), r=4, alpha=8, seed=0)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {dtype}
    cfg = TrainConfig(epochs=4, lr=1e-2, batch_tokens=64, seed=0, lr_schedule="cosine", warmup_ratio=0.1)
    history = train_lora(model, seqs, masks, cfg, keep_optimizer_state=True, **QUIET)
    assert history["epoch_loss"][-1] < history["epoch_loss"][0]
    assert {t.dtype for t in history["adam"].exp_avg_sq} == {torch.float32}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
