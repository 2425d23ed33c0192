"""How much a selection over-represents the domain: the demo's quality check.

lift = (share of the domain label in the selection) / (share of the domain label in the
usable pool). 1.0 is what a random pick gives on average. Reported beside the lift of an actual
seeded random pick of the same size and of the coarse stage's embedding votes alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl


def lift(labels: list[str], domain_label: str, pool_share: float) -> float:
    if not labels or pool_share == 0:
        return float("nan")
    return (sum(1 for x in labels if x == domain_label) / len(labels)) / pool_share


def label_lifts(out_dir: Path, pool_path: Path, domain_label: str, budget: int, seed: int) -> dict:
    """Lifts of the selection, a random pick and the embedding-vote order (when it ran)."""
    ranked = pl.read_parquet(out_dir / "ranked.parquet")
    pool = pl.read_parquet(pool_path).select("id", "label")
    ranked = ranked.join(pool, on="id", how="left")
    share = (ranked["label"] == domain_label).mean()
    result = {"domain_label": domain_label, "pool_share": share, "budget": budget}
    chosen = ranked.filter(pl.col("selected"))["label"].to_list()
    result["ntk"] = lift(chosen, domain_label, share)
    rng = np.random.default_rng(seed)
    random_pick = ranked["label"].gather(rng.choice(ranked.height, size=min(budget, ranked.height), replace=False)).to_list()
    result["random"] = lift(random_pick, domain_label, share)
    if ranked["coarse_votes"].null_count() == 0:
        votes = ranked.sort(["coarse_votes", "coarse_sim"], descending=True).head(budget)["label"].to_list()
        result["embedding_votes"] = lift(votes, domain_label, share)
    return result


def label_lift_report(out_dir: Path, pool_path: Path, domain_label: str, budget: int, seed: int) -> str:
    r = label_lifts(out_dir, pool_path, domain_label, budget, seed)
    lines = [f"\ndomain '{domain_label}': {r['pool_share']:.1%} of the usable pool; selection of {budget}:"]
    lines.append(f"  ntk-ray select     lift {r['ntk']:.2f}x")
    if "embedding_votes" in r:
        lines.append(f"  embedding votes    lift {r['embedding_votes']:.2f}x  (coarse stage alone)")
    lines.append(f"  random pick        lift {r['random']:.2f}x")
    return "\n".join(lines)
