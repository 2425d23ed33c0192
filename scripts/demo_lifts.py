"""Evidence for the default scorer: label lift of each scorer and baseline on the demo corpus.

    .venv/bin/python scripts/demo_lifts.py --domains noun.food noun.animal noun.body verb.motion
    .venv/bin/python scripts/demo_lifts.py --executor ray        # the jobs on Ray instead of in-process

Runs the product only (``ntk_ray.runner``, the code behind ``ntk-ray select`` / ``ntk-ray score``),
on the in-process ``LocalExecutor`` (default) or Ray (``--executor ray``). For each domain label:

1. a demo split (``demo.make_demo_split``) under ``OUT/<label>/data``;
2. ``select`` (the ntk selector, ``--keep-features``) into ``OUT/<label>/select``;
3. ``score --scorer S`` for every scorer S on that job's kept features (``_work/features``, the
   coarse candidates, against ``_work/anchor_features``) into ``OUT/<label>/score-S``;
4. "embedding votes": the coarse stage alone, the top ``--budget`` rows of the ntk job's
   ``ranked.parquet`` by (coarse_votes, coarse_sim) (NaN when the pool is too small for a coarse
   stage: at most coarse_factor x budget rows);
5. ``select --selector random``, ``bm25`` and ``embedding`` into ``OUT/<label>/<selector>``.

Lift = the label's share among the selected rows / its share of the usable pool (1 = random).
Every job resumes (a rerun into the same OUT reuses finished jobs). Prints a Markdown table and
writes it to ``OUT/lifts.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import polars as pl

BASELINES = ("random", "bm25", "embedding")


def lift(labels, label, share):
    return float(np.mean([x == label for x in labels]) / share) if len(labels) and share else float("nan")


def selected_ids(out: Path) -> list[str]:
    ranked = pl.read_parquet(out / "ranked.parquet")
    return ranked.filter(pl.col("selected")).sort("rank")["id"].to_list()


def parse_args(argv=None):
    from ntk_ray.config import SelectConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domains", nargs="+", default=["noun.food", "noun.animal", "noun.body", "verb.motion"])
    ap.add_argument("--out", default="runs/demo_lifts")
    ap.add_argument("--n-domain", type=int, default=48)
    ap.add_argument("--n-eval", type=int, default=64, help="held-out rows make_demo_split sets aside (unused here)")
    ap.add_argument("--n-pool", type=int, default=1000)
    ap.add_argument("--budget", type=int, default=50)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--warmup-epochs", type=float, default=1.0)
    ap.add_argument("--proj-dim", type=int, default=SelectConfig().proj_dim)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, metavar="DIR",
                    help="the model of every job (default: select's, the bundled demo model; the CI smoke test passes a "
                         "tiny random Llama: it checks that every job runs, not the lifts)")
    ap.add_argument("--executor", choices=("local", "ray"), default="local",
                    help="local: runtime.local.LocalExecutor (in this process, no Ray); ray: the runner's RayExecutor")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in this process (local executor; 0: torch's default)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    from ntk_ray.config import ScoreConfig, SelectConfig
    from ntk_ray.core.scoring import SCORERS
    from ntk_ray.demo import make_demo_split
    from ntk_ray.runner import run_score, run_select

    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.executor == "local":
        from ntk_ray.runtime.local import LocalExecutor

        executor = LocalExecutor()
    else:
        executor = None  # the runner starts or joins Ray (RayExecutor)
    rows = []
    for label in args.domains:
        base = Path(args.out) / label
        split = make_demo_split(base / "data", domain_label=label, n_domain=args.n_domain, n_eval=args.n_eval,
                                n_pool=args.n_pool, seed=args.seed)

        def config(selector: str, out: Path, **extra) -> SelectConfig:
            return SelectConfig(domain=[str(split["domain_path"])], pool=[str(split["pool_path"])], budget=args.budget,
                                out=str(out), selector=selector, max_length=args.max_length,
                                warmup_epochs=args.warmup_epochs, proj_dim=args.proj_dim, seed=args.seed,
                                **({"model": args.model} if args.model else {}), **extra)

        t0 = time.time()
        run_select(config("ntk", base / "select", keep_features=True), executor=executor)
        seconds = time.time() - t0
        pool = pl.read_parquet(split["pool_path"]).select("id", "label")
        ranked = pl.read_parquet(base / "select/ranked.parquet").join(pool, on="id")
        share = float((ranked["label"] == label).mean())
        label_of = dict(zip(ranked["id"].to_list(), ranked["label"].to_list()))
        row = {"domain": label, "pool share": f"{share:.1%}", "select seconds": round(seconds)}
        work = base / "select" / "_work"
        for scorer in SCORERS:
            out = base / f"score-{scorer}"
            run_score(ScoreConfig(features=str(work / "features"), anchors=str(work / "anchor_features"),
                                  budget=args.budget, scorer=scorer, out=str(out)), executor=executor)
            row[f"ntk {scorer}"] = round(lift([label_of[i] for i in selected_ids(out)], label, share), 2)
        voted = ranked.filter(pl.col("coarse_votes").is_not_null())
        if voted.height:
            votes = voted.sort(["coarse_votes", "coarse_sim"], descending=True).head(args.budget)["label"].to_list()
            row["embedding votes"] = round(lift(votes, label, share), 2)
        else:
            row["embedding votes"] = float("nan")
        for selector in BASELINES:
            out = base / selector
            run_select(config(selector, out), executor=executor)
            row[selector] = round(lift([label_of[i] for i in selected_ids(out)], label, share), 2)
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
