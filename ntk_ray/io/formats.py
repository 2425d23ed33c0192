"""The input formats: one class per file format, all behind the :class:`FileFormat` protocol.

Formats
    * JSON Lines (:class:`JsonLines`): ``.jsonl`` (optionally compressed: ``.gz``, ``.bz2``,
      ``.zst``, detected from the suffix by pyarrow). ``row`` is the *physical* line index (blank
      lines are not rows but do count for the numbering, so ``row`` is the line number minus one
      in any editor).
    * JSON (:class:`JsonArray`): ``.json`` (compressed as JSON Lines). A file whose first
      non-blank character is ``[`` is read as one top-level JSON array of objects, streamed
      element by element (``row`` is the element index); any other ``.json`` file is read as
      JSON Lines.
    * Parquet (:class:`Parquet`): ``.parquet``, read in record batches, never whole (``row`` is
      the Parquet row).
    * CSV and TSV (:class:`Csv`): ``.csv`` (comma) and ``.tsv`` (tab), with a header line, read
      in blocks by ``pyarrow.csv``. Every column is a string, as written (no type inference: an
      id ``007`` stays ``007``, an empty field is an empty string, ``NA`` is the text ``NA``).
      Fields may be quoted with ``"`` (``""`` inside quotes is one ``"``) and then hold the
      delimiter and newlines, in TSV too. ``row`` is the 0-based index of the record below the
      header (a record may span several lines; blank lines are skipped and not counted). A
      record with another number of fields than the header is a reject (``malformed CSV row:
      3 fields, the header has 2``); one record must fit in 16 MiB.
    * Arrow IPC (:class:`Arrow`): ``.arrow``, the data files of a ``datasets`` ``save_to_disk``
      directory (:mod:`ntk_ray.io.hf` finds them), read batch by batch (``row`` is the row of the
      file).

:data:`FORMATS` is the ONE registry and :func:`format_for` the one place that maps a file name
to its format: no other module looks at suffixes. A format yields records as (0-based row,
value) pairs; a value that cannot be decoded at all is a :class:`BadRecord` (its reason goes to
the reject column), a value of a column that is not valid UTF-8 is :data:`INVALID_UTF8`. What a
record means (text, prompt/response, id, rejects) is decided by :mod:`ntk_ray.io.rows`.
"""

from __future__ import annotations

import bisect
import codecs
import json
import re
from dataclasses import dataclass
from itertools import chain, pairwise
from typing import Any, Iterable, Iterator, Protocol, Sequence, runtime_checkable

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ntk_ray.io.fs import InputError, file_name, filesystem

__all__ = [
    "FORMATS",
    "INVALID_UTF8",
    "ROW_COLUMN",
    "Arrow",
    "BadRecord",
    "Csv",
    "FileFormat",
    "JsonArray",
    "JsonLines",
    "Parquet",
    "Span",
    "encodable",
    "expected_suffixes",
    "format_for",
    "one_line",
    "reader_for",
    "scan_range",
    "suffix_list",
]

ROW_COLUMN = "row"
_JSON_COMPRESSIONS = (".gz", ".bz2", ".zst")
_SAMPLE_RECORDS = 100          # records looked at per JSON file by sample_columns
_CHUNK_BYTES = 1 << 20         # read size for JSON streams
_MAX_RECORD_CHARS = 1 << 28    # a JSON array element larger than this is treated as malformed
_BOM = b"\xef\xbb\xbf"
_DECODER = json.JSONDecoder(strict=False)  # raw control characters inside strings are accepted
_WS = re.compile(r"[ \t\n\r]*")
_SURROGATE = re.compile("[\ud800-\udfff]")
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # what surrogateescape turns invalid UTF-8 into


@dataclass(frozen=True)
class BadRecord:
    """A record that could not be decoded at all; ``reason`` goes to the reject column."""

    reason: str


INVALID_UTF8 = BadRecord("invalid UTF-8")  # a column value whose bytes are not UTF-8


def encodable(value: str) -> bool:
    """False for strings with unpaired surrogates (possible via JSON ``\\ud800`` escapes)."""
    return value.isascii() or _SURROGATE.search(value) is None


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one short line (for reject reasons)."""
    text = re.sub(r"\s+", " ", str(exc)).strip() or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# low-level JSON reading
# --------------------------------------------------------------------------------------------

def _iter_chunks(stream: Any) -> Iterator[bytes]:
    while True:
        chunk = stream.read(_CHUNK_BYTES)
        if not chunk:
            return
        yield bytes(chunk)


#: a row (a JSONL line, the text values of a Parquet row) larger than this is the reject
#: ``row too large``, and a JSONL line that long is never assembled in memory
MAX_ROW_BYTES = 8 << 20
ROW_TOO_LARGE = f"row too large (over {MAX_ROW_BYTES >> 20} MiB of text)"


class _TooLarge:
    """What :func:`_iter_lines` yields for a line over :data:`MAX_ROW_BYTES` (its bytes dropped)."""


def _iter_lines(chunks: Iterable[bytes], limit: int | None = None) -> Iterator[bytes | _TooLarge]:
    """Split a byte stream on ``\\n`` (``\\r`` is left for JSON to ignore), linear in the size.
    A line longer than ``limit`` bytes (default :data:`MAX_ROW_BYTES`) comes as a
    :class:`_TooLarge`, and its bytes are dropped as they are read (never held whole); such a
    line with nothing but blanks in it comes as ``b""`` (a blank line, as :func:`_count_lines`
    counts it)."""
    limit = MAX_ROW_BYTES if limit is None else limit
    parts: list[bytes] = []
    size = 0
    over = inked = False  # inked: a line over the limit has a non-blank byte
    for chunk in chunks:
        start = 0
        while True:
            newline = chunk.find(b"\n", start)
            piece = chunk[start:] if newline < 0 else chunk[start:newline]
            if not over and size + len(piece) > limit:
                over = True
                inked = any(_NON_BLANK.search(p) for p in parts) or _NON_BLANK.search(piece) is not None
                parts = []
            elif not over and piece:
                parts.append(piece)
            elif over and not inked:
                inked = _NON_BLANK.search(piece) is not None
            size += len(piece)
            if newline < 0:
                break
            yield (_TooLarge() if inked else b"") if over else b"".join(parts)
            parts, size, over = [], 0, False
            start = newline + 1
    if parts or over:
        yield (_TooLarge() if inked else b"") if over else b"".join(parts)


def _sniff_array(chunks: Iterator[bytes]) -> tuple[bool, Iterator[bytes]]:
    """Whether the first non-blank byte (after a BOM) is ``[``, and the chunks, unconsumed."""
    seen: list[bytes] = []
    is_array = False
    for chunk in chunks:
        seen.append(chunk)
        head = b"".join(seen)
        head = head[3:] if head.startswith(_BOM) else head
        stripped = head.lstrip()
        if stripped:
            is_array = stripped.startswith(b"[")
            break
    return is_array, chain(seen, chunks)


def _parse_line(raw: bytes) -> Any:
    """One JSONL line -> the parsed value, or a :class:`BadRecord` with the reason."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return BadRecord(f"invalid UTF-8 (byte {exc.start} of the line)")
    try:
        return _DECODER.decode(text)
    except RecursionError:
        return BadRecord("broken JSON line: nested too deeply")
    except ValueError as exc:  # JSONDecodeError, or an over-long integer
        return BadRecord(f"broken JSON line: {exc}")


def _iter_jsonl(chunks: Iterable[bytes], wanted: set[int] | None) -> Iterator[tuple[int, Any]]:
    """(physical 0-based line index, value) for every non-blank line (or only ``wanted`` ones)
    of a file read from its start (a leading BOM is dropped)."""
    last_wanted = max(wanted) if wanted else -1
    for index, raw in enumerate(_iter_lines(_without_bom(chunks))):
        if isinstance(raw, _TooLarge):
            if wanted is None or index in wanted:
                yield index, BadRecord(ROW_TOO_LARGE)
            continue
        if wanted is not None:
            if index > last_wanted:
                return
            if index not in wanted:
                continue
        if not raw.strip():
            continue
        yield index, _parse_line(raw)


class _ArrayReader:
    """Stream the elements of one top-level JSON array without holding the file in memory.

    Invalid UTF-8 inside an element makes that element a :class:`BadRecord`; a JSON syntax error
    raises :class:`InputError` (the rest of the array cannot be delimited reliably).
    """

    def __init__(self, chunks: Iterable[bytes], path: str) -> None:
        self._chunks = iter(chunks)
        self._decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self._buf = ""
        self._pos = 0
        self._eof = False
        self._path = path
        self._index = 0

    def _fail(self, message: str) -> InputError:
        return InputError(f"{self._path}: malformed JSON array at element {self._index}: {message}")

    def _read(self) -> bool:
        chunk = next(self._chunks, None)
        if chunk is None:
            if not self._eof:
                self._buf += self._decoder.decode(b"", final=True)
                self._eof = True
            return False
        if self._pos:
            self._buf, self._pos = self._buf[self._pos:], 0
        self._buf += self._decoder.decode(chunk)
        return True

    def _grow(self) -> None:
        """Read until the unconsumed buffer has doubled (amortises re-parsing big elements)."""
        target = 2 * max(len(self._buf) - self._pos, _CHUNK_BYTES)
        while len(self._buf) - self._pos < target and self._read():
            pass

    def _peek(self) -> str:
        """Skip whitespace; the next character, or '' at the end of the file."""
        while True:
            self._pos = _WS.match(self._buf, self._pos).end()  # type: ignore[union-attr]
            if self._pos < len(self._buf) or not self._read():
                return self._buf[self._pos] if self._pos < len(self._buf) else ""

    def _value(self) -> Any:
        self._peek()
        while True:
            try:
                value, end = _DECODER.raw_decode(self._buf, self._pos)
            except RecursionError:
                raise self._fail("nested too deeply") from None
            except json.JSONDecodeError as exc:
                truncated = exc.msg.startswith("Unterminated string") or exc.pos >= len(self._buf) - 64
                if self._eof or not truncated:
                    raise self._fail(str(exc)) from None
                if len(self._buf) - self._pos > _MAX_RECORD_CHARS:
                    raise self._fail("element too large or malformed") from None
                self._grow()
                continue
            except ValueError as exc:
                raise self._fail(str(exc)) from None
            if end == len(self._buf) and not self._eof:  # a number might continue
                self._grow()
                continue
            raw = self._buf[self._pos:end]
            self._pos = end
            if not raw.isascii() and _ESCAPED_BYTE.search(raw):
                return BadRecord("invalid UTF-8")
            return value

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        if self._peek() == "\ufeff":
            self._pos += 1
        if self._peek() != "[":
            raise self._fail("expected '['")
        self._pos += 1
        if self._peek() == "]":
            self._pos += 1
        else:
            while True:
                yield self._index, self._value()
                self._index += 1
                nxt = self._peek()
                self._pos += 1
                if nxt == "]":
                    break
                if nxt != ",":
                    raise self._fail(f"expected ',' or ']', found {nxt!r}" if nxt else "unexpected end of file")
        if self._peek():
            raise self._fail("unexpected data after the closing ']'")


def _iter_json_records(path: str, sniff: bool, wanted: set[int] | None = None) -> Iterator[tuple[int, Any]]:
    """(row, parsed value or :class:`BadRecord`) for each record of a JSONL / JSON-array file.

    ``sniff``: the file may hold one JSON array (``.json``). ``wanted`` lets JSONL files skip
    parsing (and stop after) rows that are not needed; JSON arrays still yield every element.
    Read errors become :class:`InputError` naming the file.
    """
    fs, fs_path = filesystem(path)
    try:
        with fs.open_input_stream(fs_path) as stream:
            chunks: Iterator[bytes] = _iter_chunks(stream)
            is_array = False
            if sniff:
                is_array, chunks = _sniff_array(chunks)
            if is_array:
                yield from _ArrayReader(chunks, path)
            else:
                yield from _iter_jsonl(chunks, wanted)
    except (OSError, pa.ArrowException, EOFError) as exc:
        raise InputError(f"{path}: cannot read: {exc}") from exc


def _sample_json_columns(path: str, flag: str, sniff: bool) -> list[str] | None:
    """Keys seen in the first records of a JSON file; None if it has no records at all."""
    records: list[Any] = []
    try:
        for _, record in _iter_json_records(path, sniff):
            records.append(record)
            if len(records) >= _SAMPLE_RECORDS or isinstance(records[0], BadRecord):
                break
    except InputError as exc:
        raise InputError(f"{flag}: {exc}") from exc
    if not records:
        return None
    if isinstance(records[0], BadRecord):
        raise InputError(f"{flag}: {path} is not JSON Lines or a JSON array "
                         f"(first record: {records[0].reason})")
    keys: dict[str, None] = {}
    for record in records:
        if isinstance(record, dict):
            keys.update(dict.fromkeys(record))
    if not keys and not any(isinstance(r, dict) for r in records):
        raise InputError(f"{flag}: {path}: no JSON object among the first {len(records)} records "
                         f"(the first is a {type(records[0]).__name__})")
    return list(keys)


_NON_BLANK = re.compile(rb"[^ \t\n\r\x0b\x0c]")  # what bytes.strip() does not strip
_BLANK_LINE = re.compile(rb"\n[ \t\r\x0b\x0c]*(?=\n)")  # a newline, then a blank line (faster than ^...$)


def _without_bom(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The chunks with a leading UTF-8 BOM removed (however the first bytes are split)."""
    chunks = iter(chunks)
    head = b""
    for chunk in chunks:
        head += chunk
        if len(head) >= len(_BOM):
            break
    yield head[3:] if head.startswith(_BOM) else head
    yield from chunks


def _count_lines(chunks: Iterable[bytes], limit: int | None) -> int:
    """Non-blank ``\n``-separated lines (as :func:`_iter_jsonl` yields them), by a byte scan.

    Stops early once ``limit`` lines were counted. Lines are never assembled, so a huge line
    costs no memory; complete lines inside a chunk are counted by ``bytes.count`` less one
    C-level regex pass for the (rare) blank ones.
    """
    return _line_stats(_without_bom(chunks), limit)[0]


def _line_stats(chunks: Iterable[bytes], limit: int | None = None) -> tuple[int, int]:
    """(non-blank lines, ``\n`` bytes) of a byte stream that starts at a line start (a BOM is
    the caller's business): :func:`_count_lines` and the planning of JSONL spans."""
    count = newlines = 0
    open_line = False  # the unfinished line carried over from earlier chunks has a non-blank byte
    for chunk in chunks:
        first = chunk.find(b"\n")
        if first < 0:
            open_line = open_line or _NON_BLANK.search(chunk) is not None
            continue
        if open_line or _NON_BLANK.search(chunk, 0, first):
            count += 1
        newlines += 1
        last = chunk.rfind(b"\n")
        if last > first:  # the complete lines in between: all of them, less the blank ones
            between = chunk.count(b"\n", first + 1, last + 1)
            newlines += between
            count += between - len(_BLANK_LINE.findall(chunk, first, last + 1))
        open_line = _NON_BLANK.search(chunk, last + 1) is not None
        if limit is not None and count >= limit:
            return count, newlines
    return count + open_line, newlines


def _count_json(path: str, limit: int | None, sniff: bool) -> int:
    """Rows of a JSONL file (non-blank lines) or JSON array (elements, parsed), up to ``limit``."""
    fs, fs_path = filesystem(path)
    try:
        with fs.open_input_stream(fs_path) as stream:
            chunks: Iterator[bytes] = _iter_chunks(stream)
            is_array = False
            if sniff:
                is_array, chunks = _sniff_array(chunks)
            if not is_array:
                return _count_lines(chunks, limit)
            count = 0
            for _ in _ArrayReader(chunks, path):
                count += 1
                if limit is not None and count >= limit:
                    break
            return count
    except (OSError, pa.ArrowException, EOFError) as exc:
        raise InputError(f"{path}: cannot read: {exc}") from exc


# --------------------------------------------------------------------------------------------
# reading one file in parts (spans), so that many workers share a big file
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Span:
    """A part of one file, read by one worker (``iter_records(..., span=)``).

    The records of a file are numbered 0, 1, ... in reading order (``ordinal``: every record
    :meth:`FileFormat.iter_records` yields, rejects included; not ``row``, which counts blank
    JSONL lines too). A span is the ``count`` records with ordinals ``ordinal ..
    ordinal + count - 1``. How to get there: JSONL: seek to byte ``offset`` (a line start),
    whose line has the physical index ``row``, and pass over the first ``skip`` records there
    (not parsed); Parquet: ``offset == row == ordinal`` is the first Parquet row, ``skip`` is 0.

    :meth:`FileFormat.spans` cuts a file at ordinals that are multiples of its ``align``
    argument, so the read stage's token shards (``align`` records each, counted from the start
    of the file) are the same whatever the span size: a shard never straddles two spans.
    """

    offset: int
    row: int
    skip: int
    count: int
    ordinal: int


#: the default size of a read unit in MiB (``--read-unit-mb``; declared in ``ntk_ray.config``)
READ_UNIT_MB = 64.0


def scan_range(item: tuple[str, int, int]) -> dict:
    """``reader_for(path).scan(path, start, stop)`` of an item ``(path, start, stop)``: the
    read stage's pre-pass task (here, so that a task imports pyarrow, not torch)."""
    path, start, stop = item
    return reader_for(path).scan(path, start, stop)


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def _file_size(path: str) -> int:
    fs, fs_path = filesystem(path)
    try:
        return fs.get_file_info(fs_path).size or 0
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{path}: cannot read: {exc}") from exc


def _line_start(f: Any, x: int) -> int:
    """The first line start at or after byte ``x`` of a random-access file (its size if none)."""
    if x <= 0:
        return 0
    pos = x - 1
    f.seek(pos)
    while True:
        chunk = f.read(_CHUNK_BYTES)
        if not chunk:
            return pos
        newline = bytes(chunk).find(b"\n")
        if newline >= 0:
            return pos + newline + 1
        pos += len(chunk)


def _read_between(f: Any, start: int, stop: int) -> Iterator[bytes]:
    """The bytes ``start`` .. ``stop`` (exclusive) of a random-access file, in chunks."""
    f.seek(start)
    left = stop - start
    while left > 0:
        chunk = f.read(min(_CHUNK_BYTES, left))
        if not chunk:
            return
        left -= len(chunk)
        yield bytes(chunk)


def _scan_jsonl(path: str, start: int, stop: int) -> dict:
    """What planning needs of the JSONL byte range ``[start, stop)``: the lines that START in
    it run from ``"start"`` (the first line start at or after ``start``) to the first line
    start at or after ``stop``; ``"lines"`` of them (physical, blank ones included),
    ``"records"`` of them not blank."""
    fs, fs_path = filesystem(path)
    try:
        with fs.open_input_file(fs_path) as f:
            a = _line_start(f, start)
            b = _line_start(f, stop) if stop < f.size() else f.size()
            chunks = _read_between(f, a, b)
            records, newlines = _line_stats(_without_bom(chunks) if a == 0 else chunks)
    except (OSError, pa.ArrowException, EOFError) as exc:
        raise InputError(f"{path}: cannot read: {exc}") from exc
    # a segment that does not end with a newline ends the file: the line count there is unused
    return {"start": a, "lines": newlines, "records": records}


def _jsonl_spans(scans: Sequence[dict], align: int) -> list[Span] | None:
    """Spans from the :func:`_scan_jsonl` of consecutive byte ranges covering a file: range
    ``i`` gets the records whose ordinals lie in ``[up(O_i), up(O_{i+1}))``, with ``O_i`` the
    records before its first line start and ``up`` rounding up to a multiple of ``align``
    (the last range: to the end). Ranges that get no record are dropped; None when the file
    has no record at all (read it whole: it still yields its empty table)."""
    starts = []
    lines = records = 0
    for scan in scans:
        starts.append((scan["start"], lines, records))
        lines += scan["lines"]
        records += scan["records"]
    spans = []
    for i, (offset, row, before) in enumerate(starts):
        first = _round_up(before, align)
        end = records if i + 1 == len(starts) else min(records, _round_up(starts[i + 1][2], align))
        if end > first:
            spans.append(Span(offset=offset, row=row, skip=first - before, count=end - first, ordinal=first))
    return spans or None


def _iter_jsonl_span(path: str, span: Span) -> Iterator[tuple[int, Any]]:
    """(physical line index, value) of the records of one span of a JSONL file (see
    :class:`Span`); the same pairs :func:`_iter_jsonl` yields for those records."""
    if span.count <= 0:
        return
    fs, fs_path = filesystem(path)
    skip, left = span.skip, span.count
    try:
        with fs.open_input_file(fs_path) as f:
            f.seek(span.offset)
            chunks: Iterator[bytes] = _iter_chunks(f)
            for index, raw in enumerate(_iter_lines(_without_bom(chunks) if span.offset == 0 else chunks), span.row):
                too_large = isinstance(raw, _TooLarge)
                if not too_large and not raw.strip():
                    continue
                if skip:
                    skip -= 1
                    continue
                yield index, BadRecord(ROW_TOO_LARGE) if too_large else _parse_line(raw)
                left -= 1
                if not left:
                    return
    except (OSError, pa.ArrowException, EOFError) as exc:
        raise InputError(f"{path}: cannot read: {exc}") from exc


def _parquet_cuts(groups: Sequence[tuple[int, int]], unit_bytes: int, align: int) -> list[int]:
    """Row boundaries (0 first, the row count last) of Parquet spans of about ``unit_bytes``
    (uncompressed) each, from the row groups' (rows, bytes): cut at row-group ends where the
    bytes since the last cut reach ``unit_bytes``, and inside a row group larger than that
    (every ~``unit_bytes`` worth of its rows); every cut rounded up to a multiple of
    ``align`` (a span may then start a few rows into a row group)."""
    total = sum(n for n, _ in groups)
    ends, weights = [], []  # cumulative rows and bytes at each row group's end
    candidates: set[int] = set()
    rows = size = 0
    for n, b in groups:
        if n and b > unit_bytes:
            step = max(1, n * unit_bytes // b)
            candidates.update(range(rows + step, rows + n, step))
        rows, size = rows + n, size + b
        ends.append(rows)
        weights.append(size)
        candidates.add(rows)

    def bytes_before(row: int) -> float:  # prorated within a row group
        g = bisect.bisect_right(ends, row)
        if g >= len(groups):
            return float(size)
        start, base = (ends[g - 1], weights[g - 1]) if g else (0, 0)
        n, b = groups[g]
        return base + (b * (row - start) / n if n else 0)

    cuts = [0]
    for cut in sorted({min(total, _round_up(c, align)) for c in candidates}):
        if cut > cuts[-1] and (cut == total or bytes_before(cut) - bytes_before(cuts[-1]) >= unit_bytes):
            cuts.append(cut)
    if cuts[-1] != total:
        cuts.append(total)
    return cuts


def _as_text(value: Any) -> str:
    if isinstance(value, str) and encodable(value):
        return value
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if encodable(text) else json.dumps(value, default=str)


def _to_arrow(values: list[Any]) -> pa.Array:
    """An Arrow array of JSON values; values Arrow cannot unify are stored as JSON strings."""
    try:
        return pa.array(values)
    except (pa.ArrowException, TypeError, ValueError, OverflowError, UnicodeError):
        return pa.array([None if v is None else _as_text(v) for v in values], pa.string())


def _records_to_table(records: list[dict], rows: list[int]) -> pa.Table:
    names = list(dict.fromkeys(key for record in records for key in record))
    arrays = [_to_arrow([record.get(name) for record in records]) for name in names]
    if not names:
        return pa.table({ROW_COLUMN: pa.array(rows, pa.int64())})
    return pa.table(arrays, names=names)


def _json_original(path: str, rows: list[int], sniff: bool) -> pa.Table:
    wanted = set(rows)
    found: dict[int, Any] = {}
    for row, record in _iter_json_records(path, sniff, wanted):
        if row in wanted:
            found[row] = record
            if len(found) == len(wanted):
                break
    for row in rows:
        if row not in found:
            raise IndexError(f"{path}: no record at row {row}")
        if not isinstance(found[row], dict):
            raise ValueError(f"{path}: row {row} is not a readable JSON object")
    return _records_to_table([found[r] for r in rows], rows)


def _split_records(records: Iterable[tuple[int, Any]]) -> tuple[list[dict], list[tuple[int, str]]]:
    """(the records that are dicts, (row, reason) of the others)."""
    good, bad = [], []
    for row, value in records:
        if isinstance(value, BadRecord):
            bad.append((row, value.reason))
        elif not isinstance(value, dict):
            bad.append((row, f"not a JSON object ({type(value).__name__})"))
        else:
            good.append(value)
    return good, bad


# --------------------------------------------------------------------------------------------
# low-level Parquet reading
# --------------------------------------------------------------------------------------------

def _open_parquet(path: str) -> tuple[Any, pq.ParquetFile]:
    """(open file handle, ParquetFile); the footer is read here. Errors -> InputError."""
    fs, fs_path = filesystem(path)
    handle = None
    try:
        handle = fs.open_input_file(fs_path)
        return handle, pq.ParquetFile(handle)
    except (OSError, pa.ArrowException) as exc:
        if handle is not None:
            handle.close()
        raise InputError(f"{path} is not a readable Parquet file: {exc}") from exc


def _column_to_py(array: pa.Array) -> list[Any]:
    """Python values of a column; a value that is not valid UTF-8 becomes ``INVALID_UTF8``."""
    try:
        return array.to_pylist()
    except UnicodeDecodeError:
        values = []
        for scalar in array:
            try:
                values.append(scalar.as_py())
            except UnicodeDecodeError:
                values.append(INVALID_UTF8)
        return values


def _oversized_rows(batch: pa.RecordBatch):
    """A numpy mask of the rows whose string/binary values together exceed
    :data:`MAX_ROW_BYTES` (None when no row does), computed in Arrow without Python objects."""
    import numpy as np
    import pyarrow.compute as pc

    total = None
    for column in batch.columns:
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
                or pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
            continue
        lengths = pc.fill_null(pc.binary_length(column), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        total = lengths if total is None else total + lengths
    if total is None or not (total > MAX_ROW_BYTES).any():
        return None
    return total > MAX_ROW_BYTES


def _without(column: pa.Array, rows) -> pa.Array:
    """``column`` with the values of the masked rows set to null (never turned into Python)."""
    import pyarrow.compute as pc

    if rows is None:
        return column
    return pc.if_else(pa.array(rows), pa.nulls(len(column), column.type), column)


def _iter_parquet_records(path: str, names: Sequence[str], batch_rows: int,
                          on_corrupt: str = "raise", first: int = 0,
                          stop: int | None = None) -> Iterator[tuple[int, Any]]:
    """(row, {column: value}) for every row (or the rows ``first`` .. ``stop``, exclusive: a
    span), with only those of ``names`` the file has.

    Row groups are read one by one (only those holding wanted rows; in a row group a span
    starts inside, the record batches before its first row are decoded and dropped). Corrupt
    data in a row group: with ``on_corrupt="raise"`` :class:`InputError` after the rows read
    so far were yielded (every row group before the corrupt one comes through, rows of the
    corrupt one may be lost); with ``"reject"`` every wanted row of the corrupt row group not
    yet yielded comes as a :class:`BadRecord` and reading goes on with the next row group, so
    the file still yields exactly ``num_rows`` rows (a span exactly its rows).
    """
    handle, pf = _open_parquet(path)
    with handle:
        meta = pf.metadata
        stop = meta.num_rows if stop is None else min(stop, meta.num_rows)
        present = [n for n in dict.fromkeys(names) if n in pf.schema_arrow.names]
        if not present:
            for row in range(first, stop):
                yield row, {}
            return
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        start = 0  # the first row of the row group
        for group, group_rows in enumerate(sizes):  # batches never span row groups
            if start + group_rows <= first:
                start += group_rows
                continue
            lo, hi = max(first, start), min(stop, start + group_rows)  # the rows wanted from it
            row = lo  # the next row to yield
            batch_start = start
            try:
                if lo < hi:
                    for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[group],
                                                 columns=present, use_threads=False):
                        n = batch.num_rows
                        b0, b1 = max(lo, batch_start), min(hi, batch_start + n)
                        if b0 < b1:
                            if b1 - b0 < n:
                                batch = batch.slice(b0 - batch_start, b1 - b0)
                            too_large = _oversized_rows(batch)
                            columns = [_column_to_py(_without(batch.column(i), too_large))
                                       for i in range(batch.num_columns)]
                            for i, values in enumerate(zip(*columns)):
                                yield row, (BadRecord(ROW_TOO_LARGE) if too_large is not None and too_large[i]
                                            else dict(zip(present, values)))
                                row += 1
                        batch_start += n
                        if batch_start >= hi:
                            break
            except (OSError, pa.ArrowException) as exc:
                if on_corrupt != "reject":
                    raise InputError(f"{path}: corrupt Parquet data after {row} good rows: {exc}") from exc
                bad = BadRecord(f"corrupt Parquet data in row group {group}: {one_line(exc)}")
                while row < hi:
                    yield row, bad
                    row += 1
            start += group_rows
            if start >= stop:
                break


def _parquet_original(path: str, rows: list[int]) -> pa.Table:
    handle, pf = _open_parquet(path)
    with handle:
        meta = pf.metadata
        starts = [0]
        for g in range(meta.num_row_groups):
            starts.append(starts[-1] + meta.row_group(g).num_rows)
        by_group: dict[int, list[tuple[int, int]]] = {}
        for position, row in enumerate(rows):
            if not 0 <= row < meta.num_rows:
                raise IndexError(f"{path}: row {row} out of range (the file has {meta.num_rows} rows)")
            g = bisect.bisect_right(starts, row) - 1
            by_group.setdefault(g, []).append((position, row - starts[g]))
        pieces, order = [], []
        try:
            for g in sorted(by_group):
                picks = by_group[g]
                table = pf.read_row_group(g)
                pieces.append(table.take(pa.array([local for _, local in picks], pa.int64())))
                order.extend(position for position, _ in picks)
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"{path}: corrupt Parquet data: {exc}") from exc
        if not pieces:
            return pf.schema_arrow.empty_table().replace_schema_metadata(None)
    combined = pa.concat_tables(pieces)
    inverse = [0] * len(order)
    for i, position in enumerate(order):
        inverse[position] = i
    return combined.take(pa.array(inverse, pa.int64())).replace_schema_metadata(None)


# --------------------------------------------------------------------------------------------
# low-level CSV reading
# --------------------------------------------------------------------------------------------

_CSV_BLOCK_BYTES = 1 << 24  # pyarrow.csv block size: the largest record a CSV file may hold


def _decode(value: bytes | None, errors: str) -> Any:
    """A CSV field as a string; invalid UTF-8 gives :data:`INVALID_UTF8` (``errors="strict"``)
    or replacement characters (``"replace"``)."""
    if value is None:
        return None
    try:
        return value.decode("utf-8", errors)
    except UnicodeDecodeError:
        return INVALID_UTF8


def _csv_column(array: pa.Array, errors: str) -> list[Any]:
    """Python strings of a binary CSV column (one C-level UTF-8 check, per value only if it fails)."""
    try:
        return array.cast(pa.string()).to_pylist()
    except (pa.ArrowInvalid, UnicodeDecodeError):
        return [_decode(value, errors) for value in array.to_pylist()]


def _open_csv(path: str, delimiter: str, *, convert: pacsv.ConvertOptions | None = None,
              on_invalid: Any = None) -> tuple[Any, Any]:
    """(open stream, streaming reader) of a CSV file, or (None, None) for an empty file."""
    fs, fs_path = filesystem(path)
    stream = fs.open_input_stream(fs_path)
    try:
        reader = pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(use_threads=False, block_size=_CSV_BLOCK_BYTES),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True,
                                              invalid_row_handler=on_invalid),
            convert_options=convert)
    except pa.ArrowInvalid as exc:
        stream.close()
        if str(exc).startswith("Empty CSV file"):
            return None, None
        raise
    except BaseException:
        stream.close()
        raise
    return stream, reader


def _csv_names(path: str, delimiter: str) -> list[str] | None:
    """The column names in the header of a CSV file; None for an empty file."""
    # the first block is parsed (and its types guessed) too: malformed records do not matter here
    stream, reader = _open_csv(path, delimiter, on_invalid=lambda bad: "skip")
    if stream is None:
        return None
    with stream:
        return list(reader.schema.names)


def _iter_csv_records(path: str, delimiter: str, names: Sequence[str] | None, errors: str = "strict",
                      label: str = "CSV") -> Iterator[tuple[int, Any]]:
    """(row, {column: string}) for every record, with only those of ``names`` the file has (all
    columns when ``names`` is None, none when none of them); a record with the wrong number of
    fields comes as a :class:`BadRecord` at its place. Read errors -> :class:`InputError`."""
    row = 0
    try:
        header = _csv_names(path, delimiter)
        if header is None:
            return
        present = header if names is None else [n for n in dict.fromkeys(names) if n in header]
        # pyarrow reads at least one column: the first one stands in when none is wanted
        read = present or header[:1]
        invalid: dict[int, BadRecord] = {}

        def on_invalid(bad: Any) -> str:
            if bad.number is None or bad.number < 2:
                raise InputError(f"{path}: malformed {label} record at an unknown place: {(bad.text or '')[:100]!r}")
            fields = f"{bad.actual_columns} field{'' if bad.actual_columns == 1 else 's'}"
            invalid[bad.number - 2] = BadRecord(  # number: 1-based, the header is record 1
                f"malformed {label} row: {fields}, the header has {bad.expected_columns}")
            return "skip"

        convert = pacsv.ConvertOptions(column_types={n: pa.binary() for n in read}, include_columns=read)
        stream, reader = _open_csv(path, delimiter, convert=convert, on_invalid=on_invalid)
        if stream is None:
            return
        with stream:
            for batch in reader:
                columns = [_csv_column(batch.column(i), errors) for i in range(batch.num_columns)]
                for values in zip(*columns):
                    while row in invalid:
                        yield row, invalid.pop(row)
                        row += 1
                    yield row, dict(zip(present, values)) if present else {}
                    row += 1
        for bad_row in sorted(invalid):  # malformed records after the last good one
            if bad_row != row:  # every record is either good or malformed: cannot happen
                raise InputError(f"{path}: malformed {label}: record {row} is missing")
            yield row, invalid[bad_row]
            row += 1
    except (OSError, pa.ArrowException, EOFError) as exc:
        raise InputError(f"{path}: unreadable {label} after {row} rows: {exc}") from exc


# --------------------------------------------------------------------------------------------
# the formats
# --------------------------------------------------------------------------------------------

@runtime_checkable
class FileFormat(Protocol):
    """What every input format provides; :mod:`ntk_ray.io.rows` and :mod:`ntk_ray.io.paths` use
    nothing else. ``path`` is a local path or URI; errors are :class:`InputError` naming it."""

    name: str                        # short name: "jsonl", "json", "parquet", ...
    label: str                       # for messages: "JSON", "Parquet", ...
    suffixes: tuple[str, ...]        # the suffixes it claims (lower case)
    compressions: tuple[str, ...]    # suffixes that may follow them (compressed streams)

    def matches(self, name: str) -> bool:
        """Whether a file name (not a path) is of this format."""
        ...

    def sample_columns(self, path: str, flag: str) -> list[str] | None:
        """Column names of the file (from its schema or first records); None for a file without
        records. Errors are :class:`InputError` with ``flag`` in front."""
        ...

    def iter_records(self, path: str, names: Sequence[str], wanted: set[int] | None = None, *,
                     batch_rows: int = 4096, on_corrupt: str = "raise",
                     span: Span | None = None) -> Iterator[tuple[int, Any]]:
        """(0-based row, record) for every row, in order: a record is a dict (holding at least
        those of ``names`` the row has), another JSON value, or a :class:`BadRecord`.

        ``wanted``: rows the caller needs (a format may skip the others, or yield them anyway).
        ``span``: only the records of that part of the file (one of :meth:`spans`; only passed
        to formats whose :meth:`spans` returns some).
        ``on_corrupt="reject"``: a part of the file that cannot be read comes as
        :class:`BadRecord` rows where the format can tell how many rows it had; otherwise (and
        with ``"raise"``) reading stops with :class:`InputError` after the rows read so far.
        """
        ...

    def count(self, path: str, limit: int | None) -> int:
        """How many rows :meth:`iter_records` yields (rejects included), cheaply; may stop
        once ``limit`` is reached (and then return any number >= ``limit``)."""
        ...

    def scan_ranges(self, path: str, unit_bytes: int) -> list[tuple[int, int]]:
        """Byte ranges of the file whose :meth:`scan` :meth:`spans` needs (``[]``: none). The
        read stage runs the scans as parallel tasks."""
        ...

    def scan(self, path: str, start: int, stop: int) -> dict:
        """What :meth:`spans` needs to know of one of the :meth:`scan_ranges`."""
        ...

    def spans(self, path: str, scans: list[dict], unit_bytes: int, align: int) -> list[Span] | None:
        """The file as consecutive spans of about ``unit_bytes`` each, cut at record ordinals
        that are multiples of ``align`` (``scans``: the :meth:`scan` of each of the
        :meth:`scan_ranges`, in order); None: the file is read whole, as one unit."""
        ...

    def original_rows(self, path: str, rows: list[int]) -> pa.Table:
        """All original columns of ``rows`` (in that order). IndexError for a row the file does
        not have, ValueError for a row that is not a readable record."""
        ...

    def read_records(self, path: str) -> tuple[list[dict], list[tuple[int, str]]]:
        """Every record as a dict with all its columns (small files), and (row, reason) of the
        records that are not readable objects."""
        ...


class _Format:
    """Suffix matching shared by the concrete formats."""

    name = ""
    label = ""
    suffixes: tuple[str, ...] = ()
    compressions: tuple[str, ...] = ()

    def matches(self, name: str) -> bool:
        low = name.lower()
        return any(low.endswith(suffix + comp) for suffix in self.suffixes
                   for comp in ("",) + self.compressions)

    # by default a file is read whole, by one worker
    def scan_ranges(self, path: str, unit_bytes: int) -> list[tuple[int, int]]:
        return []

    def scan(self, path: str, start: int, stop: int) -> dict:
        raise NotImplementedError(f"{type(self).__name__} files are read whole")

    def spans(self, path: str, scans: list[dict], unit_bytes: int, align: int) -> list[Span] | None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class JsonLines(_Format):
    """JSON Lines: one JSON value per line; ``row`` is the physical line index."""

    name = "jsonl"
    label = "JSON"
    suffixes = (".jsonl",)
    compressions = _JSON_COMPRESSIONS
    _sniff = False  # whether a file may instead hold one JSON array

    def sample_columns(self, path: str, flag: str) -> list[str] | None:
        return _sample_json_columns(path, flag, self._sniff)

    def iter_records(self, path: str, names: Sequence[str], wanted: set[int] | None = None, *,
                     batch_rows: int = 4096, on_corrupt: str = "raise",
                     span: Span | None = None) -> Iterator[tuple[int, Any]]:
        # a read error always raises: the rest of a JSON file cannot be delimited
        if span is not None:
            return _iter_jsonl_span(path, span)
        return _iter_json_records(path, self._sniff, wanted)

    def scan_ranges(self, path: str, unit_bytes: int) -> list[tuple[int, int]]:
        """Uncompressed JSON Lines bigger than ``unit_bytes``: byte ranges of that size.
        Compressed files and JSON arrays are read whole (a compressed stream cannot be entered
        in the middle; an array element cannot be found without parsing all before it)."""
        if not file_name(path).lower().endswith(self.suffixes):
            return []
        size = _file_size(path)
        if size <= unit_bytes:
            return []
        if self._sniff and self._is_array(path):
            return []
        return [(a, min(a + unit_bytes, size)) for a in range(0, size, unit_bytes)]

    def _is_array(self, path: str) -> bool:
        fs, fs_path = filesystem(path)
        try:
            with fs.open_input_stream(fs_path) as stream:
                return _sniff_array(_iter_chunks(stream))[0]
        except (OSError, pa.ArrowException, EOFError) as exc:
            raise InputError(f"{path}: cannot read: {exc}") from exc

    def scan(self, path: str, start: int, stop: int) -> dict:
        return _scan_jsonl(path, start, stop)

    def spans(self, path: str, scans: list[dict], unit_bytes: int, align: int) -> list[Span] | None:
        return _jsonl_spans(scans, align) if len(scans) > 1 else None

    def count(self, path: str, limit: int | None) -> int:
        return _count_json(path, limit, self._sniff)

    def original_rows(self, path: str, rows: list[int]) -> pa.Table:
        return _json_original(path, rows, self._sniff)

    def read_records(self, path: str) -> tuple[list[dict], list[tuple[int, str]]]:
        return _split_records(_iter_json_records(path, self._sniff))


class JsonArray(JsonLines):
    """``.json``: one top-level JSON array (streamed; ``row`` is the element index) when the
    first non-blank character is ``[``, else JSON Lines."""

    name = "json"
    suffixes = (".json",)
    _sniff = True


class Parquet(_Format):
    """Parquet, read in record batches one row group at a time; ``row`` is the Parquet row."""

    name = "parquet"
    label = "Parquet"
    suffixes = (".parquet",)

    def sample_columns(self, path: str, flag: str) -> list[str] | None:
        try:
            handle, pf = _open_parquet(path)
        except InputError as exc:
            raise InputError(f"{flag}: {exc}") from exc
        with handle:
            return list(pf.schema_arrow.names)

    def iter_records(self, path: str, names: Sequence[str], wanted: set[int] | None = None, *,
                     batch_rows: int = 4096, on_corrupt: str = "raise",
                     span: Span | None = None) -> Iterator[tuple[int, Any]]:
        if span is not None:
            return _iter_parquet_records(path, names, batch_rows, on_corrupt, span.offset, span.offset + span.count)
        return _iter_parquet_records(path, names, batch_rows, on_corrupt)

    def spans(self, path: str, scans: list[dict], unit_bytes: int, align: int) -> list[Span] | None:
        """Row ranges of about ``unit_bytes`` (uncompressed, from the footer): whole row groups,
        or parts of one larger than that (:func:`_parquet_cuts`)."""
        handle, pf = _open_parquet(path)
        with handle:
            meta = pf.metadata
            groups = [(meta.row_group(g).num_rows, meta.row_group(g).total_byte_size) for g in range(meta.num_row_groups)]
        if sum(b for _, b in groups) <= unit_bytes or not meta.num_rows:
            return None
        cuts = _parquet_cuts(groups, unit_bytes, align)
        if len(cuts) <= 2:
            return None
        return [Span(offset=a, row=a, skip=0, count=b - a, ordinal=a) for a, b in pairwise(cuts)]

    def count(self, path: str, limit: int | None) -> int:
        handle, pf = _open_parquet(path)
        with handle:
            return pf.metadata.num_rows

    def original_rows(self, path: str, rows: list[int]) -> pa.Table:
        return _parquet_original(path, rows)

    def read_records(self, path: str) -> tuple[list[dict], list[tuple[int, str]]]:
        handle, f = _open_parquet(path)
        try:
            return f.read().to_pylist(), []
        finally:
            handle.close()


class Csv(_Format):
    """CSV (``.csv``) or, with ``delimiter="\\t"``, TSV (``.tsv``): a header line, then one record
    per line (quoted fields may hold newlines); ``row`` is the 0-based record index below the
    header, blank lines skipped. All columns are strings."""

    def __init__(self, suffix: str = ".csv", delimiter: str = ",") -> None:
        self.suffixes = (suffix.lower(),)
        self.name = suffix.lower().lstrip(".")
        self.label = self.name.upper()
        self.delimiter = delimiter

    def __repr__(self) -> str:
        return f"Csv({self.suffixes[0]!r}, {self.delimiter!r})"

    def _records(self, path: str, names: Sequence[str] | None, errors: str = "strict") -> Iterator[tuple[int, Any]]:
        return _iter_csv_records(path, self.delimiter, names, errors, self.label)

    def sample_columns(self, path: str, flag: str) -> list[str] | None:
        try:
            names = _csv_names(path, self.delimiter)
        except (OSError, pa.ArrowException, InputError) as exc:
            raise InputError(f"{flag}: {path} is not a readable {self.label} file: {one_line(exc)}") from exc
        try:
            empty = names is None or self.count(path, 1) == 0
        except InputError as exc:
            raise InputError(f"{flag}: {exc}") from exc
        return None if empty else names

    def iter_records(self, path: str, names: Sequence[str], wanted: set[int] | None = None, *,
                     batch_rows: int = 4096, on_corrupt: str = "raise",
                     span: Span | None = None) -> Iterator[tuple[int, Any]]:
        # malformed records are rejects; any other read error raises (rows makes it one reject)
        if span is not None:  # a quoted field may hold newlines: a record start cannot be found mid-file
            raise ValueError(f"{self.label} files are read whole (no spans)")
        return self._records(path, names)

    def count(self, path: str, limit: int | None) -> int:
        count = 0
        for _ in self._records(path, ()):
            count += 1
            if limit is not None and count >= limit:
                break
        return count

    def original_rows(self, path: str, rows: list[int]) -> pa.Table:
        names = _csv_names(path, self.delimiter) or []
        wanted = set(rows)
        last = max(rows, default=-1)
        found: dict[int, Any] = {}
        for row, record in self._records(path, None, "replace"):
            if row in wanted:
                found[row] = record
            if row >= last:
                break
        for row in rows:
            if row not in found:
                raise IndexError(f"{path}: no record at row {row}")
            if isinstance(found[row], BadRecord):
                raise ValueError(f"{path}: row {row} is not a readable {self.label} record")
        if not names:
            return pa.table({ROW_COLUMN: pa.array(rows, pa.int64())})
        return pa.table({name: pa.array([found[r][name] for r in rows], pa.string()) for name in names})

    def read_records(self, path: str) -> tuple[list[dict], list[tuple[int, str]]]:
        return _split_records(self._records(path, None, "replace"))


class Arrow(_Format):
    """Arrow IPC (``.arrow``): the files of a ``datasets`` ``save_to_disk`` directory (the IPC
    *stream* format, ``data-00000-of-00001.arrow``) or an Arrow IPC *file* (Feather v2,
    recognised by its ``ARROW1`` magic); read batch by batch, never whole. ``row`` is the
    0-based row of the file. A stream has no footer, so counting or reading back rows reads
    the file up to them (memory-mapped for a local file)."""

    name = "arrow"
    label = "Arrow"
    suffixes = (".arrow",)

    @staticmethod
    def _batches(path: str) -> Iterator[pa.RecordBatch]:
        """The record batches of the file in order; errors -> InputError naming the file."""
        fs, fs_path = filesystem(path)
        try:
            with fs.open_input_file(fs_path) as handle:
                is_file = handle.read(6) == b"ARROW1"
                handle.seek(0)
                if is_file:
                    reader = pa.ipc.open_file(handle)
                    for i in range(reader.num_record_batches):
                        yield reader.get_batch(i)
                else:
                    yield from pa.ipc.open_stream(handle)
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"{path} is not a readable Arrow IPC file: {one_line(exc)}") from exc

    @staticmethod
    def _schema(path: str) -> pa.Schema:
        fs, fs_path = filesystem(path)
        try:
            with fs.open_input_file(fs_path) as handle:
                is_file = handle.read(6) == b"ARROW1"
                handle.seek(0)
                return (pa.ipc.open_file(handle) if is_file else pa.ipc.open_stream(handle)).schema
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"{path} is not a readable Arrow IPC file: {one_line(exc)}") from exc

    def sample_columns(self, path: str, flag: str) -> list[str] | None:
        try:
            return list(self._schema(path).names)
        except InputError as exc:
            raise InputError(f"{flag}: {exc}") from exc

    def iter_records(self, path: str, names: Sequence[str], wanted: set[int] | None = None, *,
                     batch_rows: int = 4096, on_corrupt: str = "raise") -> Iterator[tuple[int, Any]]:
        # as Parquet (too-large rows, invalid UTF-8); a stream cannot say how many rows a corrupt
        # part held, so a read error always raises after the rows read so far
        row = 0
        for batch in self._batches(path):
            present = [n for n in dict.fromkeys(names) if n in batch.schema.names]
            if not present:
                for _ in range(batch.num_rows):
                    yield row, {}
                    row += 1
                continue
            batch = batch.select(present)
            for start in range(0, batch.num_rows, batch_rows):
                piece = batch.slice(start, batch_rows)
                too_large = _oversized_rows(piece)
                columns = [_column_to_py(_without(piece.column(i), too_large)) for i in range(piece.num_columns)]
                for i, values in enumerate(zip(*columns)):
                    yield row, (BadRecord(ROW_TOO_LARGE) if too_large is not None and too_large[i]
                                else dict(zip(present, values)))
                    row += 1

    def count(self, path: str, limit: int | None) -> int:
        count = 0
        for batch in self._batches(path):
            count += batch.num_rows
            if limit is not None and count >= limit:
                break
        return count

    def original_rows(self, path: str, rows: list[int]) -> pa.Table:
        import numpy as np

        wanted = np.asarray(rows, dtype=np.int64)
        if wanted.size and wanted.min() < 0:
            raise IndexError(f"{path}: row {int(wanted.min())} out of range")
        order = np.argsort(wanted, kind="stable")
        pieces, start, taken, schema = [], 0, 0, None
        for batch in self._batches(path):
            schema = batch.schema
            end = start + batch.num_rows
            stop = taken + int(np.searchsorted(wanted[order[taken:]], end))
            if stop > taken:
                pieces.append(batch.take(pa.array(wanted[order[taken:stop]] - start)))
                taken = stop
            start = end
            if taken == wanted.size:
                break
        if taken < wanted.size:
            raise IndexError(f"{path}: row {int(wanted[order[taken]])} out of range (the file has {start} rows)")
        if schema is None:
            schema = self._schema(path)
        table = pa.Table.from_batches(pieces, schema=schema) if pieces else schema.empty_table()
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        return table.take(pa.array(inverse)).replace_schema_metadata(None)

    def read_records(self, path: str) -> tuple[list[dict], list[tuple[int, str]]]:
        return [row for batch in self._batches(path) for row in batch.to_pylist()], []


FORMATS: tuple[FileFormat, ...] = (JsonLines(), JsonArray(), Parquet(), Csv(".csv", ","), Csv(".tsv", "\t"), Arrow())
"""The registry: every input format, in the order they are listed in messages."""
_FALLBACK = FORMATS[0]  # JSON Lines: how a name no format claims was always read


def format_for(path: str) -> FileFormat | None:
    """The format of a file (by the suffix of its name; a path or URI is fine), or None."""
    name = file_name(path)
    return next((fmt for fmt in FORMATS if fmt.matches(name)), None)


def reader_for(path: str) -> FileFormat:
    """:func:`format_for`, but a name that no format claims is read as JSON Lines (files given
    straight to the readers; :func:`ntk_ray.io.paths.resolve_paths` never returns such names)."""
    return format_for(path) or _FALLBACK


def _or_join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def suffix_list() -> str:
    """The supported suffixes for messages: ``.jsonl/.json/.parquet``."""
    return "/".join(s for fmt in FORMATS for s in fmt.suffixes)


def expected_suffixes() -> str:
    """The supported suffixes in a sentence, with the compressions each format accepts."""
    text = _or_join([s for fmt in FORMATS for s in fmt.suffixes])
    compressed: dict[str, tuple[str, ...]] = {}
    for fmt in FORMATS:
        if fmt.compressions:
            compressed.setdefault(fmt.label, fmt.compressions)
    for label, comps in compressed.items():
        text += f"; {label} may also end in {_or_join(list(comps))}"
    return text
