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

import math
from collections.abc import Callable

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


# ----------------------------------------------------------------------------------------------
# diversity-aware allocation over the NTK features (``select --allocation``)
#
# The scorers rank each candidate on its own, so near-duplicates of the anchors' favourite
# direction all get in. These greedy allocations pick the budget as a set and return an ORDER
# (pick 1, pick 2, ...); rows after the last pick keep the scorer's order (as round-robin does).
# Both work on the kernel of ``--scorer``: cosine kernels (unit-normalised psi) for ``cosine``,
# raw inner products for ``mean`` and ``max``. Ties are broken by the smaller int64 key.

ALLOCATIONS = ("score", "facility-location", "kernel-mean-matching")


def _best(values: np.ndarray, keys: np.ndarray, taken: np.ndarray) -> int:
    """Index of the largest value among rows not ``taken`` (ties: the smaller key); -1 if none."""
    v = np.where(taken, -np.inf, values)
    top = v.max() if v.size else -np.inf
    if top == -np.inf and taken.all():
        return -1
    tied = np.flatnonzero(v == top)
    return int(tied[np.argmin(keys[tied])])


def facility_location_order(kernel: np.ndarray, keys: np.ndarray, budget: int) -> list[int]:
    """Greedy facility location (coverage of the anchors) over a (anchors x rows) kernel block:

        f(S) = sum_j max(0, max_{i in S} Theta(a_j, x_i)),
        pick_t = argmax_{i not in S} f(S + {i}) - f(S) = sum_j max(0, Theta(a_j, x_i) - c_j),
        c_j = max(0, max_{i in S} Theta(a_j, x_i))   (each anchor's best coverage so far).

    f is monotone submodular (clipping at 0 keeps it so), so the greedy set is within 1 - 1/e
    of the best set of its size, and the lazy evaluation used here (a stale gain is an upper
    bound of the fresh one) picks exactly what the plain greedy picks, ties by key included.
    A row that covers anchors already covered by an earlier pick gains little: the allocation
    spreads the budget over the anchors. Returns the keys in pick order (``budget`` of them, or
    every row). Cost: O(anchors x rows) memory for the block, O(anchors) per gain evaluation;
    in practice a few evaluations per pick (lazy greedy), worst case O(budget x rows x anchors)."""
    import heapq

    rows = np.ascontiguousarray(np.asarray(kernel, dtype=np.float64).T)  # (rows x anchors)
    keys = np.asarray(keys, dtype=np.int64)
    n = rows.shape[0]
    cover = np.zeros(rows.shape[1])

    def gain(i: int) -> float:  # one summation order for every evaluation: a stale gain bounds a fresh one
        return float(np.maximum(rows[i] - cover, 0.0).sum())

    heap = [(-gain(i), int(keys[i]), i) for i in range(n)]
    heapq.heapify(heap)
    order: list[int] = []
    fresh = np.zeros(n, dtype=np.int64)  # the pick count at which a row's heap entry was computed
    while heap and len(order) < min(budget, n):
        _, key, i = heapq.heappop(heap)
        if fresh[i] == len(order):  # up to date: no other row can beat it (their bounds are >=)
            order.append(key)
            cover = np.maximum(cover, rows[i])
            continue
        gain_i = gain(i)
        fresh[i] = len(order)
        heapq.heappush(heap, (-gain_i, key, i))
    return order


def kernel_mean_matching_order(x, target, keys: np.ndarray, budget: int, block_rows: int = 4096) -> list[int]:
    """Greedy kernel mean matching (kernel herding towards the anchors' mean feature): the set S
    whose mean feature is closest to the anchors' mean mu in the kernel's feature space,

        MMD^2(S) = | mu - (1/|S|) sum_{i in S} x_i |^2,

    built one row at a time. With s = sum of the rows picked so far and t = |S| + 1 the size
    after the next pick, t^2 MMD^2(S + {i}) = t^2 |mu|^2 - 2t <mu, s + x_i> + |s + x_i|^2, so

        pick_t = argmin_{i not in S}  |x_i|^2 + 2 <s, x_i> - 2t <mu, x_i>.

    The first pick is the row of best score (<mu, x_i> with |x_i| = 1 for cosine); after that a
    row similar to what is already picked (<s, x_i> large) is pushed back, and rows that cover
    what the picks so far miss are pulled forward. c_i = <s, x_i> is kept up to date with one
    matrix-vector product per pick: O(budget x rows x d) time, rows x d floats of memory (the
    candidates' features, float32 on ``x``'s device), in row blocks of ``block_rows``. <mu, x_i>
    is computed in float64 once; the per-pick products in float32 (summed into c in float64):
    they read the whole matrix once per pick, so their cost is memory bandwidth (measured on the
    2-core CPU of development: 2,000 rows x d = 8192, 500 picks, 3.2 s of CPU time; with the
    per-pick products in float64 it was 65 s). The job runs it on a model worker (the GPU where
    there is one).

    ``x``: (rows x d) torch tensor or array (already unit-normalised for the cosine kernel),
    ``target``: mu (d,). Returns the keys in pick order (``budget`` of them, or every row)."""
    import torch

    xt = torch.as_tensor(np.asarray(x, dtype=np.float32)) if not torch.is_tensor(x) else x
    mu = torch.as_tensor(np.asarray(target, dtype=np.float64)).to(device=xt.device, dtype=torch.float64)
    keys = np.asarray(keys, dtype=np.int64)
    n = xt.shape[0]

    def matvec(v) -> np.ndarray:  # (X v) as float64, a block of rows at a time
        out = np.empty(n)
        with torch.inference_mode():
            for start in range(0, n, block_rows):
                blk = xt[start:start + block_rows]
                blk = blk.to(torch.float64) if v.dtype == torch.float64 else blk
                out[start:start + block_rows] = (blk @ v).to(torch.float64).cpu().numpy()
        return out

    with torch.inference_mode():
        sq = np.concatenate([torch.linalg.vector_norm(xt[s:s + block_rows].to(torch.float64), dim=1).square().cpu().numpy()
                             for s in range(0, n, block_rows)]) if n else np.zeros(0)
    m = matvec(mu)
    c = np.zeros(n)
    taken = np.zeros(n, dtype=bool)
    order: list[int] = []
    for t in range(1, min(budget, n) + 1):
        i = _best(-(sq + 2.0 * c - 2.0 * t * m), keys, taken)
        if i < 0:
            break
        taken[i] = True
        order.append(int(keys[i]))
        if t < min(budget, n):  # the per-pick product in the rows' own precision (memory-bound: no float64 copy)
            c += matvec(xt[i])
    return order


# ----------------------------------------------------------------------------------------------
# rank fusion of the NTK ranking and a second ranking of the candidates (``select --fusion``):
# rrf: the coarse stage's embedding ranking; rrf-bm25: the bm25 selector's lexical ranking

FUSIONS = ("none", "rrf", "rrf-bm25")


def allocation_conflict(allocation: str, scorer: str) -> str | None:
    """The usage message when a greedy ``--allocation`` meets ``--scorer round-robin`` (which
    picks by itself), else None: one rule for ``select`` and ``score``."""
    if allocation != "score" and scorer == "round-robin":
        return (f"--allocation {allocation} picks by itself: use it with --scorer cosine, mean or max, "
                "not round-robin")
    return None

# ``select --center``: kernels of centred features (``scoring.AnchorKernel(center=...)``),
#     Theta_c(x, a) = <psi(x) - m, psi(a) - m>,   m = mean of psi over the candidates,
# so the cosine scorer becomes the mean over anchors of cos(psi(x) - m, psi(a) - m). Summed-logit
# gradients of any text share a large common direction (raise every logit); centring removes it,
# as centring embeddings does, so what is left is what makes x like the domain and not like the
# pool in general. The allocations and round-robin use the same centred kernel.
CENTERS = ("none", "candidates")


def reciprocal_rank_fusion(ranks: list[np.ndarray], k: float) -> np.ndarray:
    """Reciprocal rank fusion (Cormack et al. 2009) of several rankings of the same rows:

        rrf(x) = sum_r 1 / (k + rank_r(x)),    rank_r(x) in 1..n (1 = best),

    higher = better. k damps the weight of the very top ranks (k = 60 in the original paper);
    with k -> infinity the fusion orders rows by their mean rank. ``ranks``: one int array per
    ranking, aligned on the same rows."""
    if not ranks:
        raise ValueError("no rankings to fuse")
    if k < 0:
        raise ValueError(f"k must be >= 0 (got {k})")
    out = np.zeros(len(ranks[0]))
    for r in ranks:
        r = np.asarray(r, dtype=np.float64)
        if r.shape != out.shape:
            raise ValueError(f"rankings of different lengths: {r.shape} vs {out.shape}")
        out += 1.0 / (k + r)
    return out


def ranks_of(keys: np.ndarray, *sort_by: np.ndarray, descending: tuple[bool, ...]) -> np.ndarray:
    """1-based ranks of rows sorted by ``sort_by`` (each ascending or ``descending``), then key
    ascending: the rank a row would get in ``io.outputs.rank_rows``-style sorting."""
    keys = np.asarray(keys, dtype=np.int64)
    cols = [keys] + [(-np.asarray(c, dtype=np.float64) if d else np.asarray(c, dtype=np.float64))
                     for c, d in zip(reversed(sort_by), reversed(descending))]
    order = np.lexsort(cols)
    ranks = np.empty(len(keys), dtype=np.int64)
    ranks[order] = np.arange(1, len(keys) + 1)
    return ranks


# ----------------------------------------------------------------------------------------------
# features averaged over warm-up checkpoints (``select --checkpoints K``), as LESS and TRAK do


def checkpoint_steps(total_steps: int, k: int) -> list[int]:
    """The optimizer steps after which the warm-up saves its K checkpoints: s_i = ceil(i S / K),
    i = 1..K, evenly spaced, the last one the end of training (s_K = S). With fewer steps than
    checkpoints some coincide (that checkpoint then counts more than once)."""
    if k < 1:
        raise ValueError(f"need at least one checkpoint (got {k})")
    return [max(1, math.ceil(i * total_steps / k)) if total_steps else 0 for i in range(1, k + 1)]


def checkpoint_weights(lrs: list[float]) -> list[float]:
    """LESS's checkpoint weights: w_i = eta_i / sum_j eta_j, eta_i the learning rate of the step
    checkpoint i was saved after (all equal, 1/K, with the warm-up's constant rate)."""
    total = float(sum(lrs))
    if not lrs or total <= 0:
        raise ValueError(f"checkpoint learning rates must be positive (got {lrs})")
    return [float(lr) / total for lr in lrs]


def combine_checkpoint_features(features: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """One feature per row from K per-checkpoint features psi_i (each rows x d), concatenated
    along the feature axis with weights sqrt(w_i):

        psi(x) = [sqrt(w_1) psi_1(x), ..., sqrt(w_K) psi_K(x)]     (rows x K d)
        <psi(x), psi(a)> = sum_i w_i <psi_i(x), psi_i(a)>

    so every kernel the scorers form is exactly LESS's checkpoint-weighted sum of per-checkpoint
    kernels (the cosine normalises the summed kernel: cos = sum_i w_i Theta_i(x, a) /
    sqrt(sum_i w_i Theta_i(x, x) sum_i w_i Theta_i(a, a))). The result keeps the feature-file
    contract: a fixed-size vector per row (length K d), float32."""
    if len(features) != len(weights) or not features:
        raise ValueError(f"{len(features)} feature blocks for {len(weights)} weights")
    rows = {f.shape[0] for f in features}
    if len(rows) != 1:
        raise ValueError(f"checkpoint features with different row counts: {sorted(rows)}")
    return np.concatenate([np.asarray(f, dtype=np.float32) * np.float32(math.sqrt(w)) for f, w in zip(features, weights)],
                          axis=1)


def combine_checkpoint_norms(norms: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """The gradient norm that goes with ``combine_checkpoint_features``: the norm of the weighted
    concatenation of the unprojected gradients, sqrt(sum_i w_i |g_i(x)|^2)."""
    return np.sqrt(sum(np.asarray(n, dtype=np.float64) ** 2 * w for n, w in zip(norms, weights))).astype(np.float32)
