"""Temporary forwarding module: the stage runner replaces it (run_select, run_features, run_score)."""

from __future__ import annotations

from ntk_ray.config import FeaturesConfig, ScoreConfig, SelectConfig


def run_select(cfg: SelectConfig, overwrite: bool = False, progress=None) -> dict:
    from ntk_ray.pipeline import run_select as run

    return run(cfg, overwrite=overwrite, progress=progress)


def run_features(cfg: FeaturesConfig, overwrite: bool = False, progress=None) -> dict:
    from ntk_ray.feature_jobs import run_features as run
    from ntk_ray.io.rows import Columns

    cols = Columns(text=cfg.text_column, prompt=cfg.prompt_column, response=cfg.response_column, id=cfg.id_column)
    return run(cfg.data, cfg.out, model=cfg.model, adapter=cfg.adapter, projector=cfg.projector, proj_dim=cfg.proj_dim,
               seed=cfg.seed, max_length=cfg.max_length, on_too_long=cfg.on_too_long, columns=cols,
               batch_tokens=cfg.batch_tokens, actors=cfg.actors, ray_address=cfg.ray_address,
               lora={"r": cfg.lora_r, "alpha": cfg.lora_alpha, "targets": list(cfg.lora_targets)},
               overwrite=overwrite, progress=progress)


def run_score(cfg: ScoreConfig, overwrite: bool = False, progress=None) -> dict:
    from ntk_ray.feature_jobs import run_score as run

    return run(cfg.features, cfg.anchors, cfg.budget, cfg.out, cfg.scorer, cfg.ray_address, overwrite,
               progress=progress, work_dir=cfg.work_dir)
