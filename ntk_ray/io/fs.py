"""File systems: local paths and URIs (``s3://``, ``gs://``, ``file://``, any pyarrow file
system; ``hf://`` through fsspec), their names, and ``InputError``, the one-line error of bad
input. The lowest layer of ``io``: ``formats`` opens files through it, ``paths`` finds them."""

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


#: URI schemes pyarrow has no file system for, opened through fsspec's: ``hf://`` is the Hugging
#: Face Hub (``huggingface_hub.HfFileSystem``: ``hf://datasets/owner/name[@revision]/path``)
FSSPEC_SCHEMES = ("hf",)


def _fsspec_filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """An fsspec file system (the one registered for the scheme) wrapped as a pyarrow one."""
    import fsspec.core

    head, _ = split_query(path)
    # URIs are percent-encoded (``paths`` quotes the names it appends); fsspec paths are not.
    # '%2F' stays: it can only be the '/' of a revision (``@refs%2Fpr%2F1``), never of a name
    head = urllib.parse.unquote(re.sub("%2[fF]", "\x00", head)).replace("\x00", "%2F")
    try:
        fs, inner = fsspec.core.url_to_fs(head)
    except (ImportError, ValueError, OSError) as exc:
        raise InputError(f"cannot open {path}: {exc}") from exc
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), inner


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow file system and in-filesystem path of a local path or URI (``hf://`` through
    fsspec: :data:`FSSPEC_SCHEMES`).

    Raises:
        InputError: a URI that pyarrow cannot open (unknown scheme, bad bucket name ...).
    """
    if is_uri(path) and path.split("://", 1)[0].lower() in FSSPEC_SCHEMES:
        return _fsspec_filesystem(path)
    if is_uri(path):
        try:
            return pafs.FileSystem.from_uri(path)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise InputError(f"cannot open {path}: {exc}") from exc
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


# ---------------------------------------------------------------------------------------------
# credentials in URIs: never logged, stamped, hashed into a name or written into a result
REDACTED = "***"
_URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>,;)\]}]*")
_SECRET_NAMES = ("secret", "token", "password", "passwd", "credential", "signature", "access_key", "accesskey",
                 "api_key", "apikey", "account_key", "accountkey", "private_key", "client_secret", "auth")
_SECRET_EXACT = {"sig", "key", "pwd", "pass", "sas"}


def _secret_param(name: str) -> bool:
    n = urllib.parse.unquote_plus(name).strip().lower().replace("-", "_")
    return n.startswith("x_amz_") or n in _SECRET_EXACT or any(s in n for s in _SECRET_NAMES)


def _redact_uri(uri: str) -> str:
    m = URI.match(uri)
    if m is None:
        return uri
    scheme, rest = m.group(1), m.group(2)
    head, sep, query = rest.partition("?")
    query, hsep, fragment = query.partition("#")
    # userinfo: user[:password]@ before the host; an unencoded '/' inside a secret key still
    # counts when a ':' comes before it (KEY:SEC/RET@bucket)
    # (a userinfo without ':' is a name, not a secret: abfs://container@account, hdfs://user@host)
    authority = re.split(r"[/#]", head, maxsplit=1)[0]
    if "@" in authority:
        if ":" in authority.rsplit("@", 1)[0]:
            head = REDACTED + "@" + head[len(authority.rsplit("@", 1)[0]) + 1:]
    else:
        m2 = re.match(r"[^/@#]*:[^@#]*@", head)
        if m2:
            head = REDACTED + "@" + head[m2.end():]
    if sep:
        parts = []
        for part in query.split("&"):
            name, eq, _ = part.partition("=")
            parts.append(f"{name}={REDACTED}" if eq and _secret_param(name) else part)
        query = "&".join(parts)
    return scheme + head + sep + query + hsep + fragment


def redact(value):
    """``value`` with every credential in a URI masked as ``***``: a ``user:password`` userinfo
    (``s3://KEY:SECRET@bucket`` -> ``s3://***@bucket``; a bare ``name@`` is kept) and secret-looking query parameters
    (access_key, secret_key, session_token, token, sig, signature, X-Amz-*, credential,
    password, ...; case-insensitive) of every URI in a string, also inside a longer text (a log
    line, an error). Dicts, lists and tuples are redacted element by element; anything else
    (a local path, a number) comes back unchanged. Bucket, host, path and the other parameters
    stay, so two locations never redact to the same string, while two secrets for one location
    do."""
    if isinstance(value, str):
        return _URI_IN_TEXT.sub(lambda m: _redact_uri(m.group(0)), value) if "://" in value else value
    if isinstance(value, os.PathLike):
        return value
    if isinstance(value, dict):
        return {redact(k) if isinstance(k, str) else k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value
