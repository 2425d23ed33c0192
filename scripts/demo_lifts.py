"""Evidence for the default scorer: label lift of each scorer and baseline on the demo corpus.

For each domain label: build a demo split, run `ntk-ray select` once (features kept), then
re-score the same NTK features with every scorer, and compare with the coarse stage alone
(embedding votes), a TF-IDF lexical baseline and a seeded random pick. Prints a Markdown table.

    .venv/bin/python scripts/demo_lifts.py --domains noun.food noun.animal noun.body verb.motion
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import polars as pl

from ntk_ray.config import SelectConfig
from ntk_ray.demo import make_demo_split
from ntk_ray.core.lexical import tfidf_scores
from ntk_ray.pipeline import run_select
from ntk_ray.core.scoring import SCORERS, AnchorKernel, AnchorTopK, round_robin_order
from ntk_ray.sharded import read_vectors, unit_rows


def lift(labels, label, share):
    return (np.mean([x == label for x in labels]) / share) if len(labels) else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domains", nargs="+", default=["noun.food", "noun.animal", "noun.body", "verb.motion"])
    ap.add_argument("--out", default="runs/demo_lifts")
    ap.add_argument("--n-domain", type=int, default=48)
    ap.add_argument("--n-pool", type=int, default=1000)
    ap.add_argument("--budget", type=int, default=50)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = []
    for label in args.domains:
        base = Path(args.out) / label
        split = make_demo_split(base / "data", domain_label=label, n_domain=args.n_domain, n_pool=args.n_pool, seed=args.seed)
        cfg = SelectConfig(domain=[str(base / "data/domain.jsonl")], pool=[str(base / "data/pool.parquet")],
                           budget=args.budget, out=str(base / "select"), max_length=args.max_length,
                           warmup_epochs=1.0, seed=args.seed, keep_features=True)
        t0 = time.time()
        manifest = run_select(cfg)
        seconds = time.time() - t0
        pool = pl.read_parquet(base / "data/pool.parquet")
        ranked = pl.read_parquet(base / "select/ranked.parquet").join(pool.select("id", "label", "text"), on="id")
        share = (ranked["label"] == label).mean()
        row = {"domain": label, "pool share": f"{share:.1%}", "select seconds": round(seconds)}
        # re-score the kept NTK features with every scorer
        files = sorted(str(p) for p in (base / "select/_work/features").rglob("*.parquet"))
        tables = [read_vectors(f, "feature", ("key", "id")) for f in files]
        ids = [i for t, _ in tables for i in t.column("id").to_pylist()]
        keys = np.concatenate([t.column("key").to_numpy() for t, _ in tables])
        x = np.concatenate([m for _, m in tables])
        anchors = np.load(base / "select/_work/warmup/anchor_features.npy")
        label_of = dict(zip(ranked["id"].to_list(), ranked["label"].to_list()))
        for scorer in SCORERS:
            if scorer == "round-robin":
                topk = AnchorTopK(len(anchors), args.budget).update(unit_rows(anchors) @ unit_rows(x).T, keys)
                key_to_id = dict(zip(keys.tolist(), ids))
                chosen = [key_to_id[k] for k in round_robin_order(topk, args.budget)]
            else:
                s = AnchorKernel(anchors).score(x, scorer)
                chosen = [ids[i] for i in np.lexsort((keys, -s))[: args.budget]]
            row[f"ntk {scorer}"] = round(lift([label_of[i] for i in chosen], label, share), 2)
        votes = ranked.sort(["coarse_votes", "coarse_sim"], descending=True).head(args.budget)["label"].to_list()
        row["embedding votes"] = round(lift(votes, label, share), 2)
        domain = pl.read_ndjson(base / "data/domain.jsonl")
        domain_texts = [f"{p}\n{r}" for p, r in zip(domain["prompt"], domain["response"])]
        lex = tfidf_scores(ranked["text"].to_list(), domain_texts)
        row["tf-idf"] = round(lift(ranked["label"].gather(np.argsort(-lex, kind="stable")[: args.budget]).to_list(), label, share), 2)
        rng = np.random.default_rng(args.seed)
        row["random"] = round(lift(ranked["label"].gather(rng.choice(ranked.height, args.budget, replace=False)).to_list(), label, share), 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    table = pl.DataFrame(rows)
    cols = table.columns
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(str(v) for v in r) + " |" for r in table.iter_rows()]
    text = "\n".join(md)
    print(text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "lifts.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
