"""`ntk-ray select` end to end through Ray on the bundled corpus and the real demo model."""

import json

import polars as pl
import pytest

from conftest import BUDGET, run_select
from ntk_ray.cli import main

pytestmark = [pytest.mark.ray, pytest.mark.demo, pytest.mark.timeout(900)]


def test_outputs_follow_the_contract(first_run):
    out = first_run
    ranked = pl.read_parquet(out / "ranked.parquet")
    rejects = pl.read_parquet(out / "rejects.parquet")
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["pool_rows"] == 64
    assert counts["pool_rows"] == counts["ranked"] + counts["rejected"]
    assert ranked["rank"].to_list() == list(range(1, ranked.height + 1))
    assert ranked["id"].n_unique() == ranked.height
    assert ranked.schema["rank"] == pl.Int64 and ranked.schema["score"] == pl.Float64
    assert ranked["selected"].sum() == BUDGET == counts["selected"]
    assert ranked.filter(pl.col("selected"))["rank"].max() == BUDGET
    stages = ranked["stage"].to_list()
    assert stages == sorted(stages, key=lambda s: s != "ntk")  # every ntk row above every coarse row
    assert ranked.filter(pl.col("stage") == "ntk").height == 3 * BUDGET
    assert ranked.filter(pl.col("stage") == "ntk")["score"].null_count() == 0
    scores = ranked.filter(pl.col("stage") == "ntk")["score"].to_list()
    assert scores == sorted(scores, reverse=True)
    # the bad rows of extra.jsonl are rejected with reasons, not lost
    pool_rejects = rejects.filter(pl.col("role") == "pool")
    assert pool_rejects.height == counts["rejected"] == 3
    reasons = " | ".join(pool_rejects["reason"].to_list())
    assert "broken JSON" in reasons and "empty response" in reasons and "duplicate id" in reasons
    # every input row exactly once across ranked and rejects
    seen = sorted(ranked["source"].to_list() + pool_rejects["source"].to_list())
    assert len(seen) == 64
    selected = pl.read_parquet(out / "selected.parquet")
    assert selected.height == BUDGET
    assert {"id", "prompt", "response", "label", "rank", "score"} <= set(selected.columns)
    assert selected["rank"].to_list() == list(range(1, BUDGET + 1))
    assert manifest["projector"]["type"] == "sketch" and manifest["projector"]["seed"] == 0
    assert set(manifest["stage_seconds"]) >= {"read", "warmup", "coarse", "features", "score", "write"}


def test_rerun_of_a_complete_run_recomputes_nothing(first_run, demo_data, capsys):
    d, _ = demo_data
    before = pl.read_parquet(first_run / "ranked.parquet")
    assert run_select(d, first_run) == 0
    err = capsys.readouterr().err
    assert "already complete" in err
    after = pl.read_parquet(first_run / "ranked.parquet")
    assert after["id"].to_list() == before["id"].to_list()


def test_a_different_config_into_the_same_out_is_refused(first_run, demo_data, capsys):
    d, _ = demo_data
    assert run_select(d, first_run, "--seed", "5") == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "no --model given" not in line]
    assert len(err) == 1 and "different config" in err[0]  # (besides the demo-model notice)


@pytest.mark.parametrize("to_uri", [False, True], ids=["dir", "file-uri"])
def test_score_command_reproduces_the_selects_ntk_ranking(first_run, demo_data, tmp_path, to_uri):
    work = first_run / "_work"
    out = tmp_path / "rescored"
    where = ["--out", f"file://{out}", "--work-dir", str(tmp_path / "scratch")] if to_uri else ["--out", str(out)]
    assert main(["score", "--features", str(work / "features"), "--anchors", str(work / "anchor_features"),
                 "--budget", str(BUDGET), *where]) == 0
    if to_uri:  # the results were copied to the URI from the working directory
        assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", "ranked.parquet", "rejects.parquet",
                                                               "selected.parquet", "_ntk_ray_stamp.json",
                                                               "report.html"])  # as select publishes
        assert (tmp_path / "scratch" / "ranked.parquet").exists()
    select_ntk = pl.read_parquet(first_run / "ranked.parquet").filter(pl.col("stage") == "ntk")
    rescored = pl.read_parquet(out / "ranked.parquet")
    assert rescored["id"].to_list() == select_ntk["id"].to_list()
    assert pl.read_parquet(out / "selected.parquet").height == BUDGET
    # against an independent computation: the feature files read with pyarrow alone, the default
    # (cosine) scores in float64 numpy: s(x) = mean over anchors of <x, a> / (|x| |a|)
    expected = _cosine_scores_float64(work / "features", work / "anchor_features")
    assert set(expected) == set(rescored["id"].to_list())
    got = dict(zip(rescored["id"].to_list(), rescored["score"].to_list()))
    for i, want in expected.items():
        assert abs(got[i] - want) <= 1e-6 * abs(want) + 1e-9, (i, got[i], want)
    # the ranking is the descending order of the independent scores (ties within float32 rounding aside)
    ordered = [expected[i] for i in rescored["id"].to_list()]
    assert all(a >= b - 1e-6 * max(abs(a), abs(b)) for a, b in zip(ordered, ordered[1:]))
    assert set(rescored.filter(pl.col("selected"))["id"]) == set(sorted(expected, key=expected.get)[-BUDGET:])


def _cosine_scores_float64(features_dir, anchors_dir) -> dict:
    """id -> mean cosine to the anchors, from the Parquet feature shards (pyarrow + numpy only)."""
    import numpy as np
    import pyarrow.parquet as pq

    def read(directory):
        ids, rows = [], []
        for path in sorted(directory.rglob("*.parquet")):
            if any(part.startswith(("_", ".")) for part in path.relative_to(directory).parts):
                continue
            t = pq.read_table(path).to_pydict()
            for k, i in enumerate(t["id"]):
                if t.get("reject", [None] * len(t["id"]))[k] is None and t["feature"][k] is not None:
                    ids.append(i)
                    rows.append(np.asarray(t["feature"][k], dtype=np.float64))
        return ids, np.stack(rows)

    pool_ids, x = read(features_dir)
    _, a = read(anchors_dir)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    return dict(zip(pool_ids, (x @ a.T).mean(axis=1)))


def test_features_command_recomputes_the_same_anchor_features(first_run, demo_data, tmp_path):
    import numpy as np

    from ntk_ray.io.shards import read_vectors

    d, _ = demo_data
    out = tmp_path / "feats"
    assert main(["features", "--data", str(d / "data" / "domain.jsonl"), "--adapter", str(first_run / "_work/warmup/adapter"),
                 "--out", str(out), "--max-length", "48", "--proj-dim", "256"]) == 0
    t_new, x_new = read_vectors(next(p for p in map(str, out.glob("*.parquet")) if "/_" not in p and "/." not in p), "feature", ("id",))
    t_old, x_old = read_vectors(str(first_run / "_work/anchor_features/anchors.parquet"), "feature", ("id",))
    new = dict(zip(t_new.column("id").to_pylist(), x_new))
    for i, v in zip(t_old.column("id").to_pylist(), x_old):
        np.testing.assert_allclose(new[i], v, rtol=1e-3, atol=1e-3 * np.abs(v).max())
