"""The stage runner on the in-process executor (no Ray): a toy selector registered through the
registry alone runs end to end; resume reuses finished stages and redoes a stage whose marker
is unreadable; the ntk plan runs the same on the in-process and the Ray executor; the Python
API takes in-memory tables.

A tiny random Llama with weights and a word-level tokenizer keeps every model pass to
milliseconds."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from ntk_ray.config import SelectConfig
from ntk_ray.runtime.local import LocalExecutor
from ntk_ray.stages.base import Stage
from ntk_ray.stages.rank import AllRowsStage, Scores
from ntk_ray.stages.read import Accounting, ReadStage, ValidateStage
from ntk_ray.stages.registry import SELECTORS, Selector, register
from ntk_ray.stages.write import WriteStage

@pytest.fixture
def data(tiny_data) -> Path:
    return tiny_data


def config(data: Path, out: Path, model: Path, **options) -> SelectConfig:
    return SelectConfig(domain=[str(data / "domain.jsonl")], pool=[str(data / "pool.jsonl")], budget=5, out=str(out),
                        model=str(model), max_length=32, proj_dim=64, warmup_epochs=1.0, batch_tokens=512, **options)


# -------------------------------------------------------------------------------------------
# a toy selector, registered through the registry alone
class ShortestScoreStage(Stage):
    """s(x) = -n_tokens: the shortest rows first."""
    name = "score"
    needs = ("validate",)
    output = Scores

    def run(self, ctx, validate: Accounting) -> Scores:
        pool = validate.usable_pool
        return Scores(pool.select("key", (-pl.col("n_tokens")).cast(pl.Float64).alias("score"),
                                  pl.lit(None, dtype=pl.String).alias("reject")))


@pytest.fixture
def shortest_selector():
    selector = register(Selector(
        "shortest", "toy: the shortest rows first",
        lambda cfg: [ReadStage(), ValidateStage(), AllRowsStage(), ShortestScoreStage(), WriteStage("shortest", warm=False)]))
    yield selector
    del SELECTORS["shortest"]


def test_a_toy_selector_registered_alone_runs_end_to_end(shortest_selector, data, tiny_model_dir, tmp_path):
    from ntk_ray.runner import run_select

    out = tmp_path / "out"
    manifest = run_select(config(data, out, tiny_model_dir, selector="shortest"), executor=LocalExecutor(device="cpu"))
    ranked = pl.read_parquet(out / "ranked.parquet")
    assert set(ranked["stage"]) == {"shortest"} and manifest["selector"] == "shortest"
    assert ranked.height == manifest["counts"]["ranked"] == 30
    # the ranking is the toy score's: fewest tokens first (ties by key, as every selector)
    scores = ranked["score"].to_list()
    assert scores == sorted(scores, reverse=True) and scores[0] == max(scores)
    selected = pl.read_parquet(out / "selected.parquet")
    lengths = [len(t.split()) for t in selected["text"]]
    pool_lengths = sorted(len(json.loads(line)["text"].split()) for line in (data / "pool.jsonl").read_text().splitlines())
    assert sorted(lengths) == pool_lengths[:5]


def test_the_cli_lists_registered_selectors(shortest_selector):
    from ntk_ray.cli import build_parser

    args = build_parser().parse_args(["select", "--domain", "d", "--pool", "p", "--budget", "1", "--out", "o",
                                      "--selector", "shortest"])
    assert args.selector == "shortest"


# -------------------------------------------------------------------------------------------
# resume
class CountingScore(ShortestScoreStage):
    calls = 0

    def run(self, ctx, validate):
        CountingScore.calls += 1
        return super().run(ctx, validate)


def test_resume_reuses_finished_stages_and_redoes_one_with_a_broken_marker(data, tiny_model_dir, tmp_path, capsys):
    from ntk_ray.runner import run_select

    register(Selector("counting", "toy", lambda cfg: [ReadStage(), ValidateStage(), AllRowsStage(), CountingScore(),
                                                      WriteStage("counting", warm=False)]))
    try:
        out = tmp_path / "out"
        cfg = config(data, out, tiny_model_dir, selector="counting")
        CountingScore.calls = 0
        first = run_select(cfg, executor=LocalExecutor(device="cpu"))
        first_ids = pl.read_parquet(out / "ranked.parquet")["id"].to_list()
        assert CountingScore.calls == 1
        # a run killed after its score stage: no write marker, no results
        (out / "_work" / "write" / "_SUCCESS").unlink()
        (out / "ranked.parquet").unlink()
        capsys.readouterr()
        run_select(cfg, executor=LocalExecutor(device="cpu"))
        err = capsys.readouterr().err
        assert CountingScore.calls == 1 and "score: reusing the finished score" in err
        assert "read: reusing the finished read" in err
        assert pl.read_parquet(out / "ranked.parquet")["id"].to_list() == first_ids
        # a truncated marker is not trusted: the stage runs again
        (out / "_work" / "write" / "_SUCCESS").unlink()
        (out / "_work" / "score" / "_SUCCESS").write_text('{"stage": "Coun')
        run_select(cfg, executor=LocalExecutor(device="cpu"))
        assert CountingScore.calls == 2
        assert json.loads((out / "manifest.json").read_text())["counts"] == first["counts"]
    finally:
        del SELECTORS["counting"]


# -------------------------------------------------------------------------------------------
# the same stages on both executors
@pytest.mark.ray
@pytest.mark.parametrize("selector", ["ntk", "bm25"])
def test_local_and_ray_executors_rank_the_same(ray_session, data, tiny_model_dir, tmp_path, selector):
    from ntk_ray.runner import run_select
    from ntk_ray.runtime.ray_executor import RayExecutor

    options = {"selector": selector, "coarse_factor": 2}  # pool 30 > M = 10: the coarse cut runs
    run_select(config(data, tmp_path / "local", tiny_model_dir, **options), executor=LocalExecutor(device="cpu"))
    run_select(config(data, tmp_path / "ray", tiny_model_dir, **options), executor=RayExecutor(log=lambda m: None))
    local = pl.read_parquet(tmp_path / "local" / "ranked.parquet")
    ray_ = pl.read_parquet(tmp_path / "ray" / "ranked.parquet")
    assert local["id"].to_list() == ray_["id"].to_list()
    assert local["score"].to_list() == ray_["score"].to_list()
    if selector == "ntk":
        assert set(local["stage"]) == {"ntk", "coarse"}


# -------------------------------------------------------------------------------------------
# the Python API
def test_python_api_takes_in_memory_tables(data, tiny_model_dir, tmp_path, monkeypatch):
    import pyarrow as pa

    import ntk_ray

    monkeypatch.setenv("NTK_RAY_CACHE", str(tmp_path / "cache"))
    domain = pl.read_ndjson(data / "domain.jsonl")
    pool = pa.Table.from_pylist([json.loads(line) for line in (data / "pool.jsonl").read_text().splitlines()])
    result = ntk_ray.select(domain=domain, pool=pool, budget=5, out=tmp_path / "api", executor="local",
                            model=str(tiny_model_dir), selector="random", max_length=32)
    assert result.selected.height == 5 and result.ranked.height == 30
    assert set(result.selected["id"]) <= set(pool.column("id").to_pylist())
    assert result.manifest["counts"]["pool_rows"] == 30
    # the same call again resumes (the tables are stored by content): nothing is recomputed
    again = ntk_ray.select(domain=domain, pool=pool, budget=5, out=tmp_path / "api", executor="local",
                           model=str(tiny_model_dir), selector="random", max_length=32)
    assert again.ranked["id"].to_list() == result.ranked["id"].to_list()
    # a Hugging Face dataset (a shuffled view: its rows in view order) is taken as it is
    import datasets

    view = datasets.Dataset.from_list(pool.to_pylist()).shuffle(seed=1).select(range(20))
    from_hf = ntk_ray.select(domain=domain, pool=view, budget=5, out=tmp_path / "hf", executor="local",
                             model=str(tiny_model_dir), selector="random", max_length=32)
    assert from_hf.ranked.height == 20 and set(from_hf.ranked["id"]) == set(view["id"])
    with pytest.raises(TypeError, match="unknown option"):
        ntk_ray.select(domain=domain, pool=pool, budget=5, executor="local", not_an_option=1)


def test_cli_select_with_the_local_executor_starts_no_ray(data, tiny_model_dir, tmp_path, capsys):
    import ray

    from ntk_ray.cli import main

    started = ray.is_initialized()
    out = tmp_path / "cli"
    assert main(["select", "--domain", str(data / "domain.jsonl"), "--pool", str(data / "pool.jsonl"), "--budget", "5",
                 "--out", str(out), "--model", str(tiny_model_dir), "--max-length", "32", "--proj-dim", "64",
                 "--coarse-factor", "2", "--warmup-epochs", "1", "--executor", "local"]) == 0
    assert ray.is_initialized() == started
    assert "in-process executor" in capsys.readouterr().err
    ranked = pl.read_parquet(out / "ranked.parquet")
    assert ranked.height == 30 and set(ranked["stage"]) == {"ntk", "coarse"}
    assert json.loads((out / "manifest.json").read_text())["config"]["executor"] == "local"
