"""What the rows of the input files mean: columns, modes, checks, counts and rejects.

Plain pyarrow and Python, no Ray. The files themselves are found by :mod:`ntk_ray.io.paths` and
read by the format classes of :mod:`ntk_ray.io.formats` (looked up in its registry); this module
turns their records into rows.

Row numbers (``row``) are 0-based: the Parquet row, the element of a JSON array, the *physical*
line index of a JSONL file (blank lines are not rows but do count for the numbering, so ``row`` is
the line number minus one in any editor), or the record below the header of a CSV/TSV file
(blank lines skipped, not counted). Rows that cannot be used are never dropped: they are
yielded with a ``reject`` reason.

Who calls what: the driver calls :func:`ntk_ray.io.paths.resolve_paths`, :func:`check_columns`
and :func:`count_rows` before any work starts (all raise :class:`InputError`, one line naming the
flag and the file); Ray Data workers call :func:`read_file_rows` (one file per task, with
``on_corrupt="reject"`` so a file that breaks part-way becomes rejects, not a crash);
:func:`read_original_rows` rebuilds the original columns of the selected rows at the end.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import pyarrow as pa

from ntk_ray.core.tokenize import ASSISTANT_TURNS, normalize_conversation
from ntk_ray.io.formats import INVALID_UTF8, ROW_COLUMN, BadRecord, Span, encodable, format_for, one_line, reader_for
from ntk_ray.io.paths import InputError, file_name

__all__ = [
    "CHAT_COLUMNS",
    "Columns",
    "InputError",
    "MODE_CHAT",
    "MODE_PROMPT_RESPONSE",
    "MODE_TEXT",
    "OUTPUT_SCHEMA",
    "ROW_COLUMN",
    "check_columns",
    "count_rows",
    "id_text",
    "looks_like_fallback_id",
    "read_file_rows",
    "read_original_rows",
    "read_records",
]


#: the columns a conversation is looked for in when ``--messages-column`` is not given
CHAT_COLUMNS = ("messages", "conversations")


@dataclass(frozen=True)
class Columns:
    """Names of the input columns (overridable with ``--text-column`` and friends), and which
    assistant turns of a conversation are trained and scored (``--assistant-turns``).
    ``messages=None``: the first of :data:`CHAT_COLUMNS` that a file has."""

    text: str = "text"
    prompt: str = "prompt"
    response: str = "response"
    id: str = "id"
    messages: str | None = None
    assistant_turns: str = "all"

    def __post_init__(self) -> None:
        if self.assistant_turns not in ASSISTANT_TURNS:
            raise ValueError(f"assistant_turns must be one of {ASSISTANT_TURNS}, not {self.assistant_turns!r}")

    @classmethod
    def of(cls, cfg: Any) -> Columns:
        """The columns a config (or parsed flags) names: ``text_column``, ``prompt_column``,
        ``response_column``, ``id_column``, ``messages_column``, ``assistant_turns``."""
        return cls(text=cfg.text_column, prompt=cfg.prompt_column, response=cfg.response_column, id=cfg.id_column,
                   messages=getattr(cfg, "messages_column", None),
                   assistant_turns=getattr(cfg, "assistant_turns", "all"))


MODE_TEXT = "text"
MODE_PROMPT_RESPONSE = "prompt_response"
MODE_CHAT = "chat"
_MODES = (MODE_TEXT, MODE_PROMPT_RESPONSE, MODE_CHAT)

#: a conversation as it comes out of :func:`read_file_rows` (normalised: roles system, user,
#: assistant)
MESSAGES_TYPE = pa.list_(pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())]))

OUTPUT_SCHEMA = pa.schema([
    pa.field("id", pa.string()),
    pa.field("source", pa.string()),
    pa.field("row", pa.int64()),
    pa.field("text", pa.string()),
    pa.field("prompt", pa.string()),
    pa.field("response", pa.string()),
    pa.field("messages", MESSAGES_TYPE),
    pa.field("reject", pa.string()),
])

_FLAG_OF_FIELD = {"text": "--text-column", "prompt": "--prompt-column",
                  "response": "--response-column", "id": "--id-column", "messages": "--messages-column"}


# --------------------------------------------------------------------------------------------
# check_columns
# --------------------------------------------------------------------------------------------

def _found(names: Sequence[str]) -> str:
    shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
    return f"columns found: {shown or '(none)'}"


def _missing_error(path: str, names: Sequence[str], cols: Columns, flag: str) -> InputError:
    missing_pr = [f"'{getattr(cols, f)}' ({_FLAG_OF_FIELD[f]})" for f in ("prompt", "response")
                  if getattr(cols, f) not in names]
    chat = "/".join(f"'{c}'" for c in CHAT_COLUMNS)
    return InputError(f"{flag}: {path} has no column '{cols.text}' (--text-column) nor "
                      f"{' and '.join(missing_pr)} nor {chat} (--messages-column); {_found(names)}")


def _chat_column(names: Sequence[str], cols: Columns) -> str | None:
    """The conversation column of a file with these columns, or None."""
    if cols.messages is not None:
        return cols.messages if cols.messages in names else None
    return next((c for c in CHAT_COLUMNS if c in names), None)


def _layouts(names: Sequence[str], cols: Columns) -> list[str]:
    """The modes a file with these columns can be read in, preferred first."""
    found = []
    if cols.prompt in names and cols.response in names:
        found.append(MODE_PROMPT_RESPONSE)
    if cols.text in names:
        found.append(MODE_TEXT)
    if _chat_column(names, cols) is not None:
        found.append(MODE_CHAT)
    return found


def _describe(mode: str, names: Sequence[str], cols: Columns) -> str:
    if mode == MODE_PROMPT_RESPONSE:
        return f"'{cols.prompt}'+'{cols.response}'"
    if mode == MODE_TEXT:
        return f"'{cols.text}'"
    return f"'{_chat_column(names, cols) or cols.messages or CHAT_COLUMNS[0]}'"


def check_columns(paths: Sequence[str], cols: Columns, flag: str) -> str:
    """Check that every file has usable columns; return the mode for all of them.

    The mode is ``"chat"`` when ``--messages-column`` is given (every file must have that
    column); else ``"prompt_response"`` when every non-empty file has both the prompt and the
    response column (preferred even when ``text`` exists too), else ``"text"`` when every one has
    the text column, else ``"chat"`` when every one has a conversation column (``messages`` or
    ``conversations``). Only Parquet footers, the first records of JSON files and the header (and
    first block) of CSV files are read.

    Raises:
        InputError: a file that is not Parquet/JSON at all (truncated footer, first record not
            JSON, ...), a file with no layout (naming the missing column and its
            ``--*-column`` flag), files mixing layouts, an explicitly chosen id column
            (``--id-column`` other than ``id``) or messages column that a file lacks, or no
            records in any file.
    """
    if not paths:
        raise InputError(f"{flag}: no input files")
    layouts: list[tuple[str, list[str]]] = []
    for path in paths:
        names = reader_for(path).sample_columns(path, flag)
        if names is None:
            continue  # an empty file adds no rows and has no say in the mode
        if cols.messages is not None and cols.messages not in names:
            raise InputError(f"{flag}: {path} has no column '{cols.messages}' (--messages-column); {_found(names)}")
        if not _layouts(names, cols):
            raise _missing_error(path, names, cols, flag)
        if cols.id != Columns().id and cols.id not in names:
            raise InputError(f"{flag}: {path} has no column '{cols.id}' (--id-column); {_found(names)}")
        layouts.append((path, names))
    if not layouts:
        raise InputError(f"{flag}: no records in any input file ({', '.join(paths[:3])}"
                         f"{', ...' if len(paths) > 3 else ''})")
    if cols.messages is not None:
        return MODE_CHAT
    for mode in (MODE_PROMPT_RESPONSE, MODE_TEXT, MODE_CHAT):
        if all(mode in _layouts(n, cols) for _, n in layouts):
            return mode
    first, names = layouts[0]
    mode = _layouts(names, cols)[0]
    other, other_names = next((p, n) for p, n in layouts if mode not in _layouts(n, cols))
    other_mode = _layouts(other_names, cols)[0]
    raise InputError(f"{flag}: files mix column layouts: {other} has {_describe(other_mode, other_names, cols)} "
                     f"but not {_describe(mode, names, cols)}, {first} has {_describe(mode, names, cols)} but not "
                     f"{_describe(other_mode, names, cols)}")


def count_rows(paths: Sequence[str], *, flag: str | None = None, at_most: int | None = None) -> int:
    """How many rows :func:`read_file_rows` yields for these files (rejects included), cheaply.

    Parquet: the footer's row count (no data page is read). JSONL: non-blank lines, by a byte
    scan (no JSON parsing). A ``.json`` file holding one JSON array: its elements, by a
    streamed parse (which also finds a malformed array before any work starts). CSV/TSV: the
    records (malformed ones included), by a streamed parse of one column.

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
            total += reader_for(path).count(path, left)
        except InputError as exc:
            raise InputError(f"{flag}: {exc}" if flag else str(exc)) from exc
    return total if at_most is None else min(total, at_most)


# --------------------------------------------------------------------------------------------
# read_file_rows
# --------------------------------------------------------------------------------------------

def _text_value(record: dict, name: str, role: str,
                allow_empty: bool = False) -> tuple[str | None, str | None]:
    """(value, None) or (None, reject reason) for a text-like field."""
    if name not in record:
        return None, f"missing column '{name}'"
    value = record[name]
    if value is None:
        return None, f"null {role}"
    if value is INVALID_UTF8:
        return None, f"invalid UTF-8 in {role}"
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None, f"invalid UTF-8 in {role}"
    if not isinstance(value, str):
        return None, f"{role} is not a string ({type(value).__name__})"
    if not encodable(value):
        return None, f"invalid Unicode in {role} (unpaired surrogate)"
    if not allow_empty and not value.strip():
        return None, f"empty {role}"
    return value, None


#: a real id of this form (``<data file name>:<row>``) could equal a generated fallback id
_FALLBACK_FORM = re.compile(r"(.+):([0-9]+)", re.DOTALL)
FALLBACK_LIKE_REASON = "id has the form of a generated id (<file>:<row>)"


def looks_like_fallback_id(text: str) -> bool:
    """Whether ``text`` has the form of a generated fallback id: a name that some input format
    claims (``x.jsonl``, ``a/part-0.parquet``, ...), a colon, then digits. Real ids of this form
    are rejected, so a fallback id can never equal a real one."""
    m = _FALLBACK_FORM.fullmatch(text)
    if m is None:
        return False
    try:
        return format_for(m.group(1)) is not None
    except (ValueError, TypeError):
        return False


def id_text(value: Any) -> tuple[str | None, str | None]:
    """The id rule: ids are strings, and every other value becomes one (or a reject) like this.

    * a string: itself (``""`` is ``empty id``);
    * an integer: its decimal digits (``1`` -> ``"1"``: the same id as the string ``"1"``, as
      in a CSV file, where every value is a string);
    * a float: Python's shortest round-trip text, always with a decimal point or exponent
      (``1.0`` -> ``"1.0"``, ``2.5`` -> ``"2.5"``, ``1e+20``), so ``1`` and ``1.0`` are two ids;
      NaN is ``id is null``, +-inf is ``id is not finite (inf)``;
    * bytes: decoded as UTF-8;
    * null, a bool, a list or an object: a reject.

    Returns (text, None) or (None, reason)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, "id is null"
    if value is INVALID_UTF8:
        return None, "invalid UTF-8 in id"
    if isinstance(value, bool) or isinstance(value, (list, dict, tuple)):
        return None, f"id is not a string or number ({type(value).__name__})"
    if isinstance(value, float):
        if math.isinf(value):
            return None, f"id is not finite ({value!r})"
        text = repr(value)
    elif isinstance(value, (bytes, bytearray)):
        try:
            text = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None, "invalid UTF-8 in id"
    else:
        text = str(value)
    if not text:
        return None, "empty id"
    if not encodable(text):
        return None, "invalid Unicode in id (unpaired surrogate)"
    if looks_like_fallback_id(text):
        return None, FALLBACK_LIKE_REASON
    return text, None


def _id_value(record: dict, name: str) -> tuple[str | None, str | None]:
    """(id as string, None), (None, None) when the row has no id field, or (None, reason)."""
    if name not in record:
        return None, None
    return id_text(record[name])


def _conversation(record: dict, cols: Columns) -> tuple[list[dict] | None, str | None]:
    """(normalised conversation, None) or (None, reject reason) (``core.tokenize.normalize_conversation``)."""
    name = cols.messages or next((c for c in CHAT_COLUMNS if c in record), CHAT_COLUMNS[0])
    if name not in record:
        return None, f"missing column '{name}'"
    value = record[name]
    if value is None:
        return None, f"null {name}"
    if value is INVALID_UTF8:
        return None, f"invalid UTF-8 in {name}"
    return normalize_conversation(value, name)


def _validate(record: Any, cols: Columns, mode: str) -> tuple[str | None, str | None, str | None,
                                                             str | None, list | None, str | None]:
    """(id or None, text, prompt, response, messages, reject) for one record; payload is None if
    rejected."""
    if isinstance(record, BadRecord):
        return None, None, None, None, None, record.reason
    if not isinstance(record, dict):
        return None, None, None, None, None, f"not a JSON object ({type(record).__name__})"
    text = prompt = response = messages = None
    if mode == MODE_TEXT:
        text, reject = _text_value(record, cols.text, "text")
    elif mode == MODE_CHAT:
        messages, reject = _conversation(record, cols)
    else:
        prompt, reject = _text_value(record, cols.prompt, "prompt", allow_empty=True)
        if reject is None:
            response, reject = _text_value(record, cols.response, "response")
    row_id, id_reject = _id_value(record, cols.id)
    reject = reject or id_reject
    if reject is not None:
        text = prompt = response = messages = None
    return row_id, text, prompt, response, messages, reject


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
            response: str | None, messages: list | None, reject: str | None) -> None:
        c = self._cols
        c["id"].append(row_id if row_id is not None else f"{self._prefix}:{row}")
        c["row"].append(row)
        c["text"].append(text)
        c["prompt"].append(prompt)
        c["response"].append(response)
        c["messages"].append(messages)
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
                   id_prefix: str | None = None, on_corrupt: str = "raise",
                   span: Span | None = None) -> Iterator[pa.Table]:
    """Yield the rows of one file as :data:`OUTPUT_SCHEMA` tables of at most ``chunk_rows`` rows.

    ``span``: only the rows of that part of the file (:class:`ntk_ray.io.formats.Span`, from
    the format's ``spans``), with the same ``row``, ``id`` and rejects as in the whole-file
    read: the rows of a file's spans, read in order, are the rows of the file.

    Columns: ``id`` (string, never null: the id column as a string when the row has one, else
    ``f"{id_prefix}:{row}"`` with ``id_prefix`` defaulting to the file name), ``source`` (the path
    as given), ``row`` (int64, 0-based; JSONL: physical line index, blank lines count but yield
    nothing), ``text`` / ``prompt`` / ``response`` (string) and ``messages`` (the normalised
    conversation, :data:`MESSAGES_TYPE`) (the columns of the other modes and those of rejected
    rows are null), ``reject`` (null when usable, else a short reason).

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
    fields = ([cols.text] if mode == MODE_TEXT else [cols.prompt, cols.response] if mode == MODE_PROMPT_RESPONSE
              else [cols.messages] if cols.messages else list(CHAT_COLUMNS))
    extra = {} if span is None else {"span": span}  # formats that never split take no span
    records = reader_for(path).iter_records(path, fields + [cols.id], batch_rows=chunk_rows,
                                            on_corrupt=on_corrupt, **extra)
    emitted = False
    next_row = 0 if span is None else span.row
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
        rows.add(next_row, None, None, None, None, None, f"unreadable rest of file: {one_line(exc)}")
    if len(rows) or not emitted:
        yield rows.flush()


# --------------------------------------------------------------------------------------------
# read_original_rows
# --------------------------------------------------------------------------------------------

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
    table = reader_for(path).original_rows(path, rows)
    if ROW_COLUMN in table.column_names:
        return table
    return table.append_column(ROW_COLUMN, pa.array(rows, pa.int64()))


def read_records(path: str) -> tuple[list[dict], list[tuple[int, str]]]:
    """Every record of one file as a dict with all its columns (small files: ``ntk-ray
    evaluate``), and (row, reason) of the records that are not JSON objects or not decodable."""
    return reader_for(path).read_records(path)
