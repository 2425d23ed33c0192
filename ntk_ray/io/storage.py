"""Output to object storage: ``--out s3://bucket/run`` (or ``gs://``, ``abfs://``, ``hdfs://``,
``file://``): any URI that ``pyarrow.fs.FileSystem.from_uri`` understands.

The stages write their shards and completion markers into a local (or shared, e.g. a
Kubernetes PVC) working directory, ``--work-dir`` (default: under ``~/.cache/ntk-ray/runs/``),
which is what makes a rerun resume; when the run is complete, the four result files are copied
to the URI. On a multi-node cluster the working directory must be on storage that every node
mounts at the same path (the actors write their shards there).

Credentials come from the environment, as for any pyarrow file system (AWS_* variables or an
instance role for S3, GOOGLE_APPLICATION_CREDENTIALS for GCS).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

RESULT_FILES = ("ranked.parquet", "selected.parquet", "rejects.parquet", "manifest.json")


def is_uri(path: str | os.PathLike) -> bool:
    """True for ``scheme://...`` (a plain or relative path is not a URI): the rule the inputs use."""
    from ntk_ray.io import paths

    return paths.is_uri(str(path))


def default_work_dir(uri: str) -> Path:
    """A local working directory for a run whose results go to ``uri``: the same URI always
    gets the same directory, so rerunning the command resumes."""
    root = Path(os.environ.get("NTK_RAY_CACHE", Path.home() / ".cache" / "ntk-ray")) / "runs"
    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", uri.split("://", 1)[1]).strip("_")[-60:]
    return root / f"{tail}-{hashlib.sha256(uri.encode()).hexdigest()[:10]}"


def publish(local_dir: str | Path, uri: str, names=RESULT_FILES) -> list[str]:
    """Copy ``names`` from ``local_dir`` to ``uri`` (created if needed). Each file is written
    whole by pyarrow's output stream (object stores make an object visible only once it is
    complete). Returns the destination paths."""
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(uri)
    except Exception as e:  # unknown scheme, no credentials, bad bucket name
        raise ValueError(f"--out {uri}: {e}") from None
    root = root.rstrip("/")
    fs.create_dir(root, recursive=True)
    written = []
    for name in names:
        source = Path(local_dir) / name
        with open(source, "rb") as src, fs.open_output_stream(f"{root}/{name}") as dst:
            while chunk := src.read(8 << 20):
                dst.write(chunk)
        written.append(f"{uri.rstrip('/')}/{name}")
    return written
