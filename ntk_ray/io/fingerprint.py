"""What the input files were when a run read them, so a rerun never mixes two versions of them.

A run's identity (``config.SelectConfig.identity``) holds the path *arguments*; this module
records the *files*: for each role, the resolved file list and each file's size and
modification time (``pyarrow.fs.FileInfo``: ``st_mtime_ns`` for a local file, the object's
last-modified time for an object store, where a rewrite changes it like an ETag does).
``OUT/_work/inputs.json`` is written before any work; every later run into the same directory
and the final ``selected.parquet`` read compare against it and refuse with one line naming the
file:

* a glob or directory that now matches other files (``--pool now matches 3 files; this run read 2``),
* a file whose size or modification time changed (a line inserted at the top of a JSONL file
  shifts every row number: ``selected.parquet`` would hand back another row's text).

No file is read for this: one metadata call per file.
"""

from __future__ import annotations

from pathlib import Path

from ntk_ray.io.atomic import write_json_atomic
from ntk_ray.io.fs import InputError, filesystem, redact
from ntk_ray.io.location import location

#: role -> the flag that names its files
FLAGS = {"domain": "--domain", "pool": "--pool", "data": "--data"}
NAME = "inputs.json"


def file_fingerprint(path: str) -> dict:
    """``{"size": bytes, "mtime_ns": int | None}`` of one file (local path or URI)."""
    fs, inner = filesystem(path)
    try:
        info = fs.get_file_info(inner)
    except OSError as e:
        raise InputError(f"cannot read {redact(path)}: {e}") from None
    mtime = info.mtime_ns if info.mtime is not None else None
    return {"size": info.size, "mtime_ns": mtime}


def fingerprints(paths: dict[str, list[str]]) -> dict:
    """role -> [{"path", "size", "mtime_ns"}, ...] in the resolved order; paths redacted (a
    credential in a URI is never stored: two credentials for one file are one file)."""
    return {role: [{"path": redact(p)} | file_fingerprint(p) for p in files] for role, files in paths.items()}


def _flag(role: str) -> str:
    return FLAGS.get(role, f"--{role}")


def compare(saved: dict, current: dict, where: str) -> None:
    """Raise InputError (one line) when ``current`` differs from ``saved``: another file list
    for a role, or a file whose size or modification time changed. ``where`` names the run
    (its ``--out``) in the message."""
    for role, files in current.items():
        before = saved.get(role)
        if before is None:
            continue
        old = [f["path"] for f in before]
        new = [f["path"] for f in files]
        if old != new:
            added = [p for p in new if p not in old]
            gone = [p for p in old if p not in new]
            what = (f"new: {added[0]}" + (f" and {len(added) - 1} more" if len(added) > 1 else "")) if added \
                else (f"missing: {gone[0]}" + (f" and {len(gone) - 1} more" if len(gone) > 1 else "")) if gone \
                else "in another order"
            raise InputError(
                f"{_flag(role)} now matches {len(new)} file(s) ({what}); the run in {where} read {len(old)}: "
                "rerun with --overwrite to start over on the current files, or use another --out")
        for b, f in zip(before, files):
            if (b["size"], b["mtime_ns"]) != (f["size"], f["mtime_ns"]):
                change = (f"size {b['size']} -> {f['size']} bytes" if b["size"] != f["size"]
                          else "modified since")
                raise InputError(
                    f"{_flag(role)}: {f['path']} changed after the run in {where} read it ({change}): "
                    "rerun with --overwrite to start over on the current file, or restore it")


def check_unchanged(work: Path, paths: dict[str, list[str]], where: str) -> None:
    """Compare the files now with ``work/inputs.json`` (:func:`compare`; nothing to compare
    when it is absent or unreadable: a hand edit, never a crash, since it is written atomically)."""
    import json

    try:
        saved = json.loads((location(work) / NAME).read_text())
    except (OSError, ValueError):
        return
    if isinstance(saved, dict):
        compare(saved, fingerprints(paths), where)


def record(work: Path, paths: dict[str, list[str]]) -> None:
    """Write ``work/inputs.json`` unless a readable one is there (a resumed run keeps the
    record of the files its finished stages read)."""
    import json

    target = location(work) / NAME
    try:
        if isinstance(json.loads(target.read_text()), dict):
            return
    except (OSError, ValueError):
        pass
    write_json_atomic(fingerprints(paths), target)
