"""Resolve, check and read the input files of ntk-ray: plain pyarrow and Python, no Ray.

Formats
    * JSON Lines: ``.jsonl`` and ``.json`` (optionally compressed: ``.gz``, ``.bz2``, ``.zst``,
      detected from the suffix by pyarrow). A ``.json`` file whose first non-blank character is
      ``[`` is read as one top-level JSON array of objects instead, streamed element by element.
    * Parquet: ``.parquet``, read in record batches, never whole.

Paths are local paths or URIs with a scheme (``s3://``, ``gs://``, ``file://`` ...) opened through
``pyarrow.fs.FileSystem.from_uri``. URIs must be valid URIs (percent-encode spaces); a query string
(``?region=...``) is passed to pyarrow and carried over to the files found under a directory URI,
so ``?`` is never a glob character in a URI (``*`` and ``[...]`` are).

Row numbers (``row``) are 0-based: the Parquet row, the element of a JSON array, or the *physical*
line index of a JSONL file (blank lines are not rows but do count for the numbering, so ``row`` is
the line number minus one in any editor). Rows that cannot be used are never dropped: they are
yielded with a ``reject`` reason.

Who calls what: the driver calls :func:`resolve_paths`, :func:`check_columns` and
:func:`count_rows` before any work starts (all raise :class:`InputError`, one line naming the flag
and the file); Ray Data workers call :func:`read_file_rows` (one file per task, with
``on_corrupt="reject"`` so a file that breaks part-way becomes rejects, not a crash);
:func:`read_original_rows` rebuilds the original columns of the selected rows at the end.
"""

from __future__ import annotations

import bisect
import codecs
import glob as globlib
import json
import math
import os
import re
import urllib.parse
from dataclasses import dataclass
from itertools import chain
from typing import Any, Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

__all__ = [
    "Columns",
    "InputError",
    "JSON_COMPRESSION_SUFFIXES",
    "MODE_PROMPT_RESPONSE",
    "MODE_TEXT",
    "OUTPUT_SCHEMA",
    "ROW_COLUMN",
    "SUPPORTED_SUFFIXES",
    "check_columns",
    "count_rows",
    "fallback_id_prefixes",
    "file_name",
    "read_file_rows",
    "read_original_rows",
    "resolve_paths",
]


class InputError(ValueError):
    """Bad input detected before work starts. ``str(e)`` is ONE line naming the file/column/flag.

    Also raised by :func:`read_file_rows` when a file turns out to be unreadable part-way
    (corrupt Parquet pages, a malformed JSON array); the message then names the file.
    """

    def __init__(self, message: str) -> None:
        super().__init__(re.sub(r"\s*[\r\n]+\s*", " ", str(message)).strip())


@dataclass(frozen=True)
class Columns:
    """Names of the input columns (overridable with ``--text-column`` and friends)."""

    text: str = "text"
    prompt: str = "prompt"
    response: str = "response"
    id: str = "id"


MODE_TEXT = "text"
MODE_PROMPT_RESPONSE = "prompt_response"
_MODES = (MODE_TEXT, MODE_PROMPT_RESPONSE)

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet")
JSON_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zst")
_EXPECTED = ".jsonl, .json or .parquet; JSON may also end in .gz, .bz2 or .zst"
# Hive/Spark convention (as pyarrow.dataset): names starting with these are skipped in directories.
_IGNORED_PREFIXES = (".", "_")

ROW_COLUMN = "row"
OUTPUT_SCHEMA = pa.schema([
    pa.field("id", pa.string()),
    pa.field("source", pa.string()),
    pa.field("row", pa.int64()),
    pa.field("text", pa.string()),
    pa.field("prompt", pa.string()),
    pa.field("response", pa.string()),
    pa.field("reject", pa.string()),
])

_FLAG_OF_FIELD = {"text": "--text-column", "prompt": "--prompt-column",
                  "response": "--response-column", "id": "--id-column"}
_SAMPLE_RECORDS = 100          # records looked at per JSON file by check_columns
_CHUNK_BYTES = 1 << 20         # read size for JSON streams
_MAX_RECORD_CHARS = 1 << 28    # a JSON array element larger than this is treated as malformed
_BOM = b"\xef\xbb\xbf"
_DECODER = json.JSONDecoder(strict=False)  # raw control characters inside strings are accepted
_WS = re.compile(r"[ \t\n\r]*")
_SURROGATE = re.compile("[\ud800-\udfff]")
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # what surrogateescape turns invalid UTF-8 into
_URI = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)(.*)\Z", re.DOTALL)


@dataclass(frozen=True)
class _Bad:
    """A record that could not be decoded at all; ``reason`` goes to the reject column."""

    reason: str


_INVALID_UTF8 = _Bad("invalid UTF-8")  # a Parquet value whose bytes are not UTF-8


# --------------------------------------------------------------------------------------------
# paths and file systems
# --------------------------------------------------------------------------------------------

def _is_uri(path: str) -> bool:
    return _URI.match(path) is not None


def _split_query(uri: str) -> tuple[str, str]:
    """``'s3://b/k?region=x'`` -> ``('s3://b/k', '?region=x')``."""
    head, sep, query = uri.partition("?")
    return head, (sep + query if sep else "")


def _components(path: str) -> list[str]:
    """The path components of a local path or URI (scheme and query removed, %-decoded)."""
    if _is_uri(path):
        rest = _URI.match(_split_query(path)[0]).group(2)  # type: ignore[union-attr]
        return [urllib.parse.unquote(c) for c in rest.split("/") if c]
    return [c for c in os.path.normpath(path).split(os.sep) if c and c != "."]


def file_name(path: str) -> str:
    """The file name of a local path or URI (the default prefix of fallback ids)."""
    comps = _components(path)
    return comps[-1] if comps else path


def _file_format(name: str) -> str | None:
    """``"parquet"``, ``"json"`` or None (unsupported) from a file name's suffix."""
    low = name.lower()
    if low.endswith(".parquet"):
        return "parquet"
    for comp in ("",) + JSON_COMPRESSION_SUFFIXES:
        if low.endswith(".jsonl" + comp) or low.endswith(".json" + comp):
            return "json"
    return None


def _may_be_array(name: str) -> bool:
    """True for ``.json`` files (possibly compressed), which may hold one JSON array."""
    low = name.lower()
    return any(low.endswith(".json" + comp) for comp in ("",) + JSON_COMPRESSION_SUFFIXES)


def _ignored(name: str) -> bool:
    return name.startswith(_IGNORED_PREFIXES)


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow file system and in-filesystem path of a local path or URI."""
    if _is_uri(path):
        try:
            return pafs.FileSystem.from_uri(path)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise InputError(f"cannot open {path}: {exc}") from exc
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def _filesystem_for(spec: str, flag: str) -> tuple[pafs.FileSystem, str]:
    """:func:`_filesystem` with the flag in front of its error."""
    try:
        return _filesystem(spec)
    except InputError as exc:
        raise InputError(f"{flag}: {exc}") from exc


def _identity(path: str) -> str:
    """A key under which two spellings of the same local file compare equal."""
    if _is_uri(path):
        return path
    return os.path.normpath(os.path.abspath(os.path.expanduser(path)))


def _has_magic(s: str) -> bool:
    return globlib.has_magic(s)


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Translate a glob (``*``, ``?``, ``[...]``, ``**``) over '/'-separated paths to a regex."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        c = pattern[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and "]" in pattern[i + 2:]:
            j = pattern.index("]", i + 2)
            body = pattern[i + 1:j]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)


def _unsupported(flag: str, path: str, glob: str | None = None) -> InputError:
    where = f"glob '{glob}' matched an " if glob else ""
    return InputError(f"{flag}: {where}unsupported file type '{path}' (expected {_EXPECTED})")


# ---- local ----------------------------------------------------------------------------------

def _walk_local(spec: str) -> list[str]:
    """Supported files under a local directory, recursively, skipping '.'/'_' names, sorted."""
    root = os.path.expanduser(spec)
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not _ignored(d)]
        for name in filenames:
            if _ignored(name) or _file_format(name) is None:
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            found.append(os.path.join(spec, rel))
    return sorted(found)


def _glob_skips(rel_parts: Sequence[str], pattern_parts: Sequence[str]) -> bool:
    """Whether a glob match lies under a '.'/'_' name the pattern did not spell out.

    ``data/**/*.parquet`` must not pick up Spark's ``data/_temporary/...`` files, while
    ``data/_keep/*.parquet`` still may.
    """
    allowed = {p[0] for p in pattern_parts if p[:1] in _IGNORED_PREFIXES}
    return any(part[:1] in _IGNORED_PREFIXES and part[0] not in allowed for part in rel_parts)


def _resolve_local_glob(spec: str, flag: str) -> list[str]:
    expanded = os.path.expanduser(spec)
    matches = sorted(globlib.glob(expanded, recursive=True))
    if not matches:
        raise InputError(f"{flag}: glob '{spec}' matched no files")
    parts = expanded.split(os.sep)
    first = next(i for i, part in enumerate(parts) if _has_magic(part))
    matches = [m for m in matches if not _glob_skips(m.split(os.sep)[first:], parts[first:])]
    found: list[str] = []
    for match in matches:
        if os.path.isdir(match):
            found.extend(_walk_local(match))
        elif _file_format(os.path.basename(match)) is not None:
            found.append(match)
        elif not _ignored(os.path.basename(match)):
            raise _unsupported(flag, match, glob=spec)
    if not found:
        raise InputError(f"{flag}: glob '{spec}' matched no .jsonl/.json/.parquet files")
    return sorted(found)


def _resolve_local(spec: str, flag: str) -> list[str]:
    expanded = os.path.expanduser(spec)
    if os.path.isdir(expanded):
        found = _walk_local(spec)
        if not found:
            raise InputError(f"{flag}: directory {spec} has no .jsonl/.json/.parquet files")
        return found
    if os.path.exists(expanded):
        if _file_format(os.path.basename(expanded)) is None:
            raise _unsupported(flag, spec)
        return [spec]
    if _has_magic(spec):
        return _resolve_local_glob(spec, flag)
    raise InputError(f"{flag}: no such file or directory: {spec}")


# ---- URIs -----------------------------------------------------------------------------------

def _list_files(fs: pafs.FileSystem, base: str) -> list[str]:
    """Paths (relative to ``base``, '/'-separated) of all files under ``base``."""
    base = base.rstrip("/")
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return sorted(info.path[len(base) + 1:] for info in infos
                  if info.type == pafs.FileType.File and info.path.startswith(base + "/"))


def _child_uri(base_uri: str, rel: str, query: str) -> str:
    return base_uri.rstrip("/") + "/" + urllib.parse.quote(rel, safe="/") + query


def _usable_under_dir(rel_parts: list[str]) -> bool:
    """A file found below a directory: supported suffix and no '.'/'_' component."""
    return not any(_ignored(p) for p in rel_parts) and _file_format(rel_parts[-1]) is not None


def _resolve_uri_glob(spec: str, flag: str) -> list[str]:
    head, query = _split_query(spec)
    scheme, rest = _URI.match(head).groups()  # type: ignore[union-attr]
    comps = rest.split("/")
    first = next(i for i, c in enumerate(comps) if "*" in c or "[" in c)
    if first == 0:
        raise InputError(f"{flag}: glob '{spec}': wildcards in the bucket or host name are not supported")
    base_uri = scheme + "/".join(comps[:first])
    if base_uri.endswith("://"):
        base_uri += "/"
    fs, base = _filesystem_for(base_uri + query, flag)
    pattern_parts = comps[first:]
    regex = _glob_regex("/".join(pattern_parts))
    try:
        listing = _list_files(fs, base)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{flag}: cannot list {base_uri}: {exc}") from exc
    found: list[str] = []
    matched = False
    for rel in listing:
        parts = rel.split("/")
        if _glob_skips(parts, pattern_parts):
            continue
        if regex.match(rel):
            matched = True
            if _file_format(parts[-1]) is not None:
                found.append(_child_uri(base_uri, rel, query))
            elif not _ignored(parts[-1]):
                raise _unsupported(flag, _child_uri(base_uri, rel, query), glob=spec)
            continue
        for k in range(1, len(parts)):  # a matched "directory" (prefix)
            if regex.match("/".join(parts[:k])):
                matched = True
                if _usable_under_dir(parts[k:]):
                    found.append(_child_uri(base_uri, rel, query))
                break
    if not matched:
        raise InputError(f"{flag}: glob '{spec}' matched no files")
    if not found:
        raise InputError(f"{flag}: glob '{spec}' matched no .jsonl/.json/.parquet files")
    return sorted(found)


def _resolve_uri(spec: str, flag: str) -> list[str]:
    head, query = _split_query(spec)
    if "*" in head or "[" in head:
        return _resolve_uri_glob(spec, flag)
    fs, path = _filesystem_for(spec, flag)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise InputError(f"{flag}: no such file or directory: {spec}")
        if info.type == pafs.FileType.Directory:
            found = [_child_uri(head, rel, query) for rel in _list_files(fs, path)
                     if _usable_under_dir(rel.split("/"))]
            if not found:
                raise InputError(f"{flag}: directory {spec} has no .jsonl/.json/.parquet files")
            return found
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{flag}: cannot list {spec}: {exc}") from exc
    if _file_format(file_name(spec)) is None:
        raise _unsupported(flag, spec)
    return [spec]


def resolve_paths(spec: str | os.PathLike | Sequence[str | os.PathLike], flag: str) -> list[str]:
    """Expand a file, a directory or a glob (or a list of them) into a list of input files.

    * a file must have a supported suffix (``.jsonl``, ``.json``, ``.parquet``, JSON optionally
      ``.gz``/``.bz2``/``.zst``);
    * a directory is searched recursively for files with supported suffixes (others are ignored,
      as are files and directories whose names start with ``.`` or ``_``), sorted;
    * a glob (``*``, ``?``, ``[...]``, ``**``; a local path that exists is never a glob) is
      expanded and sorted; matched directories are expanded as above, a matched file with an
      unsupported suffix is an error.
    Local paths are returned as given (children joined onto the given directory); URIs stay
    URIs. Several specs keep their order; a file reached twice is listed once.

    Raises:
        InputError: one line naming ``flag`` and the path, e.g.
            ``--pool: no such file or directory: x.jsonl``.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise InputError(f"{flag}: no input path given")
    out: list[str] = []
    seen: set[str] = set()
    for item in specs:
        text = os.fspath(item)
        if not text.strip():
            raise InputError(f"{flag}: empty input path")
        for path in (_resolve_uri if _is_uri(text) else _resolve_local)(text, flag):
            key = _identity(path)
            if key not in seen:
                seen.add(key)
                out.append(path)
    return out


def fallback_id_prefixes(paths: Sequence[str]) -> dict[str, str]:
    """For each path, the shortest trailing part of it that no other path shares.

    The contract makes a missing id ``<file name>:<row>``; with Spark-style layouts
    (``a/part-0.parquet``, ``b/part-0.parquet``) plain file names collide, so callers pass
    ``id_prefix=fallback_id_prefixes(paths)[path]`` to :func:`read_file_rows`, which gives
    ``part-0.parquet`` when the name is unique and ``a/part-0.parquet`` otherwise. ``paths``
    must be every file of the run, domain and pool together: a domain ``med/train.jsonl`` and
    a pool ``web/train.jsonl`` without id columns would otherwise give the same ids, and every
    pool row would be rejected as "id also in the domain set". Spellings of one file (relative,
    absolute, ``./``) get one prefix, so a file given as both domain and pool still overlaps.
    """
    # local paths are made absolute first, so two spellings of one file get the same prefix
    # and 'part-0.parquet' vs '../x/part-0.parquet' get 'cwd/...' and 'x/...'
    comps = {p: _components(_identity(p)) or [p] for p in paths}
    prefixes: dict[str, str] = {}
    for path, parts in comps.items():
        for k in range(1, len(parts) + 1):
            mine = parts[-k:]
            if all(other[-k:] != mine for other in comps.values() if other != parts):
                break
        prefixes[path] = "/".join(parts[-k:])
    return prefixes


# --------------------------------------------------------------------------------------------
# low-level JSON reading
# --------------------------------------------------------------------------------------------

def _iter_chunks(stream: Any) -> Iterator[bytes]:
    while True:
        chunk = stream.read(_CHUNK_BYTES)
        if not chunk:
            return
        yield bytes(chunk)


def _iter_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Split a byte stream on ``\\n`` (``\\r`` is left for JSON to ignore), linear in the size."""
    parts: list[bytes] = []
    for chunk in chunks:
        newline = chunk.find(b"\n")
        if newline < 0:
            parts.append(chunk)
            continue
        parts.append(chunk[:newline])
        yield b"".join(parts)
        lines = chunk[newline + 1:].split(b"\n")
        last = lines.pop()
        yield from lines
        parts = [last] if last else []
    if parts:
        yield b"".join(parts)


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
    """One JSONL line -> the parsed value, or a :class:`_Bad` with the reason."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _Bad(f"invalid UTF-8 (byte {exc.start} of the line)")
    try:
        return _DECODER.decode(text)
    except RecursionError:
        return _Bad("broken JSON line: nested too deeply")
    except ValueError as exc:  # JSONDecodeError, or an over-long integer
        return _Bad(f"broken JSON line: {exc}")


def _iter_jsonl(chunks: Iterable[bytes], wanted: set[int] | None) -> Iterator[tuple[int, Any]]:
    """(physical 0-based line index, value) for every non-blank line (or only ``wanted`` ones)."""
    last_wanted = max(wanted) if wanted else -1
    for index, raw in enumerate(_iter_lines(chunks)):
        if index == 0 and raw.startswith(_BOM):
            raw = raw[3:]
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

    Invalid UTF-8 inside an element makes that element a :class:`_Bad`; a JSON syntax error
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
                return _Bad("invalid UTF-8")
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


def _iter_json_records(path: str, wanted: set[int] | None = None) -> Iterator[tuple[int, Any]]:
    """(row, parsed value or :class:`_Bad`) for each record of a JSONL / JSON-array file.

    ``wanted`` lets JSONL files skip parsing (and stop after) rows that are not needed; JSON
    arrays still yield every element. Read errors become :class:`InputError` naming the file.
    """
    fs, fs_path = _filesystem(path)
    try:
        with fs.open_input_stream(fs_path) as stream:
            chunks: Iterator[bytes] = _iter_chunks(stream)
            is_array = False
            if _may_be_array(file_name(path)):
                is_array, chunks = _sniff_array(chunks)
            if is_array:
                yield from _ArrayReader(chunks, path)
            else:
                yield from _iter_jsonl(chunks, wanted)
    except (OSError, pa.ArrowException, EOFError) as exc:
        raise InputError(f"{path}: cannot read: {exc}") from exc


# --------------------------------------------------------------------------------------------
# low-level Parquet reading
# --------------------------------------------------------------------------------------------

def _open_parquet(path: str) -> tuple[Any, pq.ParquetFile]:
    """(open file handle, ParquetFile); the footer is read here. Errors -> InputError."""
    fs, fs_path = _filesystem(path)
    handle = None
    try:
        handle = fs.open_input_file(fs_path)
        return handle, pq.ParquetFile(handle)
    except (OSError, pa.ArrowException) as exc:
        if handle is not None:
            handle.close()
        raise InputError(f"{path} is not a readable Parquet file: {exc}") from exc


def _column_to_py(array: pa.Array) -> list[Any]:
    """Python values of a column; a value that is not valid UTF-8 becomes ``_INVALID_UTF8``."""
    try:
        return array.to_pylist()
    except UnicodeDecodeError:
        values = []
        for scalar in array:
            try:
                values.append(scalar.as_py())
            except UnicodeDecodeError:
                values.append(_INVALID_UTF8)
        return values


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one short line (for reject reasons)."""
    text = re.sub(r"\s+", " ", str(exc)).strip() or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _iter_parquet_records(path: str, names: Sequence[str], batch_rows: int,
                          on_corrupt: str = "raise") -> Iterator[tuple[int, Any]]:
    """(row, {column: value}) for every row, with only those of ``names`` the file has.

    Row groups are read one by one. Corrupt data in a row group: with ``on_corrupt="raise"``
    :class:`InputError` after the rows read so far were yielded (every row group before the
    corrupt one comes through, rows of the corrupt one may be lost); with ``"reject"`` every
    row of the corrupt row group not yet yielded comes as a :class:`_Bad` and reading goes on
    with the next row group, so the file still yields exactly ``num_rows`` rows.
    """
    handle, pf = _open_parquet(path)
    row = 0
    with handle:
        present = [n for n in dict.fromkeys(names) if n in pf.schema_arrow.names]
        if not present:
            for row in range(pf.metadata.num_rows):
                yield row, {}
            return
        for group in range(pf.metadata.num_row_groups):  # batches never span row groups
            group_end = row + pf.metadata.row_group(group).num_rows
            try:
                for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[group],
                                             columns=present, use_threads=False):
                    columns = [_column_to_py(batch.column(i)) for i in range(batch.num_columns)]
                    for values in zip(*columns):
                        yield row, dict(zip(present, values))
                        row += 1
            except (OSError, pa.ArrowException) as exc:
                if on_corrupt != "reject":
                    raise InputError(f"{path}: corrupt Parquet data after {row} good rows: {exc}") from exc
                bad = _Bad(f"corrupt Parquet data in row group {group}: {_one_line(exc)}")
                while row < group_end:
                    yield row, bad
                    row += 1


# --------------------------------------------------------------------------------------------
# check_columns
# --------------------------------------------------------------------------------------------

def _sample_json_columns(path: str, flag: str) -> list[str] | None:
    """Keys seen in the first records of a JSON file; None if it has no records at all."""
    records: list[Any] = []
    try:
        for _, record in _iter_json_records(path):
            records.append(record)
            if len(records) >= _SAMPLE_RECORDS or isinstance(records[0], _Bad):
                break
    except InputError as exc:
        raise InputError(f"{flag}: {exc}") from exc
    if not records:
        return None
    if isinstance(records[0], _Bad):
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


def _sample_columns(path: str, flag: str) -> list[str] | None:
    """Column names of one file (Parquet schema, or keys of the first JSON records)."""
    if _file_format(file_name(path)) == "parquet":
        try:
            handle, pf = _open_parquet(path)
        except InputError as exc:
            raise InputError(f"{flag}: {exc}") from exc
        with handle:
            return list(pf.schema_arrow.names)
    return _sample_json_columns(path, flag)


def _found(names: Sequence[str]) -> str:
    shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
    return f"columns found: {shown or '(none)'}"


def _missing_error(path: str, names: Sequence[str], cols: Columns, flag: str) -> InputError:
    missing_pr = [f"'{getattr(cols, f)}' ({_FLAG_OF_FIELD[f]})" for f in ("prompt", "response")
                  if getattr(cols, f) not in names]
    return InputError(f"{flag}: {path} has no column '{cols.text}' (--text-column) nor "
                      f"{' and '.join(missing_pr)}; {_found(names)}")


def check_columns(paths: Sequence[str], cols: Columns, flag: str) -> str:
    """Check that every file has usable columns; return the mode for all of them.

    The mode is ``"prompt_response"`` when every non-empty file has both the prompt and the
    response column (preferred even when ``text`` exists too), else ``"text"`` when every one has
    the text column. Only Parquet footers and the first records of JSON files are read.

    Raises:
        InputError: a file that is not Parquet/JSON at all (truncated footer, first record not
            JSON, ...), a file with neither layout (naming the missing column and its
            ``--*-column`` flag), files mixing the two layouts, an explicitly chosen id column
            (``--id-column`` other than ``id``) that a file lacks, or no records in any file.
    """
    if not paths:
        raise InputError(f"{flag}: no input files")
    layouts: list[tuple[str, list[str]]] = []
    for path in paths:
        names = _sample_columns(path, flag)
        if names is None:
            continue  # an empty file adds no rows and has no say in the mode
        if cols.text not in names and not (cols.prompt in names and cols.response in names):
            raise _missing_error(path, names, cols, flag)
        if cols.id != Columns().id and cols.id not in names:
            raise InputError(f"{flag}: {path} has no column '{cols.id}' (--id-column); {_found(names)}")
        layouts.append((path, names))
    if not layouts:
        raise InputError(f"{flag}: no records in any input file ({', '.join(paths[:3])}"
                         f"{', ...' if len(paths) > 3 else ''})")
    without_pr = [p for p, n in layouts if not (cols.prompt in n and cols.response in n)]
    if not without_pr:
        return MODE_PROMPT_RESPONSE
    without_text = [p for p, n in layouts if cols.text not in n]
    if not without_text:
        return MODE_TEXT
    raise InputError(f"{flag}: files mix column layouts: {without_pr[0]} has '{cols.text}' but not "
                     f"'{cols.prompt}'+'{cols.response}', {without_text[0]} has "
                     f"'{cols.prompt}'+'{cols.response}' but not '{cols.text}'")


# --------------------------------------------------------------------------------------------
# count_rows
# --------------------------------------------------------------------------------------------

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
    count = 0
    open_line = False  # the unfinished line carried over from earlier chunks has a non-blank byte
    for chunk in _without_bom(chunks):
        first = chunk.find(b"\n")
        if first < 0:
            open_line = open_line or _NON_BLANK.search(chunk) is not None
            continue
        if open_line or _NON_BLANK.search(chunk, 0, first):
            count += 1
        last = chunk.rfind(b"\n")
        if last > first:  # the complete lines in between: all of them, less the blank ones
            count += chunk.count(b"\n", first + 1, last + 1) - len(_BLANK_LINE.findall(chunk, first, last + 1))
        open_line = _NON_BLANK.search(chunk, last + 1) is not None
        if limit is not None and count >= limit:
            return count
    return count + open_line


def _count_json(path: str, limit: int | None) -> int:
    """Rows of a JSONL file (non-blank lines) or JSON array (elements, parsed), up to ``limit``."""
    fs, fs_path = _filesystem(path)
    try:
        with fs.open_input_stream(fs_path) as stream:
            chunks: Iterator[bytes] = _iter_chunks(stream)
            is_array = False
            if _may_be_array(file_name(path)):
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


def count_rows(paths: Sequence[str], *, flag: str | None = None, at_most: int | None = None) -> int:
    """How many rows :func:`read_file_rows` yields for these files (rejects included), cheaply.

    Parquet: the footer's row count (no data page is read). JSONL: non-blank lines, by a byte
    scan (no JSON parsing). A ``.json`` file holding one JSON array: its elements, by a
    streamed parse (which also finds a malformed array before any work starts).

    ``at_most``: stop counting once the total reaches it and return ``at_most``; enough to
    check "at least N rows" (``count_rows(pool, at_most=budget) < budget``) while reading
    only the first N rows' worth of JSON, however large the input.

    Raises:
        InputError: one line naming ``flag`` (when given) and the file, for a file that cannot
            be read (unreadable Parquet footer, malformed JSON array, I/O error).
    """
    if at_most is not None and at_most < 0:
        raise ValueError(f"at_most must be >= 0, got {at_most}")
    total = 0
    for path in paths:
        if at_most is not None and total >= at_most:
            return at_most
        left = None if at_most is None else at_most - total
        try:
            if _file_format(file_name(path)) == "parquet":
                handle, pf = _open_parquet(path)
                with handle:
                    total += pf.metadata.num_rows
            else:
                total += _count_json(path, left)
        except InputError as exc:
            raise InputError(f"{flag}: {exc}" if flag else str(exc)) from exc
    return total if at_most is None else min(total, at_most)


# --------------------------------------------------------------------------------------------
# read_file_rows
# --------------------------------------------------------------------------------------------

def _encodable(value: str) -> bool:
    """False for strings with unpaired surrogates (possible via JSON ``\\ud800`` escapes)."""
    return value.isascii() or _SURROGATE.search(value) is None


def _text_value(record: dict, name: str, role: str,
                allow_empty: bool = False) -> tuple[str | None, str | None]:
    """(value, None) or (None, reject reason) for a text-like field."""
    if name not in record:
        return None, f"missing column '{name}'"
    value = record[name]
    if value is None:
        return None, f"null {role}"
    if value is _INVALID_UTF8:
        return None, f"invalid UTF-8 in {role}"
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None, f"invalid UTF-8 in {role}"
    if not isinstance(value, str):
        return None, f"{role} is not a string ({type(value).__name__})"
    if not _encodable(value):
        return None, f"invalid Unicode in {role} (unpaired surrogate)"
    if not allow_empty and not value.strip():
        return None, f"empty {role}"
    return value, None


def _id_value(record: dict, name: str) -> tuple[str | None, str | None]:
    """(id as string, None), (None, None) when the row has no id field, or (None, reason)."""
    if name not in record:
        return None, None
    value = record[name]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, "id is null"
    if value is _INVALID_UTF8:
        return None, "invalid UTF-8 in id"
    if isinstance(value, bool) or isinstance(value, (list, dict, tuple)):
        return None, f"id is not a string or number ({type(value).__name__})"
    if isinstance(value, float):
        text = str(int(value)) if value.is_integer() else repr(value)
    elif isinstance(value, (bytes, bytearray)):
        try:
            text = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None, "invalid UTF-8 in id"
    else:
        text = str(value)
    if not text:
        return None, "empty id"
    if not _encodable(text):
        return None, "invalid Unicode in id (unpaired surrogate)"
    return text, None


def _validate(record: Any, cols: Columns, mode: str) -> tuple[str | None, str | None, str | None,
                                                             str | None, str | None]:
    """(id or None, text, prompt, response, reject) for one record; payload is None if rejected."""
    if isinstance(record, _Bad):
        return None, None, None, None, record.reason
    if not isinstance(record, dict):
        return None, None, None, None, f"not a JSON object ({type(record).__name__})"
    text = prompt = response = None
    if mode == MODE_TEXT:
        text, reject = _text_value(record, cols.text, "text")
    else:
        prompt, reject = _text_value(record, cols.prompt, "prompt", allow_empty=True)
        if reject is None:
            response, reject = _text_value(record, cols.response, "response")
    row_id, id_reject = _id_value(record, cols.id)
    reject = reject or id_reject
    if reject is not None:
        text = prompt = response = None
    return row_id, text, prompt, response, reject


class _Rows:
    """Column-wise accumulator of output rows, emitted as :data:`OUTPUT_SCHEMA` tables."""

    def __init__(self, source: str, id_prefix: str) -> None:
        self._source = source
        self._prefix = id_prefix
        self._clear()

    def _clear(self) -> None:
        self._cols: dict[str, list[Any]] = {name: [] for name in OUTPUT_SCHEMA.names if name != "source"}

    def __len__(self) -> int:
        return len(self._cols["row"])

    def add(self, row: int, row_id: str | None, text: str | None, prompt: str | None,
            response: str | None, reject: str | None) -> None:
        c = self._cols
        c["id"].append(row_id if row_id is not None else f"{self._prefix}:{row}")
        c["row"].append(row)
        c["text"].append(text)
        c["prompt"].append(prompt)
        c["response"].append(response)
        c["reject"].append(reject)

    def flush(self) -> pa.Table:
        n = len(self)
        arrays = {name: pa.array(values, OUTPUT_SCHEMA.field(name).type) for name, values in self._cols.items()}
        arrays["source"] = pa.array([self._source] * n, pa.string())
        self._clear()
        return pa.table([arrays[name] for name in OUTPUT_SCHEMA.names], schema=OUTPUT_SCHEMA)


def _check_mode(mode: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")


def read_file_rows(path: str, cols: Columns, mode: str, chunk_rows: int = 4096, *,
                   id_prefix: str | None = None, on_corrupt: str = "raise") -> Iterator[pa.Table]:
    """Yield the rows of one file as :data:`OUTPUT_SCHEMA` tables of at most ``chunk_rows`` rows.

    Columns: ``id`` (string, never null: the id column as a string when the row has one, else
    ``f"{id_prefix}:{row}"`` with ``id_prefix`` defaulting to the file name), ``source`` (the path
    as given), ``row`` (int64, 0-based; JSONL: physical line index, blank lines count but yield
    nothing), ``text`` / ``prompt`` / ``response`` (string; the columns of the other mode and
    those of rejected rows are null), ``reject`` (null when usable, else a short reason).

    Every non-blank JSONL line, JSON array element and Parquet row yields exactly one row. In
    JSONL the id is taken per line: a line without the id key gets the fallback id. An empty
    file yields one empty table (so the schema is always seen).

    ``on_corrupt``: what a file that turns out to be unreadable part-way does. ``"raise"``
    (default): see Raises. ``"reject"`` (what a long job wants: no crash, nothing silent):
    the rows of a corrupt Parquet row group come as rejects ``corrupt Parquet data in row
    group G: ...`` and the next row groups are still read (so a Parquet file always yields
    its ``num_rows`` rows); any other read error (a JSON array with a syntax error, a
    truncated compressed stream, a file that vanished) ends the file with ONE reject row, at
    the first row not read, whose reason starts with ``unreadable rest of file:``.

    Raises:
        InputError: (``on_corrupt="raise"``) naming the file, when it cannot be opened, or
            part-way after yielding what could be read: corrupt Parquet data pages (every row
            group before the corrupt one is yielded, the corrupt row group is not) or a JSON
            array with a syntax error (the elements before it are yielded). The caller should
            treat the file as failed.
    """
    _check_mode(mode)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if on_corrupt not in ("raise", "reject"):
        raise ValueError(f"on_corrupt must be 'raise' or 'reject', got {on_corrupt!r}")
    rows = _Rows(path, file_name(path) if id_prefix is None else id_prefix)
    if _file_format(file_name(path)) == "parquet":
        fields = [cols.text] if mode == MODE_TEXT else [cols.prompt, cols.response]
        records = _iter_parquet_records(path, fields + [cols.id], chunk_rows, on_corrupt)
    else:
        records = _iter_json_records(path)
    emitted = False
    next_row = 0
    try:
        for row, record in records:
            rows.add(row, *_validate(record, cols, mode))
            next_row = row + 1
            if len(rows) >= chunk_rows:
                emitted = True
                yield rows.flush()
    except InputError as exc:
        if on_corrupt != "reject":
            if len(rows):
                yield rows.flush()
            raise
        rows.add(next_row, None, None, None, None, f"unreadable rest of file: {_one_line(exc)}")
    if len(rows) or not emitted:
        yield rows.flush()


# --------------------------------------------------------------------------------------------
# read_original_rows
# --------------------------------------------------------------------------------------------

def _as_text(value: Any) -> str:
    if isinstance(value, str) and _encodable(value):
        return value
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if _encodable(text) else json.dumps(value, default=str)


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


def _json_original(path: str, rows: list[int]) -> pa.Table:
    wanted = set(rows)
    found: dict[int, Any] = {}
    for row, record in _iter_json_records(path, wanted):
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


def read_original_rows(path: str, rows: Sequence[int]) -> pa.Table:
    """All original columns of the given 0-based rows of one file, in the order given, plus ``row``.

    ``rows`` are the ``row`` values of :func:`read_file_rows` (repeats allowed). Parquet reads only
    the row groups holding the rows (schema metadata is dropped); JSON builds the columns from the
    records (keys in first-seen order; a key whose values Arrow cannot unify becomes JSON text)
    and stops reading after the last wanted JSONL line. If the file already has a column named
    ``row`` it is kept as it is and no ``row`` column is added: rely on the order.

    Raises:
        IndexError: a row that the file does not have (or a blank JSONL line).
        ValueError: a requested row that is not a readable JSON object (a rejected row).
        InputError: the file cannot be read.
    """
    rows = [int(r) for r in rows]
    if _file_format(file_name(path)) == "parquet":
        table = _parquet_original(path, rows)
    else:
        table = _json_original(path, rows)
    if ROW_COLUMN in table.column_names:
        return table
    return table.append_column(ROW_COLUMN, pa.array(rows, pa.int64()))


def read_records(path: str) -> tuple[list[dict], list[tuple[int, str]]]:
    """Every record of one file as a dict with all its columns (small files: ``ntk-ray
    evaluate``), and (row, reason) of the records that are not JSON objects or not decodable."""
    if _file_format(file_name(path)) == "parquet":
        handle, f = _open_parquet(path)
        try:
            return f.read().to_pylist(), []
        finally:
            handle.close()
    good, bad = [], []
    for row, value in _iter_json_records(path):
        if isinstance(value, _Bad):
            bad.append((row, value.reason))
        elif not isinstance(value, dict):
            bad.append((row, f"not a JSON object ({type(value).__name__})"))
        else:
            good.append(value)
    return good, bad

