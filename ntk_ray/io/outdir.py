"""The output directory: its config stamp, resume and ``--overwrite``, and URI outputs.

``OUT/_work/config.json`` (written atomically) holds the fingerprint of the settings that
determine the result (``SelectConfig.identity``). A rerun with the same fingerprint resumes
(finished stages are reused); another fingerprint is refused unless ``--overwrite``. For an
object-store URI ``--out`` the stages run in a local or shared working directory
(``io.storage.default_work_dir`` or ``--work-dir``) and the results are copied to the URI at
the end.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from ntk_ray.io.accounting import UsageError
from ntk_ray.io.atomic import write_json_atomic

STAMP = Path("_work") / "config.json"


def fingerprint_of(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stamped_fingerprint(out: Path) -> str | None:
    """The fingerprint of the run in ``out``, or None when there is no readable stamp."""
    try:
        return json.loads((out / STAMP).read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def prepare_out_dir(out: str | Path, identity: dict, overwrite: bool) -> Path:
    """Create OUT; refuse one that holds a run with a different config (unless overwrite).
    The same config resumes: finished stages are reused."""
    out = Path(out)
    fingerprint = fingerprint_of(identity)
    if out.exists() and any(out.iterdir()):
        previous = _stamped_fingerprint(out)
        if (out / STAMP).exists():
            if previous != fingerprint and not overwrite:
                raise UsageError(f"--out {out} holds a run with a different config; pass --overwrite to replace it or choose another --out")
        elif not overwrite:
            raise UsageError(f"--out {out} exists and is not an ntk-ray run directory; pass --overwrite or choose another --out")
        if overwrite and previous != fingerprint:
            shutil.rmtree(out)
    (out / "_work").mkdir(parents=True, exist_ok=True)
    write_json_atomic({"fingerprint": fingerprint, "config": identity}, out / STAMP)
    return out


def check_output_uri(uri: str, flag: str = "--out") -> None:
    """Fail before any work when the output URI's file system cannot be reached."""
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(uri)
        fs.get_file_info(root)
    except Exception as e:
        raise UsageError(f"{flag} {uri}: cannot use this location ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e})") from None


def open_out_dir(out: str, work_dir: str | None, identity: dict, overwrite: bool, log) -> tuple[Path, bool]:
    """(the directory the stages write into, whether ``out`` is a URI). For a URI the stages run
    in ``work_dir`` (default ``storage.default_work_dir``) and the results are copied to the URI
    at the end (``storage.publish``); an unreachable URI fails here, before any work."""
    from ntk_ray.io.storage import default_work_dir, is_uri

    if not is_uri(out):
        return prepare_out_dir(out, identity, overwrite), False
    check_output_uri(out)
    local = prepare_out_dir(work_dir or default_work_dir(out), identity, overwrite)
    log(f"results go to {out}; working directory {local}")
    return local, True
