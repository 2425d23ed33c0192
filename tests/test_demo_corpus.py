"""The bundled WordNet demo corpus and the demo domain/eval/pool split."""

from __future__ import annotations

import polars as pl
import pytest

from ntk_ray.demo import CORPUS_PATH, DEMO_DOMAINS, load_corpus, make_demo_split

CORPUS_COLUMNS = {"id", "label", "pos", "lemma", "prompt", "response", "text"}


def _read_split(info: dict) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    return (
        pl.read_ndjson(info["domain_path"]),
        pl.read_ndjson(info["eval_path"]),
        pl.read_parquet(info["pool_path"]),
    )


def test_corpus_file_and_columns():
    assert CORPUS_PATH.exists()
    assert CORPUS_PATH.stat().st_size <= 4_200_000
    df = load_corpus()
    assert CORPUS_COLUMNS <= set(df.columns)
    assert all(df.schema[c] == pl.String for c in CORPUS_COLUMNS)
    assert df.height > 10_000
    assert df["id"].n_unique() == df.height
    for column in ("prompt", "response", "text", "label", "id"):
        assert df[column].null_count() == 0
        assert (df[column].str.strip_chars().str.len_chars() == 0).sum() == 0
    assert (df["text"] == df["prompt"] + "\n" + df["response"]).all()


def test_demo_domains_have_enough_rows():
    counts = dict(load_corpus().group_by("label").len().iter_rows())
    assert len(DEMO_DOMAINS) >= 5
    assert len(set(DEMO_DOMAINS)) == len(DEMO_DOMAINS)
    for label in DEMO_DOMAINS:
        assert counts.get(label, 0) >= 64 + 64 + 100, label


def test_split_counts_disjoint_and_share(tmp_path):
    info = make_demo_split(tmp_path, domain_label="noun.food", n_domain=64, n_eval=64,
                           n_pool=2000, pool_domain_share=0.05, seed=0)
    domain, evaluation, pool = _read_split(info)

    assert set(domain.columns) == {"prompt", "response", "id", "label"}
    assert set(pool.columns) == {"id", "prompt", "response", "text", "label"}
    assert (domain.height, evaluation.height, pool.height) == (64, 64, 2000)
    assert (info["n_domain"], info["n_eval"], info["n_pool"]) == (64, 64, 2000)
    assert (domain["label"] == "noun.food").all()
    assert (evaluation["label"] == "noun.food").all()

    ids = [set(domain["id"]), set(evaluation["id"]), set(pool["id"])]
    assert ids[0].isdisjoint(ids[1]) and ids[0].isdisjoint(ids[2]) and ids[1].isdisjoint(ids[2])
    assert pool["id"].n_unique() == pool.height

    share = (pool["label"] == "noun.food").mean()
    assert share == pytest.approx(0.05, abs=0.01)
    assert info["pool_domain_share"] == pytest.approx(share)
    assert pool["label"].n_unique() > 20  # the rest spans many other labels
    # shuffled: the domain rows are not all at the front
    assert (pool["label"].head(100) == "noun.food").sum() < 50


def test_split_deterministic_per_seed(tmp_path):
    kwargs = dict(domain_label="verb.motion", n_domain=16, n_eval=16, n_pool=300)
    first = _read_split(make_demo_split(tmp_path / "a", seed=3, **kwargs))
    again = _read_split(make_demo_split(tmp_path / "b", seed=3, **kwargs))
    other = _read_split(make_demo_split(tmp_path / "c", seed=4, **kwargs))
    for x, y in zip(first, again):
        assert x.equals(y)
    assert not first[0].equals(other[0])
    assert first[2]["id"].to_list() != other[2]["id"].to_list()


def test_split_rejects_impossible_requests(tmp_path):
    with pytest.raises(ValueError):
        make_demo_split(tmp_path, domain_label="noun.food", n_domain=10**6)
    with pytest.raises(ValueError):
        make_demo_split(tmp_path, pool_domain_share=1.5)
