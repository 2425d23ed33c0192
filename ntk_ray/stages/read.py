"""Read and validate: input files -> token shards -> the usable rows of each side and the rejects.

  read      files -> units (``plan_units``: a file, or a span of one) -> ReadAndTokenize (CPU
            workers) -> tokens/{domain,pool}/ Parquet shards (``stages.workers.TOKENS_SCHEMA``:
            every row read, usable or with a reject reason)
  validate  driver, Polars (``io.accounting.account_rows``): duplicate ids, pool ids also in the
            domain set, counts; nothing here holds token ids. Cheap: rerun, never saved.

Units: one big file is read by many workers. An uncompressed JSONL file larger than
``--read-unit-mb`` is cut into byte ranges of that size, a Parquet file into row ranges of
about that many uncompressed bytes (whole row groups where they are smaller); compressed JSONL
(``.gz``, ``.bz2``, ``.zst``: a stream cannot be entered in the middle), JSON arrays and
CSV/TSV (a quoted field may hold newlines) are one unit per file. The numbering of a JSONL
range that starts mid-file comes from a cheap pre-pass: a CPU task per range counts its lines
and non-blank lines (bytes only, no parsing), and the driver adds them up. Units are cut at
multiples of ``CHUNK_ROWS`` records from the start of the file, so the token shards (one per
``CHUNK_ROWS`` records) are the same files with the same rows whatever the unit size or the
number of readers: what the later stages see, and so the ranking, does not depend on them.
Each unit leaves its own marker (``_done/<file>-<first chunk>-<end chunk>.json``, or
``<file>.json`` for a file read whole), so a resumed read redoes only unfinished units.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import polars as pl

from ntk_ray.io.accounting import UsageError, account_rows
from ntk_ray.io.atomic import write_parquet_atomic
from ntk_ray.io.formats import READ_UNIT_MB, reader_for, scan_range
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


#: records per token shard; units are cut at multiples of it (see the module docstring)
CHUNK_ROWS = 2048


def plan_units(executor, files: list[str], unit_bytes: int, align: int | None = None) -> list[dict]:
    """The read units of ``files``: ``ReadAndTokenize`` items ``{"index", "path", "unit",
    "span"}``, in file order, then span order. A file is split by its format (``spans``) after
    the pre-pass over its ``scan_ranges`` (tasks on the executor, in parallel). ``align``:
    records per token shard (default ``CHUNK_ROWS``)."""
    align = align or CHUNK_ROWS
    ranges = [(i, path, a, b) for i, path in enumerate(files) for a, b in reader_for(path).scan_ranges(path, unit_bytes)]
    scans: list = [None] * len(ranges)
    for k, result in executor.map_tasks(scan_range, [(path, a, b) for _, path, a, b in ranges]):
        scans[k] = result
    by_file: dict[int, list[dict]] = {}
    for (i, *_), result in zip(ranges, scans):
        by_file.setdefault(i, []).append(result)
    items = []
    for i, path in enumerate(files):
        spans = reader_for(path).spans(path, by_file.get(i, []), unit_bytes, align)
        if not spans:
            items.append({"index": i, "path": path, "unit": f"{i:06d}", "span": ""})
            continue
        for span in spans:
            first, end = span.ordinal // align, -(-(span.ordinal + span.count) // align)
            items.append({"index": i, "path": path, "unit": f"{i:06d}-{first:06d}-{end:06d}",
                          "span": json.dumps(asdict(span))})
    return items


def read_files(executor, files: list[str], spec: ReadSpec, target, progress=None,
               unit_mb: float | None = None) -> list[dict]:
    """Files -> units (``plan_units``, about ``unit_mb`` MiB each; default: ``--read-unit-mb``'s)
    -> ReadAndTokenize workers, which write token shards into ``target`` (units with a marker
    there are skipped); returns the units. ``progress``: rows read / rows in the files (``_row_count``)
    as each unit is done."""
    if unit_mb is None:
        unit_mb = READ_UNIT_MB
    target.mkdir(parents=True, exist_ok=True)
    items = plan_units(executor, files, max(1, int(unit_mb * (1 << 20))))
    args = (spec, str(target), CHUNK_ROWS)
    if progress is None:
        executor.map_shards(ReadAndTokenize, args, items, model=False)
        return items
    with progress.track(_row_count(items), name=f"read {spec.role}") as rows_done:
        executor.map_shards(ReadAndTokenize, args, items, model=False, on_result=rows_done.add_rows)
    return items


def _row_count(items: list[dict]) -> int | None:
    """Rows in the units of ``plan_units`` for the progress total: a span knows its count (from
    the pre-pass or the footer), files read whole are counted (Parquet footers, a byte scan of
    JSON Lines); None when a file cannot be counted (the workers then say what is wrong with it)."""
    from ntk_ray.io.fs import InputError
    from ntk_ray.io.rows import count_rows

    whole = list(dict.fromkeys(item["path"] for item in items if not item["span"]))
    try:
        counted = count_rows(whole) if whole else 0
    except (InputError, OSError, ValueError):
        return None
    return counted + sum(json.loads(item["span"])["count"] for item in items if item["span"])


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
                            id_prefixes={p: prefixes[p] for p in inputs.paths[role]},
                            system_prompt=cfg.system_prompt)
            target = ctx.work / "tokens" / role
            read_files(ctx.executor, inputs.paths[role], spec, target, ctx.progress, unit_mb=cfg.read_unit_mb)
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
