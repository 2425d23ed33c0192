"""The built-in selectors' plans (placeholder names until the stage runner lands)."""

from ntk_ray.stages.registry import Selector, register

register(Selector("ntk", "warm-up, coarse kNN votes, NTK kernel scores (default)"))
register(Selector("random", "a seeded uniform pick; no model"))
register(Selector("bm25", "lexical BM25 against the domain rows, on token ids; no model pass"))
register(Selector("embedding", "RDS+: round-robin over anchors by cosine of the warmed-up model's mean-pooled hidden states"))
register(Selector("less", "LESS: Adam-preconditioned loss gradients, max cosine over anchors; a backward pass per pool row"))
