"""Typed configuration of a selection run. Every default here is the one ``--help`` shows."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

MIN_DOMAIN_ROWS = 4  # fewer usable domain rows than this is an error: the kernel mean is noise


@dataclass
class SelectConfig:
    # inputs and outputs
    domain: list[str] = field(default_factory=list)
    pool: list[str] = field(default_factory=list)
    budget: int = 0
    out: str = ""
    text_column: str = "text"
    prompt_column: str = "prompt"
    response_column: str = "response"
    id_column: str = "id"
    # model
    model: str | None = None
    max_length: int = 512
    on_too_long: str = "truncate"  # or "reject"
    # warm-up (method.md defaults)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    warmup_epochs: float = 2.0
    warmup_lr: float = 1e-4
    warmup_batch_tokens: int = 4096  # padded tokens per training step: part of the result, unlike --batch-tokens
    warmup: str = "train"  # "train" | "fresh" (B = 0, no training)
    adapter: str | None = None  # use this adapter instead of warming up
    # coarse stage
    coarse_factor: int = 4
    coarse_k: int | None = None  # neighbours per domain sample; None = budget
    # NTK stage
    selector: str = "ntk"  # "ntk" | "random" | "bm25" | "embedding" | "less" (selector_stages.py)
    scorer: str = "cosine"
    projector: str = "sketch"
    proj_dim: int = 8192
    seed: int = 0
    # execution
    batch_tokens: int = 8192
    actors: int | None = None
    accelerator: str = "auto"  # "auto" | "gpu" | "cpu" (pipeline.actor_plan)
    wait_for_resources: float = 600.0  # seconds a stage may wait for actors / progress
    ray_address: str | None = None
    keep_features: bool = False
    work_dir: str | None = None  # where stages run when --out is a URI (storage.default_work_dir)

    def identity(self) -> dict:
        """The settings that determine the result (not where or how fast it runs)."""
        d = asdict(self)
        for k in ("out", "actors", "accelerator", "wait_for_resources", "ray_address", "keep_features", "batch_tokens",
                  "work_dir"):
            d.pop(k)
        return d

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class FeaturesConfig:
    """``ntk-ray features``: projected LoRA gradients of any data, as feature shards."""
    data: list[str] = field(default_factory=list)
    out: str = ""
    adapter: str | None = None
    text_column: str = "text"
    prompt_column: str = "prompt"
    response_column: str = "response"
    id_column: str = "id"
    model: str | None = None
    max_length: int = 512
    on_too_long: str = "truncate"
    seed: int = 0
    projector: str = "sketch"
    proj_dim: int = 8192
    lora_r: int = 16
    lora_alpha: int = 32
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    batch_tokens: int = 8192
    actors: int | None = None
    accelerator: str = "auto"
    ray_address: str | None = None


@dataclass
class ScoreConfig:
    """``ntk-ray score``: rank one feature directory against the anchors of another."""
    features: str = ""
    anchors: str = ""
    budget: int = 0
    out: str = ""
    scorer: str = "cosine"
    work_dir: str | None = None
    ray_address: str | None = None
