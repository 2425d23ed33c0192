"""Where the input files are: local paths and URIs, file systems, directories and globs.

Paths are local paths or URIs with a scheme (``s3://``, ``gs://``, ``file://`` ...) opened through
``pyarrow.fs.FileSystem.from_uri``. URIs must be valid URIs (percent-encode spaces); a query string
(``?region=...``) is passed to pyarrow and carried over to the files found under a directory URI,
so ``?`` is never a glob character in a URI (``*`` and ``[...]`` are).

Which file names are inputs is decided by the format registry (:func:`ntk_ray.io.formats.format_for`);
this module never looks at a suffix itself. It also owns :class:`InputError`, the one error type of
the input layer (the lowest module of it, so every other one can raise it).
"""

from __future__ import annotations

import glob as globlib
import os
import re
import urllib.parse
from typing import Sequence

import pyarrow as pa
import pyarrow.fs as pafs

from ntk_ray.io import formats, hf
from ntk_ray.io.fs import InputError, components, file_name, filesystem, is_uri, split_query, URI

__all__ = [
    "InputError",
    "fallback_id_prefixes",
    "file_name",
    "filesystem",
    "is_uri",
    "resolve_paths",
]


# Hive/Spark convention (as pyarrow.dataset): names starting with these are skipped in directories.
_IGNORED_PREFIXES = (".", "_")


def _supported(name: str) -> bool:
    """Whether a file name is an input file (some format of the registry claims it)."""
    return formats.format_for(name) is not None


def _ignored(name: str) -> bool:
    return name.startswith(_IGNORED_PREFIXES)


def _filesystem_for(spec: str, flag: str) -> tuple[pafs.FileSystem, str]:
    """:func:`filesystem` with the flag in front of its error."""
    try:
        return filesystem(spec)
    except InputError as exc:
        raise InputError(f"{flag}: {exc}") from exc


def _identity(path: str) -> str:
    """A key under which two spellings of the same local file compare equal."""
    if is_uri(path):
        return path
    return os.path.normpath(os.path.abspath(os.path.expanduser(path)))


def _real_identity(path: str) -> str:
    """A key under which every way to reach one local file compares equal: two globs, ``./``,
    a symlink to it or through a symlinked directory (what ``resolve_paths`` de-duplicates on)."""
    if is_uri(path):
        return path
    return os.path.realpath(os.path.expanduser(path))


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
    expected = formats.expected_suffixes()
    return InputError(f"{flag}: {where}unsupported file type '{path}' (expected {expected})")


# ---- local ----------------------------------------------------------------------------------

def _walk(root: str, prune=None):
    """``os.walk(root)`` that follows symlinked directories but enters every real directory once
    (a symlink loop, or a second link to a directory already walked, is not entered again), in
    sorted order. ``prune(name)``: directory names not to enter."""
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        keep = []
        for d in sorted(dirnames):
            if prune is not None and prune(d):
                continue
            try:
                sub = os.stat(os.path.join(dirpath, d))
            except OSError:  # a dangling symlink
                continue
            if (sub.st_dev, sub.st_ino) not in seen:
                keep.append(d)
        dirnames[:] = keep
        yield dirpath, dirnames, sorted(filenames)


def _walk_local(spec: str) -> list[str]:
    """Supported files under a local directory, recursively (symlinked directories included,
    each real directory once), skipping '.'/'_' names, sorted."""
    root = os.path.expanduser(spec)
    found: list[str] = []
    for dirpath, _, filenames in _walk(root, prune=_ignored):
        for name in filenames:
            if _ignored(name) or not _supported(name):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            found.append(os.path.join(spec, rel))
    return sorted(found)


def _recursive_glob(expanded: str) -> list[str]:
    """Matches of a local glob holding ``**``, found by :func:`_walk` (never looping through
    symlinks, unlike ``glob.glob(recursive=True)``): files and directories, sorted."""
    parts = expanded.split(os.sep)
    first = next(i for i, part in enumerate(parts) if _has_magic(part))
    base = os.sep.join(parts[:first]) or (os.sep if expanded.startswith(os.sep) else "")
    regex = _glob_regex("/".join(parts[first:]))
    matches = []
    for dirpath, dirnames, filenames in _walk(base or "."):
        for name in dirnames + filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), base or ".")
            if regex.match(rel.replace(os.sep, "/")):
                matches.append(os.path.join(base, rel) if base else rel)
    return sorted(matches)


def _glob_skips(rel_parts: Sequence[str], pattern_parts: Sequence[str]) -> bool:
    """Whether a glob match lies under a '.'/'_' name the pattern did not spell out.

    ``data/**/*.parquet`` must not pick up Spark's ``data/_temporary/...`` files, while
    ``data/_keep/*.parquet`` still may.
    """
    allowed = {p[0] for p in pattern_parts if p[:1] in _IGNORED_PREFIXES}
    return any(part[:1] in _IGNORED_PREFIXES and part[0] not in allowed for part in rel_parts)


def _resolve_local_glob(spec: str, flag: str) -> list[str]:
    expanded = os.path.expanduser(spec)
    if "**" in expanded:
        matches = _recursive_glob(expanded)
    else:
        matches = sorted(globlib.glob(expanded))
    if not matches:
        raise InputError(f"{flag}: glob '{spec}' matched no files")
    parts = expanded.split(os.sep)
    first = next(i for i, part in enumerate(parts) if _has_magic(part))
    matches = [m for m in matches if not _glob_skips(m.split(os.sep)[first:], parts[first:])]
    found: list[str] = []
    for match in matches:
        if os.path.isdir(match):
            found.extend(_walk_local(match))
        elif _supported(os.path.basename(match)):
            found.append(match)
        elif not _ignored(os.path.basename(match)):
            raise _unsupported(flag, match, glob=spec)
    if not found:
        raise InputError(f"{flag}: glob '{spec}' matched no {formats.suffix_list()} files")
    return sorted(found)


def _resolve_local(spec: str, flag: str) -> list[str]:
    expanded = os.path.expanduser(spec)
    if os.path.isdir(expanded):
        found = _walk_local(spec)
        if not found:
            raise InputError(f"{flag}: directory {spec} has no {formats.suffix_list()} files")
        return found
    if os.path.exists(expanded):
        if not _supported(os.path.basename(expanded)):
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
    return not any(_ignored(p) for p in rel_parts) and _supported(rel_parts[-1])


def _resolve_uri_glob(spec: str, flag: str) -> list[str]:
    head, query = split_query(spec)
    scheme, rest = URI.match(head).groups()  # type: ignore[union-attr]
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
            if _supported(parts[-1]):
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
        raise InputError(f"{flag}: glob '{spec}' matched no {formats.suffix_list()} files")
    return sorted(found)


def _resolve_uri(spec: str, flag: str) -> list[str]:
    head, query = split_query(spec)
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
                raise InputError(f"{flag}: directory {spec} has no {formats.suffix_list()} files")
            return found
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{flag}: cannot list {spec}: {exc}") from exc
    if not _supported(file_name(spec)):
        raise _unsupported(flag, spec)
    return [spec]


def resolve_paths(spec: str | os.PathLike | Sequence[str | os.PathLike], flag: str) -> list[str]:
    """Expand a file, a directory or a glob (or a list of them) into a list of input files.

    * a file must have a supported suffix (one that a format of
      :data:`ntk_ray.io.formats.FORMATS` claims: ``.jsonl``, ``.json``, ``.parquet`` ...);
    * a directory is searched recursively for files with supported suffixes (others are ignored,
      as are files and directories whose names start with ``.`` or ``_``), sorted;
    * a glob (``*``, ``?``, ``[...]``, ``**``; a local path that exists is never a glob) is
      expanded and sorted; matched directories are expanded as above, a matched file with an
      unsupported suffix is an error.
    * a Hugging Face dataset (a ``save_to_disk`` directory, a dataset repository snapshot or
      ``hf://datasets/owner/name``, optionally ``:SPLIT`` or ``:CONFIG:SPLIT``) stands for the
      files :func:`ntk_ray.io.hf.expand` finds in it.
    Local paths are returned as given (children joined onto the given directory); URIs stay
    URIs. Several specs keep their order; a file reached twice (two globs, a symlink, a
    symlinked directory: the same real path) is listed once, the first time. Symlinked
    directories are followed, each real directory once, so a symlink loop ends.

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
        hf_files = hf.expand(text, flag)  # a Hugging Face dataset: its files or patterns
        for part in [text] if hf_files is None else hf_files:
            for path in (_resolve_uri if is_uri(part) else _resolve_local)(part, flag):
                key = _real_identity(path)
                if key not in seen:
                    seen.add(key)
                    out.append(path)
    return out


def fallback_id_prefixes(paths: Sequence[str]) -> dict[str, str]:
    """For each path, the shortest trailing part of it that no other path shares.

    The contract makes a missing id ``<file name>:<row>``; with Spark-style layouts
    (``a/part-0.parquet``, ``b/part-0.parquet``) plain file names collide, so callers pass
    ``id_prefix=fallback_id_prefixes(paths)[path]`` to :func:`ntk_ray.io.rows.read_file_rows`, which gives
    ``part-0.parquet`` when the name is unique and ``a/part-0.parquet`` otherwise. ``paths``
    must be every file of the run, domain and pool together: a domain ``med/train.jsonl`` and
    a pool ``web/train.jsonl`` without id columns would otherwise give the same ids, and every
    pool row would be rejected as "id also in the domain set". Spellings of one file (relative,
    absolute, ``./``) get one prefix, so a file given as both domain and pool still overlaps.
    """
    # local paths are made absolute first, so two spellings of one file get the same prefix
    # and 'part-0.parquet' vs '../x/part-0.parquet' get 'cwd/...' and 'x/...'
    comps = {p: components(_identity(p)) or [p] for p in paths}
    prefixes: dict[str, str] = {}
    for path, parts in comps.items():
        for k in range(1, len(parts) + 1):
            mine = parts[-k:]
            if all(other[-k:] != mine for other in comps.values() if other != parts):
                break
        prefixes[path] = "/".join(parts[-k:])
    return prefixes


