"""The last stages: the contract's result files, then (for a URI ``--out``) their upload.

  write     driver, Polars: ranked / selected / rejects / manifest, each atomically
  publish   copy the four files to the ``--out`` URI (only when ``--out`` is a URI)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import polars as pl

from ntk_ray.io.atomic import write_json_atomic, write_parquet_atomic
from ntk_ray.io.fs import redact
from ntk_ray.io.outputs import empty_rejects, nonfinite_scores_rejected, rank_rows, selected_rows
from ntk_ray.stages.base import Context, Stage
from ntk_ray.stages.model import Warm
from ntk_ray.stages.rank import Candidates, Scores
from ntk_ray.stages.read import Accounting


@dataclass
class Written:
    manifest: dict


def package_versions() -> dict:
    import importlib.metadata as md

    from ntk_ray.version import __version__

    versions = {}
    for pkg in ("ntk-ray", "ray", "torch", "transformers", "peft", "polars", "pyarrow", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = __version__ if pkg == "ntk-ray" else None
    return versions


def redacted_sources(df: pl.DataFrame) -> pl.DataFrame:
    """``df`` with credentials masked in its ``source`` column (inputs may be URIs with a
    secret): what a result file says about where a row came from, never how to get in. The
    stages keep the real address internally (``selected.parquet`` reads rows back from it)."""
    if "source" not in df.columns or df.height == 0:
        return df
    sources = df["source"].unique().drop_nulls().to_list()
    mapping = {s: redact(s) for s in sources if redact(s) != s}
    if not mapping:
        return df
    return df.with_columns(pl.col("source").replace(mapping))


def save_selection_hf(selected: pl.DataFrame, target: str, log) -> None:
    """``--save-hf DIR``: the rows of ``selected.parquet`` as a ``datasets`` ``save_to_disk``
    directory (``io.hf.save_to_disk``: atomic; refuses a directory it did not write)."""
    from ntk_ray.io.hf import save_to_disk

    path = save_to_disk(selected.to_arrow(), target, description="rows selected by ntk-ray select")
    log(f"write: the selection as a datasets save_to_disk directory: {path}")


class WriteStage(Stage):
    """ranked / selected / rejects / manifest from the accounting, the candidates and their
    scores; checks that every pool row is ranked or rejected exactly once."""
    name = "write"
    output = Written
    needs = ("validate", "coarse", "score")

    def __init__(self, selector: str, warm: bool):
        self.selector = selector
        if warm:
            self.needs = self.needs + ("warmup",)

    def run(self, ctx: Context, validate: Accounting, coarse: Candidates, score: Scores, warmup: Warm | None = None) -> Written:
        from ntk_ray.io.rows import read_original_rows
        from ntk_ray.models import model_identity

        cfg, out = ctx.cfg, ctx.out
        cand = nonfinite_scores_rejected(coarse.candidates.join(score.scores, on="key", how="left"))
        missing = cand.filter(pl.col("score").is_null() & pl.col("reject").is_null())
        if missing.height:
            raise RuntimeError(f"{missing.height} candidates came back from the feature stage without a score")
        bad = cand.filter(pl.col("reject").is_not_null())
        scored = cand.filter(pl.col("reject").is_null()).drop("reject")
        if score.order is not None:
            scored = scored.join(score.order, on="key", how="left")
        n_tokens = validate.usable_pool.select("key", "n_tokens")  # each row's tokens, as the model reads it
        scored, cut = (df.drop("n_tokens", strict=False).join(n_tokens, on="key", how="left")
                       for df in (scored, coarse.cut))
        budget_tokens = getattr(cfg, "budget_tokens", None)
        ranked = rank_rows(scored, cut, cfg.budget, stage=self.selector, budget_tokens=budget_tokens)
        bad = bad.select("id", "source", "row", pl.lit("pool").alias("role"), pl.col("reject").alias("reason"))
        if coarse.rejected is not None and coarse.rejected.height:  # e.g. non-finite embeddings
            bad = pl.concat([coarse.rejected.select("id", "source", "row", pl.lit("pool").alias("role"), "reason")
                             .cast(dict(bad.schema)), bad])
        rejects = pl.concat([validate.rejects, bad]) \
            if validate.rejects.height or bad.height else empty_rejects()
        counts = dict(validate.counts)
        counts["rejected"] = int(rejects.filter(pl.col("role") == "pool").height)
        counts["ranked"] = ranked.height
        counts["selected"] = int(ranked["selected"].sum())
        counts["selected_tokens"] = int(ranked.filter(pl.col("selected"))["n_tokens"].sum())
        if counts["pool_rows"] != counts["ranked"] + counts["rejected"]:
            raise RuntimeError(f"row accounting failed: {counts}")
        if budget_tokens is not None and counts["selected"] < min(cfg.budget, ranked.height):
            ctx.progress.log(f"write: the token budget stops the selection at {counts['selected']} rows "
                             f"({counts['selected_tokens']:,} of {budget_tokens:,} tokens; --budget {cfg.budget})"
                             + ("; the best row alone has more tokens than the budget" if not counts["selected"] else ""))
        elif counts["selected"] < cfg.budget:
            ctx.progress.log(f"warning: only {counts['selected']} usable pool rows for a budget of {cfg.budget}: all are selected")
        from ntk_ray.io.accounting import UsageError
        from ntk_ray.io.fingerprint import check_unchanged
        from ntk_ray.io.fs import InputError

        try:  # the selected rows are read back by row number: only from the files the run read
            check_unchanged(ctx.work, ctx.inputs.paths, redact(cfg.out))
            selected = selected_rows(ranked, read_original_rows, id_column=ctx.inputs.columns.id)
        except InputError as e:
            raise UsageError(str(e)) from None
        write_parquet_atomic(redacted_sources(ranked), out / "ranked.parquet")
        write_parquet_atomic(selected, out / "selected.parquet")
        if getattr(cfg, "save_hf", None):
            save_selection_hf(selected, cfg.save_hf, ctx.progress.log)
        write_parquet_atomic(redacted_sources(rejects.cast({"row": pl.Int64})), out / "rejects.parquet")
        manifest = {
            "counts": counts,
            "config": asdict(cfg),
            # dtype: the one the model ran in (--dtype resolved on the warm-up's worker); null when no model ran
            "model": model_identity(cfg.model) | {"resolved": ctx.inputs.model_path,
                                                  "dtype": warmup.dtype if warmup else None},
            "selector": self.selector,
            "adapter": {"path": str(ctx.work / "warmup/adapter"), "warmup": warmup.history,
                        "lora_parameters": warmup.lora_parameters} if warmup else None,
            "projector": warmup.projector if warmup else None,
            "coarse": {"skipped": coarse.skipped, "M": coarse.M} | ({"K": coarse.K} if coarse.K is not None else {})
            | ({"by": cfg.coarse_by} if self.selector == "ntk" and getattr(cfg, "coarse_by", "embedding") != "embedding"
               else {}),
            "actors": asdict(ctx.executor.plan),
            "stage_seconds": ctx.progress.seconds(),  # the write stage so far: all but this file
            "versions": package_versions(),
        }
        manifest = redact(manifest)  # no credential of an input or --out URI in the manifest
        write_json_atomic(manifest, out / "manifest.json")
        return Written(manifest)


class PublishStage(Stage):
    """Copy the result files to the ``--out`` URI (the stages ran in a local working directory):
    a stale ``manifest.json`` there is deleted first, the data files go up next and
    ``manifest.json`` last (``io.storage.publish``), so a reader never takes a half-published
    run for a complete one. Logged destinations are redacted."""
    name = "publish"
    output = Written
    needs = ("write",)

    def __init__(self, uri: str):
        self.uri = uri

    def run(self, ctx: Context, write: Written) -> Written:
        from ntk_ray.io.storage import RESULT_FILES, publish

        report = ("report.html",) if (ctx.out / "report.html").is_file() else ()  # self-contained: one file
        for path in publish(ctx.out, self.uri, names=report + RESULT_FILES):
            ctx.progress.log(f"publish: {path}")
        return write
