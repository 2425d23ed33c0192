"""``--model s3://bucket/models/NAME`` (any URI ``pyarrow.fs`` reads: ``gs://``, ``file://``, ...):
a model directory in an object store, copied once per machine into the ntk-ray cache.

On a cluster every node loads the model its actors run, so each node needs a local copy (a model
is loaded with ``from_pretrained`` from a directory). ``cached_model_copy`` makes it:

- where: ``<cache>/models/uri-<key>``, ``key`` = sha256 of the URI without credentials (so the
  same model under two access keys is one copy, and no secret is ever part of a path);
- current while the object listing is: the relative names and sizes (and modification times
  where the store reports them) of every object under the prefix are recorded in the copy's
  ``ntk_ray_remote.json``; a listing that differs (a re-uploaded model) downloads it again;
- safe under concurrency: the copy is written into a temporary directory and renamed into place
  under a file lock, so the actors of one node, started together, download it once and never
  load a half-copied directory (the same scheme as the GGUF conversion, ``models.gguf``).

Credentials come from the environment (``AWS_ACCESS_KEY_ID``, an instance or IRSA role, ...),
as for every other URI ntk-ray reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from ntk_ray.models.errors import ModelError, first_line

REMOTE_FILE = "ntk_ray_remote.json"  # written into a copy, last, before the rename


def _listing(uri: str) -> list[list]:
    """[relative name, size, mtime_ns or None] of every object under ``uri``, sorted."""
    import pyarrow.fs as pafs

    from ntk_ray.io.location import UriPath

    fs, inner = UriPath(uri).fs()
    inner = inner.rstrip("/")
    rows = []
    for info in fs.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True)):
        if info.type == pafs.FileType.File:
            rows.append([info.path[len(inner):].lstrip("/"), info.size, info.mtime_ns])
    return sorted(rows)


def cached_model_copy(uri: str, what: str = "--model") -> Path:
    """The local directory holding the objects under ``uri`` (see the module docstring)."""
    from ntk_ray.io.fs import redact
    from ntk_ray.io.location import UriPath
    from ntk_ray.models.gguf import cache_root, file_lock, swap_into_place

    shown = redact(uri)
    try:
        listing = _listing(uri)
    except (OSError, ValueError) as e:
        raise ModelError(f"{what} {shown}: cannot list it ({type(e).__name__}: {first_line(e)})") from None
    if not listing:
        raise ModelError(f"{what} {shown}: no objects under this prefix (a model directory's files are expected there)")
    root = cache_root() / "models"
    key = "uri-" + hashlib.sha256(shown.encode()).hexdigest()[:16]
    target = root / key
    if _is_current(target, listing):
        return target
    try:
        with file_lock(root / f".{key}.lock"):
            if not _is_current(target, listing):  # another process may have finished meanwhile
                tmp = root / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                try:
                    UriPath(uri).download(tmp)
                    (tmp / REMOTE_FILE).write_text(json.dumps({"uri": shown, "objects": listing}, indent=1))
                    swap_into_place(tmp, target)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
    except PermissionError as e:
        raise ModelError(f"cannot write the model cache {root} ({e.strerror}): set NTK_RAY_CACHE") from None
    except OSError as e:
        raise ModelError(f"{what} {shown}: cannot copy it ({type(e).__name__}: {first_line(e)})") from None
    return target


def _is_current(target: Path, listing: list[list]) -> bool:
    try:
        return json.loads((target / REMOTE_FILE).read_text()).get("objects") == listing
    except (OSError, ValueError, AttributeError):
        return False
