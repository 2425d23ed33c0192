"""The baseline selectors as Ray stages: ``select --selector random|bm25|embedding|less``.

Every selector ranks every usable pool row (no coarse cut) and writes the same outputs as the
NTK selector; ``stage`` in ``ranked.parquet`` names the selector. The math is in
``selectors.py`` and ``lexical.py`` (plain numpy/torch); this module moves shards to it.

* ``random``: s(x) = a uniform number drawn from (seed, key) (``selectors.random_scores``):
  the same for any sharding or worker count. No model, no warm-up.
* ``bm25``: BM25 of each pool row against the domain rows as queries, on the model's token ids
  (``lexical.bm25_scores``): document frequencies per token shard (Ray tasks), merged, then
  scores per shard. No model, no warm-up.
* ``embedding`` (RDS+): mean-pooled final hidden states of the warmed-up model (the coarse
  stage's embeddings, of every pool row); anchors take turns picking their most similar
  unpicked row (round-robin over exact per-anchor top-``budget`` lists); the rest by their best
  cosine to any anchor.
* ``less`` (Xia et al. 2024): projected LoRA gradients of the per-sample mean token loss; pool
  gradients Adam-preconditioned with the warm-up optimizer's moments
  (Gamma(g) = m_hat / (sqrt(v_hat) + eps)), anchors plain; s(x) = max_a cos(psi(x), psi(a)).
  Every pool row gets a backward pass: LESS costs more than NTK's coarse-then-kernel stages.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

BASELINES = ("random", "bm25", "embedding", "less")


def less_transform_for(model, moments_path: str, device):
    """The LESS Adam transform (``selectors.adam_gradient_transform``) for ``model``'s trainable
    linears, in ``FeatureComputer``'s module order, from the warm-up's saved moments (keyed by
    parameter name)."""
    from ntk_ray.core.features import trainable_linears
    from ntk_ray.core.selectors import adam_gradient_transform
    from ntk_ray.core.training import as_moments, load_adam_moments

    names = [f"{name}.weight" for name, _ in trainable_linears(model)]
    m = as_moments(load_adam_moments(moments_path)).select(names)  # ValueError naming what is missing
    return adam_gradient_transform([t.to(device) for t in m.exp_avg], [t.to(device) for t in m.exp_avg_sq],
                                   m.step, m.betas, m.eps)


def random_stage(cfg, usable_pool: pl.DataFrame) -> dict:
    from ntk_ray.core.selectors import random_scores
    from ntk_ray.sharded import scores_frame

    keys = usable_pool["key"].to_numpy()
    return {"scores": scores_frame([{"key": keys, "score": random_scores(keys, cfg.seed), "reject": [None] * len(keys)}])}


def _shard_docs(path: str, keep) -> tuple[np.ndarray, list[list[int]]]:
    from ntk_ray.workers import _keep_set, read_shard

    table = read_shard(path, ["key", "source", "row", "input_ids"], _keep_set(keep))
    return table.column("key").to_numpy(), table.column("input_ids").to_pylist()


def _bm25_stats_task(path: str, keep):
    from ntk_ray.core.lexical import bm25_stats

    return bm25_stats(_shard_docs(path, keep)[1])


def _bm25_score_task(path: str, keep, queries, stats):
    from ntk_ray.core.lexical import bm25_scores

    keys, docs = _shard_docs(path, keep)
    return {"key": keys, "score": bm25_scores(docs, queries, stats) if docs else np.zeros(0), "reject": [None] * len(keys)}


def bm25_stage(cfg, work: Path, usable_pool: pl.DataFrame, domain_ids: list[list[int]]) -> dict:
    """Two passes of Ray tasks over the pool's token shards: term statistics, then scores."""
    import ray

    from ntk_ray.core.lexical import merge_bm25_stats
    from ntk_ray.sharded import scores_frame

    shards = sorted(str(p) for p in (work / "tokens/pool").glob("*.parquet"))
    keep = ray.put(usable_pool.select("key", "source", "row").to_arrow())
    stats = merge_bm25_stats(ray.get([ray.remote(_bm25_stats_task).remote(p, keep) for p in shards]))
    stats_ref, queries_ref = ray.put(stats), ray.put(domain_ids)
    parts = ray.get([ray.remote(_bm25_score_task).remote(p, keep, queries_ref, stats_ref) for p in shards])
    return {"scores": scores_frame(parts)}


def embedding_stage(cfg, work: Path, anchor_embeddings: np.ndarray) -> dict:
    """Round-robin picks from exact per-anchor top-``budget`` lists, scores = best cosine."""
    import ray

    from ntk_ray.core.scoring import round_robin_order
    from ntk_ray.sharded import merge_topk_tasks, score_shards, scores_frame

    files = sorted(str(p) for p in (work / "embed").glob("*.parquet"))
    anchors = np.asarray(anchor_embeddings, dtype=np.float32)  # cosines: the kernel normalises both sides
    ref = ray.put(anchors)
    scores = scores_frame(score_shards(files, ref, "max-cosine", column="embedding"))
    k = max(1, min(cfg.budget, scores.height))
    topk = merge_topk_tasks(files, ref, k, "embedding", n_anchors=len(anchors), unit=True)
    order = round_robin_order(topk, cfg.budget)
    return {"scores": scores,
            "order": pl.DataFrame({"key": np.asarray(order, dtype=np.int64), "order": np.arange(len(order), dtype=np.int64)})}


def less_scores_stage(work: Path, anchor_features: np.ndarray) -> dict:
    """s(x) = max over anchors of the cosine of the LESS features."""
    import ray

    from ntk_ray.pipeline import feature_files
    from ntk_ray.sharded import score_shards, scores_frame

    files = feature_files(work / "features")
    return {"scores": scores_frame(score_shards(files, ray.put(np.asarray(anchor_features, dtype=np.float32)), "max-cosine"))}
