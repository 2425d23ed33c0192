"""Slow, obviously-correct references for tests.

* Per-sample gradients for the fast paths in ``features.py``: one sample at a time, full
  vocabulary logits, plain autograd: what the paper defines, with no shortcut. Used by the tests
  and by the LESS-style row of the feature benchmark.
* In-memory twins of the selectors' stages (whole pool in one numpy call, no shards, no
  executor): ``embedding_selection`` / ``embedding_shard`` (RDS+), ``less_scores``,
  ``knn_block`` (the coarse stage's kNN lists), and two text baselines on lower-cased words,
  ``tfidf_scores`` and ``bm25_text_scores``. The product ranks with ``stages.rank`` and
  ``stages.kernel``; the tests check those against these. Benchmarks and scripts must run the
  product (``runner``), not these.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import torch

from ntk_ray.core.features import trainable_linears
from ntk_ray.core.lexical import bm25_scores, bm25_stats
from ntk_ray.core.scoring import AnchorKernel, AnchorTopK, round_robin_order


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


# ==============================================================================================
# slow, obviously-correct references for tests: in-memory twins of the selectors' stages
# (never used by the product: ntk_ray.stages.rank and ntk_ray.stages.kernel rank shard by shard)
# ==============================================================================================

# ----------------------------------------------------------------------------------------------
# embedding (RDS+): the whole pool in one call

_BLOCK_ENTRIES = 1 << 22  # kernel-block entries (anchors x rows) formed at once


def embedding_shard(pool_emb: np.ndarray, anchor_emb: np.ndarray, pool_keys: np.ndarray,
                    budget: int) -> tuple[np.ndarray, AnchorTopK]:
    """One shard of the embedding selector: (s(x) = max_a cos(x, a) per row of the shard, float64;
    the per-anchor top-``budget`` state, ordered by cos desc then key asc). Merge the states of all shards with
    ``AnchorTopK.merge`` and pass the result to ``scoring.round_robin_order(merged, budget)``."""
    pool = np.asarray(pool_emb, dtype=np.float32)
    anchors = np.asarray(anchor_emb, dtype=np.float32)
    keys = np.asarray(pool_keys, dtype=np.int64)
    if pool.ndim != 2 or anchors.ndim != 2 or pool.shape[1] != anchors.shape[1]:
        raise ValueError(f"pool embeddings {pool.shape} and anchor embeddings {anchors.shape} must be "
                         "(rows x dim) with the same dim")
    if keys.shape != (pool.shape[0],):
        raise ValueError(f"{keys.shape} keys for {pool.shape[0]} pool rows")
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    if not np.isfinite(pool).all():
        raise ValueError("pool embeddings contain NaN or inf")
    kernel = AnchorKernel(anchors)  # checks anchors: non-empty, finite
    # k = budget, not min(budget, rows): a shard's state holds at most its rows anyway, and merged
    # states keep the k of the state merged into
    topk = AnchorTopK(kernel.n_anchors, int(budget))
    scores = np.full(pool.shape[0], -np.inf)
    step = max(1, _BLOCK_ENTRIES // kernel.n_anchors)  # never anchors x all rows at once
    for start in range(0, pool.shape[0], step):
        block = kernel.kernel_block(pool[start:start + step], unit=True)  # cos(a, x), anchors x rows
        scores[start:start + step] = block.max(axis=0)
        if topk.k > 0:
            topk.update(block, keys[start:start + step])
    return scores, topk


def embedding_selection(pool_emb: np.ndarray, anchor_emb: np.ndarray, pool_keys: np.ndarray,
                        budget: int) -> tuple[np.ndarray, np.ndarray]:
    """RDS+-style selection on the whole pool in one call (``embedding_shard`` + merge +
    ``round_robin_order`` is the sharded form and gives exactly the same result).

    Returns (s(x) = max over anchors of cos(x, a) per pool row, float64, in input order;
    the int64 pool keys in pick order for the first min(budget, n) picks)."""
    scores, topk = embedding_shard(pool_emb, anchor_emb, pool_keys, budget)
    order = round_robin_order(topk, int(budget)) if topk.k > 0 else []
    return scores, np.asarray(order, dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# LESS

def less_scores(pool_features: np.ndarray, anchor_features: np.ndarray) -> np.ndarray:
    """LESS: s(x) = max over anchors a of cos(psi(x), psi(a)) (float64, one per pool row; a zero
    feature has cosine 0). Pool features: projected Adam-preconditioned loss gradients
    (``adam_gradient_transform``); anchor features: projected plain loss gradients. Row-wise,
    so shards are scored independently."""
    pool = np.asarray(pool_features, dtype=np.float32)
    if pool.ndim != 2:
        raise ValueError(f"pool features must be (rows x d), got shape {pool.shape}")
    if not np.isfinite(pool).all():
        raise ValueError("pool features contain NaN or inf")
    kernel = AnchorKernel(anchor_features)
    if pool.shape[1] != kernel.features.shape[1]:
        raise ValueError(f"pool features of dim {pool.shape[1]} vs anchor features of dim {kernel.features.shape[1]}")
    if pool.shape[0] == 0:
        return np.zeros(0)
    return kernel.score(pool, "max-cosine")


# ----------------------------------------------------------------------------------------------
# coarse stage: per-anchor kNN lists of one block

def knn_block(anchor_emb: np.ndarray, pool_emb: np.ndarray, pool_keys: np.ndarray, k: int) -> AnchorTopK:
    """Per-anchor top-k of one block of pool embeddings, with the similarities the sharded
    coarse stage uses (``AnchorKernel.kernel_block``: float64, rounded to the float32 grid)."""
    sims = AnchorKernel(anchor_emb).kernel_block(pool_emb)
    return AnchorTopK(sims.shape[0], k).update(sims, pool_keys)


# ----------------------------------------------------------------------------------------------
# lexical baselines on lower-cased words (the job's BM25 works on token ids: core.lexical)
#
# TF-IDF cosine to the domain centroid:
#     w(x, t) = (1 + log tf(x, t)) * idf(t),   idf(t) = log((N + 1) / (df(t) + 1)) + 1
#     v(x)    = w(x, .) / ||w(x, .)||          (df, N over the pool)
#     s(x)    = <v(x), mean_{a in D_t} v(a)>

TOKEN = r"[a-z0-9]+"


def _terms(texts: list[str]) -> pl.DataFrame:
    return (pl.DataFrame({"text": texts}).with_row_index("doc")
            .select("doc", pl.col("text").str.to_lowercase().str.extract_all(TOKEN).alias("term"))
            .explode("term").drop_nulls("term")
            .group_by("doc", "term").agg(pl.len().alias("tf")))


def _unit(weights: pl.DataFrame) -> pl.DataFrame:
    return weights.with_columns((pl.col("w") / pl.col("w").pow(2).sum().sqrt().over("doc")).alias("w"))


def tfidf_scores(pool_texts: list[str], domain_texts: list[str]) -> np.ndarray:
    """s(x) for every pool text (float64, in input order)."""
    pool = _terms(pool_texts)
    n = len(pool_texts)
    idf = pool.group_by("term").agg(pl.len().alias("df")).with_columns(
        (((n + 1) / (pl.col("df") + 1)).log() + 1).alias("idf"))
    def weigh(t):
        return _unit(t.join(idf, on="term", how="inner").with_columns(((1 + pl.col("tf").log()) * pl.col("idf")).alias("w")))
    pool_w = weigh(pool)
    dom_w = weigh(_terms(domain_texts))
    centroid = dom_w.group_by("term").agg((pl.col("w").sum() / len(domain_texts)).alias("c"))
    scored = (pool_w.join(centroid, on="term", how="inner")
              .group_by("doc").agg((pl.col("w") * pl.col("c")).sum().alias("s")))
    out = np.zeros(n)
    out[scored["doc"].to_numpy()] = scored["s"].to_numpy()
    return out


def _word_ids(texts: list, vocab: dict[str, int]) -> list[list[int]]:
    words = pl.Series("text", texts, dtype=pl.String).str.to_lowercase().str.extract_all(TOKEN).to_list()
    return [[vocab.setdefault(w, len(vocab)) for w in (ws or [])] for ws in words]


def bm25_text_scores(pool_texts: list[str], domain_texts: list[str], k1: float = 1.5, b: float = 0.75) -> np.ndarray:
    """BM25 on lower-cased words (the TF-IDF tokenisation ``[a-z0-9]+``): the same core as
    ``bm25_scores`` with words mapped to ids; stats over ``pool_texts``. float64 per pool text."""
    vocab: dict[str, int] = {}
    pool = _word_ids(list(pool_texts), vocab)
    queries = _word_ids(list(domain_texts), vocab)
    return bm25_scores(pool, queries, bm25_stats(pool), k1=k1, b=b)
