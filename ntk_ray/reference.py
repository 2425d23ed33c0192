"""Slow, obviously-correct references for the fast paths in ``features.py``.

One sample at a time, full vocabulary logits, plain autograd: what the paper defines, with no
shortcut. Used by the tests and by the LESS-style row of the feature benchmark.
"""

from __future__ import annotations

import torch

from .features import trainable_linears


def reference_objective(model, input_ids: list[int], score_mask: list[int]) -> torch.Tensor:
    """F(x) = mean over scored positions of the sum over the vocabulary of the logits."""
    ids = torch.as_tensor([input_ids])
    logits = model(input_ids=ids).logits[0].float()  # (T, V): the full vocabulary
    mask = torch.as_tensor(score_mask, dtype=torch.float32)
    return (logits.sum(dim=-1) * mask).sum() / mask.sum()


def reference_gradient(model, input_ids: list[int], score_mask: list[int]) -> torch.Tensor:
    """g(x) = dF(x)/d theta_LoRA, flattened in ``trainable_linears`` order."""
    params = [m.weight for _, m in trainable_linears(model)]
    grads = torch.autograd.grad(reference_objective(model, input_ids, score_mask), params)
    return torch.cat([g.flatten() for g in grads]).float()


def reference_gradients(model, sequences, score_masks) -> torch.Tensor:
    """(N, P) matrix of per-sample gradients, one backward pass per sample."""
    return torch.stack([reference_gradient(model, s, m) for s, m in zip(sequences, score_masks)])
