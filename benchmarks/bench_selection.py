"""Does ntk-ray's selection beat the cheap baselines, at a size that can tell? (GitHub issues 4, 16)

    .venv/bin/python benchmarks/bench_selection.py                  # the full run (2-core CPU: days; resumes)
    .venv/bin/python benchmarks/bench_selection.py --smoke --out /tmp/sel    # one tiny cell (CI)
    .venv/bin/python benchmarks/bench_selection.py --executor ray   # the jobs on Ray instead of in-process

It measures the product: every selection is an ``ntk-ray select`` job (``runner.run_select``) or
an ``ntk-ray score`` job on a select job's kept features (``runner.run_score``), on the
in-process ``runtime.local.LocalExecutor`` by default or on Ray (``--executor ray``); the
selected ids are read back from the job's ``ranked.parquet`` / ``selected.parquet``. Only the
fine-tune and the evaluation after selection are a plain-torch harness in this process
(``core.training``). Bundled WordNet corpus, bundled demo model (SmolLM2-135M-Instruct).

A **cell** is (domain, seed): ``demo.make_demo_split`` writes a domain set (``--n-domain`` rows),
a held-out eval set (``--n-eval`` rows of the domain, never seen by a selector) and a pool
(``--n-pool`` rows, ``--pool-share`` of them from the domain). Each **condition** is one entry
of :data:`CONDITIONS`: a name, a group and the ``select`` (or ``score``) settings that differ
from the select defaults. Adding a condition (e.g. a new select flag) is one line there.

- main conditions (every cell, ``--domains`` x ``--seeds``): domain-only, random, bm25,
  embedding, less, ntk (``select``'s defaults), ntk-mean (the paper's scorer).
- equal tokens (the main cells): N rows is the budget, but rows differ in length (bm25 picks
  longer ones). ``ntk@bm25-tokens`` is ntk's ranking cut at the shortest prefix whose response
  tokens reach bm25's picks' in the cell, ``bm25@ntk-tokens`` the converse: no job, one more
  fine-tune each. At most ``--batch-rows`` rows per step, the selection with more rows also
  takes more steps, so ntk, bm25 and both cuts are fine-tuned again in the row budget's step
  count (``<name>/fixed-steps``, ``train_steps``: more rows, bigger batches): equal tokens and
  equal steps. Every selection records its response tokens (the loss masks of the harness's
  tokenization; ``--report-only`` counts them for selections recorded before that).
- ablations and improvement options (``--ablation-domains`` x ``--seeds``): each a row of the
  same kind, compared with ntk and with the strongest baseline in the same cells.

Reuse, so that a cell's model work is done once:
- conditions that differ from ntk only in the scorer are ``ntk-ray score`` jobs on the ntk job's
  kept features (``--keep-features``): no model pass at all;
- select jobs whose warm-up settings equal ntk's (embedding, and every ntk variant that does not
  change the warm-up or the LoRA) take the ntk job's warmed-up adapter through ``select
  --adapter`` (a documented option: the warm-up is loaded instead of retrained, the same weights).
  LESS needs its own warm-up (the Adam moments); warm-up and LoRA variants warm up themselves;
- a condition whose settings resolve to another's (e.g. ``warmup-2`` when 2 is the default) is
  that condition: it is shown as ``= ntk`` and not run twice;
- several processes may run the same command at once (one per core: ``--threads 1`` each): each
  takes the next cell no other process holds (a ``flock`` on the cell's ``claim.lock``, freed
  when its process ends) and re-reads the cache before each cell and each report;
- a finished job is never rerun (the runner's resume); every finished piece (a selection, a
  fine-tune result) is appended to a JSON-lines cache (``--cache``) with the fingerprint of
  everything it depends on (the split, the job's whole ``SelectConfig.identity()`` with the
  product's defaults, the fine-tune and eval settings), so a changed default recomputes just the
  conditions it changes, and the same command resumes where a killed run stopped.

After selection, per condition: a fresh LoRA (r=16, alpha=32, q/k/v/o) on the base model,
``train_lora`` with the fine-tune settings below (fixed before any evaluation, the same for every
condition, seed = the cell's seed) on the domain rows plus the selected rows, then the mean
per-token loss of the held-out eval rows' responses (``training.mean_token_loss``, batched).
Multiple-choice accuracy is off by default (``--mc``): it never moved at toy size and costs
several times the loss evaluation (measured: see ``decide.md``).

Statistics (``decide.md``): per condition mean ± std over cells; for ntk minus each baseline
(and each variant minus ntk / minus embedding) the paired difference of held-out loss over the
cells that have both, with a 95% percentile bootstrap interval (cells resampled, 10,000
resamples, fixed seed); a difference is called only where the interval excludes zero (and at
least :data:`MIN_CELLS_TO_CALL` cells). Label lift = the domain label's share among the picks /
its share of the pool. Cost = the median over cells of the job's ``manifest.json`` stage seconds
per 1,000 pool rows
(a borrowed warm-up counted as its lender's). The results file and plot are rewritten after
every finished cell: ``<out>/decide.md``, ``<out>/decide.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: one thread per process (shared machine)
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np

VERSION = 3  # 3: condition table, shared warm-ups and features, decide.md (2: product jobs; 1: in memory)
LORA = {"r": 16, "alpha": 32, "targets": ("q_proj", "k_proj", "v_proj", "o_proj")}  # the fine-tune's LoRA
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_CHOICES = 4
MC_MAX_LENGTH = 256
EVAL_BATCH_TOKENS = 2048  # padded tokens per eval batch (memory: the logits of 2,048 tokens are 0.4 GB)
BOOTSTRAP = {"resamples": 10_000, "seed": 0, "level": 0.95}
MIN_CELLS_TO_CALL = 4  # a bootstrap over fewer cells is too coarse to call anything
DEFAULT_OUT = ROOT / "benchmarks" / "results"
# committed with the results: every session starts from a new checkout, and a run of days only
# gets done if each session's finished pieces reach the next one (commit it as cells finish)
DEFAULT_CACHE = ROOT / "benchmarks" / "results" / "decide_cache.jsonl"
DEFAULT_WORK = ROOT / "runs" / "bench_decide" / "work"
# the smallest cell where every check of tests/test_bench_selection.py still means something:
# 12 pool rows keep one domain-label row and more rows than the coarse cut M = 4 x budget = 8;
# 48 tokens keep every prompt; one ablation (a scorer on ntk's kept features; embedding already
# borrows ntk's warm-up), one equal-token cut and two fixed-steps fine-tunes
SMOKE = {"domains": ["noun.food"], "ablation_domains": ["noun.food"], "seeds": [0], "n_domain": 4, "n_eval": 4,
         "n_pool": 12, "budget": 2, "max_length": 48, "epochs": 1.0, "proj_dim": 256,
         "ablations": ["ntk-max", "ntk@bm25-tokens", "bm25/fixed-steps", "ntk@bm25-tokens/fixed-steps"]}


# ---------------------------------------------------------------------------------------------
# the conditions
@dataclass(frozen=True)
class Condition:
    """One row of the results. ``select``: the ``SelectConfig`` fields that differ from the select
    defaults (a value may be a function of the args, for sizes); ``score``: an ``ntk-ray score``
    job with these ``ScoreConfig`` fields on the kept features of condition ``base``; ``cut``:
    another condition's ranking cut at a token count instead of N rows (no job). None of them:
    domain-only (no pool rows)."""
    name: str
    group: str  # "main" | "tokens" | "ablation" | "improvement"
    what: str
    select: dict | None = None
    score: dict | None = None
    base: str = "ntk"
    # (ranking, target): the ranking of condition ``ranking``'s job, cut at the shortest prefix
    # whose response tokens reach those of condition ``target``'s picks in the same cell
    cut: tuple[str, str] | None = None
    # another condition's selection, fine-tuned in a fixed number of optimizer steps (the row
    # budget's: ceil((n_domain + N) / batch_rows)) whatever its row count: equal tokens and steps
    refit: str | None = None


def _no_prefilter(a) -> int:
    return -(-a.n_pool // a.budget)  # M = factor x N >= the pool: the coarse stage (and its embedding pass) is skipped


CONDITIONS: list[Condition] = [
    Condition("domain-only", "main", "the domain rows alone"),
    Condition("random", "main", "a seeded uniform pick", {"selector": "random"}),
    Condition("bm25", "main", "BM25 on token ids", {"selector": "bm25"}),
    Condition("embedding", "main", "RDS+: warmed-model mean-pooled embeddings, round-robin", {"selector": "embedding"}),
    Condition("less", "main", "LESS: Adam-preconditioned loss gradients, sketch", {"selector": "less", "projector": "sketch"}),
    Condition("ntk", "main", "`select` defaults", {}),
    Condition("ntk-mean", "main", "the paper's scorer on ntk's features", score={"scorer": "mean"}),
    # equal tokens (main cells): bm25's picks are longer rows than ntk's; the same rankings cut at
    # the other's token count instead of N rows
    Condition("ntk@bm25-tokens", "tokens", "ntk's ranking cut where its picks reach bm25's response tokens",
              cut=("ntk", "bm25")),
    Condition("bm25@ntk-tokens", "tokens", "bm25's ranking cut where its picks reach ntk's response tokens",
              cut=("bm25", "ntk")),
    # ... and the same four selections in as many optimizer steps as the row budget takes, so that
    # a pair at equal tokens is also at equal steps (more rows: bigger batches, not more steps)
    *[Condition(f"{c}/fixed-steps", "tokens", f"{c}'s picks, fine-tuned in the row budget's step count",
                refit=c) for c in ("ntk", "bm25", "ntk@bm25-tokens", "bm25@ntk-tokens")],
    # ablations (issue 16 item 2): each changes one thing of ntk
    Condition("ntk-cosine", "ablation", "scorer cosine", score={"scorer": "cosine"}),
    Condition("ntk-max", "ablation", "scorer max", score={"scorer": "max"}),
    Condition("ntk-round-robin", "ablation", "scorer round-robin", score={"scorer": "round-robin"}),
    Condition("no-prefilter", "ablation", "no coarse stage: NTK features of the whole pool", {"coarse_factor": _no_prefilter}),
    Condition("M=2N", "ablation", "coarse cut M = 2N", {"coarse_factor": 2}),
    Condition("M=4N", "ablation", "coarse cut M = 4N", {"coarse_factor": 4}),
    Condition("M=8N", "ablation", "coarse cut M = 8N", {"coarse_factor": 8}),
    Condition("K=N/4", "ablation", "K = N/4 neighbours per domain row", {"coarse_k": lambda a: max(1, a.budget // 4)}),
    Condition("K=N", "ablation", "K = N neighbours per domain row (None: the budget)", {"coarse_k": None}),
    Condition("K=4N", "ablation", "K = 4N neighbours per domain row", {"coarse_k": lambda a: 4 * a.budget}),
    Condition("warmup-0", "ablation", "no warm-up (0 epochs: B = 0)", {"warmup_epochs": 0.0}),
    Condition("warmup-1", "ablation", "warm-up 1 epoch", {"warmup_epochs": 1.0}),
    Condition("warmup-2", "ablation", "warm-up 2 epochs", {"warmup_epochs": 2.0}),
    Condition("warmup-4", "ablation", "warm-up 4 epochs", {"warmup_epochs": 4.0}),
    Condition("objective-logits", "ablation", "F = summed logits (the paper)", {"objective": "summed-logits"}),
    # an ablation the issue names, run with the options: the loss is what the fine-tune lowers, and
    # BM25 beating ntk in the first main cells points at what the summed logits miss
    Condition("objective-loss", "improvement", "F = per-sample loss (as LESS)", {"objective": "loss"}),
    Condition("proj-sketch", "ablation", "CountSketch projection", {"projector": "sketch"}),
    Condition("proj-dense", "ablation", "dense Rademacher projection", {"projector": "dense"}),
    Condition("proj-exact", "ablation", "no projection (exact LoRA gradients)", {"projector": "none"}),
    Condition("lora-qv", "ablation", "warm-up/feature LoRA on q, v", {"lora_targets": ["q_proj", "v_proj"]}),
    Condition("lora-qkvo", "ablation", "warm-up/feature LoRA on q, k, v, o", {"lora_targets": list(LORA["targets"])}),
    Condition("lora-all", "ablation", "warm-up/feature LoRA on every linear", {"lora_targets": ALL_LINEAR}),
    # improvement options (issue 16 item 3): one line each (a flag that has not landed shows as pending)
    Condition("ntk-bm25-prefilter", "improvement", "coarse stage by BM25 instead of embedding votes (no pool forward)",
              {"coarse_by": "bm25"}),
    # (allocation and centring act on ntk's features alone: `score` jobs on its kept features)
    Condition("ntk-facility", "improvement", "facility-location greedy allocation over psi",
              score={"allocation": "facility-location"}),
    Condition("ntk-kmm", "improvement", "kernel-mean-matching greedy allocation over psi",
              score={"allocation": "kernel-mean-matching"}),
    Condition("ntk-rrf", "improvement", "reciprocal rank fusion of the NTK and embedding rankings", {"fusion": "rrf"}),
    Condition("ntk-rrf-bm25", "improvement", "reciprocal rank fusion of the NTK and BM25 rankings",
              {"fusion": "rrf-bm25"}),
    Condition("ntk-center", "improvement", "kernels of candidate-centred features", score={"center": "candidates"}),
    Condition("ntk-ckpt4", "improvement", "features over 4 warm-up checkpoints (LESS/TRAK-style)", {"checkpoints": 4}),
]
BY_NAME = {c.name: c for c in CONDITIONS}
MAIN = [c.name for c in CONDITIONS if c.group == "main"]
BASELINES = ["domain-only", "random", "bm25", "embedding", "less", "ntk-mean"]
# the fields that act after the warm-up (which rows, which features, how scored): a select job that
# differs from ntk only in these borrows ntk's warmed-up adapter; any other difference (a new
# field included) warms up itself
AFTER_WARMUP = {"selector", "budget", "coarse_factor", "coarse_k", "scorer", "projector", "proj_dim", "allocation",
                "fusion", "fusion_k", "center", "objective", "coarse_by"}  # objective: the features' F, not the warm-up's loss


# ---------------------------------------------------------------------------------------------
# arguments and settings
def parse_args(argv=None) -> argparse.Namespace:
    from ntk_ray.demo import DEMO_DOMAINS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domains", nargs="+", default=DEMO_DOMAINS[:4], help="domains of the main cells")
    ap.add_argument("--ablation-domains", nargs="+", default=None, help="domains of the ablation cells "
                    "(default: the first two of --domains)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--ablations", nargs="*", default=None, help="the conditions beyond the main ones to run "
                    "(equal-token cuts, ablations, improvement options; default: every one in the table)")
    ap.add_argument("--n-domain", type=int, default=48, help="domain rows per cell (warm-up and fine-tune set)")
    ap.add_argument("--n-eval", type=int, default=128, help="held-out eval rows per cell")
    ap.add_argument("--n-pool", type=int, default=1000)
    ap.add_argument("--pool-share", type=float, default=0.05, help="share of the domain label in the pool")
    ap.add_argument("--budget", type=int, default=48, help="N: pool rows each selector adds")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--epochs", type=float, default=1.0, help="fine-tune epochs of every condition")
    ap.add_argument("--lr", type=float, default=1e-4, help="fine-tune learning rate of every condition")
    ap.add_argument("--batch-rows", type=int, default=2, help="at most this many rows per fine-tune step")
    ap.add_argument("--proj-dim", type=int, default=None, help="d of every projection (default: select's)")
    ap.add_argument("--mc", action="store_true", help="also multiple-choice accuracy (4 choices per eval row; "
                    "several times the cost of the loss)")
    ap.add_argument("--model", default=None, metavar="DIR",
                    help="the base model of every job and fine-tune (default: the bundled demo model; the CI smoke "
                         "test passes a tiny random Llama: the harness is what it checks, not the numbers)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared 2-core machine)")
    ap.add_argument("--out", default=None, help=f"results directory (default {DEFAULT_OUT.relative_to(ROOT)}; "
                    "with --smoke runs/bench_decide/smoke)")
    ap.add_argument("--cache", default=None, help=f"JSON-lines cache (default {DEFAULT_CACHE.relative_to(ROOT)}; "
                    "with --smoke <out>/cache.jsonl)")
    ap.add_argument("--work", default=None, help=f"where the jobs write their OUT directories and the cells' data "
                    f"(default {DEFAULT_WORK.relative_to(ROOT)}; with --smoke <out>/work)")
    ap.add_argument("--executor", choices=("local", "ray"), default="local", help="local = in this process (no "
                    "Ray), ray = the runner's RayExecutor (starts or joins Ray); the same stages either way")
    ap.add_argument("--report-only", action="store_true", help="rewrite decide.md/png from the cache; run no job "
                    "(it only counts the tokens of selections recorded without a count: the tokenizer, no model)")
    ap.add_argument("--smoke", action="store_true", help="one tiny cell (CI): "
                    + ", ".join(f"{k}={v}" for k, v in SMOKE.items()))
    args = ap.parse_args(argv)
    if args.smoke:
        given = args.ablations
        for k, v in SMOKE.items():
            setattr(args, k, v)
        args.ablations = given if given is not None else args.ablations  # --smoke --ablations X: check X small
        args.out = args.out or str(ROOT / "runs" / "bench_decide" / "smoke")
        args.cache = args.cache or str(Path(args.out) / "cache.jsonl")
        args.work = args.work or str(Path(args.out) / "work")
    if args.proj_dim is None:
        from ntk_ray.config import SelectConfig

        args.proj_dim = SelectConfig().proj_dim
    args.ablation_domains = args.ablation_domains or args.domains[:2]
    if args.ablations is None:
        args.ablations = [c.name for c in CONDITIONS if c.group != "main"]
    args.out = Path(args.out or DEFAULT_OUT)
    args.cache = Path(args.cache or DEFAULT_CACHE)
    args.work = Path(args.work or DEFAULT_WORK)
    for flag, values in (("--domains", args.domains), ("--ablation-domains", args.ablation_domains)):
        unknown = [d for d in values if d not in DEMO_DOMAINS]
        if unknown:
            ap.error(f"{flag}: {unknown} are not demo domains ({', '.join(DEMO_DOMAINS)})")
    unknown = [a for a in args.ablations if a not in BY_NAME or BY_NAME[a].group == "main"]
    if unknown:
        ap.error(f"--ablations: {unknown} are not ablation conditions "
                 f"({', '.join(c.name for c in CONDITIONS if c.group != 'main')})")
    return args


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def split_settings(args) -> dict:
    return {"n_domain": args.n_domain, "n_eval": args.n_eval, "n_pool": args.n_pool, "pool_share": args.pool_share,
            "max_length": args.max_length, "version": VERSION}


def finetune_settings(args) -> dict:
    """Fixed before any evaluation, identical for every condition (the results file's header and
    every result's fingerprint)."""
    return {"epochs": args.epochs, "lr": args.lr, "batch_rows": args.batch_rows, "weight_decay": 0.0,
            "lora": [LORA["r"], LORA["alpha"], list(LORA["targets"])], "max_length": args.max_length,
            "seed": "the cell's seed"}


def eval_settings(args) -> dict:
    return {"loss": "mean per-token response loss", "batch_tokens": EVAL_BATCH_TOKENS,
            "mc": {"choices": N_CHOICES, "max_length": MC_MAX_LENGTH} if args.mc else None}


# run order: the question, the same at equal tokens, the tries to win, the why
PHASES = ("main", "tokens", "improvement", "ablation")


def conditions_for(args, phase: str) -> list[str]:
    return MAIN if phase == "main" else [a for a in args.ablations if BY_NAME[a].group == phase]


def cells(args) -> list[tuple[str, str, int]]:
    """(phase, domain, seed) in run order, replicate by replicate: for each seed its main cells,
    the equal-token cuts in those cells, then the improvement options in its ablation cells (the same (domain, seed) cells: a phase is
    the conditions run there), so every finished seed is a whole replicate of the question and of
    the tries to win; the long ablation list after every seed's."""
    out = []
    for s in args.seeds:
        out += [("main", d, s) for d in args.domains]
        if conditions_for(args, "tokens"):  # a fine-tune each, no job: right after the seed's main cells
            out += [("tokens", d, s) for d in args.domains]
        if conditions_for(args, "improvement"):
            out += [("improvement", d, s) for d in args.ablation_domains]
    if conditions_for(args, "ablation"):
        out += [("ablation", d, s) for s in args.seeds for d in args.ablation_domains]
    return out


def ablation_cells(args) -> list[tuple[str, int]]:
    """The (domain, seed) cells of the ablation table (improvement options and ablations)."""
    return [(d, s) for s in args.seeds for d in args.ablation_domains]


def _rel(path) -> str:
    path = Path(path).resolve()
    with contextlib.suppress(ValueError):
        path = path.relative_to(ROOT)
    return str(path)


def command_line(args) -> str:
    """The command that regenerates the outputs, every setting spelled out."""
    parts = [".venv/bin/python", "benchmarks/bench_selection.py"]
    if args.smoke:
        parts.append("--smoke")
    else:
        parts += ["--domains", *args.domains, "--ablation-domains", *args.ablation_domains,
                  "--seeds", *map(str, args.seeds)]
        for flag in ("n_domain", "n_eval", "n_pool", "pool_share", "budget", "max_length", "epochs", "lr",
                     "batch_rows", "proj_dim"):
            parts += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
        if args.ablations != [c.name for c in CONDITIONS if c.group != "main"]:
            parts += ["--ablations", *args.ablations]
        if args.mc:
            parts.append("--mc")
    for flag in ("out", "cache", "work"):
        parts += ["--" + flag, _rel(getattr(args, flag))]
    if args.executor != "local":
        parts += ["--executor", args.executor]
    return " ".join(shlex.quote(p) for p in parts)


# ---------------------------------------------------------------------------------------------
# what each condition runs
@dataclass
class Plan:
    """The resolved job of a condition in a cell: ``kind`` "none" | "select" | "score" | "cut"
    (another job's ranking cut at a token count: no job) | "refit" (another condition's selection,
    fine-tuned in fixed steps) | "alias" (of ``alias``) | "pending" (``why``); ``cfg``: the SelectConfig or ScoreConfig fields; ``fp``
    the fingerprint of everything its selection depends on; ``borrows``: the condition whose
    warm-up it takes (``--adapter``) or whose features it scores."""
    name: str
    kind: str
    fp: str = ""
    cfg: dict = field(default_factory=dict)
    borrows: str | None = None
    alias: str | None = None
    why: str = ""


def _resolve(value, args):
    return value(args) if callable(value) else value


def _select_fields(overrides: dict, args, seed: int) -> dict:
    """The SelectConfig fields of a select job of the benchmark (paths filled in later)."""
    base = {"budget": args.budget, "max_length": args.max_length, "seed": seed, "proj_dim": args.proj_dim,
            "executor": "local"}
    if getattr(args, "model", None):  # only when given: the demo model's fingerprints stay as they were
        base["model"] = args.model
    return {**base, **{k: _resolve(v, args) for k, v in overrides.items()}}


def _identity(fields: dict) -> dict:
    """``SelectConfig.identity()`` of the fields (the product's defaults included), paths out."""
    from ntk_ray.config import SelectConfig

    return SelectConfig(**{"domain": ["<domain>"], "pool": ["<pool>"], "out": "<out>", **fields}).identity()


def _unavailable(cond: Condition, args) -> str:
    """Why the product cannot run ``cond`` (a flag that has not landed, a value it does not know),
    or ''."""
    import dataclasses

    from ntk_ray.config import ScoreConfig, SelectConfig

    if cond.select is not None:
        names = {f.name for f in dataclasses.fields(SelectConfig)}
        missing = [k for k in cond.select if k not in names]
        if missing:
            return f"select has no {', '.join('--' + m.replace('_', '-') for m in missing)} yet"
        for k, v in cond.select.items():
            choices = _choices(SelectConfig, k)
            if choices is not None and _resolve(v, args) not in choices:
                return f"select --{k.replace('_', '-')} has no value {_resolve(v, args)!r} yet"
    if cond.score is not None:
        names = {f.name for f in dataclasses.fields(ScoreConfig)}
        missing = [k for k in cond.score if k not in names]
        if missing:
            return f"score has no {', '.join('--' + m.replace('_', '-') for m in missing)} yet"
        for k, v in cond.score.items():
            choices = _choices(ScoreConfig, k)
            if choices is not None and v not in choices:
                return f"score --{k.replace('_', '-')} has no value {v!r} yet"
    return ""


def _choices(cls, name: str):
    import dataclasses

    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    choices = f.metadata.get("choices")
    return tuple(choices()) if callable(choices) else choices


def plan_condition(name: str, args, seed: int) -> Plan:
    """What ``name`` runs in a cell of ``seed`` (the same for every domain: the domain enters the
    fingerprint through the cell)."""
    cond = BY_NAME[name]
    why = _unavailable(cond, args)
    if why:
        return Plan(name, "pending", why=why)
    if cond.refit is not None:
        if args.epochs != 1:
            return Plan(name, "pending", why="the fixed-steps fine-tune is one pass over the rows: --epochs 1 only")
        src = plan_condition(cond.refit, args, seed)
        if src.kind not in ("select", "score", "cut", "alias"):
            return Plan(name, "pending", why=f"{cond.refit} is {src.kind}")
        return Plan(name, "refit", fp=_hash({"refit": src.fp, "steps": fixed_steps(args)}), borrows=cond.refit)
    if cond.cut is not None:
        src, target = (plan_condition(c, args, seed) for c in cond.cut)
        if src.kind != "select" or target.kind not in ("select", "score"):
            return Plan(name, "pending", why=f"{cond.cut[0]} is {src.kind}, {cond.cut[1]} is {target.kind}")
        return Plan(name, "cut", fp=_hash({"cut": [src.fp, target.fp], "rule": CUT_RULE}), borrows=cond.cut[0])
    if cond.select is None and cond.score is None:
        none = {"split": split_settings(args), "kind": "none"}
        if getattr(args, "model", None):  # only when given (the demo model's fingerprints stay as they were)
            none["model"] = args.model
        return Plan(name, "none", fp=_hash(none))
    if cond.score is not None:
        base = plan_condition(cond.base, args, seed)
        if base.kind != "select":
            return Plan(name, "pending", why=f"its base {cond.base} is {base.kind}")
        from ntk_ray.config import ScoreConfig

        if all(v == base.cfg.get(k, getattr(ScoreConfig(), k)) for k, v in cond.score.items()):
            return Plan(name, "alias", fp=base.fp, alias=base.alias or cond.base)  # e.g. the scorer ntk uses
        score = {"budget": args.budget, **cond.score}
        return Plan(name, "score", fp=_hash({"base": base.fp, "score": score}), cfg=score, borrows=cond.base)
    fields = _select_fields(cond.select, args, seed)
    ident = _identity(fields)
    plan = Plan(name, "select", cfg={k: v for k, v in ident.items() if k not in ("domain", "pool", "adapter")})
    if name != "ntk":
        ntk = plan_condition("ntk", args, seed)
        if ntk.kind == "select" and ident == _identity(_select_fields(BY_NAME["ntk"].select, args, seed)):
            return Plan(name, "alias", fp=ntk.fp, alias="ntk")
        ntk_ident = _identity(_select_fields(BY_NAME["ntk"].select, args, seed))
        if _warms_up(ident["selector"]) and ident["warmup"] == "train" and not ident["adapter"] \
                and {k for k in ident if ident[k] != ntk_ident.get(k)} <= AFTER_WARMUP:
            plan.borrows = "ntk"
    plan.fp = _hash({"split": split_settings(args), "identity": ident, "warmup_from": plan.borrows})
    return plan


def fixed_steps(args) -> int:
    """The optimizer steps of one epoch on the domain rows and N picks (``--batch-rows`` rows
    per step): the step count of every ``/fixed-steps`` condition (planned for --epochs 1)."""
    return -(-(args.n_domain + args.budget) // args.batch_rows)


def selection_key(plans: dict, name: str) -> tuple[str, str]:
    """(condition, fingerprint) under which ``name``'s selection is recorded: its own, an alias's
    target's, or for a refit its source's."""
    p = plans[name]
    if p.kind == "alias":
        return selection_key(plans, p.alias)
    if p.kind == "refit":
        return selection_key(plans, p.borrows)
    return name, p.fp


def train_steps(model, seqs, masks, steps: int, lr: float, seed: int) -> dict:
    """``steps`` AdamW steps over one pass of the rows (the ``/fixed-steps`` conditions): a seeded
    permutation of the rows split into ``steps`` contiguous batches (sizes differ by at most one
    row), each step on its batch's mean target-token loss, as ``train_lora`` (loss sum / target
    tokens, constant learning rate, no weight decay)."""
    import torch

    from ntk_ray.core.features import pad_batch
    from ntk_ray.core.training import batch_loss

    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = np.random.default_rng([seed, 0]).permutation(len(seqs))
    batches = [b for b in np.array_split(order, min(steps, len(seqs))) if len(b)]
    model.train()
    total, count = 0.0, 0.0
    for batch in batches:
        ids, attn, mask = pad_batch([seqs[i] for i in batch], [masks[i] for i in batch])
        loss_sum, n = batch_loss(model, ids, attn, mask)
        optimizer.zero_grad(set_to_none=True)
        (loss_sum / max(n.item(), 1.0)).backward()
        optimizer.step()
        total, count = total + loss_sum.item(), count + n.item()
    model.eval()
    return {"epoch_loss": [total / max(count, 1.0)], "steps": len(batches),
            "batch_rows": [len(b) for b in batches]}


CUT_RULE = "the shortest prefix of the ranking whose response tokens reach the target's"


def token_cut(ranked_ids: list[str], tokens_of: dict[str, int], target: int) -> list[str]:
    """The shortest prefix of ``ranked_ids`` (rows the harness could not tokenize skipped) whose
    response tokens reach ``target`` (all of them if they never do)."""
    out, total = [], 0
    for i in ranked_ids:
        if total >= target:
            break
        if i in tokens_of:
            out.append(i)
            total += tokens_of[i]
    return out


def _warms_up(selector: str) -> bool:
    """Whether the selector's plan has a plain warm-up (one an ``--adapter`` can replace; LESS's
    keeps Adam moments and refuses one)."""
    from ntk_ray.config import SelectConfig
    from ntk_ray.stages.model import WarmupStage
    from ntk_ray.stages.registry import get_selector

    plan = get_selector(selector).plan(SelectConfig(selector=selector))
    return any(isinstance(s, WarmupStage) and not s.less for s in plan)


def plans_for(args, seed: int) -> dict[str, Plan]:
    return {c.name: plan_condition(c.name, args, seed) for c in CONDITIONS}


def result_fp(plan: Plan, args) -> str:
    return _hash({"selection": plan.fp, "finetune": finetune_settings(args), "eval": eval_settings(args)})


def base_fp(args) -> str:
    return _hash({"split": split_settings(args), "eval": eval_settings(args)})


# ---------------------------------------------------------------------------------------------
# the cache
class Cache:
    """Append-only JSON lines; a record counts when its fingerprint is the one the current
    settings give it (the caller passes it)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records: dict[tuple, dict] = {}
        self.reload()

    def reload(self) -> None:
        """Read the records other workers (processes running the same command) appended since:
        each record is one ``write`` of one line to a file opened for appending, so lines of two
        processes never interleave."""
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
                self.records[self.key(rec)] = rec

    @staticmethod
    def key(rec: dict) -> tuple:
        return (rec["kind"], rec["domain"], int(rec["seed"]), rec["condition"], rec.get("fp"))

    def get(self, kind, domain, seed, condition, fp):
        return self.records.get((kind, domain, int(seed), condition, fp))

    def add(self, rec: dict) -> dict:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            cut = size > 0 and os.pread(fd, 1, size - 1) != b"\n"  # a line cut by a kill: start a new one
            os.write(fd, (("\n" if cut else "") + json.dumps(rec) + "\n").encode())  # one write: atomic against other appenders
            os.fsync(fd)
        finally:
            os.close(fd)
        self.records[self.key(rec)] = rec
        return rec


# ---------------------------------------------------------------------------------------------
# the work of a cell
class Clock:
    def __init__(self):
        self.start = time.time()

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} {time.time() - self.start:7.0f}s, load {os.getloadavg()[0]:4.1f}] {msg}",
              flush=True)


def tokenized_rows(tokenizer, df, max_length: int) -> dict:
    """ids, input_ids, loss masks, labels, prompts, responses of the usable rows."""
    from ntk_ray.core.tokenize import tokenize_batch

    tok = tokenize_batch(tokenizer, prompts=df["prompt"].to_list(), responses=df["response"].to_list(), max_length=max_length)
    keep = [i for i, r in enumerate(tok.reject) if r is None]
    cols = {c: df[c].to_list() for c in ("id", "label", "prompt", "response")}
    out = {c: [v[i] for i in keep] for c, v in cols.items()}
    out.update(input_ids=[tok.input_ids[i] for i in keep], loss_mask=[tok.loss_mask[i] for i in keep],
               rejected=len(df) - len(keep))
    return out


class Adapter:
    """One LoRA-wrapped copy of the base model per cell. ``fresh()`` puts the LoRA factors back to
    their initial values (``attach_lora(seed=seed)``: A from the seed, B = 0): exactly a freshly
    attached adapter, without copying the model for every fine-tune."""

    def __init__(self, base, seed: int):
        from ntk_ray.models import attach_lora

        self.model = attach_lora(copy.deepcopy(base), r=LORA["r"], alpha=LORA["alpha"], targets=LORA["targets"], seed=seed)
        self.init = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def fresh(self):
        import torch

        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if p.requires_grad:
                    p.copy_(self.init[n])
        return self.model.eval()


def train(model, seqs, masks, epochs, lr, batch_rows, seed) -> dict:
    import torch

    from ntk_ray.core.training import TrainConfig, train_lora

    torch.manual_seed(seed)
    cfg = TrainConfig(epochs=epochs, lr=lr, seed=seed, max_batch_rows=batch_rows)
    return train_lora(model, seqs, masks, cfg, log=lambda *_: None)


def mc_items(eval_rows: dict, domain: str, seed: int) -> tuple[list, list, list]:
    """Each eval question with its true definition and 3 other eval rows' definitions, shuffled;
    a fixed rng per (domain, seed)."""
    rng = np.random.default_rng([seed, zlib.crc32(domain.encode())])
    responses = eval_rows["response"]
    n = len(responses)
    prompts, choices, answers = [], [], []
    for i in range(n):
        others = [j for j in range(n) if j != i and responses[j] != responses[i]]
        if len(others) < N_CHOICES - 1:
            continue
        picked = [responses[j] for j in rng.choice(others, N_CHOICES - 1, replace=False)]
        pos = int(rng.integers(N_CHOICES))
        picked.insert(pos, responses[i])
        prompts.append(eval_rows["prompt"][i])
        choices.append(picked)
        answers.append(pos)
    return prompts, choices, answers


def evaluate(model, tokenizer, eval_rows, mc, args) -> dict:
    from ntk_ray.core.training import mean_token_loss

    t0 = time.time()
    loss = mean_token_loss(model, eval_rows["input_ids"], eval_rows["loss_mask"], batch_tokens=EVAL_BATCH_TOKENS)
    out = {"loss": float(loss["loss"]), "eval_tokens": int(loss["tokens"]), "loss_seconds": time.time() - t0}
    if mc is not None:
        from ntk_ray.core.evaluation import choice_accuracy

        t0 = time.time()
        acc = choice_accuracy(model, tokenizer, mc[0], mc[1], mc[2], max(args.max_length, MC_MAX_LENGTH),
                              batch_tokens=EVAL_BATCH_TOKENS)
        out.update(accuracy=float("nan") if acc["accuracy"] is None else float(acc["accuracy"]),
                   mc_items=int(acc["rows"]), mc_seconds=time.time() - t0)
    return out


def make_executor(kind: str):
    """The in-process ``LocalExecutor`` (the default), or None for ``ray``: the runner's default."""
    if kind == "local":
        from ntk_ray.runtime.local import LocalExecutor

        return LocalExecutor(device="cpu")
    return None


def picked_ids(out: Path) -> list[str]:
    """The ids the job selected, best first, from its ``ranked.parquet`` (checked against
    ``selected.parquet``)."""
    import polars as pl

    ranked = pl.read_parquet(out / "ranked.parquet")
    ids = ranked.filter(pl.col("selected")).sort("rank")["id"].to_list()
    selected = pl.read_parquet(out / "selected.parquet", columns=["id"])["id"].to_list()
    if ids != selected:
        raise RuntimeError(f"{out}: ranked.parquet and selected.parquet disagree")
    return ids


def job_dir(cell_dir: Path, plan: Plan) -> Path:
    """A job's OUT: one per (condition, fingerprint), so a job never meets another config's files."""
    return cell_dir / f"{plan.name}-{plan.fp[:8]}"


def run_job(plan: Plan, plans: dict, args, data: dict, cell_dir: Path, keep: bool, executor) -> dict:
    """One select or score job as the product runs it; returns ids, seconds, stage seconds."""
    from ntk_ray.config import ScoreConfig, SelectConfig
    from ntk_ray.progress import Progress
    from ntk_ray.runner import run_score, run_select

    out = job_dir(cell_dir, plan)
    t0, cpu0 = time.time(), time.process_time()
    if plan.kind == "select":
        fields = dict(plan.cfg, domain=[data["domain"]], pool=[data["pool"]], out=str(out), keep_features=keep,
                      executor=args.executor, batch_tokens=2048)
        if plan.borrows:
            fields["adapter"] = str(job_dir(cell_dir, plans[plan.borrows]) / "_work" / "warmup" / "adapter")
        manifest = run_select(SelectConfig(**fields), progress=Progress(), executor=executor)
    else:
        base = job_dir(cell_dir, plans[plan.borrows])
        cfg = ScoreConfig(features=str(base / "_work" / "features"), anchors=str(base / "_work" / "anchor_features"),
                          out=str(out), executor=args.executor, **plan.cfg)
        manifest = run_score(cfg, progress=Progress(), executor=executor)
    return {"ids": picked_ids(out), "seconds": time.time() - t0, "cpu_seconds": time.process_time() - cpu0,
            "run": _rel(out),
            "parts": {k: float(v) for k, v in manifest.get("stage_seconds", {}).items()}}


def write_split(domain: str, seed: int, args) -> dict:
    """The cell's demo split (written once; ``make_demo_split`` is a pure function of its
    arguments) and its paths and counts."""
    from ntk_ray.demo import make_demo_split

    data = args.work / _hash(split_settings(args)) / f"{domain}-seed{seed}" / "data"
    info = data / "split.json"
    if info.exists():
        return json.loads(info.read_text())
    split = make_demo_split(data, domain, args.n_domain, args.n_eval, args.n_pool, pool_domain_share=args.pool_share,
                            seed=seed)
    split = {"domain": str(split["domain_path"]), "eval": str(split["eval_path"]), "pool": str(split["pool_path"]),
             "n_pool": int(split["n_pool"]), "n_pool_domain": int(split["n_pool_domain"])}
    tmp = info.with_suffix(".tmp")
    tmp.write_text(json.dumps(split))
    tmp.replace(info)
    return split


def tokens_by_id(pool: dict) -> dict[str, int]:
    """Each tokenized pool row's response tokens: the sum of its loss mask (after the
    --max-length cut), what the fine-tune trains on."""
    return {i: int(sum(m)) for i, m in zip(pool["id"], pool["loss_mask"])}


def selection_tokens(ids, pool: dict) -> int:
    """The response tokens the fine-tune trains on in the selected rows (``tokens_by_id``)."""
    tokens_of = tokens_by_id(pool)
    return int(sum(tokens_of[i] for i in ids if i in tokens_of))


def backfill_tokens(args, cache: Cache, load_tokenizer, log) -> int:
    """Append a ``tokens`` record (keyed like the selection: condition and selection
    fingerprint) for every current selection recorded before selections carried their token
    count; returns how many. The cell's split is the one the run wrote (or written again: a pure
    function of its arguments); ``load_tokenizer()`` is called only when there is work."""
    import polars as pl

    todo_cells: dict[tuple[str, int], list] = {}
    for s in args.seeds:
        for name, p in plans_for(args, s).items():
            if p.kind not in ("select", "score"):
                continue
            for d in sorted(set(args.domains) | set(args.ablation_domains)):
                sel = cache.get("selection", d, s, name, p.fp)
                if sel is not None and "tokens" not in sel and cache.get("tokens", d, s, name, p.fp) is None:
                    todo_cells.setdefault((d, s), []).append((name, p.fp, sel["ids"]))
    if not todo_cells:
        return 0
    tokenizer = load_tokenizer()
    added = 0
    for (d, s), items in sorted(todo_cells.items()):
        pool = tokenized_rows(tokenizer, pl.read_parquet(write_split(d, s, args)["pool"]), args.max_length)
        for name, fp, ids in items:
            cache.add({"kind": "tokens", "domain": d, "seed": s, "condition": name, "fp": fp,
                       "tokens": selection_tokens(ids, pool)})
            added += 1
    log(f"token counts of {added} earlier selections in {len(todo_cells)} cells added to the cache")
    return added


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def todo(phase: str, domain: str, seed: int, args, cache: Cache) -> list[str]:
    """The runnable conditions of a cell that have no current result yet (aliases and pending
    conditions excluded; the base-model record too)."""
    plans = plans_for(args, seed)
    out = [n for n in conditions_for(args, phase) if plans[n].kind in ("none", "select", "score", "cut", "refit")
           and cache.get("result", domain, seed, n, result_fp(plans[n], args)) is None]
    if phase == "main" and cache.get("base", domain, seed, "base", base_fp(args)) is None:
        out.append("base")
    return out


def run_cell(phase: str, domain: str, seed: int, args, base, tokenizer, cache: Cache, clock: Clock) -> None:
    import polars as pl
    import torch

    label = f"{phase} {domain} seed {seed}"
    missing = todo(phase, domain, seed, args, cache)
    if not missing:
        clock.log(f"{label}: cached")
        return
    t_cell = time.time()
    plans = plans_for(args, seed)
    data = write_split(domain, seed, args)
    cell_dir = Path(data["domain"]).parent.parent
    dom = tokenized_rows(tokenizer, pl.read_ndjson(data["domain"]), args.max_length)
    ev = tokenized_rows(tokenizer, pl.read_ndjson(data["eval"]), args.max_length)
    pool_df = pl.read_parquet(data["pool"])
    pool = tokenized_rows(tokenizer, pool_df, args.max_length)
    label_of = dict(zip(pool_df["id"].to_list(), pool_df["label"].to_list()))
    pool_share = data["n_pool_domain"] / data["n_pool"]
    mc = mc_items(ev, domain, seed) if args.mc else None
    clock.log(f"{label}: {len(dom['id'])} domain, {len(ev['id'])} eval, {len(pool['id'])} pool rows "
              f"({dom['rejected'] + ev['rejected'] + pool['rejected']} rejected); to do: {', '.join(missing)}")

    # selections: the jobs each missing condition needs, lenders first (ntk before its borrowers)
    needed: list[str] = []

    def need(name):
        p = plans[name]
        if p.kind == "alias":
            return need(p.alias)
        if p.kind == "cut":  # no job of its own: the jobs of its ranking and its token target
            for c in BY_NAME[name].cut:
                need(c)
        if p.kind == "refit":  # another condition's selection
            need(p.borrows)
        if p.kind in ("select", "score") and name not in needed:
            if p.borrows:
                need(p.borrows)
            needed.append(name)

    for name in missing:
        if name != "base":
            need(name)
    keepers = {p.borrows for p in plans.values() if p.kind == "score"}
    executor = make_executor(args.executor)
    for name in needed:
        p = plans[name]
        if cache.get("selection", domain, seed, name, p.fp) is not None:
            continue
        sel = run_job(p, plans, args, data, cell_dir, name in keepers, executor)
        labels = [label_of[i] for i in sel["ids"]]
        share = float(np.mean([x == domain for x in labels])) if labels else float("nan")
        cache.add({"kind": "selection", "domain": domain, "seed": seed, "condition": name, "fp": p.fp,
                   "ids": sel["ids"], "seconds": sel["seconds"], "cpu_seconds": sel["cpu_seconds"], "parts": sel["parts"], "run": sel["run"],
                   "borrows": p.borrows, "label_share": share, "pool_share": pool_share,
                   "lift": share / pool_share if pool_share else float("nan"),
                   "tokens": selection_tokens(sel["ids"], pool), "commit": git_commit()})
        clock.log(f"{label}: {name} picked {len(sel['ids'])} in {sel['seconds']:.0f}s ({p.kind} job; lift "
                  f"{share / pool_share if pool_share else float('nan'):.1f})")
    cuts_needed = {BY_NAME[n].refit if plans[n].kind == "refit" else n for n in missing if n in plans}
    for name in [n for n in plans if n in cuts_needed]:  # the equal-token cuts of finished rankings
        p = plans[name]
        if p.kind != "cut" or cache.get("selection", domain, seed, name, p.fp) is not None:
            continue
        src, target = (cache.get("selection", domain, seed, *selection_key(plans, c)) for c in BY_NAME[name].cut)
        target_tokens = target.get("tokens")
        if target_tokens is None:
            target_tokens = selection_tokens(target["ids"], pool)
        run = Path(src["run"]) if Path(src["run"]).is_absolute() else ROOT / src["run"]
        ranked = pl.read_parquet(run / "ranked.parquet", columns=["id", "rank"]).sort("rank")["id"].to_list()
        ids = token_cut(ranked, tokens_by_id(pool), target_tokens)
        n_tokens = selection_tokens(ids, pool)
        labels = [label_of[i] for i in ids]
        share = float(np.mean([x == domain for x in labels])) if labels else float("nan")
        cache.add({"kind": "selection", "domain": domain, "seed": seed, "condition": name, "fp": p.fp, "ids": ids,
                   "seconds": 0.0, "cpu_seconds": 0.0, "parts": {}, "run": src["run"], "borrows": p.borrows,
                   "label_share": share, "pool_share": pool_share,
                   "lift": share / pool_share if pool_share else float("nan"),
                   "tokens": n_tokens, "target_tokens": int(target_tokens), "commit": git_commit()})
        clock.log(f"{label}: {name} = the first {len(ids)} rows of {BY_NAME[name].cut[0]}'s ranking "
                  f"({n_tokens} response tokens for {target_tokens})")
    id_index = {v: i for i, v in enumerate(pool["id"])}

    adapter = Adapter(base, seed)
    if "base" in missing:
        t0 = time.time()
        with adapter.fresh().disable_adapter():
            m = evaluate(adapter.model, tokenizer, ev, mc, args)
        cache.add({"kind": "base", "domain": domain, "seed": seed, "condition": "base", "fp": base_fp(args), **m,
                   "eval_seconds": time.time() - t0})
        clock.log(f"{label}: base model: loss {m['loss']:.4f} ({time.time() - t0:.0f}s)")
    for name in missing:
        if name == "base":
            continue
        p = plans[name]
        ids = [] if p.kind == "none" else cache.get("selection", domain, seed, *selection_key(plans, name))["ids"]
        lost = [i for i in ids if i not in id_index]
        if lost:
            raise RuntimeError(f"{label}: {name} selected {lost[:3]}, which the harness's tokenization rejected")
        rows = [id_index[i] for i in ids]
        seqs = dom["input_ids"] + [pool["input_ids"][i] for i in rows]
        masks = dom["loss_mask"] + [pool["loss_mask"][i] for i in rows]
        t0 = time.time()
        model = adapter.fresh()
        if p.kind == "refit":
            history = train_steps(model, seqs, masks, fixed_steps(args), args.lr, seed)
        else:
            history = train(model, seqs, masks, args.epochs, args.lr, args.batch_rows, seed)
        train_s = time.time() - t0
        t0 = time.time()
        m = evaluate(model, tokenizer, ev, mc, args)
        cache.add({"kind": "result", "domain": domain, "seed": seed, "condition": name, "fp": result_fp(p, args), **m,
                   "train_rows": len(seqs), "train_seconds": train_s, "eval_seconds": time.time() - t0,
                   "train_loss": history.get("epoch_loss"), "steps": history.get("steps"), "commit": git_commit()})
        clock.log(f"{label}: {name:<16} {len(seqs)} rows: loss {m['loss']:.4f} (train {train_s:.0f}s, "
                  f"eval {time.time() - t0:.0f}s)")
    del adapter
    cache.add({"kind": "cell", "domain": domain, "seed": seed, "condition": phase, "fp": _hash([phase, missing]),
               "seconds": time.time() - t_cell, "load": os.getloadavg()[0], "threads": torch.get_num_threads()})
    clock.log(f"{label}: cell done in {time.time() - t_cell:.0f}s")


# ---------------------------------------------------------------------------------------------
# statistics
def bootstrap_ci(diffs, resamples: int = BOOTSTRAP["resamples"], seed: int = BOOTSTRAP["seed"],
                 level: float = BOOTSTRAP["level"]) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of ``diffs`` and its percentile bootstrap interval: resample the
    n values with replacement ``resamples`` times (``numpy.random.default_rng(seed)``), take each
    resample's mean, and the (1 - level)/2 and (1 + level)/2 quantiles of those means."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(d.mean()), float(lo), float(hi)


def call(lo: float, hi: float, n: int, lower_is_better: bool = True) -> str:
    """The verdict of a difference A - B of a loss: 'A better' when the interval is below zero,
    'A worse' above, 'no call' when it includes zero or fewer than MIN_CELLS_TO_CALL cells."""
    if n < MIN_CELLS_TO_CALL or not (np.isfinite(lo) and np.isfinite(hi)):
        return "no call (too few cells)"
    if hi < 0:
        return "lower" if lower_is_better else "higher"
    if lo > 0:
        return "higher" if lower_is_better else "lower"
    return "no call (interval includes 0)"


def losses(records: list[dict]) -> dict[tuple, float]:
    """(domain, seed, condition) -> held-out loss of the result records."""
    return {(r["domain"], int(r["seed"]), r["condition"]): float(r["loss"]) for r in records}


def sign_flip_p(diffs, exact_up_to: int = 16, resamples: int = 100_000, seed: int = 0) -> float:
    """Two-sided p-value of the paired sign-flip (randomisation) test of "no difference": under
    the null each cell's difference is as likely to have either sign, so the observed |mean| is
    compared with the |mean| of every one of the 2^n sign patterns (exact for n <= ``exact_up_to``;
    beyond, ``resamples`` random patterns from ``default_rng(seed)``):

        p = #{patterns e in {-1, +1}^n : |mean(e * d)| >= |mean(d)|} / #patterns.

    A second opinion beside the bootstrap interval, which is too narrow with few cells: with n
    cells the smallest p is 2 / 2^n (0.0625 at n = 5, however large the differences)."""
    d = np.asarray(diffs, dtype=np.float64)
    n = d.size
    if n == 0:
        return float("nan")
    if n <= exact_up_to:
        bits = (np.arange(2 ** n)[:, None] >> np.arange(n)) & 1
        signs = 1.0 - 2.0 * bits
    else:
        signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(resamples, n))
    stats = np.abs(signs @ d) / n
    return float(np.mean(stats >= abs(d.mean()) * (1 - 1e-12)))


def paired(loss: dict[tuple, float], a: str, b: str, cells_: list[tuple[str, int]]) -> dict:
    """A - B of the held-out loss over the cells that have both: n, mean, 95% interval, call,
    in how many cells A is lower, and the sign-flip test's p (``sign_flip_p``; shown, not part
    of the call rule, which is the issue's: the interval excludes 0)."""
    diffs = [loss[(d, s, a)] - loss[(d, s, b)] for d, s in cells_ if (d, s, a) in loss and (d, s, b) in loss]
    mean, lo, hi = bootstrap_ci(diffs)
    return {"a": a, "b": b, "n": len(diffs), "mean": mean, "lo": lo, "hi": hi, "call": call(lo, hi, len(diffs)),
            "wins": int(sum(x < 0 for x in diffs)), "diffs": diffs, "p": sign_flip_p(diffs)}


def mean_std(values) -> tuple[float, float, int]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def median_n(values) -> tuple[float, float, int]:
    """(median, 0, n): the cost column's statistic; a job's wall seconds grow with whatever else
    the shared machine runs (and with a pause of the run), which a median over cells shrugs off."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    return (float(np.median(v)), 0.0, int(v.size)) if v.size else (float("nan"), float("nan"), 0)


def _pm(m: float, s: float, fmt: str = ".4f") -> str:
    return "-" if not np.isfinite(m) else f"{m:{fmt}} ± {s:{fmt.lstrip('+')}}"


def _call(p: dict) -> str:
    return p["call"] if p["n"] else "-"


def _num(ms: tuple, fmt: str) -> str:
    return f"{ms[0]:{fmt}}" if ms[2] else "-"


def _p(p: dict) -> str:
    return "-" if not p["n"] else f"{p['p']:.4f}"


def _ci(p: dict, fmt: str = "+.4f") -> str:
    return "-" if not p["n"] else f"{p['mean']:{fmt}} [{p['lo']:{fmt}}, {p['hi']:{fmt}}]"


# ---------------------------------------------------------------------------------------------
# the report
class Report:
    """Everything the results file says, gathered once from the cache under the current
    settings: the records whose fingerprints are current, aliases resolved."""

    def __init__(self, cache: Cache, args):
        self.args = args
        self.plans = {s: plans_for(args, s) for s in args.seeds}
        self.results, self.selections, self.base = [], [], []
        for s in args.seeds:
            for d in sorted(set(args.domains) | set(args.ablation_domains)):
                b = cache.get("base", d, s, "base", base_fp(args))
                if b:
                    self.base.append(b)
                for name, p in self.plans[s].items():
                    src = p.alias if p.kind == "alias" else name
                    sp = self.plans[s][src]
                    if sp.kind not in ("none", "select", "score", "cut", "refit"):
                        continue
                    r = cache.get("result", d, s, src, result_fp(sp, args))
                    if r:
                        self.results.append({**r, "condition": name})
                    key = selection_key(self.plans[s], src) if sp.kind != "none" else (src, sp.fp)
                    sel = cache.get("selection", d, s, *key)
                    if sel:
                        if "tokens" not in sel:  # recorded before selections carried it: backfill_tokens
                            sel = {**sel, "tokens": (cache.get("tokens", d, s, *key) or {}).get("tokens")}
                        self.selections.append({**sel, "condition": name})
        self.loss = losses(self.results)
        self.sel = {(r["domain"], int(r["seed"]), r["condition"]): r for r in self.selections}
        self.cell_records = [r for r in cache.records.values() if r["kind"] == "cell"]

    def cells_of(self, phase: str) -> list[tuple[str, int]]:
        return [(d, s) for ph, d, s in cells(self.args) if ph == phase]

    def done(self, phase: str, d: str, s: int) -> bool:
        runnable = [n for n in conditions_for(self.args, phase) if self.plans[s][n].kind != "pending"]
        return all((d, s, n) in self.loss for n in runnable)

    def status(self) -> tuple[int, int, str]:
        all_cells = cells(self.args)
        done = [c for c in all_cells if self.done(*c)]
        split = ", ".join(f"{ph} {sum(c[0] == ph for c in done)} of {sum(c[0] == ph for c in all_cells)}"
                          for ph in PHASES if ph == "main" or any(c[0] == ph for c in all_cells))
        return len(done), len(all_cells), split

    def cost(self, name: str, d: str, s: int) -> float | None:
        """Seconds of the selection per 1,000 pool rows: the job's stage seconds (a score job:
        plus its base's; a borrowed warm-up: the lender's warm-up instead of the loading)."""
        r = self.sel.get((d, s, name))
        if r is None:
            return None
        sec = sum(r["parts"].values())
        lender = self.sel.get((d, s, r.get("borrows"))) if r.get("borrows") else None
        plan = self.plans[s][name]
        src = self.plans[s][plan.alias] if plan.kind == "alias" else plan
        if lender is not None:
            if src.kind == "score":
                sec += sum(lender["parts"].values())
            else:
                sec += max(0.0, lender["parts"].get("warmup", 0.0) - r["parts"].get("warmup", 0.0))
        n_pool = self.args.n_pool
        return 1000.0 * sec / n_pool

    def condition_row(self, name: str, cells_: list[tuple[str, int]]) -> dict:
        loss = mean_std([self.loss.get((d, s, name)) for d, s in cells_])
        dloss = mean_std([self.loss[(d, s, name)] - self.loss[(d, s, "domain-only")] for d, s in cells_
                          if (d, s, name) in self.loss and (d, s, "domain-only") in self.loss])
        # over the cells with a result, as the loss (a cell in progress already has selections)
        done = [(d, s) for d, s in cells_ if (d, s, name) in self.sel and (d, s, name) in self.loss]
        lift = mean_std([self.sel[(d, s, name)]["lift"] for d, s in done])
        cost = median_n([self.cost(name, d, s) for d, s in done])
        return {"loss": loss, "dloss": dloss, "lift": lift, "cost": cost}


def token_association(rep: Report, cells_: list[tuple[str, int]], names: list[str]) -> dict:
    """Within-cell association of a selection's response tokens with its held-out loss: both
    centred on their mean over ``names`` in each cell (so the cell's difficulty drops out), then
    Pearson's r and the least-squares slope (nats per 100 tokens) over the (cell, condition)
    pairs. Descriptive: the selectors differ in more than their rows' length."""
    t, y = [], []
    for d, s in cells_:
        pts = [(rep.sel[(d, s, n)]["tokens"], rep.loss[(d, s, n)]) for n in names
               if (d, s, n) in rep.sel and (d, s, n) in rep.loss and rep.sel[(d, s, n)].get("tokens") is not None]
        if len(pts) < 2:
            continue
        a = np.asarray(pts, dtype=np.float64)
        a -= a.mean(axis=0)
        t += a[:, 0].tolist()
        y += a[:, 1].tolist()
    t, y = np.asarray(t), np.asarray(y)
    if t.size < 3 or not t.any() or not y.any():
        return {"n": int(t.size), "r": float("nan"), "slope": float("nan")}
    return {"n": int(t.size), "r": float(np.corrcoef(t, y)[0, 1]), "slope": float(100 * (t @ y) / (t @ t))}


def equal_token_pairs(rep: Report, cells_: list[tuple[str, int]]) -> list[tuple[dict, str]]:
    """ntk against bm25 with as many response tokens on each side: at bm25's tokens (ntk's
    ranking cut there) and at ntk's (bm25's cut there), with the usual fine-tune (more rows:
    more steps) and with the row budget's step count (``/fixed-steps``: equal steps too); ntk
    against bm25 at equal rows under the fixed-steps fine-tune; and what the extra rows buy each
    ranking."""
    out = []
    fs = "/fixed-steps"
    for a, b, at in (("ntk@bm25-tokens", "bm25", "bm25's picks"), ("ntk", "bm25@ntk-tokens", "ntk's picks"),
                     ("ntk@bm25-tokens" + fs, "bm25" + fs, "bm25's picks, equal steps"),
                     ("ntk" + fs, "bm25@ntk-tokens" + fs, "ntk's picks, equal steps"),
                     ("ntk" + fs, "bm25" + fs, "ntk's vs bm25's picks (equal rows and steps)"),
                     ("ntk@bm25-tokens", "ntk", "bm25's vs ntk's picks (one ranking)"),
                     ("bm25", "bm25@ntk-tokens", "bm25's vs ntk's picks (one ranking)")):
        if a in rep.args.ablations + MAIN and b in rep.args.ablations + MAIN:
            out.append((paired(rep.loss, a, b, cells_), at))
    return out


def equal_token_headline(rep: Report, cells_: list[tuple[str, int]]) -> list[tuple[dict, str]]:
    """The pairs of ``equal_token_pairs`` that are at equal tokens (plot and verdict)."""
    return [(p, at) for p, at in equal_token_pairs(rep, cells_) if at.startswith(("bm25's picks", "ntk's picks"))]


def token_section(rep: Report, cells_: list[tuple[str, int]]) -> list[str]:
    """The markdown lines of the tokens table: each selector's response tokens (what the
    fine-tune trains on beyond the domain rows), their ratio to ntk's in the same cell, and
    the within-cell association with held-out loss."""
    names = [n for n in MAIN if n != "domain-only"]
    cuts = [c.name for c in CONDITIONS if c.group == "tokens" and c.name in rep.args.ablations]
    lines = ["", "## Tokens the picks add to the fine-tune (main cells)", "",
             ("N rows are the budget, but rows differ in length: the response tokens of the N picks (after the "
              "--max-length cut; the loss-bearing tokens the fine-tune adds to the domain rows') per condition, and "
              "their ratio to ntk's picks in the same cell."), "",
             ("| condition | picks (rows) | response tokens of the picks | ÷ ntk's (paired, mean) | optimizer steps | "
              "held-out loss | cells |"),
             "|---|---:|---:|---:|---:|---:|---:|"]
    steps = {(r["domain"], int(r["seed"]), r["condition"]): r.get("steps") for r in rep.results}
    for name in names + cuts:
        done = [(d, s) for d, s in cells_ if (d, s, name) in rep.sel and (d, s, name) in rep.loss
                and rep.sel[(d, s, name)].get("tokens") is not None]
        tok = mean_std([rep.sel[(d, s, name)]["tokens"] for d, s in done])
        ratio = mean_std([rep.sel[(d, s, name)]["tokens"] / rep.sel[(d, s, "ntk")]["tokens"] for d, s in done
                          if (d, s, "ntk") in rep.sel and rep.sel[(d, s, "ntk")].get("tokens")])
        loss = mean_std([rep.loss[(d, s, name)] for d, s in done])
        rows = mean_std([len(rep.sel[(d, s, name)]["ids"]) for d, s in done])
        n_steps = mean_std([steps.get((d, s, name)) for d, s in done])
        what = f" ({BY_NAME[name].what})" if name in cuts else ""
        lines.append(f"| {name}{what} | {_num(rows, '.1f')} | {_pm(*tok[:2], '.0f')} | {_pm(*ratio[:2], '.2f')} | "
                     f"{_num(n_steps, '.1f')} | {_pm(*loss[:2])} | {tok[2]} |")
    if cuts:
        lines += ["", ("Paired differences of held-out loss at equal tokens (negative = the first is better). The fine-tune "
                       f"takes at most {rep.args.batch_rows} rows per optimizer step (as every condition), so of two "
                       "selections with equal tokens the one with more rows also takes more steps: at equal rows the "
                       "longer rows favour bm25, at equal tokens the extra steps favour the selector with the shorter "
                       f"rows. The `/fixed-steps` conditions remove that: every selection in {fixed_steps(rep.args)} "
                       "optimizer steps (the row budget's), a selection with more rows in bigger batches (`train_steps`; "
                       "compare them only with each other). The last two rows are what the longer selection buys "
                       "within one ranking."), "",
                  "| first − second | tokens of | mean [95% CI] | cells | first lower in | call | sign-flip p |",
                  "|---|---|---:|---:|---:|---|---:|"]
        for p, at in equal_token_pairs(rep, cells_):
            lines.append(f"| {p['a']} − {p['b']} | {at} | {_ci(p)} | {p['n']} | {p['wins']} of {p['n']} | "
                         f"{_call(p)} | {_p(p)} |")
    assoc = token_association(rep, cells_, names)
    if assoc["n"] >= 3 and np.isfinite(assoc["r"]):
        lines += ["", (f"Within a cell, more tokens in the picks went with lower held-out loss: Pearson r = "
                       f"{assoc['r']:+.2f} and a slope of {assoc['slope']:+.4f} nats per 100 tokens over "
                       f"{assoc['n']} (cell, selector) pairs, each centred on its cell's mean over {', '.join(names)} "
                       "(descriptive: the selectors differ in more than length)."
                       if assoc["r"] < 0 else
                       f"Within a cell, the picks' tokens and held-out loss: Pearson r = {assoc['r']:+.2f}, slope "
                       f"{assoc['slope']:+.4f} nats per 100 tokens over {assoc['n']} (cell, selector) pairs, each "
                       f"centred on its cell's mean over {', '.join(names)} (descriptive).")]
    return lines


def write_results(cache: Cache, args, elapsed: float) -> str:
    rep = Report(cache, args)
    k, n, split = rep.status()
    main_cells, abl_cells = rep.cells_of("main"), ablation_cells(args)
    plans0 = rep.plans[args.seeds[0]]
    ft = finetune_settings(args)
    cell_s = [r["seconds"] for r in rep.cell_records if r["condition"] == "main"]
    base_loss = mean_std([b["loss"] for b in rep.base if (b["domain"], int(b["seed"])) in main_cells])
    lines = [
        "# Does ntk-ray's selection beat the cheap baselines? (`benchmarks/bench_selection.py`, issue 16)",
        "",
        "Regenerate or resume (the cache keeps every finished piece; the same command continues):",
        "",
        "```",
        command_line(args),
        "```",
        "",
        "(in the background on a shared machine: `nohup nice -n 15 <that command> > run.log 2>&1 &`)",
        "",
        f"- **status: {k} of {n} cells done** ({split}); "
        + ("complete." if k == n else "partial results: the run is in progress or stopped; "
           "every number below is over the cells done so far."),
        (f"- data: bundled WordNet corpus; per cell (domain, seed) `make_demo_split(domain, n_domain={args.n_domain}, "
        f"n_eval={args.n_eval}, n_pool={args.n_pool}, pool_domain_share={args.pool_share}, seed)`; chat template, "
        f"at most {args.max_length} tokens; main cells {args.domains} x seeds {args.seeds}, ablation cells "
        f"{args.ablation_domains} x seeds {args.seeds}"),
        (f"- code: the records so far were computed at commit(s) "
         f"{', '.join(sorted({r.get('commit') or '?' for r in rep.results + rep.selections})) or '(none yet)'}; "
         "a run of days is best started from a git worktree at a fixed commit (`git worktree add --detach "
         "runs/bench_decide/run_tree`), with --out/--cache/--work pointing back, so that edits to the working tree "
         "do not reach it; the cache (`benchmarks/results/decide_cache.jsonl`) is committed as cells finish, so a "
         "later session on a new checkout resumes where this one stopped"),
        f"- model: SmolLM2-135M-Instruct (bundled), float32, CPU ({platform.machine()}, {os.cpu_count()} cores shared "
        f"with other work, {args.threads} torch thread); executor `{args.executor}`"
        + (f"; a main cell took {np.median(cell_s) / 60:.0f} min (median of {len(cell_s)} cells)" if cell_s else ""),
        (f"- **fine-tune of every condition** (fixed before any evaluation, identical for all; in every result's "
        f"fingerprint): fresh LoRA r={LORA['r']}, alpha={LORA['alpha']}, {', '.join(LORA['targets'])}; "
        f"`train_lora` {ft['epochs']:g} epoch(s), lr {ft['lr']:g}, AdamW without weight decay, at most "
        f"{ft['batch_rows']} rows per step, seed = the cell's seed; on the domain rows + the N selected rows"),
        f"- eval: {args.n_eval} held-out domain rows per cell, mean per-token loss of the responses "
        f"(`training.mean_token_loss`, batched at {EVAL_BATCH_TOKENS} tokens)"
        + (f"; {N_CHOICES}-way multiple-choice accuracy too (`--mc`)" if args.mc else
           "; multiple-choice accuracy off (see *Evaluation cost*)")
        + (f"; base model without fine-tune: {_pm(*base_loss[:2])}" if base_loss[2] else ""),
        (f"- selections: N = {args.budget} pool rows, each the product's job (`runner.run_select` / `run_score`); "
        "ntk = `select` with its defaults (every field below); the ablations change one field of ntk"),
        (f"- statistics: mean ± std over cells; paired differences over cells with a {BOOTSTRAP['level']:.0%} "
        f"percentile bootstrap interval (cells resampled, {BOOTSTRAP['resamples']:,} resamples, seed "
        f"{BOOTSTRAP['seed']}); a difference is called only where the interval excludes 0 and at least "
        f"{MIN_CELLS_TO_CALL} cells have both; beside it, the two-sided p of the exact paired sign-flip test (a "
        "second opinion: a percentile bootstrap over few cells is too narrow, and with n cells no p is below "
        "2 / 2^n, 0.0625 at n = 5); lift = the domain label's share among the picks / its share of the "
        f"pool ({args.pool_share:.0%}); cost = the median over cells of the job's stage seconds (`manifest.json`) per "
        "1,000 pool rows, "
        "a borrowed warm-up counted at the lender's warm-up seconds, a score job plus its features job "
        "(seconds on a shared machine: compare within this file only)"),
    ]
    ntk_ident = plans0["ntk"].cfg if plans0["ntk"].kind == "select" else {}
    if ntk_ident:
        lines.append("- ntk's `select` settings: " + ", ".join(
            f"{k}={v}" for k, v in sorted(ntk_ident.items()) if k not in ("budget", "max_length", "proj_dim", "seed")))

    # 1. main table
    lines += ["", f"## Main conditions ({len(main_cells)} cells: {len(args.domains)} domains x {len(args.seeds)} seeds)",
              "", "| condition | what | held-out loss | Δ vs domain-only | label lift | cost s / 1,000 pool rows | cells |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for name in MAIN:
        row = rep.condition_row(name, main_cells)
        lines.append(f"| {name} | {BY_NAME[name].what} | {_pm(*row['loss'][:2])} | "
                     f"{'-' if name == 'domain-only' else _pm(*row['dloss'][:2], '+.4f')} | "
                     f"{_pm(*row['lift'][:2], '.1f') if name != 'domain-only' else '-'} | "
                     f"{_num(row['cost'], '.0f')} | "
                     f"{row['loss'][2]} |")
    # 2. ntk minus each baseline
    pairs = [paired(rep.loss, "ntk", b, main_cells) for b in BASELINES]
    lines += ["", "## ntk minus each baseline: paired difference of held-out loss (negative = ntk better)", "",
              "| ntk − | mean [95% CI] | cells | ntk lower in | call | sign-flip p |", "|---|---:|---:|---:|---|---:|"]
    for p in pairs:
        lines.append(f"| {p['b']} | {_ci(p)} | {p['n']} | {p['wins']} of {p['n']} | {_call(p)} | {_p(p)} |")
    emb = [paired(rep.loss, "embedding", b, main_cells) for b in ("random", "domain-only")]
    lines += ["", "Embedding for reference: " + "; ".join(
        f"embedding − {p['b']}: {_ci(p)} over {p['n']} cells, {p['call']}" for p in emb) + "."]
    # 3. lift per domain
    lines += ["", ("## Label lift per domain (mean over seeds; 1 = random, "
              f"{1 / args.pool_share:.0f} = only domain rows)"), "",
              "| condition | " + " | ".join(args.domains) + " |", "|---|" + "---:|" * len(args.domains)]
    for name in MAIN[1:]:
        vals = []
        for d in args.domains:
            m = mean_std([rep.sel[(d, s, name)]["lift"] for s in args.seeds
                          if (d, s, name) in rep.sel and (d, s, name) in rep.loss])
            vals.append(f"{m[0]:.1f}" if m[2] else "-")
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    # 3b. how many tokens the picks put into the fine-tune
    lines += token_section(rep, main_cells)
    # 4. ablations
    # the second comparison is with the strongest baseline in these cells (lowest mean held-out loss):
    # an option that is to become the default has to beat every baseline, so the strongest
    base_loss_abl = {b: np.mean(v) for b in BASELINES if b != "domain-only"
                     for v in [[rep.loss[(d, s, b)] for d, s in abl_cells if (d, s, b) in rep.loss]] if v}
    best = min(base_loss_abl, key=base_loss_abl.get) if base_loss_abl else "embedding"
    lines += ["", (f"## Ablations and options ({len(abl_cells)} cells: {len(args.ablation_domains)} domains x "
              f"{len(args.seeds)} seeds): each changes one thing of ntk"), "",
              f"The second comparison is with {best}, the baseline with the lowest mean held-out loss in these cells.",
              "",
              (f"| condition | what | held-out loss | variant − ntk [95% CI] | call | variant − {best} [95% CI] | "
              "call | lift | cost s / 1,000 | cells |"), "|---|---|---:|---:|---|---:|---|---:|---:|---:|"]
    abl_pairs, best_pairs = [], []
    for name in dict.fromkeys(["ntk", best, "embedding", *conditions_for(args, "improvement"),
                               *conditions_for(args, "ablation")]):
        plan = plans0[name]
        what = BY_NAME[name].what
        if plan.kind == "pending":
            lines.append(f"| {name} | {what} | pending: {plan.why} | | | | | | | |")
            continue
        if plan.kind == "alias":
            what += f" (= {plan.alias}: the same job)"
        row = rep.condition_row(name, abl_cells)
        vs_ntk = paired(rep.loss, name, "ntk", abl_cells)
        vs_best = paired(rep.loss, name, best, abl_cells)
        if name not in ("ntk", best, "embedding") and plan.kind != "alias":
            abl_pairs.append(vs_ntk)
            best_pairs.append(vs_best)
        own = name in ("ntk",) or plan.alias == "ntk"
        lines.append(f"| {name} | {what} | {_pm(*row['loss'][:2])} | {'-' if own else _ci(vs_ntk)} | "
                     f"{'-' if own else _call(vs_ntk)} | {'-' if name == best else _ci(vs_best)} | "
                     f"{'-' if name == best else _call(vs_best)} | "
                     f"{_pm(*row['lift'][:2], '.1f')} | {_num(row['cost'], '.0f')} | {row['loss'][2]} |")
    # 5. costs
    parts: dict = {}
    for r in rep.selections:
        if (r["domain"], int(r["seed"])) in main_cells and (r["domain"], int(r["seed"]), r["condition"]) in rep.loss:
            for stage, v in r["parts"].items():
                parts.setdefault((r["condition"], stage), []).append(v)
    if parts:
        stages = ["setup", "read", "validate", "warmup", "embed", "coarse", "features", "score", "write", "report"]
        lines += ["", ("## Selection cost breakdown (main cells; median wall seconds per job, the jobs' `manifest.json` "
                  "stage_seconds; a borrowing job's warm-up is the loading of the lender's adapter)"), "",
                  "| condition | " + " | ".join(stages) + " |", "|---|" + "---:|" * len(stages)]
        for name in MAIN[1:]:
            if any(k[0] == name for k in parts):
                cols = [f"{np.median(parts[(name, st)]):.0f}" if (name, st) in parts else "-" for st in stages]
                lines.append(f"| {name} | " + " | ".join(cols) + " |")
    # 6. evaluation cost
    res_main = [r for r in rep.results if (r["domain"], int(r["seed"])) in main_cells]
    if res_main:
        tr = mean_std([r["train_seconds"] for r in res_main if r["condition"] != "domain-only"])
        ev = mean_std([r["loss_seconds"] for r in res_main])
        lines += ["", "## Evaluation cost", "",
                  (f"Per condition and cell: fine-tune {tr[0]:.0f} s (domain + N rows), held-out loss {ev[0]:.0f} s "
                  f"({args.n_eval} rows). {MC_NOTE}")]
    # verdict
    lines += ["", "## Verdict so far", ""]
    for p in pairs:
        lines.append(f"- ntk vs {p['b']}: " + (
            f"ntk's held-out loss is {'lower' if p['call'] == 'lower' else 'higher'} by {abs(p['mean']):.4f} nats "
            f"(95% CI of ntk − {p['b']} [{p['lo']:+.4f}, {p['hi']:+.4f}], {p['n']} cells)"
            if p["call"] in ("lower", "higher") else "no difference called ("
            + (f"{p['call'].removeprefix('no call (').rstrip(')')}; 95% CI [{p['lo']:+.4f}, {p['hi']:+.4f}] over "
               f"{p['n']} cells)" if p["n"] else "no cells yet)")))
    for p, at in equal_token_headline(rep, main_cells):
        lines.append(f"- at equal tokens ({at}): {p['a']} − {p['b']} " + (
            f"{_ci(p)} over {p['n']} cells, {p['call']}" if p["n"] else "no cells yet"))
    beat = [p for p in best_pairs if p["call"] == "lower"]
    lines.append(f"- options and ablations whose held-out loss is lower than {best}'s (the strongest baseline in the "
                 "ablation cells): " + (", ".join(f"{p['a']} ({_ci(p)}, {p['n']} cells)" for p in beat) if beat
                                         else "none called so far"))
    moved = [p for p in abl_pairs if p["call"] in ("lower", "higher")]
    lines.append("- ablations that move held-out loss against ntk: " + (", ".join(
        f"{p['a']} ({p['call']}, {_ci(p)})" for p in moved) if moved else "none called so far"))
    fps = {name: plans0[name].fp for name in MAIN if plans0[name].fp}
    lines += ["", f"Written {time.strftime('%Y-%m-%d %H:%M')} ({elapsed / 60:.0f} min into this invocation, commit "
              f"{git_commit() or '?'}). Cache `{_rel(args.cache)}`; selection fingerprints (seed "
              f"{args.seeds[0]}): " + ", ".join(f"{k} {v}" for k, v in fps.items()) + ".", ""]
    text = "\n".join(lines)
    path = args.out / "decide.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".md.{os.getpid()}.tmp")  # workers may write at the same moment
    tmp.write_text(text)
    tmp.replace(path)
    equal = [dict(p, label=f"{p['a']} − {p['b']}") for p, _ in equal_token_headline(rep, main_cells)]
    write_plot(pairs + equal, abl_pairs, args, args.out / "decide.png", k, n)
    return text


#: measured once (see the module docstring of the results): why multiple-choice accuracy is off
MC_NOTE = ("Multiple-choice accuracy is off: at the toy size it never moved between fine-tuned conditions, and "
           "measured on 128 eval rows of one cell (base model, one thread, load ~7) the loss took 104 s and "
           "the 4-way multiple choice (all 128 items) 242 s, 2.3 times as long; `--mc` turns it on.")


def write_plot(pairs: list[dict], abl_pairs: list[dict], args, path: Path, k: int, n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [("ntk − baseline (main cells)", pairs), ("variant − ntk (ablation cells)", abl_pairs)]
    fig, axes = plt.subplots(1, 2, figsize=(13, max(3.0, 0.38 * max(len(pairs), len(abl_pairs), 1) + 1.4)))
    for ax, (title, ps) in zip(axes, groups):
        ps = [p for p in ps if p["n"]]
        ys = np.arange(len(ps))[::-1]
        for y, p in zip(ys, ps):
            color = "tab:green" if p["call"] == "lower" else "tab:red" if p["call"] == "higher" else "tab:gray"
            ax.errorbar(p["mean"], y, xerr=[[p["mean"] - p["lo"]], [p["hi"] - p["mean"]]], fmt="o", color=color,
                        capsize=3)
            ax.plot(p["diffs"], [y + 0.2] * len(p["diffs"]), ".", color=color, alpha=0.35, markersize=4)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(ys)
        ax.set_yticklabels([f"{p.get('label') or (p['a'] if 'ntk −' not in title else p['b'])} (n={p['n']})"
                            for p in ps], fontsize=8)
        ax.set_title(title + ": held-out loss difference, 95% CI", fontsize=9)
        ax.set_xlabel("nats (negative = the first is better)", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"paired differences over cells ({k} of {n} cells done; green/red = interval excludes 0); "
                 f"n_domain={args.n_domain}, pool {args.n_pool}, N={args.budget}, eval {args.n_eval}", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------
def _tokenizer_of(args):
    def load():
        from ntk_ray.models import load_tokenizer

        return load_tokenizer(args.model)

    return load


def main(argv=None) -> int:
    args = parse_args(argv)
    cache = Cache(args.cache)
    clock = Clock()
    print(f"command: {command_line(args)}", flush=True)
    if args.report_only:
        backfill_tokens(args, cache, _tokenizer_of(args), clock.log)
        print(write_results(cache, args, 0.0), flush=True)
        return 0
    import torch

    threads_before = torch.get_num_threads()
    torch.set_num_threads(max(1, args.threads))
    try:
        return _run(args, cache, clock)
    finally:
        torch.set_num_threads(threads_before)


def claim_cell(args, domain: str, seed: int):
    """An exclusive, non-blocking ``flock`` on the cell's ``claim.lock``: the open file while this
    process works the cell, ``None`` when another process holds it. Several processes running the
    same command share the cells this way (each takes the next free one; the lock goes with the
    process, so a killed worker's cell is free again)."""
    import fcntl

    path = args.work / _hash(split_settings(args)) / f"{domain}-seed{seed}" / "claim.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")  # noqa: SIM115 (held while the cell runs: the caller closes it)
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def _run(args, cache: Cache, clock: Clock) -> int:
    from ntk_ray.models import load_model, load_tokenizer

    for seed in args.seeds:
        for name, p in plans_for(args, seed).items():
            if p.kind == "pending" and (name in MAIN or name in args.ablations) and seed == args.seeds[0]:
                clock.log(f"{name}: pending ({p.why})")
    backfill_tokens(args, cache, _tokenizer_of(args), clock.log)
    write_results(cache, args, 0.0)  # the status is on disk from the start
    base, tokenizer = None, None
    for phase, domain, seed in cells(args):
        cache.reload()  # what other workers finished meanwhile
        if not todo(phase, domain, seed, args, cache):
            clock.log(f"{phase} {domain} seed {seed}: cached")
            continue
        claim = claim_cell(args, domain, seed)
        if claim is None:
            clock.log(f"{phase} {domain} seed {seed}: another worker has it; next cell")
            continue
        cache.reload()  # it may have finished between the check and the claim
        if not todo(phase, domain, seed, args, cache):
            claim.close()
            clock.log(f"{phase} {domain} seed {seed}: cached")
            continue
        if base is None:
            base = load_model(args.model)
            for p in base.parameters():
                p.requires_grad_(False)
            tokenizer = load_tokenizer(args.model)
            clock.log(f"model loaded: {args.model or 'the bundled demo model'}")
        try:
            run_cell(phase, domain, seed, args, base, tokenizer, cache, clock)
        finally:
            claim.close()
        cache.reload()
        write_results(cache, args, time.time() - clock.start)
    cache.reload()
    text = write_results(cache, args, time.time() - clock.start)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
