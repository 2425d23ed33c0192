"""Output to object storage: ``--out s3://bucket/run`` (or ``gs://``, ``abfs://``, ``hdfs://``,
``file://``): any URI that ``pyarrow.fs.FileSystem.from_uri`` understands.

The stages write their shards and completion markers into a local (or shared, e.g. a
Kubernetes PVC) working directory, ``--work-dir`` (default: under ``~/.cache/ntk-ray/runs/``),
which is what makes a rerun resume; when the run is complete, the four result files are copied
to the URI. On a multi-node cluster a local working directory must be on storage that every node
mounts at the same path (the actors write their shards there); or ``--work-dir`` is itself an
object-store URI (``io.location``, ``io.outdir.prepare_uri_work_dir``): the state lives there and
only the result files are staged locally (``default_work_dir``), and a driver on another machine
fetches a finished run's files back (``fetch_published``).

Before any work the location is probed (a ``_ntk-ray-probe-<uuid>`` object written and
deleted) and stamped with the run's config (``_ntk_ray_stamp.json``). Publishing is
all-or-nothing for a reader who takes a run as complete only when ``manifest.json`` exists: an
earlier ``manifest.json`` is deleted first, the data files go up next, ``manifest.json`` last.
Every URI that is logged, stamped or named goes through ``fs.redact`` (no credentials).

Credentials come from the environment, as for any pyarrow file system (AWS_* variables or an
instance role for S3, GOOGLE_APPLICATION_CREDENTIALS for GCS).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

RESULT_FILES = ("ranked.parquet", "selected.parquet", "rejects.parquet", "manifest.json")
DATA_FILES = RESULT_FILES[:3]
URI_STAMP = "_ntk_ray_stamp.json"


def is_uri(path: str | os.PathLike) -> bool:
    """True for ``scheme://...`` (a plain or relative path is not a URI): the rule the inputs use."""
    from ntk_ray.io import paths

    return paths.is_uri(str(path))


def default_work_dir(uri: str) -> Path:
    """A local working directory for a run whose results go to ``uri``: the same URI always
    gets the same directory, so rerunning the command resumes. Named after the redacted URI
    (no credential ever becomes part of a path), so two secrets for one location share it."""
    from ntk_ray.io.fs import redact

    safe = redact(uri)
    root = Path(os.environ.get("NTK_RAY_CACHE", Path.home() / ".cache" / "ntk-ray")) / "runs"
    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", safe.split("://", 1)[1]).strip("_")[-60:]
    return root / f"{tail}-{hashlib.sha256(safe.encode()).hexdigest()[:10]}"


def uri_filesystem(uri: str):
    """(pyarrow file system, root path without a trailing '/') of an output URI; the one place
    output URIs are opened. Raises ValueError (credentials redacted) when pyarrow cannot."""
    import pyarrow.fs as pafs

    from ntk_ray.io.fs import redact

    try:
        fs, root = pafs.FileSystem.from_uri(uri)
    except Exception as e:  # unknown scheme, no credentials, bad bucket name
        raise ValueError(redact(f"--out {uri}: {e}")) from None
    return fs, root.rstrip("/")


def probe_uri(uri: str) -> None:
    """Write and delete a small ``_ntk-ray-probe-<uuid>`` object at ``uri``: fails (with the
    file system's error) when the location cannot be written, before any work."""
    import uuid

    fs, root = uri_filesystem(uri)
    fs.create_dir(root, recursive=True)
    probe = f"{root}/_ntk-ray-probe-{uuid.uuid4().hex}"
    with fs.open_output_stream(probe) as f:
        f.write(b"ntk-ray write probe\n")
    fs.delete_file(probe)


def _exists(fs, path: str) -> bool:
    import pyarrow.fs as pafs

    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_uri_stamp(uri: str) -> tuple[bool, str | None]:
    """(whether ``<uri>/_ntk_ray_stamp.json`` exists, its fingerprint or None when unreadable)."""
    import json

    fs, root = uri_filesystem(uri)
    path = f"{root}/{URI_STAMP}"
    if not _exists(fs, path):
        return False, None
    try:
        with fs.open_input_stream(path) as f:
            fingerprint = json.loads(f.read().decode()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return True, None
    return True, fingerprint if isinstance(fingerprint, str) and fingerprint else None


def write_uri_stamp(uri: str, stamp: dict) -> None:
    import json

    fs, root = uri_filesystem(uri)
    fs.create_dir(root, recursive=True)
    _upload_bytes(fs, f"{root}/{URI_STAMP}", (json.dumps(stamp, indent=2, default=str) + "\n").encode())


def _upload(fs, source: Path, dest: str) -> None:
    """One file to ``dest``, whole: object stores make an object visible only once its stream
    is closed; on a local file system it is written under a temporary name and renamed."""
    import pyarrow.fs as pafs
    import uuid

    local = isinstance(fs, pafs.LocalFileSystem)
    target = f"{dest.rsplit('/', 1)[0]}/.{dest.rsplit('/', 1)[1]}.tmp-{uuid.uuid4().hex[:8]}" if local else dest
    try:
        with open(source, "rb") as src, fs.open_output_stream(target) as dst:
            while chunk := src.read(8 << 20):
                dst.write(chunk)
        if local:
            fs.move(target, dest)
    except BaseException:
        if local:
            try:
                fs.delete_file(target)
            except OSError:
                pass
        raise


def _upload_bytes(fs, dest: str, data: bytes) -> None:
    import tempfile

    with tempfile.NamedTemporaryFile() as tmp:
        tmp.write(data)
        tmp.flush()
        _upload(fs, Path(tmp.name), dest)


def is_published(local_dir: str | Path, uri: str) -> bool:
    """True when ``uri`` has this run's ``manifest.json`` (byte for byte) and every result file:
    a rerun of a complete run does not upload again."""
    fs, root = uri_filesystem(uri)
    try:
        with fs.open_input_stream(f"{root}/manifest.json") as f:
            remote = f.read()
        local = (Path(local_dir) / "manifest.json").read_bytes()
    except (OSError, FileNotFoundError):
        return False
    return remote == local and all(_exists(fs, f"{root}/{n}") for n in DATA_FILES)


def fetch_published(uri: str, local_dir: str | Path) -> bool:
    """Copy a complete published run (``manifest.json`` and every data file, plus
    ``report.html`` when there) from ``uri`` into ``local_dir``: a driver that resumes a finished
    run from a URI work dir on another machine. False (nothing copied) when it is not complete."""
    fs, root = uri_filesystem(uri)
    names = list(DATA_FILES) + ["manifest.json"]
    if not all(_exists(fs, f"{root}/{n}") for n in names):
        return False
    if _exists(fs, f"{root}/report.html"):
        names.insert(0, "report.html")
    from ntk_ray.io.atomic import write_bytes_atomic

    Path(local_dir).mkdir(parents=True, exist_ok=True)
    for name in names:  # manifest.json last: a local manifest means a complete copy
        with fs.open_input_stream(f"{root}/{name}") as f:
            write_bytes_atomic(f.read(), Path(local_dir) / name)
    return True


def publish(local_dir: str | Path, uri: str, names=RESULT_FILES) -> list[str]:
    """Copy ``names`` from ``local_dir`` to ``uri`` (created if needed), all-or-nothing for a
    reader who treats a run as complete only when ``manifest.json`` exists: a ``manifest.json``
    already there (an earlier run's) is deleted first, then the data files are uploaded, then
    ``manifest.json`` last. An interrupted upload thus never looks complete, with new and old
    files mixed. Returns the destination URIs (redacted)."""
    from ntk_ray.io.fs import redact, split_query

    fs, root = uri_filesystem(uri)
    fs.create_dir(root, recursive=True)
    if _exists(fs, f"{root}/manifest.json"):
        fs.delete_file(f"{root}/manifest.json")
    ordered = [n for n in names if n != "manifest.json"] + [n for n in names if n == "manifest.json"]
    written = []
    for name in ordered:
        _upload(fs, Path(local_dir) / name, f"{root}/{name}")
        head, query = split_query(uri)
        written.append(redact(f"{head.rstrip('/')}/{name}{query}"))
    return written
