"""Smoke tests of every benchmark and script at the tiniest size that still runs each code path,
plus static checks: their ntk_ray imports exist, and the benchmarks that claim to measure the
product do not import the in-memory references (``ntk_ray.reference``).

bench_selection.py has its own smoke test (tests/test_bench_selection.py), paper_checks.py too
(tests/test_paper_checks.py)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ENV = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", TOKENIZERS_PARALLELISM="false",
           OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))

# every script and benchmark, and the test that runs it at smoke size
SMOKE_TESTS = {
    "benchmarks/bench_selection.py": "tests/test_bench_selection.py::test_smoke_run_writes_a_complete_table_and_plot",
    "benchmarks/paper_checks.py": "tests/test_paper_checks.py::test_smoke_all_sections_tiny_model",
    "benchmarks/bench_features.py": "tests/test_scripts.py::test_bench_features_smoke",
    "benchmarks/bench_scale.py": "tests/test_scripts.py::test_bench_scale_smoke",
    "benchmarks/bench_features_gpu.sh": "tests/test_scripts.py::test_bench_features_gpu_sh_is_valid",
    "benchmarks/bench_coarse.py": "tests/test_scripts.py::test_bench_coarse_smoke",
    "benchmarks/gpu_check.sh": "tests/test_scripts.py::test_gpu_check_sh_smoke",
    "benchmarks/bench_read.py": "tests/test_scripts.py::test_bench_read_smoke",
    "benchmarks/bench_report.py": "tests/test_scripts.py::test_bench_report_smoke",
    "scripts/demo_lifts.py": "tests/test_scripts.py::test_demo_lifts_smoke",
    "scripts/build_demo_corpus.py": "tests/test_scripts.py::test_build_demo_corpus_smoke",
    "scripts/check_claims.py": "tests/test_claims.py::test_every_number_in_the_readmes_is_backed",
}
PRODUCT_BENCHMARKS = ["benchmarks/bench_selection.py", "scripts/demo_lifts.py"]


def _entry_points() -> list[str]:
    files = sorted(str(p.relative_to(ROOT)) for d in ("benchmarks", "scripts") for p in (ROOT / d).glob("*.py"))
    files += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks").glob("*.sh"))
    return [f for f in files if not Path(f).name.startswith("_")]


def test_every_script_and_benchmark_has_a_smoke_test():
    assert sorted(SMOKE_TESTS) == sorted(_entry_points()), "a script without a smoke test (or a test for a removed one)"
    for target in SMOKE_TESTS.values():
        path, name = target.split("::")
        assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), target


def _ntk_imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every ``import ntk_ray...`` / ``from ntk_ray... import ...`` anywhere in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.split(".")[0] == "ntk_ray"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ntk_ray" and not node.level:
            out.append((node.module, [a.name for a in node.names]))
    return out


@pytest.mark.parametrize("script", [f for f in _entry_points() if f.endswith(".py")])
def test_ntk_ray_imports_exist(script):
    """Catches imports of removed modules (ntk_ray.pipeline, ntk_ray.sharded, ...) and names."""
    for module, names in _ntk_imports(ROOT / script):
        mod = importlib.import_module(module)
        for name in names:
            assert hasattr(mod, name) or importlib.util.find_spec(f"{module}.{name}") is not None, \
                f"{script}: from {module} import {name}: no such name"


@pytest.mark.parametrize("script", PRODUCT_BENCHMARKS)
def test_product_benchmarks_do_not_use_the_references(script):
    for module, names in _ntk_imports(ROOT / script):
        assert not module.startswith("ntk_ray.reference"), f"{script} imports {module}"
        assert not (module == "ntk_ray" and "reference" in names), f"{script} imports ntk_ray.reference"
    # and they run the jobs
    text = (ROOT / script).read_text()
    assert "run_select(" in text and "run_score(" in text and "LocalExecutor" in text


def _run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    run = subprocess.run([PY, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run


# ---------------------------------------------------------------------------------------------
@pytest.mark.demo
def test_demo_lifts_smoke(tmp_path, tiny_model_dir):
    """Every job of demo_lifts at the least size with a coarse stage (12 pool rows > M = 8)."""
    from ntk_ray.config import SelectConfig
    from ntk_ray.core.scoring import SCORERS

    out = tmp_path / "lifts"
    _run(["scripts/demo_lifts.py", "--domains", "noun.food", "--out", str(out), "--n-domain", "4", "--n-eval", "0",
          "--n-pool", "12", "--budget", "2", "--max-length", "48", "--proj-dim", "256", "--threads", "1",
          "--model", str(tiny_model_dir)])
    lines = (out / "lifts.md").read_text().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == (["domain", "pool share", "select seconds"] + [f"ntk {s}" for s in SCORERS]
                      + ["embedding votes", "random", "bm25", "embedding"])
    row = [c.strip() for c in lines[2].strip("|").split("|")]
    assert len(lines) == 3 and row[0] == "noun.food"
    assert all(math.isfinite(float(v)) and float(v) >= 0 for v in row[3:]), row
    base = out / "noun.food"

    def ids(run):
        ranked = pl.read_parquet(base / run / "ranked.parquet")
        return ranked.filter(pl.col("selected")).sort("rank")["id"].to_list()

    # the score job with select's default scorer, on select's kept features, picks what select picked
    assert ids(f"score-{SelectConfig().scorer}") == ids("select")
    for selector in ("random", "bm25", "embedding"):
        manifest = json.loads((base / selector / "manifest.json").read_text())
        assert manifest["selector"] == selector and len(ids(selector)) == 2
    assert (base / "select" / "_work" / "anchor_features").is_dir()


@pytest.mark.demo
def test_bench_features_smoke(tmp_path, tiny_model_dir):
    """Every row of the feature benchmark (LESS-style, dense, CLI, scoring, projection error), on
    the tiny model (the rows' code, not their numbers; the demo model took 53 s of CI here)."""
    report = tmp_path / "features.md"
    _run(["benchmarks/bench_features.py", "--model", str(tiny_model_dir), "--cli-executor", "local", "--samples", "4", "--less-samples", "2", "--dense-samples", "2", "--anchors", "2",
          "--dim", "64", "--max-length", "64", "--max-tokens", "512", "--error-samples", "2", "--error-dims", "32,64",
          "--error-seeds", "1", "--pool-rows", "200", "--score-anchors", "4", "--topk", "10", "--repeats", "1",
          "--threads", "1", "--out", str(report)])
    md = report.read_text()
    for row in ("LESS-style", "dense", "sketch", "JVP", "whole process", "`ntk-ray features` CLI", "Projection error"):
        assert row in md, row
    assert "no ntk-ray executable" not in md and "exited" not in md


def test_bench_features_random_arch_smoke(tmp_path):
    """The --random-arch --bf16 path that bench_features_gpu.sh and gpu_check.sh run (bf16 weights,
    as --dtype bfloat16), on CPU with a tiny architecture."""
    report = tmp_path / "features.md"
    _run(["benchmarks/bench_features.py", "--random-arch", "--arch-hidden", "32", "--arch-layers", "2",
          "--arch-intermediate", "64", "--arch-heads", "4", "--arch-kv-heads", "2", "--arch-vocab", "128",
          "--samples", "4", "--less-samples", "2", "--dense-samples", "2", "--anchors", "2", "--dim", "64",
          "--max-length", "32", "--max-tokens", "256", "--pool-rows", "200", "--score-anchors", "4", "--topk", "10",
          "--repeats", "1", "--threads", "1", "--skip", "error", "--bf16", "--out", str(report)])
    md = report.read_text()
    assert "LESS-style" in md and "random" in md.lower() and "bf16 weights" in md


def test_bench_features_gpu_sh_is_valid():
    script = ROOT / "benchmarks" / "bench_features_gpu.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    called = set(re.findall(r"(benchmarks/\w+\.py)", text))
    assert called == {"benchmarks/bench_features.py"}
    for path in called:
        assert (ROOT / path).is_file(), path
    # every flag it passes exists in the benchmark's parser
    help_text = _run(["benchmarks/bench_features.py", "--help"], timeout=120).stdout
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", "\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith("#") and "nvidia-smi" not in line)))
    flags -= {"--no-deps"}
    assert flags, "no flags found"
    for flag in flags:
        assert flag in help_text, f"bench_features_gpu.sh passes {flag}, which bench_features.py does not have"


def test_bench_coarse_smoke(tiny_model_dir, tmp_path):
    """The speed rows of bench_coarse (floors and every Embedder option) on the tiny model and
    random-token rows; the demo rows, the template accounting and the quality columns run in
    the gpu_check smoke and in the benchmark itself."""
    report = tmp_path / "coarse.md"
    run = _run(["benchmarks/bench_coarse.py", "--model", str(tiny_model_dir), "--synthetic", "24", "--max-length", "16",
                "--repeats", "1", "--layers", "1", "--max-tokens", "4", "--threads", "1", "--out", str(report)])
    md = report.read_text()
    for row in ("floor: backbone", "floor: model()", "Embedder (default", "--embed-layer 1", "--embed-max-tokens 4",
                "padding:", "Embedder / floor"):
        assert row in md, row
    assert json.loads(run.stdout.strip().splitlines()[-1])["ratio"] > 0
    # --project: the paper's setting from the committed results files, every stage and the total
    projection = tmp_path / "projection.md"
    _run(["benchmarks/bench_coarse.py", "--project", "--project-out", str(projection), "--gpus", "4"])
    md = projection.read_text()
    for row in ("read + tokenize", "warm-up", "embed (coarse forward)", "coarse kNN votes", "features", "**total**"):
        assert row in md, row
    assert "G = 4 GPUs" in md and "no GPU number is measured" in md


def test_gpu_check_sh_smoke(tmp_path):
    """gpu_check.sh: valid bash; every flag it passes to a benchmark exists; and ``--smoke --parts
    setup`` (the tiny models and rows on the CPU) runs through the script's own machinery (each part
    is the script again under ``timeout``, its summary rewritten after every part). The whole
    ``--smoke`` (every part, tiny, on the CPU: about 8 ntk-ray processes) takes minutes on a 2-core
    machine, too long for CI: run it by hand, ``bash benchmarks/gpu_check.sh --smoke``."""
    script = ROOT / "benchmarks" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for bench in ("bench_features.py", "bench_coarse.py"):
        assert f"benchmarks/{bench}" in text
    help_text = {b: _run([f"benchmarks/{b}", "--help"], timeout=120).stdout for b in ("bench_features.py", "bench_coarse.py")}
    for name, bench in (("FEATURES_ARGS", "bench_features.py"), ("COARSE_ARGS", "bench_coarse.py")):
        for block in re.findall(rf"{name}=\((.*?)\)", text, re.DOTALL):
            for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", block):
                assert flag in help_text[bench], f"gpu_check.sh passes {flag} to {bench}, which does not have it"
    results = tmp_path / "results"
    run = subprocess.run(["bash", str(script), "--smoke", "--parts", "setup", "--results", str(results)], cwd=ROOT,
                         capture_output=True, check=False, text=True, timeout=600, env=dict(ENV, TMPDIR=str(tmp_path)))
    summary = (results / "gpu_check.md").read_text()
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}\n{summary}"
    assert re.search(r"^\| setup \| ok \| \d+ \| `\{\"domain\": 8, \"pool\": 200", summary, re.MULTILINE), summary
    assert "precision" not in summary.split("| part |")[1] and "total:" in run.stdout
    work = next(tmp_path.glob("gpu_check.*"))
    assert (work / "small" / "config.json").is_file() and (work / "big").resolve() == (work / "small").resolve()
    assert len((work / "bigrows" / "pool.jsonl").read_text().splitlines()) == 200
    bad = subprocess.run(["bash", str(script), "--no-such-flag"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "unknown argument --no-such-flag" in bad.stderr


def test_bench_scale_smoke(tmp_path):
    table = tmp_path / "scale.md"
    run = _run(["benchmarks/bench_scale.py", "--rows", "2000", "4000", "--anchors", "8", "--k", "10", "--emb-dim", "16",
                "--feat-dim", "16", "--shard-rows", "1000", "--object-store-mib", "128", "--max-ratio", "100",
                "--data-dir", str(tmp_path / "data"), "--results", str(table)])
    assert "PASS" in run.stdout
    md = table.read_text()
    assert "| 2,000 | 2 |" in md and "| 4,000 | 4 |" in md


def test_build_demo_corpus_smoke(tmp_path):
    """A made-up WordNet directory (the real one is a Debian package): full and subsampled builds."""
    spec = importlib.util.spec_from_file_location("build_demo_corpus", ROOT / "scripts" / "build_demo_corpus.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    wn = tmp_path / "wordnet"
    wn.mkdir()
    lex = {"noun": "13", "verb": "38", "adj": "00", "adv": "02"}
    for suffix in ("noun", "verb", "adj", "adv"):
        lines = ["  1 This software and database is being provided ..."]  # a header line
        for i in range(40):
            word = f"{suffix}_word{i}" + ("(a)" if suffix == "adj" else "")
            gloss = f'the {suffix} number {i}; "an example of {suffix} {i}"' if i % 2 else f"plain {suffix} gloss {i}"
            lines.append(f"{1000 + i:08d} {lex[suffix]} x 01 {word} 0 000 | {gloss}")
        (wn / f"data.{suffix}").write_text("\n".join(lines) + "\n")
    full = tmp_path / "full.parquet"
    assert build.main(["--wordnet-dir", str(wn), "--out", str(full)]) == 0
    df = pl.read_parquet(full)
    assert df.height == 160 and set(df["label"]) == {"noun.food", "verb.motion", "adj.all", "adv.all"}
    assert (df["text"] == df["prompt"] + "\n" + df["response"]).all()
    assert df.filter(pl.col("id") == "wn:v:00001001")["response"].item() == "the verb number 1\nExample: an example of verb 1"
    small = tmp_path / "small.parquet"
    assert build.main(["--wordnet-dir", str(wn), "--out", str(small), "--max-bytes", str(int(full.stat().st_size * 0.8)),
                       "--min-per-label", "5"]) == 0
    sub = pl.read_parquet(small)
    assert 20 <= sub.height < 160 and set(sub["label"]) == set(df["label"])
    assert build.main(["--wordnet-dir", str(tmp_path / "missing"), "--out", str(small)]) == 2


def test_bench_report_smoke(tmp_path):
    """bench_report at a tiny size: a synthetic output directory, one report build in a fresh process."""
    results = tmp_path / "report.md"
    _run(["benchmarks/bench_report.py", "--rows", "2000", "--budget", "20", "--repeats", "1", "--dir",
          str(tmp_path / "data"), "--results", str(results)])
    md = results.read_text()
    assert "peak RSS" in md and "selected 20 of" in md, md[:2000]


def test_bench_read_smoke(tmp_path):
    """bench_read at a tiny size: one JSONL file, the floor beside the read stage with one actor."""
    out = tmp_path / "read.md"
    _run(["benchmarks/bench_read.py", "--rows", "3000", "--actors", "1", "--formats", "jsonl", "--dir",
          str(tmp_path / "data"), "--out", str(out)])
    md = out.read_text()
    assert "floor" in md and "read stage, 1 actor" in md, md[:2000]
