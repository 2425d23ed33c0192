"""Lexical baseline: TF-IDF cosine to the domain centroid (Polars, no model, no Ray).

    w(x, t)  = (1 + log tf(x, t)) * idf(t),   idf(t) = log((N + 1) / (df(t) + 1)) + 1
    v(x)     = w(x, .) / ||w(x, .)||          (df, N over the pool)
    s(x)     = <v(x), mean_{a in D_t} v(a)>

What a user gets from "text that looks like my domain"; reported beside the NTK selection so
that the gradient method has to earn its cost.
"""

from __future__ import annotations

import numpy as np
import polars as pl

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
