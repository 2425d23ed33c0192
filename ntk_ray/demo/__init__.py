"""The bundled demo corpus: WordNet 3.0 glosses as labelled instruction/response pairs.

Each row asks for the meaning of a word and answers with its WordNet definition; the label is
the synset's lexicographer file (``noun.food``, ``noun.animal``, ``verb.motion``, ...). One
label plays the low-resource domain, the rest of the corpus the general pool, so a selection
can be checked against the known labels. See ``README.md`` in this folder for how it was
built and for the WordNet licence.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import polars as pl

CORPUS_PATH: Path = Path(__file__).resolve().parent / "wordnet_glosses.parquet"

# Semantically distinct labels with well over 64 + 64 + 100 rows each in the corpus.
DEMO_DOMAINS: list[str] = [
    "noun.food",
    "noun.animal",
    "noun.body",
    "noun.plant",
    "noun.artifact",
    "verb.motion",
]

_SAMPLE_COLUMNS = ["prompt", "response", "id", "label"]
_POOL_COLUMNS = ["id", "prompt", "response", "text", "label"]


@lru_cache(maxsize=1)
def _read_corpus() -> pl.DataFrame:
    return pl.read_parquet(CORPUS_PATH)


def load_corpus() -> pl.DataFrame:
    """The whole demo corpus (columns id, label, pos, lemma, prompt, response, text)."""
    return _read_corpus()


def make_demo_split(
    out_dir: str | Path,
    domain_label: str = "noun.food",
    n_domain: int = 64,
    n_eval: int = 64,
    n_pool: int = 2000,
    pool_domain_share: float = 0.05,
    seed: int = 0,
) -> dict:
    """Write a demo domain set, a held-out eval set and a general pool into ``out_dir``.

    - ``domain.jsonl``: ``n_domain`` rows of ``domain_label`` (prompt, response, id, label).
    - ``eval.jsonl``: ``n_eval`` other rows of ``domain_label``, same columns.
    - ``pool.parquet``: ``n_pool`` rows (id, prompt, response, text, label), of which
      ``round(n_pool * pool_domain_share)`` come from ``domain_label`` and the rest are drawn
      uniformly from all other rows (so each other label appears in proportion to the corpus),
      shuffled.

    The three sets are disjoint, and the result depends only on the arguments (a numpy
    Generator seeded with ``seed``). Returns the paths and counts.
    """
    if not 0.0 <= pool_domain_share <= 1.0:
        raise ValueError(f"pool_domain_share must be in [0, 1], got {pool_domain_share}")
    corpus = load_corpus().sort("id")
    domain_rows = corpus.filter(pl.col("label") == domain_label)
    other_rows = corpus.filter(pl.col("label") != domain_label)
    n_pool_domain = int(round(n_pool * pool_domain_share))
    n_pool_other = n_pool - n_pool_domain

    needed = n_domain + n_eval + n_pool_domain
    if domain_rows.height < needed:
        raise ValueError(
            f"label {domain_label!r} has {domain_rows.height} rows; "
            f"{needed} needed (n_domain + n_eval + pool share)"
        )
    if other_rows.height < n_pool_other:
        raise ValueError(f"only {other_rows.height} rows outside {domain_label!r}; "
                         f"{n_pool_other} needed for the pool")

    rng = np.random.default_rng(seed)
    order = rng.permutation(domain_rows.height)
    domain = domain_rows[order[:n_domain]]
    evaluation = domain_rows[order[n_domain:n_domain + n_eval]]
    pool_domain = domain_rows[order[n_domain + n_eval:needed]]
    pool_other = other_rows[np.sort(rng.choice(other_rows.height, n_pool_other, replace=False))]
    pool = pl.concat([pool_domain, pool_other])
    pool = pool[rng.permutation(pool.height)]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "domain_path": out / "domain.jsonl",
        "eval_path": out / "eval.jsonl",
        "pool_path": out / "pool.parquet",
    }
    domain.select(_SAMPLE_COLUMNS).write_ndjson(paths["domain_path"])
    evaluation.select(_SAMPLE_COLUMNS).write_ndjson(paths["eval_path"])
    pool.select(_POOL_COLUMNS).write_parquet(paths["pool_path"], compression="zstd")

    return {
        **paths,
        "domain_label": domain_label,
        "seed": seed,
        "n_domain": domain.height,
        "n_eval": evaluation.height,
        "n_pool": pool.height,
        "n_pool_domain": n_pool_domain,
        "pool_domain_share": n_pool_domain / pool.height if pool.height else 0.0,
    }


__all__ = ["CORPUS_PATH", "DEMO_DOMAINS", "load_corpus", "make_demo_split"]
