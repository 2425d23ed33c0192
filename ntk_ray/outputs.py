"""The output files of the contract, written with Polars, each atomically (temp name, rename).

ranked.parquet  every usable pool row once: id, rank (1..n), stage ("ntk" rows above "coarse"
                rows), score (null for coarse rows), coarse_votes, coarse_sim, selected
                (rank <= budget), plus source and row (where the row came from)
selected.parquet the selected rows with all their original input columns, plus rank and score
rejects.parquet every row read but not ranked: id, source, row, role, reason
manifest.json   counts, resolved config, model/adapter/projector identity, stage times, versions
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

RANKED_SCHEMA = {
    "id": pl.String, "rank": pl.Int64, "stage": pl.String, "score": pl.Float64,
    "coarse_votes": pl.Int64, "coarse_sim": pl.Float64, "selected": pl.Boolean,
    "source": pl.String, "row": pl.Int64,
}
REJECTS_SCHEMA = {"id": pl.String, "source": pl.String, "row": pl.Int64, "role": pl.String, "reason": pl.String}


def atomic_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_parquet_atomic(df: pl.DataFrame, path: Path) -> None:
    tmp = atomic_path(path)
    df.write_parquet(tmp, compression="zstd", statistics=True)
    os.replace(tmp, path)


def write_json_atomic(obj: dict, path: Path) -> None:
    tmp = atomic_path(path)
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def rank_rows(ntk: pl.DataFrame, coarse: pl.DataFrame, budget: int) -> pl.DataFrame:
    """The ranked table. ``ntk``: id, key, source, row, score, coarse_votes, coarse_sim, and an
    optional ``order`` (an explicit best-first position, e.g. from round-robin, that overrides
    the score order). ``coarse``: the rows cut by the coarse stage, already best first.
    Ties in score are broken by the stable key so every run ranks identically."""
    if "order" in ntk.columns:
        ntk = ntk.sort(["order", "score", "key"], descending=[False, True, False], nulls_last=True)
    else:
        ntk = ntk.sort(["score", "key"], descending=[True, False])
    ntk = ntk.with_columns(pl.lit("ntk").alias("stage"))
    coarse = coarse.with_columns(pl.lit("coarse").alias("stage"), pl.lit(None, dtype=pl.Float64).alias("score"))
    cols = ["id", "stage", "score", "coarse_votes", "coarse_sim", "source", "row"]
    ranked = pl.concat([ntk.select(cols).cast({k: RANKED_SCHEMA[k] for k in cols}),
                        coarse.select(cols).cast({k: RANKED_SCHEMA[k] for k in cols})])
    ranked = ranked.with_row_index("rank", offset=1).with_columns(pl.col("rank").cast(pl.Int64))
    ranked = ranked.with_columns((pl.col("rank") <= budget).alias("selected"))
    return ranked.select(list(RANKED_SCHEMA))


def selected_rows(ranked: pl.DataFrame, read_original_rows) -> pl.DataFrame:
    """Original input columns of the selected rows (read back from their files), plus rank and
    score, sorted by rank. Files with different columns are combined by column name."""
    chosen = ranked.filter(pl.col("selected"))
    tables = []
    for (source,), group in chosen.group_by(["source"], maintain_order=True):
        original = read_original_rows(source, group["row"].to_list())
        tables.append(pl.from_arrow(original).with_columns(
            pl.Series("rank", group["rank"].to_list(), dtype=pl.Int64),
            pl.Series("score", group["score"].to_list(), dtype=pl.Float64)))
    if not tables:
        return pl.DataFrame(schema={"rank": pl.Int64, "score": pl.Float64})
    return pl.concat(tables, how="diagonal_relaxed").sort("rank")


def empty_rejects() -> pl.DataFrame:
    return pl.DataFrame(schema=REJECTS_SCHEMA)


def read_parquet_dir(path: Path, columns: list[str] | None = None) -> pl.DataFrame:
    """All Parquet files under a directory written by Ray Data, as one frame."""
    files = sorted(str(p) for p in Path(path).rglob("*.parquet"))
    if not files:
        return pl.DataFrame()
    return pl.from_arrow(pa.concat_tables([pq.read_table(f, columns=columns) for f in files], promote_options="permissive"))
