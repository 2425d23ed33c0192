"""The output directory: its config stamp, resume, ``--overwrite``, its lock, and URI outputs.

``OUT/_work/config.json`` (written atomically) holds the fingerprint of the settings that
determine the result (``SelectConfig.identity``, credentials redacted). A rerun with the same
fingerprint resumes (finished stages are reused); another fingerprint is refused unless
``--overwrite``. A stamp that cannot be read (truncated, edited) makes the directory "not a
run" until ``--overwrite`` (the finished stages cannot be vouched for).

``--overwrite`` deletes only what ntk-ray wrote (``_work/``, the four result files, the
``features`` command's shards, ``_done/``, ``_rejects.parquet``, ``_manifest.json``), and only
in a directory stamped as a run (or an empty one); it refuses ``""``, the file system root, the
home directory, the current directory or any parent of it, and a directory holding input
files. A non-empty directory without a stamp is never written into.

For the whole run ``OUT/_work/.lock`` is held (``fcntl.flock``, non-blocking): a second run
into the same directory fails at once, naming the other run's pid and host. The lock goes with
the process (exit, kill) and is released when the entry point returns or raises
(``releases_out_locks``).

For an object-store URI ``--out`` the stages run in a local or shared working directory
(``io.storage.default_work_dir`` or ``--work-dir``), the location is probed for write
permission before any work, the run's stamp is kept at ``<uri>/_ntk_ray_stamp.json`` (another
config's run there is refused unless ``--overwrite``) and the results are copied to the URI at
the end, ``manifest.json`` last (``io.storage.publish``).

``--work-dir`` may itself be an object-store URI (``s3://bucket/work``): then the run's state
(``<work-dir>/_work/``: stamp, ``inputs.json``, shards, markers, saved stage results) lives
there, so workers on any node (and a driver restarted on another node) read and write it without
a shared volume; the driver keeps only the result files in a local scratch directory
(``storage.default_work_dir``) before publishing them. Its lock is an object,
``<work-dir>/_work/_lock.json`` (owner id, pid, host, start and heartbeat time), refreshed every
``LOCK_HEARTBEAT_S`` seconds by a daemon thread. Object stores have no ``flock`` and pyarrow
offers no conditional PUT, so this lock is **weaker** than the local one: it is written, then
read back, and a second run that starts within the same second can race past it; a lock whose
heartbeat is older than ``LOCK_STALE_S`` seconds, or whose pid is gone on this host (a killed
driver), is taken over.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

from ntk_ray.io.accounting import UsageError
from ntk_ray.io.atomic import write_json_atomic
from ntk_ray.io.fs import redact

STAMP = Path("_work") / "config.json"
LOCK = Path("_work") / ".lock"
RESULT_NAMES = ("ranked.parquet", "selected.parquet", "rejects.parquet", "manifest.json")
# what the ``features`` command writes into its OUT besides _work/
FEATURES_NAMES = ("_done", "_rejects.parquet", "_manifest.json")
FEATURE_SHARD = re.compile(r"\d{6}-\d{6}\.parquet\Z")
# the identity keys that name input files, and their flags
INPUT_KEYS = {"domain": "--domain", "pool": "--pool", "data": "--data", "features": "--features", "anchors": "--anchors"}


def fingerprint_of(identity: dict) -> str:
    """The run's identity hash, of the redacted identity: two secrets for one location are the
    same run, two locations (bucket, host, path, endpoint parameter) are not."""
    return hashlib.sha256(json.dumps(redact(identity), sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_stamp(path) -> tuple[bool, str | None]:
    """(whether the stamp file exists, its fingerprint or None when it cannot be read); ``path``
    local or a URI (``io.location``)."""
    from ntk_ray.io.location import location

    try:
        text = location(path).read_text()
    except FileNotFoundError:
        return False, None
    except OSError:
        return True, None
    try:
        fingerprint = json.loads(text).get("fingerprint")
    except (ValueError, AttributeError):
        return True, None
    return True, fingerprint if isinstance(fingerprint, str) and fingerprint else None


def _stamped_fingerprint(out: Path) -> str | None:
    return read_stamp(Path(out) / STAMP)[1]


# ---------------------------------------------------------------------------------------------
# the lock
_HELD: dict[str, int] = {}


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on host {info['host']}" + (f", since {info['started']}" if info.get("started") else "")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "pid and host unknown"


def lock_out_dir(out: Path, flag: str = "--out") -> None:
    """Hold ``OUT/_work/.lock`` (exclusive, non-blocking) until ``release_out_lock`` or exit.
    Raises UsageError (one line, naming the other run's pid and host) when another run holds it.
    Re-entrant within one process. A file system without locks (ENOLCK) runs unlocked."""
    import fcntl

    path = Path(out) / LOCK
    key = os.path.realpath(path)
    if key in _HELD:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UsageError(f"{flag} {out}: cannot write there ({e.strerror or type(e).__name__}); "
                         f"choose another {flag}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _holder(fd)
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
            raise UsageError(f"{flag} {out} is in use by another ntk-ray run ({holder}; lock {path}); "
                             f"wait for it to finish or choose another {flag}") from None
        return  # no locking on this file system
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    _HELD[key] = fd


def release_out_lock(key: str) -> None:
    import fcntl

    fd = _HELD.pop(key, None)
    if fd is None:
        return
    try:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError:
        pass
    finally:
        os.close(fd)


def releases_out_locks(fn):
    """Decorator for an entry point (``run_select``, ...): the output locks it took (local and
    URI work-dir locks) are released when it returns or raises."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before, before_uri = set(_HELD), set(_URI_HELD)
        try:
            return fn(*args, **kwargs)
        finally:
            for key in set(_HELD) - before:
                release_out_lock(key)
            for key in set(_URI_HELD) - before_uri:
                release_uri_lock(key)
    return wrapper


# the lock of a URI work dir (see the module docstring: weaker than flock)
URI_LOCK = "_lock.json"
LOCK_HEARTBEAT_S = 30.0
LOCK_STALE_S = 120.0
_URI_HELD: dict[str, tuple] = {}  # lock URI -> (owner id, stop event, heartbeat thread)


def _lock_is_stale(info: dict, now: float) -> bool:
    """A lock another run left: its heartbeat is old, or its pid is gone on this host."""
    try:
        if now - float(info["heartbeat"]) > LOCK_STALE_S:
            return True
        if info.get("host") == socket.gethostname():
            os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return True
    except (KeyError, TypeError, ValueError, PermissionError):
        return False
    return False


def lock_uri_work(work, flag: str = "--work-dir", shown: str | None = None) -> None:
    """Hold ``<work>/_lock.json`` (a ``UriPath``) for this process until ``release_uri_lock``:
    refused (UsageError naming the other run's pid and host) while another run's lock is fresh;
    a stale one is taken over. Re-entrant within one process."""
    import threading
    import uuid

    lock = work / URI_LOCK
    key = str(lock)
    if key in _URI_HELD:
        return
    shown = shown or redact(str(work))
    try:
        info = json.loads(lock.read_text())
    except FileNotFoundError:
        info = None
    except (OSError, ValueError):
        info = None  # unreadable: no owner can be named, so none is honoured
    if isinstance(info, dict) and not _lock_is_stale(info, time.time()):
        raise UsageError(f"{flag} {shown} is in use by another ntk-ray run (pid {info.get('pid')} on host "
                         f"{info.get('host')}, since {info.get('started')}; lock {redact(key)}); wait for it to finish, "
                         f"or delete the lock object if that run is gone")
    me = {"owner": uuid.uuid4().hex, "pid": os.getpid(), "host": socket.gethostname(),
          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def write() -> None:
        lock.write_bytes((json.dumps(me | {"heartbeat": time.time()}) + "\n").encode())

    try:
        write()
        mine = json.loads(lock.read_text()).get("owner") == me["owner"]
    except (OSError, ValueError) as e:
        raise UsageError(f"{flag} {shown}: cannot write there ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                         f"choose another {flag}") from None
    if not mine:
        raise UsageError(f"{flag} {shown} is in use by another ntk-ray run that started at the same moment; "
                         f"choose another {flag}")
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(LOCK_HEARTBEAT_S):
            try:
                write()
            except OSError:
                pass  # a transient store error: the next beat tries again

    thread = threading.Thread(target=beat, name="ntk-ray-lock-heartbeat", daemon=True)
    thread.start()
    _URI_HELD[key] = (me["owner"], stop, thread, lock)
    from ntk_ray.io.location import before_exit

    before_exit(release_uri_locks)


def release_uri_locks() -> None:
    """Release every URI work-dir lock this process holds (at exit: a process that ends without
    its entry point returning, e.g. an embedding caller's, leaves no lock for 120 s)."""
    for key in list(_URI_HELD):
        release_uri_lock(key)


def release_uri_lock(key: str) -> None:
    held = _URI_HELD.pop(key, None)
    if held is None:
        return
    owner, stop, thread, lock = held
    stop.set()
    thread.join(timeout=5)
    try:
        if json.loads(lock.read_text()).get("owner") == owner:
            lock.unlink(missing_ok=True)
    except (OSError, ValueError):
        pass


# ---------------------------------------------------------------------------------------------
# what --overwrite may delete, and where it never deletes
def _input_roots(identity: dict) -> list[tuple[str, str, Path]]:
    """(flag, as given, the local path it names or the fixed part of its glob) per local input."""
    roots = []
    for key, flag in INPUT_KEYS.items():
        values = identity.get(key)
        for value in [values] if isinstance(values, (str, os.PathLike)) else (values or []):
            text = str(value)
            if not text or "://" in text:
                continue
            parts = Path(os.path.expanduser(text)).parts
            fixed = []
            for part in parts:
                if any(c in part for c in "*?["):
                    break
                fixed.append(part)
            if fixed:
                roots.append((flag, text, Path(os.path.abspath(Path(*fixed)))))
    return roots


def _within(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def _never_overwrite(out: Path, identity: dict, flag: str) -> None:
    """--overwrite refuses places where deleting is never what was meant."""
    real = Path(os.path.realpath(out))
    cwd = Path(os.path.realpath(os.getcwd()))
    why = None
    if real == Path(real.anchor):
        why = "the file system root"
    elif real == Path(os.path.realpath(Path.home())):
        why = "your home directory"
    elif real == cwd:
        why = "the current directory"
    elif real in cwd.parents:
        why = "a parent of the current directory"
    else:
        for input_flag, given, root in _input_roots(identity):
            root_real = Path(os.path.realpath(root))
            if _within(root_real, real):
                why = f"a directory holding input files ({input_flag} {given})"
                break
    if why:
        raise UsageError(f"{flag} {out} is {why}; --overwrite never deletes there: choose a new directory for the run")


def _own_entries(out: Path) -> list[Path]:
    """What ntk-ray wrote in OUT (besides ``_work/``): result files, the features command's
    files, and their interrupted temporaries."""
    names = set(RESULT_NAMES) | set(FEATURES_NAMES)
    own = []
    for p in out.iterdir():
        name = p.name
        tmp = re.match(r"\.(.+)\.tmp-\d+-[0-9a-f]{8}\Z", name)
        base = tmp.group(1) if tmp else name
        if base in names or FEATURE_SHARD.match(base):
            own.append(p)
    return own


def _clear_run(out: Path) -> None:
    """Delete what ntk-ray wrote in OUT, keeping ``_work/.lock`` (held by this run)."""
    work = out / "_work"
    if work.is_dir():
        for p in work.iterdir():
            if p.name == LOCK.name:
                continue
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    for p in _own_entries(out):
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _is_empty(out: Path) -> bool:
    """Nothing in OUT but possibly an empty ``_work/`` (or one with only the lock): a run that
    stopped before its stamp was written."""
    for p in out.iterdir():
        if p.name == "_work" and p.is_dir() and not p.is_symlink() and {q.name for q in p.iterdir()} <= {LOCK.name}:
            continue
        return False
    return True


def local_out_path(out: str | Path, flag: str = "--out") -> Path:
    """``out`` as a local path (``~`` expanded); ``""`` is refused (an unset variable)."""
    text = os.fspath(out)
    if not text.strip():
        raise UsageError(f"{flag} is empty; name the directory for the run")
    return Path(os.path.expanduser(text))


def _reuse_or_start_over(previous, fingerprint: str, overwrite: bool, *, flag: str, shown: str, stamp: str, work,
                         inputs: dict | None, where: str, clear) -> None:
    """The rule for a directory that holds a run (local OUT or a URI work dir; the caller holds
    its lock): an unreadable stamp or another config is refused unless ``overwrite``, which then
    ``clear()``s it; the same config over changed input files (``io.fingerprint``) is refused in
    one line naming the file, or with ``overwrite`` started over; else the run resumes."""
    from ntk_ray.io.fingerprint import check_unchanged
    from ntk_ray.io.fs import InputError

    if previous is None and not overwrite:
        raise UsageError(f"{flag} {shown}: its run stamp {stamp} cannot be read (truncated or edited), so its "
                         f"finished stages cannot be trusted; pass --overwrite to delete ntk-ray's files there and "
                         f"run again, or choose another {flag}")
    if previous not in (None, fingerprint) and not overwrite:
        raise UsageError(f"{flag} {shown} holds a run with a different config; pass --overwrite to replace it or "
                         f"choose another {flag}")
    if overwrite and previous != fingerprint:
        clear()
    elif inputs is not None:
        try:
            check_unchanged(work, inputs, where)
        except InputError as e:
            if not overwrite:
                raise UsageError(str(e)) from None
            clear()  # the same config over other files: start over


def _record_and_stamp(work, stamp, inputs: dict | None, fingerprint: str, identity: dict) -> None:
    """Record the input files (unless a resumed run already did) and stamp the run: the stamp last."""
    from ntk_ray.io.fingerprint import record
    from ntk_ray.io.fs import InputError

    if inputs is not None:
        try:
            record(work, inputs)
        except InputError as e:
            raise UsageError(str(e)) from None
    write_json_atomic({"fingerprint": fingerprint, "config": redact(identity)}, stamp)


def prepare_out_dir(out: str | Path, identity: dict, overwrite: bool, flag: str = "--out",
                    inputs: dict | None = None, where: str | None = None) -> Path:
    """Create OUT, lock it, stamp it. The same config resumes (finished stages are reused);
    another config's run is refused unless ``overwrite``, which then deletes only ntk-ray's
    files (see the module docstring); a non-empty directory that is not a run is refused.

    ``inputs`` (role -> resolved files): the same config over input files that changed since
    the run there read them (``io.fingerprint``) is refused in one line naming the file, or
    with ``overwrite`` started over; the files are recorded in ``_work/inputs.json``. ``where``
    names the run in that message (default: OUT)."""
    out = local_out_path(out, flag)
    fingerprint = fingerprint_of(identity)
    if overwrite:
        _never_overwrite(out, identity, flag)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {out} is an existing file, not a directory; choose a directory")
    held_before = set(_HELD)
    try:
        if out.is_dir() and not _is_empty(out):
            exists, previous = read_stamp(out / STAMP)
            if not exists:
                raise UsageError(f"{flag} {out} exists and is not an ntk-ray run directory; choose a new or empty "
                                 f"directory for the run")
            lock_out_dir(out, flag)  # before anything is deleted: never under a run in progress
            _reuse_or_start_over(previous, fingerprint, overwrite, flag=flag, shown=str(out), stamp=str(out / STAMP),
                                 work=out / "_work", inputs=inputs, where=where or str(out), clear=lambda: _clear_run(out))
        try:
            (out / "_work").mkdir(parents=True, exist_ok=True)
            if not os.access(out / "_work", os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "not writable")
            lock_out_dir(out, flag)
        except OSError as e:
            raise UsageError(f"{flag} {out}: cannot write there ({e.strerror or type(e).__name__}); "
                             f"choose another {flag}") from None
        _record_and_stamp(out / "_work", out / STAMP, inputs, fingerprint, identity)
        return out
    except BaseException:
        for key in set(_HELD) - held_before:  # a refusal leaves no lock behind
            release_out_lock(key)
        raise


# ---------------------------------------------------------------------------------------------
# URI outputs
def check_output_uri(uri: str, flag: str = "--out") -> None:
    """Fail before any work when the output URI cannot be written: its file system is reached
    and a small ``_ntk-ray-probe-<uuid>`` object is written and deleted."""
    from ntk_ray.io.storage import probe_uri

    try:
        probe_uri(uri)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise UsageError(redact(f"{flag} {uri}: cannot write to this location ({type(e).__name__}: {first})")) from None


def check_uri_stamp(uri: str, identity: dict, overwrite: bool, flag: str = "--out") -> None:
    """Refuse a URI that holds another config's run (its ``_ntk_ray_stamp.json``) unless
    ``overwrite``; then stamp it with this run's config (redacted)."""
    from ntk_ray.io.storage import URI_STAMP, read_uri_stamp, write_uri_stamp

    fingerprint = fingerprint_of(identity)
    exists, previous = read_uri_stamp(uri)
    from ntk_ray.io.fs import split_query

    head, query = split_query(uri)
    where = redact(f"{head.rstrip('/')}/{URI_STAMP}{query}")
    if exists and previous != fingerprint and not overwrite:
        if previous is None:
            raise UsageError(f"{flag} {redact(uri)}: its run stamp {where} cannot be read; pass --overwrite to replace "
                             f"the run there, or choose another {flag}")
        raise UsageError(f"{flag} {redact(uri)} holds a run with a different config ({where}); pass --overwrite to "
                         f"replace it or choose another {flag}")
    if previous != fingerprint:
        write_uri_stamp(uri, {"fingerprint": fingerprint, "config": redact(identity)})


def open_out_dir(out: str, work_dir: str | None, identity: dict, overwrite: bool, log,
                 inputs: dict | None = None) -> tuple[Path, bool]:
    """(the directory the result files are written into, whether ``out`` is a URI). For a URI the
    stages run in ``work_dir`` (default ``storage.default_work_dir``) and the results are copied
    to the URI at the end (``storage.publish``); a URI that cannot be written, or that holds
    another config's run, fails here, before any work. A URI ``work_dir`` (only with a URI
    ``out``) holds the stages' state (``work_location``; ``prepare_uri_work_dir``) and the result
    files are staged in the local ``storage.default_work_dir``."""
    from ntk_ray.io.storage import default_work_dir, is_uri

    if not is_uri(out):
        return prepare_out_dir(out, identity, overwrite, inputs=inputs), False
    check_output_uri(out)
    if work_dir and is_uri(work_dir):
        local = prepare_out_dir(default_work_dir(out), identity, overwrite, flag="--out", inputs=inputs, where=redact(out))
        work = prepare_uri_work_dir(work_dir, identity, overwrite, inputs=inputs, where=redact(out))
        check_uri_stamp(out, identity, overwrite)
        log(f"results go to {redact(out)}; working directory {redact(str(work))} (result files staged in {local})")
        return local, True
    local = prepare_out_dir(work_dir if work_dir else default_work_dir(out), identity, overwrite,
                            flag="--work-dir" if work_dir else "--out", inputs=inputs, where=redact(out))
    check_uri_stamp(out, identity, overwrite)
    log(f"results go to {redact(out)}; working directory {local}")
    return local, True


# ---------------------------------------------------------------------------------------------
# URI work directories (``--work-dir s3://...``)
def work_location(out: Path, work_dir: str | None):
    """Where the stages keep their state: ``<work_dir>/_work`` for a URI ``work_dir``
    (``io.location.UriPath``), else ``out/_work`` (``out``: what ``open_out_dir`` returned)."""
    from ntk_ray.io.location import UriPath, is_uri

    if work_dir and is_uri(work_dir) and not str(work_dir).lower().startswith("file://"):
        return UriPath(work_dir) / "_work"
    return Path(out) / "_work"


#: what may sit beside ``_work/`` in a URI work dir that is also the ``--out`` URI
_URI_NEIGHBOURS = set(RESULT_NAMES) | {"report.html", "_ntk_ray_stamp.json"}


def prepare_uri_work_dir(uri: str, identity: dict, overwrite: bool, flag: str = "--work-dir",
                         inputs: dict | None = None, where: str | None = None):
    """``prepare_out_dir`` for a URI work dir: lock ``<uri>/_work`` (``lock_uri_work``), refuse
    a location that holds something else, or another config's run unless ``overwrite`` (which
    then deletes only ``<uri>/_work/``'s objects), check and record the input files, stamp it.
    A credential in the URI is refused: the URIs of a work dir are stored in its saved results.
    Returns the ``UriPath`` of ``<uri>/_work``."""
    from ntk_ray.io.location import UriPath

    if redact(uri) != uri:
        raise UsageError(f"{flag} {redact(uri)}: a URI work directory takes its credentials from the environment "
                         f"(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, an instance or IRSA role), not from the URI: "
                         f"its paths are stored in the run's state")
    shown = redact(uri)
    try:
        root = UriPath(uri)
        work = root / "_work"
        stamp = work / "config.json"
        exists, previous = read_stamp(stamp)
        if not exists:
            strangers = [p.name for p in root.iterdir()
                         if p.name not in _URI_NEIGHBOURS and not p.name.startswith("_ntk-ray-probe-")
                         and not (p.name == "_work" and {q.name for q in work.iterdir()} <= {URI_LOCK})]
            if strangers:
                raise UsageError(f"{flag} {shown} exists and is not an ntk-ray working directory ({strangers[0]} is "
                                 f"there); choose a new or empty location")
    except OSError as e:
        raise UsageError(f"{flag} {shown}: cannot read this location ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    held_before = str(work / URI_LOCK) in _URI_HELD
    lock_uri_work(work, flag, shown)
    try:
        return _prepare_locked_uri_work(work, stamp, exists, previous, identity, overwrite, flag, shown, inputs, where)
    except BaseException:
        if not held_before:  # a refusal leaves no lock behind (not only when an entry point releases it)
            release_uri_lock(str(work / URI_LOCK))
        raise


def _prepare_locked_uri_work(work, stamp, exists, previous, identity, overwrite, flag, shown, inputs, where):
    from ntk_ray.io.location import rmtree

    def clear() -> None:
        for p in work.iterdir():
            if p.name == URI_LOCK:
                continue
            rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)

    fingerprint = fingerprint_of(identity)
    if exists:
        _reuse_or_start_over(previous, fingerprint, overwrite, flag=flag, shown=shown, stamp=redact(str(stamp)),
                             work=work, inputs=inputs, where=where or shown, clear=clear)
    _record_and_stamp(work, stamp, inputs, fingerprint, identity)
    return work
