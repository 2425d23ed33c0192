"""Feature-path benchmark: ntk-ray's NTK features against a LESS-style loop and the plain floor.

    .venv/bin/python benchmarks/bench_features.py                      # demo model, writes the table
    .venv/bin/python benchmarks/bench_features.py --samples 16 --quick # a quick look
    .venv/bin/python benchmarks/bench_features.py --random-arch --device cuda --bf16   # GPU, bf16 weights (bench_features_gpu.sh)

Every row runs on the same model, the same samples and the same machine, in this one process,
so the ratios are measured side by side (absolute rates on a shared machine are noisy; the
``load`` column is the 1-minute load average when the row finished). Rows:

  LESS-style   batch size 1, plain autograd of F(x) through the full-vocabulary logits
               (``reference.reference_gradient``), the full flattened LoRA gradient, projected
               every 16 samples with ``projection.DenseProjector`` (a seeded Rademacher matrix
               regenerated block by block, as TRAK's basic projector does).
  floor        one batched forward + backward of sum_b F(x_b) w.r.t. the LoRA weights, no
               per-sample work; through the logits, and with the LM-head column-sum.
  ntk-ray      ``FeatureComputer(model, projector=P, dim=d).features(seqs, masks, max_tokens)``
               for P = kron (default), sketch (CountSketch of the per-sample gradients), none
               (exact per-sample gradients), dense (slow: fewer samples); and the exact JVP
               mean scores (``mean_gradient`` over anchors + ``mean_scores_jvp`` over the samples).
  whole        model load + LoRA + tokenizer + tokenize + FeatureComputer + kron features, and
               the ``ntk-ray features`` CLI (a fresh process with an embedded Ray) when present.

Then the kernel scoring stage (``scoring.AnchorKernel(...).score`` + argpartition top-k against
bare numpy on the same random pool features, as float32 in memory and as stored in float16) and the projection error of kron, sketch and
dense against exact inner products of real demo-model gradients. Results: a Markdown report printed
and written to ``--out`` (default ``benchmarks/results/features_cpu.md``; ``features_gpu.md``
with ``--device cuda``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if str(Path(__file__).resolve().parent) not in sys.path:  # _common, also when loaded by file path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import load_avg as load, log, machine_line, write_report  # noqa: E402
from ntk_ray.core.features import FeatureComputer, pad_batch, summed_logit_objective  # noqa: E402
from ntk_ray.core.projection import DenseProjector, KronProjector, SketchProjector  # noqa: E402

LESS_EVERY = 16  # LESS-style: project the collected gradients every 16 samples


# ---------------------------------------------------------------------------------------------
# helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


LAST_CPU = [0.0]  # process CPU seconds of the last ``timed`` call (all threads)


def timed(fn, device: torch.device) -> tuple[float, object]:
    sync(device)
    cpu, start = time.process_time(), time.perf_counter()
    out = fn()
    sync(device)
    LAST_CPU[0] = time.process_time() - cpu
    return time.perf_counter() - start, out


def best_of(fn, device, repeats: int) -> tuple[float, object]:
    """Shortest wall time of ``repeats`` runs (the least disturbed by other load)."""
    best, out = math.inf, None
    for _ in range(max(repeats, 1)):
        dt, out = timed(fn, device)
        best = min(best, dt)
    return best, out


def autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# workloads
def randomise_lora_b(model, std: float, seed: int) -> None:
    """A stand-in for a warmed-up adapter: B ~ N(0, std^2) (peft's fresh B = 0 gives the A
    factors no gradient). Speed does not depend on it; the projection-error study does."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def demo_workload(args, device):
    """The demo model with a LoRA adapter and tokenized rows of the bundled corpus."""
    from ntk_ray.demo import load_corpus
    from ntk_ray.models import attach_lora, load_model, load_tokenizer
    from ntk_ray.core.tokenize import tokenize_batch

    start = time.perf_counter()
    model = load_model(args.model, device=device, dtype=torch.bfloat16 if args.bf16 else torch.float32)
    model = attach_lora(model, r=16, alpha=32, seed=args.seed)  # LoRA weights float32, as in the product
    randomise_lora_b(model, args.lora_b_std, args.seed)
    model.to(device)
    tokenizer = load_tokenizer(args.model)
    n_rows = max(args.samples, args.less_samples, args.dense_samples, args.error_samples) + args.anchors
    rows = load_corpus().sample(n_rows, seed=args.seed, shuffle=True)
    tok = tokenize_batch(tokenizer, prompts=rows["prompt"].to_list(), responses=rows["response"].to_list(),
                         max_length=args.max_length)
    setup = time.perf_counter() - start
    keep = [i for i, r in enumerate(tok.reject) if r is None]
    seqs = [tok.input_ids[i] for i in keep]
    masks = [tok.score_mask[i] for i in keep]
    rows = rows[keep]
    info = {"model": (f"{args.model} (--model)" if args.model else
                      "SmolLM2-135M-Instruct (bundled demo model, converted GGUF Q4_1 -> float32)"),
            "data": f"bundled WordNet corpus, {len(seqs)} random rows (seed {args.seed}), chat template, "
                    f"max_length {args.max_length}"}
    return model, seqs, masks, rows, setup, info


def random_arch_workload(args, device):
    """A 0.5B-1B Llama built from its config with random weights (no download) and random
    token rows: lengths uniform in [max_length/2, max_length], the last 2/3 scored."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ntk_ray.models import attach_lora

    start = time.perf_counter()
    cfg = LlamaConfig(vocab_size=args.arch_vocab, hidden_size=args.arch_hidden, intermediate_size=args.arch_intermediate,
                      num_hidden_layers=args.arch_layers, num_attention_heads=args.arch_heads,
                      num_key_value_heads=args.arch_kv_heads, max_position_embeddings=max(2048, args.max_length),
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    if args.bf16:  # the weights in bfloat16, as `--dtype bfloat16` loads them (no autocast)
        model = model.to(torch.bfloat16)
    model = attach_lora(model.eval(), r=16, alpha=32, seed=args.seed)
    randomise_lora_b(model, args.lora_b_std, args.seed)
    model.to(device)
    setup = time.perf_counter() - start
    n_rows = max(args.samples, args.less_samples, args.dense_samples, args.error_samples) + args.anchors
    rng = np.random.default_rng(args.seed)
    seqs, masks = [], []
    for _ in range(n_rows):
        length = int(rng.integers(max(args.max_length // 2, 2), args.max_length + 1))
        prompt = max(1, length // 3)
        seqs.append(rng.integers(3, args.arch_vocab, length).tolist())
        masks.append([0] * (prompt - 1) + [1] * (length - prompt) + [0])
    n_params = sum(p.numel() for p in model.parameters())
    info = {"model": f"random-weight Llama ({n_params / 1e9:.2f}B parameters: hidden {args.arch_hidden}, "
                     f"{args.arch_layers} layers, intermediate {args.arch_intermediate}, {args.arch_heads} heads, "
                     f"{args.arch_kv_heads} kv heads, vocab {args.arch_vocab}, tied head)",
            "data": f"{n_rows} random-token rows, lengths {max(args.max_length // 2, 2)}..{args.max_length}, last 2/3 scored"}
    return model, seqs, masks, None, setup, info


# ---------------------------------------------------------------------------------------------
# the rows
def less_style(model, seqs, masks, dim, seed, device, dtype):
    """Batch size 1, full-vocabulary logits, plain autograd, the flattened LoRA gradient, dense
    projection of every 16 collected gradients (blocks regenerated each time)."""
    from ntk_ray.core.features import module_shapes, trainable_linears
    from ntk_ray.reference import reference_gradient

    projector = DenseProjector(module_shapes(model), dim, seed)
    params = [m.weight for _, m in trainable_linears(model)]

    def gradient(ids, mask):
        if device.type == "cpu" and dtype is None:
            return reference_gradient(model, ids, mask)
        # reference_gradient on another device / under autocast: the same computation
        with autocast(device, dtype):
            logits = model(input_ids=torch.as_tensor([ids], device=device)).logits[0].float()
        m = torch.as_tensor(mask, dtype=torch.float32, device=device)
        f = (logits.sum(dim=-1) * m).sum() / m.sum()
        return torch.cat([g.flatten() for g in torch.autograd.grad(f, params)]).float()

    out, pending = [], []
    for ids, mask in zip(seqs, masks):
        pending.append(gradient(ids, mask))
        if len(pending) == LESS_EVERY:
            out.append(projector.project_flat(torch.stack(pending)))
            pending = []
    if pending:
        out.append(projector.project_flat(torch.stack(pending)))
    return torch.cat(out)


def floor(fc: FeatureComputer, model, seqs, masks, max_tokens, logits: bool, device, dtype):
    """One batched forward + backward of sum_b F(x_b) w.r.t. the LoRA weights per batch, the
    same batches as the feature path; no per-sample work."""
    for batch in fc.batches([len(s) for s in seqs], max_tokens):
        ids, attn, mask = pad_batch([seqs[i] for i in batch], [masks[i] for i in batch], device=device)
        if logits:
            with autocast(device, dtype):
                out = model(input_ids=ids, attention_mask=attn).logits
            per_position = out.float().sum(dim=-1)
            f = (per_position * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        else:
            with autocast(device, dtype):
                hidden = fc.backbone(input_ids=ids, attention_mask=attn).last_hidden_state
            f = summed_logit_objective(hidden, mask, fc.w_sum, fc.b_sum)
        torch.autograd.grad(f.sum(), fc.params)


def cli_rate(args, rows, n: int) -> dict | None:
    """Wall time of ``ntk-ray features`` on the first n rows, as a fresh process (Ray start,
    model load, tokenize, features, Parquet) — None when the command does not exist."""
    exe = shutil.which("ntk-ray", path=str(Path(sys.executable).parent)) or shutil.which("ntk-ray")
    if exe is None:
        return {"error": "no ntk-ray executable"}
    probe = subprocess.run([exe, "features", "--help"], capture_output=True, text=True)
    if probe.returncode != 0:
        return {"error": f"`ntk-ray features --help` failed: {(probe.stderr or probe.stdout).strip().splitlines()[-1:]}"}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "rows.jsonl"
        rows[:n].select("id", "prompt", "response").write_ndjson(data)
        cmd = [exe, "features", "--data", str(data), "--out", str(Path(tmp) / "feats"), "--max-length", str(args.max_length),
               "--proj-dim", str(args.dim), "--projector", "kron", "--batch-tokens", str(args.max_tokens)]
        cmd += ["--model", str(args.model)] if args.model else []
        cmd += ["--executor", args.cli_executor]
        start = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))
        wall = time.perf_counter() - start
        if run.returncode != 0:
            tail = (run.stderr or run.stdout).strip().splitlines()[-3:]
            return {"error": f"`ntk-ray features` exited {run.returncode}: {' | '.join(tail)}"}
        summary = {}
        for line in run.stdout.splitlines()[::-1]:
            with contextlib.suppress(ValueError):
                summary = json.loads(line)
                break
        return {"wall": wall, "summary": summary, "cmd": " ".join(["ntk-ray"] + cmd[1:])}


# ---------------------------------------------------------------------------------------------
# scoring stage
def scoring_rows(args) -> tuple[list[dict], str]:
    """The scoring stage against bare numpy on the same random pool features, for the mean,
    cosine and max scorers. Two bare baselines: features already in memory as float32, and
    the features as ntk-ray stores them (float16: numpy converts to float32, then BLAS). Plus
    the float64 floor (a BLAS float64 matrix-vector product on features already in float64:
    what float64 accumulation costs at the least) and one stored shard scored from its
    Parquet file the way a Ray score task does (``stages.kernel.score_file``: read + score)."""
    import tempfile

    import pyarrow as pa

    from ntk_ray.core.scoring import AnchorKernel
    from ntk_ray.io.shards import write_table_atomic
    from ntk_ray.stages.kernel import score_file

    rng = np.random.default_rng(args.seed)
    n, d, k = args.pool_rows, args.dim, args.topk
    log(f"scoring: generating {n} x {d} pool features ({n * d * 4 / 2**30:.1f} GiB float32 + float16 copy)")
    x32 = rng.standard_normal((n, d), dtype=np.float32)
    x32 *= rng.uniform(0.2, 5.0, size=(n, 1)).astype(np.float32)  # unequal norms, like real features
    x16 = x32.astype(np.float16)
    x32 = x16.astype(np.float32)  # the same values in both dtypes
    anchors = rng.standard_normal((args.score_anchors, d), dtype=np.float32) + 0.1 * x32[:1]
    unit = anchors / np.linalg.norm(anchors, axis=1, keepdims=True)
    direction = {"mean": anchors.mean(axis=0), "cosine": unit.mean(axis=0)}
    kernel = AnchorKernel(anchors)
    cpu = torch.device("cpu")

    def top(s):
        return np.argpartition(-s, k - 1)[:k]

    def bare(x, scorer):
        x = x if x.dtype == np.float32 else x.astype(np.float32)
        if scorer == "max":
            return top((x @ anchors.T).max(axis=1))
        s = x @ direction[scorer]
        return top(s / np.sqrt(np.einsum("ij,ij->i", x, x)) if scorer == "cosine" else s)

    rows = []
    for scorer in ("mean", "cosine", "max"):
        t32, sel32 = best_of(lambda: bare(x32, scorer), cpu, args.repeats)
        t16, _ = best_of(lambda: bare(x16, scorer), cpu, args.repeats)
        k16, sel16 = best_of(lambda: top(kernel.score(x16, scorer)), cpu, args.repeats)
        k32, _ = best_of(lambda: top(kernel.score(x32, scorer)), cpu, args.repeats)
        rows.append({"scorer": scorer, "bare32": t32, "bare16": t16, "ntk16": k16, "ntk32": k32,
                     "overlap": len(set(sel16.tolist()) & set(sel32.tolist())) / k, "load": load()})
        log(f"scoring {scorer}: bare f32 {t32:.3f}s, bare on f16 {t16:.3f}s, AnchorKernel f16 {k16:.3f}s, f32 {k32:.3f}s")
    x64 = x32.astype(np.float64)
    m64 = direction["mean"].astype(np.float64)
    t64, _ = best_of(lambda: top(x64 @ m64), cpu, args.repeats)
    del x64
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard.parquet"
        table = pa.table({"key": np.arange(n, dtype=np.int64),
                          "feature": pa.FixedSizeListArray.from_arrays(pa.array(x16.reshape(-1)), d)})
        t_write, _ = timed(lambda: write_table_atomic(table, path), cpu)  # as the feature workers write
        del table
        t_file, _ = best_of(lambda: top(score_file(str(path), anchors, "mean")["score"]), cpu, args.repeats)
    first = rows[0]
    lines = [f"Pool: {n:,} x {d} random features (norms spread 0.2-5x) stored as float16, {args.score_anchors} anchors, "
             f"top-{k} by `np.argpartition`; best of {args.repeats} in-memory runs, {torch.get_num_threads()} threads. "
             "Bare numpy: `x @ direction` (cosine: divided by the row norms; max: `(x @ anchors.T).max(1)`) in float32, "
             "on features already in memory as float32 (`bare f32`) or on the float16 features as stored "
             "(`bare f16`: `x.astype(float32)` first). ntk-ray: `scoring.AnchorKernel(anchors).score(x, scorer)`: "
             "float64 accumulation in cache-sized row blocks, rounded to the float32 grid (reproducible across BLAS "
             "libraries, thread counts and shardings), + the same top-k.",
             "",
             "| scorer | bare f32 s | bare f16 s | ntk-ray on f16 s | x bare f32 | x bare f16 | ntk-ray on f32 s | x bare f32 | top-k overlap ntk-ray vs bare f32 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['scorer']} | {r['bare32']:.3f} | {r['bare16']:.3f} | {r['ntk16']:.3f} | {r['ntk16'] / r['bare32']:.2f} | "
                     f"{r['ntk16'] / r['bare16']:.2f} | {r['ntk32']:.3f} | {r['ntk32'] / r['bare32']:.2f} | {r['overlap']:.4f} |")
    lines += ["",
              f"- float64 floor (mean): BLAS `x64 @ m64` on features already in float64 + top-k: {t64:.3f} s = "
              f"{t64 / first['bare32']:.2f}x bare f32: no float64 accumulation can be within 1.5x of a float32 one here",
              f"- the pool as one feature shard written as the feature workers write it (`io.shards.write_table_atomic`): "
              f"{t_write:.2f} s; scored from that Parquet file as a Ray score task does (`stages.kernel.score_file`, mean: read "
              f"+ decode + score) + top-k: {t_file:.3f} s = {t_file / first['bare32']:.2f}x bare f32, "
              f"{t_file / first['bare16']:.2f}x bare f16",
              f"- target (ntk-ray within 1.5x of bare numpy), mean scorer: on the stored float16 features "
              f"{first['ntk16'] / first['bare16']:.2f}x: {'met' if first['ntk16'] <= 1.5 * first['bare16'] else 'MISSED'}; "
              f"against float32 features already in memory {first['ntk16'] / first['bare32']:.2f}x: "
              f"{'met' if first['ntk16'] <= 1.5 * first['bare32'] else 'MISSED'}"]
    return rows, "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# projection error
def balanced_factors(d_m: int, out_features: int, in_features: int) -> tuple[int, int]:
    """Proposal: k_o and k_i as equal as the sides allow (among splits keeping >= 90% of d_m),
    instead of following the aspect ratio, which gives LoRA factors (one side r = 16) k_o = 1
    or k_i = 1: a single random combination of the r rows, an error that more d does not cure."""
    if d_m >= out_features * in_features:
        return out_features, in_features
    pairs = [(k_o, min(d_m // k_o, in_features)) for k_o in range(1, min(d_m, out_features) + 1)]
    most = max(a * b for a, b in pairs)
    good = [(abs(math.log(a / b)), -a * b, (a, b)) for a, b in pairs if a * b >= 0.9 * most]
    return min(good)[2]


def projection_error(model, seqs, masks, args, device, dtype) -> tuple[list[dict], str]:
    """Relative error of <psi(a), psi(b)> against the exact <g(a), g(b)> on real gradients."""
    fc = FeatureComputer(model, projector="none", device=device, autocast_dtype=dtype)
    exact = fc.features(seqs, masks, args.max_tokens).feature.double()
    n = exact.shape[0]
    gram = exact @ exact.T
    norms = exact.norm(dim=1)
    scale = torch.outer(norms, norms)
    off = ~torch.eye(n, dtype=torch.bool)
    sizes = [s.numel for s in fc.shapes]
    full = [g.reshape(-1, s.out_features, s.in_features).float() for g, s in zip(exact.split(sizes, dim=1), fc.shapes)]
    energy = torch.stack([f.double().pow(2).sum(dim=(1, 2)) for f in full], dim=1)
    share = energy / energy.sum(dim=1, keepdim=True)
    effective = (1 / share.pow(2).sum(dim=1)).mean().item()
    b_share = share[:, [i for i, s in enumerate(fc.shapes) if "lora_B" in s.name]].sum(dim=1).mean().item()
    cos = (gram / scale)[off]

    def kron(d, seed, factors=None):
        proj = KronProjector(fc.shapes, d, seed)
        if factors is not None:
            m = len(fc.shapes)
            shares = [d // m + (1 if j < d % m else 0) for j in range(m)]
            proj.factors = [factors(max(sh, 1), s.out_features, s.in_features) for sh, s in zip(shares, fc.shapes)]
            proj.dim = sum(k_o * k_i for k_o, k_i in proj.factors)
        return proj.project_full(full).double(), proj.dim

    kinds = {
        "kron (ntk-ray)": (lambda d, seed: kron(d, seed), args.error_seeds),
        "sketch (ntk-ray)": (lambda d, seed: (SketchProjector(fc.shapes, d, seed).project_full(full).double(), d), args.error_seeds),
        "dense (ntk-ray)": (lambda d, seed: (DenseProjector(fc.shapes, d, seed).project_flat(exact.float()).double(), d), 1),
        "kron, balanced k_o ~ k_i (proposal)": (lambda d, seed: kron(d, seed, balanced_factors), args.error_seeds),
    }
    results = []
    for d in args.error_dims:
        for kind, (make, seeds) in kinds.items():
            start = time.perf_counter()
            errs = []
            for seed in range(seeds):
                psi, dim = make(d, seed)
                rel = (psi @ psi.T - gram) / scale
                errs.append({"off_rms": rel[off].pow(2).mean().sqrt().item(), "off_max": rel[off].abs().max().item(),
                             "diag_rms": rel.diagonal().pow(2).mean().sqrt().item(),
                             "gram": ((psi @ psi.T - gram).norm() / gram.norm()).item()})
            results.append({"kind": kind, "d": dim, "seeds": seeds, "seconds": (time.perf_counter() - start) / seeds,
                            **{key: float(np.mean([e[key] for e in errs])) for key in errs[0]}})
            log(f"error {kind} d={dim}: off-diagonal rms {results[-1]['off_rms']:.4f}")
    lines = [f"{n} samples, exact per-sample gradients (projector `none`, {exact.shape[1]:,} LoRA parameters in "
             f"{len(fc.shapes)} factors); mean |cos| between samples {cos.abs().mean().item():.3f}; "
             f"{b_share:.0%} of the gradient energy is in the lora_B factors, spread like {effective:.0f} equal factors. "
             "rel = (<psi(a), psi(b)> - <g(a), g(b)>) / (|g(a)| |g(b)|); Gram = ||Psi Psi^T - G G^T||_F / ||G G^T||_F; "
             "errors are means over the seeds; s = seconds to project the samples from their exact gradients (one seed); "
             "sqrt(1/d) is the JL scale of a dense projection. The balanced-kron proposal is computed in this script only.",
             "",
             "| d | projector | seeds | rms rel, a != b | max rel, a != b | rms rel of \\|g\\|^2 | Gram rel. error | sqrt(1/d) | s |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['d']} | {r['kind']} | {r['seeds']} | {r['off_rms']:.4f} | {r['off_max']:.4f} | {r['diag_rms']:.4f} | "
                     f"{r['gram']:.4f} | {1 / math.sqrt(r['d']):.4f} | {r['seconds']:.2f} |")
    return results, "\n".join(lines)


# ---------------------------------------------------------------------------------------------
def profile_kron(fc: FeatureComputer, seqs, masks, max_tokens, device) -> str:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fc.features(seqs, masks, max_tokens)
    averages = prof.key_averages()
    for key in (("self_device_time_total", "self_cuda_time_total") if device.type == "cuda" else ()) + ("self_cpu_time_total",):
        with contextlib.suppress(Exception):
            return averages.table(sort_by=key, row_limit=25)
    return averages.table(row_limit=25)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=64, help="samples for the floor, kron, none and JVP rows (default 64)")
    p.add_argument("--max-length", type=int, default=128, help="token limit per row (default 128)")
    p.add_argument("--less-samples", type=int, default=16, help="samples for the LESS-style row (default 16 = one projection)")
    p.add_argument("--dense-samples", type=int, default=16, help="samples for the dense-projector row (default 16)")
    p.add_argument("--anchors", type=int, default=16, help="anchors of the JVP row's mean gradient (default 16)")
    p.add_argument("--dim", type=int, default=8192, help="projection dimension d (default 8192)")
    p.add_argument("--max-tokens", type=int, default=8192, help="padded tokens per batch (default 8192)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs of each cheap row; the best is kept (default 3)")
    p.add_argument("--error-samples", type=int, default=24, help="samples of the projection-error study (default 24)")
    p.add_argument("--error-dims", type=lambda s: [int(v) for v in s.split(",")], default=[512, 2048, 8192],
                   help="comma-separated d of the error study (default 512,2048,8192)")
    p.add_argument("--error-seeds", type=int, default=3,
                   help="projection seeds averaged in the error study (default 3; dense: always 1, it is slow)")
    p.add_argument("--pool-rows", type=int, default=50_000, help="pool rows of the scoring stage (default 50000)")
    p.add_argument("--score-anchors", type=int, default=64, help="anchors of the scoring stage (default 64)")
    p.add_argument("--topk", type=int, default=1000, help="top-k of the scoring stage (default 1000)")
    p.add_argument("--skip", nargs="*", default=[], choices=["less", "dense", "sketch", "logits", "none", "jvp", "whole", "cli", "scoring", "error"],
                   help="rows / sections to leave out")
    p.add_argument("--quick", action="store_true", help="skip the slow rows (less, dense, cli, error) and use 10k pool rows")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one kron feature pass to stderr")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="the model of every row and of the CLI row (default: the bundled demo model; the CI smoke test "
                        "passes a tiny random Llama: it checks that every row runs, not the numbers)")
    p.add_argument("--cli-executor", choices=("ray", "local"), default="ray",
                   help="the CLI row's --executor (default ray: a fresh process with an embedded Ray, what the row "
                        "measures; local: the same command in-process, for the smoke test)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--bf16", action="store_true", help="the model's weights in bfloat16, as `--dtype bfloat16` (and "
                   "`auto` on a GPU that supports it) runs them: forward and backward in bf16, no autocast; LoRA "
                   "weights, gradients and projections float32")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora-b-std", type=float, default=0.01, help="std of the random LoRA B factors (default 0.01)")
    g = p.add_argument_group("--random-arch: a random-weight Llama instead of the demo model")
    g.add_argument("--random-arch", action="store_true")
    g.add_argument("--arch-hidden", type=int, default=1536)
    g.add_argument("--arch-layers", type=int, default=24)
    g.add_argument("--arch-intermediate", type=int, default=6144)
    g.add_argument("--arch-heads", type=int, default=12)
    g.add_argument("--arch-kv-heads", type=int, default=4)
    g.add_argument("--arch-vocab", type=int, default=32000)
    p.add_argument("--out", default=None, help="report path (default benchmarks/results/features_<cpu|gpu>[_random-arch].md)")
    args = p.parse_args(argv)
    skip = set(args.skip)
    if args.quick:
        skip |= {"less", "dense", "cli", "error"}
        args.pool_rows = min(args.pool_rows, 10_000)
    if args.random_arch:
        skip |= {"cli"}  # the CLI runs the demo / a named model, not a random one
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = None  # no autocast: --bf16 loads the weights in bfloat16, as the product does
    out_path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (
        f"features_{'gpu' if device.type == 'cuda' else 'cpu'}{'_random-arch' if args.random_arch else ''}.md")

    log("loading the model and the samples")
    setup_cpu = time.process_time()
    model, seqs, masks, rows, setup, info = (random_arch_workload if args.random_arch else demo_workload)(args, device)
    setup_cpu = time.process_time() - setup_cpu
    anchors_s, anchors_m = seqs[-args.anchors:], masks[-args.anchors:]
    pool_s, pool_m = seqs[:args.samples], masks[:args.samples]

    def tokens(n):
        return sum(len(s) for s in seqs[:n])

    results: dict[str, dict] = {}

    def record(key, label, n, n_tok, seconds, note="", cpu=None):
        results[key] = {"label": label, "n": n, "tokens": n_tok, "seconds": seconds, "load": load(), "note": note,
                        "cpu": LAST_CPU[0] if cpu is None else cpu}
        log(f"{label}: {n} samples in {seconds:.1f}s = {n / seconds:.3f} samples/s")

    def best_row(key, label, fn, n=args.samples, n_tok=None) -> float:
        """Time one interleaved run of ``fn``; keep it as row ``key`` when it beats the earlier runs."""
        dt, _ = timed(fn, device)
        if key not in results or dt < results[key]["seconds"]:
            record(key, label, n, tokens(args.samples) if n_tok is None else n_tok, dt)
        return dt

    def computer(projector: str) -> FeatureComputer:
        return FeatureComputer(model, projector=projector, dim=args.dim, seed=args.seed, device=device, autocast_dtype=dtype)

    fc = computer("kron")
    log(f"kron projector: d = {fc.dim}, {len(fc.shapes)} LoRA factors, {fc.projector.grad_dim:,} parameters")
    batches = fc.batches([len(s) for s in pool_s], args.max_tokens)
    padded = sum(max(len(pool_s[i]) for i in b) * len(b) for b in batches)

    # warm-up (allocator, threads, the projection matrices' cache) on a few rows
    fc.features(pool_s[:4], pool_m[:4], args.max_tokens)
    if "sketch" not in skip:
        computer("sketch").features(pool_s[:4], pool_m[:4], args.max_tokens)
    floor(fc, model, pool_s[:4], pool_m[:4], args.max_tokens, False, device, dtype)
    if args.profile:
        print(profile_kron(fc, pool_s, pool_m, args.max_tokens, device), file=sys.stderr)

    first_kron = first_kron_cpu = None
    for rep in range(max(args.repeats, 1)):  # interleaved: the floor and kron see the same load
        best_row("floor", "floor: batched fwd+bwd, LM-head column-sum",
                 lambda: floor(fc, model, pool_s, pool_m, args.max_tokens, False, device, dtype))
        # a fresh FeatureComputer each time: cold projection-matrix caches, as in a new process
        dt = best_row("kron", f"ntk-ray features, kron, d={fc.dim}",
                      lambda: computer("kron").features(pool_s, pool_m, args.max_tokens))
        if first_kron is None or dt < first_kron:
            first_kron, first_kron_cpu = dt, LAST_CPU[0]
        if "sketch" not in skip:  # a fresh FeatureComputer: the hashes are built inside the timing
            best_row("sketch", f"ntk-ray features, sketch, d={args.dim}",
                     lambda: computer("sketch").features(pool_s, pool_m, args.max_tokens))
        if "logits" not in skip:
            best_row("floor_logits", "floor: batched fwd+bwd through the logits",
                     lambda: floor(fc, model, pool_s, pool_m, args.max_tokens, True, device, dtype))
        if "none" not in skip:
            fc_none = FeatureComputer(model, projector="none", device=device, autocast_dtype=dtype)
            best_row("none", f"ntk-ray features, none (exact, d={fc_none.dim:,})",
                     lambda: fc_none.features(pool_s, pool_m, args.max_tokens))
            del fc_none
        if "jvp" not in skip:
            def jvp():
                g_bar = fc.mean_gradient(anchors_s, anchors_m, args.max_tokens)
                return fc.mean_scores_jvp(pool_s, pool_m, g_bar, args.max_tokens)

            best_row("jvp", f"ntk-ray exact mean scores by JVP ({args.anchors} anchors + {args.samples} rows)", jvp,
                     n=args.samples + args.anchors, n_tok=tokens(args.samples) + sum(len(s) for s in anchors_s))
    if "dense" not in skip:
        fc_dense = computer("dense")
        n = args.dense_samples
        dt, _ = timed(lambda: fc_dense.features(seqs[:n], masks[:n], args.max_tokens), device)
        record("dense", f"ntk-ray features, dense, d={args.dim}", n, tokens(n), dt)
        del fc_dense
    if "less" not in skip:
        n = args.less_samples
        dt, _ = timed(lambda: less_style(model, seqs[:n], masks[:n], args.dim, args.seed, device, dtype), device)
        record("less", f"LESS-style: batch 1, full logits, dense projection every {LESS_EVERY}", n, tokens(n), dt)
    if "whole" not in skip:
        record("whole", "ntk-ray kron, whole process: model load + tokenize + features", args.samples, tokens(args.samples),
               setup + first_kron, note=f"setup {setup:.1f}s + kron pass {first_kron:.1f}s",  # FeatureComputer built inside
               cpu=setup_cpu + first_kron_cpu)
    cli = None
    if "cli" not in skip and rows is not None:
        log("ntk-ray features CLI")
        cli = cli_rate(args, rows, args.samples)
        if cli and "wall" in cli:
            record("cli", f"`ntk-ray features` CLI, kron (fresh process, "
                          f"{'embedded Ray' if args.cli_executor == 'ray' else '--executor local'})", args.samples, tokens(args.samples),
                   cli["wall"], note=json.dumps(cli.get("summary", {}).get("seconds", {})), cpu=float("nan"))

    scoring_text = ""
    if "scoring" not in skip:
        _, scoring_text = scoring_rows(args)
    error_text = ""
    if "error" not in skip:
        n = args.error_samples
        _, error_text = projection_error(model, seqs[:n], masks[:n], args, device, dtype)

    # ---- report
    base = results["floor"]
    less = results.get("less")
    order = ["less", "floor_logits", "floor", "kron", "sketch", "none", "dense", "jvp", "whole", "cli"]
    lines = ["| method | samples | samples/s | tokens/s | x floor | x LESS-style | CPU s / sample | load |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key in order:
        r = results.get(key)
        if r is None:
            continue
        rate = r["n"] / r["seconds"]
        vs_floor = rate / (base["n"] / base["seconds"])
        vs_less = f"{rate / (less['n'] / less['seconds']):.1f}" if less else "-"
        cpu = f"{r['cpu'] / r['n']:.2f}" if r.get("cpu") is not None and not math.isnan(r["cpu"]) else "-"
        lines.append(f"| {r['label']} | {r['n']} | {rate:.3f} | {r['tokens'] / r['seconds']:.1f} | {vs_floor:.2f} | {vs_less} | "
                     f"{cpu} | {r['load']:.1f} |")
    table = "\n".join(lines)
    kron_rate = results["kron"]["n"] / results["kron"]["seconds"]
    floor_rate = base["n"] / base["seconds"]
    checks = [f"- kron within 1.5x of the floor (column-sum): kron / floor = {kron_rate / floor_rate:.2f} "
              f"(needs >= 0.67): {'met' if kron_rate * 1.5 >= floor_rate else 'MISSED'}"]
    if "sketch" in results:
        sketch_rate = results["sketch"]["n"] / results["sketch"]["seconds"]
        checks.append(f"- sketch within 1.5x of the floor (column-sum): sketch / floor = {sketch_rate / floor_rate:.2f} "
                      f"(needs >= 0.67): {'met' if sketch_rate * 1.5 >= floor_rate else 'MISSED'}; sketch / kron = "
                      f"{sketch_rate / kron_rate:.2f}")
    if less:
        less_rate = less["n"] / less["seconds"]
        checks.append(f"- kron >= 10x LESS-style: {kron_rate / less_rate:.1f}x: {'met' if kron_rate >= 10 * less_rate else 'MISSED'}")
        if "whole" in results:
            w = results["whole"]
            checks.append(f"- whole process (model load included) >= 10x LESS-style: {w['n'] / w['seconds'] / less_rate:.1f}x")
    mach = machine_line(device)
    report = [f"# Feature-path benchmark (`benchmarks/bench_features.py`, {time.strftime('%Y-%m-%d')})", "",
              f"- machine: {mach}; load average at the end of each row in the `load` column",
              f"- model: {info['model']}, LoRA r=16 alpha=32 on q/k/v/o ({fc.projector.grad_dim:,} parameters, "
              f"B ~ N(0, {args.lora_b_std}^2)), {'bf16 weights (as --dtype bfloat16)' if args.bf16 else 'float32'}",
              f"- data: {info['data']}; {args.samples} samples = {tokens(args.samples):,} tokens "
              f"({padded:,} padded in {len(batches)} batches of <= {args.max_tokens} tokens)",
              f"- rates: wall time, best of {args.repeats} interleaved runs for the floor/kron/sketch/logits/none/JVP rows, one "
              f"run for LESS-style ({args.less_samples} samples), dense ({args.dense_samples}) and the whole-process rows; "
              "`CPU s / sample`: process CPU time (all threads) per sample, less sensitive to other load than wall time"
              + (" (host CPU only: not the GPU's work)" if device.type == "cuda" else ""),
              f"- command: `{' '.join(['.venv/bin/python', 'benchmarks/bench_features.py'] + (argv if argv is not None else sys.argv[1:]))}`",
              "", "## Feature extraction", "", table, "", *checks]
    if "cli" not in skip and rows is not None:
        if cli and "wall" in cli:
            report += [f"- CLI: `{cli['cmd']}`; stage seconds {results['cli']['note']}"]
        else:
            report += [f"- CLI not measured: {cli.get('error') if cli else 'unavailable'}"]
    if scoring_text:
        report += ["", "## Kernel scoring stage", "", scoring_text]
    if error_text:
        report += ["", "## Projection error (kron, sketch and dense, on real gradients)", "", error_text]
    write_report("\n".join(report) + "\n", out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
