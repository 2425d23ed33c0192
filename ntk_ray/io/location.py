"""Where a run's working state lives: a local directory (``pathlib.Path``) or a prefix in an
object store (``UriPath``), behind the small part of ``pathlib.Path``'s API the stages use.

``--work-dir s3://bucket/work`` puts the shards, markers, stamps and saved stage results of a
run in an object store, so workers on every node of a cluster read and write them without a
shared (ReadWriteMany) volume. ``location(text)`` is the one constructor: a URI becomes a
``UriPath``, anything else a ``Path`` (so a local run behaves exactly as before).

``UriPath`` supports ``/``, ``str``, ``name``/``stem``/``parent``, ``exists``/``is_file``/
``is_dir``, ``mkdir``, ``read_bytes``/``read_text``, ``write_bytes``, ``unlink``, ``iterdir``,
``glob`` (one level, no ``/`` in the pattern) and ``rmtree`` (module function, both kinds).

**Writes on object stores.** There is no rename: an object is written once, under its final
name, in one request sequence started only when its bytes are complete (``write_bytes``: the
caller serialises first). S3 makes an object visible only when its PUT (or multipart upload)
completes, so a writer killed mid-upload leaves nothing a listing shows; an object that exists
is whole. That is what ``io.atomic`` needs ("a file that exists is whole"); the durability comes
from the store. Markers are written after their data, as locally.

Credentials come from the environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, an
instance or IRSA role, ``AWS_ENDPOINT_URL`` for an S3-compatible server; GCS:
``GOOGLE_APPLICATION_CREDENTIALS``), never from the URI: the URIs of a URI work dir are
stored in the run's saved results (``io.outdir`` refuses one with a credential). Non-secret
query parameters (``?region=...&endpoint_override=...&scheme=http``) are kept on every
derived path.
"""

from __future__ import annotations

import fnmatch
import os
import threading
from pathlib import Path

import pyarrow.fs as pafs

_FS_CACHE: dict[str, pafs.FileSystem] = {}
_FS_LOCK = threading.Lock()
_BEFORE_EXIT: list = []  # callables run at exit before the cached file systems are dropped


def before_exit(fn) -> None:
    """Run ``fn`` at interpreter exit while the object-store file systems still work (``io.outdir``
    releases its URI work-dir locks there); then :func:`_close_filesystems` runs."""
    if fn not in _BEFORE_EXIT:
        _BEFORE_EXIT.append(fn)


def _close_filesystems() -> None:
    """At exit (a Python atexit hook, so before pyarrow's C-level one): run the ``before_exit``
    callables, drop every cached file system, then shut the AWS SDK down ourselves while nothing
    references it. pyarrow's own hook (``ensure_s3_finalized``) can deadlock in
    ``Aws::ShutdownAPI`` waiting for the SDK's threads while an ``S3FileSystem`` is still
    referenced (apache/arrow#50188). The hang CI once saw there had another cause (a descriptor
    of the SDK closed under it: ``runtime.ray_executor._StderrFilter.close``); this is the
    defensive half."""
    import gc

    for fn in list(_BEFORE_EXIT):
        try:
            fn()
        except Exception:  # noqa: BLE001 - at exit nothing may stop the rest of the shutdown
            pass
    with _FS_LOCK:
        used_s3 = any(k.lower().startswith("s3://") for k in _FS_CACHE)
        _FS_CACHE.clear()
    gc.collect()
    if used_s3:
        try:
            pafs.finalize_s3()
        except Exception:  # noqa: BLE001
            pass


_REGISTERED = False


def _register_exit_hook() -> None:
    global _REGISTERED
    if not _REGISTERED:
        import atexit

        atexit.register(_close_filesystems)
        _REGISTERED = True


def is_uri(text) -> bool:
    from ntk_ray.io.fs import is_uri as _is_uri

    return isinstance(text, UriPath) or (isinstance(text, str) and _is_uri(text))


def _filesystem(head: str, query: str) -> tuple[pafs.FileSystem, str]:
    """(file system, path inside it); one file system per ``scheme://authority?query`` per
    process (S3 and GCS paths are ``bucket/key``; other schemes ask pyarrow each time)."""
    scheme, rest = head.split("://", 1)
    if scheme.lower() not in ("s3", "gs", "gcs"):
        fs, inner = pafs.FileSystem.from_uri(head + query)
        return fs, inner.rstrip("/")
    key = f"{scheme}://{rest.split('/', 1)[0]}{query}"
    with _FS_LOCK:
        fs = _FS_CACHE.get(key)
    if fs is None:
        _register_exit_hook()
        fs, _ = pafs.FileSystem.from_uri(key)
        with _FS_LOCK:
            _FS_CACHE[key] = fs
    return fs, rest.rstrip("/")


class UriPath:
    """A location in an object store (``scheme://bucket/key``, query parameters kept): see the
    module docstring. Immutable and hashable, like ``Path``."""

    __slots__ = ("head", "query")

    def __init__(self, uri: str):
        from ntk_ray.io.fs import split_query

        head, query = split_query(str(uri))
        scheme, rest = head.split("://", 1)
        self.head = f"{scheme}://{rest.rstrip('/')}" if rest.strip("/") else head
        self.query = query

    # --- names -----------------------------------------------------------------------------
    def __truediv__(self, name) -> UriPath:
        name = str(name).strip("/")
        return UriPath(f"{self.head}/{name}{self.query}") if name else self

    def __str__(self) -> str:
        return self.head + self.query

    def __repr__(self) -> str:
        from ntk_ray.io.fs import redact

        return f"UriPath({redact(str(self))!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, UriPath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    @property
    def name(self) -> str:
        return self.head.rsplit("/", 1)[-1]

    @property
    def stem(self) -> str:
        name = self.name
        return name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name

    @property
    def suffix(self) -> str:
        name = self.name
        return "." + name.rsplit(".", 1)[1] if "." in name.lstrip(".") else ""

    @property
    def parent(self) -> UriPath:
        return UriPath(self.head.rsplit("/", 1)[0] + self.query)

    def fs(self) -> tuple[pafs.FileSystem, str]:
        """(pyarrow file system, path inside it)."""
        return _filesystem(self.head, self.query)

    # --- queries ---------------------------------------------------------------------------
    def _type(self):
        fs, inner = self.fs()
        return fs.get_file_info(inner).type

    def exists(self) -> bool:
        return self._type() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._type() == pafs.FileType.Directory

    def iterdir(self):
        fs, inner = self.fs()
        try:
            infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
        except FileNotFoundError:
            return iter(())
        return iter(sorted((self / info.base_name for info in infos), key=str))

    def glob(self, pattern: str):
        """Children whose name matches ``pattern`` (one level: no ``/``, no ``**``)."""
        if "/" in pattern:
            raise ValueError(f"UriPath.glob: one level only, got {pattern!r}")
        return iter([p for p in self.iterdir() if fnmatch.fnmatchcase(p.name, pattern)])

    # --- reads and writes ------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        fs, inner = self.fs()
        with fs.open_input_stream(inner) as f:
            return f.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        """The whole object in one go, under its final name (see the module docstring): no
        caller code runs between the start of the upload and its completion."""
        fs, inner = self.fs()
        stream = fs.open_output_stream(inner)
        stream.write(data)
        stream.close()

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        """Object stores have no directories: nothing to create (a prefix exists once an
        object is written under it)."""

    def unlink(self, missing_ok: bool = False) -> None:
        fs, inner = self.fs()
        try:
            fs.delete_file(inner)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def download(self, target: Path) -> Path:
        """Copy this object, or every object under this prefix, to the local ``target``."""
        fs, inner = self.fs()
        if fs.get_file_info(inner).type == pafs.FileType.File:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            Path(target).write_bytes(self.read_bytes())
            return Path(target)
        for info in fs.get_file_info(pafs.FileSelector(inner, recursive=True)):
            if info.type != pafs.FileType.File:
                continue
            dest = Path(target) / info.path[len(inner):].lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(info.path) as f:
                dest.write_bytes(f.read())
        return Path(target)

    def upload(self, source: Path) -> None:
        """Copy the local file, or every file under the local directory, ``source`` here (each
        object written whole, ``write_bytes``)."""
        source = Path(source)
        if source.is_file():
            self.write_bytes(source.read_bytes())
            return
        for path in sorted(source.rglob("*")):
            if path.is_file():
                (self / path.relative_to(source).as_posix()).write_bytes(path.read_bytes())


def location(place) -> Path | UriPath:
    """A ``UriPath`` for a URI (or a ``UriPath``), a ``Path`` for anything else."""
    if isinstance(place, (UriPath, Path)):
        return place
    text = os.fspath(place)
    if not is_uri(text):
        return Path(text)
    if text.lower().startswith("file://"):  # a local directory: local atomic renames
        import urllib.parse

        return Path(urllib.parse.unquote(urllib.parse.urlsplit(text).path))
    return UriPath(text)


def rmtree(place, ignore_errors: bool = True) -> None:
    """Delete a directory tree (local) or every object under a prefix (object store)."""
    import shutil

    place = location(place)
    if isinstance(place, Path):
        shutil.rmtree(place, ignore_errors=ignore_errors)
        return
    fs, inner = place.fs()
    try:
        fs.delete_dir(inner)
    except (FileNotFoundError, OSError):
        if not ignore_errors:
            raise


_LOCAL_COPIES: dict[str, str] = {}


def local_copy(place: str | None) -> str | None:
    """A local path for ``place``: itself when local (or None); for a URI, a copy downloaded
    once per process into a temporary directory (an adapter directory or the Adam moments a
    worker loads with ``from_pretrained`` / ``torch.load``)."""
    import tempfile

    if place is None or not is_uri(str(place)):
        return place
    key = str(place)
    if key not in _LOCAL_COPIES:
        src = UriPath(key)
        target = Path(tempfile.mkdtemp(prefix="ntk-ray-copy-")) / (src.name or "copy")
        _LOCAL_COPIES[key] = str(src.download(target))
    return _LOCAL_COPIES[key]
