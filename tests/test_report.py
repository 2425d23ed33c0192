"""The selection report (``ntk_ray.report``): its numbers against values computed here from a
synthetic output directory built with known answers, ``ntk-ray report OUT``, the report at the
end of a real ``select`` run, and the HTML rendered by a real headless Chromium."""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest

from ntk_ray import report as R
from ntk_ray.cli import main, print_summary

POOL, BUDGET, M, DOMAIN = 200, 20, 60, 8
READ_REJECTS = [("empty text", 5), ("duplicate id (first at pool.jsonl:3)", 3), ("12 tokens > --max-length 8", 2)]
COARSE_REJECTS, SCORE_REJECTS = 1, 2
EXACT_DUPES, NEAR_DUPES = 3, 2  # planted among the selected rows


def _words(rng, n):
    return [f"tok{int(i)}" for i in rng.integers(0, 100_000, n)]


def synthetic_out(root: Path) -> dict:
    """A finished select output directory with known numbers: pool rows in pool.jsonl (two
    sources), rejects of every stage, M candidates, scores, planted duplicates among the
    selected rows, token shards, a warm-up history. Returns the expected values."""
    rng = np.random.default_rng(7)
    data, out = root / "data", root / "out"
    data.mkdir(parents=True)
    (out / "_work" / "tokens" / "pool").mkdir(parents=True)
    (out / "_work" / "tokens" / "domain").mkdir(parents=True)
    texts = [" ".join(_words(rng, 30)) for _ in range(POOL)]
    ids = [f"p{i}" for i in range(POOL)]
    n_read_rejects = sum(n for _, n in READ_REJECTS)
    order = rng.permutation(POOL)  # pool row index in rank order, rejects first
    read_rej = order[:n_read_rejects]
    coarse_rej = order[n_read_rejects:n_read_rejects + COARSE_REJECTS]
    rest = order[n_read_rejects + COARSE_REJECTS:]
    candidates, cut_rows = rest[:M], rest[M:]
    score_rej, scored = candidates[:SCORE_REJECTS], candidates[SCORE_REJECTS:]
    # planted duplicates: selected rank r copies (exact, after normalisation) or edits (last
    # word: J = 27/29 of the 3-shingles) the text of an earlier selected row
    sel_rows = scored[:BUDGET]
    for k in range(EXACT_DUPES):
        texts[sel_rows[10 + k]] = texts[sel_rows[k]].upper().replace(" ", " ,  ") + "!"
    for k in range(NEAR_DUPES):
        w = texts[sel_rows[5 + k]].split()
        texts[sel_rows[15 + k]] = " ".join(w[:-1] + ["changed"])
    sources = [str(data / ("a.jsonl" if i < POOL // 2 else "b.jsonl")) for i in range(POOL)]
    for name, rows in (("a.jsonl", range(POOL // 2)), ("b.jsonl", range(POOL // 2, POOL))):
        (data / name).write_text("".join(json.dumps({"id": ids[i], "text": texts[i]}) + "\n" for i in rows))
    file_row = [i if i < POOL // 2 else i - POOL // 2 for i in range(POOL)]
    scores = np.sort(rng.normal(0.3, 0.1, scored.size))[::-1]
    ranked_rows = list(scored) + list(cut_rows)
    ranked = pl.DataFrame({
        "id": [ids[i] for i in ranked_rows], "rank": np.arange(1, len(ranked_rows) + 1, dtype=np.int64),
        "stage": ["ntk"] * scored.size + ["coarse"] * cut_rows.size,
        "score": list(scores) + [None] * cut_rows.size,
        "coarse_votes": rng.integers(0, 5, len(ranked_rows)), "coarse_sim": rng.random(len(ranked_rows)),
        "selected": [r < BUDGET for r in range(len(ranked_rows))],
        "source": [sources[i] for i in ranked_rows], "row": [file_row[i] for i in ranked_rows]},
        schema_overrides={"score": pl.Float64})
    ranked.write_parquet(out / "ranked.parquet")
    sel = ranked.head(BUDGET)
    pl.DataFrame({"id": sel["id"], "text": [texts[i] for i in sel_rows], "rank": sel["rank"],
                  "score": sel["score"]}).write_parquet(out / "selected.parquet")
    reasons = [r for r, n in READ_REJECTS for _ in range(n)] + [R.NONFINITE_EMBEDDING] * COARSE_REJECTS \
        + ["non-finite gradient (NaN/inf)"] * SCORE_REJECTS
    rej_rows = list(read_rej) + list(coarse_rej) + list(score_rej)
    pl.DataFrame({"id": [ids[i] for i in rej_rows] + ["d-bad"], "source": [sources[i] for i in rej_rows] + ["d.jsonl"],
                  "row": [file_row[i] for i in rej_rows] + [0], "role": ["pool"] * len(rej_rows) + ["domain"],
                  "reason": reasons + ["empty text"]}).write_parquet(out / "rejects.parquet")
    n_tokens = rng.integers(5, 200, POOL)
    tokens = pl.DataFrame({"id": ids, "source": sources, "row": file_row, "n_tokens": n_tokens,
                           "input_ids": [[1] * 3 for _ in range(POOL)],
                           "reject": [("empty text" if i in set(read_rej[:5]) else None) for i in range(POOL)]})
    tokens.head(120).write_parquet(out / "_work/tokens/pool/00000.parquet")
    tokens.slice(120).write_parquet(out / "_work/tokens/pool/00001.parquet")
    domain_tokens = rng.integers(10, 50, DOMAIN)
    pl.DataFrame({"id": [f"d{i}" for i in range(DOMAIN)], "row": list(range(DOMAIN)), "n_tokens": domain_tokens,
                  "reject": [None] * DOMAIN}, schema_overrides={"reject": pl.String}) \
        .write_parquet(out / "_work/tokens/domain/00000.parquet")
    stage_seconds = {"read": 4.0, "validate": 0.5, "warmup": 30.0, "embed": 10.0, "coarse": 1.0, "features": 6.0,
                     "score": 0.4, "write": 0.6, "setup": 3.0}
    usable = POOL - n_read_rejects
    manifest = {"counts": {"pool_rows": POOL, "domain_rows": DOMAIN, "rejected": len(rej_rows), "ranked": ranked.height,
                           "selected": BUDGET, "domain_rejected": 0, "pool_usable": usable, "domain_usable": DOMAIN,
                           "pool_truncated": 0, "domain_truncated": 0},
                "config": {"budget": BUDGET, "text_column": "text", "warmup_epochs": 2.0, "model": "m"},
                "model": {"resolved": "/models/m"}, "selector": "ntk",
                "adapter": {"warmup": {"epoch_loss": [2.0, 1.5], "steps": 4, "seconds": 12.0}},
                "coarse": {"skipped": False, "M": M, "K": BUDGET}, "stage_seconds": stage_seconds}
    (out / "manifest.json").write_text(json.dumps(manifest))
    ranked_usable = [i for i in ranked_rows]
    return {"out": out, "usable": usable, "scores": scores, "manifest": manifest, "texts": [texts[i] for i in sel_rows],
            "selected_tokens": int(n_tokens[sel_rows].sum()), "domain_tokens": int(domain_tokens.sum()),
            "n_tokens_ranked": n_tokens[ranked_usable], "selected_flags": ranked["selected"].to_numpy()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    expected = synthetic_out(tmp_path_factory.mktemp("report"))
    return expected, R.build_report(expected["out"])


# -------------------------------------------------------------------------------------------
# the numbers, against values computed here
def jaccard_dupes(texts: list[str], threshold: float) -> int:
    """Rows a dedup drops: exact Jaccard of word 3-shingles of lower-cased alphanumeric words,
    every pair, clusters by connected components (the slow, obvious reference)."""
    sets = []
    for t in texts:
        w = re.findall(r"[a-z0-9]+", t.lower())
        sets.append({" ".join(w[i:i + 3]) for i in range(max(1, len(w) - 2))})
    n, seen, clusters = len(texts), set(), 0
    for start in range(n):
        if start in seen:
            continue
        clusters += 1
        stack = [start]
        seen.add(start)
        while stack:
            i = stack.pop()
            for j in range(n):
                if j not in seen and len(sets[i] & sets[j]) / len(sets[i] | sets[j]) >= threshold:
                    seen.add(j)
                    stack.append(j)
    return n - clusters


def test_funnel_cut_and_duplicates_match_the_planted_values(built):
    exp, rep = built
    fun = rep.data["funnel"]
    n_read = sum(n for _, n in READ_REJECTS)
    assert (fun["pool"], fun["usable"], fun["candidates"], fun["scored"], fun["selected"]) == \
        (POOL, POOL - n_read, M, M - SCORE_REJECTS, BUDGET)
    assert (fun["rejected_read"], fun["rejected_coarse"], fun["rejected_scoring"]) == (n_read, COARSE_REJECTS, SCORE_REJECTS)
    assert dict(fun["reasons"]) == {"empty text": 5, "duplicate id": 3, "N tokens > --max-length 8": 2,
                                    R.NONFINITE_EMBEDDING: 1, "non-finite gradient (NaN/inf)": 2}  # no domain reject
    s = exp["scores"]
    margin = s[BUDGET - 1] - s[BUDGET]
    ct = rep.data["cut"]
    assert ct["margin"] == pytest.approx(margin)
    assert ct["margin_vs_spread"] == pytest.approx(margin / (np.percentile(s, 95) - np.percentile(s, 5)))
    assert ct["margin_vs_sd"] == pytest.approx(margin / s.std())
    dup = rep.data["duplicates"]
    planted = jaccard_dupes(exp["texts"], R.NEAR_DUP_JACCARD)
    assert planted == EXACT_DUPES + NEAR_DUPES  # the reference sees what was planted
    assert (dup["exact"], dup["near"]) == (EXACT_DUPES, EXACT_DUPES + NEAR_DUPES)
    md = Path(rep.md).read_text()
    share = 100 * (EXACT_DUPES + NEAR_DUPES) / BUDGET
    assert f"Near-duplicate share among the {BUDGET} selected rows: **{share:.1f}%**" in md
    assert f"| coarse candidates | {M} |" in md and f"| scored | {M - SCORE_REJECTS} |" in md
    assert f"| selected | {BUDGET} |" in md and f"| usable | {POOL - n_read} |" in md
    assert f"margin at the cut: {margin:.3g} (score {s[BUDGET - 1]:.4g} at rank {BUDGET}" in md
    assert rep.key_lines[0] == f"selected {BUDGET} of {POOL - n_read} usable pool rows ({POOL} read, " \
                               f"{n_read + COARSE_REJECTS + SCORE_REJECTS} rejected)"


def test_composition_examples_and_cost_match_the_inputs(built):
    exp, rep = built
    src = rep.data["source"]
    ranked = pl.read_parquet(exp["out"] / "ranked.parquet")
    a = ranked.filter(pl.col("source").str.ends_with("a.jsonl"))
    i = src["labels"].index("a.jsonl")
    assert src["pool"][i] == a.height and src["selected"][i] == int(a["selected"].sum())
    assert src["pool_share"][i] == pytest.approx(a.height / ranked.height)
    length = rep.data["length"]
    assert sum(length["pool"]) == ranked.height and sum(length["selected"]) == BUDGET
    assert length["selected_tokens"] == exp["selected_tokens"]
    assert length["pool_mean"] == pytest.approx(exp["n_tokens_ranked"].mean())
    ex = rep.data["examples"]
    assert [r["rank"] for r in ex["top"]] == [1, 2, 3]
    assert [r["rank"] for r in ex["above the cut"]] == [BUDGET - 2, BUDGET - 1, BUDGET]
    below = ex["below the cut"]
    assert [r["rank"] for r in below] == [BUDGET + 1, BUDGET + 2, BUDGET + 3]
    sources = dict(zip(ranked["rank"].to_list(), zip(ranked["source"].to_list(), ranked["row"].to_list())))
    for r in below:  # read back from the input files, truncated
        path, row = sources[r["rank"]]
        text = json.loads(Path(path).read_text().splitlines()[row])["text"]
        assert r["text"] == (text if len(text) <= R.TEXT_CHARS else text[: R.TEXT_CHARS - 1] + "…")
    cost = rep.data["cost"]
    by = {s["stage"]: s for s in cost["stages"]}
    secs = exp["manifest"]["stage_seconds"]
    usable = exp["usable"]
    scale = 1_000_000 / POOL
    assert by["read"]["projected_seconds"] == pytest.approx(secs["read"] * (1_000_000 + DOMAIN) / (POOL + DOMAIN))
    assert by["embed"]["projected_seconds"] == pytest.approx(secs["embed"] * usable * scale / usable)
    cand = min(M, usable * scale)  # features and score: M candidates at any pool size above M
    assert by["features"]["projected_seconds"] == pytest.approx(secs["features"] * cand / (M - SCORE_REJECTS))
    assert by["warmup"]["projected_seconds"] == secs["warmup"] and by["setup"]["projected_seconds"] == secs["setup"]
    assert cost["projected_total_seconds"] == pytest.approx(sum(s["projected_seconds"] for s in cost["stages"]))
    ft = cost["finetune"]
    epoch = 12.0 / (exp["domain_tokens"] * 2.0) * exp["selected_tokens"]
    assert ft["method"] == "tokens" and ft["epoch"] == pytest.approx(epoch)
    assert ft["ratio"] == pytest.approx(sum(secs.values()) / epoch)
    assert ft["epoch_by_rows"] == pytest.approx(12.0 / (DOMAIN * 2.0) * BUDGET)


def test_minhash_estimates_jaccard_and_the_reason_matches_the_workers():
    from ntk_ray.stages.workers import NONFINITE_EMBEDDING

    assert R.NONFINITE_EMBEDDING == NONFINITE_EMBEDDING
    rng = np.random.default_rng(1)
    base = _words(rng, 60)
    for keep in (60, 50, 40, 20, 5):
        other = base[:keep] + _words(rng, 60 - keep)
        a, b = R.shingle_hashes(" ".join(base)), R.shingle_hashes(" ".join(other))
        exact = len(np.intersect1d(a, b)) / len(np.union1d(a, b))
        sig = R.minhash_signatures([a, b], chunk=64)  # chunking across rows: the same as one block
        assert np.array_equal(sig, R.minhash_signatures([a, b]))
        assert abs(np.mean(sig[0] == sig[1]) - exact) < 0.15, (keep, exact)


def test_report_cli_rebuilds_it_and_bad_dirs_are_one_line(built, tmp_path, capsys):
    exp, _ = built
    out = exp["out"]
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert (out / "report.html").is_file() and all((out / "report" / f"{p}.png").is_file() for p in R.PLOTS)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["report"]["key_lines"][0] in stdout and manifest["counts"] == exp["manifest"]["counts"]
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a finished ntk-ray select output" in err[0]


def test_a_failed_report_keeps_the_selection_and_says_how_to_build_it(built, monkeypatch, capsys):
    exp, _ = built
    out = exp["out"]

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(R, "build_report", broken)
    lines = []
    ctx = SimpleNamespace(out=out, progress=SimpleNamespace(log=lines.append))
    manifest = R.ReportStage().run(ctx, SimpleNamespace(manifest=exp["manifest"])).manifest
    assert manifest["report"] == {"error": "OSError: disk full"}
    assert json.loads((out / "manifest.json").read_text())["report"]["error"] == "OSError: disk full"
    assert lines and lines[0].startswith("warning: report: not built") and f"ntk-ray report {out}" in lines[0]
    print_summary(manifest | {"stage_seconds": {"read": 1.0}}, str(out))
    assert "report: not built (OSError: disk full); build it with `ntk-ray report OUT`" in capsys.readouterr().out


# -------------------------------------------------------------------------------------------
# the end of a real select run
def test_select_ends_with_the_report(tiny_model_dir, tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["select", "--domain", str(tiny_data / "domain.jsonl"), "--pool", str(tiny_data / "pool.jsonl"),
            "--budget", "4", "--out", str(out), "--model", str(tiny_model_dir), "--executor", "local",
            "--max-length", "32", "--proj-dim", "64", "--coarse-factor", "2", "--warmup-epochs", "1"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    rep = manifest["report"]
    assert (out / rep["html"]).is_file() and (out / rep["md"]).is_file()
    assert [(out / p).read_bytes()[:8] for p in rep["plots"]] == [b"\x89PNG\r\n\x1a\n"] * len(R.PLOTS)
    tail = stdout.strip().splitlines()[-4:]  # the summary ends with the report's path and its key lines
    assert tail[0].strip() == f"report: {out}/report.html" and [t.strip() for t in tail[1:]] == rep["key_lines"]
    assert rep["key_lines"][0].startswith(f"selected 4 of {manifest['counts']['pool_usable']} usable pool rows")
    md = (out / "report.md").read_text()
    assert "![Funnel](report/funnel.png)" in md and "Token lengths (of 30 ranked rows)" in md
    # a finished run whose report is missing (killed while building it): the rerun builds it
    # and recomputes nothing else
    (out / "report.html").unlink()
    (out / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "report"}))
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "already complete" in err and "report: " in err and (out / "report.html").is_file()
    assert "report" in json.loads((out / "manifest.json").read_text())


# -------------------------------------------------------------------------------------------
# a real browser
def chromium() -> str:
    """Debian's Chromium, installed here when missing (as CI does: the test runs as root)."""
    exe = shutil.which("chromium")
    if exe is None:
        subprocess.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
                       "--no-install-recommends chromium", shell=True, check=True, timeout=1200)
        exe = shutil.which("chromium")
    assert exe, "chromium is not installed and apt-get could not install it"
    return exe


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_the_html_renders_with_its_plots_in_headless_chromium(built, tmp_path):
    from PIL import Image

    _, rep = built
    page = Path(rep.html).read_text()
    assert "<script" not in page and not re.search(r"""(src|href)=["']?(https?:|//)""", page)  # self-contained
    embedded = {m[0]: base64.b64decode(m[1]) for m in
                re.findall(r'<img id="plot-(\w+)"[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)}
    assert sorted(embedded) == sorted(R.PLOTS)
    exe = chromium()
    flags = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    # the DOM after load, from a copy with a probe script: every image decoded at its PNG size
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", "<script>window.addEventListener('load', () => document.body.setAttribute("
                                  "'data-images', JSON.stringify([...document.images].map(i => [i.id, i.complete, "
                                  "i.naturalWidth, i.naturalHeight]))));</script></body>"))
    dom = subprocess.run([*flags, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    found = re.search(r"data-images=\"([^\"]*)\"", dom)
    assert found, dom[:500]
    images = json.loads(found.group(1).replace("&quot;", '"'))
    assert {i[0]: (i[1], i[2], i[3]) for i in images} == {f"plot-{k}": (True, *png_size(v)) for k, v in embedded.items()}
    # a screenshot of the report itself: not blank, and the plots' selection colour is on it
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, "--window-size=1200,3000", f"--screenshot={shot}", Path(rep.html).as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    assert pixels.std() > 20
    orange = np.abs(pixels - [0xD9, 0x5F, 0x02]).sum(axis=1) < 30  # R.SELECTED_COLOR, used by no CSS rule
    assert orange.sum() > 500, orange.sum()
