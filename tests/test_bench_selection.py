"""The selection benchmark (benchmarks/bench_selection.py) end to end at smoke size: one domain,
one seed, tiny sizes, the real demo model. Checks that every condition gets a table row with
finite numbers, that the selections are the product's jobs (each selector's run directory, its
ranked.parquet), that the plot is a PNG, and that a rerun resumes from the cache."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_selection", ROOT / "benchmarks" / "bench_selection.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_selection"] = module
    spec.loader.exec_module(module)
    return module


def _number(cell: str) -> float:
    """The leading number of a table cell like '2.3456 ± 0.0000' or '+0.012 ± 0.000'."""
    m = re.match(r"\s*([+-]?\d+(?:\.\d+)?)", cell)
    assert m, f"no number in table cell {cell!r}"
    return float(m.group(1))


def _rows(md: str) -> dict[str, list[str]]:
    """condition -> cells of its row in the main table (first domain only; the smoke run has one)."""
    out = {}
    for line in md.splitlines():
        if not line.startswith("| ") or line.startswith("| domain") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 10 and not cells[0].startswith("**"):
            out[cells[1]] = cells
    return out


@pytest.mark.demo
def test_smoke_run_writes_a_complete_table_and_plot(tmp_path, capsys):
    bench = _load_bench()
    out, cache = tmp_path / "out", tmp_path / "cache.jsonl"
    # the suite runs one test at a time, so the benchmark may use two cores (its default of one
    # thread is for a machine shared with other work); --threads is not part of the results' fingerprint
    threads = ["--threads", str(min(2, os.cpu_count() or 1))]
    assert bench.main(["--smoke", "--out", str(out), "--cache", str(cache), *threads]) == 0
    assert (out / "work").is_dir(), "--smoke puts the jobs under <out>/work"

    md = (out / "selection.md").read_text()
    assert "bench_selection.py --smoke" in md.split("```")[1], "the regenerating command is at the top"
    rows = _rows(md)
    for cond in bench.CONDITIONS + ["base model (no fine-tune)"]:
        assert cond in rows, f"no table row for {cond}"
        cells = rows[cond]
        loss, acc = _number(cells[2]), _number(cells[4])
        assert math.isfinite(loss) and 0 < loss < 20, (cond, cells)
        assert 0 <= acc <= 1, (cond, cells)
        if cond in bench.SELECTORS:
            assert math.isfinite(_number(cells[3])) and math.isfinite(_number(cells[5])), (cond, cells)
            assert _number(cells[6]) >= 0 and _number(cells[7]) >= 0, (cond, cells)
    assert "1 of 1 cells" in md

    png = (out / "selection.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    # every selector picked exactly N distinct pool rows; every condition trained on domain + N rows
    records = [json.loads(line) for line in cache.read_text().splitlines()]
    n, n_domain = bench.SMOKE["budget"], bench.SMOKE["n_domain"]
    sel = {r["condition"]: r for r in records if r["kind"] == "selection"}
    assert set(sel) == set(bench.SELECTORS)
    for name, r in sel.items():
        assert len(r["ids"]) == len(set(r["ids"])) == n, name
        assert 0 <= r["label_share"] <= 1
    res = {r["condition"]: r for r in records if r["kind"] == "result"}
    assert set(res) == set(bench.CONDITIONS)
    assert res["domain-only"]["train_rows"] == n_domain
    assert all(res[c]["train_rows"] == n_domain + n for c in bench.SELECTORS)
    assert all(r["mc_skipped"] == 0 and r["mc_items"] > 0 for r in res.values())
    # the fine-tunes differ by their data only, and the data must reach them
    assert len({round(r["loss"], 6) for r in res.values()}) > 1, "every condition gave the same loss"

    # the selections are the product's: each one is a select (ntk-mean: score) job whose
    # ranked.parquet holds exactly the ids the fine-tune used
    import polars as pl

    for name, r in sel.items():
        run = ROOT / r["run"]  # relative to the repository, or absolute
        manifest = json.loads((run / "manifest.json").read_text())
        ranked = pl.read_parquet(run / "ranked.parquet")
        assert ranked.filter(pl.col("selected")).sort("rank")["id"].to_list() == r["ids"], name
        if name == "ntk-mean":
            assert manifest["config"]["scorer"] == "mean" and Path(manifest["config"]["features"]).resolve().parents[1] == (ROOT / sel["ntk"]["run"]).resolve()
        else:
            assert manifest["selector"] == name and set(ranked["stage"].unique()) <= {name, "coarse"}, name
    assert "coarse" in set(pl.read_parquet(ROOT / sel["ntk"]["run"] / "ranked.parquet")["stage"])  # the kNN stage ran
    assert {"warmup", "embed", "coarse", "features", "score"} <= set(sel["ntk"]["parts"])

    # a rerun resumes from the cache: no model is loaded, nothing is recomputed
    capsys.readouterr()
    lines_before = len(cache.read_text().splitlines())
    assert bench.main(["--smoke", "--out", str(out), "--cache", str(cache), *threads]) == 0
    assert "cached" in capsys.readouterr().out
    assert len(cache.read_text().splitlines()) == lines_before
