"""The plain-math cores of the selectors beside NTK (numpy/torch only; no model, no Ray).

``ntk-ray select --selector`` chooses one of ``SELECTORS``. Every selector gives each pool row x
a float64 score s(x) (higher = better) and, for the round-robin ones, an explicit pick order;
everything here is a pure function of its inputs and can be computed shard by shard and merged
exactly (see each function).

* ``ntk``: the kernel scorers of ``scoring.py`` (not here).
* ``random``: s(x) = U(seed, key(x)), a hash of the seed and the row's int64 key mapped to
  [0, 1): the same for any sharding or order of the pool; rank = descending score.
* ``embedding`` (RDS+, Ivison et al. 2025): e(x) = mean over tokens of the final hidden states,
  L2-normalised (``features.mean_pooled_embeddings``);

      cos(x, a) = <e(x), e(a)> / (|e(x)| |e(a)|),     s(x) = max_a cos(x, a),

  and the selection is round-robin over the anchors: in round r = 0, 1, ... each anchor a in
  turn takes its r-th best pool row (by cos desc, key asc), skipped when already taken, until
  the budget is filled (``scoring.round_robin_order``). Exact from per-anchor top-``budget``
  lists (``scoring.AnchorTopK``, mergeable across shards): the first ``budget`` distinct keys of
  the interleaving are all within each anchor's first ``budget`` entries (anchor 0 alone
  contributes ``budget`` distinct keys by round ``budget``). The job computes it shard by shard
  (``stages.rank.EmbeddingScoreStage``); ``reference.embedding_selection`` is the in-memory twin.
* ``less`` (LESS, Xia et al. 2024): pool features are projected Adam-preconditioned loss
  gradients psi(Gamma(g(x))), anchor features projected plain (SGD) loss gradients psi(g(a));

      m     = b1 m_t + (1 - b1) g,      v = b2 v_t + (1 - b2) g^2      (elementwise)
      m_hat = m / (1 - b1^(t+1)),   v_hat = v / (1 - b2^(t+1))
      Gamma(g) = m_hat / (sqrt(v_hat) + eps)

  with (m_t, v_t, t) the optimizer's moments and step count after the warm-up (the update
  direction torch.optim.Adam would take with gradient g); s(x) = max_a cos(psi_x, psi_a).
  Gamma is elementwise and non-linear, so it acts on the full per-sample gradient of each
  module, before any projection. Scored by ``stages.rank.LessScoreStage`` (twin:
  ``reference.less_scores``).
* ``bm25``: ``lexical.bm25_scores`` on token ids.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

SELECTORS = ("ntk", "random", "embedding", "less", "bm25")

# ----------------------------------------------------------------------------------------------
# random

_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser (a bijection of uint64), vectorised; wraps modulo 2^64."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def random_scores(keys: np.ndarray, seed: int) -> np.ndarray:
    """float64 in [0, 1) per int64 key, a pure function of (seed, key), so any sharding or order of
    the pool gives the same values; rank = descending score (ties, probability ~n^2 / 2^54, broken
    by key like every other selector).

        h(seed, key) = M(M(key XOR M(seed)) XOR M(seed + 1)),   U = (h >> 11) / 2^53

    M the SplitMix64 finaliser on 64-bit words (seed taken modulo 2^64)."""
    k = np.asarray(keys)
    if k.ndim != 1:
        raise ValueError(f"keys must be one-dimensional, got shape {k.shape}")
    if k.size and not np.issubdtype(k.dtype, np.integer):
        raise ValueError(f"keys must be integers (got {k.dtype})")
    k = k.astype(np.int64, copy=False).view(np.uint64)
    s0 = _splitmix64(np.array([int(seed) & _MASK64], dtype=np.uint64))[0]
    s1 = _splitmix64(np.array([(int(seed) + 1) & _MASK64], dtype=np.uint64))[0]
    h = _splitmix64(_splitmix64(k ^ s0) ^ s1)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# ----------------------------------------------------------------------------------------------
# LESS


def adam_gradient_transform(exp_avg: list[torch.Tensor], exp_avg_sq: list[torch.Tensor], step: int,
                            betas=(0.9, 0.999), eps: float = 1e-8) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """LESS's Adam preconditioning of a per-sample gradient g of module i (shape (B, out, in),
    or any shape ending in the module's weight shape):

        m = b1 exp_avg[i] + (1 - b1) g,        v = b2 exp_avg_sq[i] + (1 - b2) g^2
        m_hat = m / (1 - b1^(step+1)),         v_hat = v / (1 - b2^(step+1))
        Gamma(g) = m_hat / (sqrt(v_hat) + eps)

    ``step`` = optimizer steps already taken (``training.adam_moments``): Gamma(g) is the update
    direction torch.optim.Adam/AdamW (no amsgrad, lr = 1) would take next with gradient g.
    Returns a callable (module_index, g) -> Gamma(g) (same dtype as g, computed in float32 or
    better), to pass as ``FeatureComputer(gradient_transform=...)``. The moments are moved to
    g's device on first use per device."""
    if len(exp_avg) != len(exp_avg_sq):
        raise ValueError(f"{len(exp_avg)} first moments but {len(exp_avg_sq)} second moments")
    for i, (m, v) in enumerate(zip(exp_avg, exp_avg_sq)):
        if m.shape != v.shape:
            raise ValueError(f"module {i}: exp_avg {tuple(m.shape)} vs exp_avg_sq {tuple(v.shape)}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    b1, b2 = float(betas[0]), float(betas[1])
    bc1 = 1.0 - b1 ** (step + 1)
    bc2 = 1.0 - b2 ** (step + 1)
    cache: dict = {}

    def moments(i: int, device, dtype):
        key = (i, str(device), dtype)
        if key not in cache:
            cache[key] = (exp_avg[i].detach().to(device=device, dtype=dtype),
                          exp_avg_sq[i].detach().to(device=device, dtype=dtype))
        return cache[key]

    def transform(module_index: int, g: torch.Tensor) -> torch.Tensor:
        if not 0 <= module_index < len(exp_avg):
            raise IndexError(f"module {module_index}: moments for {len(exp_avg)} modules")
        work = torch.promote_types(g.dtype, torch.float32)
        m_t, v_t = moments(module_index, g.device, work)
        if tuple(g.shape[-m_t.dim():]) != tuple(m_t.shape):
            raise ValueError(f"module {module_index}: gradient of shape {tuple(g.shape)} for moments of shape "
                             f"{tuple(m_t.shape)}")
        gw = g.to(work)
        m = (1.0 - b1) * gw + b1 * m_t
        v = (1.0 - b2) * gw.square() + b2 * v_t
        return ((m / bc1) / ((v / bc2).sqrt() + eps)).to(g.dtype)

    return transform
