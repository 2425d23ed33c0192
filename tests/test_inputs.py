"""Tests of ntk_ray.inputs: resolving, checking and reading input files (no Ray)."""

from __future__ import annotations

import gzip
import tempfile
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ntk_ray.io import formats as inputs  # the JSON read size, _CHUNK_BYTES, lives in formats
from ntk_ray.io.paths import fallback_id_prefixes, resolve_paths
from ntk_ray.io.rows import (
    OUTPUT_SCHEMA,
    Columns,
    InputError,
    check_columns,
    read_file_rows,
    read_original_rows,
)


# ---- helpers ---------------------------------------------------------------------------------

def write_jsonl(path: Path, records: list) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def write_parquet(path: Path, table: pa.Table | dict, **kwargs) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table if isinstance(table, pa.Table) else pa.table(table), str(path), **kwargs)
    return str(path)


def read_all(path: str, cols: Columns = Columns(), mode: str = "text", **kwargs) -> list[dict]:
    rows = []
    for table in read_file_rows(path, cols, mode, **kwargs):
        assert table.schema.equals(OUTPUT_SCHEMA)
        rows.extend(table.to_pylist())
    return rows


def input_error(fn, *args) -> str:
    with pytest.raises(InputError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    return message


# ---- resolve_paths ---------------------------------------------------------------------------

@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """d/{b.jsonl, a.parquet, notes.txt, sub/c.json, sub/d.jsonl.gz, _SUCCESS, .hidden/x.jsonl, _tmp/y.jsonl}"""
    d = tmp_path / "d"
    write_jsonl(d / "b.jsonl", [{"text": "b"}])
    write_parquet(d / "a.parquet", {"text": ["a"]})
    (d / "notes.txt").write_text("not data")
    write_jsonl(d / "sub" / "c.json", [{"text": "c"}])
    with gzip.open(d / "sub" / "d.jsonl.gz", "wt") as f:
        f.write('{"text": "d"}\n')
    (d / "_SUCCESS").write_text("")
    write_jsonl(d / ".hidden" / "x.jsonl", [{"text": "x"}])
    write_jsonl(d / "_tmp" / "y.jsonl", [{"text": "y"}])
    return d


def test_resolve_file(tree: Path) -> None:
    path = str(tree / "b.jsonl")
    assert resolve_paths(path, "--pool") == [path]


def test_resolve_directory_recursive_sorted_and_filtered(tree: Path) -> None:
    got = resolve_paths(str(tree), "--pool")
    assert got == [str(tree / n) for n in ("a.parquet", "b.jsonl", "sub/c.json", "sub/d.jsonl.gz")]


def test_resolve_glob_sorted_and_directory_matches_expanded(tree: Path) -> None:
    assert resolve_paths(str(tree / "*.jsonl"), "--pool") == [str(tree / "b.jsonl")]
    assert resolve_paths(str(tree / "**" / "*.json*"), "--pool") == [
        str(tree / "b.jsonl"), str(tree / "sub" / "c.json"), str(tree / "sub" / "d.jsonl.gz")]
    assert resolve_paths(str(tree / "s*"), "--pool") == [
        str(tree / "sub" / "c.json"), str(tree / "sub" / "d.jsonl.gz")]


def test_resolve_several_specs_keep_order_and_dedupe(tree: Path) -> None:
    b, a = str(tree / "b.jsonl"), str(tree / "a.parquet")
    got = resolve_paths([b, str(tree), a], "--pool")
    assert got == [b, a, str(tree / "sub/c.json"), str(tree / "sub/d.jsonl.gz")]


def test_resolve_file_uris(tree: Path) -> None:
    uri = tree.as_uri()
    assert resolve_paths(uri, "--pool") == [f"{uri}/{n}" for n in
                                            ("a.parquet", "b.jsonl", "sub/c.json", "sub/d.jsonl.gz")]
    assert resolve_paths(uri + "/*.jsonl", "--pool") == [uri + "/b.jsonl"]
    assert resolve_paths(uri + "/**/*.json", "--pool") == [uri + "/sub/c.json"]
    assert resolve_paths(uri + "/b.jsonl", "--pool") == [uri + "/b.jsonl"]
    assert [r["text"] for r in read_all(uri + "/sub/d.jsonl.gz")] == ["d"]


def test_resolve_errors_are_one_line_and_name_flag_and_path(tree: Path, tmp_path: Path) -> None:
    missing = str(tmp_path / "x.jsonl")
    assert input_error(resolve_paths, missing, "--pool") == f"--pool: no such file or directory: {missing}"

    pattern = str(tree / "*.nothing")
    assert input_error(resolve_paths, pattern, "--pool") == f"--pool: glob '{pattern}' matched no files"

    other = tmp_path / "x.xlsx"  # (.csv is an input format now)
    other.write_text("a,b\n")
    message = input_error(resolve_paths, str(other), "--pool")
    assert message.startswith(f"--pool: unsupported file type '{other}' (expected .jsonl, .json, .parquet, .csv, .tsv or .arrow")

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.md").write_text("hi")
    assert input_error(resolve_paths, str(empty), "--domain") == \
        f"--domain: directory {empty} has no .jsonl/.json/.parquet/.csv/.tsv/.arrow files"

    message = input_error(resolve_paths, str(tree / "*.txt"), "--pool")
    assert message.startswith("--pool: glob") and "notes.txt" in message and "unsupported" in message

    assert input_error(resolve_paths, [], "--pool") == "--pool: no input path given"
    assert input_error(resolve_paths, (tree / "nope").as_uri(), "--pool").startswith(
        "--pool: no such file or directory: file://")
    assert input_error(resolve_paths, "foo://bucket/x.jsonl", "--pool").startswith(
        "--pool: cannot open foo://bucket/x.jsonl")


# ---- check_columns ---------------------------------------------------------------------------

def test_check_columns_modes(tmp_path: Path) -> None:
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}])
    both = write_parquet(tmp_path / "b.parquet", {"text": ["a"], "prompt": ["p"], "response": ["r"]})
    pr = write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "p", "response": "r"}])
    array = tmp_path / "arr.json"
    array.write_text(json.dumps([{"prompt": "p", "response": "r"}], indent=2))
    assert check_columns([text], Columns(), "--pool") == "text"
    assert check_columns([both], Columns(), "--pool") == "prompt_response"
    assert check_columns([both, pr, str(array)], Columns(), "--pool") == "prompt_response"
    assert check_columns([both, text], Columns(), "--pool") == "text"


def test_check_columns_overridden_names(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"content": "a", "key": 1}])
    assert check_columns([path], Columns(text="content", id="key"), "--pool") == "text"
    message = input_error(check_columns, [path], Columns(text="content", id="uid"), "--pool")
    assert message.startswith(f"--pool: {path} has no column 'uid' (--id-column)")


def test_check_columns_missing_column_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "p", "meta": 1}])
    message = input_error(check_columns, [path], Columns(), "--pool")
    assert message == (f"--pool: {path} has no column 'text' (--text-column) nor 'response' "
                       f"(--response-column) nor 'messages'/'conversations' (--messages-column); "
                       f"columns found: prompt, meta")
    pq_path = write_parquet(tmp_path / "m.parquet", {"body": ["x"]})
    message = input_error(check_columns, [pq_path], Columns(), "--domain")
    assert message.startswith(f"--domain: {pq_path} has no column 'text' (--text-column) nor "
                              "'prompt' (--prompt-column) and 'response' (--response-column)")


def test_check_columns_mixed_layouts(tmp_path: Path) -> None:
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}])
    pr = write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "p", "response": "r"}])
    message = input_error(check_columns, [text, pr], Columns(), "--pool")
    assert message.startswith("--pool: files mix column layouts") and text in message and pr in message


def test_check_columns_rejects_files_that_are_not_json_or_parquet(tmp_path: Path) -> None:
    good = write_parquet(tmp_path / "g.parquet", {"text": [f"row {i}" for i in range(100)]})
    data = Path(good).read_bytes()
    truncated = tmp_path / "trunc.parquet"
    truncated.write_bytes(data[: len(data) // 2])
    message = input_error(check_columns, [str(truncated)], Columns(), "--pool")
    assert message.startswith(f"--pool: {truncated} is not a readable Parquet file")

    png = tmp_path / "image.jsonl"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    message = input_error(check_columns, [str(png)], Columns(), "--pool")
    assert message.startswith(f"--pool: {png} is not JSON Lines or a JSON array")

    prose = tmp_path / "prose.json"
    prose.write_text("hello world\n")
    assert str(prose) in input_error(check_columns, [str(prose)], Columns(), "--pool")

    fake = tmp_path / "fake.parquet"
    fake.write_text('{"text": "a"}\n')
    assert input_error(check_columns, [str(fake)], Columns(), "--pool").startswith(
        f"--pool: {fake} is not a readable Parquet file")


def test_check_columns_empty_files(tmp_path: Path) -> None:
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n\n")
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}])
    assert check_columns([str(empty), text], Columns(), "--pool") == "text"
    assert input_error(check_columns, [str(empty)], Columns(), "--pool").startswith(
        "--pool: no records in any input file")


def test_check_columns_reads_only_the_start(tmp_path: Path) -> None:
    """A JSONL file that goes bad after the sampled records still passes the check."""
    path = tmp_path / "late.jsonl"
    path.write_bytes(b'{"text": "a"}\n' * 150 + b"\x89PNG garbage\n")
    assert check_columns([str(path)], Columns(), "--pool") == "text"


# ---- read_file_rows --------------------------------------------------------------------------

BAD_JSONL = (
    b'{"text": "good one", "id": 7}\n'         # 0
    b"\n"                                       # 1 blank: not a row
    b'{"text": "broken"\n'                      # 2
    b'{"text": "caf\xc3 bad utf8"}\n'           # 3
    b'{"text": null}\n'                         # 4
    b'{"text": ""}\n'                           # 5
    b'{"text": " \\t\\n "}\n'                   # 6
    b'{"text": 12}\n'                           # 7
    b'{"other": "no text here"}\n'              # 8
    b'["an", "array"]\n'                        # 9
    b'{"text": "ok", "id": null}\n'             # 10
    b'{"text": "lone \\ud800 surrogate"}\n'     # 11
    b"   \r\n"                                  # 12 blank
    b'{"text": "last, no newline", "id": "x-1"}'  # 13
)

EXPECTED_REJECTS = {
    0: None,
    2: "broken JSON line:",
    3: "invalid UTF-8",
    4: "null text",
    5: "empty text",
    6: "empty text",
    7: "text is not a string (int)",
    8: "missing column 'text'",
    9: "not a JSON object (list)",
    10: "id is null",
    11: "invalid Unicode in text",
    13: None,
}


def test_jsonl_reject_reasons_and_row_invariant(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(BAD_JSONL)
    rows = read_all(str(path))
    non_blank = [line for line in BAD_JSONL.split(b"\n") if line.strip()]
    assert len(rows) == len(non_blank) == len(EXPECTED_REJECTS)
    assert [r["row"] for r in rows] == list(EXPECTED_REJECTS)
    for r in rows:
        want = EXPECTED_REJECTS[r["row"]]
        if want is None:
            assert r["reject"] is None
        else:
            assert r["reject"].startswith(want), (r["row"], r["reject"])
            assert r["text"] is None
        assert r["source"] == str(path) and r["prompt"] is None and r["response"] is None
    by_row = {r["row"]: r for r in rows}
    assert by_row[0]["id"] == "7" and by_row[0]["text"] == "good one"
    assert by_row[13]["id"] == "x-1" and by_row[13]["text"] == "last, no newline"
    assert by_row[5]["id"] == "bad.jsonl:5"
    assert by_row[10]["id"] == "bad.jsonl:10"
    assert all(r["id"] for r in rows)


def test_prompt_response_mode(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pr.jsonl", [
        {"prompt": "q", "response": "a", "text": "ignored"},
        {"prompt": "", "response": "a"},
        {"prompt": "q", "response": "  "},
        {"prompt": None, "response": "a"},
        {"prompt": "q"},
        {"prompt": "q", "response": ["a"]},
    ])
    rows = read_all(path, mode="prompt_response")
    assert [r["reject"] for r in rows] == [None, None, "empty response", "null prompt",
                                          "missing column 'response'", "response is not a string (list)"]
    assert (rows[0]["prompt"], rows[0]["response"], rows[0]["text"]) == ("q", "a", None)
    assert all(r["prompt"] is None and r["response"] is None for r in rows[2:])


def test_parquet_reading_with_and_without_ids(tmp_path: Path) -> None:
    with_ids = write_parquet(tmp_path / "ids.parquet",
                             {"text": ["a", None, " ", "d"], "id": [10, 11, None, 13], "x": [1, 2, 3, 4]})
    rows = read_all(with_ids)
    assert [r["id"] for r in rows] == ["10", "11", "ids.parquet:2", "13"]
    assert [r["reject"] for r in rows] == [None, "null text", "empty text", None]
    assert [r["row"] for r in rows] == [0, 1, 2, 3]

    no_ids = write_parquet(tmp_path / "part.parquet", {"text": ["a", "b", "c"]}, row_group_size=2)
    assert [r["id"] for r in read_all(no_ids)] == ["part.parquet:0", "part.parquet:1", "part.parquet:2"]

    no_text = write_parquet(tmp_path / "body.parquet", {"body": ["a", "b"]})
    assert [r["reject"] for r in read_all(no_text)] == ["missing column 'text'"] * 2


def test_parquet_invalid_utf8_and_non_string_text(tmp_path: Path) -> None:
    offsets = pa.py_buffer(pa.array([0, 2, 5], pa.int32()).buffers()[1].to_pybytes())
    bad = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(b"ok\xff\xfe!")])
    path = write_parquet(tmp_path / "u.parquet", {"text": bad})
    assert [r["reject"] for r in read_all(path)] == [None, "invalid UTF-8 in text"]
    ints = write_parquet(tmp_path / "i.parquet", {"text": [1, 2]})
    assert [r["reject"] for r in read_all(ints)] == ["text is not a string (int)"] * 2


def test_json_array_and_json_lines_in_dot_json(tmp_path: Path) -> None:
    records = [{"text": "a", "id": "A"}, {"text": "b\u00e9\u4e2d"}, 5, {"text": ""}]
    array = tmp_path / "arr.json"
    array.write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    rows = read_all(str(array))
    assert [r["row"] for r in rows] == [0, 1, 2, 3]
    assert [r["id"] for r in rows] == ["A", "arr.json:1", "arr.json:2", "arr.json:3"]
    assert [r["reject"] for r in rows] == [None, None, "not a JSON object (int)", "empty text"]
    assert rows[1]["text"] == "b\u00e9\u4e2d"

    lines = tmp_path / "lines.json"
    lines.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert [r["text"] for r in read_all(str(lines))] == ["a", "b"]

    empty = tmp_path / "empty.json"
    empty.write_text(" [ ] ")
    assert read_all(str(empty)) == []


def test_json_array_invalid_utf8_element_is_a_reject(tmp_path: Path) -> None:
    path = tmp_path / "u.json"
    path.write_bytes(b'[{"text": "fine"}, {"text": "bad \xff"}, {"text": "also fine"}]')
    assert [r["reject"] for r in read_all(str(path))] == [None, "invalid UTF-8", None]


def test_malformed_json_array_yields_rows_then_raises(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[{"text": "a"}, {"text": "b"}, {"text" "c"}, {"text": "d"}]')
    seen = []
    with pytest.raises(InputError, match="broken.json: malformed JSON array at element 2"):
        for table in read_file_rows(str(path), Columns(), "text", chunk_rows=10):
            seen.extend(table.column("text").to_pylist())
    assert seen == ["a", "b"]


@pytest.mark.parametrize("chunk_bytes", [1, 3, 7])
def test_stream_chunk_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_bytes: int) -> None:
    """Tiny read sizes (multi-byte characters and records split across reads) change nothing."""
    lines = tmp_path / "l.jsonl"
    lines.write_bytes(BAD_JSONL)
    records = [{"text": "\u4e2d\u6587 " * 5, "id": i} for i in range(5)] + [{"text": 3.5}]
    array = tmp_path / "a.json"
    array.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    expected = {p: read_all(str(p)) for p in (lines, array)}
    monkeypatch.setattr(inputs, "_CHUNK_BYTES", chunk_bytes)
    for p, rows in expected.items():
        assert read_all(str(p)) == rows


def test_chunking_gives_the_same_rows(tmp_path: Path) -> None:
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_bytes(BAD_JSONL)
    parquet = write_parquet(tmp_path / "c.parquet", {"text": [f"t{i}" for i in range(7)]}, row_group_size=3)
    for path in (str(jsonl), parquet):
        tables = list(read_file_rows(path, Columns(), "text", chunk_rows=2))
        assert all(t.num_rows <= 2 for t in tables)
        assert [r for t in tables for r in t.to_pylist()] == read_all(path, chunk_rows=4096)


def test_empty_file_yields_one_empty_table(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    path.write_text("")
    tables = list(read_file_rows(str(path), Columns(), "text"))
    assert len(tables) == 1 and tables[0].num_rows == 0 and tables[0].schema.equals(OUTPUT_SCHEMA)


def test_corrupt_parquet_pages_yield_earlier_row_groups_then_raise(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "corrupt.parquet",
                         {"text": [f"row {i} " * 20 for i in range(300)]},
                         row_group_size=100, compression="none")
    offset = pq.ParquetFile(path).metadata.row_group(1).column(0).data_page_offset
    data = bytearray(Path(path).read_bytes())
    data[offset:offset + 64] = b"\xff" * 64
    Path(path).write_bytes(bytes(data))
    assert check_columns([path], Columns(), "--pool") == "text"  # the footer is fine
    seen = []
    with pytest.raises(InputError, match="corrupt.parquet: corrupt Parquet data"):
        for table in read_file_rows(path, Columns(), "text", chunk_rows=64):
            seen.extend(table.column("row").to_pylist())
    assert seen == list(range(100))


def test_id_prefix_and_fallback_id_prefixes(tmp_path: Path) -> None:
    a = write_parquet(tmp_path / "a" / "part-0.parquet", {"text": ["x"]})
    b = write_parquet(tmp_path / "b" / "part-0.parquet", {"text": ["y"]})
    c = write_jsonl(tmp_path / "c.jsonl", [{"text": "z"}])
    prefixes = fallback_id_prefixes([a, b, c])
    assert prefixes == {a: "a/part-0.parquet", b: "b/part-0.parquet", c: "c.jsonl"}
    assert read_all(a, id_prefix=prefixes[a])[0]["id"] == "a/part-0.parquet:0"


# ---- read_original_rows ----------------------------------------------------------------------

def test_read_original_rows_parquet(tmp_path: Path) -> None:
    table = pa.table({"text": [f"t{i}" for i in range(10)], "score": [float(i) for i in range(10)],
                      "meta": [{"k": i} for i in range(10)]})
    path = write_parquet(tmp_path / "o.parquet", table, row_group_size=3)
    got = read_original_rows(path, [7, 0, 4, 7])
    assert got.column_names == ["text", "score", "meta", "row"]
    assert got.column("text").to_pylist() == ["t7", "t0", "t4", "t7"]
    assert got.column("meta").to_pylist() == [{"k": 7}, {"k": 0}, {"k": 4}, {"k": 7}]
    assert got.column("row").to_pylist() == [7, 0, 4, 7]
    assert got.schema.field("row").type == pa.int64()
    assert read_original_rows(path, []).num_rows == 0
    with pytest.raises(IndexError):
        read_original_rows(path, [10])


def test_read_original_rows_jsonl_and_array(tmp_path: Path) -> None:
    jsonl = tmp_path / "o.jsonl"
    jsonl.write_text('{"text": "a", "tag": 1}\n\n{"text": "b", "extra": [1, 2]}\n'
                     '{"text": "c", "tag": "mixed"}\n')
    got = read_original_rows(str(jsonl), [3, 0, 2])
    assert got.column_names == ["text", "tag", "extra", "row"]
    assert got.column("text").to_pylist() == ["c", "a", "b"]
    assert got.column("tag").to_pylist() == ["mixed", "1", None]  # int/str mix -> text
    assert got.column("extra").to_pylist() == [None, None, [1, 2]]
    assert got.column("row").to_pylist() == [3, 0, 2]
    with pytest.raises(IndexError):
        read_original_rows(str(jsonl), [1])  # a blank line is not a row

    array = tmp_path / "o.json"
    array.write_text(json.dumps([{"prompt": "p0", "response": "r0"}, {"prompt": "p1", "response": "r1"}]))
    got = read_original_rows(str(array), [1])
    assert got.to_pylist() == [{"prompt": "p1", "response": "r1", "row": 1}]


def test_rows_round_trip_from_read_file_rows(tmp_path: Path) -> None:
    """The (source, row) of read_file_rows finds the same record in read_original_rows."""
    path = tmp_path / "rt.jsonl"
    path.write_bytes(BAD_JSONL)
    good = [r for r in read_all(str(path)) if r["reject"] is None]
    got = read_original_rows(str(path), [r["row"] for r in good])
    assert got.column("text").to_pylist() == [r["text"] for r in good]


def test_input_error_is_one_line() -> None:
    assert str(InputError("a\nb\r\n  c")) == "a b c"
    assert isinstance(InputError("x"), ValueError)


def test_glob_skips_hidden_and_underscore_names_unless_spelled_out(tree: Path) -> None:
    for base in (str(tree), tree.as_uri()):
        got = resolve_paths(base + "/**/*.jsonl", "--pool")
        assert got == [base + "/b.jsonl"]
        assert resolve_paths(base + "/_tmp/*.jsonl", "--pool") == [base + "/_tmp/y.jsonl"]


# ---- count_rows --------------------------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ntk_ray.io.rows import count_rows  # noqa: E402

_LINES = [b'{"text": "a"}', b'{"text": "\xe4\xb8\xad"}', b"", b"  ", b"\t\r", b"\r", b"\x0b\x0c", b"{broken",
          b'{"text": "\xff"}', b"\xef\xbb\xbf", b" 5 ", b'{"text": "b"}\r', b"\xc2\xa0"]


@settings(max_examples=60, deadline=None)
@given(lines=st.lists(st.sampled_from(_LINES), max_size=12), bom=st.booleans(), trailing=st.booleans(),
       chunk=st.sampled_from([1, 2, 3, 5, 1 << 20]), at_most=st.one_of(st.none(), st.integers(0, 8)))
def test_count_rows_matches_read_file_rows_for_any_jsonl(lines, bom, trailing, chunk, at_most) -> None:
    data = (b"\xef\xbb\xbf" if bom else b"") + b"\n".join(lines) + (b"\n" if trailing and lines else b"")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.jsonl"
        path.write_bytes(data)
        expected = len(read_all(str(path)))
        old = inputs._CHUNK_BYTES
        inputs._CHUNK_BYTES = chunk
        try:
            got = count_rows([str(path)], at_most=at_most)
        finally:
            inputs._CHUNK_BYTES = old
    assert got == (expected if at_most is None else min(expected, at_most))


def test_count_rows_parquet_json_array_compressed_and_several_files(tmp_path: Path) -> None:
    pq_path = write_parquet(tmp_path / "a.parquet", {"text": [f"t{i}" for i in range(7)]}, row_group_size=3)
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_bytes(BAD_JSONL)
    arr = tmp_path / "c.json"
    arr.write_text(json.dumps([{"text": "x"}, 5, {"text": ""}]))
    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"text": "x"}\n\n{"text": "y"}\n'))
    paths = [pq_path, str(jsonl), str(arr), str(gz)]
    expected = sum(len(read_all(p)) for p in paths)
    assert count_rows(paths) == expected == 7 + len(EXPECTED_REJECTS) + 3 + 2
    assert count_rows(paths, at_most=9) == 9
    assert count_rows(paths, at_most=10**6) == expected
    assert count_rows([]) == 0


def test_count_rows_errors_name_the_flag_and_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('[{"text": "a"}, {"text" "b"}]')
    message = input_error(lambda: count_rows([str(broken)], flag="--pool"))
    assert message.startswith("--pool: ") and "broken.json: malformed JSON array at element 1" in message
    # with at_most reached before the broken element, the file is not read that far
    assert count_rows([str(broken)], flag="--pool", at_most=1) == 1
    truncated = tmp_path / "t.parquet"
    write_parquet(truncated, {"text": ["a", "b"]})
    truncated.write_bytes(truncated.read_bytes()[:-10])
    message = input_error(lambda: count_rows([str(truncated)], flag="--domain"))
    assert message.startswith("--domain: ") and "t.parquet is not a readable Parquet file" in message


# ---- on_corrupt="reject": a file that breaks part-way gives rejects, never a crash ------------------

def _corrupt_second_row_group(path: Path) -> str:
    write_parquet(path, {"text": [f"row {i} " * 20 for i in range(300)]}, row_group_size=100, compression="none")
    offset = pq.ParquetFile(str(path)).metadata.row_group(1).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    data[offset:offset + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    return str(path)


def test_corrupt_parquet_row_group_becomes_rejects_and_reading_goes_on(tmp_path: Path) -> None:
    path = _corrupt_second_row_group(tmp_path / "corrupt.parquet")
    rows = read_all(path, chunk_rows=64, on_corrupt="reject")
    assert [r["row"] for r in rows] == list(range(300)) and count_rows([path]) == 300
    assert all(r["reject"] is None for r in rows[:100] + rows[200:])
    assert all(r["reject"].startswith("corrupt Parquet data in row group 1: ") for r in rows[100:200])
    assert all("\n" not in r["reject"] for r in rows[100:200])


def test_malformed_json_array_ends_with_one_reject_row(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[{"text": "a"}, {"text": "b"}, {"text" "c"}, {"text": "d"}]')
    rows = read_all(str(path), on_corrupt="reject")
    assert [(r["row"], r["text"]) for r in rows[:2]] == [(0, "a"), (1, "b")]
    assert len(rows) == 3 and rows[2]["row"] == 2 and rows[2]["id"] == "broken.json:2"
    assert rows[2]["reject"].startswith("unreadable rest of file: ") and "element 2" in rows[2]["reject"]


def test_truncated_gzip_jsonl_ends_with_one_reject_row(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl.gz"
    path.write_bytes(gzip.compress(b"".join(b'{"text": "row %d"}\n' % i for i in range(2000)))[:-200])
    rows = read_all(str(path), on_corrupt="reject")
    assert rows[-1]["reject"].startswith("unreadable rest of file: ")
    assert all(r["reject"] is None for r in rows[:-1]) and [r["row"] for r in rows] == list(range(len(rows)))
    with pytest.raises(InputError):
        read_all(str(path))


def test_on_corrupt_is_checked() -> None:
    with pytest.raises(ValueError, match="on_corrupt"):
        next(read_file_rows("x.jsonl", Columns(), "text", on_corrupt="ignore"))


def test_fallback_id_prefixes_use_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "x").mkdir()
    monkeypatch.chdir(tmp_path / "x")
    write_jsonl(tmp_path / "x" / "part.jsonl", [{"text": "a"}])
    write_jsonl(tmp_path / "y" / "part.jsonl", [{"text": "b"}])
    # the same file spelled twice gets one prefix; the other file another
    got = fallback_id_prefixes(["part.jsonl", "./part.jsonl", "../y/part.jsonl"])
    assert got == {"part.jsonl": "x/part.jsonl", "./part.jsonl": "x/part.jsonl", "../y/part.jsonl": "y/part.jsonl"}


# ---- the id rule ---------------------------------------------------------------------------------

def test_id_rule_keeps_int_and_float_apart(tmp_path: Path) -> None:
    """Ids are strings; an integer is its digits (the string "1" is the same id), a float keeps its
    decimal point (1.0 is another id than 1), inf is a reject, NaN is null."""
    path = write_jsonl(tmp_path / "ids.jsonl", [
        {"id": 1, "text": "a"}, {"id": "1", "text": "b"}, {"id": 1.0, "text": "c"}, {"id": 2.5, "text": "d"},
        {"id": 1e20, "text": "e"}, {"id": 12345678901234567890, "text": "f"}, {"id": -0.0, "text": "g"},
    ])
    assert [r["id"] for r in read_all(path)] == ["1", "1", "1.0", "2.5", "1e+20", "12345678901234567890", "-0.0"]
    pq_path = write_parquet(tmp_path / "f.parquet", {"text": ["a", "b", "c", "d"],
                                                     "id": [1.0, float("nan"), float("inf"), 3.25]})
    rows = read_all(pq_path)
    assert [r["id"] for r in rows] == ["1.0", "f.parquet:1", "f.parquet:2", "3.25"]
    assert [r["reject"] for r in rows] == [None, "id is null", "id is not finite (inf)", None]


def test_a_real_id_that_looks_like_a_fallback_id_is_a_reject(tmp_path: Path) -> None:
    """A fallback id (<file>:<row>) can never equal a real id: real ids of that form are rejected."""
    from ntk_ray.io.rows import FALLBACK_LIKE_REASON, looks_like_fallback_id

    path = write_jsonl(tmp_path / "p.jsonl", [
        {"text": "no id, so p.jsonl:0"},
        {"id": "p.jsonl:0", "text": "pretends to be row 0"},
        {"id": "a/part-0.parquet:12", "text": "another file's fallback form"},
        {"id": "doc:3", "text": "fine: doc is not a data file name"},
        {"id": "p.jsonl:x", "text": "fine: not a row number"},
    ])
    rows = read_all(path)
    assert [r["reject"] for r in rows] == [None, FALLBACK_LIKE_REASON, FALLBACK_LIKE_REASON, None, None]
    assert [r["id"] for r in rows] == ["p.jsonl:0", "p.jsonl:1", "p.jsonl:2", "doc:3", "p.jsonl:x"]
    usable = [r["id"] for r in rows if r["reject"] is None]
    assert len(usable) == len(set(usable))
    assert looks_like_fallback_id("x.csv.gz:3") is False  # .csv is not read compressed
    assert looks_like_fallback_id("x.jsonl.gz:3") and looks_like_fallback_id("d.tsv:0")


# ---- symlinks: read once, never looped, never silently skipped --------------------------------

def test_a_file_reached_twice_is_read_once_by_real_path(tmp_path: Path) -> None:
    real = write_jsonl(tmp_path / "d" / "a.jsonl", [{"text": "a"}])
    (tmp_path / "link.jsonl").symlink_to(real)
    (tmp_path / "alias").symlink_to(tmp_path / "d", target_is_directory=True)
    got = resolve_paths([str(tmp_path / "d" / "*.jsonl"), str(tmp_path / "d" / "a.*"), str(tmp_path / "link.jsonl"),
                         str(tmp_path / "alias")], "--pool")
    assert got == [str(tmp_path / "d" / "a.jsonl")]


def test_recursive_glob_does_not_follow_a_symlink_loop(tmp_path: Path) -> None:
    d = tmp_path / "d"
    write_jsonl(d / "one.jsonl", [{"text": f"r{i}"} for i in range(10)])
    (d / "loop").symlink_to(d, target_is_directory=True)
    (d / "sub").mkdir()
    (d / "sub" / "up").symlink_to(d, target_is_directory=True)
    files = resolve_paths(str(d / "**" / "*.jsonl"), "--pool")
    assert files == [str(d / "one.jsonl")]
    assert sum(1 for f in files for _ in read_all(f)) == 10
    assert resolve_paths(str(d), "--pool") == [str(d / "one.jsonl")]  # the directory walk too


def test_a_directory_follows_symlinked_subdirectories(tmp_path: Path) -> None:
    elsewhere = write_jsonl(tmp_path / "elsewhere" / "b.jsonl", [{"text": "b"}])
    d = tmp_path / "d"
    write_jsonl(d / "a.jsonl", [{"text": "a"}])
    (d / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (d / "dangling").symlink_to(tmp_path / "nowhere", target_is_directory=True)
    assert resolve_paths(str(d), "--pool") == [str(d / "a.jsonl"), str(d / "linked" / "b.jsonl")]
    assert Path(elsewhere).exists()
    # and through a ** glob
    assert resolve_paths(str(d / "**" / "*.jsonl"), "--pool") == [str(d / "a.jsonl"), str(d / "linked" / "b.jsonl")]
