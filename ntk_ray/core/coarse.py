"""Coarse stage: reverse-kNN votes on mean-pooled embeddings (pool C -> M candidates).

Every domain sample a picks its K nearest pool rows by cosine of the L2-normalised mean-pooled
final hidden states (``features.mean_pooled_embeddings``); a pool row's score is its vote count

    votes(x) = |{a in D_t : x in kNN_K(a)}|,   sim(x) = sum of cos(x, a) over those a,

and the top M rows by (votes desc, sim desc, key asc) go on to the NTK stage. The per-anchor
kNN lists are ``scoring.AnchorTopK`` states, built shard by shard (``stages.kernel.merge_topk``)
and merged exactly; ``reference.knn_block`` is the one-block form the tests use.
"""

from __future__ import annotations

import polars as pl

from ntk_ray.core.scoring import AnchorTopK


def votes(topk: AnchorTopK) -> pl.DataFrame:
    """key, coarse_votes (int64), coarse_sim (float64) for every pool row that got a vote."""
    keys = topk.keys.ravel()
    sims = topk.scores.ravel()
    if keys.size == 0:
        return pl.DataFrame(schema={"key": pl.Int64, "coarse_votes": pl.Int64, "coarse_sim": pl.Float64})
    return (
        pl.DataFrame({"key": keys, "sim": sims})
        .group_by("key")
        .agg(pl.len().cast(pl.Int64).alias("coarse_votes"), pl.col("sim").sum().alias("coarse_sim"))
    )


def coarse_order(pool_keys: pl.DataFrame, vote_table: pl.DataFrame) -> pl.DataFrame:
    """All pool rows (``pool_keys`` has a ``key`` column) with their votes (0 when none),
    sorted best first: votes desc, summed similarity desc, key asc."""
    return (
        pool_keys.join(vote_table, on="key", how="left")
        .with_columns(pl.col("coarse_votes").fill_null(0), pl.col("coarse_sim").fill_null(0.0))
        .sort(["coarse_votes", "coarse_sim", "key"], descending=[True, True, False])
    )
