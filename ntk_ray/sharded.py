"""The Ray-sharded blockwise kernel: per-shard work as Ray tasks, merged on the driver.

Shards are Parquet files with a ``key`` column and a vector column (embeddings or NTK
features). Each task reads one shard and reduces it against the broadcast anchors:

* ``score_shards``: one kernel score per row (``scoring.AnchorKernel``), and
* ``merge_topk_tasks``: each anchor's top-k rows of the shard (``scoring.AnchorTopK``), merged
  on the driver as tasks finish; the merge is exact, so the result equals one full sort.

Only (anchors x k) states and per-row scores travel back; a shard's (rows x anchors) kernel
block lives only inside its task, and at most ``max_in_flight`` tasks run at once.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq


def read_vectors(path: str, column: str, extra: tuple[str, ...] = ("key",)):
    """(table of ``extra`` columns, (rows x d) float32 matrix) of one shard."""
    table = pq.read_table(path, columns=[*extra, column])
    x = np.asarray(table.column(column).combine_chunks().flatten(), dtype=np.float32).reshape(table.num_rows, -1)
    return table.drop_columns([column]), x


def _topk_of_file(path: str, anchors, k: int, column: str, unit: bool):
    from .scoring import AnchorTopK

    table, x = read_vectors(path, column)
    if unit:
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        x = x / np.where(norm > 0, norm, 1)
    keys = table.column("key").to_numpy()
    return AnchorTopK(anchors.shape[0], k).update(anchors @ x.T, keys)


def merge_topk_tasks(files, anchors_ref, k, column, n_anchors, unit=False, max_in_flight=8):
    """Per-anchor top-k over shards as Ray tasks, merged on the driver as they finish (bounded
    number in flight). Exact: the merge equals one full sort (``scoring.AnchorTopK``)."""
    import ray

    from .scoring import AnchorTopK

    task = ray.remote(_topk_of_file)
    merged = AnchorTopK(n_anchors, k)
    pending = []
    for path in files:
        pending.append(task.remote(path, anchors_ref, k, column, unit))
        if len(pending) >= max_in_flight:
            done, pending = ray.wait(pending, num_returns=1)
            merged.merge(ray.get(done[0]))
    for ref in pending:
        merged.merge(ray.get(ref))
    return merged


def _score_file(path: str, anchors, scorer: str):
    from .scoring import AnchorKernel

    table, x = read_vectors(path, "feature", ("key", "reject"))
    scores = AnchorKernel(anchors).score(x, scorer)
    return {"key": table.column("key").to_numpy(), "score": scores, "reject": table.column("reject").to_pylist()}


def score_shards(files: list[str], anchors_ref, scorer: str, max_in_flight: int = 8) -> list[dict]:
    """Kernel scores of every row of every shard (Ray tasks, bounded in flight), in file order."""
    import ray

    task = ray.remote(_score_file)
    refs, results = [], {}
    for i, path in enumerate(files):
        refs.append((i, task.remote(path, anchors_ref, scorer)))
        if len(refs) >= max_in_flight:
            ready, _ = ray.wait([r for _, r in refs], num_returns=1)
            done = [(j, r) for j, r in refs if r == ready[0]]
            refs = [(j, r) for j, r in refs if r != ready[0]]
            results[done[0][0]] = ray.get(done[0][1])
    for j, r in refs:
        results[j] = ray.get(r)
    return [results[i] for i in range(len(files))]


def unit_rows(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1)


