"""Read and validate: input files -> token shards -> the usable rows of each side and the rejects.

  read      files -> ReadAndTokenize (CPU workers) -> tokens/{domain,pool}/ Parquet shards
            (``stages.workers.TOKENS_SCHEMA``: every row read, usable or with a reject reason)
  validate  driver, Polars (``io.accounting.account_rows``): duplicate ids, pool ids also in the
            domain set, counts; nothing here holds token ids. Cheap: rerun, never saved.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from ntk_ray.io.accounting import UsageError, account_rows
from ntk_ray.io.atomic import write_parquet_atomic
from ntk_ray.io.shards import read_shards
from ntk_ray.stages.base import Context, Stage
from ntk_ray.stages.workers import ReadAndTokenize, ReadSpec

ROLES = ("domain", "pool")


@dataclass
class Tokens:
    """Where the token shards of each role are."""
    domain: str
    pool: str

    def of(self, role: str) -> str:
        return getattr(self, role)


@dataclass
class Accounting:
    """The rows of both sides after validation (no token ids: id, key, source, row, n_tokens,
    truncated), every reject with its reason, and the counts of the manifest."""
    usable_domain: pl.DataFrame
    usable_pool: pl.DataFrame
    rejects: pl.DataFrame
    counts: dict


def read_files(executor, files: list[str], spec: ReadSpec, target) -> None:
    """Files -> ReadAndTokenize workers, which write token shards into ``target`` (files with
    a unit marker there are skipped)."""
    target.mkdir(parents=True, exist_ok=True)
    executor.map_shards(ReadAndTokenize, (spec, str(target)), [{"index": i, "path": p} for i, p in enumerate(files)],
                        model=False)


class ReadStage(Stage):
    name = "read"
    output = Tokens

    def run(self, ctx: Context) -> Tokens:
        from ntk_ray.io.paths import fallback_id_prefixes

        cfg, inputs = ctx.cfg, ctx.inputs
        prefixes = fallback_id_prefixes(inputs.paths["domain"] + inputs.paths["pool"])  # over both roles: see its docstring
        dirs = {}
        for role in ROLES:
            spec = ReadSpec(role=role, mode=inputs.modes[role], columns=inputs.columns, model=cfg.model,
                            max_length=cfg.max_length, on_too_long=cfg.on_too_long,
                            id_prefixes={p: prefixes[p] for p in inputs.paths[role]})
            target = ctx.work / "tokens" / role
            read_files(ctx.executor, inputs.paths[role], spec, target)
            dirs[role] = str(target)
        return Tokens(**dirs)


class ValidateStage(Stage):
    name = "validate"
    output = Accounting
    needs = ("read",)
    resumable = False

    def run(self, ctx: Context, read: Tokens) -> Accounting:
        cols = ["role", "id", "key", "source", "row", "n_tokens", "truncated", "reject"]
        frames = {role: read_shards(read.of(role), cols) for role in ROLES}
        try:
            tables = account_rows(frames, ctx.inputs.paths, ctx.cfg.budget)
        except UsageError as e:
            if e.rejects is not None:  # let the user see why: OUT/rejects.parquet
                write_parquet_atomic(e.rejects.cast({"row": pl.Int64}), ctx.out / "rejects.parquet")
                raise UsageError(f"{e} (all rejects: {ctx.out / 'rejects.parquet'})") from None
            raise
        c = tables["counts"]
        ctx.progress.log(f"read {c['pool_rows']} pool rows ({c['rejected']} rejected), "
                         f"{c['domain_rows']} domain rows ({c['domain_rejected']} rejected)")
        return Accounting(usable_domain=tables["usable"]["domain"], usable_pool=tables["usable"]["pool"],
                          rejects=tables["rejects"], counts=tables["counts"])


def domain_tokens(read: Tokens, keys: pl.DataFrame) -> tuple[list, list, list, list]:
    """(ids, input_ids, loss_masks, score_masks) of the domain rows in ``keys`` (key, source,
    row), ordered by key; for the small domain side only."""
    df = read_shards(read.domain, ["id", "key", "source", "row", "input_ids", "loss_mask", "score_mask"])
    df = df.join(keys, on=["key", "source", "row"], how="semi").sort("key")
    return (df["id"].to_list(), df["input_ids"].to_list(), df["loss_mask"].to_list(), df["score_mask"].to_list())
