"""`ntk-ray select --selector random|bm25` end to end through Ray on the demo model's tokenizer:
the model-free baselines write the same contract outputs as ntk, and rank as their math says.
The model baselines (embedding, less) are checked against independent recomputations in
tests/test_selectors_recompute.py (tiny model, in-process executor; the executors rank the same:
tests/test_runner.py)."""

import json

import numpy as np
import polars as pl
import pytest

from conftest import BUDGET, run_select
from ntk_ray.io.storage import RESULT_FILES

pytestmark = [pytest.mark.ray, pytest.mark.demo, pytest.mark.timeout(900)]


def _check_contract(out, selector):
    ranked = pl.read_parquet(out / "ranked.parquet")
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["pool_rows"] == 64 == counts["ranked"] + counts["rejected"]
    assert counts["rejected"] == 3  # the bad rows of extra.jsonl
    assert ranked["rank"].to_list() == list(range(1, ranked.height + 1))
    assert set(ranked["stage"].to_list()) == {selector}
    assert ranked["score"].null_count() == 0 and ranked["score"].is_finite().all()
    assert ranked["selected"].sum() == BUDGET == counts["selected"]
    assert manifest["selector"] == selector and manifest["config"]["selector"] == selector
    selected = pl.read_parquet(out / "selected.parquet")
    assert selected["rank"].to_list() == list(range(1, BUDGET + 1))
    return ranked, manifest


def _pool_tokens(out) -> pl.DataFrame:
    files = sorted((out / "_work/tokens/pool").glob("*.parquet"))
    df = pl.concat([pl.read_parquet(f, columns=["id", "key", "input_ids", "reject"]) for f in files])
    return df.filter(pl.col("reject").is_null())


#: the model-free baselines in-process: their math is what is checked here (Ray and the in-process
#: executor rank alike: test_runner.py; the Ray path of the whole job: test_select_e2e.py)
LOCAL = ("--executor", "local")


@pytest.mark.parametrize("selector", ["random", "bm25"])
def test_model_free_baselines_rank_as_their_math_says(demo_data, selector):
    from ntk_ray.core.lexical import bm25_scores, bm25_stats
    from ntk_ray.core.selectors import random_scores

    d, _ = demo_data
    out = d / f"sel-{selector}"
    if selector == "random":  # also: --out as a URI (pyarrow.fs), the stages in --work-dir
        uri = f"file://{d}/bucket/{selector}"
        assert run_select(d, uri, "--selector", selector, "--seed", "3", "--work-dir", str(out), *LOCAL) == 0
        published = d / "bucket" / selector
        assert sorted(p.name for p in published.iterdir()) == sorted([*RESULT_FILES, "report.html",
                                                                      "_ntk_ray_stamp.json"])
        assert pl.read_parquet(published / "ranked.parquet").equals(pl.read_parquet(out / "ranked.parquet"))
        (published / "ranked.parquet").unlink()  # a rerun finds the complete run and publishes again
        assert run_select(d, uri, "--selector", selector, "--seed", "3", "--work-dir", str(out), *LOCAL) == 0
        assert (published / "ranked.parquet").exists()
    else:
        assert run_select(d, out, "--selector", selector, "--seed", "3", *LOCAL) == 0
    ranked, manifest = _check_contract(out, selector)
    assert "warmup" not in manifest["stage_seconds"] and manifest["adapter"] is None
    tokens = _pool_tokens(out).join(ranked.select("id"), on="id", how="semi").unique("id", keep="first")
    keys = tokens["key"].to_numpy()
    if selector == "random":
        expected = random_scores(keys, 3)
    else:
        files = sorted((out / "_work/tokens/domain").glob("*.parquet"))
        queries = pl.concat([pl.read_parquet(f) for f in files]).filter(pl.col("reject").is_null())["input_ids"].to_list()
        docs = tokens["input_ids"].to_list()
        expected = bm25_scores(docs, queries, bm25_stats(docs))
    want = pl.DataFrame({"id": tokens["id"], "expected": expected, "key": keys})
    got = ranked.join(want, on="id", how="left")
    assert got["expected"].null_count() == 0
    np.testing.assert_allclose(got["score"].to_numpy(), got["expected"].to_numpy(), rtol=1e-9, atol=1e-12)
    best = want.sort(["expected", "key"], descending=[True, False])["id"].head(BUDGET).to_list()
    assert ranked["id"].head(BUDGET).to_list() == best
