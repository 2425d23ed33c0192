"""The one atomic writer: every file ntk-ray writes (results, shards, markers, stamps) goes
through ``write_atomic``.

A file is written under a hidden temporary name in the same directory (unique per process and
call, so writers on different pods or threads never share one), flushed and fsynced, renamed
over the target, and the directory is fsynced: a reader sees the old file or the complete new
one, never a half-written one, even after a crash or power loss. The temporary name does not
end in ``.parquet``, so no shard glob ever picks it up.

In an object store (``io.location.UriPath``, a ``--work-dir`` URI) there is no rename: the
bytes are produced in memory first and then written under the final name in one upload, which
the store makes visible only once complete (``UriPath.write_bytes``).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path


def atomic_path(path: Path) -> Path:
    """The temporary name ``path`` is written under before the rename."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_dir(directory: Path) -> None:
    """Make a rename durable (best effort: not every platform/file system allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, write) -> None:
    """``write(binary_file)`` into a temporary name, fsync, rename over ``path``. On any failure
    the temporary file is removed and ``path`` is untouched."""
    from ntk_ray.io.location import UriPath

    if isinstance(path, UriPath):
        import io

        buffer = io.BytesIO()
        write(buffer)
        path.write_bytes(buffer.getvalue())
        return
    path = Path(path)
    tmp = atomic_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(data: bytes, path: Path) -> None:
    write_atomic(path, lambda f: f.write(data))


def write_json_atomic(obj, path: Path, **dumps) -> None:
    """JSON (indent 2, ``default=str`` for paths and the like) plus a final newline."""
    dumps = {"indent": 2, "default": str} | dumps
    write_bytes_atomic((json.dumps(obj, **dumps) + "\n").encode(), path)


def write_parquet_atomic(df, path: Path) -> None:
    """A Polars frame as zstd Parquet with statistics (the result files)."""
    write_atomic(path, lambda f: df.write_parquet(f, compression="zstd", statistics=True))
