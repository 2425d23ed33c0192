"""Coarse-stage benchmark: the Embedder's tokens/s against a batched forward pass (the floor),
where the compute goes (padding, chat-template tokens), and cheaper embeddings side by side with
what they cost in selection quality.

    .venv/bin/python benchmarks/bench_coarse.py                       # demo model, demo corpus, CPU
    .venv/bin/python benchmarks/bench_coarse.py --device cuda --model DIR --synthetic 20000 --skip-quality

Every timed row embeds the same pool rows in this process, interleaved, best of ``--repeats``:

  floor: backbone     ``backbone(input_ids, attention_mask)`` (the decoder without the LM head:
                      what an embedding needs), all rows sorted by length and cut into batches of
                      ``--batch-tokens`` padded tokens, under ``torch.inference_mode``; the same
                      model object (base + the warmed LoRA adapter) the Embedder uses.
                      **The ratios' denominator.**
  floor: model()      the same with ``model(input_ids, attention_mask)`` (through the LM head).
  Embedder ...        the product: ``stages.workers.Embedder`` called on a token shard written
                      in the read stage's schema (shard read, embedding, output shard and marker
                      written), as a model actor runs it, with the options of each row
                      (``--embed-layer``, ``--embed-max-tokens``, ``--system-prompt none``).

Rates count real (unpadded) tokens of the rows each variant embeds; rows/s is what a pool
costs. ``--system-prompt none`` embeds fewer tokens per row, so compare it on rows/s.

Quality (demo corpus, unless ``--skip-quality``): a demo split (``demo.make_demo_split``:
``--n-domain`` domain rows of ``--domain-label``, a pool of ``--n-pool`` rows of which 5% are
the domain), the warm-up of ``select`` (LoRA, its defaults) once per tokenization, the anchors
embedded with the same options as the pool (as ``select`` does), and the coarse stage's votes:
each anchor's K = ``--budget`` nearest pool rows by cosine, rows ordered by (votes, summed
similarity, key) as ``core.coarse.coarse_order``. Reported: label lift of the top ``--budget``
rows (the coarse stage alone as a selector, "embedding votes" of demo_lifts.py) and the recall
of the domain rows among the M = 4 x budget candidates the NTK stage gets. The quality columns
embed every pool row and anchor with one forward pass per tokenization (``every_variant``:
``output_hidden_states``, then each option's layer and token prefix), which equals the
Embedder's output with those options within float rounding (the reference of
tests/test_coarse_floor.py); the timed rows use the Embedder itself.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_avg, log, machine_line, write_report

from ntk_ray.config import SelectConfig
from ntk_ray.core.coarse import coarse_order
from ntk_ray.core.features import backbone_and_head, pack_by_tokens, pad_batch
from ntk_ray.core.scoring import stable_keys
from ntk_ray.stages.workers import TOKENS_SCHEMA, Embedder

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# data

def demo_rows(args, work: Path) -> dict:
    """The demo split and its token ids under both --system-prompt settings (and the
    untruncated tokens of the default, for the template accounting)."""
    from ntk_ray.core.tokenize import default_system_block, tokenize_batch
    from ntk_ray.demo import make_demo_split
    from ntk_ray.models import load_tokenizer

    split = make_demo_split(work / "data", domain_label=args.domain_label, n_domain=args.n_domain, n_eval=0,
                            n_pool=args.n_pool, seed=args.seed)
    tok = load_tokenizer(args.model)
    out = {"tokenizer": tok, "split": split}
    frames = {"domain": pl.read_ndjson(split["domain_path"]), "pool": pl.read_parquet(split["pool_path"])}
    out["labels"] = frames["pool"]["label"].to_list()
    out["pool_ids"] = frames["pool"]["id"].cast(pl.String).to_list()
    for prompt in ("default", "none"):
        for role, frame in frames.items():
            t = tokenize_batch(tok, prompts=frame["prompt"].to_list(), responses=frame["response"].to_list(),
                               max_length=args.max_length, system_prompt=prompt)
            assert all(r is None for r in t.reject), "demo rows are all usable"
            out[(role, prompt)] = t
    full = tokenize_batch(tok, prompts=frames["pool"]["prompt"].to_list(), responses=frames["pool"]["response"].to_list(),
                          max_length=1 << 20)
    content = [len(tok(p, add_special_tokens=False)["input_ids"]) + len(tok(r, add_special_tokens=False)["input_ids"])
               for p, r in zip(frames["pool"]["prompt"].to_list(), frames["pool"]["response"].to_list())]
    block = default_system_block(tok)
    out["system_tokens"] = len(tok(block[1], add_special_tokens=False)["input_ids"]) if block[1] else 0
    out["full_tokens"], out["content_tokens"] = full.n_tokens, content
    return out


def synthetic_rows(args, vocab: int) -> dict:
    g = np.random.default_rng(args.seed)
    lengths = g.integers(max(2, args.max_length // 4), args.max_length + 1, size=args.synthetic)
    seqs = [g.integers(3, vocab, size=int(n)).tolist() for n in lengths]
    return {("pool", "default"): type("T", (), {"input_ids": seqs, "n_tokens": [len(s) for s in seqs],
                                               "truncated": [False] * len(seqs)})()}


def write_token_shard(path: Path, seqs: list[list[int]], ids: list[str]) -> pa.Table:
    """A token shard in the read stage's schema; returns the keep table (key, source, row)."""
    n = len(seqs)
    table = pa.table({
        "role": pa.array(["pool"] * n), "id": pa.array(ids), "key": pa.array(stable_keys(ids), pa.int64()),
        "source": pa.array(["pool"] * n), "row": pa.array(range(n), pa.int64()),
        "input_ids": pa.array(seqs, pa.list_(pa.int32())), "loss_mask": pa.array([[1] * len(s) for s in seqs], pa.list_(pa.int8())),
        "score_mask": pa.array([[1] * len(s) for s in seqs], pa.list_(pa.int8())),
        "n_tokens": pa.array([len(s) for s in seqs], pa.int64()), "truncated": pa.array([False] * n),
        "reject": pa.array([None] * n, pa.string()),
    }, schema=TOKENS_SCHEMA)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return table.select(["key", "source", "row"])


# ------------------------------------------------------------------------------------------------
# the model and the warm-up

def warm_adapter(args, model_path, domain_tok, out_dir: Path, device: str) -> str:
    """The select warm-up (its defaults): LoRA on the domain rows, saved to ``out_dir``."""
    from ntk_ray.core.training import TrainConfig, train_lora
    from ntk_ray.models import attach_lora, load_model

    cfg = SelectConfig()
    torch.manual_seed(args.seed)
    model = attach_lora(load_model(model_path, dtype=args.dtype, device=device), r=cfg.lora_r, alpha=cfg.lora_alpha,
                        targets=tuple(cfg.lora_targets))
    if domain_tok is not None:
        train_lora(model, domain_tok.input_ids, domain_tok.loss_mask,
                   TrainConfig(epochs=cfg.warmup_epochs, lr=cfg.warmup_lr, batch_tokens=cfg.warmup_batch_tokens,
                               seed=args.seed), device=device, log=lambda line: None)
    model.save_pretrained(str(out_dir))
    return str(out_dir)


def floor_pass(model, seqs, batch_tokens, device, head: bool) -> int:
    """Batched forward of every row, length-sorted, no pooling; returns the padded tokens."""
    backbone, _ = backbone_and_head(model)
    padded = 0
    with torch.inference_mode():
        for batch in pack_by_tokens([len(s) for s in seqs], batch_tokens):
            ids, attn, _ = pad_batch([seqs[i] for i in batch], [[1] * len(seqs[i]) for i in batch], device=device)
            (model if head else backbone)(input_ids=ids, attention_mask=attn)
            padded += ids.numel()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return padded


def keep_best(best: dict, cpu: dict, name: str, wall: float, cpu_s: float) -> None:
    if wall < best.get(name, float("inf")):
        best[name], cpu[name] = wall, cpu_s


def padded_tokens(seqs, batch_tokens) -> int:
    return sum(len(b) * max(len(seqs[i]) for i in b) for b in pack_by_tokens([len(s) for s in seqs], batch_tokens))


def run_embedder(embedder: Embedder, shard: Path, out_dir: Path, layer, max_row_tokens) -> np.ndarray:
    """One product call on one shard into a fresh output directory; the embeddings in row order."""
    embedder.out_dir, embedder.layer, embedder.max_row_tokens = out_dir, layer, max_row_tokens
    out_dir.mkdir(parents=True)
    embedder(pa.table({"path": [str(shard)]}))
    if embedder.device.startswith("cuda"):
        torch.cuda.synchronize()
    t = pq.read_table(out_dir / shard.name).sort_by("row")
    return np.array(t.column("embedding").to_pylist(), dtype=np.float32)


# ------------------------------------------------------------------------------------------------
# quality: the coarse stage's votes

def every_variant(model, seqs, batch_tokens, device, wanted) -> dict:
    """{(layer, cap): (N, H) embeddings} for every (``--embed-layer``, ``--embed-max-tokens``) in
    ``wanted`` from ONE forward with ``output_hidden_states``: the mean over positions < cap of
    hidden_states[layer] (None: the last, after the final norm), L2-normalised. Equal to the
    Embedder's embeddings with those options within float rounding (tests/test_coarse_floor.py
    checks the product's against exactly this reference)."""
    from ntk_ray.core.coarse import masked_mean_normalized

    backbone, _ = backbone_and_head(model)
    out = {k: np.zeros((len(seqs), model.config.hidden_size), np.float32) for k in wanted}
    with torch.inference_mode():
        for batch in pack_by_tokens([len(s) for s in seqs], batch_tokens):
            ids, attn, _ = pad_batch([seqs[i] for i in batch], [[1] * len(seqs[i]) for i in batch], device=device)
            hidden = backbone(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states
            for layer, cap in wanted:
                mask = attn.clone()
                if cap is not None:
                    mask[:, cap:] = 0
                out[(layer, cap)][batch] = masked_mean_normalized(hidden[-1 if layer is None else layer], mask).cpu().numpy()
    return out


def coarse_quality(anchors: np.ndarray, pool: np.ndarray, ids: list[str], labels: list[str], label: str, budget: int,
                   factor: int) -> dict:
    """Lift of the top ``budget`` rows by votes and recall of the domain rows in the top M."""
    sims = anchors @ pool.T
    k = min(budget, pool.shape[0])
    votes, summed = np.zeros(pool.shape[0], np.int64), np.zeros(pool.shape[0])
    for row in sims:
        top = np.argpartition(-row, k - 1)[:k]
        votes[top] += 1
        summed[top] += row[top]
    keys = stable_keys(ids)
    table = pl.DataFrame({"key": keys, "coarse_votes": votes, "coarse_sim": summed}).filter(pl.col("coarse_votes") > 0)
    order = coarse_order(pl.DataFrame({"key": keys, "i": range(len(ids))}), table)["i"].to_list()
    is_dom = np.array([lab == label for lab in labels])
    share = is_dom.mean()
    m = min(factor * budget, len(ids))
    return {"lift": float(is_dom[order[:budget]].mean() / share), "recall": float(is_dom[order[:m]].sum() / is_dom.sum())}


# ------------------------------------------------------------------------------------------------
# what a real selection would cost: measured rates and ratios, projected FLOPs

def _number(path: Path, pattern: str) -> float:
    m = re.search(pattern, path.read_text(), re.MULTILINE)
    if not m:
        raise SystemExit(f"--project: {path} has no line matching {pattern!r} (rerun the benchmark that writes it)")
    return float(m.group(1).replace(",", ""))


def project(args) -> int:
    """The paper's setting on G GPUs from the measured per-stage rates (module-level formulas in
    the report). Writes ``--project-out`` (default benchmarks/results/coarse_projection.md)."""
    res = ROOT / "benchmarks" / "results"
    r_embed = _number(res / "coarse_cpu.md", r"Embedder / floor \(backbone\), tokens/s: ([\d.]+)")
    r_feat = _number(res / "features_cpu.md", r"^\| ntk-ray features, sketch, d=8192 \|[^|]*\|[^|]*\|[^|]*\| ([\d.]+) \|")
    knn_rate = _number(res / "scale_cpu.md", r"^\| 1,000,000 \|[^|]*\|[^|]*\| ([\d,]+) \|")
    read_cpu = _number(res / "read.md", r"^\| jsonl \| read stage, 1 actor \|(?:[^|]*\|){5} ([\d,]+) \|")
    P, N, A, L, G = args.pool_rows, args.params, args.anchors, args.tokens_per_row, args.gpus
    M = SelectConfig().coarse_factor * args.budget_rows
    rate = args.peak_tflops * 1e12 * args.mfu  # FLOP/s one GPU sustains (assumed)
    cores = args.cpus
    rows = [
        ("read + tokenize", "CPU", f"P x 4 L bytes / ({read_cpu:,.0f} rows of ~200 B per CPU-s x C)",
         P * (4 * L / 200) / (read_cpu * cores), f"measured: {read_cpu:,.0f} rows/CPU-s (read.md, 1 actor, JSONL)"),
        ("warm-up (LoRA, 2 epochs, 1 task)", "1 GPU", "6 N x A x L x 2 / (peak x MFU)", 6 * N * A * L * 2 / rate,
         "projected (FLOPs)"),
        ("embed (coarse forward)", f"{G} GPUs", "2 N x P x L / (G x peak x MFU) / r_embed", 2 * N * P * L / (G * rate) / r_embed,
         f"projected; r_embed = {r_embed:.2f} measured (coarse_cpu.md, CPU)"),
        ("coarse kNN votes", "CPU", f"P / ({knn_rate:,.0f} rows/s x 576 / H x C / 2)", P / (knn_rate * 576 / args.hidden * cores / 2),
         f"measured {knn_rate:,.0f} rows/s on 2 cores (scale_cpu.md, dim 576), scaled by H and C"),
        ("features (fwd+bwd, M + A rows)", f"{G} GPUs", "6 N x (M + A) x L / (G x peak x MFU) / r_feat",
         6 * N * (M + A) * L / (G * rate) / r_feat, f"projected; r_feat = {r_feat:.2f} measured (features_cpu.md, sketch, CPU)"),
    ]
    total = sum(r[3] for r in rows)
    gpu_hours = sum(r[3] * (G if "GPUs" in r[1] else 1 if "GPU" in r[1] else 0) for r in rows) / 3600
    lines = [
        "# What a real selection would cost: the paper's setting, projected",
        "",
        ("- command: `.venv/bin/python benchmarks/bench_coarse.py --project` (inputs: coarse_cpu.md, features_cpu.md, "
        "scale_cpu.md, read.md in benchmarks/results)"),
        (f"- setting: P = {P:,} pool rows, N = {N / 1e9:g}B parameters, A = {A:,} domain rows, budget {args.budget_rows:,}, "
        f"M = {M:,} candidates, L = {L} tokens per row (assumed), G = {G} GPUs, C = {cores} CPU cores for the CPU stages "
        f"(assumed), H = {args.hidden} (the 8B model's hidden size)"),
        (f"- GPU rate: peak {args.peak_tflops:g} TFLOP/s (bf16 dense, H100/H200 class) x MFU {args.mfu:g} (assumed) = "
        f"{rate / 1e12:.0f} TFLOP/s per GPU; forward 2 N FLOPs per token, forward + backward 6 N (assumed)"),
        ("- no GPU number is measured: the GPU rows are FLOP counts over an assumed rate, divided by the ratio of "
        "ntk-ray to its floor that was measured on CPU"),
        "",
        "| stage | where | formula | seconds | what is measured |",
        "|---|---|---|---:|---|",
        *[f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:,.0f} | {r[4]} |" for r in rows],
        f"| **total** | | | **{total:,.0f}** ({total / 3600:.2f} h) | |",
        "",
        f"- GPU-hours: {gpu_hours:.1f} (the paper reports about 31 A100-hours for its run)",
        (f"- embed's share of the total: {rows[2][3] / total:.0%}; with --embed-layer at half the layers it would be about "
        f"{rows[2][3] / 2:,.0f} s"),
        "",
    ]
    out = Path(args.project_out) if args.project_out else res / "coarse_projection.md"
    write_report("\n".join(lines), out)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: the bundled demo model)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dtype", default="auto", help="model dtype (--dtype of select; default auto)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--batch-tokens", type=int, default=SelectConfig().batch_tokens, help="padded tokens per batch")
    p.add_argument("--max-length", type=int, default=64, help="--max-length of the rows (default 64, as the demo)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved runs; the best is kept (default 2)")
    p.add_argument("--speed-rows", type=int, default=0, help="time the first N pool rows (default 0: all of them)")
    p.add_argument("--layers", type=lambda s: [int(v) for v in s.split(",") if v], default=None,
                   help="--embed-layer values to measure (default: L/3, 2L/3)")
    p.add_argument("--max-tokens", type=lambda s: [int(v) for v in s.split(",") if v], default=[32],
                   help="--embed-max-tokens values to measure (default 32)")
    p.add_argument("--domain-label", default="noun.food")
    p.add_argument("--n-domain", type=int, default=48)
    p.add_argument("--n-pool", type=int, default=1000)
    p.add_argument("--budget", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--synthetic", type=int, default=0, metavar="N",
                   help="N random-token rows of --max-length/4..--max-length tokens instead of the demo corpus "
                        "(no template accounting, no quality; a model directory without the demo tokenizer)")
    p.add_argument("--skip-quality", action="store_true", help="no warm-up and no lift/recall (speed rows only)")
    p.add_argument("--target", type=float, default=0.8, help="the Embedder's target share of the floor's tokens/s")
    p.add_argument("--out", default=None, help="report path (default benchmarks/results/coarse_<cpu|gpu>.md)")
    g = p.add_argument_group("--project: the paper's setting projected from the measured results files")
    g.add_argument("--project", action="store_true", help="write the projection table and exit (no benchmark run)")
    g.add_argument("--project-out", default=None, help="default benchmarks/results/coarse_projection.md")
    g.add_argument("--pool-rows", type=int, default=1_800_000)
    g.add_argument("--params", type=float, default=8e9)
    g.add_argument("--hidden", type=int, default=4096)
    g.add_argument("--anchors", type=int, default=1000)
    g.add_argument("--budget-rows", type=int, default=9000)
    g.add_argument("--tokens-per-row", type=int, default=400)
    g.add_argument("--gpus", type=int, default=8)
    g.add_argument("--cpus", type=int, default=64)
    g.add_argument("--peak-tflops", type=float, default=989.0)
    g.add_argument("--mfu", type=float, default=0.4)
    args = p.parse_args(argv)
    if args.project:
        return project(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ntk_ray.models import resolve_dtype, resolve_model

    device = args.device
    args.dtype = resolve_dtype(args.dtype, device)
    out_path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"coarse_{'gpu' if device.startswith('cuda') else 'cpu'}.md"
    quality = not (args.skip_quality or args.synthetic)
    started = time.time()
    model_path = resolve_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="bench_coarse_"))
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    n_layers, vocab = config.num_hidden_layers, config.vocab_size
    layers = args.layers if args.layers is not None else sorted({max(1, n_layers // 3), max(1, 2 * n_layers // 3)})
    data = synthetic_rows(args, vocab) if args.synthetic else demo_rows(args, work)
    log(f"rows ready: {len(data[('pool', 'default')].input_ids)} pool rows ({time.time() - started:.0f} s)")

    prompts = ["default", "none"] if ("pool", "none") in data else ["default"]
    adapters = {}
    for prompt in prompts:
        adapters[prompt] = warm_adapter(args, model_path, data.get(("domain", prompt)) if quality else None,
                                        work / f"adapter-{prompt}", device)
        log(f"warm-up ({prompt}) done")
    shards, keeps = {}, {}
    ids = data.get("pool_ids") or [f"r{i}" for i in range(len(data[("pool", "default")].input_ids))]
    n_speed = min(args.speed_rows or len(ids), len(ids))
    for prompt in prompts:  # the timed rows: the first --speed-rows
        shards[prompt] = work / f"tokens-{prompt}" / "000000-000000.parquet"
        keeps[prompt] = write_token_shard(shards[prompt], data[("pool", prompt)].input_ids[:n_speed], ids[:n_speed])
    everything = pa.table({"key": pa.array(stable_keys(ids), pa.int64()), "source": pa.array(["pool"] * len(ids)),
                           "row": pa.array(range(len(ids)), pa.int64())})
    embedders = {prompt: Embedder(str(work / "unused"), everything, model_path, adapters[prompt], args.batch_tokens,
                                  device, args.dtype) for prompt in prompts}

    # variants: (label, system prompt, layer, max_row_tokens)
    variants = [("Embedder (default: final layer, every token)", "default", None, None)]
    if "none" in prompts:
        variants.append(("Embedder, --system-prompt none", "none", None, None))
    variants += [(f"Embedder, --embed-layer {k}", "default", k, None) for k in layers]
    variants += [(f"Embedder, --embed-max-tokens {t}", "default", None, t) for t in args.max_tokens]
    if "none" in prompts:
        variants += [(f"Embedder, --system-prompt none --embed-layer {k}", "none", k, None) for k in layers[-1:]]
        variants += [(f"Embedder, --system-prompt none --embed-max-tokens {t}", "none", None, t) for t in args.max_tokens[:1]]
    seqs = {prompt: data[("pool", prompt)].input_ids[:n_speed] for prompt in prompts}
    best: dict[str, float] = {}
    cpu: dict[str, float] = {}  # process CPU seconds of the same best run (other load disturbs it less)
    model0 = embedders["default"].model
    run_id = 0
    floor_pass(model0, seqs["default"][:8], args.batch_tokens, device, False)  # one-time costs outside the timing
    for rep in range(max(1, args.repeats)):
        for name, head in (("floor: backbone", False), ("floor: model() with the LM head", True)):
            t0, c0 = time.perf_counter(), time.process_time()
            floor_pass(model0, seqs["default"], args.batch_tokens, device, head)
            keep_best(best, cpu, name, time.perf_counter() - t0, time.process_time() - c0)
        for label, prompt, layer, cap in variants:
            run_id += 1
            t0, c0 = time.perf_counter(), time.process_time()
            run_embedder(embedders[prompt], shards[prompt], work / f"embed-{run_id}", layer, cap)
            keep_best(best, cpu, label, time.perf_counter() - t0, time.process_time() - c0)
        log(f"repeat {rep + 1}/{args.repeats} done")
    load = load_avg()
    if quality:  # every pool row and anchor: one forward per tokenization gives every variant's embeddings
        pool_emb, anchor_emb = {}, {}
        for prompt in prompts:
            wanted = [(layer, cap) for _, p_, layer, cap in variants if p_ == prompt]
            model = embedders[prompt].model
            pool_emb.update({(prompt, *k): v for k, v in every_variant(model, data[("pool", prompt)].input_ids,
                                                                        args.batch_tokens, device, wanted).items()})
            anchor_emb.update({(prompt, *k): v for k, v in every_variant(model, data[("domain", prompt)].input_ids,
                                                                          args.batch_tokens, device, wanted).items()})
        log("quality embeddings done")

    # the table
    def tokens_of(prompt, cap):
        return sum(min(len(s), cap or len(s)) for s in seqs[prompt])

    floor_rate = tokens_of("default", None) / best["floor: backbone"]
    n = len(seqs["default"])
    default_rows_s = n / best[variants[0][0]]
    quality_rows = {}
    if quality:
        for label, prompt, layer, cap in variants:
            key = (prompt, layer, cap)
            quality_rows[label] = coarse_quality(anchor_emb[key], pool_emb[key], ids, data["labels"],
                                                 args.domain_label, args.budget, SelectConfig().coarse_factor)
    floor_cpu_rate = tokens_of("default", None) / cpu["floor: backbone"]
    default_cpu_rows = n / cpu[variants[0][0]]
    header = ("| method | padding | rows/s | tokens/s | x floor (tokens/s) | x default (rows/s) | CPU ms / row "
              "| x floor (tokens / CPU-s) | x default (rows / CPU-s) |")
    sep = "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    if quality:
        header += " lift of top N | domain recall in top M |"
        sep += "---:|---:|"
    lines = [header, sep]
    def cells(name, tokens, prompt="default", cap=None):
        rate, cpu_rate = tokens / best[name], tokens / cpu[name]
        padded = padded_tokens([s[:cap] if cap else s for s in seqs[prompt]], args.batch_tokens)
        return (f"| {name} | {(padded - tokens) / padded:.0%} | {n / best[name]:.1f} | {rate:.0f} | {rate / floor_rate:.2f} | "
                f"{n / best[name] / default_rows_s:.2f} | {1000 * cpu[name] / n:.0f} | {cpu_rate / floor_cpu_rate:.2f} | "
                f"{n / cpu[name] / default_cpu_rows:.2f} |")

    for name in ("floor: backbone", "floor: model() with the LM head"):
        lines.append(cells(name, tokens_of("default", None)) + (" | |" if quality else ""))
    for label, prompt, layer, cap in variants:
        row = cells(label, tokens_of(prompt, cap), prompt, cap)
        if quality:
            q = quality_rows[label]
            row += f" {q['lift']:.2f} | {q['recall']:.2f} |"
        lines.append(row)
    emb_rate = tokens_of("default", None) / best[variants[0][0]]
    ratio = emb_rate / floor_rate
    cpu_ratio = cpu["floor: backbone"] / cpu[variants[0][0]]
    real = tokens_of("default", None)
    pad = padded_tokens(seqs["default"], args.batch_tokens)
    facts = [
        (f"- Embedder / floor (backbone), tokens/s: {ratio:.2f} (target >= {args.target}): "
        f"{'met' if ratio >= args.target else 'MISSED'}; by CPU time {cpu_ratio:.2f}: "
        f"{'met' if cpu_ratio >= args.target else 'MISSED'}"),
        (f"- padding: {pad - real:,} of {pad:,} padded tokens ({(pad - real) / pad:.1%}) in the Embedder's length-sorted "
        f"batches of {args.batch_tokens} tokens (`features.pack_by_tokens`, longest first)"),
    ]
    if not args.synthetic:
        d = data[("pool", "default")]
        sys_tok = data["system_tokens"]
        full, content = data["full_tokens"], data["content_tokens"]
        used, pool_tokens, pool_rows = sum(min(sys_tok, x) for x in d.n_tokens), sum(d.n_tokens), len(d.n_tokens)
        none_tokens = sum(data[("pool", "none")].n_tokens)
        facts += [
            (f"- default system turn of the chat template: {sys_tok} tokens per row, {used:,} of the {pool_tokens:,} "
             f"tokens of the {pool_rows:,} pool rows ({used / pool_tokens:.1%}) at --max-length {args.max_length}"),
            (f"- all template tokens (system turn, role headers, end-of-turn markers) in the untruncated rows: "
            f"{sum(full) - sum(content):,} of {sum(full):,} ({(sum(full) - sum(content)) / sum(full):.1%})"),
            (f"- pool rows truncated at --max-length {args.max_length}: {sum(d.truncated)} of {pool_rows:,} with the "
             f"default system turn, {sum(data[('pool', 'none')].truncated)} with --system-prompt none; tokens per row "
             f"{pool_tokens / pool_rows:.1f} vs {none_tokens / pool_rows:.1f}"),
        ]
    md = [f"# Coarse stage: the Embedder against a batched forward pass ({'GPU' if device.startswith('cuda') else 'CPU'})",
          "",
          f"- command: `{' '.join(['.venv/bin/python', 'benchmarks/bench_coarse.py'] + (argv if argv is not None else sys.argv[1:]))}`",
          f"- machine: {machine_line(device)}; 1-minute load average at the end {load:.1f}",
          f"- model: {model_path} ({n_layers} layers, dtype {args.dtype}), LoRA adapter of the select warm-up"
          + ("" if quality else " (untrained: --skip-quality)"),
          f"- rows: {n} pool rows timed" + (f", {len(ids)} for the quality" if quality else "") + (f" of the demo corpus ({args.domain_label} 5%), prompt/response through the chat "
                                     f"template, --max-length {args.max_length}" if not args.synthetic else
                                     f" of random tokens, {args.max_length // 4}..{args.max_length} tokens"),
          (f"- rates: wall time, best of {args.repeats} interleaved runs, real (unpadded) tokens of the rows each variant "
           f"embeds; --batch-tokens {args.batch_tokens}; CPU columns: this process's CPU seconds in that best run "
           "(less disturbed by other load than wall time); padding: the share of padded positions in the length-sorted "
           "batches of the timed rows (few timed rows make few batches, so rows of mixed lengths share one: a 2,048-row "
           "shard of the product is cut into more, more uniform batches)"),
          "", *lines, "", *facts]
    if quality:
        md += [(f"- quality: the coarse stage's votes (K = {args.budget} per anchor, {args.n_domain} anchors embedded "
               f"with the same options), label lift of the top {args.budget} rows (1 = random) and the share of the "
               f"pool's domain rows among the top M = {SelectConfig().coarse_factor * args.budget} candidates. One seed, "
               "one domain: no spread.")]
    md += [f"- total time: {time.time() - started:.0f} s", ""]
    write_report("\n".join(md), out_path)
    print(json.dumps({"ratio": ratio, "cpu_ratio": cpu_ratio, "target": args.target, "met": ratio >= args.target}))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
