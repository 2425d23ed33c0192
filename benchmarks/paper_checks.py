"""The paper's own checks of NTK-Selector, on the bundled demo model and corpus (GitHub issue 4).

    .venv/bin/python benchmarks/paper_checks.py                      # all three sections, writes the results file
    .venv/bin/python benchmarks/paper_checks.py --sections 2         # one section
    .venv/bin/python benchmarks/paper_checks.py --smoke              # small sizes (a few minutes), prints only
    .venv/bin/python benchmarks/paper_checks.py --tiny --smoke       # a random tiny Llama (seconds; the tests)

Setting: SmolLM2-135M-Instruct (the bundled demo model) with a LoRA adapter (r=16, alpha=32 on
q/k/v/o: 1,843,200 parameters), trained with ``training.train_lora`` on ``--train-rows`` rows of one
demo domain (``--domain``, default noun.food) drawn by ``demo.make_demo_split``. The "mixed pool"
below is the split's pool reordered so that every 4th row is a domain row (25% domain rows in any
prefix of a multiple of 4), the rest other labels. Plain torch in one process, CPU.

1. **Kernel stability** (the paper: Frobenius cosine > 0.99 over 20 epochs). A fixed set of
   ``--stab-anchors`` domain training rows (the anchors) and ``--stab-pool`` mixed-pool rows. A
   fresh adapter (peft default: B = 0) is fine-tuned on the domain rows for ``--epochs`` epochs;
   checkpoint 0 is the fresh adapter, checkpoint i the adapter after epoch i (snapshots taken by
   ``train_lora``'s per-epoch log callback, so the optimiser state runs on across epochs). At
   every checkpoint the exact kernel Theta_i = G_i G_i^T of the fixed set, G_i the exact
   per-sample gradients of F (``FeatureComputer(projector="none")``). Reported: the Frobenius
   cosine <Theta_i, Theta_j>_F / (|Theta_i|_F |Theta_j|_F) between successive checkpoints, against
   checkpoint 0 (B = 0: only the B factors have gradients there, so it is a different kernel) and
   against checkpoint 1 (the first trained one); and what selection uses: Spearman rank
   correlation of the pool rows' mean-anchor scores (and of the cosine-normalised scores) between
   checkpoints, the top-k overlap, and the Pearson correlation of the off-diagonal entries of the
   cosine-normalised kernels (stricter than the Frobenius cosine, which a large shared component
   of all gradients inflates).
2. **Jacobian-free vs exact**. The exact multi-output NTK score
   Theta_exact(x, a) = sum_v <grad F_v(x), grad F_v(a)>, F_v(x) = mean over x's score positions of
   logit[t, v], against the Jacobian-free Theta_JF(x, a) = <grad sum_v F_v(x), grad sum_v F_v(a)>
   that the method uses. With logit[t, v] = h_t . W_v (+ b_v), F_v(x) = hbar(x) . W_v (+ b_v),
   hbar the mean final hidden state over the score positions, so
       Theta_exact(x, a) = sum_{i,j} (W^T W)_{ij} <grad hbar_i(x), grad hbar_j(a)>
                         = sum_k lambda_k <grad (hbar . e_k)(x), grad (hbar . e_k)(a)>
   over the eigenpairs (lambda_k, e_k) of W^T W (H x H): H backward passes instead of V (exact;
   ``tests/test_paper_checks.py`` checks it against the brute-force V-output sum on a tiny model).
   H = 576 backward passes are too slow on this CPU, and W^T W's spectrum is one large
   eigenvalue (about half the trace, close to the w_sum direction) and a flat tail (99% of the
   trace needs ~537 directions), so truncation does not pay. The estimate used: the top
   ``--jf-top`` eigen-directions exactly, plus a Hutchinson estimate of the tail with
   ``--jf-probes`` Rademacher probes u = sum_{k>m} sqrt(lambda_k) z_k e_k (E[u u^T] = the tail of
   W^T W, so the estimate is unbiased); confidence intervals by bootstrapping the probes.
   Per-sample gradients of hbar . u for all rows come from one forward pass (kept) and one
   backward pass per direction, with hooks on the LoRA factors (the same G^T A per-sample
   gradient as ``FeatureComputer``; checked against it on the JF direction). Rows are tokenized
   without the chat template at ``--jf-max-length`` (the SmolLM2 template's system prompt alone
   is ~35 tokens). Reported: Spearman and Pearson correlation between the exact and JF
   mean-over-anchors scores of the pool rows, the same for cosine-normalised scores, top-k overlap
   and the number of domain rows in each top-k.
3. **Projection vs d**. Exact mean scores by forward-mode JVP (``FeatureComputer.mean_gradient``
   over the anchors + ``mean_scores_jvp`` over the pool, no projection, no per-sample gradients)
   against projected scores psi(x) . psi_bar (psi_bar = mean anchor psi) for the projectors kron,
   sketch (when ``projection.py`` has it) and dense at ``--dims``, ``--seeds`` projection seeds
   (dense: ``--dense-seeds`` and only d <= ``--dense-max-dim``: it regenerates a 1.8M x d sign
   matrix per call, ~75 s at d = 8192 on this CPU). The projections are applied to the exact
   per-sample gradients (``projector.project_full``; ``FeatureComputer(projector=P).features``
   computes the same map, checked here for kron and sketch on the anchors). Reported: Spearman
   rank correlation and relative error |s_proj - s_exact| / |s_exact| vs d, the error in JL units
   (s_proj - s_exact) / (|g(x)| |g_bar|) against 1/sqrt(d), and the log-log slope of the relative
   error in d (a JL projection: -0.5).

Output: a Markdown report on stdout, written to ``--out`` (default
``benchmarks/results/paper_checks.md``; with ``--smoke`` or ``--tiny`` only when ``--out`` is
given), with the command at the top and the machine, load and elapsed time of each section.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if str(Path(__file__).resolve().parent) not in sys.path:  # _common, also when loaded by file path (tests)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import load_avg, log, machine_line, write_report  # noqa: E402
from ntk_ray.core.features import (  # noqa: E402
    FeatureComputer,
    backbone_and_head,
    lm_head_column_sum,
    pad_batch,
    summed_logit_objective,
    trainable_linears,
)

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "paper_checks.md"
SECTION_NAMES = {"1": "stability", "2": "jf", "3": "projection"}
SMOKE = {"epochs": 2, "warmup_epochs": 1, "train_rows": 8, "stab_anchors": 4, "stab_pool": 8, "jf_anchors": 4,
         "jf_pool": 8, "jf_top": 4, "jf_probes": 4, "jf_min_probes": 2, "proj_anchors": 4, "proj_pool": 8,
         "dims": [64, 256], "seeds": 1, "dense_max_dim": 256, "max_length": 48, "topk": 4, "bootstrap": 50}


# ---------------------------------------------------------------------------------------------
# small helpers
def rankdata(x) -> np.ndarray:
    """Ranks 0..n-1, ties given their average rank (scipy.stats.rankdata - 1)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def pearson(a, b) -> float:
    a = np.asarray(a, dtype=np.float64) - np.mean(a)
    b = np.asarray(b, dtype=np.float64) - np.mean(b)
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / den if den > 0 else float("nan")


def spearman(a, b) -> float:
    return pearson(rankdata(a), rankdata(b))


def top_set(scores, k: int) -> set[int]:
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    return set(order[:k].tolist())


def topk_overlap(a, b, k: int) -> float:
    k = min(k, len(a))
    return len(top_set(a, k) & top_set(b, k)) / k if k else float("nan")


def frobenius_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))


def gram64(g: torch.Tensor, chunk: int = 1 << 16) -> np.ndarray:
    """G G^T (N x N) in float64: float32 products over column chunks, summed in float64."""
    out = torch.zeros(g.shape[0], g.shape[0], dtype=torch.float64)
    for start in range(0, g.shape[1], chunk):
        part = g[:, start:start + chunk].float()
        out += (part @ part.T).double()
    return out.numpy()


def mean_scores(kernel: np.ndarray, anchors: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """s(x) = mean over anchors a of Theta(x, a), for the pool rows."""
    return kernel[np.ix_(pool, anchors)].mean(axis=1)


def cosine_scores(kernel: np.ndarray, anchors: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """Mean over anchors of Theta(x, a) / sqrt(Theta(x, x) Theta(a, a)) (LESS-style cosine)."""
    d = np.sqrt(np.clip(np.diag(kernel), 1e-300, None))
    return (kernel[np.ix_(pool, anchors)] / np.outer(d[pool], d[anchors])).mean(axis=1)


def cosine_kernel(kernel: np.ndarray) -> np.ndarray:
    d = np.sqrt(np.clip(np.diag(kernel), 1e-300, None))
    return kernel / np.outer(d, d)


def lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_state(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def state_norm(state: dict[str, torch.Tensor], only: str | None = None) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for n, t in state.items() if only is None or only in n))


def state_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((a[n].double() - b[n].double()).pow(2).sum()) for n in a))


def fmt(x: float, digits: int = 4) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


# ---------------------------------------------------------------------------------------------
# workloads: the demo model + bundled corpus, or a random tiny Llama with random token rows
@dataclass
class Rows:
    seqs: list[list[int]] = field(default_factory=list)
    score: list[list[int]] = field(default_factory=list)
    loss: list[list[int]] = field(default_factory=list)
    domain: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)

    def head(self, n: int) -> "Rows":
        if n > len(self):
            raise ValueError(f"{n} rows wanted, only {len(self)} available")
        return Rows(self.seqs[:n], self.score[:n], self.loss[:n], self.domain[:n])

    def __add__(self, other: "Rows") -> "Rows":
        return Rows(self.seqs + other.seqs, self.score + other.score, self.loss + other.loss,
                    self.domain + other.domain)

    def tokens(self) -> int:
        return sum(len(s) for s in self.seqs)


@dataclass
class Workload:
    model: object  # a peft model; its LoRA state is reset with load_state(model, init_state)
    init_state: dict
    train: Rows  # the domain rows: warm-up / fine-tuning data, anchors are their prefix
    pool: Rows  # the mixed pool (every 4th row a domain row)
    jf_train: Rows  # section 2's tokenization of the same rows (short, no chat template)
    jf_pool: Rows
    info: dict


def _tokenized(tokenizer, frame, max_length: int, domain_label: str, chat: bool | None) -> Rows:
    from ntk_ray.core.tokenize import tokenize_batch

    tok = tokenize_batch(tokenizer, prompts=frame["prompt"].to_list(), responses=frame["response"].to_list(),
                         max_length=max_length, use_chat_template=chat)
    labels = frame["label"].to_list()
    rows = Rows()
    for i, reason in enumerate(tok.reject):
        if reason is None:
            rows.seqs.append(tok.input_ids[i])
            rows.score.append(tok.score_mask[i])
            rows.loss.append(tok.loss_mask[i])
            rows.domain.append(labels[i] == domain_label)
    return rows


def demo_workload(args) -> Workload:
    import polars as pl

    from ntk_ray.demo import make_demo_split
    from ntk_ray.models import attach_lora, load_model, load_tokenizer

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        split = make_demo_split(tmp, domain_label=args.domain, n_domain=args.train_rows, n_eval=8, n_pool=600,
                                pool_domain_share=0.1, seed=args.seed)
        domain = pl.read_ndjson(split["domain_path"])
        pool = pl.read_parquet(split["pool_path"])
    in_domain = pool.filter(pl.col("label") == args.domain)
    other = pool.filter(pl.col("label") != args.domain)
    # every 4th row a domain row: 25% of any prefix whose length is a multiple of 4
    n_mixed = min(4 * in_domain.height, other.height + other.height // 3)
    order, d_i, o_i = [], 0, 0
    for i in range(n_mixed):
        if i % 4 == 0:
            order.append(("d", d_i))
            d_i += 1
        else:
            order.append(("o", o_i))
            o_i += 1
    mixed = pl.concat([in_domain[i:i + 1] if k == "d" else other[i:i + 1] for k, i in order])
    tokenizer = load_tokenizer(None)
    model = load_model(None)
    model = attach_lora(model, r=16, alpha=32, seed=args.seed)
    wl = Workload(
        model=model, init_state=lora_state(model),
        train=_tokenized(tokenizer, domain, args.max_length, args.domain, None),
        pool=_tokenized(tokenizer, mixed, args.max_length, args.domain, None),
        jf_train=_tokenized(tokenizer, domain, args.jf_max_length, args.domain, False),
        jf_pool=_tokenized(tokenizer, mixed, args.jf_max_length, args.domain, False),
        info={})
    n_lora = sum(t.numel() for t in wl.init_state.values())
    wl.info = {
        "model": f"SmolLM2-135M-Instruct (bundled demo model, converted GGUF Q4_1 -> float32); LoRA r=16, alpha=32 "
                 f"on q/k/v/o ({n_lora:,} parameters, seed {args.seed}); hidden size "
                 f"{model.get_base_model().config.hidden_size}, vocabulary {model.get_base_model().config.vocab_size:,}",
        "data": f"bundled WordNet corpus, `make_demo_split(domain_label={args.domain!r}, n_domain={args.train_rows}, "
                f"n_pool=600, pool_domain_share=0.1, seed={args.seed})`; mixed pool = its pool with every 4th row from "
                f"{args.domain}; sections 1 and 3: chat template, max_length {args.max_length}; section 2: no chat "
                f"template, max_length {args.jf_max_length}",
        "setup_s": time.perf_counter() - start,
    }
    return wl


def tiny_workload(args) -> Workload:
    """A random-weight 2-layer Llama (hidden 32, vocab 128, untied head) with LoRA r=4, and random
    token rows: "domain" rows use tokens 3..39, the other rows 40..127."""
    from ntk_ray.models import attach_lora, tiny_llama

    model = attach_lora(tiny_llama(seed=args.seed), r=4, alpha=8, seed=args.seed)
    rng = np.random.default_rng(args.seed)

    def rows(n: int, domain_every: int | None) -> Rows:
        out = Rows()
        for i in range(n):
            dom = domain_every is None or i % domain_every == 0
            lo, hi = (3, 40) if dom else (40, 128)
            p, r = int(rng.integers(3, 6)), int(rng.integers(3, 10))
            out.seqs.append(rng.integers(lo, hi, p + r).tolist())
            loss = [0] * p + [1] * r
            out.loss.append(loss)
            out.score.append(loss[1:] + [0])
            out.domain.append(dom)
        return out

    train = rows(max(args.train_rows, args.stab_anchors, args.jf_anchors, args.proj_anchors), None)
    pool = rows(max(args.stab_pool, args.jf_pool, args.proj_pool), 4)
    return Workload(model=model, init_state=lora_state(model), train=train, pool=pool, jf_train=train,
                    jf_pool=pool, info={"model": "random-weight tiny Llama (2 layers, hidden 32, vocab 128), LoRA r=4 "
                                                 "alpha=8 on q/k/v/o", "data": "random token rows", "setup_s": 0.0})


# ---------------------------------------------------------------------------------------------
# training with a snapshot after every epoch
def train_with_snapshots(model, rows: Rows, epochs: int, args) -> tuple[list[dict], list[float]]:
    """Snapshots [after epoch 0 (the state now), after epoch 1, ...] of one ``train_lora`` run
    (one optimiser over all epochs), and the per-epoch training losses."""
    from ntk_ray.core.training import TrainConfig, train_lora

    snapshots = [lora_state(model)]

    def on_epoch(msg: str) -> None:  # train_lora logs exactly once, at the end of each epoch
        snapshots.append(lora_state(model))
        log(msg.strip())

    cfg = TrainConfig(epochs=float(epochs), lr=args.lr, max_batch_rows=args.batch_rows, seed=args.seed)
    out = train_lora(model, rows.seqs, rows.loss, cfg, log=on_epoch)
    if len(snapshots) != epochs + 1:
        raise RuntimeError(f"expected {epochs} per-epoch log calls from train_lora, got {len(snapshots) - 1}")
    model.eval()
    return snapshots, list(out["epoch_loss"])


def exact_gradients(model, rows: Rows, max_tokens: int) -> tuple[torch.Tensor, FeatureComputer]:
    """(N, P) exact per-sample gradients g(x) = dF(x)/d theta_LoRA (projector 'none')."""
    fc = FeatureComputer(model, projector="none", compute_norm=False)
    return fc.features(rows.seqs, rows.score, max_tokens).feature, fc


# ---------------------------------------------------------------------------------------------
# section 1: kernel stability
def section_stability(wl: Workload, args, shared: dict) -> str:
    model = wl.model
    load_state(model, wl.init_state)
    anchors = wl.train.head(args.stab_anchors)
    pool = wl.pool.head(args.stab_pool)
    fixed = anchors + pool
    a_idx = np.arange(len(anchors))
    p_idx = np.arange(len(anchors), len(fixed))
    log(f"stability: training {args.epochs} epochs on {len(wl.train)} domain rows")
    t0 = time.perf_counter()
    snapshots, losses = train_with_snapshots(model, wl.train, args.epochs, args)
    train_s = time.perf_counter() - t0
    if args.warmup_epochs <= args.epochs:
        shared["warm_state"] = snapshots[args.warmup_epochs]
        shared["warm_note"] = f"the epoch-{args.warmup_epochs} checkpoint of section 1's fine-tuning run"
    kernels, grad_s = [], 0.0
    for i, state in enumerate(snapshots):
        load_state(model, state)
        t1 = time.perf_counter()
        g, _ = exact_gradients(model, fixed, args.max_tokens)
        kernels.append(gram64(g))
        grad_s += time.perf_counter() - t1
        del g
        log(f"stability: kernel at checkpoint {i}: trace {np.trace(kernels[-1]):.4g}")
    n = len(kernels)
    cos_f = np.array([[frobenius_cosine(kernels[i], kernels[j]) for j in range(n)] for i in range(n)])
    ms = [mean_scores(k, a_idx, p_idx) for k in kernels]
    cs = [cosine_scores(k, a_idx, p_idx) for k in kernels]
    off = ~np.eye(len(fixed), dtype=bool)
    ck = [cosine_kernel(k)[off] for k in kernels]
    k = args.topk
    dom = np.asarray(pool.domain)

    lines = [f"Fixed set: {len(anchors)} anchors (domain training rows) + {len(pool)} mixed-pool rows "
             f"({int(dom.sum())} of them domain rows), {fixed.tokens():,} tokens. Fine-tuning: `train_lora` on "
             f"{len(wl.train)} domain rows, lr {args.lr:g}, at most {args.batch_rows} rows per step, {args.epochs} "
             f"epochs in one run ({train_s:.0f} s); exact per-sample gradients at {n} checkpoints "
             f"({grad_s:.0f} s). Checkpoint 0 is the fresh adapter (B = 0: only the B factors have gradients, "
             "so Theta_0 is a kernel over the B gradients only); checkpoint i >= 1 the adapter after epoch i. "
             f"s = mean-anchor score of the {len(pool)} pool rows, cos-s = the cosine-normalised score; "
             f"top-{k} = overlap of the top-{k} pool rows; off-diag r = Pearson correlation of the off-diagonal "
             "entries of the cosine-normalised kernels.",
             "",
             "| checkpoint | train loss | \\|theta_i - theta_{i-1}\\| / \\|theta_i\\| | trace Theta_i | cos_F(i, i-1) | "
             "cos_F(i, 0) | cos_F(i, 1) | Spearman s: i vs i-1 | Spearman s: i vs 1 | Spearman cos-s: i vs 1 | "
             f"top-{k}: i vs 1 | off-diag r: i vs 1 | domain rows in top-{k} |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i in range(n):
        prev = i - 1
        step = state_distance(snapshots[i], snapshots[prev]) / max(state_norm(snapshots[i]), 1e-30) if i else float("nan")
        one = 1 if n > 1 else 0
        dom_top = int(dom[sorted(top_set(ms[i], k))].sum())
        lines.append(
            f"| {i} | {fmt(losses[i - 1]) if i else '-'} | {fmt(step)} | {np.trace(kernels[i]):.4g} | "
            f"{fmt(cos_f[i, prev]) if i else '-'} | {fmt(cos_f[i, 0])} | {fmt(cos_f[i, one]) if n > 1 else '-'} | "
            f"{fmt(spearman(ms[i], ms[prev])) if i else '-'} | {fmt(spearman(ms[i], ms[one]))} | "
            f"{fmt(spearman(cs[i], cs[one]))} | {fmt(topk_overlap(ms[i], ms[one], k), 3)} | "
            f"{fmt(pearson(ck[i], ck[one]))} | {dom_top} |")
    succ = [cos_f[i, i - 1] for i in range(2, n)]
    vs1 = [cos_f[i, 1] for i in range(2, n)]
    sp_succ = [spearman(ms[i], ms[i - 1]) for i in range(2, n)]
    sp_vs1 = [spearman(ms[i], ms[1]) for i in range(2, n)]
    summary = []
    if succ:
        summary.append(f"- trained checkpoints 1..{n - 1}: Frobenius cosine between successive checkpoints min "
                       f"{min(succ):.4f}, against checkpoint 1 min {min(vs1):.4f} (the paper: > 0.99 over 20 epochs); "
                       f"Spearman of the mean-anchor scores between successive checkpoints min {min(sp_succ):.4f}, "
                       f"against checkpoint 1 min {min(sp_vs1):.4f}")
    if n > 1:
        summary.append(f"- the fresh adapter (checkpoint 0, B = 0) against the trained ones: Frobenius cosine "
                       f"{min(cos_f[0, 1:]):.4f}..{max(cos_f[0, 1:]):.4f}, Spearman of the scores "
                       f"{min(spearman(ms[0], ms[i]) for i in range(1, n)):.4f}.."
                       f"{max(spearman(ms[0], ms[i]) for i in range(1, n)):.4f}")
        summary.append(f"- LoRA drift: |theta_{n - 1} - theta_1| / |theta_{n - 1}| = "
                       f"{state_distance(snapshots[-1], snapshots[1]) / max(state_norm(snapshots[-1]), 1e-30):.3f}; "
                       f"|B| {state_norm(snapshots[1], 'lora_B'):.3g} after epoch 1, "
                       f"{state_norm(snapshots[-1], 'lora_B'):.3g} after epoch {n - 1}; training loss "
                       f"{losses[0]:.3f} (epoch 1) -> {losses[-1]:.3f} (epoch {n - 1})")
    lines += [""] + summary + ["", "Frobenius cosine between all checkpoints:", "",
                               "| | " + " | ".join(str(j) for j in range(n)) + " |",
                               "|---:|" + "---:|" * n]
    for i in range(n):
        lines.append(f"| {i} | " + " | ".join(f"{cos_f[i, j]:.4f}" for j in range(n)) + " |")
    shared["stability"] = {"cos_f": cos_f, "spearman_succ": sp_succ, "spearman_vs1": sp_vs1}
    return "\n".join(lines)


def warm_model(wl: Workload, args, shared: dict):
    """The warmed-up adapter of sections 2 and 3 (section 1's checkpoint, or a fresh warm-up)."""
    if "warm_state" not in shared:
        load_state(wl.model, wl.init_state)
        log(f"warm-up: {args.warmup_epochs} epochs on {len(wl.train)} domain rows")
        snapshots, _ = train_with_snapshots(wl.model, wl.train, args.warmup_epochs, args)
        shared["warm_state"] = snapshots[-1]
        shared["warm_note"] = f"a {args.warmup_epochs}-epoch warm-up (same settings as section 1's run)"
    load_state(wl.model, shared["warm_state"])
    wl.model.eval()
    return wl.model


# ---------------------------------------------------------------------------------------------
# section 2: Jacobian-free vs exact multi-output NTK
class ProbeGradients:
    """Per-sample gradients of hbar(x) . u (hbar = the mean final hidden state over x's score
    positions) with respect to the LoRA factors, for any direction u in R^H: one forward pass
    over all rows (its graph kept), then one backward pass per direction. For a LoRA factor with
    inputs A (tokens x in) and output gradients G (tokens x out) the per-sample gradient is
    G^T A summed over the sample's tokens (as in ``FeatureComputer``). Columns in
    ``trainable_linears`` order, row-major per factor: the layout of projector 'none'."""

    def __init__(self, model, rows: Rows):
        self.backbone, _ = backbone_and_head(model)
        self.modules = [m for _, m in trainable_linears(model)]
        ids, self.attn, self.mask = pad_batch(rows.seqs, rows.score)
        self.inputs: list = [None] * len(self.modules)
        self.outputs: list = [None] * len(self.modules)

        def hook(i):
            def fn(module, args, output):
                self.inputs[i] = args[0].detach()
                self.outputs[i] = output
            return fn

        handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(self.modules)]
        try:
            with torch.enable_grad():
                self.hidden = self.backbone(input_ids=ids, attention_mask=self.attn).last_hidden_state
        finally:
            for h in handles:
                h.remove()
        self.used = [o is not None and o.requires_grad for o in self.outputs]

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        objective = summed_logit_objective(self.hidden, self.mask, u.float(), torch.zeros(()))
        targets = [o for o, ok in zip(self.outputs, self.used) if ok]
        grads = iter(torch.autograd.grad(objective.sum(), targets, retain_graph=True, allow_unused=True))
        token = self.attn.unsqueeze(-1).float()
        parts = []
        for m, a, ok in zip(self.modules, self.inputs, self.used):
            g = next(grads) if ok else None
            if g is None:
                parts.append(torch.zeros(self.attn.shape[0], m.out_features * m.in_features))
            else:
                parts.append(torch.bmm((g.float() * token).transpose(1, 2), a.float()).flatten(1))
        return torch.cat(parts, dim=1)


def head_spectrum(model) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Eigenvalues (descending, >= 0) and eigenvectors (columns) of W^T W for the LM head W
    (V x H), w_sum = sum_v W_v, and V."""
    _, head = backbone_and_head(model)
    w = head.weight.detach().double()
    evals, evecs = torch.linalg.eigh(w.T @ w)
    evals, evecs = evals.flip(0).clamp(min=0), evecs.flip(1)
    return evals.numpy(), evecs.numpy(), lm_head_column_sum(head)[0].double().numpy(), w.shape[0]


def exact_kernel_parts(model, rows: Rows, top: int, probes: int, seed: int, budget_s: float | None = None,
                       min_probes: int = 0) -> dict:
    """The exact multi-output kernel sum_v <grad F_v(x), grad F_v(a)> over ``rows``, as
    per-direction Gram matrices: the top ``top`` eigen-directions of W^T W exactly
    (sqrt(lambda_k) e_k), and ``probes`` Rademacher probes of the tail (sum_{k > top}
    sqrt(lambda_k) z_k e_k, unbiased for the tail). With top >= H the kernel is exact and no probe
    is drawn. ``budget_s`` stops the tail probes early (after at least ``min_probes``).
    Also the JF Gram (direction w_sum) and its per-sample gradients' agreement with
    ``FeatureComputer``."""
    evals, evecs, w_sum, vocab = head_spectrum(model)
    h = len(evals)
    top = min(top, h)
    start = time.perf_counter()
    pg = ProbeGradients(model, rows)
    forward_s = time.perf_counter() - start
    t0 = time.perf_counter()
    g_jf = pg(torch.from_numpy(w_sum).float())
    one_backward_s = time.perf_counter() - t0
    jf = gram64(g_jf)
    top_grams = []
    for k in range(top):
        u = torch.from_numpy(math.sqrt(evals[k]) * evecs[:, k]).float()
        top_grams.append(gram64(pg(u)))
    tail_grams = []
    if top < h:
        tail = evecs[:, top:] * np.sqrt(evals[top:])[None, :]
        for j in range(probes):
            if budget_s is not None and j >= min_probes and time.perf_counter() - start > budget_s:
                log(f"jf: time budget {budget_s:.0f} s reached after {j} tail probes")
                break
            z = np.random.default_rng([seed, j, 0x7A11]).integers(0, 2, h - top) * 2.0 - 1.0
            tail_grams.append(gram64(pg(torch.from_numpy(tail @ z).float())))
            if (j + 1) % 8 == 0:
                log(f"jf: {j + 1} tail probes ({time.perf_counter() - start:.0f} s)")
    return {"evals": evals, "evecs": evecs, "w_sum": w_sum, "top": top, "jf": jf, "g_jf": g_jf,
            "top_grams": top_grams, "tail_grams": tail_grams, "seconds": time.perf_counter() - start,
            "forward_s": forward_s, "backward_s": one_backward_s, "h": h, "vocab": vocab}


def assemble(parts: dict, tail_index=None) -> np.ndarray:
    """Exact-kernel estimate: sum of the top Grams + the mean of the (resampled) tail Grams."""
    kernel = np.sum(parts["top_grams"], axis=0) if parts["top_grams"] else np.zeros_like(parts["jf"])
    tail = parts["tail_grams"]
    if tail:
        idx = np.arange(len(tail)) if tail_index is None else tail_index
        kernel = kernel + np.mean([tail[i] for i in idx], axis=0)
    return kernel


def jf_statistics(exact: np.ndarray, jf: np.ndarray, a_idx, p_idx, k: int, domain: np.ndarray) -> dict:
    ex_m, jf_m = mean_scores(exact, a_idx, p_idx), mean_scores(jf, a_idx, p_idx)
    ex_c, jf_c = cosine_scores(exact, a_idx, p_idx), cosine_scores(jf, a_idx, p_idx)
    return {"spearman": spearman(ex_m, jf_m), "pearson": pearson(ex_m, jf_m), "topk": topk_overlap(ex_m, jf_m, k),
            "cos_spearman": spearman(ex_c, jf_c), "cos_pearson": pearson(ex_c, jf_c),
            "cos_topk": topk_overlap(ex_c, jf_c, k),
            "dom_exact": int(domain[sorted(top_set(ex_m, k))].sum()), "dom_jf": int(domain[sorted(top_set(jf_m, k))].sum()),
            "dom_exact_cos": int(domain[sorted(top_set(ex_c, k))].sum()),
            "dom_jf_cos": int(domain[sorted(top_set(jf_c, k))].sum()),
            "frobenius": frobenius_cosine(exact, jf)}


def section_jf(wl: Workload, args, shared: dict) -> str:
    model = warm_model(wl, args, shared)
    anchors = wl.jf_train.head(args.jf_anchors)
    pool = wl.jf_pool.head(args.jf_pool)
    rows = anchors + pool
    a_idx, p_idx = np.arange(len(anchors)), np.arange(len(anchors), len(rows))
    domain = np.asarray(pool.domain)
    log(f"jf: {len(rows)} rows, {rows.tokens()} tokens; top {args.jf_top} directions + up to {args.jf_probes} probes")
    parts = exact_kernel_parts(model, rows, args.jf_top, args.jf_probes, args.seed, args.jf_budget, args.jf_min_probes)
    # the probe machinery against FeatureComputer on the JF direction
    g_fc, _ = exact_gradients(model, rows, args.max_tokens)
    check = float((parts["g_jf"] - g_fc).norm() / g_fc.norm())
    del g_fc
    evals, evecs, w_sum, top, h = parts["evals"], parts["evecs"], parts["w_sum"], parts["top"], parts["h"]
    trace = evals.sum()
    covered = evals[:top].sum() / trace
    n_probes = len(parts["tail_grams"])
    exact = assemble(parts)
    stats = jf_statistics(exact, parts["jf"], a_idx, p_idx, args.topk, domain)
    rng = np.random.default_rng([args.seed, 0xB007])
    boot = []
    if n_probes > 1:
        for _ in range(args.bootstrap):
            boot.append(jf_statistics(assemble(parts, rng.integers(0, n_probes, n_probes)), parts["jf"], a_idx, p_idx,
                                      args.topk, domain))

    def ci(key: str, digits: int = 4) -> str:
        if not boot:
            return fmt(stats[key], digits)
        lo, hi = np.percentile([b[key] for b in boot], [2.5, 97.5])
        return f"{stats[key]:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"

    # truncations (no tail): how much the tail matters
    trunc = {}
    for m in sorted({1, top}):
        if m <= top and parts["top_grams"]:
            trunc[m] = np.sum(parts["top_grams"][:m], axis=0)
    ex_m = mean_scores(exact, a_idx, p_idx)
    # per-row relative standard error of the exact mean scores from the probe spread
    if n_probes > 1:
        per_probe = np.stack([mean_scores(g, a_idx, p_idx) for g in parts["tail_grams"]])
        se = per_probe.std(axis=0, ddof=1) / math.sqrt(n_probes)
        rel_se = np.median(se / np.abs(ex_m))
    else:
        rel_se = float("nan")
    tail_share = float(np.mean([mean_scores(g, a_idx, p_idx) for g in parts["tail_grams"]], axis=0).mean() /
                       ex_m.mean()) if n_probes else 0.0
    u1 = evecs[:, 0]
    cos_wsum = abs(float(u1 @ w_sum) / np.linalg.norm(w_sum))
    mean_dir_share = float(w_sum @ w_sum) / parts["vocab"] / trace
    k = args.topk
    lines = [f"{len(anchors)} anchors (domain training rows) + {len(pool)} mixed-pool rows ({int(domain.sum())} domain "
             f"rows), {rows.tokens()} tokens, warmed-up adapter = {shared['warm_note']}. W^T W (H = {h}): the top "
             f"eigenvalue holds {evals[0] / trace:.1%} of the trace, its eigenvector has |cos| {cos_wsum:.3f} with "
             f"w_sum (the JF direction; |w_sum|^2 / V = {mean_dir_share:.1%} of the trace); 99% of the trace needs "
             f"{int(np.searchsorted(np.cumsum(evals) / trace, 0.99)) + 1} of {h} directions. Exact-kernel estimate: "
             f"the top {top} eigen-directions exactly ({covered:.1%} of the trace) + {n_probes} Rademacher probes of "
             f"the remaining {h - top} (unbiased); {top + n_probes + 1} backward passes over all rows after one "
             f"forward ({parts['forward_s']:.1f} s forward, {parts['backward_s']:.1f} s per backward, "
             f"{parts['seconds']:.0f} s in all; all {h} directions would take ~{h * parts['backward_s'] / 60:.0f} min). "
             f"Brackets: 95% bootstrap intervals over the tail probes ({len(boot)} resamples). The tail holds "
             f"{tail_share:.1%} of the mean exact score; median relative standard error of a pool row's exact mean "
             f"score from the probes {fmt(rel_se, 3)}. Check: the probe machinery's JF per-sample gradients against "
             f"`FeatureComputer(projector='none')`: relative difference {check:.2e}.",
             "",
             "| scores (pool rows) | Spearman exact vs JF | Pearson exact vs JF | "
             f"top-{k} overlap | domain rows in top-{k}: exact / JF |",
             "|---|---:|---:|---:|---:|",
             f"| mean over anchors (the paper's) | {ci('spearman')} | {ci('pearson')} | {ci('topk', 3)} | "
             f"{stats['dom_exact']} / {stats['dom_jf']} |",
             f"| cosine-normalised, mean over anchors | {ci('cos_spearman')} | {ci('cos_pearson')} | {ci('cos_topk', 3)} | "
             f"{stats['dom_exact_cos']} / {stats['dom_jf_cos']} |",
             "",
             f"- Frobenius cosine of the whole {len(rows)} x {len(rows)} kernels, exact vs JF: {ci('frobenius')}"]
    for m, kern in trunc.items():
        st = jf_statistics(kern, parts["jf"], a_idx, p_idx, k, domain)
        st_ex = jf_statistics(kern, exact, a_idx, p_idx, k, domain)
        lines.append(f"- truncated to the top {m} eigen-direction{'s' if m > 1 else ''} ({evals[:m].sum() / trace:.1%} of "
                     f"the trace, no tail): Spearman of the mean scores with JF {st['spearman']:.4f}, with the exact "
                     f"estimate {st_ex['spearman']:.4f} (cosine-normalised: {st['cos_spearman']:.4f} / "
                     f"{st_ex['cos_spearman']:.4f})")
    shared["jf"] = stats
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# section 3: projection vs d
def section_projection(wl: Workload, args, shared: dict) -> str:
    from ntk_ray.core import projection

    model = warm_model(wl, args, shared)
    anchors = wl.train.head(args.proj_anchors)
    pool = wl.pool.head(args.proj_pool)
    rows = anchors + pool
    na = len(anchors)
    a_idx, p_idx = np.arange(na), np.arange(na, len(rows))
    fc = FeatureComputer(model, projector="none", compute_norm=False)
    t0 = time.perf_counter()
    g_bar = fc.mean_gradient(anchors.seqs, anchors.score, args.max_tokens)
    s_exact = fc.mean_scores_jvp(pool.seqs, pool.score, g_bar, args.max_tokens).double().numpy()
    jvp_s = time.perf_counter() - t0
    log(f"projection: exact JVP mean scores in {jvp_s:.0f} s")
    t0 = time.perf_counter()
    g = fc.features(rows.seqs, rows.score, args.max_tokens).feature
    grad_s = time.perf_counter() - t0
    g_bar_flat = torch.cat([t.flatten() for t in g_bar]).double()
    s_grad = (g[na:].double() @ g_bar_flat).numpy()
    jvp_vs_grad = float(np.linalg.norm(s_grad - s_exact) / np.linalg.norm(s_exact))
    mean_vs_gbar = float((g[:na].double().mean(0) - g_bar_flat).norm() / g_bar_flat.norm())
    norms = g[na:].double().norm(dim=1).numpy()
    gbar_norm = float(g_bar_flat.norm())
    kernel = gram64(g)
    c_exact = cosine_scores(kernel, a_idx, p_idx)
    sizes = [s.numel for s in fc.shapes]
    full = [part.reshape(-1, s.out_features, s.in_features) for part, s in zip(g.split(sizes, dim=1), fc.shapes)]
    kinds = [k for k in ("kron", "sketch", "dense") if k in projection.PROJECTORS]
    results = []
    for kind in kinds:
        for d in args.dims:
            if kind == "dense" and d > args.dense_max_dim:
                continue
            seeds = args.dense_seeds if kind == "dense" else args.seeds
            per = []
            t1 = time.perf_counter()
            for seed in range(seeds):
                proj = projection.make_projector(kind, fc.shapes, d, seed)
                psi = proj.project_full(full).double()
                psi_bar = psi[:na].mean(0)
                s = (psi[na:] @ psi_bar).numpy()
                pk = (psi @ psi.T).numpy()
                c = cosine_scores(pk, a_idx, p_idx)
                per.append({"dim": proj.dim, "spearman": spearman(s, s_exact), "pearson": pearson(s, s_exact),
                            "rel": float(np.linalg.norm(s - s_exact) / np.linalg.norm(s_exact)),
                            "jl": float(np.sqrt(np.mean(((s - s_exact) / (norms * gbar_norm)) ** 2))),
                            "topk": topk_overlap(s, s_exact, args.topk), "cos_spearman": spearman(c, c_exact)})
            seconds = (time.perf_counter() - t1) / seeds
            agg = {key: (float(np.mean([p[key] for p in per])), float(np.std([p[key] for p in per])))
                   for key in per[0] if key != "dim"}
            results.append({"kind": kind, "d": per[0]["dim"], "requested": d, "seeds": seeds, "seconds": seconds, **agg})
            log(f"projection: {kind} d={per[0]['dim']}: Spearman {agg['spearman'][0]:.4f}, rel error {agg['rel'][0]:.4f} "
                f"({seconds:.1f} s per seed)")
    # the library's feature path computes the same map (kron and sketch, one d, the anchors)
    path_checks = []
    for kind in ("kron", "sketch"):
        if kind not in kinds:
            continue
        d = max(args.dims)
        f_path = FeatureComputer(model, projector=kind, dim=d, seed=0, compute_norm=False).features(
            anchors.seqs, anchors.score, args.max_tokens).feature.double()
        f_full = projection.make_projector(kind, fc.shapes, d, 0).project_full([f[:na] for f in full]).double()
        path_checks.append(f"{kind} d={d}: {float((f_path - f_full).norm() / f_full.norm()):.1e}")
    slopes = []
    for kind in kinds:
        pts = [(r["d"], r["rel"][0]) for r in results if r["kind"] == kind and r["rel"][0] > 0]
        if len(pts) >= 2:
            x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
            slopes.append(f"{kind} {np.polyfit(x, y, 1)[0]:+.2f}")
    lines = [f"{na} anchors (domain training rows) + {len(pool)} mixed-pool rows ({int(np.sum(pool.domain))} domain rows), "
             f"{rows.tokens():,} tokens; warmed-up adapter = {shared['warm_note']}. Exact mean scores by JVP "
             f"(`mean_gradient` + `mean_scores_jvp`) in {jvp_s:.0f} s; exact per-sample gradients of all rows "
             f"(projector 'none', {g.shape[1]:,} parameters) in {grad_s:.0f} s, projected by each projector's "
             f"`project_full`. Checks: JVP scores vs <g(x), g_bar> from the per-sample gradients: relative difference "
             f"{jvp_vs_grad:.1e}; mean anchor gradient vs `mean_gradient`: {mean_vs_gbar:.1e}; "
             f"`FeatureComputer(projector=P).features` vs `project_full` on the anchors: "
             f"{'; '.join(path_checks) or '-'}. Columns: mean (± std over seeds); rel err = "
             "|s_proj - s_exact| / |s_exact| over the pool rows; JL err = rms of (s_proj - s_exact) / (|g(x)| |g_bar|) "
             f"(a dense +-1/sqrt(d) projection: about sqrt((1 + cos^2) / d)); top-{args.topk} = overlap with the exact "
             "top rows; cos Spearman = the cosine-normalised scores against exact ones. Dense: "
             f"{args.dense_seeds} seed(s), only d <= {args.dense_max_dim} (it regenerates a {g.shape[1]:,} x d sign "
             "matrix per call; s = seconds per seed to project all rows)."
             + ("" if "sketch" in kinds else " The sketch projector is not in this checkout's projection.py."),
             "",
             f"| d | projector | seeds | Spearman | Pearson | rel err | JL err | 1/sqrt(d) | top-{args.topk} | "
             "cos Spearman | s |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(results, key=lambda r: (r["requested"], kinds.index(r["kind"]))):
        def pm(key, digits=4):
            m, s = r[key]
            return f"{m:.{digits}f} ± {s:.{digits}f}" if r["seeds"] > 1 else f"{m:.{digits}f}"
        lines.append(f"| {r['d']} | {r['kind']} | {r['seeds']} | {pm('spearman')} | {pm('pearson')} | {pm('rel')} | "
                     f"{pm('jl')} | {1 / math.sqrt(r['d']):.4f} | {pm('topk', 3)} | {pm('cos_spearman')} | "
                     f"{r['seconds']:.1f} |")
    if slopes:
        lines += ["", f"- log-log slope of the relative error in d (1/sqrt(d): -0.50): {', '.join(slopes)}"]
    shared["projection"] = results
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
SECTIONS = {"stability": ("1. Kernel stability over fine-tuning", section_stability),
            "jf": ("2. Jacobian-free vs exact multi-output NTK scores", section_jf),
            "projection": ("3. Projection vs d", section_projection)}


def parse_sections(text: str) -> list[str]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        name = SECTION_NAMES.get(part, part)
        if name not in SECTIONS:
            raise argparse.ArgumentTypeError(f"unknown section {part!r} (1/stability, 2/jf, 3/projection)")
        if name not in out:
            out.append(name)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", type=parse_sections, default=list(SECTIONS), help="comma-separated: 1,2,3 or "
                   "stability,jf,projection (default all)")
    p.add_argument("--domain", default="noun.food", help="demo domain label (default noun.food)")
    p.add_argument("--epochs", type=int, default=8, help="section 1: fine-tuning epochs (default 8)")
    p.add_argument("--warmup-epochs", type=int, default=2, help="epochs of the warmed-up adapter of sections 2-3 (default 2)")
    p.add_argument("--max-length", type=int, default=64, help="token limit per row, sections 1 and 3 (default 64)")
    p.add_argument("--jf-max-length", type=int, default=32, help="token limit per row, section 2 (no chat template; default 32)")
    p.add_argument("--train-rows", type=int, default=32, help="domain rows to fine-tune on (default 32)")
    p.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate (default 1e-4)")
    p.add_argument("--batch-rows", type=int, default=4, help="rows per fine-tuning step (default 4)")
    p.add_argument("--stab-anchors", type=int, default=16)
    p.add_argument("--stab-pool", type=int, default=32)
    p.add_argument("--jf-anchors", type=int, default=8)
    p.add_argument("--jf-pool", type=int, default=32)
    p.add_argument("--jf-top", type=int, default=8, help="section 2: eigen-directions of W^T W taken exactly (default 8)")
    p.add_argument("--jf-probes", type=int, default=48, help="section 2: Rademacher probes of the tail (default 48)")
    p.add_argument("--jf-min-probes", type=int, default=8)
    p.add_argument("--jf-budget", type=float, default=240.0, help="section 2: seconds after which no more tail probes "
                   "are started (default 240; at least --jf-min-probes)")
    p.add_argument("--bootstrap", type=int, default=400, help="section 2: bootstrap resamples of the probes")
    p.add_argument("--proj-anchors", type=int, default=16)
    p.add_argument("--proj-pool", type=int, default=64)
    p.add_argument("--dims", type=lambda s: [int(v) for v in s.split(",")], default=[256, 1024, 4096, 8192])
    p.add_argument("--seeds", type=int, default=3, help="section 3: projection seeds (kron, sketch; default 3)")
    p.add_argument("--dense-seeds", type=int, default=1)
    p.add_argument("--dense-max-dim", type=int, default=4096, help="section 3: largest d for the dense projector (default 4096)")
    p.add_argument("--topk", type=int, default=8, help="k of the top-k overlaps (default 8)")
    p.add_argument("--max-tokens", type=int, default=8192, help="padded tokens per feature batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores when the machine is "
                   "idle, 1 when other jobs keep its cores busy: on a shared 2-core machine two threads that wait "
                   "for each other were measured 4x slower than one)")
    p.add_argument("--smoke", action="store_true", help="small sizes: " + ", ".join(f"{k}={v}" for k, v in SMOKE.items()))
    p.add_argument("--tiny", action="store_true", help="a random tiny Llama and random token rows instead of the demo "
                   "model (tests)")
    p.add_argument("--out", type=Path, default=None, help=f"report file (default {DEFAULT_OUT.relative_to(ROOT)}; with "
                   "--smoke/--tiny: none)")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.smoke:
        defaults = build_parser().parse_args([])
        for key, value in SMOKE.items():
            if getattr(args, key) == getattr(defaults, key):  # explicit flags win
                setattr(args, key, value)
    if args.tiny and args.lr == 1e-4:
        args.lr = 1e-2
    out = args.out if args.out is not None else (None if (args.smoke or args.tiny) else DEFAULT_OUT)
    started = time.perf_counter()
    load_start = load_avg()
    cores = os.cpu_count() or 1
    threads = args.threads or (1 if load_start > cores - 0.5 else cores)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(args, argv, out, started, load_start, cores)
    finally:
        torch.set_num_threads(threads_before)


def _run(args, argv, out, started, load_start, cores) -> int:
    wl = tiny_workload(args) if args.tiny else demo_workload(args)
    log(f"workload ready in {wl.info['setup_s']:.0f} s: {len(wl.train)} train rows, {len(wl.pool)} pool rows")
    shared: dict = {}
    body, timing = [], []
    for name in args.sections:
        title, fn = SECTIONS[name]
        t0, l0 = time.perf_counter(), load_avg()
        log(f"section {title}")
        text = fn(wl, args, shared)
        dt = time.perf_counter() - t0
        timing.append(f"{title.split('. ', 1)[0]}: {dt:.0f} s (load {l0:.1f} -> {load_avg():.1f})")
        body += ["", f"## {title}", "", f"_{dt:.0f} s, 1-minute load average {l0:.1f} at the start, "
                 f"{load_avg():.1f} at the end._", "", text]
        print(f"\n## {title} ({dt:.0f} s)\n\n{text}", file=sys.stderr, flush=True)
    total = time.perf_counter() - started
    mach = machine_line(cpu=platform.machine(), cores=cores, singular=True, python=True,
                        thread_note="" if args.threads else ", chosen from the load at the start")
    command = ".venv/bin/python benchmarks/paper_checks.py" + ("" if not argv else " " + shlex.join(argv))
    head = [f"# The paper's own checks (`benchmarks/paper_checks.py`, {time.strftime('%Y-%m-%d')})", "",
            f"- command: `{command}`",
            f"- machine: {mach}; shared with other jobs: 1-minute load average {load_start:.1f} at the start, "
            f"{load_avg():.1f} at the end",
            f"- model: {wl.info['model']}", f"- data: {wl.info['data']}",
            f"- time: {total:.0f} s in all (setup {wl.info['setup_s']:.0f} s; " + "; ".join(timing) + ")",
            "- what each section does and why: the docstring of `benchmarks/paper_checks.py`"]
    write_report("\n".join(head + body) + "\n", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
