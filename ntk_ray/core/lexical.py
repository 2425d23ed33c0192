"""The lexical baseline (numpy/Polars, no model, no Ray): BM25 on token ids.

(TF-IDF and BM25 on lower-cased words are test references: ``ntk_ray.reference``.)

BM25 (Robertson et al.; Lucene's idf), on sequences of integer term ids (the model's token ids,
so the pipeline scores the token shards it already has, without the text), every domain row a
query q:

    s(x)   = 1/|Q| sum_{q in Q} BM25(q, x)
           = sum_t w(t) idf(t) tf(x, t) (k1 + 1) / (tf(x, t) + k1 (1 - b + b |x| / avgdl))
    w(t)   = 1/|Q| sum_{q in Q} count(t in q)     (mean query term count: BM25 is linear in q)
    idf(t) = log(1 + (N - df(t) + 0.5) / (df(t) + 0.5))
    avgdl  = total_len / N

with tf(x, t) the count of t in x, |x| its length, and N, df(t) (rows containing t), total_len
(summed lengths) over the pool. The pool statistics are sums over rows, so they are computed per
shard (``bm25_stats``), summed (``merge_bm25_stats``) and every shard scored against the total.
Defaults k1 = 1.5, b = 0.75.

What a user gets from "text that looks like my domain"; reported beside the NTK selection so
that the gradient method has to earn its cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import polars as pl


# ----------------------------------------------------------------------------------------------
# BM25 on integer term ids


@dataclass
class BM25Stats:
    """Pool statistics of BM25: ``df`` (columns ``term`` int64, ``df`` int64, sorted by term; only
    terms that occur), ``n_docs`` N and ``total_len`` (summed row lengths). Sums over rows, so
    the stats of disjoint shards merge by adding (``merge_bm25_stats``)."""

    df: pl.DataFrame
    n_docs: int
    total_len: int

    @property
    def avgdl(self) -> float:
        return self.total_len / self.n_docs if self.n_docs else 0.0


_DF_SCHEMA = {"term": pl.Int64, "df": pl.Int64}


def _flatten(docs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(row index per term occurrence, term ids) as int64 arrays; each row's lengths checked."""
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    terms = np.concatenate([np.asarray(d, dtype=np.int64).reshape(-1) for d in docs if len(d)])
    return np.repeat(np.arange(len(docs), dtype=np.int64), lengths), terms


def _term_counts(docs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(doc, term, tf): one entry per distinct (doc, term), sorted by doc then term (numpy sort:
    several times faster than a two-key group_by on millions of tokens)."""
    doc, term = _flatten(docs)
    if term.size == 0:
        return doc, term, np.zeros(0, np.int64)
    lo, hi = int(term.min()), int(term.max())
    span = hi - lo + 1
    if span * len(docs) < 2**62:  # one int64 key per token
        key = doc * span + (term - lo)
        key.sort()
        first = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        tf = np.diff(np.r_[first, key.size])
        return key[first] // span, key[first] % span + lo, tf
    order = np.lexsort((term, doc))
    doc, term = doc[order], term[order]
    first = np.flatnonzero(np.r_[True, (doc[1:] != doc[:-1]) | (term[1:] != term[:-1])])
    return doc[first], term[first], np.diff(np.r_[first, doc.size])


def bm25_stats(docs: Sequence[Sequence[int]]) -> BM25Stats:
    """Document frequency per term, N and total length of one shard of pool rows (term-id lists)."""
    _, term, _ = _term_counts(docs)
    terms, df = np.unique(term, return_counts=True)
    return BM25Stats(pl.DataFrame({"term": terms.astype(np.int64), "df": df.astype(np.int64)}, schema=_DF_SCHEMA),
                     len(docs), int(sum(len(d) for d in docs)))


def merge_bm25_stats(parts: Iterable[BM25Stats]) -> BM25Stats:
    """The stats of the union of disjoint shards: df, N and total_len summed."""
    parts = list(parts)
    if not parts:
        return BM25Stats(pl.DataFrame(schema=_DF_SCHEMA), 0, 0)
    df = (pl.concat([p.df.cast(_DF_SCHEMA) for p in parts])
          .group_by("term").agg(pl.col("df").sum()).sort("term"))
    return BM25Stats(df.cast(_DF_SCHEMA), sum(int(p.n_docs) for p in parts), sum(int(p.total_len) for p in parts))


def bm25_query_weights(queries: Sequence[Sequence[int]]) -> pl.DataFrame:
    """w(t) = 1/|Q| sum_q count(t in q): columns ``term`` (int64, sorted), ``w`` (float64)."""
    if len(queries) == 0:
        raise ValueError("BM25 needs at least one query (domain row)")
    _, terms = _flatten(queries)
    terms, counts = np.unique(terms, return_counts=True)
    return pl.DataFrame({"term": terms, "w": counts / len(queries)}, schema={"term": pl.Int64, "w": pl.Float64})


def _lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
    """values[keys == q] per q in ``query`` (0 where q is not a key); ``keys`` sorted, distinct.
    A dense table when the ids span a small range (token ids), binary search otherwise."""
    out = np.zeros(query.shape, dtype=np.float64)
    if keys.size == 0 or query.size == 0:
        return out
    lo, hi = min(int(keys[0]), int(query.min())), max(int(keys[-1]), int(query.max()))
    if hi - lo < max(1 << 22, 2 * query.size):
        table = np.zeros(hi - lo + 1)
        table[keys - lo] = values
        return table[query - lo]
    pos = np.minimum(np.searchsorted(keys, query), keys.size - 1)
    found = keys[pos] == query
    out[found] = values[pos[found]]
    return out


def bm25_scores(docs: Sequence[Sequence[int]], queries: Sequence[Sequence[int]], stats: BM25Stats,
                k1: float = 1.5, b: float = 0.75) -> np.ndarray:
    """s(x) per row of ``docs`` (float64, input order) = mean over the queries q of BM25(q, x):

        s(x) = sum_t w(t) idf(t) tf(x,t) (k1 + 1) / (tf(x,t) + k1 (1 - b + b |x| / avgdl)),
        w(t) = mean over queries of the count of t in q,
        idf(t) = log(1 + (N - df(t) + 0.5) / (df(t) + 0.5)),  avgdl = total_len / N,

    N, df, total_len from ``stats`` (the whole pool; a term absent from it has df = 0). A row
    sharing no term with the queries scores 0. Each row's sum runs over its terms in ascending id
    order, so the value of a row does not depend on the other rows of the call (any sharding gives
    bit-identical scores) and rows with the same terms tie exactly."""
    if k1 < 0 or not 0 <= b <= 1:
        raise ValueError(f"BM25 needs k1 >= 0 and 0 <= b <= 1 (got k1={k1}, b={b})")
    weights = bm25_query_weights(queries)
    if len(docs) == 0:
        return np.zeros(0)
    q_terms, q_w = weights["term"].to_numpy(), weights["w"].to_numpy()
    doc, term, tf = _term_counts(docs)
    w = _lookup(q_terms, q_w, term)
    hit = w > 0
    doc, term, tf, w = doc[hit], term[hit], tf[hit].astype(np.float64), w[hit]
    df = _lookup(stats.df["term"].to_numpy(), stats.df["df"].to_numpy().astype(np.float64), term)
    n = float(stats.n_docs)
    idf = np.log(1.0 + (n - df + 0.5) / (df + 0.5))
    avgdl = stats.avgdl if stats.avgdl > 0 else 1.0  # an all-empty pool: no row has a term anyway
    lengths = np.fromiter((len(d) for d in docs), dtype=np.float64, count=len(docs))
    contrib = w * idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * lengths[doc] / avgdl))
    # bincount adds in input order: (doc, term) sorted, so each row sums its terms in id order
    return np.bincount(doc, weights=contrib, minlength=len(docs)).astype(np.float64)
