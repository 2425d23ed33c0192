"""The stages that turn vectors into an order: the coarse cut and every selector's scores.

  coarse    per-anchor top-K over the embed/ shards (tasks, merged exactly) -> reverse-kNN
            votes -> candidates = top M = coarse_factor x budget (``core.coarse``)
  score     one score per candidate (tasks over shards): the NTK kernel (``--scorer``), or a
            baseline's (random, bm25, embedding, less); round-robin selectors also return the
            picking order

Every score stage returns ``Scores``: a frame of (key, score, reject) and, for round-robin
selectors, an ``order`` frame (key, order). The write stage ranks from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from ntk_ray.stages.base import Context, Stage
from ntk_ray.stages.kernel import (
    allocation_order,
    mean_vector,
    merge_topk,
    score_shards,
    scores_frame,
)
from ntk_ray.stages.model import Shards, Warm, pool_rows
from ntk_ray.stages.read import Accounting, Tokens


@dataclass
class Candidates:
    """Rows that go on to be scored (``candidates``: id, key, source, row, coarse_votes,
    coarse_sim), rows cut before (``cut``, same columns, in coarse order) and pool rows the
    coarse stage could not use (``rejected``: id, source, row, reason; e.g. a non-finite
    embedding), which the write stage lists as rejects."""
    candidates: pl.DataFrame
    cut: pl.DataFrame
    skipped: bool
    M: int | None = None
    K: int | None = None
    rejected: pl.DataFrame | None = None


@dataclass
class Scores:
    scores: pl.DataFrame  # key, score, reject
    order: pl.DataFrame | None = None  # key, order (round-robin picking order)


def no_coarse(pool: pl.DataFrame, m: int | None = None) -> Candidates:
    """Every pool row is a candidate (no coarse votes)."""
    cand = pool.with_columns(pl.lit(None, dtype=pl.Int64).alias("coarse_votes"),
                             pl.lit(None, dtype=pl.Float64).alias("coarse_sim"))
    return Candidates(candidates=cand, cut=cand.head(0), skipped=True, M=m)


def order_frame(order) -> pl.DataFrame:
    return pl.DataFrame({"key": np.asarray(order, dtype=np.int64), "order": np.arange(len(order), dtype=np.int64)})


class CoarseStage(Stage):
    """Reverse-kNN votes on the pool embeddings; candidates = top M = coarse_factor x budget."""
    name = "coarse"
    needs = ("validate", "warmup", "embed")
    output = Candidates

    def run(self, ctx: Context, validate: Accounting, warmup: Warm, embed: Shards) -> Candidates:
        from ntk_ray.core.coarse import coarse_order, votes

        cfg = ctx.cfg
        pool = pool_rows(validate)
        m = cfg.coarse_factor * cfg.budget
        if embed.skipped:
            ctx.progress.log(f"coarse: skipped ({pool.height} usable pool rows <= M = {m})")
            return no_coarse(pool, m)
        rejected = embed_rejects(embed.files())
        if rejected.height:  # never ranked: neither candidates nor cut
            pool = pool.join(rejected.select("key"), on="key", how="anti")
            ctx.progress.log(f"coarse: {rejected.height} pool rows rejected ({rejected['reason'][0]}, ...)")
        k = max(1, min(cfg.coarse_k or cfg.budget, pool.height))
        anchors = ctx.executor.put(warmup.anchor_embeddings)
        topk = merge_topk(ctx.executor, embed.files(), anchors, k, "embedding", n_anchors=len(warmup.anchor_embeddings))
        ordered = coarse_order(pool, votes(topk))
        ctx.progress.log(f"coarse: {pool.height} -> {m} candidates by kNN votes (K = {k} per domain sample)")
        return Candidates(candidates=ordered.head(m), cut=ordered.slice(m), skipped=False, M=m, K=k,
                          rejected=rejected.drop("key") if rejected.height else None)


class Bm25CoarseStage(Stage):
    """``--coarse-by bm25``: the pool ranked by BM25 against the domain rows (the bm25
    selector's scores, ``bm25_pool_scores``: token ids, term statistics over the usable pool),
    best first (BM25 desc, key asc); candidates = the top M = coarse_factor x budget. No model
    pass over the pool (the embedding coarse stage's forward pass is most of a large run's
    cost). ``coarse_sim`` carries the BM25 score, ``coarse_votes`` is null."""
    name = "coarse"
    needs = ("read", "validate")
    output = Candidates

    def run(self, ctx: Context, read: Tokens, validate: Accounting) -> Candidates:
        cfg = ctx.cfg
        pool = pool_rows(validate)
        m = cfg.coarse_factor * cfg.budget
        if pool.height <= m:
            ctx.progress.log(f"coarse: skipped ({pool.height} usable pool rows <= M = {m})")
            return no_coarse(pool, m)
        bm25 = bm25_pool_scores(ctx, read, validate).select("key", pl.col("score").alias("coarse_sim"))
        ordered = (pool.join(bm25, on="key", how="left")
                   .with_columns(pl.lit(None, dtype=pl.Int64).alias("coarse_votes"), pl.col("coarse_sim").fill_null(0.0))
                   .sort(["coarse_sim", "key"], descending=[True, False]))
        ctx.progress.log(f"coarse: {pool.height} -> {m} candidates by BM25 against the domain rows")
        return Candidates(candidates=ordered.head(m), cut=ordered.slice(m), skipped=False, M=m)


def embed_rejects(files: list[str]) -> pl.DataFrame:
    """key, id, source, row, reason of the rows of embed shards that carry a ``reject``."""
    import pyarrow.parquet as pq

    parts = []
    for path in files:
        names = pq.ParquetFile(path).schema_arrow.names
        if "reject" in names:
            t = pl.from_arrow(pq.read_table(path, columns=["key", "id", "source", "row", "reject"]))
            parts.append(t.filter(pl.col("reject").is_not_null()).rename({"reject": "reason"}))
    schema = {"key": pl.Int64, "id": pl.String, "source": pl.String, "row": pl.Int64, "reason": pl.String}
    return pl.concat([p.cast(schema) for p in parts]) if parts else pl.DataFrame(schema=schema)


class AllRowsStage(Stage):
    """The baselines' "coarse" stage: every usable pool row is a candidate."""
    name = "coarse"
    needs = ("validate",)
    output = Candidates
    resumable = False

    def run(self, ctx: Context, validate: Accounting) -> Candidates:
        return no_coarse(pool_rows(validate))


def kernel_scores(ctx: Context, files: list[str], anchors: np.ndarray, scorer: str, budget: int,
                  column: str = "feature", allocation: str = "score", center: str = "none") -> Scores:
    """Scores of every row of the shards against ``anchors``; for round-robin (``scorer``
    "round-robin" on features) also the picking order from the exact per-anchor top-``budget``
    lists; for a greedy ``allocation`` (``core.selectors.ALLOCATIONS``) the greedy's pick order
    on the kernel of ``scorer`` (cosine for ``cosine``, inner products for ``mean`` / ``max``).
    ``center`` "candidates": every kernel is that of the vectors minus the rows' mean vector
    (``--center``)."""
    from ntk_ray.core.scoring import round_robin_order

    anchors = np.asarray(anchors, dtype=np.float32)  # cosines: the kernel normalises both sides
    ref = ctx.executor.put(anchors)
    c = None
    if center == "candidates":
        c = ctx.executor.put(mean_vector(ctx.executor, files, column))
        ctx.progress.log("score: kernels of the features centred on the candidates' mean feature")
    row_scorer = "max-cosine" if scorer == "embedding-round-robin" else scorer
    scores = score_shards(ctx.executor, files, ref, row_scorer, column=column, center=c)
    if allocation != "score":
        if scorer not in ("cosine", "mean", "max"):
            raise ValueError(f"allocation {allocation!r} with scorer {scorer!r}: use cosine, mean or max")
        order = allocation_order(ctx.executor, files, ref, len(anchors), allocation, scorer == "cosine", budget, column,
                                 center=c)
        ctx.progress.log(f"score: {len(order)} rows picked by greedy {allocation}")
        return Scores(scores, order_frame(order))
    if scorer not in ("round-robin", "embedding-round-robin"):
        return Scores(scores)
    k = max(1, min(budget, scores.height))
    topk = merge_topk(ctx.executor, files, ref, k, column, n_anchors=len(anchors), unit=True, center=c)
    return Scores(scores, order_frame(round_robin_order(topk, budget)))


class NtkScoreStage(Stage):
    """Kernel scores of every candidate against the warm-up's anchor features (``--scorer``),
    ordered by a greedy ``--allocation`` when one is given, and fused with a second ranking of
    the candidates when ``--fusion`` asks: ``rrf`` the coarse stage's embedding ranking
    (``fuse_with_coarse``), ``rrf-bm25`` the BM25 ranking of the bm25 selector
    (``fuse_with_bm25``)."""
    name = "score"
    output = Scores
    needs = ("read", "validate", "warmup", "features", "coarse")

    def run(self, ctx: Context, read: Tokens, validate: Accounting, warmup: Warm, features: Shards,
            coarse: Candidates) -> Scores:
        cfg = ctx.cfg
        scores = kernel_scores(ctx, features.files(), warmup.anchor_features, cfg.scorer, cfg.budget,
                               allocation=getattr(cfg, "allocation", "score"), center=getattr(cfg, "center", "none"))
        fusion = getattr(cfg, "fusion", "none")
        if fusion == "none":
            return scores
        if fusion == "rrf-bm25":
            ctx.progress.log(f"score: NTK ranking fused with the BM25 ranking ({fusion}, k = {cfg.fusion_k})")
            # with --coarse-by bm25 the candidates carry their BM25 scores already (coarse_sim)
            reuse = getattr(cfg, "coarse_by", "embedding") == "bm25" and not coarse.skipped
            bm25 = coarse.candidates.select("key", pl.col("coarse_sim").alias("score")) if reuse else \
                bm25_pool_scores(ctx, read, validate)
            return Scores(scores.scores, fuse_with_bm25(scores, bm25, cfg.fusion_k))
        if coarse.skipped:
            raise ValueError("--fusion needs the coarse stage's embedding ranking, which was skipped")
        ctx.progress.log(f"score: NTK ranking fused with the embedding ranking ({fusion}, k = {cfg.fusion_k})")
        return Scores(scores.scores, fuse_with_coarse(scores, coarse.candidates, cfg.fusion_k))


def fuse_with_coarse(scores: Scores, candidates: pl.DataFrame, k: float) -> pl.DataFrame:
    """The ``order`` frame of reciprocal rank fusion (``core.selectors.reciprocal_rank_fusion``)
    of two rankings of the candidates without a reject: the NTK ranking (the explicit ``order``
    first, as ``io.outputs.rank_rows`` sorts it, then score desc, key asc) and the coarse
    stage's embedding ranking (votes desc, summed similarity desc, key asc). Fused order:
    rrf desc, then NTK rank, then key. Only the candidates move: rows cut by the coarse stage
    stay below every candidate, as without fusion."""
    return _fuse(scores, candidates.select("key", "coarse_votes", "coarse_sim"), k,
                 lambda rows: (rows["coarse_votes"].fill_null(0).to_numpy(), rows["coarse_sim"].fill_null(0.0).to_numpy()))


def fuse_with_bm25(scores: Scores, bm25: pl.DataFrame, k: float) -> pl.DataFrame:
    """As ``fuse_with_coarse``, with the BM25 ranking of the candidates (``bm25``: key, score of
    every usable pool row, ``bm25_pool_scores``: the bm25 selector's scores; BM25 desc, key asc)
    as the second ranking. Lexical overlap with the domain rows and gradient alignment with them
    are different evidence; where each alone picks well and they disagree on some picks, the
    fused order keeps the rows both rank high."""
    return _fuse(scores, bm25.select("key", pl.col("score").alias("bm25")), k,
                 lambda rows: (rows["bm25"].fill_null(0.0).to_numpy(),))


def _fuse(scores: Scores, other: pl.DataFrame, k: float, other_keys) -> pl.DataFrame:
    """The fused ``order`` frame of the NTK ranking and ``other``'s (``other_keys(rows)``: the
    sort keys of the second ranking, each descending; then key asc) over the candidates without
    a reject."""
    from ntk_ray.core.selectors import ranks_of, reciprocal_rank_fusion

    rows = other.join(scores.scores, on="key", how="inner")
    rows = rows.filter(pl.col("reject").is_null() & pl.col("score").is_not_null() & pl.col("score").is_finite())
    if scores.order is not None:
        rows = rows.join(scores.order, on="key", how="left")
    else:
        rows = rows.with_columns(pl.lit(None, dtype=pl.Int64).alias("order"))
    keys = rows["key"].to_numpy()
    n = len(keys)
    explicit = rows["order"].fill_null(n).to_numpy().astype(np.float64)  # no explicit place: after every pick
    ntk_rank = ranks_of(keys, explicit, rows["score"].to_numpy(), descending=(False, True))
    sort_keys = other_keys(rows)
    other_rank = ranks_of(keys, *sort_keys, descending=(True,) * len(sort_keys))
    fused = reciprocal_rank_fusion([ntk_rank, other_rank], k)
    order = np.lexsort((keys, ntk_rank, -fused))
    return order_frame(keys[order])


class RandomScoreStage(Stage):
    """s(x) = a uniform number drawn from (seed, key): the same for any sharding or worker count."""
    name = "score"
    output = Scores
    needs = ("validate",)

    def run(self, ctx: Context, validate: Accounting) -> Scores:
        from ntk_ray.core.selectors import random_scores

        keys = validate.usable_pool["key"].to_numpy()
        return Scores(scores_frame([{"key": keys, "score": random_scores(keys, ctx.cfg.seed), "reject": [None] * len(keys)}]))


def _shard_docs(path: str, keep) -> tuple[np.ndarray, list[list[int]]]:
    from ntk_ray.io.shards import keep_set, read_shard

    table = read_shard(path, ["key", "source", "row", "input_ids"], keep_set(keep))
    return table.column("key").to_numpy(), table.column("input_ids").to_pylist()


def bm25_stats_task(path: str, keep):
    from ntk_ray.core.lexical import bm25_stats

    return bm25_stats(_shard_docs(path, keep)[1])


def bm25_score_task(path: str, keep, queries, stats) -> dict:
    from ntk_ray.core.lexical import bm25_scores

    keys, docs = _shard_docs(path, keep)
    return {"key": keys, "score": bm25_scores(docs, queries, stats) if docs else np.zeros(0), "reject": [None] * len(keys)}


class Bm25ScoreStage(Stage):
    """BM25 of each pool row against the domain rows as queries, on the model's token ids
    (``core.lexical``): term statistics per token shard (tasks), merged, then scores per shard."""
    name = "score"
    output = Scores
    needs = ("read", "validate")

    def run(self, ctx: Context, read: Tokens, validate: Accounting) -> Scores:
        return Scores(bm25_pool_scores(ctx, read, validate))


def bm25_pool_scores(ctx: Context, read: Tokens, validate: Accounting) -> pl.DataFrame:
    """(key, score, reject) of every usable pool row: BM25 against the domain rows, term
    statistics over the usable pool (tasks per token shard, merged in shard order)."""
    from ntk_ray.core.lexical import merge_bm25_stats
    from ntk_ray.io.shards import list_shards
    from ntk_ray.stages.read import domain_tokens

    ex = ctx.executor
    domain_ids = domain_tokens(read, validate.usable_domain.select("key", "source", "row"))[1]
    shards = list_shards(read.pool)
    keep = ex.put(validate.usable_pool.select("key", "source", "row").to_arrow())
    stats = merge_bm25_stats(part for _, part in sorted(ex.map_tasks(bm25_stats_task, shards, keep), key=lambda t: t[0]))
    parts: list = [None] * len(shards)
    for i, part in ex.map_tasks(bm25_score_task, shards, keep, ex.put(domain_ids), ex.put(stats)):
        parts[i] = part
    return scores_frame(parts)


class EmbeddingScoreStage(Stage):
    """RDS+: anchors take turns picking their most similar unpicked row (round-robin over exact
    per-anchor top-``budget`` lists of the embeddings); the rest by their best cosine."""
    name = "score"
    output = Scores
    needs = ("warmup", "embed")

    def run(self, ctx: Context, warmup: Warm, embed: Shards) -> Scores:
        return kernel_scores(ctx, embed.files(), warmup.anchor_embeddings, "embedding-round-robin", ctx.cfg.budget,
                             column="embedding")


class LessScoreStage(Stage):
    """s(x) = max over anchors of the cosine of the LESS features."""
    name = "score"
    output = Scores
    needs = ("warmup", "features")

    def run(self, ctx: Context, warmup: Warm, features: Shards) -> Scores:
        return kernel_scores(ctx, features.files(), warmup.anchor_features, "max-cosine", ctx.cfg.budget)
