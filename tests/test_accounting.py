"""Nothing is lost: property-based tests of the pure row bookkeeping, without Ray or a model.

Generated domain and pool files (JSONL and Parquet, several files with the same name in
different directories) mix good rows with every kind of bad row. They go through the real
reader (``inputs.read_file_rows``), a stand-in for the tokenizer (one token per
whitespace-separated word, with the ``--max-length`` rule of ``tokenize.py``), the real
bookkeeping (``accounting.account_rows``) and the real ranking (``outputs.rank_rows``), the way
``pipeline.validate_rows`` and ``pipeline.write_outputs`` chain them. A plain-Python model of the
rules predicts each row's fate; the invariants of the contract are checked on the result.
"""

from __future__ import annotations

import json
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ntk_ray.io.accounting import TOKEN_META_SCHEMA, UsageError, account_rows, reason_summary
from ntk_ray.config import MIN_DOMAIN_ROWS
from ntk_ray.io.paths import fallback_id_prefixes
from ntk_ray.io.rows import Columns, read_file_rows
from ntk_ray.io.outputs import REJECTS_SCHEMA, empty_rejects, nonfinite_scores_rejected, rank_rows
from ntk_ray.core.scoring import stable_keys

WORDS = ["alpha", "beta", "gamma", "delta", "eps", "\u00e9t\u00e9", "\u4e2d"]
WHITESPACE = [" ", "\t \n", "\u3000", "\u00a0 "]

# row kinds and the reject reason (prefix) the reader gives them; None = usable so far
KINDS = ["good"] * 6 + ["dup"] * 2 + ["noid", "broken", "badutf8", "null", "empty", "ws", "nonstr",
         "notobj", "nullid", "long", "dup", "shared"]
JSONL_ONLY = ("broken", "nonstr", "notobj", "noid")  # a Parquet column has one type and every row has the id column
READ_REASON = {
    "broken": "broken JSON line", "null": "null text", "empty": "empty text", "ws": "empty text",
    "nonstr": "text is not a string", "notobj": "not a JSON object", "nullid": "id is null",
}


@dataclass
class Row:
    kind: str
    id: str | None          # the id written to the file (None: no id / fallback)
    text: object = None
    expect: str | None = None  # the expected reject reason (prefix); None = usable


@dataclass
class File:
    path: str
    fmt: str                # "jsonl" | "parquet"
    with_ids: bool
    rows: dict[int, Row] = field(default_factory=dict)  # row number -> Row (JSONL blank lines excluded)


# ---- generation ------------------------------------------------------------------------------

@st.composite
def scenarios(draw):
    max_length = draw(st.integers(3, 6))
    on_too_long = draw(st.sampled_from(["truncate", "reject"]))
    n_domain_good = draw(st.sampled_from([MIN_DOMAIN_ROWS - 1] + [MIN_DOMAIN_ROWS + k for k in range(4)]))
    domain_bad = draw(st.lists(st.sampled_from(["null", "empty", "broken", "dup", "long", "noid"]), max_size=4))
    n_files = draw(st.integers(1, 3))
    pool_files = [(draw(st.sampled_from(["jsonl", "parquet"])), draw(st.booleans()),
                   draw(st.lists(st.sampled_from(KINDS), min_size=0 if n_files > 1 else 1, max_size=14)))
                  for _ in range(n_files)]
    budget = draw(st.one_of(st.integers(1, 8), st.integers(1, 40)))
    seed = draw(st.integers(0, 2**32 - 1))
    return max_length, on_too_long, n_domain_good, domain_bad, pool_files, budget, seed


def _text(kind: str, rnd: random.Random, max_length: int):
    if kind in ("good", "noid", "dup", "shared", "nullid"):
        return " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(1, max_length)))
    if kind == "long":
        return " ".join(rnd.choice(WORDS) for _ in range(max_length + rnd.randint(1, 4)))
    if kind == "null":
        return None
    if kind == "empty":
        return ""
    if kind == "ws":
        return rnd.choice(WHITESPACE)
    if kind == "nonstr":
        return rnd.choice([5, 2.5, ["a"], {"t": 1}, True])
    return None


def _jsonl_line(row: Row) -> bytes:
    if row.kind == "broken":
        return b'{"text": "unterminated'
    if row.kind == "badutf8":
        return b'{"text": "bad \xff\xfe bytes"' + (b', "id": "' + row.id.encode() + b'"' if row.id else b"") + b"}"
    if row.kind == "notobj":
        return b'["text", 1]'
    record: dict = {"text": row.text}
    if row.kind == "nullid":
        record["id"] = None
    elif row.id is not None:
        record["id"] = row.id
    return json.dumps(record, ensure_ascii=False).encode()


def _write_jsonl(f: File, rnd: random.Random) -> None:
    lines, numbered = [], {}
    for r in f.rows.values():
        while rnd.random() < 0.15:  # blank lines are not rows, but count for the numbering
            lines.append(rnd.choice([b"", b"  ", b"\t\r"]))
        numbered[len(lines)] = r
        lines.append(_jsonl_line(r))
    f.rows = numbered
    data = b"\n".join(lines) + (b"\n" if rnd.random() < 0.5 else b"")
    if rnd.random() < 0.2:
        data = b"\xef\xbb\xbf" + data
    Path(f.path).write_bytes(data)


def _write_parquet(f: File) -> None:
    rows = list(f.rows.values())
    texts = [b"bad \xff\xfe bytes" if r.kind == "badutf8" else (None if r.text is None else r.text.encode())
             for r in rows]
    columns = {"text": pa.array(texts, pa.binary()).view(pa.string())}
    if f.with_ids:
        columns["id"] = pa.array([None if r.kind == "nullid" else r.id for r in rows], pa.string())
    columns["extra"] = pa.array(list(range(len(rows))), pa.int64())
    pq.write_table(pa.table(columns), f.path, row_group_size=max(1, len(rows) // 2 or 1))


def build(root: Path, scenario) -> tuple[dict[str, list[File]], int, str, int]:
    max_length, on_too_long, n_domain_good, domain_bad, pool_specs, budget, seed = scenario
    rnd = random.Random(seed)
    counter = iter(range(10**6))
    domain_ids: list[str] = []
    pool_ids: list[str] = []

    def make(kind: str, fmt: str, with_ids: bool, ids_so_far: list[str], role: str) -> Row:
        if fmt == "parquet" and kind in JSONL_ONLY:
            kind = "good"
        if not with_ids and kind in ("dup", "shared", "nullid", "noid"):
            kind = "good"
        if kind == "dup" and ids_so_far:
            rid = rnd.choice(ids_so_far)
        elif kind == "shared" and domain_ids:
            rid = rnd.choice(domain_ids)
        elif kind == "noid" or not with_ids:
            rid = None
        else:
            if kind in ("dup", "shared"):
                kind = "good"
            rid = f"{role[0]}{next(counter)}"
        if rid is not None:
            ids_so_far.append(rid)
        return Row(kind, rid, _text(kind, rnd, max_length))

    files: dict[str, list[File]] = {"domain": [], "pool": []}
    dom = File(str(root / "domain" / "part.jsonl"), "jsonl", True)
    kinds = ["good"] * n_domain_good + list(domain_bad)
    rnd.shuffle(kinds)
    for i, kind in enumerate(kinds):
        dom.rows[i] = make(kind, "jsonl", True, domain_ids, "domain")
    files["domain"].append(dom)

    for i, (fmt, with_ids, kinds) in enumerate(pool_specs):
        # the same file name in every directory, and the domain's name too: ids fall back to
        # distinct "<dir>/part.<ext>:<row>" prefixes (inputs.fallback_id_prefixes)
        name = "part.jsonl" if fmt == "jsonl" else "part.parquet"
        f = File(str(root / "pool" / str(i) / name), fmt, with_ids)
        for j, kind in enumerate(kinds):
            f.rows[j] = make(kind, fmt, with_ids, pool_ids, "pool")
        files["pool"].append(f)

    for f in files["domain"] + files["pool"]:
        Path(f.path).parent.mkdir(parents=True, exist_ok=True)
        if f.fmt == "jsonl":
            _write_jsonl(f, rnd)
        else:
            _write_parquet(f)
    return files, max_length, on_too_long, budget


# ---- the chain under test ----------------------------------------------------------------------

def tokenize_meta(chunk: pa.Table, role: str, max_length: int, on_too_long: str) -> pl.DataFrame:
    """What ReadAndTokenize keeps for accounting, with one token per whitespace-separated word."""
    texts = chunk.column("text").to_pylist()
    rejects = chunk.column("reject").to_pylist()
    n_tokens, truncated = [], []
    for i, text in enumerate(texts):
        n, cut = 0, False
        if rejects[i] is None:
            n = len(text.split())
            if n == 0:
                rejects[i] = "empty text"
            elif n > max_length:
                if on_too_long == "reject":
                    rejects[i], n = f"{n} tokens > --max-length {max_length}", 0
                else:
                    n, cut = max_length, True
        n_tokens.append(n)
        truncated.append(cut)
    ids = chunk.column("id").to_pylist()
    return pl.DataFrame({
        "role": [role] * len(ids), "id": ids, "key": stable_keys(ids), "source": chunk.column("source").to_pylist(),
        "row": chunk.column("row").to_pylist(), "n_tokens": n_tokens, "truncated": truncated, "reject": rejects,
    }, schema=TOKEN_META_SCHEMA)


def read_and_account(files: dict[str, list[File]], max_length: int, on_too_long: str, budget: int):
    paths = {role: [f.path for f in fs] for role, fs in files.items()}
    prefixes = fallback_id_prefixes(paths["domain"] + paths["pool"])
    frames = {}
    for role, fs in files.items():
        parts = [tokenize_meta(chunk, role, max_length, on_too_long)
                 for f in fs for chunk in read_file_rows(f.path, Columns(), "text", chunk_rows=5,
                                                         id_prefix=prefixes[f.path], on_corrupt="reject")]
        frame = pl.concat(parts) if parts else pl.DataFrame(schema=TOKEN_META_SCHEMA)
        # Ray Data writes the shards in no particular order
        frames[role] = frame.sample(fraction=1.0, shuffle=True, seed=len(frame))
    return paths, prefixes, account_rows(frames, paths, budget)


# ---- the model of the rules --------------------------------------------------------------------

def expected_fates(files: dict[str, list[File]], prefixes: dict[str, str], max_length: int,
                   on_too_long: str) -> dict[str, dict[tuple[str, int], str | None]]:
    fates: dict[str, dict[tuple[str, int], str | None]] = {}
    usable_ids: dict[str, set[str]] = {}
    for role in ("domain", "pool"):
        fate: dict[tuple[str, int], str | None] = {}
        first: dict[str, tuple[str, int]] = {}
        for f in files[role]:
            for row, r in sorted(f.rows.items()):
                rid = r.id if r.id is not None else f"{prefixes[f.path]}:{row}"
                reason = READ_REASON.get(r.kind)
                if r.kind == "badutf8":
                    reason = "invalid UTF-8"
                if reason is None and r.kind == "long" and on_too_long == "reject":
                    reason = f"{len(r.text.split())} tokens > --max-length {max_length}"
                if reason is None:
                    if rid in first:
                        reason = "duplicate id (first at {}:{})".format(*first[rid])
                    else:
                        first[rid] = (f.path, row)
                if reason is None and role == "pool" and rid in usable_ids["domain"]:
                    reason = "id also in the domain set"
                fate[(f.path, row)] = reason
        usable_ids[role] = set(first) if role == "domain" else set()
        fates[role] = fate
    return fates


def emulate_write_outputs(usable_pool: pl.DataFrame, budget: int, rnd: random.Random):
    """write_outputs' split: random scores (ties, NaN/inf, feature-stage rejects) for a random
    'ntk' part, the rest as the coarse cut, then rank_rows."""
    rows = usable_pool.select("id", "key", "source", "row").sample(fraction=1.0, shuffle=True, seed=rnd.randrange(2**31))
    m = rnd.randint(0, rows.height)
    cand, cut = rows.head(m), rows.slice(m)
    scores, rejects = [], []
    for _ in range(cand.height):
        u = rnd.random()
        scores.append(float("nan") if u < 0.05 else float("inf") if u < 0.08 else float(rnd.choice([0.5, 1.0, 2.0, rnd.gauss(0, 1)])))
        rejects.append("non-finite gradient (NaN/inf)" if rnd.random() < 0.1 else None)
    cand = cand.with_columns(pl.Series("score", scores, pl.Float64), pl.Series("reject", rejects, pl.String),
                             pl.lit(None, pl.Int64).alias("coarse_votes"), pl.lit(None, pl.Float64).alias("coarse_sim"))
    cand = nonfinite_scores_rejected(cand)
    bad = cand.filter(pl.col("reject").is_not_null())
    ntk = cand.filter(pl.col("reject").is_null()).drop("reject")
    cut = cut.with_columns(pl.Series("coarse_votes", [rnd.randint(0, 5) for _ in range(cut.height)], pl.Int64),
                           pl.Series("coarse_sim", [rnd.random() for _ in range(cut.height)], pl.Float64))
    return rank_rows(ntk, cut, budget), bad


# ---- the property ------------------------------------------------------------------------------

@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_every_row_is_ranked_or_rejected_exactly_once(scenario):
    with tempfile.TemporaryDirectory() as tmp:
        files, max_length, on_too_long, budget = build(Path(tmp), scenario)
        paths = {role: [f.path for f in fs] for role, fs in files.items()}
        prefixes = fallback_id_prefixes(paths["domain"] + paths["pool"])
        fates = expected_fates(files, prefixes, max_length, on_too_long)
        pool_rows = len(fates["pool"])
        domain_usable = sum(r is None for r in fates["domain"].values())
        pool_usable = sum(r is None for r in fates["pool"].values())

        expect_error = None
        if pool_rows == 0:
            expect_error = "--pool: no rows"
        elif domain_usable < MIN_DOMAIN_ROWS:
            expect_error = f"--domain: {domain_usable} usable rows"
        elif pool_usable == 0:
            expect_error = "--pool: none of the"
        elif budget > pool_rows:
            expect_error = f"--budget {budget} is larger than the pool ({pool_rows} rows)"
        event(f"outcome: {expect_error.split(' ')[0] if expect_error else 'ranked'}")
        if expect_error:
            with pytest.raises(UsageError) as info:
                read_and_account(files, max_length, on_too_long, budget)
            message = str(info.value)
            assert message.startswith(expect_error), (message, expect_error)
            assert "\n" not in message
            return

        _, _, acc = read_and_account(files, max_length, on_too_long, budget)
        counts, rejects = acc["counts"], acc["rejects"]
        assert counts["pool_rows"] == pool_rows and counts["pool_usable"] == pool_usable
        assert counts["domain_rows"] == len(fates["domain"]) and counts["domain_usable"] == domain_usable
        assert counts["pool_rows"] == counts["pool_usable"] + counts["rejected"]

        # every row's fate is the one the rules give it
        for role in ("domain", "pool"):
            got = {(s, r): reason for s, r, reason in
                   rejects.filter(pl.col("role") == role).select("source", "row", "reason").iter_rows()}
            usable = acc["usable"][role]
            assert len(got) == rejects.filter(pl.col("role") == role).height  # no row rejected twice
            got.update({(s, r): None for s, r in usable.select("source", "row").iter_rows()})
            assert len(got) == len(fates[role])
            assert set(got) == set(fates[role])
            for where, want in fates[role].items():
                if want is None:
                    assert got[where] is None, (role, where, got[where])
                else:
                    assert got[where] is not None and got[where].startswith(want), (role, where, got[where], want)
        truncated = acc["usable"]["pool"].filter(pl.col("truncated"))
        assert counts["pool_truncated"] == truncated.height
        assert (on_too_long == "truncate") or truncated.height == 0

        # the pipeline's last step: rank, and the invariants of the contract
        rnd = random.Random(scenario[-1])
        ranked, bad = emulate_write_outputs(acc["usable"]["pool"], budget, rnd)
        all_rejects = pl.concat([rejects, bad.select("id", "source", "row", pl.lit("pool").alias("role"),
                                                     pl.col("reject").alias("reason"))])
        pool_rejects = all_rejects.filter(pl.col("role") == "pool")
        assert pool_rows == ranked.height + pool_rejects.height
        seen = ranked.select("source", "row").vstack(pool_rejects.select("source", "row"))
        assert seen.height == seen.unique().height == pool_rows  # exactly once
        assert set(seen.iter_rows()) == set(fates["pool"])
        assert ranked["rank"].to_list() == list(range(1, ranked.height + 1))
        assert ranked["id"].n_unique() == ranked.height
        assert not set(ranked["id"]) & set(acc["usable"]["domain"]["id"])
        stages = ranked["stage"].to_list()
        assert stages == sorted(stages, key=lambda s: s != "ntk")  # every ntk row above every coarse row
        ntk_scores = ranked.filter(pl.col("stage") == "ntk")["score"].to_list()
        assert all(s == s and abs(s) != float("inf") for s in ntk_scores)  # finite
        assert ntk_scores == sorted(ntk_scores, reverse=True)
        assert ranked.filter(pl.col("stage") == "coarse")["score"].null_count() == ranked.filter(pl.col("stage") == "coarse").height
        assert int(ranked["selected"].sum()) == min(budget, ranked.height)
        assert ranked.filter(pl.col("selected"))["rank"].to_list() == list(range(1, min(budget, ranked.height) + 1))


# ---- examples ----------------------------------------------------------------------------------

def _meta(role, rows):
    """rows: (id, source, row, reject) tuples."""
    ids = [r[0] for r in rows]
    return pl.DataFrame({"role": [role] * len(rows), "id": ids, "key": stable_keys(ids),
                         "source": [r[1] for r in rows], "row": [r[2] for r in rows], "n_tokens": [3] * len(rows),
                         "truncated": [False] * len(rows), "reject": [r[3] for r in rows]}, schema=TOKEN_META_SCHEMA)


def test_first_occurrence_in_file_order_wins_and_domain_ids_are_never_selected():
    domain = _meta("domain", [(f"d{i}", "d.jsonl", i, None) for i in range(4)] + [("d0", "d.jsonl", 4, None)])
    # rows arrive out of order (Ray Data gives no order); file order is the --pool order
    pool = _meta("pool", [("x", "b.jsonl", 0, None), ("x", "a.jsonl", 7, None), ("x", "a.jsonl", 3, "empty text"),
                          ("d2", "a.jsonl", 9, None), ("y", "a.jsonl", 8, None)])
    acc = account_rows({"domain": domain, "pool": pool}, {"domain": ["d.jsonl"], "pool": ["a.jsonl", "b.jsonl"]}, 2)
    reasons = {(s, r): reason for s, r, reason in acc["rejects"].select("source", "row", "reason").iter_rows()}
    assert reasons == {("d.jsonl", 4): "duplicate id (first at d.jsonl:0)", ("a.jsonl", 3): "empty text",
                       ("b.jsonl", 0): "duplicate id (first at a.jsonl:7)", ("a.jsonl", 9): "id also in the domain set"}
    assert acc["usable"]["pool"].select("id", "source", "row").rows() == [("x", "a.jsonl", 7), ("y", "a.jsonl", 8)]
    assert acc["counts"]["rejected"] == 3 and acc["counts"]["domain_rejected"] == 1


def test_too_small_domain_names_the_reasons_and_carries_the_rejects():
    domain = _meta("domain", [("a", "d.jsonl", 0, None), ("b", "d.jsonl", 1, "empty text"),
                              ("c", "d.jsonl", 2, "empty text"), ("d", "d.jsonl", 3, "null text"),
                              ("a", "d.jsonl", 5, None)])
    pool = _meta("pool", [("p", "p.jsonl", 0, None)])
    with pytest.raises(UsageError) as info:
        account_rows({"domain": domain, "pool": pool}, {"domain": ["d.jsonl"], "pool": ["p.jsonl"]}, 1)
    message = str(info.value)
    assert message.startswith(f"--domain: 1 usable rows (of 5 read in d.jsonl); at least {MIN_DOMAIN_ROWS} are needed")
    assert "rejected 4: 2 x 'empty text'" in message and "1 x 'duplicate id'" in message
    assert "(e.g. d.jsonl row 1: empty text)" in message
    assert info.value.rejects is not None and info.value.rejects.height == 4
    assert set(info.value.rejects.columns) == set(REJECTS_SCHEMA)


def test_pool_without_any_usable_row_is_a_clear_error():
    domain = _meta("domain", [(f"d{i}", "d.jsonl", i, None) for i in range(4)])
    pool = _meta("pool", [("p", "p.jsonl", 0, "empty text"), ("d1", "p.jsonl", 1, None)])
    with pytest.raises(UsageError, match=r"^--pool: none of the 2 rows in p.jsonl is usable; rejected 2: "):
        account_rows({"domain": domain, "pool": pool}, {"domain": ["d.jsonl"], "pool": ["p.jsonl"]}, 1)


def test_budget_above_usable_rows_selects_all_usable_rows():
    domain = _meta("domain", [(f"d{i}", "d.jsonl", i, None) for i in range(4)])
    pool = _meta("pool", [("p0", "p.jsonl", 0, None), ("p1", "p.jsonl", 1, "null text"), ("p2", "p.jsonl", 2, None)])
    acc = account_rows({"domain": domain, "pool": pool}, {"domain": ["d.jsonl"], "pool": ["p.jsonl"]}, 3)
    usable = acc["usable"]["pool"].with_columns(pl.lit(1.0).alias("score"), pl.lit(None, pl.Int64).alias("coarse_votes"),
                                                pl.lit(None, pl.Float64).alias("coarse_sim"))
    ranked = rank_rows(usable, usable.head(0), 3)
    assert ranked["selected"].to_list() == [True, True]


def test_reason_summary_groups_per_row_reasons():
    rejects = pl.DataFrame({"id": ["a", "b", "c", "d"], "source": ["f"] * 4, "row": [0, 1, 2, 3], "role": ["pool"] * 4,
                            "reason": ["12 tokens > --max-length 8", "9 tokens > --max-length 8",
                                       "duplicate id (first at f:0)", "null text"]}, schema=REJECTS_SCHEMA)
    assert reason_summary(rejects, "pool") == (
        "rejected 4: 2 x 'N tokens > --max-length 8', 1 x 'duplicate id', 1 x 'null text' "
        "(e.g. f row 0: 12 tokens > --max-length 8)")
    assert reason_summary(empty_rejects(), "pool") == "no rows rejected"


def test_selected_count_against_a_literal_loop():
    """The rows selected under --budget N [--budget-tokens T]: the longest rank prefix of at most
    N rows whose tokens total at most T, against a plain loop over random cases."""
    from ntk_ray.io.outputs import selected_count

    rng = np.random.default_rng(5)
    for _ in range(300):
        tokens = rng.integers(0, 40, size=int(rng.integers(0, 12))).tolist()
        n, t = int(rng.integers(1, 15)), int(rng.integers(1, 120))
        want, total = 0, 0
        for x in tokens[:n]:
            if total + x > t:
                break
            total += x
            want += 1
        assert selected_count(pl.Series(tokens, dtype=pl.Int64), n, t) == want, (tokens, n, t)
        assert selected_count(pl.Series(tokens, dtype=pl.Int64), n) == min(n, len(tokens))
    assert selected_count(pl.Series([50, 1], dtype=pl.Int64), 2, 10) == 0, "the best row alone is over T"
    with pytest.raises(ValueError, match="token count"):
        selected_count(pl.Series([1, None], dtype=pl.Int64), 2, 10)
