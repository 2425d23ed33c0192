"""Row bookkeeping after reading: rejects, duplicates, overlap, counts (Polars, no Ray).

Nothing is lost: every row read is either usable (and will be ranked) or a reject with a
reason; the write stage (``stages.write``) checks ``pool_rows == ranked + rejected`` at the end.
"""

from __future__ import annotations

import polars as pl

MIN_DOMAIN_ROWS = 4  # fewer usable domain rows than this is an error: the kernel mean is noise


class UsageError(ValueError):
    """Bad input or flags: the CLI prints it as one line and exits with status 2.

    ``rejects`` (optional): the rejects found so far (``outputs.REJECTS_SCHEMA`` columns), so the caller can
    write them to ``rejects.parquet`` for the user to see why rows were unusable.
    """

    def __init__(self, message: str, rejects: pl.DataFrame | None = None) -> None:
        super().__init__(" ".join(str(message).split()))
        self.rejects = rejects


TOKEN_META_SCHEMA = {"role": pl.String, "id": pl.String, "key": pl.Int64, "source": pl.String, "row": pl.Int64,
                     "n_tokens": pl.Int64, "truncated": pl.Boolean, "reject": pl.String}


def mark_duplicates(df: pl.DataFrame, files: list[str]) -> pl.DataFrame:
    """Rows in file order (``files``), then row order, with a ``file_order`` column; a later
    usable row whose id was seen before gets the reject "duplicate id (first at file:row)"."""
    order = {p: i for i, p in enumerate(files)}
    df = df.with_columns(pl.col("source").replace_strict(order, default=len(order)).alias("file_order"))
    df = df.sort(["file_order", "row"])
    first = (df.filter(pl.col("reject").is_null()).group_by("id", maintain_order=True)
             .agg(pl.col("source").first().alias("first_source"), pl.col("row").first().alias("first_row")))
    return df.join(first, on="id", how="left", maintain_order="left").with_columns(
        pl.when(pl.col("reject").is_null() & ((pl.col("source") != pl.col("first_source")) | (pl.col("row") != pl.col("first_row"))))
        .then(pl.format("duplicate id (first at {}:{})", pl.col("first_source"), pl.col("first_row")))
        .otherwise(pl.col("reject")).alias("reject")).drop("first_source", "first_row")


def account_rows(frames: dict[str, pl.DataFrame], paths: dict[str, list[str]], budget: int) -> dict:
    """Pure bookkeeping over the tokenized rows' metadata (``TOKEN_META_SCHEMA`` per role):
    marks duplicates (a later usable row with an id seen before, in file order then row order)
    and pool ids that are also domain ids as rejects, checks the counts, and returns
    {"usable": {role: frame}, "rejects": frame, "counts": dict}."""
    frames = dict(frames)
    for role in ("domain", "pool"):
        df = frames[role]
        if df.is_empty():
            df = pl.DataFrame(schema=TOKEN_META_SCHEMA)
        df = mark_duplicates(df, paths[role])
        frames[role] = df
    domain_ids = frames["domain"].filter(pl.col("reject").is_null())["id"]
    frames["pool"] = frames["pool"].with_columns(
        pl.when(pl.col("reject").is_null() & pl.col("id").is_in(domain_ids.implode()))
        .then(pl.lit("id also in the domain set")).otherwise(pl.col("reject")).alias("reject"))
    usable = {r: f.filter(pl.col("reject").is_null()).drop("reject", "file_order") for r, f in frames.items()}
    if usable["pool"]["key"].n_unique() != usable["pool"].height:
        raise RuntimeError("two different pool ids hash to the same 64-bit key; rename one of them")
    rejects = pl.concat([f.filter(pl.col("reject").is_not_null()) for f in frames.values()])
    rejects = rejects.select("id", "source", "row", "role", pl.col("reject").alias("reason"))
    counts = {
        "pool_rows": frames["pool"].height, "domain_rows": frames["domain"].height,
        "rejected": frames["pool"]["reject"].is_not_null().sum(),
        "domain_rejected": frames["domain"]["reject"].is_not_null().sum(),
        "pool_usable": usable["pool"].height, "domain_usable": usable["domain"].height,
        "pool_truncated": int(usable["pool"]["truncated"].sum()),
        "domain_truncated": int(usable["domain"]["truncated"].sum()),
        "pool_tokens": int(usable["pool"]["n_tokens"].sum()),
    }
    if counts["pool_rows"] == 0:
        raise UsageError(f"--pool: no rows in {_files(paths['pool'])}")
    if counts["domain_usable"] < MIN_DOMAIN_ROWS:
        raise UsageError(f"--domain: {counts['domain_usable']} usable rows (of {counts['domain_rows']} read in "
                         f"{_files(paths['domain'])}); at least {MIN_DOMAIN_ROWS} are needed; "
                         f"{reason_summary(rejects, 'domain')}", rejects=rejects)
    if counts["pool_usable"] == 0:
        raise UsageError(f"--pool: none of the {counts['pool_rows']} rows in {_files(paths['pool'])} is usable; "
                         f"{reason_summary(rejects, 'pool')}", rejects=rejects)
    if budget > counts["pool_rows"]:
        raise UsageError(f"--budget {budget} is larger than the pool ({counts['pool_rows']} rows)")
    return {"usable": usable, "rejects": rejects, "counts": counts}


def _files(paths: list[str], shown: int = 3) -> str:
    return ", ".join(paths[:shown]) + (f" and {len(paths) - shown} more" if len(paths) > shown else "")


def reason_summary(rejects: pl.DataFrame, role: str, shown: int = 3) -> str:
    """One line: how many rows of ``role`` were rejected, the commonest reasons, one example."""
    mine = rejects.filter(pl.col("role") == role)
    if mine.is_empty():
        return "no rows rejected"
    # "duplicate id (first at f:3)" and "12 tokens > --max-length 8" vary per row: group by kind
    kind = pl.col("reason").str.replace(r" \(first at .*\)$", "").str.replace(r"^\d+ tokens >", "N tokens >")
    top = (mine.with_columns(kind.alias("kind")).group_by("kind").len()
           .sort(["len", "kind"], descending=[True, False]))
    parts = [f"{n} x '{k}'" for k, n in top.head(shown).iter_rows()]
    more = f", {top.height - shown} other reasons" if top.height > shown else ""
    first = mine.row(0, named=True)  # account_rows keeps file order, then row order
    return (f"rejected {mine.height}: {', '.join(parts)}{more} "
            f"(e.g. {first['source']} row {first['row']}: {first['reason']})")


