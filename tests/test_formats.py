"""Tests of ntk_ray.io.formats: CSV/TSV through the same public functions as JSONL, and the
format registry as the one place that knows suffixes (no Ray)."""

from __future__ import annotations

import io
import json
import tokenize
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ntk_ray.io import formats, paths, rows
from ntk_ray.io.formats import FORMATS, Csv, FileFormat, JsonArray, JsonLines, Parquet, format_for
from ntk_ray.io.paths import resolve_paths
from ntk_ray.io.rows import (
    MODE_PROMPT_RESPONSE,
    MODE_TEXT,
    OUTPUT_SCHEMA,
    Columns,
    InputError,
    check_columns,
    count_rows,
    read_file_rows,
    read_original_rows,
    read_records,
)

SEP = {".csv": ",", ".tsv": "\t"}


def write(path: Path, lines: list[str], newline: str = "\n") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((newline.join(lines) + newline).encode("utf-8"))
    return str(path)


def table_file(tmp_path: Path, suffix: str, header: list[str], records: list[list[str]], name: str = "a") -> str:
    """A CSV/TSV file; a field holding the delimiter, a quote or a newline is quoted."""
    sep = SEP[suffix]

    def field(value: str) -> str:
        if any(c in value for c in (sep, '"', "\n", "\r")):
            return '"' + value.replace('"', '""') + '"'
        return value

    return write(tmp_path / f"{name}{suffix}", [sep.join(map(field, r)) for r in [header] + records])


def read_all(path: str, cols: Columns = Columns(), mode: str = MODE_TEXT, **kwargs) -> list[dict]:
    out = []
    for table in read_file_rows(path, cols, mode, **kwargs):
        assert table.schema.equals(OUTPUT_SCHEMA)
        out.extend(table.to_pylist())
    return out


def usable(got: list[dict]) -> list[dict]:
    return [r for r in got if r["reject"] is None]


# ---- reading ---------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_text_mode_with_id_column(tmp_path: Path, suffix: str) -> None:
    sep = SEP[suffix]
    label = suffix[1:].upper()
    path = write(tmp_path / f"a{suffix}", [
        sep.join(["id", "text", "extra"]),
        sep.join(["007", "hello", "x"]),                    # row 0: the id stays a string, "007"
        sep.join(["2", '"two lines\nwith ""quotes"" and ' + sep + '"', "y"]),  # row 1: quoted
        sep.join(["3", "a", "b", "c"]),                     # row 2: one field too many
        "",                                                 # blank: not a record, not counted
        sep.join(["4", "", "z"]),                           # row 3: empty text
        "5",                                                # row 4: one field only
        sep.join(["6", "123", "NA"]),                       # row 5: no type guessing
    ])
    got = read_all(path)
    assert [r["row"] for r in got] == [0, 1, 2, 3, 4, 5]
    assert {r["source"] for r in got} == {path}
    assert [r["id"] for r in got] == ["007", "2", f"a{suffix}:2", "4", f"a{suffix}:4", "6"]
    assert [r["text"] for r in got] == ["hello", f'two lines\nwith "quotes" and {sep}', None, None, None, "123"]
    assert [r["reject"] for r in got] == [
        None, None, f"malformed {label} row: 4 fields, the header has 3", "empty text",
        f"malformed {label} row: 1 field, the header has 3", None]
    assert all(r["prompt"] is None and r["response"] is None for r in got)
    assert check_columns([path], Columns(), "--pool") == MODE_TEXT
    # chunking does not change anything
    assert read_all(path, chunk_rows=1) == got


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_prompt_response_mode_without_id_column(tmp_path: Path, suffix: str) -> None:
    path = table_file(tmp_path, suffix, ["prompt", "response"], [
        ["What is 2+2?", "4"],
        ["", "an empty prompt is fine"],
        ["Write a poem,\nplease", 'Roses are "red"'],
        ["p", " "],
    ])
    assert check_columns([path], Columns(), "--pool") == MODE_PROMPT_RESPONSE
    got = read_all(path, mode=MODE_PROMPT_RESPONSE)
    assert [r["id"] for r in got] == [f"a{suffix}:{i}" for i in range(4)]
    assert [(r["prompt"], r["response"]) for r in usable(got)] == [
        ("What is 2+2?", "4"), ("", "an empty prompt is fine"), ("Write a poem,\nplease", 'Roses are "red"')]
    assert got[3]["reject"] == "empty response" and got[3]["prompt"] is None
    assert all(r["text"] is None for r in got)
    # an id prefix from fallback_id_prefixes is used as for JSONL
    assert [r["id"] for r in read_all(path, mode=MODE_PROMPT_RESPONSE, id_prefix="x/a")][:1] == ["x/a:0"]


def test_csv_rows_match_jsonl_rows(tmp_path: Path) -> None:
    """The same records in CSV and JSONL give the same ids, texts and rejects."""
    records = [{"id": "a", "text": "one"}, {"id": "b", "text": ""}, {"id": "", "text": "x"},
               {"id": "c", "text": "line\nbreak"}, {"id": "a", "text": "dup ids are a later stage's job"}]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    csv = table_file(tmp_path, ".csv", ["id", "text"], [[r["id"], r["text"]] for r in records], name="t")
    keep = ("id", "row", "text", "prompt", "response", "reject")
    assert [{k: r[k] for k in keep} for r in read_all(csv, id_prefix="t")] == \
           [{k: r[k] for k in keep} for r in read_all(str(jsonl), id_prefix="t")]


def test_crlf_bom_invalid_utf8_and_explicit_columns(tmp_path: Path) -> None:
    path = tmp_path / "w.csv"
    path.write_bytes(b"\xef\xbb\xbfuid,body\r\n1,caf\xc3\xa9\r\n2,bad \xff byte\r\n\xfe,ok\r\n")
    cols = Columns(text="body", id="uid")
    assert check_columns([str(path)], cols, "--pool") == MODE_TEXT
    got = read_all(str(path), cols)
    assert [(r["id"], r["text"], r["reject"]) for r in got] == [
        ("1", "caf\u00e9", None), ("2", None, "invalid UTF-8 in text"), ("w.csv:2", None, "invalid UTF-8 in id")]


def test_empty_and_header_only_files(tmp_path: Path) -> None:
    empty = tmp_path / "e.csv"
    empty.write_bytes(b"")
    header_only = write(tmp_path / "h.csv", ["id,text"])
    good = write(tmp_path / "g.csv", ["text", "hello"])
    for path in (str(empty), header_only):
        tables = list(read_file_rows(path, Columns(), MODE_TEXT))
        assert len(tables) == 1 and tables[0].num_rows == 0 and tables[0].schema.equals(OUTPUT_SCHEMA)
        assert count_rows([path]) == 0
        assert read_records(path) == ([], [])
    # empty files have no say in the mode; no records at all is an error
    assert check_columns([str(empty), header_only, good], Columns(), "--pool") == MODE_TEXT
    with pytest.raises(InputError, match=r"^--domain: no records in any input file"):
        check_columns([str(empty), header_only], Columns(), "--domain")


def test_missing_columns_name_the_flag_and_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "m.tsv", ["body\tid", "x\t1"])
    with pytest.raises(InputError) as info:
        check_columns([path], Columns(), "--pool")
    assert str(info.value) == (f"--pool: {path} has no column 'text' (--text-column) nor 'prompt' "
                               f"(--prompt-column) and 'response' (--response-column) nor 'messages'/'conversations' "
                               f"(--messages-column); columns found: body, id")
    with pytest.raises(InputError, match="has no column 'uid' \\(--id-column\\)"):
        check_columns([path], Columns(text="body", id="uid"), "--pool")


def test_unreadable_rest_of_file_is_one_reject(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A record larger than pyarrow's block cannot be read: with on_corrupt="reject" the rest of
    the file is ONE reject, as for JSON; with "raise" an InputError naming the file."""
    monkeypatch.setattr(formats, "_CSV_BLOCK_BYTES", 64)
    path = write(tmp_path / "big.csv", ["text"] + ["short"] * 3 + ["x" * 500, "after"])
    with pytest.raises(InputError, match="big.csv"):
        read_all(path)
    got = read_all(path, on_corrupt="reject")
    assert got[-1]["reject"].startswith("unreadable rest of file:")
    assert [r["row"] for r in got] == list(range(len(got)))


# ---- count_rows, read_original_rows, read_records ---------------------------------------------

def test_count_rows_on_csv(tmp_path: Path) -> None:
    csv = write(tmp_path / "a.csv", ["id,text", "1,a", '2,"b\nc"', "3,x,y", "", "4,d"])
    tsv = table_file(tmp_path, ".tsv", ["text"], [["t"], ["u"]], name="b")
    for path in (csv, tsv):
        assert count_rows([path]) == len(read_all(path))
    assert count_rows([csv]) == 4  # the malformed record counts, the blank line does not
    assert count_rows([csv, tsv]) == 6
    assert count_rows([csv, tsv], at_most=5) == 5
    assert count_rows([csv, tsv], at_most=2) == 2
    assert count_rows([csv], at_most=0) == 0


def test_read_original_rows_on_csv(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", ["id,text,score", "007,hello,1.5", '2,"multi\nline",', "3,x,y,z", "4,d,"])
    table = read_original_rows(path, [3, 0, 1, 0])
    assert table.column_names == ["id", "text", "score", "row"]
    assert table.schema.field("id").type == pa.string() and table.schema.field("score").type == pa.string()
    assert table.to_pylist() == [
        {"id": "4", "text": "d", "score": "", "row": 3},
        {"id": "007", "text": "hello", "score": "1.5", "row": 0},
        {"id": "2", "text": "multi\nline", "score": "", "row": 1},
        {"id": "007", "text": "hello", "score": "1.5", "row": 0},
    ]
    assert read_original_rows(path, []).num_rows == 0
    with pytest.raises(ValueError, match="row 2 is not a readable CSV record"):
        read_original_rows(path, [2])  # the malformed record
    with pytest.raises(IndexError, match="no record at row 9"):
        read_original_rows(path, [0, 9])


def test_read_records_on_csv(tmp_path: Path) -> None:
    path = write(tmp_path / "a.tsv", ["text\tanswer", "q1\tA", "q2", "q3\tC"])
    good, bad = read_records(path)
    assert good == [{"text": "q1", "answer": "A"}, {"text": "q3", "answer": "C"}]
    assert bad == [(1, "malformed TSV row: 1 field, the header has 2")]


# ---- the registry ------------------------------------------------------------------------------

def test_registry_lists_every_format_once() -> None:
    assert all(isinstance(fmt, FileFormat) for fmt in FORMATS)
    kinds = [type(fmt) for fmt in FORMATS]
    assert {JsonLines, JsonArray, Parquet, Csv} <= set(kinds)
    names = {"a.jsonl": "jsonl", "a.JSONL.gz": "jsonl", "a.json": "json", "a.json.zst": "json",
             "a.parquet": "parquet", "a.csv": "csv", "A.TSV": "tsv", "s3://b/k/a.csv?region=x": "csv"}
    for name, expected in names.items():
        fmt = format_for(name)
        assert fmt is not None and fmt.name == expected, name
        assert sum(f.matches(paths.file_name(name)) for f in FORMATS) == 1, name
    for name in ("a.txt", "a.csv.gz", "a.parquet.gz", "a.xlsx", "csv"):
        assert format_for(name) is None, name


def test_resolve_paths_takes_csv_and_tsv(tmp_path: Path) -> None:
    d = tmp_path / "d"
    csv = write(d / "a.csv", ["text", "x"])
    tsv = write(d / "sub" / "b.tsv", ["text", "y"])
    write(d / "notes.txt", ["not data"])
    write(d / "_tmp" / "c.csv", ["text", "z"])
    assert resolve_paths(csv, "--pool") == [csv]
    assert resolve_paths(str(d), "--pool") == [csv, tsv]
    assert resolve_paths(str(d / "**" / "*.tsv"), "--pool") == [tsv]
    uri = d.as_uri()
    assert resolve_paths(uri, "--pool") == [uri + "/a.csv", uri + "/sub/b.tsv"]
    assert [r["text"] for r in read_all(uri + "/sub/b.tsv")] == ["y"]
    with pytest.raises(InputError, match=r"unsupported file type .*\(expected \.jsonl, \.json, \.parquet, \.csv, \.tsv or \.arrow"):
        resolve_paths(str(d / "notes.txt"), "--pool")


def test_a_new_format_needs_only_the_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Adding one instance to the registry is enough for every public function."""
    monkeypatch.setattr(formats, "FORMATS", formats.FORMATS + (Csv(".psv", "|"),))
    d = tmp_path / "d"
    path = write(d / "a.psv", ["id|text", "1|one", "2|two|extra"])
    assert resolve_paths(str(d), "--pool") == [path]
    assert check_columns([path], Columns(), "--pool") == MODE_TEXT
    assert count_rows([path]) == 2
    assert [(r["id"], r["reject"]) for r in read_all(path)] == [
        ("1", None), ("a.psv:1", "malformed PSV row: 3 fields, the header has 2")]
    assert read_original_rows(path, [0]).to_pylist() == [{"id": "1", "text": "one", "row": 0}]


SUFFIXES = {'".jsonl"', '".json"', '".parquet"', '".csv"', '".tsv"', '".gz"', '".bz2"', '".zst"',
            "'.jsonl'", "'.json'", "'.parquet'", "'.csv'", "'.tsv'", "'.gz'", "'.bz2'", "'.zst'"}


@pytest.mark.parametrize("module", [paths, rows])
def test_only_the_registry_spells_suffixes(module) -> None:
    """paths and rows never branch on a suffix: no suffix literal in their code (docstrings aside)."""
    source = Path(module.__file__).read_text(encoding="utf-8")
    literals = [tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.STRING]
    assert not [s for s in literals if s in SUFFIXES]


# ---- a row over the size limit is a reject, never loaded whole -------------------------------------

def test_a_jsonl_line_over_the_limit_is_a_reject_and_never_held_whole(tmp_path):
    import json
    import tracemalloc

    from ntk_ray.io.formats import MAX_ROW_BYTES, ROW_TOO_LARGE
    from ntk_ray.io.rows import Columns, count_rows, read_file_rows

    huge = 30 << 20
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps({"id": "a", "text": "fine"}) + "\n")
        f.write('{"id": "b", "text": "' + "x" * huge + '"}\n')
        f.write(json.dumps({"id": "c", "text": "x" * (1 << 20)}) + "\n")
        f.write(json.dumps({"id": "d", "text": "also fine"}) + "\n")
    tracemalloc.start()
    try:
        rows = [(r["id"], r["row"], r["reject"]) for t in read_file_rows(str(path), Columns(), "text", chunk_rows=1)
                for r in t.select(["id", "row", "reject"]).to_pylist()]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rows == [("a", 0, None), ("big.jsonl:1", 1, ROW_TOO_LARGE), ("c", 2, None), ("d", 3, None)]
    assert ROW_TOO_LARGE == "row too large (over 8 MiB of text)"
    assert peak < huge // 2, peak  # the 30 MiB line was dropped as it was read
    assert count_rows([str(path)]) == 4
    # the limit itself, on any chunking: a line of exactly `limit` bytes is kept, one more byte is not
    from ntk_ray.io.formats import _TooLarge, _iter_lines

    data = b"12345\n123456\n\n1234"
    for size in (1, 2, 3, 7, 100):
        chunks = [data[i:i + size] for i in range(0, len(data), size)]
        got = [x if isinstance(x, bytes) else "too large" for x in _iter_lines(chunks, limit=5)]
        assert got == [b"12345", "too large", b"", b"1234"], size
    assert MAX_ROW_BYTES == 8 << 20 and _TooLarge


def test_a_parquet_row_over_the_limit_is_a_reject(tmp_path):
    from ntk_ray.io.formats import MAX_ROW_BYTES, ROW_TOO_LARGE
    from ntk_ray.io.rows import Columns, read_file_rows

    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c"],
                             "text": ["fine", "y" * (MAX_ROW_BYTES + 1), "also fine"]}), path)
    rows = [r for t in read_file_rows(str(path), Columns(), "text") for r in t.to_pylist()]
    assert [(r["id"], r["reject"]) for r in rows] == [("a", None), ("big.parquet:1", ROW_TOO_LARGE), ("c", None)]
    assert rows[2]["text"] == "also fine"
