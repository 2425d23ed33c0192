"""Does the selection help fine-tuning? The paper's comparison in miniature (GitHub issue 4).

    .venv/bin/python benchmarks/bench_selection.py                  # the full run (2-core CPU: hours)
    .venv/bin/python benchmarks/bench_selection.py --smoke --out /tmp/sel    # one tiny cell (CI)
    .venv/bin/python benchmarks/bench_selection.py --executor ray   # the jobs on Ray instead of in-process

It measures the product: every selection is an ``ntk-ray select`` job (``runner.run_select``, the
same stages, outputs and resume as the CLI), on the in-process ``runtime.local.LocalExecutor`` by
default or on Ray (``--executor ray``); the selected ids are read back from the job's
``ranked.parquet`` / ``selected.parquet``. Only what comes after selection (fine-tune and
evaluation) is a plain-torch harness in this process (``core.training``, ``core.evaluation``).
On the bundled WordNet corpus with the bundled demo model (SmolLM2-135M-Instruct). For every
target domain and seed (a "cell"):

1. ``demo.make_demo_split`` into ``<work>/<settings>/<domain>-seed<seed>/data``: a domain set
   (``--n-domain`` rows, domain.jsonl), a held-out eval set (``--n-eval`` rows of the same label,
   never seen by any selector or any setting) and a pool (``--n-pool`` rows, pool.parquet,
   ``--pool-share`` of them from the domain label).
2. Each selector picks N = ``--budget`` pool rows, one job per selector, each into its own OUT
   (``<cell>/<selector>``), with the job's defaults except: ``--max-length``, ``--warmup-epochs``,
   ``--warmup-lr``, ``--proj-dim``, ``--seed`` = the cell's seed, LoRA r=16, alpha=32, q/k/v/o:
   - ``random``: ``select --selector random``.
   - ``bm25``: ``select --selector bm25`` (BM25 on the chat-template token ids, as the job does).
   - ``embedding``: ``select --selector embedding`` (RDS+; its own warm-up).
   - ``less``: ``select --selector less --projector sketch`` (its own warm-up, keeping the Adam
     moments).
   - ``ntk``: ``select --keep-features --projector <--ntk-projector>`` (the ``select`` defaults:
     warm-up, coarse kNN votes, NTK features of the candidates, the default scorer).
   - ``ntk-mean``: ``ntk-ray score --scorer mean`` (``runner.run_score``) on the ntk job's kept
     features (``OUT/_work/features``, ``OUT/_work/anchor_features``): the paper's scorer, no
     extra model work.
   Each model selector warms up in its own job, as a user running ``select`` would (the warm-ups
   are identical in settings; sharing one through ``--adapter`` would be a different config).
   A rerun of a finished job reuses it (the runner's resume): nothing is recomputed.
3. Per condition (domain-only and domain + each selector's N rows): a fresh LoRA on the base model,
   ``train_lora`` with the settings fixed below (the same for every condition and seed, chosen
   before any evaluation) on the rows tokenized with the project's chat-template tokenization
   (``tokenize.tokenize_batch``) at ``--max-length``, then on the eval rows:
   ``training.mean_token_loss`` (response tokens) and multiple-choice accuracy
   (``evaluation.choice_accuracy``: each eval question with its true definition and 3 definitions
   of other eval rows, positions and distractors drawn from a fixed rng per (domain, seed)). The
   base model (no fine-tune) is evaluated once per cell.

Costs: wall seconds of each selector's whole job (input checks, read + tokenize, warm-up where it
has one, model passes, scoring, writing; the per-stage split from the job's manifest is in the
cost-breakdown table; ntk-mean: the ntk job plus its score job) and of each fine-tune.

Sizes (the defaults): 8 domain rows, 8 eval rows, a 100-row pool (5 domain rows), N = 8, at most
64 tokens, fine-tunes of 1 epoch at 2 rows per step (4 steps domain-only, 8 with N rows added).
Chosen from one measured cell of 16 / 16 / 200 / N = 16 on the shared 2-core machine (load
average 4, one torch thread): about 1,000 s, from roughly 0.9 s per row per fine-tune epoch,
2.4 s per eval row and condition (one loss row + 4 multiple-choice rows), 0.34 s per row for the
embedding pass, 0.8 s per row for LESS features, 0.65 s per row for NTK features, i.e. a cell
costs about 16 D + 13 N + 1.2 P + 19 E seconds (D domain, N budget, P pool, E eval rows) with
2 epochs, 9 D + 7 N + 1.2 P + 19 E with 1 (measured when the selections ran in memory with one
shared warm-up; the jobs add three warm-ups, model loads and shard I/O per cell: re-measure).

Every finished piece (a selection, a fine-tune result) is appended to a JSON-lines cache
(``--cache``) keyed by (kind, domain, seed, condition) and the settings' fingerprint (version 2:
records of the earlier in-memory selections, version 1, are not reused), and the
table and plot are rewritten after every cell: a killed run leaves its results so far, and the same
command resumes where it stopped. Output: ``<out>/selection.md`` (the command that regenerates it
is at its top) and ``<out>/selection.png``.
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
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

CONDITIONS = ["domain-only", "random", "bm25", "embedding", "less", "ntk", "ntk-mean"]
SELECTORS = CONDITIONS[1:]
N_CHOICES = 4
MC_MAX_LENGTH = 256  # token limit of a multiple-choice item (prompt + one whole choice)
LORA = {"r": 16, "alpha": 32, "targets": ("q_proj", "k_proj", "v_proj", "o_proj")}
DEFAULT_OUT = ROOT / "benchmarks" / "results"
DEFAULT_CACHE = ROOT / "runs" / "bench_selection" / "cache.jsonl"
DEFAULT_WORK = ROOT / "runs" / "bench_selection" / "work"
# the smallest cell where every check of tests/test_bench_selection.py still means something:
# 4 eval rows is the least that gives each multiple-choice item 3 distractors; 12 pool rows keep
# one domain-label row (round(12 * 0.05) = 1, so the lift is defined) and more rows than the
# ntk coarse cut M = 4 * budget = 8 (the kNN-vote stage runs); 48 tokens keep every prompt
SMOKE = {"domains": ["noun.food"], "seeds": [0], "n_domain": 4, "n_eval": 4, "n_pool": 12, "budget": 2,
         "max_length": 48, "epochs": 1.0, "warmup_epochs": 1.0, "proj_dim": 256}


# ---------------------------------------------------------------------------------------------
# arguments and settings
def parse_args(argv=None) -> argparse.Namespace:
    from ntk_ray.demo import DEMO_DOMAINS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domains", nargs="+", default=DEMO_DOMAINS[:4])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--n-domain", type=int, default=8, help="domain rows per cell (the warm-up and training set)")
    ap.add_argument("--n-eval", type=int, default=8, help="held-out eval rows per cell")
    ap.add_argument("--n-pool", type=int, default=100)
    ap.add_argument("--pool-share", type=float, default=0.05, help="share of the domain label in the pool")
    ap.add_argument("--budget", type=int, default=8, help="N: pool rows each selector adds")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--epochs", type=float, default=1.0, help="fine-tune epochs of every condition")
    ap.add_argument("--lr", type=float, default=1e-4, help="fine-tune learning rate of every condition")
    ap.add_argument("--batch-rows", type=int, default=2, help="at most this many rows per fine-tune step")
    ap.add_argument("--warmup-epochs", type=float, default=2.0, help="warm-up epochs (method.md: 2)")
    ap.add_argument("--warmup-lr", type=float, default=1e-4, help="warm-up learning rate (method.md: 1e-4)")
    ap.add_argument("--proj-dim", type=int, default=8192, help="d of the NTK and LESS projections")
    ap.add_argument("--ntk-projector", default=None, help="projector of the ntk selector's features (default: "
                    "ntk-ray select's default, SelectConfig.projector)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: on a shared 2-core machine "
                    "two threads that wait for each other are several times slower than one); 0 = chosen per cell, "
                    "every core when the machine is idle at the cell's start (risky when other work starts later)")
    ap.add_argument("--out", default=None, help=f"results directory (default {DEFAULT_OUT.relative_to(ROOT)}; "
                    "with --smoke runs/bench_selection/smoke)")
    ap.add_argument("--cache", default=None, help=f"JSON-lines cache (default {DEFAULT_CACHE.relative_to(ROOT)}; "
                    "with --smoke <out>/cache.jsonl)")
    ap.add_argument("--work", default=None, help=f"where the select/score jobs write (their OUT directories; a rerun "
                    f"reuses finished jobs) and the cells' data (default {DEFAULT_WORK.relative_to(ROOT)}; with --smoke "
                    "<out>/work)")
    ap.add_argument("--executor", choices=("local", "ray"), default="local", help="where the jobs run: local = "
                    "runtime.local.LocalExecutor (in this process, no Ray), ray = the runner's default RayExecutor "
                    "(starts or joins Ray, RAY_ADDRESS); the same stages either way")
    ap.add_argument("--smoke", action="store_true", help="one domain, one seed, tiny sizes (CI): "
                    + ", ".join(f"{k}={v}" for k, v in SMOKE.items()))
    args = ap.parse_args(argv)
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
        args.out = args.out or str(ROOT / "runs" / "bench_selection" / "smoke")
        args.cache = args.cache or str(Path(args.out) / "cache.jsonl")
        args.work = args.work or str(Path(args.out) / "work")
    if args.ntk_projector is None:
        from ntk_ray.config import SelectConfig

        args.ntk_projector = SelectConfig().projector
    args.out = Path(args.out or DEFAULT_OUT)
    args.cache = Path(args.cache or DEFAULT_CACHE)
    args.work = Path(args.work or DEFAULT_WORK)
    unknown = [d for d in args.domains if d not in DEMO_DOMAINS]
    if unknown:
        ap.error(f"--domains: {unknown} are not demo domains ({', '.join(DEMO_DOMAINS)})")
    return args


def settings(args) -> dict:
    """Everything that determines a result (the cache fingerprint), including the library
    defaults the ntk selector takes from ``SelectConfig``."""
    from ntk_ray.config import SelectConfig

    sc = SelectConfig()
    return {"n_domain": args.n_domain, "n_eval": args.n_eval, "n_pool": args.n_pool, "pool_share": args.pool_share,
            "budget": args.budget, "max_length": args.max_length, "epochs": args.epochs, "lr": args.lr,
            "batch_rows": args.batch_rows, "warmup_epochs": args.warmup_epochs, "warmup_lr": args.warmup_lr,
            "proj_dim": args.proj_dim, "lora": [LORA["r"], LORA["alpha"], list(LORA["targets"])],
            "ntk": {"projector": args.ntk_projector, "scorer": sc.scorer, "coarse_factor": sc.coarse_factor,
                    "coarse_k": sc.coarse_k}, "choices": N_CHOICES, "mc_max_length": MC_MAX_LENGTH,
            "version": 2}  # 2: selections by the product's jobs (runner.run_select / run_score)


FINETUNE_SETTINGS = ("epochs", "lr", "batch_rows", "choices", "mc_max_length")  # do not change a selection
SELECTION_KINDS = ("warmup", "selection")
NTK_CONDITIONS = ("ntk", "ntk-mean")


def fingerprint(s: dict, kind: str = "result", condition: str | None = None) -> str:
    """Of the settings a record depends on: a selection not on the fine-tune settings, and only
    the ntk conditions on the ntk settings (so a different fine-tune setting reuses the cached
    selections, and a different ntk projector recomputes only the ntk conditions)."""
    if kind in SELECTION_KINDS:
        s = {k: v for k, v in s.items() if k not in FINETUNE_SETTINGS}
    if condition not in NTK_CONDITIONS:
        s = {k: v for k, v in s.items() if k != "ntk"}
    return hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:12]


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
        parts += ["--domains", *args.domains, "--seeds", *map(str, args.seeds)]
        for flag in ("n_domain", "n_eval", "n_pool", "pool_share", "budget", "max_length", "epochs", "lr",
                     "batch_rows", "warmup_epochs", "warmup_lr", "proj_dim", "ntk_projector"):
            parts += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    for flag in ("out", "cache", "work"):
        parts += ["--" + flag, _rel(getattr(args, flag))]
    if args.executor != "local":
        parts += ["--executor", args.executor]
    return " ".join(shlex.quote(p) for p in parts)


# ---------------------------------------------------------------------------------------------
# the cache
class Cache:
    """Append-only JSON lines; a record counts when its fingerprint is the current one."""

    def __init__(self, path: Path, settings: dict):
        self.path = Path(path)
        self.settings = settings
        self.records: dict[tuple, dict] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
                if rec.get("fp") == self.fp_of(rec.get("kind"), rec.get("condition")):
                    self.records[self.key(rec)] = rec

    def fp_of(self, kind, condition) -> str:
        return fingerprint(self.settings, kind, condition)

    @staticmethod
    def key(rec: dict) -> tuple:
        return (rec["kind"], rec["domain"], int(rec["seed"]), rec["condition"])

    def get(self, kind, domain, seed, condition):
        return self.records.get((kind, domain, int(seed), condition))

    def add(self, rec: dict) -> dict:
        rec = {"fp": self.fp_of(rec["kind"], rec["condition"]), **rec}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[self.key(rec)] = rec
        return rec

    def of_kind(self, kind: str) -> list[dict]:
        return [r for k, r in self.records.items() if k[0] == kind]


# ---------------------------------------------------------------------------------------------
# one cell
class Clock:
    def __init__(self):
        self.start = time.time()

    def log(self, msg: str) -> None:
        print(f"[{time.time() - self.start:7.0f}s, load {os.getloadavg()[0]:4.1f}] {msg}", flush=True)


def tokenized_rows(tokenizer, df, max_length: int) -> dict:
    """ids, input_ids, loss/score masks, labels, prompts, responses of the usable rows."""
    from ntk_ray.core.tokenize import tokenize_batch

    tok = tokenize_batch(tokenizer, prompts=df["prompt"].to_list(), responses=df["response"].to_list(), max_length=max_length)
    keep = [i for i, r in enumerate(tok.reject) if r is None]
    cols = {c: df[c].to_list() for c in ("id", "label", "prompt", "response")}
    out = {c: [v[i] for i in keep] for c, v in cols.items()}
    out.update(input_ids=[tok.input_ids[i] for i in keep], loss_mask=[tok.loss_mask[i] for i in keep],
               score_mask=[tok.score_mask[i] for i in keep], rejected=len(df) - len(keep))
    return out


class Adapter:
    """One LoRA-wrapped copy of the base model per cell. ``fresh()`` puts the LoRA factors back to
    their initial values (``attach_lora(seed=seed)``: A Kaiming-uniform from the seed, B = 0), which is
    exactly a freshly attached adapter, without copying the model for every fine-tune."""

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


def train(model, seqs, masks, epochs, lr, batch_rows, seed, keep_state=False) -> dict:
    import torch

    from ntk_ray.core.training import TrainConfig, train_lora

    torch.manual_seed(seed)
    cfg = TrainConfig(epochs=epochs, lr=lr, seed=seed, **({"max_batch_rows": batch_rows} if batch_rows else {}))
    return train_lora(model, seqs, masks, cfg, log=lambda *_: None, keep_optimizer_state=keep_state)


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


def evaluate(model, tokenizer, eval_rows, mc, max_length) -> dict:
    from ntk_ray.core.evaluation import choice_accuracy
    from ntk_ray.core.training import mean_token_loss

    loss = mean_token_loss(model, eval_rows["input_ids"], eval_rows["loss_mask"])
    # choices are never truncated (choice_accuracy skips a row that does not fit): a longer limit
    # than training's, so that every definition is compared whole
    acc = choice_accuracy(model, tokenizer, mc[0], mc[1], mc[2], max(max_length, MC_MAX_LENGTH))
    return {"loss": float(loss["loss"]), "accuracy": float("nan") if acc["accuracy"] is None else float(acc["accuracy"]),
            "eval_tokens": int(loss["tokens"]), "mc_items": int(acc["rows"]), "mc_skipped": int(acc["skipped"])}


def make_executor(kind: str):
    """The executor every job of the benchmark runs on: the in-process ``LocalExecutor`` (one
    process, no Ray; the default), or None for ``ray``: the runner's default ``RayExecutor``
    (starts or joins Ray as ``ntk-ray select`` does)."""
    if kind == "local":
        from ntk_ray.runtime.local import LocalExecutor

        return LocalExecutor()
    return None


def select_config(selector: str, args, seed: int, data: dict, out: Path):
    """The ``ntk-ray select`` config of one selector: the library defaults except the sizes and
    the warm-up settings of the benchmark (the same for every selector)."""
    from ntk_ray.config import SelectConfig

    options = {"ntk": {"projector": args.ntk_projector, "keep_features": True},
               "less": {"projector": "sketch"}}.get(selector, {})
    return SelectConfig(domain=[data["domain"]], pool=[data["pool"]], budget=args.budget, out=str(out),
                        selector=selector, max_length=args.max_length, lora_r=LORA["r"], lora_alpha=LORA["alpha"],
                        lora_targets=list(LORA["targets"]), warmup_epochs=args.warmup_epochs,
                        warmup_lr=args.warmup_lr, proj_dim=args.proj_dim, seed=seed, **options)


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


def run_selectors(needed: list[str], args, seed: int, data: dict, cell_dir: Path, clock, label) -> dict:
    """Every selector in ``needed`` as the product runs it: ``runner.run_select`` into
    ``cell_dir/<selector>`` (a rerun of a finished job reuses it: nothing is recomputed), and
    ntk-mean as ``runner.run_score`` on the ntk job's kept features. Returns
    {name: {"ids", "seconds", "parts", "run"}}."""
    from ntk_ray.config import ScoreConfig
    from ntk_ray.progress import Progress
    from ntk_ray.runner import run_score, run_select

    out: dict = {}
    executor = make_executor(args.executor)
    jobs = [c for c in ("random", "bm25", "embedding", "less", "ntk") if c in needed or (c == "ntk" and "ntk-mean" in needed)]
    for name in jobs:
        run = cell_dir / name
        t0 = time.time()
        manifest = run_select(select_config(name, args, seed, data, run), progress=Progress(), executor=executor)
        seconds = time.time() - t0
        out[name] = {"ids": picked_ids(run), "seconds": seconds, "run": _rel(run),
                     "parts": {k: float(v) for k, v in manifest.get("stage_seconds", {}).items()}}
        clock.log(f"{label}: {name} picked {len(out[name]['ids'])} in {seconds:.1f}s (select job)")
    if "ntk-mean" in needed:
        ntk_run, run = cell_dir / "ntk", cell_dir / "ntk-mean"
        cfg = ScoreConfig(features=str(ntk_run / "_work" / "features"), anchors=str(ntk_run / "_work" / "anchor_features"),
                          budget=args.budget, scorer="mean", out=str(run))
        t0 = time.time()
        manifest = run_score(cfg, progress=Progress(), executor=executor)
        seconds = time.time() - t0
        parts = {f"ntk {k}": v for k, v in out["ntk"]["parts"].items()}
        parts.update({k: float(v) for k, v in manifest.get("stage_seconds", {}).items()})
        # its features are the ntk job's: its cost is that job plus the score job
        out["ntk-mean"] = {"ids": picked_ids(run), "seconds": out["ntk"]["seconds"] + seconds, "run": _rel(run),
                           "parts": parts, "score_seconds": seconds}
        clock.log(f"{label}: ntk-mean picked {len(out['ntk-mean']['ids'])} in {seconds:.1f}s (score job)")
    return {k: v for k, v in out.items() if k in needed}


def write_split(domain: str, seed: int, args, cell_dir: Path) -> dict:
    """The cell's demo split under ``cell_dir/data`` (written once; ``make_demo_split`` is a
    pure function of its arguments) and its paths and counts."""
    from ntk_ray.demo import make_demo_split

    data = cell_dir / "data"
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


def run_cell(domain: str, seed: int, args, base, tokenizer, cache: Cache, clock: Clock) -> None:
    import polars as pl
    import torch

    label = f"{domain} seed {seed}"
    missing = [c for c in CONDITIONS if cache.get("result", domain, seed, c) is None]
    if not missing and cache.get("base", domain, seed, "base") is not None:
        clock.log(f"{label}: cached")
        return
    t_cell = time.time()
    # one directory per selection settings (ntk's included): a job's OUT never holds another config
    cell_dir = args.work / fingerprint(settings(args), "selection", "ntk") / f"{domain}-seed{seed}"
    data = write_split(domain, seed, args, cell_dir)
    dom = tokenized_rows(tokenizer, pl.read_ndjson(data["domain"]), args.max_length)
    ev = tokenized_rows(tokenizer, pl.read_ndjson(data["eval"]), args.max_length)
    pool_df = pl.read_parquet(data["pool"])
    pool = tokenized_rows(tokenizer, pool_df, args.max_length)
    label_of = dict(zip(pool_df["id"].to_list(), pool_df["label"].to_list()))
    pool_share = data["n_pool_domain"] / data["n_pool"]
    mc = mc_items(ev, domain, seed)
    clock.log(f"{label}: {len(dom['id'])} domain, {len(ev['id'])} eval ({len(mc[0])} choice items), "
              f"{len(pool['id'])} pool rows ({dom['rejected'] + ev['rejected'] + pool['rejected']} rejected); "
              f"to do: {', '.join(missing)}")

    # selections (cached by id, so a resumed cell runs no job when all are done)
    need_sel = [c for c in missing if c != "domain-only" and cache.get("selection", domain, seed, c) is None]
    if need_sel:
        got = run_selectors(need_sel, args, seed, data, cell_dir, clock, label)
        for name, sel in got.items():
            labels = [label_of[i] for i in sel["ids"]]
            share = float(np.mean([x == domain for x in labels])) if labels else float("nan")
            cache.add({"kind": "selection", "domain": domain, "seed": seed, "condition": name, "ids": sel["ids"],
                       "seconds": sel["seconds"], "parts": sel["parts"], "run": sel["run"], "label_share": share,
                       "pool_share": pool_share, "lift": share / pool_share if pool_share else float("nan")})
    id_index = {v: i for i, v in enumerate(pool["id"])}

    adapter = Adapter(base, seed)
    if cache.get("base", domain, seed, "base") is None:
        t0 = time.time()
        with adapter.fresh().disable_adapter():
            m = evaluate(adapter.model, tokenizer, ev, mc, args.max_length)
        cache.add({"kind": "base", "domain": domain, "seed": seed, "condition": "base", **m, "eval_seconds": time.time() - t0})
        clock.log(f"{label}: base model: loss {m['loss']:.4f}, accuracy {m['accuracy']:.3f}")
    for cond in missing:
        ids = [] if cond == "domain-only" else cache.get("selection", domain, seed, cond)["ids"]
        lost = [i for i in ids if i not in id_index]
        if lost:
            raise RuntimeError(f"{label}: {cond} selected {lost[:3]}, which the harness's tokenization rejected")
        rows = [id_index[i] for i in ids]
        seqs = dom["input_ids"] + [pool["input_ids"][i] for i in rows]
        masks = dom["loss_mask"] + [pool["loss_mask"][i] for i in rows]
        t0 = time.time()
        model = adapter.fresh()
        history = train(model, seqs, masks, args.epochs, args.lr, args.batch_rows, seed)
        train_s = time.time() - t0
        t0 = time.time()
        m = evaluate(model, tokenizer, ev, mc, args.max_length)
        cache.add({"kind": "result", "domain": domain, "seed": seed, "condition": cond, **m, "train_rows": len(seqs),
                   "train_seconds": train_s, "eval_seconds": time.time() - t0, "train_loss": history.get("epoch_loss"),
                   "steps": history.get("steps")})
        clock.log(f"{label}: {cond:<11} {len(seqs)} rows: loss {m['loss']:.4f}, accuracy {m['accuracy']:.3f} "
                  f"(train {train_s:.1f}s)")
    del adapter
    cache.add({"kind": "cell", "domain": domain, "seed": seed, "condition": "cell", "seconds": time.time() - t_cell,
               "load": os.getloadavg()[0], "threads": torch.get_num_threads()})
    clock.log(f"{label}: cell done in {time.time() - t_cell:.0f}s")


# ---------------------------------------------------------------------------------------------
# summary
def _mean_std(values) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def _pm(mean: float, std: float, fmt: str) -> str:
    if not np.isfinite(mean):
        return "-"
    return f"{mean:{fmt}} ± {std:{fmt.lstrip('+')}}"


def summarize(cache: Cache, args) -> dict:
    """Per (domain | "all", condition): lists over seeds of loss, accuracy, delta loss/accuracy
    vs domain-only, lift, selector seconds, train seconds. "all" averages the domains per seed
    (a seed counts when every listed domain has it), so its spread is over seeds too."""
    res = {(r["domain"], r["seed"], r["condition"]): r for r in cache.of_kind("result")}
    res.update({(r["domain"], r["seed"], "base"): r for r in cache.of_kind("base")})
    sel = {(r["domain"], r["seed"], r["condition"]): r for r in cache.of_kind("selection")}
    conds = ["base"] + CONDITIONS
    per: dict = {}
    for d in args.domains:
        for c in conds:
            cell = {"loss": {}, "accuracy": {}, "dloss": {}, "dacc": {}, "lift": {}, "sel_s": {}, "train_s": {}}
            for s in args.seeds:
                r, ref = res.get((d, s, c)), res.get((d, s, "domain-only"))
                if r is None:
                    continue
                cell["loss"][s], cell["accuracy"][s] = r["loss"], r["accuracy"]
                if ref is not None:
                    cell["dloss"][s], cell["dacc"][s] = r["loss"] - ref["loss"], r["accuracy"] - ref["accuracy"]
                if "train_seconds" in r:
                    cell["train_s"][s] = r["train_seconds"]
                if (d, s, c) in sel:
                    cell["lift"][s], cell["sel_s"][s] = sel[(d, s, c)]["lift"], sel[(d, s, c)]["seconds"]
            per[(d, c)] = cell
    for c in conds:
        cell = {}
        for metric in ("loss", "accuracy", "dloss", "dacc", "lift", "sel_s", "train_s"):
            cell[metric] = {}
            for s in args.seeds:
                vals = [per[(d, c)][metric].get(s) for d in args.domains]
                if all(v is not None for v in vals):
                    cell[metric][s] = float(np.mean(vals))
        per[("all", c)] = cell
    return per


def wins(cache: Cache, args, cond: str, other: str) -> tuple[int, int]:
    """(cells where ``cond`` has lower eval loss than ``other``, cells with both)."""
    res = {(r["domain"], r["seed"], r["condition"]): r["loss"] for r in cache.of_kind("result")}
    pairs = [(res[(d, s, cond)], res[(d, s, other)]) for d in args.domains for s in args.seeds
             if (d, s, cond) in res and (d, s, other) in res]
    return sum(a < b for a, b in pairs), len(pairs)


def projector_note(args) -> str:
    from ntk_ray.config import SelectConfig

    default = SelectConfig().projector
    return "" if args.ntk_projector == default else f" (not the current `select` default `{default}`)"


def write_markdown(cache: Cache, args, s: dict, path: Path, elapsed: float) -> str:
    per = summarize(cache, args)
    done_cells = sum(all(cache.get("result", d, sd, c) for c in CONDITIONS) for d in args.domains for sd in args.seeds)
    total_cells = len(args.domains) * len(args.seeds)
    warm = [r["parts"]["warmup"] for r in cache.of_kind("selection") if r["condition"] == "ntk" and "warmup" in r.get("parts", {})]
    cells = [r["seconds"] for r in cache.of_kind("cell")]
    loads = [r["load"] for r in cache.of_kind("cell")]
    ref_lift = args.pool_share
    lines = [
        "# Does the selection help fine-tuning? (`benchmarks/bench_selection.py`)",
        "",
        "Regenerate (resumes from the cache; delete it to start over):",
        "",
        "```",
        command_line(args),
        "```",
        "",
        f"- status: {done_cells} of {total_cells} cells (domain x seed) complete"
        + ("" if done_cells == total_cells else " (partial results: the run is in progress or was stopped)"),
        f"- data: bundled WordNet corpus; per cell `make_demo_split(domain, n_domain={args.n_domain}, n_eval={args.n_eval}, "
        f"n_pool={args.n_pool}, pool_domain_share={args.pool_share}, seed)`; chat template, max_length {args.max_length}",
        f"- model: SmolLM2-135M-Instruct (bundled), float32, CPU ({platform.machine()}, {os.cpu_count()} cores, "
        f"torch threads per cell: {sorted({r.get('threads') for r in cache.of_kind('cell')}) or args.threads or 'auto'}); LoRA r={LORA['r']}, alpha={LORA['alpha']}, q/k/v/o"
        + (f"; {np.mean(cells):.0f} s per cell (mean of {len(cells)}; 1-minute load average at the cell's end "
           f"{np.mean(loads):.1f}: the machine is shared, so seconds are comparable within a cell, not across runs)"
           if cells else ""),
        f"- every selection is the product's job: `runner.run_select` (`ntk-ray select --selector NAME`) on the "
        f"`{args.executor}` executor with the cell's domain.jsonl and pool.parquet; ntk-mean = `runner.run_score` "
        "(`ntk-ray score --scorer mean`) on the ntk job's kept features (`--keep-features`)",
        f"- warm-up (in each of the embedding, less and ntk jobs, as `select` runs it): {args.warmup_epochs:g} epoch(s), "
        f"lr {args.warmup_lr:g} on the domain rows"
        + (f"; {np.mean(warm):.1f} s per ntk job on average (included in the selector seconds)" if warm else ""),
        f"- selectors pick N = {args.budget} pool rows; ntk = ntk-ray's `select` defaults (coarse kNN votes, "
        f"M = {s['ntk']['coarse_factor']}N, K = N; `{s['ntk']['projector']}` projection{projector_note(args)}, d = {args.proj_dim}; scorer "
        f"`{s['ntk']['scorer']}`); ntk-mean = the paper's `mean` scorer on the same features; less = Adam-preconditioned "
        f"loss gradients, `sketch` projection, d = {args.proj_dim}; embedding = mean-pooled warmed hidden states; "
        "bm25 = token ids; random = seeded",
        f"- fine-tune of every condition (fixed before any evaluation, identical for all): fresh LoRA, {args.epochs:g} epoch(s), "
        f"lr {args.lr:g}, at most {args.batch_rows} rows per step, seed = the cell's seed",
        f"- eval: {args.n_eval} held-out rows of the domain (never seen by a selector or a setting): mean per-token loss "
        f"on the response tokens (as trained: at most {args.max_length} tokens per row), and {N_CHOICES}-way "
        "multiple-choice accuracy (the question with its true definition and 3 other eval rows' definitions, whole, "
        "scored by mean log-likelihood per choice token; `evaluation.choice_accuracy`)",
        f"- mean ± std over seeds {args.seeds}; the `all` rows average the domains per seed first. "
        "Δ = condition minus domain-only in the same cell (negative Δ loss = better). "
        f"Lift = the domain label's share among the N picks / its share of the pool ({ref_lift:.0%}; 1 = random). "
        "Selector s = wall seconds of the selector's whole `select` job per cell (input checks, read + tokenize, "
        "warm-up where the selector has one, its model passes, scoring, writing; ntk-mean: the ntk job plus its "
        "`score` job); train s = the fine-tune.",
        "",
        "| domain | condition | eval loss | Δ loss | accuracy | Δ accuracy | lift | selector s | train s | seeds |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for d in [*args.domains, "all"]:
        for c in ["base"] + CONDITIONS:
            cell = per[(d, c)]
            n_seeds = len(cell["loss"])
            if n_seeds == 0:
                continue
            loss, dloss = _mean_std(cell["loss"].values()), _mean_std(cell["dloss"].values())
            acc, dacc = _mean_std(cell["accuracy"].values()), _mean_std(cell["dacc"].values())
            lift = _mean_std(cell["lift"].values())
            sel_s = _mean_std(cell["sel_s"].values())
            train_s = _mean_std(cell["train_s"].values())
            name = "base model (no fine-tune)" if c == "base" else c
            row = [f"**{d}**" if d == "all" else d, name, _pm(*loss, ".4f"),
                   "-" if c == "domain-only" else _pm(*dloss, "+.4f"), _pm(*acc, ".3f"),
                   "-" if c == "domain-only" else _pm(*dacc, "+.3f"),
                   _pm(*lift, ".1f") if c in SELECTORS else "-",
                   f"{sel_s[0]:.1f}" if c in SELECTORS and np.isfinite(sel_s[0]) else "-",
                   f"{train_s[0]:.1f}" if np.isfinite(train_s[0]) else "-", str(n_seeds)]
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Head to head (eval loss, cells where the first is lower)", ""]
    lines += [f"- ntk vs {o}: {w} of {n}" for o in ["domain-only", "random", "bm25", "embedding", "less", "ntk-mean"]
              for w, n in [wins(cache, args, "ntk", o)] if n]
    lines += [f"- {o} vs domain-only: {w} of {n}" for o in ["random", "bm25", "embedding", "less", "ntk-mean"]
              for w, n in [wins(cache, args, o, "domain-only")] if n]
    parts = {}
    for r in cache.of_kind("selection"):
        for k, v in r.get("parts", {}).items():
            parts.setdefault((r["condition"], k), []).append(v)
    if parts:
        stages = ["setup", "read", "validate", "warmup", "embed", "coarse", "features", "score", "write"]
        lines += ["", "## Selector cost breakdown (mean wall seconds per cell, the jobs' `manifest.json` stage_seconds; "
                  "setup = input checks and executor start; ntk-mean: its score job only)", "",
                  "| selector | " + " | ".join(stages) + " |", "|---|" + "---:|" * len(stages)]
        for c in SELECTORS:
            if any(k[0] == c for k in parts):
                cols = [f"{np.mean(parts[(c, k)]):.1f}" if (c, k) in parts else "-" for k in stages]
                lines.append(f"| {c} | " + " | ".join(cols) + " |")
    lines += ["", f"Written {time.strftime('%Y-%m-%d %H:%M')}, {elapsed / 60:.0f} min into this invocation. "
              f"Cache: `{_rel(args.cache)}` (settings fingerprints: results {cache.fp_of('result', 'random')}, ntk results {cache.fp_of('result', 'ntk')}, "
              f"selections {cache.fp_of('selection', 'random')}, ntk selections {cache.fp_of('selection', 'ntk')}).", ""]
    text = "\n".join(lines)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return text


def write_plot(cache: Cache, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = summarize(cache, args)
    groups = [*args.domains, "all"]
    conds = SELECTORS
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    width = 0.8 / len(conds)
    colors = plt.get_cmap("tab10")
    for ax, metric, title in ((axes[0], "dloss", "eval loss − domain-only (lower is better)"),
                              (axes[1], "dacc", "accuracy − domain-only (higher is better)")):
        for j, c in enumerate(conds):
            means, stds = [], []
            for g in groups:
                m, sd = _mean_std(per[(g, c)][metric].values())
                means.append(m)
                stds.append(sd)
            xs = np.arange(len(groups)) + (j - (len(conds) - 1) / 2) * width
            ax.bar(xs, np.nan_to_num(means), width, yerr=np.nan_to_num(stds), capsize=2, label=c, color=colors(j))
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(np.arange(len(groups)))
        ax.set_xticklabels(groups, rotation=15)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, ncol=2)
    fig.suptitle(f"domain + N={args.budget} selected vs domain-only (n_domain={args.n_domain}, pool {args.n_pool}); "
                 f"mean ± std over seeds {args.seeds}", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    s = settings(args)
    cache = Cache(args.cache, s)
    args.out.mkdir(parents=True, exist_ok=True)
    clock = Clock()
    print(f"command: {command_line(args)}", flush=True)
    import torch

    threads_before = torch.get_num_threads()
    try:
        return _run(args, s, cache, clock)
    finally:
        torch.set_num_threads(threads_before)


def idle_share(seconds: float = 2.0) -> float:
    """Share of the machine's CPU time spent idle over the next ``seconds`` (Linux /proc/stat;
    elsewhere from the 1-minute load average)."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)  # idle + iowait, total

    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
        return (idle1 - idle0) / max(total1 - total0, 1)
    except OSError:
        cores = os.cpu_count() or 1
        return max(0.0, 1.0 - os.getloadavg()[0] / cores)


def pick_threads(requested: int) -> int:
    """``requested``, or for 0: every core when the machine is otherwise idle (measured while this
    process waits between cells), else 1."""
    if requested > 0:
        return requested
    return (os.cpu_count() or 1) if idle_share() > 0.85 else 1


def _run(args, s, cache, clock) -> int:
    import torch

    from ntk_ray.models import load_model, load_tokenizer

    base, tokenizer = None, None
    for domain in args.domains:
        for seed in args.seeds:
            if all(cache.get("result", domain, seed, c) for c in CONDITIONS) and cache.get("base", domain, seed, "base"):
                clock.log(f"{domain} seed {seed}: cached")
                continue
            if base is None:
                base = load_model(None)
                for p in base.parameters():
                    p.requires_grad_(False)
                tokenizer = load_tokenizer(None)
                clock.log("demo model loaded")
            threads = pick_threads(args.threads)
            torch.set_num_threads(threads)
            clock.log(f"{domain} seed {seed}: {threads} torch thread(s)")
            run_cell(domain, seed, args, base, tokenizer, cache, clock)
            write_markdown(cache, args, s, args.out / "selection.md", time.time() - clock.start)
            write_plot(cache, args, args.out / "selection.png")
    text = write_markdown(cache, args, s, args.out / "selection.md", time.time() - clock.start)
    write_plot(cache, args, args.out / "selection.png")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
