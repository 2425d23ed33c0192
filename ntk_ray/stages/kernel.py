"""The sharded blockwise kernel: per-shard work as small tasks, merged on the driver.

Shards are Parquet files with a ``key`` column and a vector column (embeddings or NTK
features). Each task reads its shards in row batches (``io.shards.iter_vectors``) and reduces
them against the broadcast anchors:

* ``score_shards``: one kernel score per row (``core.scoring.AnchorKernel``), and
* ``merge_topk``: each anchor's top-k rows (``core.scoring.AnchorTopK``); a task keeps one
  running state over a group of shards, and the driver merges the tasks' states as they
  finish. The merge is exact, so the result equals one full sort.

Memory does not grow with the pool. Inside a task: one row batch of vectors and its
(anchors x batch) kernel block plus the (anchors x k) state, whatever the shard size. In
flight: the executor's bound (twice the cluster's CPUs on Ray). On the driver: the merged
(anchors x k) state, or the per-row scores (16 bytes a row) that ``score_shards`` must return.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from ntk_ray.core.scoring import AnchorKernel, AnchorTopK
from ntk_ray.io.shards import iter_vectors


def topk_of_files(paths: list[str], anchors, k: int, column: str, unit: bool, batch_rows: int | None = None,
                  center=None) -> AnchorTopK:
    """One task: the running per-anchor top-k over a group of shards, batch by batch. Rows
    with a ``reject`` reason (zero features standing in for non-finite gradients) are skipped."""
    kernel = AnchorKernel(np.asarray(anchors, dtype=np.float32), center=center)
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


def merge_topk(executor, files: list[str], anchors, k: int, column: str, n_anchors: int, unit: bool = False,
               files_per_task: int | None = None, batch_rows: int | None = None, center=None) -> AnchorTopK:
    """Per-anchor top-k over shards as tasks (each over a group of ``files_per_task`` shards),
    merged as they finish. Exact: the merge equals one full sort. ``anchors`` may be a handle
    from ``executor.put``. Default grouping: about two waves of tasks (few, large
    (anchors x k) results to move and merge, enough tasks to balance and retry)."""
    files = list(files)
    if files_per_task is None:
        files_per_task = max(1, math.ceil(len(files) / (4 * max(1, executor.cpus))))
    groups = [files[i:i + files_per_task] for i in range(0, len(files), files_per_task)]
    merged = AnchorTopK(n_anchors, k)
    for _, state in executor.map_tasks(topk_of_files, groups, anchors, k, column, unit, batch_rows, center):
        merged.merge(state)
    return merged


def score_file(path: str, anchors, scorer: str, column: str = "feature", batch_rows: int | None = None,
               center=None) -> dict:
    """One task: the kernel score of every row of one shard, with its key and reject reason
    (``center``: the kernel of the centred vectors, ``AnchorKernel(center=...)``)."""
    kernel = AnchorKernel(anchors, center=center)
    has_reject = "reject" in pq.ParquetFile(path).schema_arrow.names
    keys, scores, rejects = [], [], []
    extra = ("key", "reject") if has_reject else ("key",)
    for batch, x in iter_vectors(path, column, extra, batch_rows, kernel.n_anchors, dtype=None):
        keys.append(batch.column("key").to_numpy())
        scores.append(kernel.score(x, scorer))
        rejects.extend(batch.column("reject").to_pylist() if has_reject else [None] * batch.num_rows)
    return {"key": np.concatenate(keys) if keys else np.zeros(0, np.int64),
            "score": np.concatenate(scores) if scores else np.zeros(0), "reject": rejects}


def scores_frame(parts: list[dict]) -> pl.DataFrame:
    """Per-shard score parts as one frame: key (Int64), score (Float64), reject (String)."""
    return pl.DataFrame({
        "key": np.concatenate([p["key"] for p in parts]) if parts else np.zeros(0, np.int64),
        "score": np.concatenate([np.asarray(p["score"], dtype=np.float64) for p in parts]) if parts else np.zeros(0),
        "reject": [r for p in parts for r in p["reject"]],
    }, schema={"key": pl.Int64, "score": pl.Float64, "reject": pl.String})


def score_shards(executor, files: list[str], anchors, scorer: str, column: str = "feature",
                 batch_rows: int | None = None, center=None) -> pl.DataFrame:
    """Kernel scores of every row of every shard (one task per shard), in file order, as one
    frame (``scores_frame``). ``column`` names the vectors (``feature``, or ``embedding``);
    shards without a ``reject`` column have no rejects."""
    parts: list = [None] * len(files)
    for i, part in executor.map_tasks(score_file, files, anchors, scorer, column, batch_rows, center):
        # copied, so a finished task's object can be freed at once
        parts[i] = {"key": np.array(part["key"]), "score": np.array(part["score"]), "reject": part["reject"]}
    return scores_frame(parts)


def usable_vectors(path: str, column: str = "feature") -> tuple[np.ndarray, np.ndarray]:
    """(keys, (rows x d) float32 vectors) of one shard's rows without a ``reject`` reason."""
    extra = ("key", "reject") if "reject" in pq.ParquetFile(path).schema_arrow.names else ("key",)
    keys, rows = [], []
    for batch, x in iter_vectors(path, column, extra):
        k = batch.column("key").to_numpy()
        if "reject" in extra:
            keep = batch.column("reject").is_null().to_numpy(zero_copy_only=False)
            x, k = x[keep], k[keep]
        keys.append(k)
        rows.append(x)
    if not keys:
        return np.zeros(0, np.int64), np.zeros((0, vector_width_of(path, column)), np.float32)
    return np.concatenate(keys), np.concatenate(rows)


def vector_width_of(path: str, column: str) -> int:
    from ntk_ray.io.shards import vector_width

    return vector_width(pq.ParquetFile(path), column)


def kernel_block_of_file(path: str, anchors, unit: bool, column: str = "feature",
                         center=None) -> tuple[np.ndarray, np.ndarray]:
    """One task: (keys, (anchors x rows) kernel block) of a shard's usable rows
    (``AnchorKernel.kernel_block``: float64 on the float32 grid; ``unit``: cosines)."""
    kernel = AnchorKernel(np.asarray(anchors, dtype=np.float32), center=center)
    keys, x = usable_vectors(path, column)
    return keys, kernel.kernel_block(x, unit=unit) if len(keys) else np.zeros((kernel.n_anchors, 0))


def allocation_order(executor, files: list[str], anchors, n_anchors: int, allocation: str, unit: bool, budget: int,
                     column: str = "feature", center=None) -> list[int]:
    """The greedy pick order of ``allocation`` (``core.selectors.ALLOCATIONS``) over the usable
    rows of the shards, as keys. ``facility-location``: the (anchors x rows) kernel block comes
    from one task per shard and the greedy runs on the driver (anchors x rows float64 in
    memory). ``kernel-mean-matching``: one task on a model worker (a GPU where there is one)
    loads every row's features (rows x d float32) and runs the greedy there. Rows are put in key
    order first, so the result does not depend on how the rows are sharded."""
    from ntk_ray.core.selectors import facility_location_order

    if allocation == "facility-location":
        parts = [None] * len(files)
        for i, part in executor.map_tasks(kernel_block_of_file, files, anchors, unit, column, center):
            parts[i] = (np.array(part[0]), np.array(part[1]))
        keys = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
        block = np.concatenate([p[1] for p in parts], axis=1) if parts else np.zeros((n_anchors, 0))
        order = np.argsort(keys, kind="stable")
        return facility_location_order(block[:, order], keys[order], budget)
    if allocation == "kernel-mean-matching":
        return executor.run_task(kernel_mean_matching_task, list(files), anchors, unit, budget, column,
                                 executor.plan.device, center)
    raise ValueError(f"unknown allocation {allocation!r}")


def kernel_mean_matching_task(files: list[str], anchors, unit: bool, budget: int, column: str, device: str,
                              center=None) -> list[int]:
    """On a model worker: every usable row's vector (unit-normalised for the cosine kernel) onto
    ``device``, then ``core.selectors.kernel_mean_matching_order`` towards the anchors' mean
    (the mean of the unit anchors for cosine: ``AnchorKernel.unit_mean``)."""
    import torch

    from ntk_ray.core.selectors import kernel_mean_matching_order

    kernel = AnchorKernel(np.asarray(anchors, dtype=np.float32), center=center)
    parts = [usable_vectors(f, column) for f in files]
    keys = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    x = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, kernel.features.shape[1]), np.float32)
    del parts
    order = np.argsort(keys, kind="stable")
    keys, x = keys[order], x[order]
    xt = torch.from_numpy(np.ascontiguousarray(x)).to(device)
    del x
    c = None if center is None else torch.from_numpy(np.asarray(center, dtype=np.float64)).to(device)
    if unit or c is not None:  # in place, a block at a time: x - c (the centred kernel, as AnchorKernel(center=...)),
        for start in range(0, xt.shape[0], 4096):  # then scaled to unit norm (float64 norms; zero rows stay zero)
            blk = xt[start:start + 4096].to(torch.float64)
            blk = blk - c if c is not None else blk
            norm = torch.linalg.vector_norm(blk, dim=1) if unit else torch.ones(len(blk), dtype=torch.float64,
                                                                                   device=blk.device)
            xt[start:start + 4096] = (blk / torch.where(norm > 0, norm, 1.0)[:, None]).to(torch.float32)
    return kernel_mean_matching_order(xt, kernel.unit_mean if unit else kernel.mean, keys, budget)


def vector_sum_of_file(path: str, column: str = "feature") -> tuple[np.ndarray, int]:
    """One task: (float64 sum, count) of a shard's usable rows' vectors."""
    _, x = usable_vectors(path, column)
    return x.astype(np.float64).sum(axis=0), len(x)


def mean_vector(executor, files: list[str], column: str = "feature") -> np.ndarray:
    """The mean vector of every usable row of the shards (float64; summed per shard as tasks,
    the shards' sums added in file order, so the result does not depend on task timing)."""
    parts: list = [None] * len(files)
    for i, part in executor.map_tasks(vector_sum_of_file, files, column):
        parts[i] = (np.array(part[0]), int(part[1]))
    total = sum(p[1] for p in parts)
    if not total:
        raise ValueError("no usable rows to centre on")
    acc = np.zeros_like(parts[0][0])
    for p in parts:
        acc += p[0]
    return acc / total
