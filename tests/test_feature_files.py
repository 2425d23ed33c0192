"""Feature shards on disk (no Ray): how the workers write them and how a score task reads them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ntk_ray.core.scoring import AnchorKernel
from ntk_ray.io.shards import iter_vectors, parquet_options, write_table_atomic
from ntk_ray.stages.kernel import score_file


def _shard(tmp_path, x: np.ndarray):
    table = pa.table({"key": np.arange(len(x), dtype=np.int64), "reject": pa.nulls(len(x), pa.string()),
                      "feature": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])})
    path = tmp_path / "000000.parquet"
    write_table_atomic(table, path)
    return path


def test_float_vectors_are_written_without_dictionary_or_statistics(tmp_path):
    """float16 vectors have <= 65,536 distinct values: Parquet would dictionary-encode them by
    default (the slow path, ~4x slower to read and write); the other columns keep both."""
    x = np.random.default_rng(0).normal(size=(300, 64)).astype(np.float16)
    meta = pq.ParquetFile(_shard(tmp_path, x)).metadata.row_group(0)
    columns = {meta.column(i).path_in_schema: meta.column(i) for i in range(meta.num_columns)}
    feature = next(c for name, c in columns.items() if name.startswith("feature"))
    assert not any("DICTIONARY" in e for e in feature.encodings)
    assert feature.statistics is None
    assert columns["key"].statistics is not None and columns["key"].statistics.has_min_max
    assert "feature" not in parquet_options(pa.schema([("feature", pa.list_(pa.float16())), ("id", pa.string())]))["use_dictionary"]
    assert parquet_options(pa.schema([("token_ids", pa.list_(pa.int32()))]))["use_dictionary"] == ["token_ids"]


def test_a_score_task_reads_float16_as_stored_and_scores_like_the_matrix(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 96)).astype(np.float16)
    anchors = rng.normal(size=(5, 96)).astype(np.float32)
    path = _shard(tmp_path, x)
    batches = list(iter_vectors(str(path), "feature", ("key",), batch_rows=128, dtype=None))
    assert len(batches) == 4 and all(m.dtype == np.float16 for _, m in batches)
    assert np.array_equal(np.concatenate([m for _, m in batches]), x)
    for scorer in ("mean", "cosine", "max"):
        part = score_file(str(path), anchors, scorer, batch_rows=128)
        assert np.array_equal(part["key"], np.arange(500))
        assert np.array_equal(part["score"], AnchorKernel(anchors).score(x, scorer))
        assert part["reject"] == [None] * 500
