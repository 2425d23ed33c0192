"""The selectors: each a named plan of stages, registered here and nowhere else.

``select --selector NAME`` looks the name up here; ``--help`` lists the registered names and
their help text; adding a selector is one ``register`` call (see docs/architecture.md). The
built-in plans (the order their stages run in):

    ntk        read, validate, warmup, embed, coarse, features (candidates), score, write
               (--coarse-by bm25: read, validate, warmup, coarse (BM25), features, score, write)
    random     read, validate, coarse (every row), score, write
    bm25       read, validate, coarse (every row), score, write
    embedding  read, validate, warmup, embed (every row), coarse (every row), score, write
    less       read, validate, warmup (+ Adam moments), coarse (every row), features (every row), score, write

A URI ``--out`` adds ``publish`` at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ntk_ray.io.accounting import UsageError
from ntk_ray.stages.model import EmbedStage, FeaturesStage, WarmupStage
from ntk_ray.stages.rank import (AllRowsStage, Bm25CoarseStage, Bm25ScoreStage, CoarseStage, EmbeddingScoreStage,
                                 LessScoreStage, NtkScoreStage, RandomScoreStage)
from ntk_ray.stages.read import ReadStage, ValidateStage
from ntk_ray.stages.write import PublishStage, WriteStage


@dataclass(frozen=True)
class Selector:
    """A selector: its name, one sentence of help, and its plan: ``plan(cfg)`` returns the
    list of stages (``stages.base.Stage``) from reading the inputs to writing the results.
    ``check(cfg)`` raises ``UsageError`` for settings the selector cannot work with, before any
    work; ``keeps_features`` says whether ``--keep-features`` has NTK-style features to keep."""
    name: str
    help: str
    plan: Callable
    check: Callable | None = None
    keeps_features: bool = False


SELECTORS: dict[str, Selector] = {}


def register(selector: Selector) -> Selector:
    if selector.name in SELECTORS and SELECTORS[selector.name] is not selector:
        raise ValueError(f"selector {selector.name!r} is registered twice")
    SELECTORS[selector.name] = selector
    return selector


def selector_names() -> tuple[str, ...]:
    return tuple(SELECTORS)


def get_selector(name: str) -> Selector:
    try:
        return SELECTORS[name]
    except KeyError:
        raise KeyError(f"--selector {name!r}: choose {', '.join(SELECTORS)}") from None


def selector_help() -> str:
    return "; ".join(f"{s.name}: {s.help}" for s in SELECTORS.values())


def plan_for(cfg, publish_to: str | None = None) -> list:
    """The stages of ``cfg.selector``'s plan, plus ``publish`` when the results go to a URI."""
    plan = list(get_selector(cfg.selector).plan(cfg))
    return plan + [PublishStage(publish_to)] if publish_to else plan


# -------------------------------------------------------------------------------------------
# the built-in selectors
def _less_check(cfg) -> None:
    if cfg.adapter or cfg.warmup != "train":
        raise UsageError("--selector less needs the warm-up's optimizer state: drop --adapter / --warmup fresh")


def _ntk_check(cfg) -> None:
    if getattr(cfg, "coarse_by", "embedding") == "bm25":
        embedding_only = [flag for flag, value in (("--coarse-k", cfg.coarse_k), ("--embed-layer", cfg.embed_layer),
                                                   ("--embed-max-tokens", cfg.embed_max_tokens)) if value is not None]
        if getattr(cfg, "fusion", "none") == "rrf":
            embedding_only.append("--fusion rrf")
        if embedding_only:
            raise UsageError(f"--coarse-by bm25 computes no embeddings: {', '.join(embedding_only)} "
                             f"{'acts' if len(embedding_only) == 1 else 'act'} on the embedding coarse stage only "
                             "(with BM25, fuse with --fusion rrf-bm25)")
    from ntk_ray.core.selectors import allocation_conflict

    conflict = allocation_conflict(getattr(cfg, "allocation", "score"), cfg.scorer)
    if conflict:
        raise UsageError(conflict)
    if getattr(cfg, "checkpoints", 1) > 1 and (cfg.adapter or cfg.warmup != "train" or not cfg.warmup_epochs):
        raise UsageError(f"--checkpoints {cfg.checkpoints} needs a trained warm-up: drop --adapter / --warmup fresh / "
                         "--warmup-epochs 0, or use --checkpoints 1")


def _ntk_coarse(cfg) -> list:
    """The ntk plan's coarse stage: kNN votes on embeddings (``--coarse-by embedding``; --fusion
    rrf needs every candidate's embedding rank: embed even when the pool is no larger than M),
    or BM25 (``--coarse-by bm25``: no embed stage)."""
    if getattr(cfg, "coarse_by", "embedding") == "bm25":
        return [Bm25CoarseStage()]
    return [EmbedStage(only_if_over_m=getattr(cfg, "fusion", "none") != "rrf"), CoarseStage()]


register(Selector(
    "ntk", "warm-up, coarse kNN votes, NTK kernel scores (default)",
    lambda cfg: [ReadStage(), ValidateStage(), WarmupStage(), *_ntk_coarse(cfg),
                 FeaturesStage("coarse"), NtkScoreStage(), WriteStage("ntk", warm=True)],
    check=_ntk_check, keeps_features=True))
register(Selector(
    "random", "a seeded uniform pick; no model",
    lambda cfg: [ReadStage(), ValidateStage(), AllRowsStage(), RandomScoreStage(), WriteStage("random", warm=False)]))
register(Selector(
    "bm25", "lexical BM25 against the domain rows, on token ids; no model pass",
    lambda cfg: [ReadStage(), ValidateStage(), AllRowsStage(), Bm25ScoreStage(), WriteStage("bm25", warm=False)]))
register(Selector(
    "embedding", "RDS+: round-robin over anchors by cosine of the warmed-up model's mean-pooled hidden states",
    lambda cfg: [ReadStage(), ValidateStage(), WarmupStage(), EmbedStage(only_if_over_m=False), AllRowsStage(),
                 EmbeddingScoreStage(), WriteStage("embedding", warm=True)]))
register(Selector(
    "less", "LESS: Adam-preconditioned loss gradients, max cosine over anchors; a backward pass per pool row "
            "(the most expensive)",
    lambda cfg: [ReadStage(), ValidateStage(), WarmupStage(less=True), AllRowsStage(),
                 FeaturesStage(candidates_from=None, less=True), LessScoreStage(), WriteStage("less", warm=True)],
    check=_less_check, keeps_features=True))
