"""The two halves of the NTK stage as their own plans: ``ntk-ray features`` and ``ntk-ray score``.

``features`` turns any data into feature shards (the contract's format: ``id``, ``feature``
(fixed-size list of float32, length d), ``norm``, plus ``key``, ``source``, ``row``, ``reject``,
and the projector spec, adapter hash included, in each file's Parquet metadata)::

    read (tokens) -> rows (duplicates marked; cheap, rerun) -> adapter -> features -> summary

``score`` ranks one feature directory against another, so a pool featurised once can be scored
against any number of domains computed with the same adapter and projector::

    score -> write [-> publish]
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import polars as pl

from ntk_ray.io.accounting import UsageError, mark_duplicates
from ntk_ray.io.atomic import write_json_atomic, write_parquet_atomic
from ntk_ray.io.feature_files import adapter_hash, dir_spec, read_spec, stamp_adapter
from ntk_ray.io.outputs import empty_rejects, nonfinite_scores_rejected, rank_rows, selected_rows
from ntk_ray.io.shards import fixed_size_list, read_shards, read_vectors, shards_frame, write_table_atomic
from ntk_ray.stages.base import Context, Stage
from ntk_ray.stages.model import Shards, Warm, map_tokens
from ntk_ray.stages.rank import Scores, kernel_scores
from ntk_ray.stages.read import read_files
from ntk_ray.io.feature_files import SPEC_KEY
from ntk_ray.stages.workers import Featurizer, ReadSpec
from ntk_ray.io.fs import redact
from ntk_ray.stages.write import PublishStage, Written, redacted_sources


# -------------------------------------------------------------------------------------------
# ntk-ray features
@dataclass
class DataTokens:
    dir: str


@dataclass
class DataRows:
    meta: pl.DataFrame  # every row read: id, key, source, row, reject (duplicates marked)
    usable: pl.DataFrame


@dataclass
class Adapter:
    dir: str
    dtype: str = "float32"  # the model's dtype, resolved from --dtype on a model worker


@dataclass
class Summary:
    manifest: dict


class DataReadStage(Stage):
    name = "tokens"
    output = DataTokens

    def run(self, ctx: Context) -> DataTokens:
        cfg, inputs = ctx.cfg, ctx.inputs
        spec = ReadSpec("data", inputs.modes["data"], inputs.columns, cfg.model, cfg.max_length, cfg.on_too_long,
                        system_prompt=cfg.system_prompt)
        target = ctx.work / "tokens"
        read_files(ctx.executor, inputs.paths["data"], spec, target, ctx.progress)
        return DataTokens(str(target))


class DataRowsStage(Stage):
    name = "rows"
    needs = ("tokens",)
    output = DataRows
    resumable = False

    def run(self, ctx: Context, tokens: DataTokens) -> DataRows:
        meta = mark_duplicates(read_shards(tokens.dir, ["id", "key", "source", "row", "reject"]), ctx.inputs.paths["data"])
        usable = meta.filter(pl.col("reject").is_null())
        if usable.is_empty():
            raise UsageError(f"--data: no usable rows in {', '.join(ctx.inputs.paths['data'][:3])}")
        return DataRows(meta, usable)


def adapter_task(model_path: str | None, dtype: str, device: str, target: str | None, lora: dict, seed: int) -> str:
    """On a model worker: ``--dtype`` resolved for its device (the Featurizers then all use that
    one), and, when ``target`` is given, a fresh seeded adapter on the model in that dtype saved
    there. Returns the resolved dtype."""
    from ntk_ray.models import attach_lora, load_model, resolve_dtype

    dtype = resolve_dtype(dtype, device)
    if target is not None:
        attach_lora(load_model(model_path, dtype=dtype, device=device), seed=seed, **lora).save_pretrained(target)
    return dtype


class AdapterStage(Stage):
    """``--adapter``, or a fresh seeded adapter (B = 0), made once so every worker uses the same
    one; and the dtype every worker runs the model in (both on a model worker)."""
    name = "adapter"
    output = Adapter

    def run(self, ctx: Context) -> Adapter:
        cfg = ctx.cfg
        target = None if cfg.adapter else str(ctx.stage_dir(self.name) / "adapter")
        lora = {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "targets": list(cfg.lora_targets)}
        dtype = ctx.executor.run_task(adapter_task, ctx.inputs.model_path, cfg.dtype, ctx.executor.plan.device, target,
                                      lora, cfg.seed)
        return Adapter(cfg.adapter or target, dtype)


class DataFeaturesStage(Stage):
    """Featurizer workers write the feature shards straight into OUT."""
    name = "features"
    needs = ("tokens", "rows", "adapter")
    output = Shards

    def run(self, ctx: Context, tokens: DataTokens, rows: DataRows, adapter: Adapter) -> Shards:
        cfg = ctx.cfg
        map_tokens(ctx, tokens.dir, ctx.out, rows.usable, Featurizer,
                   (cfg.model, adapter.dir, cfg.projector, cfg.proj_dim, cfg.seed, cfg.batch_tokens, ctx.executor.plan.device,
                    "summed-logits", None, adapter.dtype))
        return Shards(str(ctx.out))


class SummaryStage(Stage):
    """Adapter hash into every shard's spec; ``_rejects.parquet`` and ``_manifest.json``."""
    name = "summary"
    needs = ("rows", "adapter", "features")
    output = Summary

    def run(self, ctx: Context, rows: DataRows, adapter: Adapter, features: Shards) -> Summary:
        from dataclasses import asdict

        shards = features.files()
        stamp_adapter(shards, adapter_hash(adapter.dir))
        feats = shards_frame(shards, ["id", "source", "row", "reject"])
        as_rejects = [pl.col("id"), pl.col("source"), pl.col("row"), pl.lit("data").alias("role"), pl.col("reject").alias("reason")]
        rejects = pl.concat([
            rows.meta.filter(pl.col("reject").is_not_null()).select(as_rejects),
            feats.filter(pl.col("reject").is_not_null()).select(as_rejects),
        ]) if feats.height else empty_rejects()
        write_parquet_atomic(redacted_sources(rejects.cast({"row": pl.Int64})), ctx.out / "_rejects.parquet")
        manifest = {"counts": {"rows": rows.meta.height, "featurised": int(feats.filter(pl.col("reject").is_null()).height),
                               "rejected": rejects.height},
                    "projector": read_spec(shards[0]) if shards else None, "adapter": adapter.dir, "dtype": adapter.dtype,
                    "config": asdict(ctx.cfg), "actors": asdict(ctx.executor.plan) if ctx.executor else None,
                    "stage_seconds": ctx.progress.seconds()}
        manifest = redact(manifest)  # no credential of an input URI in the summary
        write_json_atomic(manifest, ctx.out / "_manifest.json")
        return Summary(manifest)


def features_plan() -> list[Stage]:
    return [DataReadStage(), DataRowsStage(), AdapterStage(), DataFeaturesStage(), SummaryStage()]


def export_features(ctx: Context, warm: Warm, usable_domain: pl.DataFrame, features: Shards) -> None:
    """``--keep-features``: the pool features stay in features/, the anchors go to
    anchor_features/, both in the ``ntk-ray features`` format (adapter hash in the spec), for
    ``ntk-ray score``."""
    import pyarrow as pa

    digest = adapter_hash(warm.adapter_dir)
    stamp_adapter(features.files(), digest)
    ids = warm.anchor_ids
    where = pl.DataFrame({"id": ids}).join(usable_domain.select("id", "key", "source", "row"), on="id", how="left")
    spec = dict(warm.projector_spec, adapter_sha256=digest)
    table = pa.table({"id": pa.array(ids, pa.string()), "key": pa.array(where["key"].to_list(), pa.int64()),
                      "source": pa.array(where["source"].to_list(), pa.string()),
                      "row": pa.array(where["row"].to_list(), pa.int64()),
                      "feature": fixed_size_list(warm.anchor_features),
                      "norm": pa.array(np.asarray(warm.anchor_norms, dtype=np.float32)),
                      "reject": pa.array([None] * len(ids), pa.string())})
    target = ctx.work / "anchor_features"
    target.mkdir(exist_ok=True)
    write_table_atomic(table.replace_schema_metadata({SPEC_KEY: json.dumps(spec).encode()}), target / "anchors.parquet")


# -------------------------------------------------------------------------------------------
# ntk-ray score
@dataclass
class ScoreInputs:
    pool_files: list
    anchor_files: list
    spec: dict
    model_path: None = None


def check_score_inputs(cfg) -> ScoreInputs:
    """The feature directories' shards and their common projector spec (the numbers were
    range-checked by ``config.validate``)."""
    pool_files, pool_spec = dir_spec(cfg.features, "--features")
    anchor_files, anchor_spec = dir_spec(cfg.anchors, "--anchors")
    if pool_spec != anchor_spec:
        diff = sorted(k for k in set(pool_spec) | set(anchor_spec) if pool_spec.get(k) != anchor_spec.get(k))
        raise UsageError(f"--features and --anchors were computed differently ({', '.join(diff)} differ); "
                         "use the same --adapter, --projector, --proj-dim and --seed for both")
    return ScoreInputs(pool_files, anchor_files, pool_spec)


class FeatureScoreStage(Stage):
    name = "score"
    output = Scores

    def run(self, ctx: Context) -> Scores:
        files = ctx.inputs.anchor_files
        table = shards_frame(files, ["id", "reject"])
        anchors = np.concatenate([read_vectors(f, "feature")[1] for f in files])
        anchors = anchors[table["reject"].is_null().to_numpy()]
        if len(anchors) == 0:
            raise UsageError(f"--anchors: no usable anchor features in {ctx.cfg.anchors}")
        return kernel_scores(ctx, ctx.inputs.pool_files, anchors, ctx.cfg.scorer, ctx.cfg.budget,
                             allocation=ctx.cfg.allocation, center=ctx.cfg.center)


class FeatureWriteStage(Stage):
    name = "write"
    needs = ("score",)
    output = Written

    def run(self, ctx: Context, score: Scores) -> Written:
        from ntk_ray.io.rows import read_original_rows

        cfg, out = ctx.cfg, ctx.out
        rows = shards_frame(ctx.inputs.pool_files, ["id", "key", "source", "row"])
        cand = nonfinite_scores_rejected(rows.join(score.scores, on="key", how="left"))  # as select does
        scored = cand.filter(pl.col("reject").is_null()).drop("reject").with_columns(
            pl.lit(None, dtype=pl.Int64).alias("coarse_votes"), pl.lit(None, dtype=pl.Float64).alias("coarse_sim"))
        if score.order is not None:
            scored = scored.join(score.order, on="key", how="left")
        ranked = rank_rows(scored, scored.head(0).drop("order", strict=False), cfg.budget)
        rejects = cand.filter(pl.col("reject").is_not_null()).select(
            "id", "source", "row", pl.lit("pool").alias("role"), pl.col("reject").alias("reason"))
        write_parquet_atomic(redacted_sources(ranked), out / "ranked.parquet")
        try:
            selected = selected_rows(ranked, read_original_rows)
        except (OSError, ValueError, IndexError) as e:
            ctx.progress.log(f"selected.parquet has ids only: the source files could not be read back ({e})")
            selected = ranked.filter(pl.col("selected")).select("id", "rank", "score")
        write_parquet_atomic(selected, out / "selected.parquet")
        write_parquet_atomic(redacted_sources(rejects.cast({"row": pl.Int64})) if rejects.height else empty_rejects(),
                             out / "rejects.parquet")
        manifest = {"counts": {"pool_rows": rows.height, "rejected": rejects.height, "ranked": ranked.height,
                               "selected": int(ranked["selected"].sum()),
                               "anchors": int(shards_frame(ctx.inputs.anchor_files, ["reject"])["reject"].is_null().sum())},
                    "config": {"features": cfg.features, "anchors": cfg.anchors, "budget": cfg.budget, "scorer": cfg.scorer,
                               "allocation": cfg.allocation, "center": cfg.center},
                    "projector": ctx.inputs.spec, "stage_seconds": ctx.progress.seconds()}
        manifest = redact(manifest)
        write_json_atomic(manifest, out / "manifest.json")
        return Written(manifest)


def score_plan(publish_to: str | None = None) -> list[Stage]:
    plan = [FeatureScoreStage(), FeatureWriteStage()]
    return plan + [PublishStage(publish_to)] if publish_to else plan
