"""Hugging Face datasets in and out (io/hf.py, formats.Arrow, the hf:// file system, --save-hf).

The same rows as JSONL, as a ``save_to_disk`` Dataset / DatasetDict, as a repository snapshot
with a README ``configs:`` section and behind ``hf://`` (a local fake fsspec file system
registered for the ``hf`` protocol: no test reaches a hub) must give the same ranking and row
accounting through ``ntk-ray select --executor local`` with the tiny model. The split rules
without ``configs:`` are checked against ``datasets``' own (``get_data_patterns``); the outputs
load with ``datasets.load_dataset("parquet")`` and ``--save-hf`` with ``load_from_disk``."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import ClassVar

import datasets  # a test dependency: nothing in ntk_ray imports it
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TINY_WORDS
from pyarrow import feather

from ntk_ray.cli import main
from ntk_ray.io.fs import InputError, filesystem
from ntk_ray.io.hf import split_by_name
from ntk_ray.io.paths import resolve_paths
from ntk_ray.io.rows import count_rows, read_original_rows

datasets.disable_progress_bars()

CARD = """---
license: mit
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: validation
    path: data/validation-*
- config_name: domain_only
  data_files: data/validation-*
---
# tiny
"""


def rows(prefix: str, n: int, rng, lo: int, hi: int) -> list[dict]:
    return [{"id": f"{prefix}{i}", "text": " ".join(rng.choice(TINY_WORDS, size=int(rng.integers(lo, hi))))}
            for i in range(n)]


@pytest.fixture(scope="module")
def hfdata(tmp_path_factory):
    """The same domain (6) and pool (30 + one empty text: a reject) rows as JSONL, as a saved
    Dataset pair, as a saved DatasetDict (train = pool, validation = domain) and as a
    repository snapshot with a dataset card."""
    rng = np.random.default_rng(0)
    domain = rows("d", 6, rng, 6, 7)
    pool = rows("p", 30, rng, 2, 12) + [{"id": "p-empty", "text": ""}]
    root = tmp_path_factory.mktemp("hf")
    for name, data in (("domain", domain), ("pool", pool)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
        datasets.Dataset.from_list(data).save_to_disk(str(root / f"{name}_ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(pool),
                          "validation": datasets.Dataset.from_list(domain)}).save_to_disk(str(root / "dd"))
    (root / "snap" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(pool), root / "snap/data/train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(domain), root / "snap/data/validation-00000-of-00001.parquet")
    (root / "snap" / "README.md").write_text(CARD)
    return root


def select(capsys, domain, pool, out, model, *extra) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in ["select", "--domain", domain, "--pool", pool, "--budget", 5, "--out", out,
                                "--model", model, "--executor", "local", "--accelerator", "cpu", "--max-length", 32,
                                "--selector", "bm25", *extra]])
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def baseline(hfdata, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "out"
    assert main([str(a) for a in ["select", "--domain", hfdata / "domain.jsonl", "--pool", hfdata / "pool.jsonl",
                                  "--budget", 5, "--out", out, "--model", tiny_model_dir, "--executor", "local",
                                  "--accelerator", "cpu", "--max-length", 32, "--selector", "bm25",
                                  "--save-hf", out.parent / "sel_hf"]]) == 0
    return out


def assert_same_run(out: Path, base: Path, pool_file: str) -> None:
    """Same ranking (ids and scores), same selection and the same row accounting as the JSONL run."""
    ranked, ranked0 = pl.read_parquet(out / "ranked.parquet"), pl.read_parquet(base / "ranked.parquet")
    assert ranked["id"].to_list() == ranked0["id"].to_list()
    assert ranked["score"].to_list() == ranked0["score"].to_list()
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts == json.loads((base / "manifest.json").read_text())["counts"]
    assert counts["pool_rows"] == counts["ranked"] + counts["rejected"] == 31
    rejects = pl.read_parquet(out / "rejects.parquet").filter(pl.col("role") == "pool")
    assert rejects["id"].to_list() == ["p-empty"] and rejects["source"].str.ends_with(pool_file).all()
    sel, sel0 = pl.read_parquet(out / "selected.parquet"), pl.read_parquet(base / "selected.parquet")
    assert sel.select("id", "text", "rank").equals(sel0.select("id", "text", "rank"))


# ---- save_to_disk directories, a snapshot, hf:// through select ----------------------------------

def test_saved_datasets_and_a_snapshot_rank_like_the_same_rows_as_jsonl(hfdata, baseline, tiny_model_dir, tmp_path,
                                                                        capsys):
    # a saved Dataset as the pool; the domain is a named split of a saved DatasetDict
    rc, err = select(capsys, f"{hfdata / 'dd'}:validation", hfdata / "pool_ds", tmp_path / "ds", tiny_model_dir)
    assert rc == 0, err
    assert_same_run(tmp_path / "ds", baseline, "pool_ds/data-00000-of-00001.arrow")
    # the DatasetDict's default split (train) as the pool; the domain a split of a snapshot's card
    snap = hfdata / "snap"
    rc, err = select(capsys, f"{snap}:validation", hfdata / "dd", tmp_path / "dd", tiny_model_dir)
    assert rc == 0, err
    assert_same_run(tmp_path / "dd", baseline, "dd/train/data-00000-of-00001.arrow")
    assert resolve_paths(str(snap), "--pool") == [str(snap / "data/train-00000-of-00001.parquet")]
    assert resolve_paths(f"{snap}:domain_only:train", "--domain") == [str(snap / "data/validation-00000-of-00001.parquet")]


class FakeHub:
    """A local directory posing as the hub: an fsspec file system for ``hf://`` whose paths
    (``datasets/owner/name/...``) live under ``root``; counts the files it opens."""
    root: Path
    opened: ClassVar[list[str]] = []


@pytest.fixture
def fake_hub(tmp_path):
    import fsspec
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem

    class HubFS(DirFileSystem):
        protocol = "hf"
        cachable = False

        def __init__(self, *args, **kwargs):
            super().__init__(path=str(FakeHub.root), fs=LocalFileSystem())

        def open(self, path, *args, **kwargs):
            FakeHub.opened.append(path)
            return super().open(path, *args, **kwargs)

    real = fsspec.get_filesystem_class("hf")
    FakeHub.root, FakeHub.opened = tmp_path / "hub", []
    (tmp_path / "hub" / "datasets" / "me").mkdir(parents=True)
    fsspec.register_implementation("hf", HubFS, clobber=True)
    try:
        yield FakeHub
    finally:
        fsspec.register_implementation("hf", real, clobber=True)


def test_hf_uris_go_through_the_fsspec_file_system_of_the_hf_protocol(hfdata, baseline, fake_hub, tiny_model_dir,
                                                                       tmp_path, capsys):
    shutil.copytree(hfdata / "snap", fake_hub.root / "datasets/me/tiny")
    shutil.copytree(hfdata / "dd", fake_hub.root / "datasets/me/tiny-dd")
    assert resolve_paths("hf://datasets/me/tiny/data/*.parquet", "--pool") == [
        "hf://datasets/me/tiny/data/train-00000-of-00001.parquet",
        "hf://datasets/me/tiny/data/validation-00000-of-00001.parquet"]
    rc, err = select(capsys, "hf://datasets/me/tiny-dd:validation", "hf://datasets/me/tiny", tmp_path / "out",
                     tiny_model_dir)
    assert rc == 0, err
    assert_same_run(tmp_path / "out", baseline, "hf://datasets/me/tiny/data/train-00000-of-00001.parquet")
    assert any(p.endswith("tiny-dd/validation/data-00000-of-00001.arrow") for p in fake_hub.opened)
    assert any(p.endswith("tiny/data/train-00000-of-00001.parquet") for p in fake_hub.opened)


def test_the_real_hub_file_system_is_the_one_for_hf_uris():
    import fsspec
    from huggingface_hub import HfFileSystem

    assert fsspec.get_filesystem_class("hf") is HfFileSystem
    fs, path = filesystem("hf://datasets/owner/name@refs%2Fpr%2F1/data/my%20file.parquet")  # nothing is fetched
    assert isinstance(fs.handler.fs, HfFileSystem) and path == "datasets/owner/name@refs%2Fpr%2F1/data/my file.parquet"


# ---- outputs --------------------------------------------------------------------------------------

def test_outputs_load_with_datasets_and_save_hf_round_trips(hfdata, baseline, tiny_model_dir, tmp_path, capsys):
    out, hf_dir = baseline, baseline.parent / "sel_hf"  # the baseline ran with --save-hf
    for name in ("ranked", "selected", "rejects"):
        loaded = datasets.load_dataset("parquet", data_files=str(out / f"{name}.parquet"), split="train",
                                       cache_dir=str(tmp_path / "cache"))
        assert loaded.to_list() == pq.read_table(out / f"{name}.parquet").to_pylist()
    selected = pq.read_table(out / "selected.parquet")
    assert selected.num_rows == 5 and datasets.load_from_disk(str(hf_dir)).to_list() == selected.to_pylist()
    # a finished run asked again writes (replaces) the directory it wrote; nobody else's
    (hf_dir / "data-00000-of-00001.arrow").write_bytes(b"stale")
    rc, err = select(capsys, hfdata / "domain.jsonl", hfdata / "pool.jsonl", out, tiny_model_dir, "--save-hf", hf_dir)
    assert rc == 0 and "already complete" in err, err
    assert datasets.load_from_disk(str(hf_dir)).to_list() == selected.to_pylist()
    assert not [p for p in hf_dir.parent.iterdir() if p.name.startswith(".sel_hf")]  # no temporary left
    rc, err = select(capsys, hfdata / "domain.jsonl", hfdata / "pool.jsonl", tmp_path / "out2", tiny_model_dir,
                     "--save-hf", hfdata / "pool_ds")
    assert rc == 2 and err.strip().count("\n") == 0 and "--save-hf" in err and "did not write" in err, err
    assert not (tmp_path / "out2" / "ranked.parquet").exists()
    assert datasets.load_from_disk(str(hfdata / "pool_ds")).num_rows == 31  # untouched
    rc, err = select(capsys, hfdata / "domain.jsonl", hfdata / "pool.jsonl", tmp_path / "out3", tiny_model_dir,
                     "--save-hf", tmp_path / "out3")
    assert rc == 2 and "is --out or holds it" in err and not (tmp_path / "out3").exists(), err


def test_the_python_api_takes_a_datasets_dataset(hfdata, baseline, tiny_model_dir, tmp_path, monkeypatch):
    import ntk_ray

    monkeypatch.setenv("NTK_RAY_CACHE", str(tmp_path / "cache"))
    result = ntk_ray.select(domain=datasets.load_from_disk(str(hfdata / "domain_ds")),
                            pool=datasets.Dataset.from_json(str(hfdata / "pool.jsonl"), cache_dir=str(tmp_path / "c")),
                            budget=5, out=tmp_path / "out", executor="local", model=str(tiny_model_dir),
                            accelerator="cpu", max_length=32, selector="bm25")
    assert result.ranked["id"].to_list() == pl.read_parquet(baseline / "ranked.parquet")["id"].to_list()


# ---- resolution rules and errors ------------------------------------------------------------------

LAYOUTS = [
    ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet", "data/test-00000-of-00001.parquet"],
    ["data/train-00000-of-00001.jsonl", "data/my.split-00000-of-00001.jsonl", "data/other.jsonl"],
    ["train.csv", "test.csv", "valid.csv"],
    ["data/train/a.jsonl", "data/train/b.jsonl", "data/validation/c.jsonl", "data/x_test_1.jsonl"],
    ["my_train_0.jsonl", "my_dev_1.jsonl", "x_eval.jsonl", "notes.jsonl"],
    ["training-set/a.jsonl", "data/dev/b.jsonl", "train_test.jsonl"],
    ["Train.jsonl", "contest.jsonl", "retrain.jsonl"],
    ["a.jsonl", "b/c.jsonl"],
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=[f"layout{i}" for i in range(len(LAYOUTS))])
def test_splits_by_name_are_the_ones_datasets_finds(layout, tmp_path):
    from datasets.data_files import get_data_patterns, resolve_pattern

    for rel in layout:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("{}\n")
    expected = {}
    for split, patterns in get_data_patterns(str(tmp_path)).items():
        found = set()
        for pattern in patterns:
            try:
                found |= {Path(p).relative_to(tmp_path).as_posix() for p in resolve_pattern(pattern, str(tmp_path))}
            except FileNotFoundError:
                pass
        expected[split] = sorted(found)
    assert split_by_name(sorted(layout)) == expected


def test_a_snapshot_without_configs_splits_by_name(tmp_path):
    (tmp_path / "data").mkdir()
    for name, n in (("train.jsonl", 3), ("test.jsonl", 2)):
        (tmp_path / "data" / name).write_text("".join(json.dumps({"text": f"w{i}"}) + "\n" for i in range(n)))
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n")
    assert resolve_paths(str(tmp_path), "--pool") == [str(tmp_path / "data/train.jsonl")]
    assert resolve_paths(f"{tmp_path}:test", "--pool") == [str(tmp_path / "data/test.jsonl")]
    (tmp_path / "README.md").write_text("# no card\n")  # a plain directory: every file, as before
    assert len(resolve_paths(str(tmp_path), "--pool")) == 2


def test_arrow_files_stream_and_file_format(tmp_path):
    table = pa.table({"id": [f"r{i}" for i in range(2500)], "text": [f"w{i % 40}" for i in range(2500)]})
    with pa.OSFile(str(tmp_path / "s.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table, max_chunksize=1000)
    feather.write_feather(table, str(tmp_path / "f.arrow"), chunksize=700)
    for path in (str(tmp_path / "s.arrow"), str(tmp_path / "f.arrow")):
        assert count_rows([path]) == 2500
        picked = read_original_rows(path, [2400, 3, 999, 1000, 3])
        assert picked.column("id").to_pylist() == ["r2400", "r3", "r999", "r1000", "r3"]
        with pytest.raises(IndexError):
            read_original_rows(path, [2500])


def test_bad_sources_are_one_line_input_errors(hfdata, tmp_path, capsys):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "dataset_info.json").write_text("{}")
    cases = {
        f"{hfdata / 'dd'}:dev": "has no split 'dev' (splits: train, validation)",
        str(tmp_path / "broken"): "has dataset_info.json but no data-*.arrow files",
        f"{hfdata / 'pool_ds'}:train": "is one saved Dataset, not a DatasetDict",
        f"{hfdata / 'snap'}:nope:train": "has no config 'nope' (configs: default, domain_only)",
        f"{tmp_path / 'broken'}:x:y": "is one saved Dataset, not a DatasetDict with splits: drop ':x:y'",
    }
    for spec, message in cases.items():
        with pytest.raises(InputError, match="^--pool: .*" + re.escape(message)):
            resolve_paths(spec, "--pool")
    two = tmp_path / "two"
    datasets.DatasetDict({"a": datasets.Dataset.from_list([{"text": "w1"}]),
                          "b": datasets.Dataset.from_list([{"text": "w2"}])}).save_to_disk(str(two))
    with pytest.raises(InputError, match="has splits a, b and none is 'train': name one as .*:SPLIT"):
        resolve_paths(str(two), "--pool")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.jsonl").write_text('{"text": "w1"}\n')
    with pytest.raises(InputError, match="is not a Hugging Face dataset"):
        resolve_paths(f"{tmp_path / 'plain'}:train", "--pool")
    # through the CLI: exit 2, one line, before any work
    capsys.readouterr()
    rc = main(["select", "--domain", str(hfdata / "domain.jsonl"), "--pool", str(tmp_path / "broken"),
               "--budget", "1", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--pool:" in err and "data-*.arrow" in err, err
