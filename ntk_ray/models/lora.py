"""LoRA adapters (peft): checking the target modules before any work starts, attaching a fresh
adapter (its random init optionally drawn from a seed), loading a saved one, and listing the
trainable LoRA factors. A target matches a module when it is the module's full name or its
dotted suffix (peft's rule for a list of names); a target matching nothing is a one-line
``ModelError`` naming the Linear modules that do exist.

Precision: the LoRA factors are float32 whatever the base model's dtype (peft's
``autocast_adapter_dtype``, asked for explicitly and checked here), the standard practice for a
bfloat16/float16 base: AdamW's updates of order lr * 1e-4 relative would vanish in bfloat16's 8
significant bits. peft casts a layer's input to float32 before the LoRA matmuls and the sum back
to the base dtype, so the LoRA branch computes in float32 and the captured activations and
output gradients of ``core.features`` are float32 tensors. A fresh adapter on a bfloat16 base is
the seed's float32 draw rounded through bfloat16 once (peft moves it to the base layer's dtype
before casting it back), so it differs from the float32 base's draw in the low bits."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ntk_ray.models.errors import ModelError, first_line
from ntk_ray.models.gguf import DEMO_MODEL
from ntk_ray.models.loading import check_local_dir, resolve_model


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
    check_local_dir(resolved, "model")
    try:
        config = AutoConfig.from_pretrained(resolved)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read the config of {model or DEMO_MODEL}: {first_line(e)}") from e
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as e:
        raise ModelError(f"--model {model or DEMO_MODEL}: not a causal LM transformers can build: {first_line(e)}") from e
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
    ``seed``: when given, the adapter's random init is drawn from this seed (global RNG restored),
    so the same seed gives the same A matrices; ``None`` draws from the global RNG as it stands.
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
        return float32_lora(get_peft_model(model, config, autocast_adapter_dtype=True))


def float32_lora(model):
    """``model`` with every trainable (LoRA) parameter in float32 (module docstring): peft
    already casts bfloat16/float16 adapters up; any other low-precision one is cast here."""
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def load_adapter(model, adapter_dir):
    """Attach a saved LoRA adapter to ``model``, trainable (LoRA params require grad), in float32."""
    from peft import PeftModel

    path = Path(adapter_dir).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise ModelError(f"--adapter {adapter_dir}: no adapter_config.json (not a saved LoRA adapter)")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return float32_lora(PeftModel.from_pretrained(model, str(path), is_trainable=True,
                                                          autocast_adapter_dtype=True))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"cannot load adapter {adapter_dir}: {first_line(e)}") from e


def lora_parameters(model) -> dict[str, torch.nn.Parameter]:
    """{name: parameter} of the trainable parameters (the LoRA factors after attach_lora)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
