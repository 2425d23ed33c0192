"""The stages that run the model: warm-up, pool embeddings, NTK (or LESS) features.

  warmup    one task on a model worker (GPU if any): LoRA fine-tune on the domain set, save the
            adapter, and compute the (small) domain side: anchor embeddings and anchor features
  embed     pool tokens -> Embedder workers -> embed/ shards (mean-pooled hidden states)
  features  candidate tokens -> Featurizer workers -> features/ shards (projected gradients)

Which rows ``embed`` and ``features`` cover is a parameter of the stage (``rows``): the coarse
candidates for ntk, every usable pool row for the baselines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from ntk_ray.io.shards import list_shards
from ntk_ray.stages.base import Context, Stage
from ntk_ray.stages.read import Accounting, Tokens, domain_tokens
from ntk_ray.stages.workers import Embedder, Featurizer


@dataclass
class Warm:
    """The warm-up's result: the adapter, the anchors' embeddings and features, and how they
    were made."""
    adapter_dir: str
    anchor_ids: list
    anchor_embeddings: np.ndarray
    anchor_features: np.ndarray
    anchor_norms: list
    history: dict
    projector: dict
    projector_spec: dict
    lora_parameters: int
    adam_moments: str | None = None


@dataclass
class Shards:
    """A directory of shards written by a stage (``skipped``: the stage had nothing to do)."""
    dir: str
    skipped: bool = False
    note: dict = field(default_factory=dict)

    def files(self) -> list[str]:
        return list_shards(self.dir)


def warmup_task(cfg, stage_dir: str, ids, seqs, loss_masks, score_masks, device: str, less: bool) -> dict:
    """Runs on a model worker; plain torch from here on."""
    import torch

    from ntk_ray.core.features import FeatureComputer, mean_pooled_embeddings
    from ntk_ray.core.training import TrainConfig, save_adam_moments, train_lora
    from ntk_ray.models import attach_lora, load_adapter, load_model
    from ntk_ray.stages.workers import set_threads_from_env

    set_threads_from_env()
    torch.manual_seed(cfg.seed)
    lines: list[str] = []
    base = load_model(cfg.model, device=device)
    moments = Path(stage_dir) / "adam_moments.pt"
    if cfg.adapter:
        model = load_adapter(base, cfg.adapter)
        history = {"source": cfg.adapter}
    else:
        model = attach_lora(base, r=cfg.lora_r, alpha=cfg.lora_alpha, targets=tuple(cfg.lora_targets))
        if cfg.warmup == "train":
            tc = TrainConfig(epochs=cfg.warmup_epochs, lr=cfg.warmup_lr, batch_tokens=cfg.warmup_batch_tokens, seed=cfg.seed)
            history = train_lora(model, seqs, loss_masks, tc, device=device, log=lines.append,
                                 **({"keep_optimizer_state": True} if less else {}))
            if less:  # LESS preconditions pool gradients with the warm-up's Adam moments
                save_adam_moments(moments, history.pop("adam"))
        else:
            history = {"fresh": True}
    if less and not moments.exists():
        raise ValueError("--selector less needs the warm-up's optimizer state: not available with --adapter or --warmup fresh")
    adapter_dir = Path(stage_dir) / "adapter"
    model.save_pretrained(str(adapter_dir))
    model.eval()
    autocast = torch.bfloat16 if device == "cuda" else None
    embeddings = mean_pooled_embeddings(model, seqs, cfg.batch_tokens, device).numpy()
    options = {"objective": "loss"} if less else {}  # LESS anchors: plain loss gradients
    computer = FeatureComputer(model, projector=cfg.projector, dim=cfg.proj_dim, seed=cfg.seed, device=device,
                               autocast_dtype=autocast, **options)
    feats = computer.features(seqs, loss_masks if less else score_masks, cfg.batch_tokens)
    finite = np.isfinite(feats.feature.numpy()).all(axis=1)
    if not finite.all():
        bad = [ids[i] for i in np.nonzero(~finite)[0][:5]]
        raise ValueError(f"--domain: non-finite gradients for {len(bad)} rows, e.g. {bad}")
    return {"log": lines, "history": history, "anchor_ids": ids, "anchor_embeddings": embeddings,
            "anchor_features": feats.feature.numpy(), "anchor_norms": feats.norm.numpy().tolist(),
            "projector": computer.projector.spec() | {"modules": len(computer.shapes)},
            "projector_spec": computer.projector.spec(), "lora_parameters": computer.projector.grad_dim,
            "adapter_dir": str(adapter_dir), "adam_moments": str(moments) if moments.exists() else None}


class WarmupStage(Stage):
    """LoRA warm-up on the domain set (or ``--adapter``), then the anchors' embeddings and
    features. ``less``: keep the optimizer's Adam moments, anchors from loss gradients."""
    name = "warmup"
    title = "warm-up"
    output = Warm
    needs = ("read", "validate")

    def __init__(self, less: bool = False):
        self.less = less

    def run(self, ctx: Context, read: Tokens, validate: Accounting) -> Warm:
        stage = ctx.stage_dir(self.name)
        stage.mkdir(parents=True, exist_ok=True)
        ids, seqs, loss_masks, score_masks = domain_tokens(read, validate.usable_domain.select("key", "source", "row"))
        result = ctx.executor.run_task(warmup_task, ctx.cfg, str(stage), ids, seqs, loss_masks, score_masks,
                                       ctx.executor.plan.device, self.less)
        for line in result.pop("log"):
            ctx.progress.log("warmup: " + line)
        return Warm(**result)


def map_tokens(ctx: Context, tokens_dir: str, target: Path, rows: pl.DataFrame, worker: type, args: tuple) -> None:
    """Token shards -> ``worker`` (restricted to ``rows``: key, source, row) on the model pool;
    the workers write one output shard per token shard into ``target``. Shards are read inside
    the workers, so no separate read tasks compete with the model for CPUs."""
    target.mkdir(parents=True, exist_ok=True)
    keep = ctx.executor.put(rows.select("key", "source", "row").to_arrow())
    ctx.executor.map_shards(worker, (str(target), keep, *args), [{"path": p} for p in list_shards(tokens_dir)])


def pool_rows(validate: Accounting) -> pl.DataFrame:
    return validate.usable_pool.select("id", "key", "source", "row")


class EmbedStage(Stage):
    """Mean-pooled embeddings of every usable pool row (skipped when ``only_if_over_m`` and the
    pool is no larger than the coarse stage's M: there is nothing to cut)."""
    name = "embed"
    output = Shards
    needs = ("read", "validate", "warmup")

    def __init__(self, only_if_over_m: bool = True):
        self.only_if_over_m = only_if_over_m

    def run(self, ctx: Context, read: Tokens, validate: Accounting, warmup: Warm) -> Shards:
        target = ctx.stage_dir(self.name)
        pool = pool_rows(validate)
        if self.only_if_over_m and pool.height <= ctx.cfg.coarse_factor * ctx.cfg.budget:
            return Shards(str(target), skipped=True)
        cfg = ctx.cfg
        map_tokens(ctx, read.pool, target, pool, Embedder, (cfg.model, warmup.adapter_dir, cfg.batch_tokens,
                                                            ctx.executor.plan.device))
        return Shards(str(target))


class FeaturesStage(Stage):
    """Projected-gradient features of the candidates (``needs`` names the stage whose
    ``candidates`` frame says which rows), or of every usable pool row. ``less``: loss
    gradients, Adam-preconditioned with the warm-up's moments."""
    name = "features"
    output = Shards

    def __init__(self, candidates_from: str | None = "coarse", less: bool = False):
        self.candidates_from = candidates_from
        self.less = less
        self.needs = ("read", "validate", "warmup") + ((candidates_from,) if candidates_from else ())

    def run(self, ctx: Context, read: Tokens, validate: Accounting, warmup: Warm, **candidates) -> Shards:
        cfg = ctx.cfg
        rows = candidates[self.candidates_from].candidates if self.candidates_from else pool_rows(validate)
        args = (cfg.model, warmup.adapter_dir, cfg.projector, cfg.proj_dim, cfg.seed, cfg.batch_tokens,
                ctx.executor.plan.device)
        if self.less:
            args += ("loss", warmup.adam_moments)
        target = ctx.stage_dir(self.name)
        map_tokens(ctx, read.pool, target, rows, Featurizer, args)
        return Shards(str(target))
