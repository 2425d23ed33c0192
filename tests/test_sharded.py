"""The sharded kernel (``stages.kernel``) on both executors, a real (embedded) Ray and the
in-process one: the sharded results equal the single-matrix ones.

* merge_topk over several shard files (several groups of files, several row batches per
  file, tasks finishing in any order) equals one full sort of the concatenated block, ties
  included;
* score_shards equals AnchorKernel.score on the concatenated matrix, for every scorer.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ntk_ray.core.scoring import SCORERS, AnchorKernel

pytestmark = pytest.mark.ray

N_ANCHORS, DIM = 7, 12
SHARD_ROWS = (40, 1, 75, 33, 0, 51)  # an empty shard and a one-row shard too


def _vectors(x: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(x.ravel(), pa.float32()), x.shape[1])


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Shard files of vectors with 4 entries +-1 scaled by 1/2, 1 or 2, so that rows, their unit
    rows and every kernel value are exact in float32 whatever the BLAS blocking; few distinct
    values, so many exact ties."""
    rng = np.random.default_rng(1)
    root = tmp_path_factory.mktemp("shards")
    total = sum(SHARD_ROWS)
    x = _sparse_signs(rng, total, 4) * rng.choice([0.5, 1.0, 2.0], size=(total, 1)).astype(np.float32)
    keys = rng.permutation(10 * total)[:total].astype(np.int64) - 5 * total  # negative keys too
    reject = [None] * total
    files, start = [], 0
    for i, n in enumerate(SHARD_ROWS):
        table = pa.table({"key": keys[start:start + n], "feature": _vectors(x[start:start + n]),
                          "embedding": _vectors(x[start:start + n]), "reject": pa.array(reject[start:start + n], pa.string())})
        path = root / f"part-{i:02d}.parquet"
        pq.write_table(table, path, row_group_size=16)
        files.append(str(path))
        start += n
    anchors = np.concatenate([_sparse_signs(rng, N_ANCHORS - 3, 4), _sparse_signs(rng, 3, 1)])
    anchors[0] = 0  # an all-zero anchor: every row ties
    return files, x, keys, anchors


@pytest.fixture(params=["ray", "local"])
def executor(request):
    if request.param == "local":
        from ntk_ray.runtime.local import LocalExecutor

        return LocalExecutor(device="cpu")
    from ntk_ray.runtime.ray_executor import RayExecutor

    request.getfixturevalue("ray_session")
    return RayExecutor(log=lambda m: None)


def _sparse_signs(rng, rows: int, nonzero: int) -> np.ndarray:
    out = np.zeros((rows, DIM), np.float32)
    for r in range(rows):
        out[r, rng.choice(DIM, nonzero, replace=False)] = rng.choice([-1.0, 1.0], nonzero)
    return out


def full_sort_topk(block: np.ndarray, keys: np.ndarray, k: int):
    order = np.lexsort((np.broadcast_to(keys, block.shape), -block), axis=1)[:, :k]
    return np.take_along_axis(block, order, 1), np.broadcast_to(keys, block.shape)[np.arange(block.shape[0])[:, None], order]


@pytest.mark.parametrize("k,unit,files_per_task,batch_rows", [(1, False, 1, None), (9, False, 2, 7),
                                                              (60, True, None, 16), (500, False, 3, None)])
def test_merge_topk_equals_one_full_sort(executor, shards, k, unit, files_per_task, batch_rows):
    from ntk_ray.core.scoring import _unit_rows as unit_rows
    from ntk_ray.stages.kernel import merge_topk

    files, x, keys, anchors = shards
    a = unit_rows(anchors) if unit else anchors
    xs = unit_rows(x) if unit else x
    block = (a @ xs.T).astype(np.float64)
    assert (np.count_nonzero(block == block.max(axis=1, keepdims=True), axis=1) > 1).any()  # ties exist
    expected_s, expected_k = full_sort_topk(block, keys, k)
    got = merge_topk(executor, files, executor.put(a), k, "embedding", n_anchors=N_ANCHORS, unit=unit,
                     files_per_task=files_per_task, batch_rows=batch_rows)
    got_s, got_k = got.sorted()
    assert got_s.shape == (N_ANCHORS, min(k, len(keys)))
    np.testing.assert_array_equal(got_k, expected_k)
    np.testing.assert_array_equal(got_s, expected_s)


def test_merge_topk_skips_rejected_rows(executor, tmp_path):
    from ntk_ray.stages.kernel import merge_topk

    x = np.eye(4, dtype=np.float32)
    path = tmp_path / "f.parquet"
    pq.write_table(pa.table({"key": np.arange(4, dtype=np.int64), "feature": _vectors(x),
                             "reject": pa.array([None, "non-finite gradient (NaN/inf)", None, None], pa.string())}), path)
    got = merge_topk(executor, [str(path)], executor.put(np.ones((2, 4), np.float32)), 10, "feature", n_anchors=2)
    assert sorted(got.keys[0].tolist()) == [0, 2, 3]


@pytest.mark.parametrize("scorer", SCORERS)
def test_score_shards_equals_kernel_on_concatenated_matrix(executor, shards, scorer):
    from ntk_ray.stages.kernel import score_shards

    files, x, keys, anchors = shards
    anchors = anchors[1:]  # cosine of a zero anchor is defined but says nothing; keep it in top-k only
    expected = AnchorKernel(anchors).score(x, scorer)
    frame = score_shards(executor, files, executor.put(anchors), scorer, batch_rows=10)
    np.testing.assert_array_equal(frame["key"].to_numpy(), keys)  # file order kept
    np.testing.assert_allclose(frame["score"].to_numpy(), expected, rtol=1e-6, atol=1e-7)
    assert frame["reject"].null_count() == frame.height
