"""Resolving and loading a model and its tokenizer, and what the manifest records about it.

``--model`` is one of: nothing (the bundled demo model, via its cached converted copy), a
``.gguf`` file (its cached converted copy), a local model directory, a model directory in an
object store (``s3://...``: its cached local copy, ``models.remote``), or a Hugging Face hub id.
``resolve_model`` turns it into something ``from_pretrained`` accepts; ``load_model`` and
``load_tokenizer`` load from that, turning library errors into one-line ``ModelError``s; and
``model_identity`` describes the model (source, file hashes, architecture, size) for the manifest.

Precision (``--dtype``): ``resolve_dtype`` turns ``auto`` into a concrete dtype where the model
runs (bfloat16 on a GPU that supports it, float32 otherwise, CPU included); ``load_model`` loads
the weights in it, and the forward and backward passes run in it (no autocast). What stays wider
whatever the model's dtype: the LoRA weights (float32, ``lora.attach_lora`` / ``load_adapter``),
the logits before a softmax or cross-entropy (float32), per-sample gradients, their projection
and norms (float32, ``core.features`` / ``core.projection``) and kernel sums (float64,
``core.scoring``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from ntk_ray.models.errors import ModelError, first_line
from ntk_ray.models.gguf import DEMO_MODEL, converted_gguf_dir, demo_gguf_path, read_source, sha256_file

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _is_local_looking(model: str) -> bool:
    return (
        model.startswith(("/", "./", "../", "~", "."))
        or model.count("/") > 1
        or model.endswith(".gguf")
        or (os.sep != "/" and os.sep in model)
    )


def resolve_model(model: str | None) -> str:
    """Something ``from_pretrained`` accepts.

    ``None`` -> the cached converted demo model (converted on first use); a ``.gguf`` file ->
    its cached converted copy; a URI (``s3://bucket/models/NAME``) -> its cached local copy
    (``models.remote``); a local directory or a hub id -> returned as is.
    """
    if model is None:
        return str(converted_gguf_dir(demo_gguf_path(), demo=True))
    model = str(model)
    if not model.strip():
        raise ModelError("--model is empty")
    if "://" in model:  # an object store: a per-machine cached copy (models.remote)
        from ntk_ray.models.remote import cached_model_copy

        return str(cached_model_copy(model))
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


def check_local_dir(resolved: str, what: str) -> Path | None:
    """When ``resolved`` is a local directory: a ModelError unless it holds what loading ``what``
    (``"model"``: config.json; ``"tokenizer"``: a tokenizer file) needs; the directory's path.
    ``None`` when it is not a local directory (a hub id)."""
    path = Path(resolved)
    if not path.is_dir():
        return None
    if what == "tokenizer" and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(
            f"model directory {resolved} has no tokenizer (tokenizer.json / tokenizer_config.json)"
        )
    if what == "model" and not (path / "config.json").is_file():
        raise ModelError(f"model directory {resolved} has no config.json")
    if what == "model" and not any(p.is_file() and p.name.lower().endswith(WEIGHT_SUFFIXES) for p in path.iterdir()):
        raise ModelError(f"model directory {resolved} has no weight files "
                         f"({', '.join('*' + s for s in WEIGHT_SUFFIXES)})")
    return path


def check_model_files(model: str | None) -> None:
    """Before any work: a ModelError when ``model`` is a local directory that lacks config.json
    or weight files (a hub id is not checked here: loading it names what is missing)."""
    check_local_dir(resolve_model(model), "model")


def load_tokenizer(model: str | None):
    """AutoTokenizer for ``model`` (``None``: the demo model), with a pad token set."""
    from transformers import AutoTokenizer

    resolved = resolve_model(model)
    check_local_dir(resolved, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the tokenizer of {model or DEMO_MODEL}: {first_line(e)}") from e
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


DTYPE_NAMES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> str:
    """The concrete dtype name (``bfloat16``, ``float16``, ``float32``) for ``--dtype`` on
    ``device``. ``auto``: bfloat16 on a CUDA device that supports it natively
    (``torch.cuda.is_bf16_supported(including_emulation=False)``: Ampere and later; a V100 or T4
    would emulate it slowly), else float32 (on CPU always). Call it where the model
    runs (a worker): the driver may have no GPU. A concrete name is returned as is, so a value
    resolved once (by the warm-up) passes through the other workers unchanged."""
    if isinstance(dtype, torch.dtype):
        names = {v: k for k, v in DTYPE_NAMES.items()}
        if dtype not in names:
            raise ModelError(f"--dtype {dtype}: not one of {', '.join(DTYPE_NAMES)}")
        return names[dtype]
    if dtype == "auto":
        if torch.device(device).type == "cuda" and torch.cuda.is_available() \
                and torch.cuda.is_bf16_supported(including_emulation=False):
            return "bfloat16"
        return "float32"
    if dtype not in DTYPE_NAMES:
        raise ModelError(f"--dtype {dtype!r}: choose auto, {', '.join(DTYPE_NAMES)}")
    return dtype


def torch_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """``resolve_dtype`` as a ``torch.dtype``."""
    return DTYPE_NAMES[resolve_dtype(dtype, device)]


def local_device(accelerator: str = "auto", flag: str = "--accelerator") -> str:
    """The device of a command that runs the model in this process (``finetune``, ``evaluate``),
    with ``select``'s ``--accelerator`` words: auto = ``cuda`` when this machine has a GPU, else
    ``cpu``; gpu = ``cuda`` (a ModelError without one); cpu = ``cpu``."""
    if accelerator == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if accelerator == "gpu":
        raise ModelError(f"{flag} gpu: this machine has no CUDA GPU that torch can use")
    return "cpu"


def load_model(
    model: str | None,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    attn_implementation: str | None = None,
):
    """AutoModelForCausalLM for ``model`` (``None``: the demo model), on ``device``, in eval mode,
    its weights in ``dtype`` (a torch dtype, or a ``--dtype`` name: ``auto`` is resolved for
    ``device`` by ``resolve_dtype``)."""
    from transformers import AutoModelForCausalLM

    resolved = resolve_model(model)
    check_local_dir(resolved, "model")
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype, device)}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        m = AutoModelForCausalLM.from_pretrained(resolved, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load model {model or DEMO_MODEL}: {first_line(e)}") from e
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
    src = read_source(local) if local.is_dir() else None
    if model is None:
        ident["source"] = "bundled-gguf"
    elif "://" in str(model):
        from ntk_ray.io.fs import redact

        ident["name"], ident["source"] = redact(str(model)), "uri"
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
        ident["config_sha256"] = sha256_file(local / "config.json")
    try:
        config = AutoConfig.from_pretrained(resolved)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read the config of {model or DEMO_MODEL}: {first_line(e)}") from e
    ident["architecture"] = (config.architectures or [type(config).__name__])[0]
    ident["model_type"] = config.model_type
    ident["num_params"] = _num_params(config)
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "tie_word_embeddings"):
        value = getattr(config, key, None)
        if value is not None:
            ident[key] = value
    return ident
