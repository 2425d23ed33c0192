"""The output files of the contract, written with Polars, each atomically (temp name, rename).

ranked.parquet  every usable pool row once: id, rank (1..n), stage ("ntk" rows above "coarse"
                rows), score (null for coarse rows), coarse_votes, coarse_sim, selected
                (rank <= the rows selected: the budget, or fewer under --budget-tokens), plus
                source and row (where the row came from) and n_tokens (the row's tokens as
                the model reads it; null where no text was read: `score` jobs)
selected.parquet the selected rows with all their original input columns, plus rank and score
rejects.parquet every row read but not ranked: id, source, row, role, reason
manifest.json   counts, resolved config, model/adapter/projector identity, stage times, versions
"""

from __future__ import annotations


import polars as pl


RANKED_SCHEMA = {
    "id": pl.String, "rank": pl.Int64, "stage": pl.String, "score": pl.Float64,
    "coarse_votes": pl.Int64, "coarse_sim": pl.Float64, "selected": pl.Boolean,
    "source": pl.String, "row": pl.Int64, "n_tokens": pl.Int64,
}
REJECTS_SCHEMA = {"id": pl.String, "source": pl.String, "row": pl.Int64, "role": pl.String, "reason": pl.String}


def nonfinite_scores_rejected(cand: pl.DataFrame) -> pl.DataFrame:
    """``cand`` (with ``score`` and ``reject``) where a row with a NaN/inf score and no reject
    yet gets the reject ``non-finite score (NaN/inf)``: one bad number never enters a ranking."""
    bad = pl.col("reject").is_null() & pl.col("score").is_not_null() & ~pl.col("score").is_finite()
    return cand.with_columns(pl.when(bad).then(pl.lit("non-finite score (NaN/inf)"))
                             .otherwise(pl.col("reject")).alias("reject"))


def selected_count(n_tokens: pl.Series, budget: int, budget_tokens: int | None = None) -> int:
    """How many rows of a ranking (``n_tokens``: each row's tokens, in rank order) are selected:
    ``min(N, rows)``; with a token budget T the longest rank prefix of at most N rows whose
    tokens total at most T,

        n = max { k <= min(N, rows) : n_tokens[1] + ... + n_tokens[k] <= T },

    0 when the best row alone has more than T tokens (the selection stays a prefix of the
    ranking: rank <= n)."""
    n = min(budget, len(n_tokens))
    if budget_tokens is None:
        return n
    head = n_tokens.head(n)
    if head.null_count():
        raise ValueError("a token budget needs each row's token count (n_tokens), and some are missing")
    return int((head.cum_sum() <= budget_tokens).sum())  # token counts are >= 0: the sums only grow


def rank_rows(ntk: pl.DataFrame, coarse: pl.DataFrame, budget: int, stage: str = "ntk",
              budget_tokens: int | None = None) -> pl.DataFrame:
    """The ranked table. ``ntk``: id, key, source, row, score, coarse_votes, coarse_sim, an
    optional ``n_tokens`` (null where absent), and an optional ``order`` (an explicit best-first
    position, e.g. from round-robin, that overrides the score order). ``coarse``: the rows cut
    by the coarse stage, already best first. ``stage`` labels the scored rows: ``ntk``, or the
    baseline selector's name. ``selected``: rank <= :func:`selected_count` (the budget, or
    fewer under a token budget).
    Ties in score are broken by the stable key so every run ranks identically. A NaN score
    (which Polars would sort above every number) sorts last, like a null; callers should have
    rejected such rows already (:func:`nonfinite_scores_rejected`)."""
    by_score = pl.when(pl.col("score").is_nan()).then(None).otherwise(pl.col("score"))
    if "order" in ntk.columns:
        ntk = ntk.sort([pl.col("order"), by_score, pl.col("key")], descending=[False, True, False], nulls_last=True)
    else:
        ntk = ntk.sort([by_score, pl.col("key")], descending=[True, False], nulls_last=True)
    ntk = ntk.with_columns(pl.lit(stage).alias("stage"))
    coarse = coarse.with_columns(pl.lit("coarse").alias("stage"), pl.lit(None, dtype=pl.Float64).alias("score"))
    ntk, coarse = (df if "n_tokens" in df.columns else df.with_columns(pl.lit(None, dtype=pl.Int64).alias("n_tokens"))
                   for df in (ntk, coarse))
    cols = ["id", "stage", "score", "coarse_votes", "coarse_sim", "source", "row", "n_tokens"]
    ranked = pl.concat([ntk.select(cols).cast({k: RANKED_SCHEMA[k] for k in cols}),
                        coarse.select(cols).cast({k: RANKED_SCHEMA[k] for k in cols})])
    ranked = ranked.with_row_index("rank", offset=1).with_columns(pl.col("rank").cast(pl.Int64))
    n = selected_count(ranked["n_tokens"], budget, budget_tokens)
    ranked = ranked.with_columns((pl.col("rank") <= n).alias("selected"))
    return ranked.select(list(RANKED_SCHEMA))


def selected_rows(ranked: pl.DataFrame, read_original_rows, id_column: str | None = None) -> pl.DataFrame:
    """Original input columns of the selected rows (read back from their files), plus rank and
    score, sorted by rank. Files with different columns are combined by column name.

    With ``id_column``: a row read back whose id (``io.rows.id_text`` of that column) is not the
    id the run ranked raises InputError naming the file and row: the file changed under the run
    (rows without the column have generated ids ``<file>:<row>``; the file's size and mtime
    check, ``io.fingerprint``, covers those)."""
    from ntk_ray.io.fs import InputError, redact
    from ntk_ray.io.rows import id_text

    chosen = ranked.filter(pl.col("selected"))
    tables = []
    for (source,), group in chosen.group_by(["source"], maintain_order=True):
        original = read_original_rows(source, group["row"].to_list())
        if id_column is not None and id_column in original.column_names:
            for want, value, row in zip(group["id"].to_list(), original.column(id_column).to_pylist(),
                                        group["row"].to_list()):
                if value is None:  # a JSONL line without the id key: a generated id
                    continue
                got, _ = id_text(value)
                if got != want:
                    raise InputError(f"{redact(source)} row {row}: the id there is now {got!r}, the run ranked "
                                     f"{want!r}: the file changed during the run; rerun with --overwrite")
        tables.append(pl.from_arrow(original).with_columns(
            pl.Series("rank", group["rank"].to_list(), dtype=pl.Int64),
            pl.Series("score", group["score"].to_list(), dtype=pl.Float64)))
    if not tables:
        return pl.DataFrame(schema={"rank": pl.Int64, "score": pl.Float64})
    return pl.concat(tables, how="diagonal_relaxed").sort("rank")


def empty_rejects() -> pl.DataFrame:
    return pl.DataFrame(schema=REJECTS_SCHEMA)
