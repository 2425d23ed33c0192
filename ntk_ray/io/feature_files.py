"""Feature files (``ntk-ray features``, ``select --keep-features``): the projector spec in each
shard's Parquet metadata, with the hash of the adapter the gradients came from, so features made
differently are never scored together."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq

from ntk_ray.io.accounting import UsageError
from ntk_ray.io.atomic import write_atomic
from ntk_ray.io.location import location
from ntk_ray.io.shards import list_shards, parquet_options

SPEC_KEY = b"ntk_ray.projector"  # the projector spec in a feature shard's Parquet metadata


def adapter_hash(adapter_dir: str | Path) -> str:
    """sha256 of the adapter's weight files: features from different adapters don't mix."""
    from ntk_ray.io.location import local_copy

    h = hashlib.sha256()
    for f in sorted(Path(local_copy(str(adapter_dir))).glob("adapter_model.*")):  # a URI work dir's: a local copy
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def stamp_adapter(shards: list[str], digest: str) -> None:
    """Add the adapter hash to each shard's projector spec (rewrites the shard only when it is
    missing)."""
    for path in shards:
        table = pq.read_table(path)
        meta = dict(table.schema.metadata or {})
        spec = json.loads(meta.get(SPEC_KEY, b"{}"))
        if spec.get("adapter_sha256") == digest:
            continue
        spec["adapter_sha256"] = digest
        meta[SPEC_KEY] = json.dumps(spec).encode()
        table = table.replace_schema_metadata(meta)
        write_atomic(location(path), lambda f: pq.write_table(table, f, **parquet_options(table.schema)))


def read_spec(path: str) -> dict:
    meta = pq.read_schema(path).metadata or {}
    if SPEC_KEY not in meta:
        raise UsageError(f"{path} has no ntk-ray projector spec in its metadata (not written by `ntk-ray features`?)")
    return json.loads(meta[SPEC_KEY])


def dir_spec(directory: str, flag: str) -> tuple[list[str], dict]:
    """Shards of a feature directory and their common projector spec (error when they differ)."""
    files = list_shards(directory)
    if not files:
        raise UsageError(f"{flag}: no feature shards (*.parquet) in {directory}")
    specs = {json.dumps(read_spec(f), sort_keys=True) for f in files}
    if len(specs) != 1:
        raise UsageError(f"{flag}: the shards in {directory} were made with different projectors or adapters")
    return files, json.loads(specs.pop())
