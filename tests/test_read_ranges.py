"""One big file read by many workers: JSONL byte ranges and Parquet row ranges (``io.formats.Span``)
give exactly the rows, row numbers, ids and rejects of the whole-file read, cut into the same
token shards, whatever the range size; ``select`` ranks the same with tiny units as with one.

The reference is the whole-file reader (``io.rows.read_file_rows`` without a span), which the
other input tests pin down.
"""

from __future__ import annotations

import gzip
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ntk_ray.io import formats
from ntk_ray.io.formats import ROW_TOO_LARGE, Span, reader_for
from ntk_ray.io.rows import Columns, count_rows, read_file_rows

COLS = Columns()


def plan(path: str, unit_bytes: int, align: int) -> list[Span] | None:
    """What ``stages.read.plan_units`` does for one file, in this process."""
    fmt = reader_for(path)
    scans = [fmt.scan(path, a, b) for a, b in fmt.scan_ranges(path, unit_bytes)]
    return fmt.spans(path, scans, unit_bytes, align)


def chunks(path: str, align: int, spans: list[Span] | None = None, mode: str = "text") -> list[list[dict]]:
    """The rows of a file as the read stage cuts them (``align`` records a chunk), read whole
    or span by span."""
    parts = [None] if spans is None else spans
    return [t.to_pylist() for s in parts
            for t in read_file_rows(path, COLS, mode, chunk_rows=align, on_corrupt="reject", span=s) if t.num_rows]


def random_jsonl(rng: random.Random, n: int) -> bytes:
    """Lines of every kind a reader must get right: blank ones (also CR-only and vertical tabs),
    CRLF endings, multi-byte UTF-8 (2, 3 and 4 bytes), invalid JSON, invalid UTF-8, a JSON
    value that is not an object, rows without an id (fallback ids), long lines, maybe a BOM and
    maybe no newline at the end."""
    words = ["a", "bb", "é", "ça", "中文", "🙂x", "end"]
    lines = []
    for i in range(n):
        kind = rng.random()
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
        if kind < 0.10:
            lines.append(rng.choice([b"", b"   ", b"\r", b"\t\x0b "]))
        elif kind < 0.15:
            lines.append(b'{"id": "x' + str(i).encode() + b'", "text": "bro')
        elif kind < 0.18:
            lines.append(b'{"id": "u' + str(i).encode() + b'", "text": "\xff\xfe"}')
        elif kind < 0.20:
            lines.append(b"42")
        elif kind < 0.28:
            lines.append(json.dumps({"text": text}, ensure_ascii=False).encode())
        elif kind < 0.33:
            lines.append(json.dumps({"id": f"L{i}", "text": "中" * rng.randint(40, 200)}, ensure_ascii=False).encode())
        else:
            lines.append(json.dumps({"id": f"r{i}", "text": text}, ensure_ascii=False).encode())
        if rng.random() < 0.2:
            lines[-1] += b"\r"
    data = b"\n".join(lines) + (b"\n" if rng.random() < 0.5 else b"")
    return (b"\xef\xbb\xbf" if rng.random() < 0.3 else b"") + data


@pytest.mark.parametrize("seed", range(3))
def test_jsonl_ranges_read_what_the_whole_file_reads(tmp_path, seed):
    rng = random.Random(seed)
    path = tmp_path / "pool.jsonl"
    data = random_jsonl(rng, rng.randint(20, 60))
    path.write_bytes(data)
    size = len(data)
    for align in (1, 2, 5):
        whole = chunks(str(path), align)
        sizes = {1, 3, size - 1, size} | {rng.randint(2, size // 4) for _ in range(3)} | {rng.randint(1, size) for _ in range(3)}
        for unit in sorted(s for s in sizes if s > 0):
            spans = plan(str(path), unit, align)
            if unit >= size:
                assert spans is None  # a file no bigger than a unit is read whole
                continue
            assert spans, unit
            assert all(s.ordinal % align == 0 for s in spans)
            assert [s.ordinal for s in spans] == sorted({s.ordinal for s in spans})
            assert chunks(str(path), align, spans) == whole, (seed, align, unit)
    # every record once: as many rows as count_rows says, row numbers the physical lines
    rows = [r for c in chunks(str(path), 3) for r in c]
    assert len(rows) == count_rows([str(path)])
    physical = data.split(b"\n")
    assert all(physical[r["row"]].strip(b" \t\r\x0b\x0c\xef\xbb\xbf") for r in rows)


def test_a_range_boundary_inside_a_multibyte_character(tmp_path):
    path = tmp_path / "mb.jsonl"
    lines = [json.dumps({"id": f"r{i}", "text": "x" * i + "🙂中é"}, ensure_ascii=False) for i in range(12)]
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(data)
    inside = [i for i in range(1, len(data)) if (data[i] & 0xC0) == 0x80]  # continuation bytes
    assert len(inside) > 20
    for unit in inside[::3]:  # the first boundary falls inside a character
        spans = plan(str(path), unit, 1)
        assert chunks(str(path), 1, spans) == chunks(str(path), 1)
    rows = [r for c in chunks(str(path), 1, plan(str(path), inside[0], 1)) for r in c]
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(12)] and all(r["reject"] is None for r in rows)


def test_lines_longer_than_a_range_and_too_large_rows(tmp_path, monkeypatch):
    """A line that covers several ranges belongs to the range it starts in; a line over the row
    limit is the reject ``row too large`` (a blank one is a blank line), in every range layout."""
    monkeypatch.setattr(formats, "MAX_ROW_BYTES", 60)
    path = tmp_path / "long.jsonl"
    lines = [json.dumps({"id": "a", "text": "short"}), json.dumps({"id": "b", "text": "y" * 200}), " " * 150,
             json.dumps({"id": "c", "text": "z" * 20}), "", json.dumps({"text": "w" * 300}), json.dumps({"id": "d", "text": "e"})]
    path.write_text("\r\n".join(lines))
    whole = chunks(str(path), 2)
    flat = [(r["id"], r["row"], r["reject"]) for c in whole for r in c]
    assert flat == [("a", 0, None), ("long.jsonl:1", 1, ROW_TOO_LARGE), ("c", 3, None),
                    ("long.jsonl:5", 5, ROW_TOO_LARGE), ("d", 6, None)]
    assert count_rows([str(path)]) == 5
    for unit in range(1, len(path.read_bytes()), 7):
        assert chunks(str(path), 2, plan(str(path), unit, 2)) == whole, unit


def test_prompt_response_rows_and_fallback_prefix(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" + ("\n" if i % 3 else "")
                            for i in range(40)))
    spans = plan(str(path), 50, 4)
    assert spans and len(spans) > 3
    whole = [t.to_pylist() for t in read_file_rows(str(path), COLS, "prompt_response", chunk_rows=4, id_prefix="P")]
    split = [t.to_pylist() for s in spans
             for t in read_file_rows(str(path), COLS, "prompt_response", chunk_rows=4, id_prefix="P", span=s)]
    assert split == whole and whole[0][0]["id"] == "P:0"


def write_parquet(path, n: int, group_rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    ids = [None if rng.random() < 0.05 else (i if rng.random() < 0.2 else f"p{i}") for i in range(n)]
    texts = [rng.choice([None, "", "ok " * rng.randint(1, 30), "中é " * rng.randint(1, 10)]) for _ in range(n)]
    table = pa.table({"id": pa.array([None if v is None else str(v) for v in ids], pa.string()),
                      "text": pa.array(texts, pa.string()), "other": pa.array(range(n), pa.int64())})
    pq.write_table(table, path, row_group_size=group_rows)


@pytest.mark.parametrize(("n", "group_rows"), [(60, 1), (120, 7), (120, 1000)])
def test_parquet_row_ranges_read_what_the_whole_file_reads(tmp_path, n, group_rows):
    path = str(tmp_path / "pool.parquet")
    write_parquet(path, n, group_rows, seed=group_rows)
    meta = pq.ParquetFile(path).metadata
    total = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
    for align in (1, 16):
        whole = chunks(path, align)
        assert sum(len(c) for c in whole) == n
        for unit in (1, total // 3, total - 1, total):
            spans = plan(path, unit, align)
            if unit >= total:
                assert spans is None
                continue
            if unit <= total // 3:
                assert spans and len(spans) >= 2, (align, unit)
            if spans:
                assert all(s.ordinal % align == 0 and s.offset == s.row == s.ordinal for s in spans)
                assert sum(s.count for s in spans) == n
                assert chunks(path, align, spans) == whole, (align, unit)


def test_parquet_cuts():
    groups = [(100, 1000), (100, 1000), (5, 50), (1000, 40000), (0, 0), (30, 300)]
    total = sum(n for n, _ in groups)
    for unit in (1, 500, 999, 2000, 5000, 10**6):
        for align in (1, 8, 64):
            cuts = formats._parquet_cuts(groups, unit, align)
            assert cuts[0] == 0 and cuts[-1] == total and cuts == sorted(set(cuts))
            assert all(c % align == 0 for c in cuts[:-1])
    assert formats._parquet_cuts(groups, 2000, 1)[:3] == [0, 200, 255]  # whole row groups, then inside the big one
    assert len(formats._parquet_cuts(groups, 10**6, 1)) == 2


def test_formats_read_whole(tmp_path):
    """Compressed JSONL, JSON arrays and CSV are one unit, however big."""
    rows = [{"id": f"r{i}", "text": "t" * 20} for i in range(50)]
    gz = tmp_path / "a.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    arr = tmp_path / "b.json"
    arr.write_text(json.dumps(rows))
    lines_json = tmp_path / "c.json"
    lines_json.write_text("".join(json.dumps(r) + "\n" for r in rows))
    csv = tmp_path / "d.csv"
    csv.write_text("id,text\n" + "".join(f"{r['id']},{r['text']}\n" for r in rows))
    for p in (gz, arr, csv):
        assert reader_for(str(p)).scan_ranges(str(p), 10) == [] and plan(str(p), 10, 1) is None, p
    spans = plan(str(lines_json), 100, 3)  # a .json file of JSON Lines is split like .jsonl
    assert spans and chunks(str(lines_json), 3, spans) == chunks(str(lines_json), 3)
    with pytest.raises(ValueError, match="read whole"):
        next(iter(reader_for(str(csv)).iter_records(str(csv), ["text"], span=Span(0, 0, 0, 1, 0))))


# ------------------------------------------------------------------------------------------------
# the read stage: units, shards, markers, resume; and select end to end

def shard_contents(directory) -> dict:
    return {p.name: pq.read_table(p).to_pylist() for p in sorted(directory.glob("*.parquet"))}


def test_read_files_same_shards_any_unit_size_and_resume(tmp_path, tiny_model_dir, tiny_data, monkeypatch):
    from ntk_ray.runtime.local import LocalExecutor
    from ntk_ray.stages import read
    from ntk_ray.stages.read import read_files
    from ntk_ray.stages.workers import ReadSpec

    pool = tiny_data / "pool.jsonl"
    pool.write_bytes(pool.read_bytes().replace(b"\n", b"\n\n", 3) + b'{"id": "bad", "text": \n')
    files = [str(tiny_data / "domain.jsonl"), str(pool)]
    spec = ReadSpec("pool", "text", COLS, str(tiny_model_dir), 32, "truncate")
    ex = LocalExecutor()
    whole, tiny = tmp_path / "whole", tmp_path / "tiny"
    monkeypatch.setattr(read, "CHUNK_ROWS", 4)
    units_whole = read_files(ex, files, spec, whole, unit_mb=64)
    units_tiny = read_files(ex, files, spec, tiny, unit_mb=100 / 2**20)
    assert len(units_whole) == 2 and len(units_tiny) > 6
    assert shard_contents(whole) == shard_contents(tiny)
    rows = [r for t in shard_contents(tiny).values() for r in t]
    assert len(rows) == count_rows(files) == 6 + 31 and rows[-1]["reject"].startswith("broken JSON")
    markers = sorted(p.stem for p in (tiny / "_done").glob("*.json"))
    assert markers == sorted(u["unit"] for u in units_tiny) and "000001-000000-000001" in markers
    # resume: a unit without its marker (killed half-way) is redone, the others are not touched
    victim = units_tiny[3]
    (tiny / "_done" / f"{victim['unit']}.json").unlink()
    first, end = (int(x) for x in victim["unit"].split("-")[1:])
    for c in range(first, end):
        (tiny / f"000001-{c:06d}.parquet").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in tiny.glob("*.parquet")}
    read_files(ex, files, spec, tiny, unit_mb=100 / 2**20)
    after = {p.name: p.stat().st_mtime_ns for p in tiny.glob("*.parquet")}
    assert {k: v for k, v in after.items() if k in before} == before and len(after) == len(before) + end - first
    assert shard_contents(tiny) == shard_contents(whole)
    # another unit size on top of a finished read: the same shards
    read_files(ex, files, spec, tiny, unit_mb=250 / 2**20)
    assert shard_contents(tiny) == shard_contents(whole)


def test_select_ranks_the_same_with_tiny_read_units(tmp_path, tiny_model_dir, tiny_data, capsys, monkeypatch):
    from ntk_ray.cli import main
    from ntk_ray.stages import read

    monkeypatch.setattr(read, "CHUNK_ROWS", 4)
    ranked = {}
    for name, unit in (("one", "64"), ("tiny", "0.0001")):
        out = tmp_path / name
        rc = main(["select", "--domain", str(tiny_data / "domain.jsonl"), "--pool", str(tiny_data / "pool.jsonl"),
                   "--budget", "3", "--out", str(out), "--model", str(tiny_model_dir), "--executor", "local",
                   "--max-length", "32", "--proj-dim", "16", "--warmup", "fresh", "--read-unit-mb", unit])
        assert rc == 0, capsys.readouterr().err
        ranked[name] = pq.read_table(out / "ranked.parquet")
        assert json.loads((out / "manifest.json").read_text())["config"]["read_unit_mb"] == float(unit)
    assert ranked["tiny"].num_rows == 30
    assert ranked["tiny"].equals(ranked["one"])
