"""Slow, obviously-correct references for the fast paths in ``features.py``.

One sample at a time, full vocabulary logits, plain autograd: what the paper defines, with no
shortcut. Used by the tests and by the LESS-style row of the feature benchmark.
"""

from __future__ import annotations

import torch

from ntk_ray.core.features import trainable_linears


def reference_objective(model, input_ids: list[int], score_mask: list[int]) -> torch.Tensor:
    """F(x) = mean over scored positions of the sum over the vocabulary of the logits."""
    ids = torch.as_tensor([input_ids])
    logits = model(input_ids=ids).logits[0].float()  # (T, V): the full vocabulary
    mask = torch.as_tensor(score_mask, dtype=torch.float32)
    return (logits.sum(dim=-1) * mask).sum() / mask.sum()


def reference_loss(model, input_ids: list[int], loss_mask: list[int]) -> torch.Tensor:
    """L(x) = mean causal-LM cross-entropy over the target positions t >= 1 with loss_mask[t]:
    logits[t - 1] (full vocabulary) predict input_ids[t] (``training.batch_loss``'s convention)."""
    ids = torch.as_tensor([input_ids])
    logits = model(input_ids=ids).logits[0, :-1].float()
    mask = torch.as_tensor(loss_mask, dtype=torch.float32)[1:]
    token_loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
    return (token_loss * mask).sum() / mask.sum().clamp(min=1)


REFERENCE_OBJECTIVES = {"summed-logits": reference_objective, "loss": reference_loss}


def reference_gradient(model, input_ids: list[int], score_mask: list[int], objective: str = "summed-logits") -> torch.Tensor:
    """g(x) = dF(x)/d theta_LoRA (or dL(x)/d theta_LoRA with objective="loss"), flattened in
    ``trainable_linears`` order."""
    params = [m.weight for _, m in trainable_linears(model)]
    grads = torch.autograd.grad(REFERENCE_OBJECTIVES[objective](model, input_ids, score_mask), params)
    return torch.cat([g.flatten() for g in grads]).float()


def reference_gradients(model, sequences, score_masks, objective: str = "summed-logits") -> torch.Tensor:
    """(N, P) matrix of per-sample gradients, one backward pass per sample."""
    return torch.stack([reference_gradient(model, s, m, objective) for s, m in zip(sequences, score_masks)])
