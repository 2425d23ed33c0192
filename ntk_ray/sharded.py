"""The Ray-sharded blockwise kernel: per-shard work as Ray tasks, merged on the driver.

Shards are Parquet files with a ``key`` column and a vector column (embeddings or NTK
features). Each task reads its shards in row batches and reduces them against the broadcast
anchors:

* ``score_shards``: one kernel score per row (``scoring.AnchorKernel``), and
* ``merge_topk_tasks``: each anchor's top-k rows (``scoring.AnchorTopK``); a task keeps one
  running state over a group of shards, and the driver merges the tasks' states as they
  finish. The merge is exact, so the result equals one full sort.

Memory does not grow with the pool. Inside a task: one row batch of vectors and its
(anchors x batch) kernel block (``batch_rows``, sized from ``block_bytes``) plus the
(anchors x k) state, whatever the shard size. In flight: at most ``max_in_flight`` tasks
(default twice the cluster's CPUs), so at most that many (anchors x k) states wait in the
object store. On the driver: the merged (anchors x k) state, or the per-row scores (16 bytes
a row) that ``score_shards`` must return anyway.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq

# scratch budget of one row batch: the vectors (rows x d) and the float64 kernel block (anchors x rows)
BLOCK_BYTES = 64 << 20


def read_vectors(path: str, column: str, extra: tuple[str, ...] = ("key",)):
    """(table of ``extra`` columns, (rows x d) float32 matrix) of one whole shard."""
    table = pq.read_table(path, columns=[*extra, column])
    return table.drop_columns([column]), _matrix(table.column(column), table.num_rows)


def _matrix(col, rows: int, dtype=np.float32) -> np.ndarray:
    """(rows x d) matrix of a list column; ``dtype=None`` keeps float16/float32 as stored
    (``AnchorKernel.score`` converts in cache-sized blocks, much faster than a whole copy)."""
    if hasattr(col, "combine_chunks"):
        col = col.combine_chunks()
    flat = np.asarray(col.flatten())
    if dtype is not None or flat.dtype not in (np.float16, np.float32):
        flat = flat.astype(dtype or np.float32, copy=False)
    return flat.reshape(rows, -1)


def iter_vectors(path: str, column: str, extra: tuple[str, ...], batch_rows: int | None = None,
                 n_anchors: int = 1, block_bytes: int = BLOCK_BYTES, dtype=np.float32):
    """Yield (record batch of ``extra`` columns, (rows x d) ``dtype`` matrix; None: as stored)
    over one shard in row batches: ``batch_rows`` rows, or as many as keep the vectors (float32
    at most) plus an (anchors x rows) float64 kernel block within ``block_bytes``."""
    f = pq.ParquetFile(path)
    if batch_rows is None:
        d = _vector_width(f, column)
        batch_rows = max(64, block_bytes // (4 * d + 8 * max(1, n_anchors)))
    for batch in f.iter_batches(batch_size=batch_rows, columns=[*extra, column]):
        x = _matrix(batch.column(column), batch.num_rows, dtype)
        yield batch.select(list(extra)), x


def _vector_width(f: pq.ParquetFile, column: str) -> int:
    size = getattr(f.schema_arrow.field(column).type, "list_size", None)
    if size:
        return int(size)
    try:  # variable-size lists or an extension type: ask the first row
        first = next(f.iter_batches(batch_size=1, columns=[column]), None)
        return max(1, _matrix(first.column(column), 1).shape[1]) if first is not None and first.num_rows else 1
    except Exception:
        return 1024


def _default_in_flight() -> int:
    import ray

    return max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))


# -------------------------------------------------------------------------------------------
# per-anchor top-k
def _topk_of_files(paths: list[str], anchors, k: int, column: str, unit: bool, batch_rows: int | None):
    """One task: the running per-anchor top-k over a group of shards, batch by batch. Rows
    with a ``reject`` reason (zero features standing in for non-finite gradients) are skipped."""
    from ntk_ray.core.scoring import AnchorKernel, AnchorTopK

    kernel = AnchorKernel(np.asarray(anchors, dtype=np.float32))
    state = AnchorTopK(kernel.n_anchors, k)
    for path in paths:
        extra = ("key", "reject") if "reject" in pq.ParquetFile(path).schema_arrow.names else ("key",)
        for batch, x in iter_vectors(path, column, extra, batch_rows, kernel.n_anchors, dtype=None):
            keys = batch.column("key").to_numpy()
            if "reject" in extra and batch.column("reject").null_count != batch.num_rows:
                keep = batch.column("reject").is_null().to_numpy(zero_copy_only=False)
                x, keys = x[keep], keys[keep]
            if not len(keys):
                continue
            state.update(kernel.kernel_block(x, unit=unit), keys)
    return state


def merge_topk_tasks(files, anchors_ref, k, column, n_anchors, unit=False, max_in_flight=None,
                     files_per_task=None, batch_rows=None):
    """Per-anchor top-k over shards as Ray tasks (each over a group of ``files_per_task``
    shards), merged on the driver as they finish, at most ``max_in_flight`` at once.
    Exact: the merge equals one full sort (``scoring.AnchorTopK``).

    Defaults: ``max_in_flight`` twice the cluster's CPUs; ``files_per_task`` so there are about
    two waves of tasks (few, large (anchors x k) results to move and merge, enough tasks to
    balance and retry)."""
    import ray

    from ntk_ray.core.scoring import AnchorTopK

    files = list(files)
    max_in_flight = max_in_flight or _default_in_flight()
    if files_per_task is None:
        files_per_task = max(1, math.ceil(len(files) / (2 * max_in_flight)))
    groups = [files[i:i + files_per_task] for i in range(0, len(files), files_per_task)]
    task = ray.remote(_topk_of_files)
    merged = AnchorTopK(n_anchors, k)
    pending = []
    for group in groups:
        pending.append(task.remote(group, anchors_ref, k, column, unit, batch_rows))
        if len(pending) >= max_in_flight:
            done, pending = ray.wait(pending, num_returns=1)
            merged.merge(ray.get(done[0]))
            del done
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        merged.merge(ray.get(done[0]))
        del done
    return merged


# -------------------------------------------------------------------------------------------
# per-row kernel scores
def _score_file(path: str, anchors, scorer: str, batch_rows: int | None = None, column: str = "feature"):
    from ntk_ray.core.scoring import AnchorKernel

    kernel = AnchorKernel(anchors)
    has_reject = "reject" in pq.ParquetFile(path).schema_arrow.names
    keys, scores, rejects = [], [], []
    extra = ("key", "reject") if has_reject else ("key",)
    for batch, x in iter_vectors(path, column, extra, batch_rows, kernel.n_anchors, dtype=None):
        keys.append(batch.column("key").to_numpy())
        scores.append(kernel.score(x, scorer))
        rejects.extend(batch.column("reject").to_pylist() if has_reject else [None] * batch.num_rows)
    return {"key": np.concatenate(keys) if keys else np.zeros(0, np.int64),
            "score": np.concatenate(scores) if scores else np.zeros(0), "reject": rejects}


def scores_frame(parts: list[dict]):
    """``score_shards``'s parts as one Polars frame: key (Int64), score (Float64), reject."""
    import polars as pl

    return pl.DataFrame({
        "key": np.concatenate([p["key"] for p in parts]) if parts else np.zeros(0, np.int64),
        "score": np.concatenate([np.asarray(p["score"], dtype=np.float64) for p in parts]) if parts else np.zeros(0),
        "reject": [r for p in parts for r in p["reject"]],
    }, schema={"key": pl.Int64, "score": pl.Float64, "reject": pl.String})


def score_shards(files: list[str], anchors_ref, scorer: str, max_in_flight: int | None = None,
                 batch_rows: int | None = None, column: str = "feature") -> list[dict]:
    """Kernel scores of every row of every shard (one Ray task per shard, at most
    ``max_in_flight`` at once, default twice the cluster's CPUs), in file order. ``column``
    names the vectors (``feature``, or ``embedding`` for the embedding selector); shards
    without a ``reject`` column have no rejects."""
    import ray

    max_in_flight = max_in_flight or _default_in_flight()
    task = ray.remote(_score_file)
    results: list[dict | None] = [None] * len(files)
    pending: dict = {}

    def collect(ref) -> None:
        part = ray.get(ref)
        # copy out of the object store, so the finished task's object can be freed at once
        results[pending.pop(ref)] = {"key": np.array(part["key"]), "score": np.array(part["score"]),
                                     "reject": part["reject"]}

    for i, path in enumerate(files):
        pending[task.remote(path, anchors_ref, scorer, batch_rows, column)] = i
        if len(pending) >= max_in_flight:
            done, _ = ray.wait(list(pending), num_returns=1)
            collect(done[0])
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        collect(done[0])
    return results
