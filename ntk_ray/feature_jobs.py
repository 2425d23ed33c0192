"""The two halves of the NTK stage as separate jobs: ``ntk-ray features`` and ``ntk-ray score``.

``features`` turns any data into feature shards (the contract's format: ``id``, ``feature``
(fixed-size list of float32, length d), ``norm``, plus ``key``, ``source``, ``row``, ``reject``,
and the projector spec, adapter hash included, in each file's Parquet metadata). ``score``
ranks one feature directory against another, so a pool featurised once can be scored against
any number of domains computed with the same adapter and projector.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from ntk_ray.io.accounting import UsageError, mark_duplicates
from ntk_ray.io.atomic import write_json_atomic, write_parquet_atomic
from ntk_ray.io.outputs import empty_rejects, rank_rows, read_parquet_dir, selected_rows
from ntk_ray.pipeline import (Progress, _mark_done, _stage_done, actor_plan, feature_files, init_ray, model_map,
                       open_out_dir, prepare_out_dir, read_files, score_features)
from ntk_ray.workers import parquet_options

SPEC_KEY = b"ntk_ray.projector"


def adapter_hash(adapter_dir: str | Path) -> str:
    """sha256 of the adapter's weight files: features from different adapters don't mix."""
    h = hashlib.sha256()
    for f in sorted(Path(adapter_dir).glob("adapter_model.*")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def run_features(data: list[str], out: str, *, model: str | None, adapter: str | None, projector: str, proj_dim: int,
                 seed: int, max_length: int, on_too_long: str, columns, batch_tokens: int, actors: int | None,
                 ray_address: str | None, lora: dict, overwrite: bool = False, progress: Progress | None = None) -> dict:
    """Features of every usable row of ``data`` into ``out`` (shards), rejects into
    ``out/_rejects.parquet``, a summary into ``out/_manifest.json``."""
    from ntk_ray.io.paths import resolve_paths
    from ntk_ray.io.rows import InputError, check_columns
    from ntk_ray.models import ModelError, attach_lora, load_model, resolve_model
    from ntk_ray.workers import Featurizer, ReadSpec

    progress = progress or Progress()
    try:
        files = resolve_paths(data, "--data")
        mode = check_columns(files, columns, "--data")
        model_path = resolve_model(model)
    except (InputError, ModelError) as e:
        raise UsageError(str(e)) from None
    identity = {"data": files, "model": model, "adapter": adapter, "projector": projector, "proj_dim": proj_dim,
                "seed": seed, "max_length": max_length, "on_too_long": on_too_long, "lora": lora, "columns": str(columns)}
    out_dir = prepare_out_dir(out, identity, overwrite)
    work = out_dir / "_work"
    resources = init_ray(ray_address, progress)
    plan = actor_plan(resources, actors)
    with progress.stage("read"):
        if not _stage_done(work, "tokens"):
            read_files(files, ReadSpec("data", mode, columns, model, max_length, on_too_long), work / "tokens", resources)
            _mark_done(work, "tokens")
    meta = read_parquet_dir(work / "tokens", ["id", "key", "source", "row", "reject"])
    meta = mark_duplicates(meta, files)
    usable = meta.filter(pl.col("reject").is_null())
    if usable.is_empty():
        raise UsageError(f"--data: no usable rows in {', '.join(files[:3])}")
    with progress.stage("adapter"):
        if adapter is None:  # a fresh seeded adapter, made once so every actor uses the same one
            adapter = str(work / "adapter")
            if not (Path(adapter) / "adapter_config.json").exists():
                attach_lora(load_model(model_path), seed=seed, **lora).save_pretrained(adapter)
    with progress.stage("features"):
        if not _stage_done(work, "features"):
            model_map(work / "tokens", out_dir, usable, Featurizer,
                      (model, adapter, projector, proj_dim, seed, batch_tokens, plan["device"]), plan)
            _mark_done(work, "features")
    shards = feature_files(out_dir)
    stamp_adapter(shards, adapter_hash(adapter))
    feats = read_parquet_dir_files(shards, ["id", "source", "row", "reject"])
    rejects = pl.concat([
        meta.filter(pl.col("reject").is_not_null()).select("id", "source", "row", pl.lit("data").alias("role"), pl.col("reject").alias("reason")),
        feats.filter(pl.col("reject").is_not_null()).select("id", "source", "row", pl.lit("data").alias("role"), pl.col("reject").alias("reason")),
    ]) if feats.height else empty_rejects()
    write_parquet_atomic(rejects.cast({"row": pl.Int64}), out_dir / "_rejects.parquet")
    manifest = {"counts": {"rows": meta.height, "featurised": int(feats.filter(pl.col("reject").is_null()).height),
                           "rejected": rejects.height},
                "projector": read_spec(shards[0]) if shards else None, "adapter": adapter,
                "config": identity, "actors": plan, "stage_seconds": progress.seconds()}
    write_json_atomic(manifest, out_dir / "_manifest.json")
    return manifest


def read_parquet_dir_files(files: list[str], columns: list[str]) -> pl.DataFrame:
    if not files:
        return pl.DataFrame(schema={c: pl.String for c in columns})
    return pl.concat([pl.from_arrow(pq.read_table(f, columns=columns)) for f in files], how="vertical_relaxed")


def stamp_adapter(shards: list[str], digest: str) -> None:
    """Add the adapter hash to each shard's projector spec (rewrites only the footer's metadata
    when it is missing)."""
    for path in shards:
        table = pq.read_table(path)
        meta = dict(table.schema.metadata or {})
        spec = json.loads(meta.get(SPEC_KEY, b"{}"))
        if spec.get("adapter_sha256") == digest:
            continue
        spec["adapter_sha256"] = digest
        meta[SPEC_KEY] = json.dumps(spec).encode()
        tmp = Path(path).with_name(f".{Path(path).name}.tmp")
        pq.write_table(table.replace_schema_metadata(meta), tmp, **parquet_options(table.schema))
        tmp.replace(path)


def read_spec(path: str) -> dict:
    meta = pq.read_schema(path).metadata or {}
    if SPEC_KEY not in meta:
        raise UsageError(f"{path} has no ntk-ray projector spec in its metadata (not written by `ntk-ray features`?)")
    return json.loads(meta[SPEC_KEY])


def dir_spec(directory: str, flag: str) -> tuple[list[str], dict]:
    """Shards of a feature directory and their common projector spec (error when they differ)."""
    files = feature_files(Path(directory))
    if not files:
        raise UsageError(f"{flag}: no feature shards (*.parquet) in {directory}")
    specs = {json.dumps(read_spec(f), sort_keys=True) for f in files}
    if len(specs) != 1:
        raise UsageError(f"{flag}: the shards in {directory} were made with different projectors or adapters")
    return files, json.loads(specs.pop())


def run_score(features: str, anchors: str, budget: int, out: str, scorer: str, ray_address: str | None,
              overwrite: bool = False, progress: Progress | None = None, work_dir: str | None = None) -> dict:
    """Rank the rows of a feature directory against the anchors of another one. ``out`` may be
    an object-store URI: the files are written in ``work_dir`` (default under
    ~/.cache/ntk-ray/runs/) and copied there at the end, as ``select`` does."""
    from ntk_ray.io.rows import read_original_rows
    from ntk_ray.io.storage import publish

    progress = progress or Progress()
    if budget < 1:
        raise UsageError(f"--budget must be at least 1 (got {budget})")
    pool_files, pool_spec = dir_spec(features, "--features")
    anchor_files, anchor_spec = dir_spec(anchors, "--anchors")
    if pool_spec != anchor_spec:
        diff = sorted(k for k in set(pool_spec) | set(anchor_spec) if pool_spec.get(k) != anchor_spec.get(k))
        raise UsageError(f"--features and --anchors were computed differently ({', '.join(diff)} differ); "
                         "use the same --adapter, --projector, --proj-dim and --seed for both")
    identity = {"features": features, "anchors": anchors, "budget": budget, "scorer": scorer}
    out_dir, remote = open_out_dir(out, work_dir, identity, overwrite, progress)
    init_ray(ray_address, progress)
    t0 = time.time()
    anchor_table = read_parquet_dir_files(anchor_files, ["id", "reject"])
    a = np.concatenate([_matrix(f) for f in anchor_files])
    a = a[anchor_table["reject"].is_null().to_numpy()]
    if len(a) == 0:
        raise UsageError(f"--anchors: no usable anchor features in {anchors}")
    with progress.stage("score"):
        scored = score_features(pool_files, a, scorer, budget)
    rows = read_parquet_dir_files(pool_files, ["id", "key", "source", "row"])
    cand = rows.join(scored["scores"], on="key", how="left")
    ntk = cand.filter(pl.col("reject").is_null()).drop("reject").with_columns(
        pl.lit(None, dtype=pl.Int64).alias("coarse_votes"), pl.lit(None, dtype=pl.Float64).alias("coarse_sim"))
    if "order" in scored:
        ntk = ntk.join(scored["order"], on="key", how="left")
    ranked = rank_rows(ntk, ntk.head(0).drop("order", strict=False), budget)
    rejects = cand.filter(pl.col("reject").is_not_null()).select(
        "id", "source", "row", pl.lit("pool").alias("role"), pl.col("reject").alias("reason"))
    write_parquet_atomic(ranked, out_dir / "ranked.parquet")
    try:
        selected = selected_rows(ranked, read_original_rows)
    except (OSError, ValueError, IndexError) as e:
        progress.log(f"selected.parquet has ids only: the source files could not be read back ({e})")
        selected = ranked.filter(pl.col("selected")).select("id", "rank", "score")
    write_parquet_atomic(selected, out_dir / "selected.parquet")
    write_parquet_atomic(rejects.cast({"row": pl.Int64}) if rejects.height else empty_rejects(), out_dir / "rejects.parquet")
    manifest = {"counts": {"pool_rows": rows.height, "rejected": rejects.height, "ranked": ranked.height,
                           "selected": int(ranked["selected"].sum()), "anchors": int(len(a))},
                "config": identity,
                "projector": pool_spec, "stage_seconds": {"score": round(time.time() - t0, 3)}}
    write_json_atomic(manifest, out_dir / "manifest.json")
    if remote:
        for path in publish(out_dir, out):
            progress.log(f"publish: {path}")
    _mark_done(out_dir / "_work", "write")
    return manifest


def _matrix(path: str) -> np.ndarray:
    from ntk_ray.sharded import read_vectors

    return read_vectors(path, "feature")[1]
