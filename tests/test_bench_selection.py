"""The decision benchmark (benchmarks/bench_selection.py) end to end at smoke size: one domain,
one seed, tiny sizes, the real demo model. Checks that every main condition and the smoke's
ablations get a table row with finite numbers, that the selections are the product's jobs (each
condition's run directory and ranked.parquet), that the reuse is real (scorer variants score the
ntk job's kept features; variants with ntk's warm-up settings take its adapter), that the plot is
a PNG, and that a rerun resumes from the cache. The statistics are tested in test_bench_decide.py."""

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
    """The leading number of a table cell like '2.3456 ± 0.0000' or '+0.012 [...]'."""
    m = re.match(r"\s*([+-]?\d+(?:\.\d+)?)", cell)
    assert m, f"no number in table cell {cell!r}"
    return float(m.group(1))


def _table(md: str, heading: str) -> dict[str, list[str]]:
    """condition -> cells of its row in the table under the heading that starts with ``heading``."""
    section = md.split("## " + heading, 1)[1].split("\n## ", 1)[0]
    out = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("| condition") and not line.startswith("| ntk − |"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            out[cells[0]] = cells
    return out


@pytest.mark.demo
def test_smoke_run_writes_a_complete_table_and_plot(tiny_model_dir, tmp_path, capsys):
    """The whole harness at smoke size on the tiny random Llama of conftest (the demo model made
    this the slowest test of the suite; the harness, not the numbers, is what it checks)."""
    bench = _load_bench()
    out, cache = tmp_path / "out", tmp_path / "cache.jsonl"
    # the suite runs one test at a time, so the benchmark may use two cores (its default of one
    # thread is for a machine shared with other work); --threads is not part of the fingerprints
    threads = ["--threads", str(min(2, os.cpu_count() or 1))]
    assert bench.main(["--smoke", "--out", str(out), "--cache", str(cache), "--model", str(tiny_model_dir),
                       *threads]) == 0
    assert (out / "work").is_dir(), "--smoke puts the jobs under <out>/work"

    md = (out / "decide.md").read_text()
    assert "bench_selection.py --smoke" in md.split("```")[1], "the regenerating command is at the top"
    assert "**status: 3 of 3 cells done** (main 1 of 1, tokens 1 of 1, ablation 1 of 1)" in md
    main = _table(md, "Main conditions")
    for cond in bench.MAIN:
        cells = main[cond]
        loss = _number(cells[2])
        assert math.isfinite(loss) and 0 < loss < 20, (cond, cells)
        if cond != "domain-only":
            assert math.isfinite(_number(cells[3])) and _number(cells[4]) >= 0 and _number(cells[5]) > 0, (cond, cells)
    ablation = _table(md, "Ablations")
    for cond in ["ntk-max"]:
        assert math.isfinite(_number(ablation[cond][2])) and math.isfinite(_number(ablation[cond][3])), ablation[cond]
    pairs = _table(md, "ntk minus each baseline")
    assert set(pairs) == set(bench.BASELINES) and all(p[4].startswith("no call") for p in pairs.values()), \
        "one cell calls nothing"
    png = (out / "decide.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    # every selection picked exactly N distinct pool rows; every condition trained on domain + N rows
    records = [json.loads(line) for line in cache.read_text().splitlines()]
    n, n_domain = bench.SMOKE["budget"], bench.SMOKE["n_domain"]
    sel = {r["condition"]: r for r in records if r["kind"] == "selection"}
    selectors = [c for c in bench.MAIN if c != "domain-only"]
    refits = {a for a in bench.SMOKE["ablations"] if a.endswith("/fixed-steps")}  # others' selections, refitted
    assert set(sel) == set(selectors) | set(bench.SMOKE["ablations"]) - refits
    cut = sel.pop("ntk@bm25-tokens")
    for name, r in sel.items():
        assert len(r["ids"]) == len(set(r["ids"])) == n, name
        assert 0 <= r["label_share"] <= 1

    # every selection's token count, against a tokenization of each picked row on its own; the
    # equal-token cut is the shortest prefix of ntk's ranking that reaches bm25's count
    import polars as pl

    from ntk_ray.core.tokenize import tokenize_batch
    from ntk_ray.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    split = json.loads(next((out / "work").glob("*/noun.food-seed0/data/split.json")).read_text())
    pool = {r["id"]: r for r in pl.read_parquet(split["pool"]).to_dicts()}

    def tokens(ids):
        return sum(sum(tokenize_batch(tokenizer, prompts=[pool[i]["prompt"]], responses=[pool[i]["response"]],
                                      max_length=bench.SMOKE["max_length"]).loss_mask[0]) for i in ids)

    for name, r in [*sel.items(), ("ntk@bm25-tokens", cut)]:
        assert r["tokens"] == tokens(r["ids"]) > 0, name
    ntk_ranking = pl.read_parquet(ROOT / sel["ntk"]["run"] / "ranked.parquet").sort("rank")["id"].to_list()
    k = len(cut["ids"])
    assert cut["ids"] == ntk_ranking[:k] and cut["target_tokens"] == sel["bm25"]["tokens"]
    assert tokens(cut["ids"]) >= sel["bm25"]["tokens"] > tokens(cut["ids"][:-1])
    res = {r["condition"]: r for r in records if r["kind"] == "result"}
    assert set(res) == set(bench.MAIN) | set(bench.SMOKE["ablations"])
    assert res["domain-only"]["train_rows"] == n_domain
    assert res["ntk@bm25-tokens"]["train_rows"] == res["ntk@bm25-tokens/fixed-steps"]["train_rows"] == \
        n_domain + len(cut["ids"])
    assert all(r["train_rows"] == n_domain + n for c, r in res.items() if not c.startswith(("domain-only", "ntk@")))
    # the fixed-steps fine-tunes: the row budget's step count whatever the rows
    steps = -(-(n_domain + n) // 2)
    assert res["bm25"]["steps"] == res["bm25/fixed-steps"]["steps"] == steps
    assert res["ntk@bm25-tokens/fixed-steps"]["steps"] == steps
    assert res["ntk@bm25-tokens"]["steps"] == -(-(n_domain + len(cut["ids"])) // 2)
    assert len({round(r["loss"], 6) for r in res.values()}) > 1, "every condition gave the same loss"

    # the selections are the product's jobs, and the reuse is real
    ntk_run = (ROOT / sel["ntk"]["run"]).resolve()
    for name, r in sel.items():
        run = ROOT / r["run"]  # relative to the repository, or absolute
        manifest = json.loads((run / "manifest.json").read_text())
        ranked = pl.read_parquet(run / "ranked.parquet")
        assert ranked.filter(pl.col("selected")).sort("rank")["id"].to_list() == r["ids"], name
        if name in ("ntk-mean", "ntk-max"):  # score jobs on the ntk job's kept features
            assert manifest["config"]["scorer"] == name.removeprefix("ntk-")
            assert Path(manifest["config"]["features"]).resolve().parents[1] == ntk_run
        else:
            assert manifest["selector"] == bench.BY_NAME[name].select.get("selector", "ntk"), name
        if name == "embedding":  # ntk's warm-up settings: its adapter, not a second warm-up
            assert r["borrows"] == "ntk" and Path(manifest["config"]["adapter"]).resolve() == \
                ntk_run / "_work" / "warmup" / "adapter"
    assert "coarse" in set(pl.read_parquet(ntk_run / "ranked.parquet")["stage"])  # the kNN stage ran
    assert {"warmup", "embed", "coarse", "features", "score"} <= set(sel["ntk"]["parts"])

    # a rerun resumes from the cache: no model is loaded, nothing is recomputed
    capsys.readouterr()
    lines_before = len(cache.read_text().splitlines())
    assert bench.main(["--smoke", "--out", str(out), "--cache", str(cache), "--model", str(tiny_model_dir),
                       *threads]) == 0
    printed = capsys.readouterr().out
    assert "cached" in printed and "demo model loaded" not in printed
    assert len(cache.read_text().splitlines()) == lines_before

    # selections recorded before they carried a token count get one from --report-only (the
    # tokenizer, no job), the same number
    old = [json.loads(line) for line in cache.read_text().splitlines()]
    cache.write_text("".join(json.dumps({k: v for k, v in r.items() if not (k == "tokens" and
                                                                            r["condition"] == "bm25")}) + "\n"
                             for r in old))
    assert bench.main(["--smoke", "--report-only", "--out", str(out), "--cache", str(cache), "--model",
                       str(tiny_model_dir)]) == 0
    added = [json.loads(line) for line in cache.read_text().splitlines()][len(old):]
    assert [(r["kind"], r["condition"], r["tokens"]) for r in added] == [("tokens", "bm25", sel["bm25"]["tokens"])]
    assert bench.main(["--smoke", "--report-only", "--out", str(out), "--cache", str(cache), "--model",
                       str(tiny_model_dir)]) == 0
    assert len(cache.read_text().splitlines()) == len(old) + 1, "counted once"
