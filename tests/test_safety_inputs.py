"""selected.parquet never holds another row's text: a run records its input files (size, mtime,
the resolved list) and refuses, in one line naming the file, a rerun over changed files or a glob
that now matches other files; the final read-back compares ids row by row.

End-to-end runs: the whole CLI on the tiny random Llama of conftest with ``--executor local``."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from tests.test_safety_out import one_error_line, select


def test_a_file_changed_between_runs_is_refused_naming_it(tiny_data, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert select(tiny_data, out, tiny_model_dir) == 0
    record = json.loads((out / "_work" / "inputs.json").read_text())
    assert [f["path"] for f in record["pool"]] == [str(tiny_data / "pool.jsonl")]
    pool = tiny_data / "pool.jsonl"
    pool.write_text(json.dumps({"id": "new", "text": "alpha beta"}) + "\n" + pool.read_text())  # shifts every row
    capsys.readouterr()
    assert select(tiny_data, out, tiny_model_dir) != 0
    line = one_error_line(capsys)
    assert "--pool" in line and "pool.jsonl changed" in line and "--overwrite" in line, line
    # --overwrite starts over on the current file: the selected rows are the ranked ones
    assert select(tiny_data, out, tiny_model_dir, "--overwrite") == 0
    ranked = pl.read_parquet(out / "ranked.parquet").filter(pl.col("selected")).sort("rank")
    selected = pl.read_parquet(out / "selected.parquet")
    assert selected["id"].to_list() == ranked["id"].to_list()


def test_a_glob_that_now_matches_more_files_is_refused_even_for_a_complete_run(tiny_data, tiny_model_dir, tmp_path,
                                                                               capsys):
    out = tmp_path / "run"
    glob = str(tiny_data / "pool*.jsonl")
    assert select(tiny_data, out, tiny_model_dir, "--pool", glob) == 0
    (tiny_data / "pool2.jsonl").write_text(json.dumps({"id": "q1", "text": "alpha beta"}) + "\n")
    capsys.readouterr()
    assert select(tiny_data, out, tiny_model_dir, "--pool", glob) != 0
    line = one_error_line(capsys)
    assert "--pool now matches 2 file(s)" in line and "pool2.jsonl" in line and "read 1" in line, line


def test_a_file_changed_during_the_run_fails_before_selected_is_written(tiny_data, tiny_model_dir, tmp_path,
                                                                        monkeypatch, capsys):
    from ntk_ray.stages import rank

    pool = tiny_data / "pool.jsonl"
    real = rank.RandomScoreStage.run

    def edits_the_pool_meanwhile(self, ctx, **needed):
        result = real(self, ctx, **needed)
        pool.write_text(json.dumps({"id": "new", "text": "alpha beta"}) + "\n" + pool.read_text())
        return result

    monkeypatch.setattr(rank.RandomScoreStage, "run", edits_the_pool_meanwhile)
    out = tmp_path / "run"
    assert select(tiny_data, out, tiny_model_dir) != 0
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]  # after the progress lines of the stages that ran
    assert "Traceback" not in err and line.startswith("ntk-ray: error: --pool: "), err
    assert "pool.jsonl changed after the run" in line, line
    assert not (out / "selected.parquet").exists()


def test_read_back_ids_are_compared_row_by_row(tmp_path):
    from ntk_ray.io.fs import InputError
    from ntk_ray.io.outputs import selected_rows
    from ntk_ray.io.rows import read_original_rows

    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"id": f"r{i}", "text": "x"}) + "\n" for i in range(4)))
    ranked = pl.DataFrame({"id": ["r2", "r0"], "rank": [1, 2], "score": [2.0, 1.0], "selected": [True, True],
                           "source": [str(f)] * 2, "row": [2, 0]})
    ok = selected_rows(ranked, read_original_rows, id_column="id")
    assert ok["id"].to_list() == ["r2", "r0"]
    # same size, same rows, two ids swapped: only the id comparison can tell
    f.write_text("".join(json.dumps({"id": f"r{i}", "text": "x"}) + "\n" for i in (2, 1, 0, 3)))
    with pytest.raises(InputError, match=r"p.jsonl row 2: the id there is now 'r0', the run ranked 'r2'"):
        selected_rows(ranked, read_original_rows, id_column="id")


def test_a_line_without_an_id_keeps_its_generated_id(tmp_path):
    from ntk_ray.io.outputs import selected_rows
    from ntk_ray.io.rows import read_original_rows

    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"text": "x"}) + "\n" + json.dumps({"id": "a", "text": "y"}) + "\n")
    ranked = pl.DataFrame({"id": ["p.jsonl:0", "a"], "rank": [1, 2], "score": [2.0, 1.0], "selected": [True, True],
                           "source": [str(f)] * 2, "row": [0, 1]})
    assert selected_rows(ranked, read_original_rows, id_column="id")["rank"].to_list() == [1, 2]


def test_fingerprints_hold_no_secret(tmp_path):
    from ntk_ray.io.fingerprint import fingerprints

    f = tmp_path / "p.jsonl"
    f.write_text("{}\n")
    uri = f"file://{f}?secret_key=SECRET"
    record = fingerprints({"pool": [uri]})
    assert "SECRET" not in json.dumps(record)
    assert record["pool"][0]["size"] == 3 and isinstance(record["pool"][0]["mtime_ns"], int)
    assert Path(f).exists()


def test_features_and_score_store_no_secret_of_an_input_uri(tiny_data, tiny_model_dir, tmp_path):
    from ntk_ray.cli import main

    pool = f"file://{tiny_data}/pool.jsonl?sig=POOLSECRET"
    feats, anchors, scored = tmp_path / "feats", tmp_path / "anchors", tmp_path / "scored"
    common = ["--model", str(tiny_model_dir), "--proj-dim", "32", "--max-length", "32", "--executor", "local"]
    assert main(["features", "--data", pool, "--out", str(feats)] + common) == 0
    assert main(["features", "--data", str(tiny_data / "domain.jsonl"), "--out", str(anchors)] + common) == 0
    assert main(["score", "--features", str(feats), "--anchors", str(anchors), "--budget", "3", "--out", str(scored),
                 "--executor", "local"]) == 0
    for p in [feats / "_manifest.json", feats / "_rejects.parquet"] + [scored / n for n in (
            "manifest.json", "ranked.parquet", "rejects.parquet")]:
        data = p.read_bytes() + (json.dumps(pl.read_parquet(p).to_dicts()).encode() if p.suffix == ".parquet" else b"")
        assert b"POOLSECRET" not in data, p
    assert set(pl.read_parquet(scored / "ranked.parquet")["source"]) == {f"file://{tiny_data}/pool.jsonl?sig=***"}
    assert pl.read_parquet(scored / "selected.parquet").columns[:2] == ["id", "text"]  # read back via the real URI


def test_an_out_inside_an_input_directory_is_refused_before_any_work(tiny_data, tiny_model_dir, tmp_path, capsys):
    out = tiny_data / "run"
    assert select(tiny_data, out, tiny_model_dir, "--pool", str(tiny_data)) != 0
    line = one_error_line(capsys)
    assert "--out" in line and "inside the --pool directory" in line, line
    assert not out.exists()
    # an input file under --out (a glob into an earlier run's outputs) too
    other = tmp_path / "other"
    (other / "sub").mkdir(parents=True)
    (other / "sub" / "pool.jsonl").write_text((tiny_data / "pool.jsonl").read_text())
    assert select(tiny_data, other, tiny_model_dir, "--pool", str(other / "sub" / "*.jsonl")) != 0
    assert "is inside --out" in one_error_line(capsys)


def test_the_python_api_expands_a_tilde_in_out(tiny_data, tiny_model_dir, tmp_path, monkeypatch):
    import ntk_ray

    monkeypatch.setenv("HOME", str(tmp_path))
    sel = ntk_ray.select(str(tiny_data / "domain.jsonl"), str(tiny_data / "pool.jsonl"), 3, out="~/apirun",
                         executor="local", model=str(tiny_model_dir), selector="random", max_length=32)
    assert sel.out == tmp_path / "apirun" and (tmp_path / "apirun" / "ranked.parquet").exists()
    assert not (Path.cwd() / "~").exists()
