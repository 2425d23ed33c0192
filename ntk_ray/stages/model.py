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

from ntk_ray.io.fs import redact
from ntk_ray.io.location import local_copy
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
    checkpoints: list = field(default_factory=list)  # --checkpoints K > 1: the K warm-up adapters, oldest first
    dtype: str = "float32"  # the model's dtype, resolved from --dtype on the warm-up's worker


@dataclass
class Shards:
    """A directory of shards written by a stage (``skipped``: the stage had nothing to do)."""
    dir: str
    skipped: bool = False
    note: dict = field(default_factory=dict)

    def files(self) -> list[str]:
        return list_shards(self.dir)


class CheckpointSaver:
    """``train_lora``'s ``on_step`` for ``--checkpoints K``: after the optimizer steps
    ``core.selectors.checkpoint_steps(S, K)`` it saves the adapter to ``dir/<i>`` and keeps the
    LoRA weights and the step's learning rate (the checkpoint's weight, ``checkpoint_weights``)."""

    def __init__(self, model, directory: Path, k: int):
        self.model, self.dir, self.k = model, Path(directory), k
        self.saved: list[tuple[str, float]] = []  # (adapter dir, learning rate), oldest first
        self.states: list[dict] = []
        self.steps: list[int] = []

    def __call__(self, step: int, total_steps: int, lr: float) -> None:
        from ntk_ray.core.selectors import checkpoint_steps

        for i, at in enumerate(checkpoint_steps(total_steps, self.k)):
            if at == step:
                target = self.dir / str(i)
                self.model.save_pretrained(str(target))
                self.saved.append((str(target), float(lr)))
                self.states.append({n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad})
                self.steps.append(step)

    def anchor_features(self, computer, seqs, masks, batch_tokens: int, spec: dict):
        """The anchors' features under every checkpoint, combined; the model is left with its
        final weights. Returns (features with ``feature`` and ``norm`` tensors, spec with
        ``checkpoints`` and ``checkpoint_weights``)."""
        import torch

        from ntk_ray.core.selectors import (
            checkpoint_weights,
            combine_checkpoint_features,
            combine_checkpoint_norms,
        )

        weights = checkpoint_weights([lr for _, lr in self.saved])
        params = dict(self.model.named_parameters())
        final = {n: p.detach().clone() for n, p in params.items() if p.requires_grad}
        parts = []
        for state in self.states:
            with torch.no_grad():
                for n, value in state.items():
                    params[n].copy_(value)
            parts.append(computer.features(seqs, masks, batch_tokens))
        with torch.no_grad():
            for n, value in final.items():
                params[n].copy_(value)
        feats = parts[-1]
        feats.feature = torch.from_numpy(combine_checkpoint_features([p.feature.numpy() for p in parts], weights))
        feats.norm = torch.from_numpy(combine_checkpoint_norms([p.norm.numpy() for p in parts], weights))
        return feats, spec | {"checkpoints": self.k, "checkpoint_weights": weights}


def warmup_task(cfg, stage_dir: str, ids, seqs, loss_masks, score_masks, device: str, less: bool,
                progress=None) -> dict:
    """Runs on a model worker; plain torch from here on. ``progress`` (the driver's
    ``Progress.spec()``): its batches and epoch lines are printed live, here (Ray forwards a
    worker's output to the driver). A URI ``stage_dir`` (``--work-dir s3://...``): everything is
    written to a local temporary directory on this worker, then uploaded there, and the paths
    returned are URIs (the embed/features workers copy the adapter back, ``local_copy``)."""
    from ntk_ray.io.location import is_uri

    if is_uri(stage_dir):
        return _warmup_to_uri(cfg, stage_dir, ids, seqs, loss_masks, score_masks, device, less, progress)
    import torch

    from ntk_ray.core.features import FeatureComputer, mean_pooled_embeddings
    from ntk_ray.core.training import TrainConfig, save_adam_moments, train_lora
    from ntk_ray.models import attach_lora, load_adapter, load_model, resolve_dtype
    from ntk_ray.progress import Progress
    from ntk_ray.stages.workers import set_threads_from_env

    set_threads_from_env()
    torch.manual_seed(cfg.seed)
    lines: list[str] = []
    n_checkpoints, saver = (1 if less else getattr(cfg, "checkpoints", 1)), None
    shown = Progress.from_spec(progress)
    dtype = resolve_dtype(cfg.dtype, device)  # here, where the device is known; the later stages reuse it
    base = load_model(cfg.model, dtype=dtype, device=device)
    moments = Path(stage_dir) / "adam_moments.pt"
    if cfg.adapter:
        model = load_adapter(base, local_copy(cfg.adapter))  # an adapter at a URI: copied here first
        history = {"source": redact(str(cfg.adapter))}
    else:
        model = attach_lora(base, r=cfg.lora_r, alpha=cfg.lora_alpha, targets=tuple(cfg.lora_targets))
        if cfg.warmup == "train":
            tc = TrainConfig(epochs=cfg.warmup_epochs, lr=cfg.warmup_lr, batch_tokens=cfg.warmup_batch_tokens, seed=cfg.seed)
            saver = CheckpointSaver(model, Path(stage_dir) / "checkpoints", n_checkpoints) if n_checkpoints > 1 else None
            history = train_lora(model, seqs, loss_masks, tc, device=device, log=lambda line: shown.log("warmup: " + line.strip()),
                                 on_batch=shown.steps("warmup"),
                                 **({"keep_optimizer_state": True} if less else {}),
                                 **({"on_step": saver} if saver else {}))
            if less:  # LESS preconditions pool gradients with the warm-up's Adam moments
                save_adam_moments(moments, history.pop("adam"))
        else:
            history = {"fresh": True}
    if less and not moments.exists():
        raise ValueError("--selector less needs the warm-up's optimizer state: not available with --adapter or --warmup fresh")
    adapter_dir = Path(stage_dir) / "adapter"
    model.save_pretrained(str(adapter_dir))
    model.eval()
    embeddings = mean_pooled_embeddings(model, seqs, cfg.batch_tokens, device, layer=getattr(cfg, "embed_layer", None),
                                        max_row_tokens=getattr(cfg, "embed_max_tokens", None)).numpy()  # as the pool's
    objective = "loss" if less else getattr(cfg, "objective", "summed-logits")  # LESS anchors: plain loss gradients
    options = {"objective": objective} if objective != "summed-logits" else {}
    anchor_masks = loss_masks if objective == "loss" else score_masks  # the positions the objective reads
    computer = FeatureComputer(model, projector=cfg.projector, dim=cfg.proj_dim, seed=cfg.seed, device=device,
                               **options)
    feats = computer.features(seqs, anchor_masks, cfg.batch_tokens)
    spec, checkpoints = computer.projector.spec(), []
    if n_checkpoints > 1:  # anchors under every checkpoint, combined (core.selectors.combine_checkpoint_features)
        if saver is None or len(saver.saved) != n_checkpoints:
            raise ValueError(f"--checkpoints {n_checkpoints} needs a trained warm-up with at least one step")
        feats, spec = saver.anchor_features(computer, seqs, anchor_masks, cfg.batch_tokens, spec)
        checkpoints = [d for d, _ in saver.saved]
        history["checkpoints"] = {"steps": saver.steps, "weights": spec["checkpoint_weights"]}
    finite = np.isfinite(feats.feature.numpy()).all(axis=1)
    if not finite.all():
        bad = [ids[i] for i in np.nonzero(~finite)[0][:5]]
        raise ValueError(f"--domain: non-finite gradients for {len(bad)} rows, e.g. {bad}")
    return {"log": lines, "history": history, "anchor_ids": ids, "anchor_embeddings": embeddings,
            "anchor_features": feats.feature.numpy(), "anchor_norms": feats.norm.numpy().tolist(),
            "projector": spec | {"modules": len(computer.shapes)},
            "projector_spec": spec, "lora_parameters": computer.projector.grad_dim, "checkpoints": checkpoints,
            "adapter_dir": str(adapter_dir), "adam_moments": str(moments) if moments.exists() else None,
            "dtype": dtype}


def _warmup_to_uri(cfg, stage_dir: str, *args) -> dict:
    import tempfile

    from ntk_ray.io.location import UriPath

    remote = UriPath(stage_dir)
    with tempfile.TemporaryDirectory(prefix="ntk-ray-warmup-") as local:
        result = warmup_task(cfg, local, *args)
        remote.upload(Path(local))

    def moved(path: str) -> str:
        return str(remote / Path(path).relative_to(local).as_posix())

    result["adapter_dir"] = moved(result["adapter_dir"])
    result["adam_moments"] = moved(result["adam_moments"]) if result.get("adam_moments") else None
    result["checkpoints"] = [moved(d) for d in result.get("checkpoints") or []]
    return result


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
                                       ctx.executor.plan.device, self.less, ctx.progress.spec())
        for line in result.pop("log"):
            ctx.progress.log("warmup: " + line)
        return Warm(**result)


def map_tokens(ctx: Context, tokens_dir: str, target: Path, rows: pl.DataFrame, worker: type, args: tuple) -> None:
    """Token shards -> ``worker`` (restricted to ``rows``: key, source, row) on the model pool;
    the workers write one output shard per token shard into ``target``. Shards are read inside
    the workers, so no separate read tasks compete with the model for CPUs."""
    target.mkdir(parents=True, exist_ok=True)
    keep = ctx.executor.put(rows.select("key", "source", "row").to_arrow())
    with ctx.progress.track(rows.height) as rows_done:
        ctx.executor.map_shards(worker, (str(target), keep, *args), [{"path": p} for p in list_shards(tokens_dir)],
                                on_result=rows_done.add_rows)


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
                                                            ctx.executor.plan.device, warmup.dtype,
                                                            cfg.embed_layer, cfg.embed_max_tokens))
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
        args += ("loss", warmup.adam_moments) if self.less else (getattr(cfg, "objective", "summed-logits"), None)
        args += (warmup.dtype,)  # resolved by the warm-up: every worker runs the model in the same dtype
        target = ctx.stage_dir(self.name)
        if warmup.checkpoints:  # --checkpoints K: psi under each warm-up checkpoint, combined
            featurize_checkpoints(ctx, read.pool, target, rows, args, warmup)
        else:
            map_tokens(ctx, read.pool, target, rows, Featurizer, args)
        return Shards(str(target))


def featurize_checkpoints(ctx: Context, tokens_dir: str, target: Path, rows: pl.DataFrame, args: tuple, warmup: Warm) -> None:
    """``--checkpoints K``: the Featurizer workers run once per warm-up checkpoint (its adapter
    in place of the final one, into ``target/checkpoint-<i>/``); then each shard's K feature
    blocks are combined into ``target/<shard>`` (``combine_checkpoint_shard``) and the
    per-checkpoint shards are removed. Cost: K times the features stage."""
    from ntk_ray.io.location import rmtree

    dirs = []
    for i, adapter in enumerate(warmup.checkpoints):
        dirs.append(target / f"checkpoint-{i}")
        map_tokens(ctx, tokens_dir, dirs[-1], rows, Featurizer, (args[0], adapter, *args[2:]))
    for path in list_shards(dirs[0]):
        name = Path(path).name
        combine_checkpoint_shard([str(d / name) for d in dirs], target / name, warmup.projector_spec)
    for d in dirs:
        rmtree(d)


def combine_checkpoint_shard(paths: list[str], out: Path, spec: dict) -> None:
    """One feature shard from the same rows' shards under K checkpoints: ``feature`` =
    ``core.selectors.combine_checkpoint_features`` (sqrt(w_i)-weighted concatenation, length K d,
    so inner products are the checkpoint-weighted sums of kernels), ``norm`` =
    ``combine_checkpoint_norms``, ``reject`` = the first checkpoint's reason where any has one
    (that row's feature is zero), the projector ``spec`` (with ``checkpoints`` and
    ``checkpoint_weights``) in the file metadata."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ntk_ray.core.selectors import (
        combine_checkpoint_features,
        combine_checkpoint_norms,
    )
    from ntk_ray.io.feature_files import SPEC_KEY
    from ntk_ray.io.shards import as_matrix, fixed_size_list, write_table_atomic

    tables = [pq.read_table(p) for p in paths]
    keys = tables[0].column("key").to_numpy()
    for p, t in zip(paths[1:], tables[1:]):
        if not np.array_equal(t.column("key").to_numpy(), keys):
            raise RuntimeError(f"checkpoint feature shards {paths[0]} and {p} hold different rows")
    weights = spec["checkpoint_weights"]
    feature = combine_checkpoint_features([as_matrix(t.column("feature"), t.num_rows) for t in tables], weights)
    norm = combine_checkpoint_norms([t.column("norm").to_numpy() for t in tables], weights)
    reject = [next((r for r in reasons if r is not None), None)
              for reasons in zip(*(t.column("reject").to_pylist() for t in tables))]
    feature[np.array([r is not None for r in reject], dtype=bool)] = 0.0
    first = tables[0]
    table = pa.table({"id": first.column("id"), "key": first.column("key"), "source": first.column("source"),
                      "row": first.column("row"), "feature": fixed_size_list(feature), "norm": pa.array(norm),
                      "reject": pa.array(reject, pa.string())})
    write_table_atomic(table.replace_schema_metadata({SPEC_KEY: json.dumps(spec).encode()}), out)
