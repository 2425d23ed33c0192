"""The selection report: what was picked, how sure the cut is, and what it cost.

``build_report(OUT)`` reads a finished ``select`` output directory and writes, next to the
result files::

    OUT/report.html   one self-contained page (plots embedded as base64 PNG, inline CSS, no script)
    OUT/report.md     the same numbers and tables, linking the PNGs
    OUT/report/       funnel.png, scores.png, composition.png, cost.png

It reads files only (no Ray, no torch, no model) and only what it shows: ``manifest.json``;
of ``ranked.parquet`` the columns ``rank``, ``stage``, ``score``, ``selected``, ``source``
(and ``id``, ``row`` when the token lengths are joined), through Polars' lazy scans;
``rejects.parquet`` (``role``, ``reason``); ``selected.parquet`` (the N selected rows, for the
examples and the duplicate check); the ``n_tokens`` column of the token shards in
``OUT/_work/tokens/`` when they are there; and the three rows just below the cut from their
input files. ``benchmarks/bench_report.py`` measures it on a 1M-row output.

What it computes, and how:

* **Funnel**: pool rows read -> usable (after the read/validate rejects) -> coarse candidates
  (usable minus the rows cut by the coarse stage and the rows rejected there) -> scored (ranked
  with a kernel or baseline score) -> selected; every pool reject grouped by reason.
* **Cut**: the scores of the scored rows in rank order; the cut is rank N (the budget).
  ``margin = s(N) - s(N+1)``, also relative to the score spread: the 5th-95th percentile range
  and the standard deviation of the scored rows. Round-robin selectors rank by a picking order,
  not by score; the report says so when the scores are not non-increasing in rank.
* **Composition**: share of the usable pool vs share of the selection, by input file and by
  token length (bins at the pool's quintiles of ``n_tokens``).
* **Near-duplicates among the selected rows**: texts normalised (NFKC, lower case, every run of
  non-alphanumeric characters -> one space). Exact duplicates are equal normalised texts. Near
  duplicates: Jaccard similarity of the sets of word 3-shingles (a text of fewer than 3 words is
  one shingle) of at least ``NEAR_DUP_JACCARD`` = 0.8, estimated from a MinHash signature of
  ``MINHASH_PERMUTATIONS`` = 128 values (h_i(x) = (a_i * crc32(x) + b_i) mod p, p = 2^32 + 15);
  candidate pairs come from LSH banding (16 bands of 8 values: a pair at J = 0.8 is a candidate
  with probability 1 - (1 - 0.8^8)^16 = 0.9996), each candidate pair is kept when its estimated
  J >= 0.8. Pairs are merged into clusters (union-find); the **near-duplicate share** is the
  share of selected rows a dedup would drop: (rows - clusters) / rows.
* **Cost**: wall seconds and rows/s per stage (``manifest.json``: ``stage_seconds``, ``counts``);
  the time projected for a pool of 1M rows on the same resources, budget and domain set: stages
  over pool rows (read, validate, embed, coarse, write, and any stage this report does not know)
  scale with the pool, ``features`` and ``score`` with the candidates (min(M, usable pool) when
  the selector has a coarse cut of M rows, the usable pool otherwise), ``warmup`` and ``setup``
  are constant; and the ratio of the selection time to one fine-tuning epoch on the selection,
  estimated from the warm-up's measured training time (``adapter.warmup.seconds``) per domain
  token and epoch times the selected rows' tokens (per domain row and epoch times N when the
  token shards are gone).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import time
import unicodedata
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from ntk_ray.stages.base import Stage

#: the coarse stage's reject reason (``stages.workers.NONFINITE_EMBEDDING``; a test checks they agree)
NONFINITE_EMBEDDING = "non-finite embedding (NaN/inf)"
NEAR_DUP_JACCARD = 0.8
MINHASH_PERMUTATIONS = 128
LSH_BANDS = 16  # of MINHASH_PERMUTATIONS // LSH_BANDS = 8 values each
SHINGLE_WORDS = 3
MINHASH_PRIME = (1 << 32) + 15
PROJECTED_POOL = 1_000_000
SMALL_POOL = 10_000  # below this, the cost section warns that fixed costs dominate
EXAMPLES = 3  # rows shown at the top, just above and just below the cut
TEXT_CHARS = 240  # examples are cut to this many characters
PLOTS = ("funnel", "scores", "composition", "cost")

POOL_COLOR, SELECTED_COLOR, CUT_COLOR = "#8c8c8c", "#d95f02", "#1b7837"


class ReportError(ValueError):
    """An output directory the report cannot be built from (one line)."""


@dataclass
class Report:
    """What ``build_report`` wrote and the three lines the select summary prints."""
    html: str
    md: str
    plots: list[str]
    key_lines: list[str]
    seconds: float
    data: dict = field(default_factory=dict)  # every number shown, by section


# -------------------------------------------------------------------------------------------
# reading
def _manifest(out: Path) -> dict:
    path = out / "manifest.json"
    if not (out / "ranked.parquet").is_file() or not path.is_file():
        raise ReportError(f"{out}: no ranked.parquet and manifest.json here (not a finished ntk-ray select output)")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ReportError(f"{path}: cannot be read ({e})") from None


def _token_shards(out: Path, role: str) -> list[str]:
    d = out / "_work" / "tokens" / role
    return sorted(str(p) for p in d.glob("*.parquet")) if d.is_dir() else []


def _usable_tokens(files: list[str], columns: tuple[str, ...] = ("id",)) -> pl.LazyFrame:
    """``columns``, row and n_tokens of the rows the tokenizer accepted."""
    return (pl.scan_parquet(files).select(*columns, "row", "n_tokens", "reject")
            .filter(pl.col("reject").is_null()).drop("reject"))


def reason_kind(col: str = "reason") -> pl.Expr:
    """A reject reason without its per-row details ("duplicate id (first at f:3)" -> "duplicate
    id", "12 tokens > --max-length 8" -> "N tokens > --max-length 8")."""
    return (pl.col(col).str.replace(r" \(first at .*\)$", "").str.replace(r"^\d+ tokens >", "N tokens >"))


# -------------------------------------------------------------------------------------------
# the sections
def funnel(manifest: dict, ranked: pl.LazyFrame, rejects: pl.LazyFrame) -> dict:
    """pool -> usable -> candidates -> scored -> selected, and the pool rejects by reason."""
    c = manifest["counts"]
    by_stage = dict(ranked.group_by("stage").len().collect().iter_rows())
    cut = int(by_stage.get("coarse", 0))
    scored = int(sum(n for s, n in by_stage.items() if s != "coarse"))
    pool_rejects = rejects.filter(pl.col("role") == "pool")
    reasons = (pool_rejects.with_columns(reason_kind().alias("kind")).group_by("kind").len()
               .sort(["len", "kind"], descending=[True, False]).collect())
    coarse_rejected = int(pool_rejects.filter(pl.col("reason") == NONFINITE_EMBEDDING).select(pl.len()).collect().item())
    pool = int(c["pool_rows"])
    rejected = int(c["rejected"])
    usable = int(c.get("pool_usable", pool - rejected))
    candidates = usable - cut - coarse_rejected
    return {"pool": pool, "usable": usable, "candidates": candidates, "scored": scored,
            "selected": int(c["selected"]), "ranked": int(c["ranked"]), "cut_by_coarse": cut,
            "rejected": rejected, "rejected_read": pool - usable, "rejected_coarse": coarse_rejected,
            "rejected_scoring": candidates - scored,
            "reasons": [(k, int(n)) for k, n in reasons.iter_rows()]}


def cut(ranked: pl.LazyFrame, budget: int, n_ranked: int) -> dict:
    """Scores in rank order, the cut at rank ``budget`` and its margin (see the module doc).
    Reads the scored rows only (rank, score, selected): a row below the cut without a score
    was cut by the coarse stage."""
    df = ranked.select("rank", "score", "selected").filter(pl.col("score").is_not_null()).collect()
    if not df["rank"].is_sorted():
        df = df.sort("rank")
    rank = df["rank"].to_numpy()
    scores = df["score"].to_numpy().astype(np.float64)
    res = {"budget": budget, "n_scored": int(scores.size), "scores": scores, "selected_mask": df["selected"].to_numpy()}
    if not scores.size:
        return res | {"note": "no row has a score"}
    p5, p25, p50, p75, p95 = np.percentile(scores, [5, 25, 50, 75, 95])
    res |= {"min": float(scores.min()), "max": float(scores.max()), "p5": float(p5), "p25": float(p25),
            "median": float(p50), "p75": float(p75), "p95": float(p95), "sd": float(scores.std()),
            "monotone": bool(np.all(np.diff(scores) <= 0))}

    def at(r):
        i = np.searchsorted(rank, r)
        return float(scores[i]) if i < rank.size and rank[i] == r else None

    s_n, s_next = at(budget), at(budget + 1)
    res |= {"score_at_n": s_n, "score_after_n": s_next, "has_next": budget < n_ranked}
    if s_n is not None and s_next is not None:
        margin = s_n - s_next
        spread = res["p95"] - res["p5"]
        res |= {"margin": margin, "margin_vs_spread": margin / spread if spread > 0 else None,
                "margin_vs_sd": margin / res["sd"] if res["sd"] > 0 else None}
    return res


def _shares(pool: np.ndarray, sel: np.ndarray) -> tuple[list[float], list[float]]:
    return ((pool / max(pool.sum(), 1)).tolist(), (sel / max(sel.sum(), 1)).tolist())


def by_source(ranked: pl.LazyFrame, top: int = 8) -> dict:
    """Pool share (usable rows) vs selected share per input file; the smaller files as "other"."""
    df = (ranked.group_by("source").agg(pl.len().alias("pool"), pl.col("selected").sum().alias("selected"))
          .sort(["pool", "source"], descending=[True, False]).collect())
    names = [Path(str(s)).name or str(s) for s in df["source"].to_list()]
    pool, sel = df["pool"].to_numpy(), df["selected"].to_numpy()
    if len(names) > top:
        names = names[: top - 1] + [f"other ({len(names) - top + 1} files)"]
        pool = np.append(pool[: top - 1], pool[top - 1:].sum())
        sel = np.append(sel[: top - 1], sel[top - 1:].sum())
    pool_share, sel_share = _shares(pool, sel)
    return {"labels": names, "pool": pool.tolist(), "selected": sel.tolist(), "pool_share": pool_share,
            "selected_share": sel_share, "files": df.height}


def by_length(ranked: pl.LazyFrame, token_files: list[str]) -> dict | None:
    """Pool share vs selected share by token length (bins at the pool's quintiles); None
    without token shards."""
    if not token_files:
        return None
    from ntk_ray.io.fs import redact

    # joined on (input file, row): a file is read once, so the pair is unique, and the files
    # become small integers first (no million-string join); ranked.parquet names the files
    # redacted, the token shards by their real address
    files = ranked.select(pl.col("source").unique()).collect()["source"].to_list()
    code = {f: i for i, f in enumerate(files)}
    tokens = _usable_tokens(token_files, ("source",))
    token_files_seen = tokens.select(pl.col("source").unique()).collect()["source"].to_list()
    token_code = {f: code.get(redact(f), -1) for f in token_files_seen}
    left = ranked.select(pl.col("source").replace_strict(code, return_dtype=pl.Int32).alias("f"), "row", "selected")
    right = tokens.select(pl.col("source").replace_strict(token_code, return_dtype=pl.Int32).alias("f"), "row",
                          "n_tokens")
    df = left.join(right, on=["f", "row"], how="inner").select("n_tokens", "selected").collect()
    if df.height == 0:
        return None
    n = df["n_tokens"].to_numpy()
    sel = df["selected"].to_numpy()
    edges = np.unique(np.quantile(n, [0, 0.2, 0.4, 0.6, 0.8, 1.0]).round().astype(np.int64))
    if edges.size < 2:
        edges = np.array([edges[0], edges[0] + 1])
    bins = np.clip(np.searchsorted(edges, n, side="right") - 1, 0, edges.size - 2)
    pool_counts = np.bincount(bins, minlength=edges.size - 1)
    sel_counts = np.bincount(bins[sel], minlength=edges.size - 1)
    his = [edges[i + 1] - 1 if i < edges.size - 2 else edges[i + 1] for i in range(edges.size - 1)]  # last bin: closed
    labels = [f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in zip(edges[:-1], his)]
    pool_share, sel_share = _shares(pool_counts, sel_counts)
    return {"labels": labels, "pool": pool_counts.tolist(), "selected": sel_counts.tolist(),
            "pool_share": pool_share, "selected_share": sel_share, "matched": df.height,
            "pool_mean": float(n.mean()), "selected_mean": float(n[sel].mean()) if sel.any() else None,
            "pool_median": float(np.median(n)), "selected_median": float(np.median(n[sel])) if sel.any() else None,
            "selected_tokens": int(n[sel].sum())}


def row_text(record: dict, config: dict) -> str:
    """The text of one input row as the run read it: the text column, or prompt + response, or
    a chat's turns (``messages``/``conversations``: ``content``/``value``), else the first
    string column."""
    def get(name):
        v = record.get(name) if name else None
        return v if isinstance(v, str) else None

    text = get(config.get("text_column", "text"))
    if text is not None:
        return text
    prompt, response = get(config.get("prompt_column", "prompt")), get(config.get("response_column", "response"))
    if prompt is not None or response is not None:
        return f"{prompt or ''}\n{response or ''}".strip("\n")
    for name in (config.get("messages_column"), "messages", "conversations"):
        turns = record.get(name) if name else None
        if isinstance(turns, list):
            parts = []
            for t in turns:
                if isinstance(t, dict):
                    role = t.get("role", t.get("from", ""))
                    content = t.get("content", t.get("value", ""))
                    parts.append(f"{role}: {content}" if role else str(content))
            return "\n".join(parts)
    for k, v in record.items():
        if isinstance(v, str) and k not in ("id", "source"):
            return v
    return ""


def _one_line(text: str, chars: int = TEXT_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= chars else text[: chars - 1] + "…"


def examples(out: Path, ranked: pl.LazyFrame, config: dict, budget: int, n_ranked: int) -> dict:
    """Rows at the top, just above and just below the cut, with their (truncated) text: the
    selected ones from ``selected.parquet``, the ones below the cut read back from their input
    files (the ``source`` of ``ranked.parquet``; "text not available" when that cannot be read)."""
    groups = {"top": list(range(1, EXAMPLES + 1)),
              "above the cut": list(range(max(EXAMPLES + 1, budget - EXAMPLES + 1), budget + 1)),
              "below the cut": list(range(budget + 1, min(budget + EXAMPLES, n_ranked) + 1))}
    wanted = sorted({r for rs in groups.values() for r in rs if r <= n_ranked})
    meta = {r["rank"]: r for r in ranked.filter(pl.col("rank").is_in(wanted))
            .select("rank", "id", "stage", "score", "source", "row").collect().iter_rows(named=True)}
    sel = pl.scan_parquet(out / "selected.parquet")
    texts = {r["rank"]: row_text(r, config) for r in sel.filter(pl.col("rank").is_in(wanted)).collect().iter_rows(named=True)}
    missing = [r for r in wanted if r not in texts and r in meta]
    by_file: dict[str, list[int]] = {}
    for r in missing:
        by_file.setdefault(meta[r]["source"], []).append(r)
    for source, ranks in by_file.items():
        try:
            from ntk_ray.io.rows import read_original_rows

            rows = read_original_rows(source, [meta[r]["row"] for r in ranks]).to_pylist()
            for r, rec in zip(ranks, rows):
                texts[r] = row_text(rec, config)
        except Exception as e:  # noqa: BLE001 (a moved or credential-redacted input: the row is still listed)
            for r in ranks:
                texts[r] = f"(text not available: {type(e).__name__})"
    result = {}
    for name, ranks in groups.items():
        result[name] = [{"rank": r, "id": meta[r]["id"], "stage": meta[r]["stage"], "score": meta[r]["score"],
                         "text": _one_line(texts.get(r, ""))} for r in ranks if r in meta]
    return result


def normalise(text: str) -> str:
    """NFKC, lower case, every run of characters that are not letters or digits -> one space."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(re.sub(r"[\W_]+", " ", text).split())


def shingle_hashes(norm: str, k: int = SHINGLE_WORDS) -> np.ndarray:
    """crc32 of the distinct word k-shingles of a normalised text (one shingle if shorter)."""
    words = norm.split()
    grams = {" ".join(words[i:i + k]) for i in range(max(1, len(words) - k + 1))}
    return np.fromiter((zlib.crc32(g.encode()) for g in grams), dtype=np.uint64, count=len(grams))


def minhash_params(n: int = MINHASH_PERMUTATIONS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(1, 1 << 31, n, dtype=np.uint64), rng.integers(0, 1 << 32, n, dtype=np.uint64))


def minhash_signatures(shingles: list[np.ndarray], n: int = MINHASH_PERMUTATIONS, seed: int = 0,
                       chunk: int = 1 << 14) -> np.ndarray:
    """(rows, n) uint64: sig[i, j] = min over the shingles x of row i of (a_j * x + b_j) mod p.
    Vectorised over chunks of about ``chunk`` shingles (a (chunk, n) block at a time)."""
    a, b = minhash_params(n, seed)
    sig = np.full((len(shingles), n), np.iinfo(np.uint64).max, dtype=np.uint64)
    start = 0
    while start < len(shingles):
        stop, total = start, 0
        while stop < len(shingles) and (total == 0 or total + shingles[stop].size <= chunk):
            total += shingles[stop].size
            stop += 1
        block = np.concatenate(shingles[start:stop])
        lengths = np.array([s.size for s in shingles[start:stop]])
        values = block[:, None] * a[None, :]  # < 2^63: a < 2^31, x < 2^32
        values += b[None, :]
        values %= np.uint64(MINHASH_PRIME)
        sig[start:stop] = np.minimum.reduceat(values, np.concatenate([[0], np.cumsum(lengths)[:-1]]), axis=0)
        start = stop
    return sig


def near_duplicates(texts: list[str], threshold: float = NEAR_DUP_JACCARD, bands: int = LSH_BANDS) -> dict:
    """Exact (normalised) and near duplicates among ``texts`` (see the module doc); returns the
    counts, the share a dedup would drop, and a few example pairs (indices into ``texts``)."""
    n = len(texts)
    norms = [normalise(t) for t in texts]
    exact = n - len(set(norms))
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    pairs = []

    def union(i, j):
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
            if len(pairs) < 5:
                pairs.append((min(i, j), max(i, j)))

    if n:
        sig = minhash_signatures([shingle_hashes(t) for t in norms])
        rows = sig.shape[1] // bands
        for band in range(bands):
            block = np.ascontiguousarray(sig[:, band * rows:(band + 1) * rows])
            keys = block.view(np.dtype((np.void, block.dtype.itemsize * rows))).ravel()
            order = np.argsort(keys, kind="stable")
            sorted_keys = keys[order]
            starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
            ends = np.r_[starts[1:], n]
            for s, e in zip(starts, ends):
                if e - s < 2:
                    continue
                members = order[s:e]
                # all pairs of a small bucket; a large one (many copies) against its first member
                firsts = members if e - s <= 50 else members[:1]
                for x, i in enumerate(firsts):
                    for j in members[x + 1:]:
                        if find(i) != find(j) and np.mean(sig[i] == sig[j]) >= threshold:
                            union(int(i), int(j))
    clusters = len({find(i) for i in range(n)})
    dropped = n - clusters
    return {"rows": n, "exact": exact, "near": dropped, "share": dropped / n if n else 0.0,
            "exact_share": exact / n if n else 0.0, "threshold": threshold, "pairs": pairs}


def duplicates_of_selection(out: Path, config: dict) -> dict:
    sel = pl.read_parquet(out / "selected.parquet")
    texts = [row_text(r, config) for r in sel.iter_rows(named=True)]
    res = near_duplicates(texts)
    ranks = sel["rank"].to_list() if "rank" in sel.columns else list(range(1, len(texts) + 1))
    res["pairs"] = [{"ranks": (ranks[i], ranks[j]), "texts": (_one_line(texts[i], 120), _one_line(texts[j], 120))}
                    for i, j in res["pairs"]]
    return res


POOL_STAGES = ("read", "validate", "embed", "coarse", "write")
CANDIDATE_STAGES = ("features", "score")
FIXED_STAGES = ("warmup", "setup")


def cost(manifest: dict, fun: dict, length: dict | None, domain_tokens: int | None,
         pool_target: int = PROJECTED_POOL) -> dict:
    """Seconds and rows/s per stage, the projection to a ``pool_target``-row pool and the ratio
    to one fine-tuning epoch on the selection (see the module doc)."""
    c, secs = manifest["counts"], manifest.get("stage_seconds", {})
    selector = manifest.get("selector", "ntk")
    coarse = manifest.get("coarse") or {}
    m = coarse.get("M")
    pool, usable = fun["pool"], fun["usable"]
    domain = int(c.get("domain_rows", 0))
    scale = pool_target / max(pool, 1)
    usable_target = usable * scale
    cand_target = min(m, usable_target) if m else usable_target
    embed_ran = not (selector == "ntk" and coarse.get("skipped"))
    rows_now = {"read": pool + domain, "validate": pool + domain, "warmup": int(c.get("domain_usable", domain)),
                "embed": usable if embed_ran else 0, "coarse": usable if embed_ran or selector != "ntk" else 0,
                "features": fun["scored"], "score": fun["scored"], "write": fun["ranked"]}
    rows_target = {"read": pool_target + domain, "validate": pool_target + domain, "warmup": rows_now["warmup"],
                   "embed": usable_target, "coarse": usable_target, "features": cand_target, "score": cand_target,
                   "write": usable_target}
    stages, notes = [], []
    for name, s in secs.items():
        s = float(s)
        if name in FIXED_STAGES:
            kind, projected = "constant", s
            n_now = rows_now.get(name)
        elif name in CANDIDATE_STAGES:
            kind = "candidates (min(M, usable pool))" if m else "usable pool rows"
            n_now = rows_now[name]
            projected = s * rows_target[name] / n_now if n_now else None
        else:
            kind = "pool rows"
            n_now = rows_now.get(name, pool)
            target = rows_target.get(name, pool_target)
            projected = s * target / n_now if n_now else None
        if projected is None:  # the stage had nothing to do in this run (e.g. embed, coarse: pool <= M)
            fs = next((x for x in stages if x["stage"] == "features"), None)
            if name == "embed" and fs is None and "features" in secs and fun["scored"]:
                fs = {"rows_per_s": fun["scored"] / max(float(secs["features"]), 1e-9)}
            if name == "embed" and fs and fs.get("rows_per_s"):
                projected = rows_target[name] / fs["rows_per_s"]
                notes.append("embed did not run (the usable pool was no larger than M): projected at the features "
                             "stage's rows/s, an upper bound (features adds a backward pass)")
            else:
                projected = 0.0
                notes.append(f"{name} had no rows to process in this run: counted as 0 s in the projection (a lower bound)")
        stages.append({"stage": name, "seconds": s, "rows": n_now, "rows_per_s": (n_now / s) if n_now and s > 0 else None,
                       "scales_with": kind, "projected_seconds": projected})
    if pool < SMALL_POOL:
        notes.append(f"this run read {pool:,} pool rows: at that size much of a stage's time is fixed start-up cost "
                     f"(workers, model loading), which the linear projection scales too, so it overstates; "
                     f"project from a run of at least {SMALL_POOL:,} rows")
    total = sum(float(s) for s in secs.values())
    projected_total = sum(x["projected_seconds"] for x in stages)
    res = {"stages": stages, "total_seconds": total, "projected_pool": pool_target,
           "projected_total_seconds": projected_total, "notes": notes, "candidates_target": cand_target}
    res |= finetune_estimate(manifest, fun, length, domain_tokens, total, projected_total)
    return res


def finetune_estimate(manifest: dict, fun: dict, length: dict | None, domain_tokens: int | None,
                      total: float, projected_total: float) -> dict:
    """One fine-tuning epoch on the selection, from the warm-up's training seconds: per domain
    token and epoch x the selected rows' tokens, or per domain row and epoch x N."""
    adapter = manifest.get("adapter") or {}
    hist = adapter.get("warmup") or {}
    epochs = float((manifest.get("config") or {}).get("warmup_epochs") or 0)
    secs = hist.get("seconds")
    domain_rows = int(manifest["counts"].get("domain_usable", 0))
    if not secs or not epochs or not domain_rows:
        return {"finetune": None, "finetune_note": "not available: this run has no measured warm-up training "
                                                   "(a baseline selector, --adapter or --warmup fresh)"}
    per_row = secs / (domain_rows * epochs)
    est = {"warmup_seconds": secs, "warmup_epochs": epochs, "domain_rows": domain_rows,
           "seconds_per_row_epoch": per_row, "epoch_by_rows": per_row * fun["selected"]}
    if domain_tokens and length and length.get("selected_tokens"):
        per_token = secs / (domain_tokens * epochs)
        est |= {"domain_tokens": domain_tokens, "seconds_per_token_epoch": per_token,
                "selected_tokens": length["selected_tokens"], "epoch_by_tokens": per_token * length["selected_tokens"]}
        est["epoch"], est["method"] = est["epoch_by_tokens"], "tokens"
    else:
        est["epoch"], est["method"] = est["epoch_by_rows"], "rows"
    est["ratio"] = total / est["epoch"] if est["epoch"] > 0 else None
    est["ratio_projected"] = projected_total / est["epoch"] if est["epoch"] > 0 else None
    return {"finetune": est}


# -------------------------------------------------------------------------------------------
# plots (matplotlib, Agg)
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)  # laid out by tight_layout: no second draw for bbox_inches
    _pyplot().close(fig)
    return buf.getvalue()


def plot_funnel(fun: dict) -> bytes:
    plt = _pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.2), gridspec_kw={"width_ratios": [1.1, 1]})
    names = ["pool read", "usable", "coarse candidates", "scored", "selected"]
    values = [fun["pool"], fun["usable"], fun["candidates"], fun["scored"], fun["selected"]]
    y = np.arange(len(names))[::-1]
    ax.barh(y, values, color=[POOL_COLOR] * 4 + [SELECTED_COLOR])
    ax.set_yticks(y, names)
    if max(values) > 50 * max(min(values), 1):
        ax.set_xscale("log")
    for yi, v in zip(y, values):
        ax.text(v, yi, f" {v:,}", va="center", fontsize=9)
    ax.set_xlim(right=max(values) * (3 if ax.get_xscale() == "log" else 1.25))
    ax.set_title("funnel (rows)")
    reasons = fun["reasons"][:8]
    if reasons:
        labels = [_one_line(k, 40) for k, _ in reasons][::-1]
        counts = [n for _, n in reasons][::-1]
        bx.barh(range(len(counts)), counts, color=POOL_COLOR)
        bx.set_yticks(range(len(counts)), labels, fontsize=8)
        for i, v in enumerate(counts):
            bx.text(v, i, f" {v:,}", va="center", fontsize=8)
        bx.set_xlim(right=max(counts) * 1.3)
    else:
        bx.text(0.5, 0.5, "no pool row was rejected", ha="center", va="center", transform=bx.transAxes)
        bx.set_axis_off()
    bx.set_title("pool rejects by reason")
    fig.tight_layout()
    return _png(fig)


def plot_scores(ct: dict) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 3.4))
    scores, sel = ct["scores"], ct["selected_mask"]
    if scores.size:
        edges = np.histogram_bin_edges(scores, bins=60)
        # one patch per series (ax.stairs), not one per bin: the plot costs the same for 1M rows
        ax.stairs(np.histogram(scores[~sel], edges)[0], edges, fill=True, color=POOL_COLOR, label="not selected")
        ax.stairs(np.histogram(scores[sel], edges)[0], edges, fill=True, color=SELECTED_COLOR, alpha=0.9,
                  label="selected")
        if ct.get("score_at_n") is not None:
            label = f"cut: rank {ct['budget']}, score {ct['score_at_n']:.4g}"
            if ct.get("margin") is not None:
                label += f" (margin {ct['margin']:.3g})"
            below = ct.get("score_after_n")  # the line between rank N and rank N+1
            ax.axvline(ct["score_at_n"] if below is None else (ct["score_at_n"] + below) / 2, color=CUT_COLOR, lw=2,
                       label=label)
        if scores.size > 1000:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_xlabel("score")
    ax.set_ylabel("rows")
    ax.set_title(f"scores of the {ct['n_scored']:,} scored rows")
    fig.tight_layout()
    return _png(fig)


def plot_composition(src: dict, length: dict | None) -> bytes:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, comp, title in ((axes[0], src, "by input file"), (axes[1], length, "by token length (pool quintiles)")):
        ax.set_title(title)
        if comp is None:
            ax.text(0.5, 0.5, "token lengths not available\n(OUT/_work/tokens removed)", ha="center", va="center",
                    transform=ax.transAxes)
            ax.set_axis_off()
            continue
        x = np.arange(len(comp["labels"]))
        ax.bar(x - 0.2, comp["pool_share"], 0.4, color=POOL_COLOR, label="usable pool")
        ax.bar(x + 0.2, comp["selected_share"], 0.4, color=SELECTED_COLOR, label="selected")
        ax.set_xticks(x, [_one_line(v, 22) for v in comp["labels"]], rotation=20 if len(x) > 3 else 0,
                      ha="right" if len(x) > 3 else "center", fontsize=8)
        ax.set_ylabel("share")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def plot_cost(cs: dict) -> bytes:
    plt = _pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.2))
    names = [s["stage"] for s in cs["stages"]]
    y = np.arange(len(names))[::-1]
    for axis, key, title in ((ax, "seconds", "this run (s)"),
                             (bx, "projected_seconds", f"projected for a {cs['projected_pool']:,}-row pool (s)")):
        values = [s[key] for s in cs["stages"]]
        axis.barh(y, values, color=POOL_COLOR)
        axis.set_yticks(y, names, fontsize=8)
        for yi, v in zip(y, values):
            axis.text(v, yi, f" {_duration(v)}", va="center", fontsize=8)
        axis.set_xlim(right=max(values + [1e-9]) * 1.35)
        axis.set_title(title)
    fig.tight_layout()
    return _png(fig)


# -------------------------------------------------------------------------------------------
# text
def _duration(s: float | None) -> str:
    if s is None:
        return "n/a"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def _num(x, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    if isinstance(x, float) and math.isnan(x):
        return "n/a"
    return f"{x:.{digits}g}"


def _pct(x) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.2g}%" if 0 < abs(x) < 0.01 else f"{100 * x:.1f}%"


def margin_line(ct: dict) -> str:
    n = ct["budget"]
    if ct.get("note"):
        return f"margin at the cut: n/a ({ct['note']})"
    if not ct.get("has_next"):
        return f"margin at the cut: n/a (every ranked row is selected: {n} >= the usable pool)"
    if ct.get("score_after_n") is None:
        return (f"margin at the cut: n/a (rank {n + 1} was cut by the coarse stage and has no score; "
                f"score at rank {n}: {_num(ct.get('score_at_n'))})")
    line = (f"margin at the cut: {_num(ct['margin'], 3)} (score {_num(ct['score_at_n'])} at rank {n} - "
            f"{_num(ct['score_after_n'])} at rank {n + 1}) = {_pct(ct.get('margin_vs_spread'))} of the 5-95% "
            f"score spread, {_num(ct.get('margin_vs_sd'), 2)} SD")
    return line + ("" if ct.get("monotone", True) else "; ranked by a round-robin order, not by score")


def key_lines(fun: dict, ct: dict, cs: dict) -> list[str]:
    return [
        (f"selected {fun['selected']:,} of {fun['usable']:,} usable pool rows ({fun['pool']:,} read, "
        f"{fun['rejected']:,} rejected)"),
        margin_line(ct),
        (f"projected time for a {cs['projected_pool']:,}-row pool: {_duration(cs['projected_total_seconds'])} on the "
        f"same resources (this run: {_duration(cs['total_seconds'])} for {fun['pool']:,} rows)"),
    ]


def _table(header: list[str], rows: list[list], fmt: str) -> str:
    if fmt == "md":
        esc = [[str(c).replace("|", "\\|").replace("\n", " ") for c in r] for r in rows]
        return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                         + ["| " + " | ".join(r) + " |" for r in esc]) + "\n\n"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>\n"


def sections(d: dict, fmt: str) -> list[tuple[str, str, list[str], str | None]]:
    """(title, plot name or "", paragraphs, table) per section; shared by the md and the html."""
    fun, ct, src, length, ex, dup, cs, m = (d["funnel"], d["cut"], d["source"], d["length"], d["examples"],
                                            d["duplicates"], d["cost"], d["manifest"])
    out = []
    # funnel
    cfg = m.get("config") or {}
    cfg_tokens = cfg.get("budget_tokens")
    rows = [["pool rows read", _num(fun["pool"]), ""],
            ["usable", _num(fun["usable"]), f"{_num(fun['rejected_read'])} rejected at read/validate"],
            ["coarse candidates", _num(fun["candidates"]),
             f"{_num(fun['cut_by_coarse'])} cut by the coarse stage, {_num(fun['rejected_coarse'])} rejected there"],
            ["scored", _num(fun["scored"]), f"{_num(fun['rejected_scoring'])} rejected while featurising/scoring"],
            ["selected", _num(fun["selected"]), f"budget {_num(ct['budget'])}" if not cfg_tokens else
             f"budget {_num(cfg.get('budget'))} rows, {_num(cfg_tokens)} tokens: "
             f"{_num((m.get('counts') or {}).get('selected_tokens'))} tokens selected"]]
    reasons = _table(["reject reason (pool)", "rows"], [[k, _num(n)] for k, n in fun["reasons"]], fmt) \
        if fun["reasons"] else ""
    who = f"`ntk-ray score` (scorer `{cfg.get('scorer', '?')}`) of kept features" if is_score_run(m) else \
        f"Selector `{m.get('selector') or '?'}`"
    out.append(("Funnel", "funnel", [(f"{who}; every pool row is ranked or rejected "
                                     f"with a reason ({_num(fun['ranked'])} ranked + {_num(fun['rejected'])} rejected "
                                     f"= {_num(fun['ranked'] + fun['rejected'])} of {_num(fun['pool'])} read).")],
                _table(["step", "rows", "note"], rows, fmt) + reasons))
    # cut
    paras = [margin_line(ct) + "."]
    if ct.get("n_scored"):
        paras.append(f"{_num(ct['n_scored'])} rows have a score: min {_num(ct['min'])}, 5% {_num(ct['p5'])}, "
                     f"median {_num(ct['median'])}, 95% {_num(ct['p95'])}, max {_num(ct['max'])}, SD {_num(ct['sd'])}. "
                     "The margin is the score at rank N minus the score at rank N+1; the spread is the 5-95% "
                     "percentile range of the scored rows.")
    out.append(("Scores and the cut", "scores", paras, None))
    # composition
    comp = _table(["input file", "usable pool rows", "pool share", "selected", "selected share"],
                  [[lab, _num(p), _pct(ps), _num(s), _pct(ss)] for lab, p, ps, s, ss in
                   zip(src["labels"], src["pool"], src["pool_share"], src["selected"], src["selected_share"])], fmt)
    paras = [f"{src['files']} input file(s)."]
    if length is None:
        paras.append("Token lengths: not available (the token shards in OUT/_work/tokens are gone).")
    else:
        paras.append(f"Token lengths (of {_num(length['matched'])} ranked rows): pool mean {_num(length['pool_mean'], 3)}, "
                     f"median {_num(length['pool_median'], 3)}; selected mean {_num(length['selected_mean'], 3)}, "
                     f"median {_num(length['selected_median'], 3)}.")
        comp += _table(["tokens", "usable pool rows", "pool share", "selected", "selected share"],
                       [[lab, _num(p), _pct(ps), _num(s), _pct(ss)] for lab, p, ps, s, ss in
                        zip(length["labels"], length["pool"], length["pool_share"], length["selected"],
                            length["selected_share"])], fmt)
    out.append(("Composition: pool vs selection", "composition", paras, comp))
    # examples
    tables = ""
    for name, rows_ in ex.items():
        if not rows_:
            continue
        title = f"**{name}**\n\n" if fmt == "md" else f"<h3>{html.escape(name)}</h3>\n"
        tables += title + _table(["rank", "id", "score", "text"],
                                 [[r["rank"], r["id"], _num(r["score"]), r["text"]] for r in rows_], fmt) + "\n"
    out.append(("Examples around the cut", "", [f"Texts cut to {TEXT_CHARS} characters."], tables))
    # duplicates
    paras = [(f"Near-duplicate share among the {_num(dup['rows'])} selected rows: **{_pct(dup['share'])}** "
             f"({_num(dup['near'])} rows a dedup would drop); exact duplicates after normalisation: "
             f"{_num(dup['exact'])} ({_pct(dup['exact_share'])})."),
             (f"Normalisation: NFKC, lower case, non-alphanumeric runs -> one space. Near duplicate: Jaccard "
             f"similarity of word {SHINGLE_WORDS}-shingles >= {dup['threshold']}, estimated with "
             f"{MINHASH_PERMUTATIONS} MinHash values and LSH ({LSH_BANDS} bands).")]
    pairs = _table(["ranks", "first", "second"], [[f"{a}, {b}", t1, t2] for (a, b), (t1, t2) in
                                                  ((p["ranks"], p["texts"]) for p in dup["pairs"])], fmt) \
        if dup["pairs"] else None
    out.append(("Near-duplicates among the selected rows", "", paras, pairs))
    # cost
    rows = [[s["stage"], _num(s["seconds"], 3), _num(s["rows"]) if s["rows"] is not None else "",
             _num(s["rows_per_s"], 3), s["scales_with"], _duration(s["projected_seconds"])] for s in cs["stages"]]
    rows.append(["total", _num(cs["total_seconds"], 3), "", "", "", _duration(cs["projected_total_seconds"])])
    paras = [(f"Projected for a {cs['projected_pool']:,}-row pool with the same budget, domain set and resources "
             f"(the same usable share; {_num(int(cs['candidates_target']))} candidates): "
             f"**{_duration(cs['projected_total_seconds'])}**. Stages over pool rows scale with the pool; features "
             f"and score with the candidates; warmup and setup are constant.")]
    paras += cs["notes"]
    ft = cs.get("finetune")
    if ft is None:
        paras.append(f"One fine-tuning epoch on the selection: {cs['finetune_note']}.")
    else:
        how = (f"the warm-up trained {_num(ft['domain_tokens'])} domain tokens x {ft['warmup_epochs']:g} epochs in "
               f"{_num(ft['warmup_seconds'], 3)} s = {_num(ft['seconds_per_token_epoch'], 3)} s per token-epoch, times "
               f"the {_num(ft['selected_tokens'])} tokens of the selected rows" if ft["method"] == "tokens" else
               f"the warm-up trained {_num(ft['domain_rows'])} domain rows x {ft['warmup_epochs']:g} epochs in "
               f"{_num(ft['warmup_seconds'], 3)} s = {_num(ft['seconds_per_row_epoch'], 3)} s per row-epoch, times "
               f"the {_num(fun['selected'])} selected rows")
        paras.append(f"One fine-tuning epoch on the selection, estimated: **{_duration(ft['epoch'])}** ({how}; same "
                     f"model, LoRA and batch settings as the warm-up). Selection time / one epoch: "
                     f"**{_num(ft['ratio'], 3)}** (this run), {_num(ft['ratio_projected'], 3)} (the 1M-row projection).")
    out.append(("Cost", "cost", paras, _table(["stage", "seconds", "rows", "rows/s", "scales with",
                                               f"projected, {cs['projected_pool']:,} rows"], rows, fmt)))
    return out


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1060px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.4}h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:1.6em}.key{background:#f4f6f8;border-left:4px solid #1b7837;padding:.6em 1em}.key li{margin:.2em 0}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ddd;padding:.25em .5em;
text-align:left;vertical-align:top}th{background:#f4f6f8}img{max-width:100%;display:block;margin:.6em 0}
code{background:#f4f6f8;padding:0 .2em}.meta{color:#666;font-size:.85em}"""


def _inline_md(text: str) -> str:
    """html of a paragraph with the two markdown marks used here: **bold** and `code`."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def is_score_run(m: dict) -> bool:
    """An ``ntk-ray score`` job's manifest: feature directories in its config, no selector."""
    return not m.get("selector") and "features" in (m.get("config") or {})


def job_line(m: dict) -> str:
    """What made the run, in markdown: a select job's model and selector, or an ``ntk-ray score``
    job's feature directories and scorer (its manifest has no model or selector)."""
    from ntk_ray.io.fs import redact

    cfg = m.get("config") or {}
    if is_score_run(m):
        return (f"`ntk-ray score` of the features in `{redact(str(cfg['features']))}` against the anchors in "
                f"`{redact(str(cfg.get('anchors')))}`, scorer `{cfg.get('scorer', '?')}`")
    return f"Model `{(m.get('model') or {}).get('resolved', cfg.get('model'))}`, selector `{m.get('selector', '?')}`"


def render_md(d: dict, plots: dict[str, str]) -> str:
    m = d["manifest"]
    lines = [f"# ntk-ray selection report: {d['title']}", "",
             *[f"- {k}" for k in d["key_lines"]], "",
             (f"{job_line(m)}, budget {d['cut']['budget']:,}. Built by `ntk-ray report` from "
             "`manifest.json`, `ranked.parquet`, `rejects.parquet`, `selected.parquet` and the token shards."), ""]
    for title, plot, paras, table in sections(d, "md"):
        lines += [f"## {title}", ""]
        if plot:
            lines += [f"![{title}]({plots[plot]})", ""]
        for p in paras:
            lines += [p, ""]
        if table:
            lines += [table, ""]
    return "\n".join(lines).rstrip() + "\n"


def render_html(d: dict, pngs: dict[str, bytes]) -> str:
    m = d["manifest"]
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>ntk-ray selection report: {html.escape(d['title'])}</title>", f"<style>{CSS}</style>",
             "</head><body>", f"<h1>ntk-ray selection report: {html.escape(d['title'])}</h1>",
             '<ul class="key">' + "".join(f"<li>{html.escape(k)}</li>" for k in d["key_lines"]) + "</ul>",
             (f'<p class="meta">{_inline_md(job_line(m))}, budget {d["cut"]["budget"]:,}. '
             "Built by <code>ntk-ray report</code>.</p>")]
    for title, plot, paras, table in sections(d, "html"):
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if plot:
            data = base64.b64encode(pngs[plot]).decode()
            parts.append(f'<img id="plot-{plot}" alt="{html.escape(title)}" src="data:image/png;base64,{data}">')
        parts += [f"<p>{_inline_md(p)}</p>" for p in paras]
        if table:
            parts.append(table)
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# -------------------------------------------------------------------------------------------
def build_report(out: str | Path, log=None) -> Report:
    """Build ``report.html``, ``report.md`` and ``report/*.png`` in the output directory ``out``
    of a finished select run (see the module doc). Raises ``ReportError`` for a directory that
    is not one."""
    from ntk_ray.io.atomic import write_bytes_atomic

    t0 = time.time()
    out = Path(out)
    if not out.is_dir():
        raise ReportError(f"{out}: no such directory")
    manifest = _manifest(out)
    config = manifest.get("config") or {}
    # the cut: rank N, or under --budget-tokens the rows the token budget let in
    budget = int(manifest["counts"]["selected"] if config.get("budget_tokens") else
                 config.get("budget") or manifest["counts"]["selected"])
    ranked = pl.scan_parquet(out / "ranked.parquet")
    rejects_path = out / "rejects.parquet"
    rejects = pl.scan_parquet(rejects_path) if rejects_path.is_file() else \
        pl.LazyFrame(schema={"role": pl.String, "reason": pl.String})
    fun = funnel(manifest, ranked, rejects)
    ct = cut(ranked, budget, fun["ranked"])
    src = by_source(ranked)
    length = by_length(ranked, _token_shards(out, "pool"))
    domain_files = _token_shards(out, "domain")
    domain_tokens = int(_usable_tokens(domain_files).unique("id", keep="first").select(pl.col("n_tokens").sum())
                        .collect().item() or 0) if domain_files else None  # the usable domain rows: first of an id
    ex = examples(out, ranked, config, budget, fun["ranked"])
    dup = duplicates_of_selection(out, config)
    cs = cost(manifest, fun, length, domain_tokens)
    d = {"manifest": manifest, "funnel": fun, "cut": ct, "source": src, "length": length, "examples": ex,
         "duplicates": dup, "cost": cs,
         "title": "/".join(out.resolve().parts[-2:])}
    d["key_lines"] = key_lines(fun, ct, cs)
    pngs = {"funnel": plot_funnel(fun), "scores": plot_scores(ct), "composition": plot_composition(src, length),
            "cost": plot_cost(cs)}
    plot_dir = out / "report"
    plot_dir.mkdir(exist_ok=True)
    rel = {}
    for name, data in pngs.items():
        write_bytes_atomic(data, plot_dir / f"{name}.png")
        rel[name] = f"report/{name}.png"
    write_bytes_atomic(render_md(d, rel).encode(), out / "report.md")
    write_bytes_atomic(render_html(d, pngs).encode(), out / "report.html")
    seconds = time.time() - t0
    if log:
        log(f"report: {out / 'report.html'} ({seconds:.1f}s)")
    ct = {k: v for k, v in ct.items() if k not in ("scores", "selected_mask")}
    return Report(html=str(out / "report.html"), md=str(out / "report.md"),
                  plots=[str(plot_dir / f"{n}.png") for n in pngs], key_lines=d["key_lines"], seconds=seconds,
                  data={k: v for k, v in d.items() if k != "manifest"} | {"cut": ct})


def record(out: str | Path, manifest: dict, entry: dict) -> dict:
    """``manifest`` with ``report`` = ``entry``, rewritten atomically to ``OUT/manifest.json``."""
    from ntk_ray.io.atomic import write_json_atomic

    manifest = dict(manifest) | {"report": entry}
    write_json_atomic(manifest, Path(out) / "manifest.json")
    return manifest


def report_entry(rep: Report) -> dict:
    """What the manifest keeps of a report: file names (relative to OUT), key lines, seconds."""
    return {"html": "report.html", "md": "report.md", "plots": [f"report/{Path(p).name}" for p in rep.plots],
            "key_lines": rep.key_lines, "seconds": round(rep.seconds, 3)}


def build_and_record(out: str | Path, manifest: dict, log) -> dict:
    """Build the report of a finished run and record it in its manifest. A failure does not
    fail the run (its result files are written): it is logged as a warning and recorded as
    ``report.error``, and ``ntk-ray report OUT`` builds it later."""
    from ntk_ray.io.fs import redact

    try:
        entry = report_entry(build_report(out, log=log))
    except Exception as e:  # noqa: BLE001 (the selection is complete; the report must not lose it)
        error = redact(f"{type(e).__name__}: {e}")
        log(f"warning: report: not built ({error}); the selection is complete; build the report with "
            f"`ntk-ray report {out}`")
        entry = {"error": error}
    return record(out, manifest, entry)


@dataclass
class Reported:
    manifest: dict  # the write stage's manifest plus its ``report`` entry


class ReportStage(Stage):
    """After ``write`` (and before ``publish``): the report of the written files
    (``build_report``), recorded in ``manifest.json``. Cheap and derived from the result
    files, so it is not saved for resume: it runs again whenever the plan runs (a rerun after
    ``write`` ran again never shows a stale report)."""
    name = "report"
    output = Reported
    needs = ("write",)
    resumable = False

    def run(self, ctx, write) -> Reported:
        return Reported(build_and_record(ctx.out, write.manifest, ctx.progress.log))
