"""File systems: local paths and URIs (``s3://``, ``gs://``, ``file://``, any pyarrow file
system), their names, and ``InputError``, the one-line error of bad input. The lowest layer of
``io``: ``formats`` opens files through it, ``paths`` finds them."""

from __future__ import annotations

import os
import re
import urllib.parse

import pyarrow as pa
import pyarrow.fs as pafs


class InputError(ValueError):
    """Bad input detected before work starts. ``str(e)`` is ONE line naming the file/column/flag.

    Also raised by :func:`ntk_ray.io.rows.read_file_rows` when a file turns out to be unreadable
    part-way (corrupt Parquet pages, a malformed JSON array); the message then names the file.
    """

    def __init__(self, message: str) -> None:
        super().__init__(re.sub(r"\s*[\r\n]+\s*", " ", str(message)).strip())


URI = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)(.*)\Z", re.DOTALL)


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` (a plain or relative path is not a URI)."""
    return URI.match(path) is not None


def split_query(uri: str) -> tuple[str, str]:
    """``'s3://b/k?region=x'`` -> ``('s3://b/k', '?region=x')``."""
    head, sep, query = uri.partition("?")
    return head, (sep + query if sep else "")


def components(path: str) -> list[str]:
    """The path components of a local path or URI (scheme and query removed, %-decoded)."""
    if is_uri(path):
        rest = URI.match(split_query(path)[0]).group(2)  # type: ignore[union-attr]
        return [urllib.parse.unquote(c) for c in rest.split("/") if c]
    return [c for c in os.path.normpath(path).split(os.sep) if c and c != "."]


def file_name(path: str) -> str:
    """The file name of a local path or URI (the default prefix of fallback ids)."""
    comps = components(path)
    return comps[-1] if comps else path


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow file system and in-filesystem path of a local path or URI.

    Raises:
        InputError: a URI that pyarrow cannot open (unknown scheme, bad bucket name ...).
    """
    if is_uri(path):
        try:
            return pafs.FileSystem.from_uri(path)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise InputError(f"cannot open {path}: {exc}") from exc
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
