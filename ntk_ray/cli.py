"""``ntk-ray``: the command line. Every subcommand's --help is meant to be enough to use it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

from ntk_ray.io.fs import redact
from ntk_ray.version import __version__
from ntk_ray.config import FeaturesConfig, ScoreConfig, SelectConfig

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
                    coarse_sim, selected (rank <= budget, or fewer under --budget-tokens),
                    source, row, n_tokens
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


# ---- flags generated from the config dataclasses (ntk_ray/config.py holds defaults and help) ----

def _field_type(cls, f) -> tuple[str, type]:
    """("list" | "bool" | "value", element type) of a config field: ``list[str]``, ``bool``,
    ``int``, ``float``, ``str``, or one of them ``| None``."""
    t = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(t) if a is not type(None)]
    if typing.get_origin(t) is list:
        return "list", args[0]
    if args:  # X | None
        t = args[0]
    return ("bool" if t is bool else "value"), t


def _resolve(value):
    """A registry (choices, help) is a function, called when the parser is built."""
    return value() if callable(value) else value


def shown_default(f) -> str:
    """How ``--help`` writes a field's default."""
    if "shown_default" in f.metadata:
        return f.metadata["shown_default"]
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def flag_name(f) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def add_config_flags(parser: argparse.ArgumentParser, cls, *, only=None, from_config=True, groups=None) -> None:
    """One flag per field of the dataclass ``cls`` (or per field named in ``only``), with the
    field's help, choices and default; with ``groups`` (a dict, filled with the argument groups
    made), under the field's group heading.

    ``from_config``: the flag's argparse default is SUPPRESS, so the parsed namespace holds
    only the flags given on the command line; ``config_from_args`` lays them over the
    ``--config`` file and the dataclass defaults, and checks the required ones itself (they may
    come from the file). Otherwise the dataclass default is the argparse default (``finetune``
    and ``evaluate`` share fields of ``SelectConfig`` without being one)."""
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        m = f.metadata
        target = parser
        if groups is not None and m.get("group"):
            if m["group"] not in groups:
                groups[m["group"]] = parser.add_argument_group(m["group"])
            target = groups[m["group"]]
        kind, typ = _field_type(cls, f)
        ending = "required: here or in --config" if m.get("required") and from_config else f"default: {shown_default(f)}"
        kw = {"dest": f.name, "help": f"{_resolve(m['help'])} ({ending})".replace("%", "%%")}
        if kind == "bool":
            kw["action"] = "store_true"
        else:
            kw.update(type=typ, metavar=m.get("metavar"), choices=_resolve(m.get("choices")))
            if kind == "list":
                kw["nargs"] = "+"
        if from_config:
            kw["default"] = argparse.SUPPRESS
        else:
            kw["default"] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        target.add_argument(flag_name(f), **kw)


def _add_run_flags(p: argparse.ArgumentParser, group=None) -> None:
    """--config, --print-config and --overwrite: the flags of a config command that are not config fields."""
    p.add_argument("--config", metavar="TOML", default=None,
                   help="read the settings from a TOML file of field names (the flag names with _ for -) and "
                        "values, e.g. the `config` of a run's manifest.json; flags given here override it "
                        "(default: %(default)s)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved settings as a TOML file for --config and exit without running "
                        "(default: %(default)s)")
    (group or p).add_argument("--overwrite", action="store_true",
                              help="replace an existing --out that holds a different run (default: %(default)s)")
    _add_output_flags(p, group)


def _add_output_flags(p: argparse.ArgumentParser, group=None) -> None:
    """--verbose / --quiet: how much the run prints on stderr (not part of the run's identity)."""
    how = (group or p).add_mutually_exclusive_group()
    how.add_argument("--verbose", action="store_const", const="verbose", dest="verbosity", default="normal",
                     help="also print what Ray and the libraries say about expected conditions: Ray's info logs, "
                          "Ray Data's progress bars, model-loading bars, library warnings (default: stage lines and "
                          "progress with rows/s and ETA)")
    how.add_argument("--quiet", action="store_const", const="quiet", dest="verbosity",
                     help="print only errors and the final summary (default: stage lines and progress)")


def _progress(args):
    from ntk_ray.progress import Progress

    return Progress(verbosity=getattr(args, "verbosity", "normal"))


#: the subcommands whose flags are generated from a config dataclass
CONFIG_COMMANDS = {"select": SelectConfig, "features": FeaturesConfig, "score": ScoreConfig}
MODEL_FIELDS = ("model", "max_length", "on_too_long", "text_column", "prompt_column", "response_column", "id_column",
                "messages_column", "assistant_turns", "system_prompt")


class ConfigError(ValueError):
    """A --config file that cannot be used (one line; exit 2)."""


def _check_value(cls, f, value, where: str):
    kind, typ = _field_type(cls, f)
    if kind == "list":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, typ) for v in value):
            raise ConfigError(f"{where}: {f.name} must be a list of {typ.__name__} (got {value!r})")
        return list(value)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, typ) or (typ is not bool and isinstance(value, bool)):
        raise ConfigError(f"{where}: {f.name} must be {typ.__name__} (got {value!r})")
    choices = _resolve(f.metadata.get("choices"))
    if choices is not None and value not in choices:
        raise ConfigError(f"{where}: {f.name} {value!r} is not one of {', '.join(choices)}")
    return value


def read_config_file(cls, path: str) -> dict:
    """Field values from a TOML file (``field = value``, no tables): a key that is not a field
    of ``cls`` is an error, a missing one keeps its default (TOML has no null)."""
    import tomllib

    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path}: not valid TOML ({e})") from None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(f"--config {path}: unknown key {key!r} (not a setting of {cls.__name__})")
    return {k: _check_value(cls, fields[k], v, f"--config {path}") for k, v in data.items()}


def config_from_args(cls, args):
    """The dataclass from its defaults, then the ``--config`` file, then the flags given on the
    command line. A required field given neither way is an error (argparse's wording)."""
    values = read_config_file(cls, args.config) if getattr(args, "config", None) else {}
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values.update({k: list(v) if isinstance(v, list) else v for k, v in given.items()})
    missing = [flag_name(f) for f in dataclasses.fields(cls) if f.metadata.get("required") and f.name not in values]
    if missing and not getattr(args, "print_config", False):
        raise ConfigError(f"the following arguments are required: {', '.join(missing)} (here or in --config)")
    return cls(**values)


def select_config(args) -> SelectConfig:
    return config_from_args(SelectConfig, args)


def config_toml(cfg) -> str:
    """``cfg`` as a TOML file that ``--config`` reads back to an equal config (None values are
    left out: TOML has no null, and a missing key is the default, which is None for those)."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v, ensure_ascii=False)  # a TOML basic string
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"no TOML for {v!r}")

    lines = [f"# ntk-ray {type(cfg).__name__}: `--config FILE` reads it back; flags given with it override it"]
    for name, v in dataclasses.asdict(cfg).items():
        lines.append(f"# {name} = (unset: the default)" if v is None else f"{name} = {value(v)}")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    from ntk_ray.core.scoring import SCORERS

    parser = OneLineErrorParser(prog="ntk-ray", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ntk-ray {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineErrorParser)

    s = sub.add_parser("select", help="select the N pool samples most useful for the domain",
                       description=DESCRIPTION, epilog=SELECT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {}
    add_config_flags(s, SelectConfig, groups=groups)
    _add_run_flags(s, groups["execution"])

    d = sub.add_parser("demo", help="run select on the bundled labelled demo corpus and report the label lift",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Builds a domain set, a held-out set and a pool from the bundled WordNet corpus, runs "
                                   "`select` with the bundled SmolLM2-135M-Instruct model on an embedded Ray, and reports how "
                                   "much the selection over-represents the domain compared with the pool and with a random pick.")
    d.add_argument("--out", default="runs/demo", metavar="DIR",
                   help="directory of the demo data and of the select run (default: %(default)s)")
    d.add_argument("--domain-label", default="noun.food",
                   help="WordNet lexicographer file used as the domain (default: %(default)s)")
    d.add_argument("--n-domain", type=int, default=48, help="domain rows (default: %(default)s)")
    d.add_argument("--n-pool", type=int, default=1000, help="pool rows (default: %(default)s)")
    d.add_argument("--budget", type=int, default=50, help="how many pool rows to select (default: %(default)s)")
    d.add_argument("--scorer", default=SelectConfig.scorer, choices=SCORERS,
                   help="scorer of the NTK stage (see `select --help`) (default: %(default)s)")
    d.add_argument("--seed", type=int, default=0,
                   help="seed of the split, the warm-up and the projection (default: %(default)s)")
    d.add_argument("--max-length", type=int, default=64,
                   help="tokens per sample (the demo rows are short) (default: %(default)s)")
    d.add_argument("--warmup-epochs", type=float, default=1.0, help="epochs of the warm-up (default: %(default)s)")
    d.add_argument("--overwrite", action="store_true", help="replace an existing select run in OUT/select (default: %(default)s)")
    _add_output_flags(d)

    ft = sub.add_parser("features", help="NTK features of any data, as Parquet shards (to score later with `score`)",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Projected LoRA gradients psi(x) of every usable row of --data, written as Parquet shards into "
                                    "--out (id, feature, norm, key, source, row, reject; projector spec and adapter hash in the file "
                                    "metadata). Featurise a pool once, then score it against any domain featurised with the same "
                                    "--adapter, --projector, --proj-dim and --seed.",
                        epilog="example:\n  ntk-ray features --data 'pool/*.parquet' --adapter runs/med/_work/warmup/adapter --out feats/pool\n"
                               "  ntk-ray features --data med.jsonl --adapter runs/med/_work/warmup/adapter --out feats/med\n"
                               "  ntk-ray score --features feats/pool --anchors feats/med --budget 9000 --out runs/med-rescored")
    add_config_flags(ft, FeaturesConfig)
    _add_run_flags(ft)

    sc = sub.add_parser("score", help="rank a feature directory against the anchors of another",
                        description="Scores every row of --features against the rows of --anchors (both made by `ntk-ray features`, "
                                    "or by `select --keep-features`: OUT/_work/features and OUT/_work/anchor_features) and writes "
                                    "ranked.parquet, selected.parquet, rejects.parquet and manifest.json into --out.")
    add_config_flags(sc, ScoreConfig)
    _add_run_flags(sc)

    f = sub.add_parser("finetune", help="LoRA fine-tune on one or more data files and save the adapter")
    f.add_argument("--train", nargs="+", required=True, metavar="PATH", help="the training rows (required)")
    f.add_argument("--out", required=True, metavar="DIR", help="where the adapter is saved (required)")
    add_config_flags(f, SelectConfig, only=MODEL_FIELDS, from_config=False)
    f.add_argument("--seed", type=int, default=SelectConfig.seed,
                   help="seed of the LoRA initialisation and of the batch order (default: %(default)s)")
    f.add_argument("--epochs", type=float, default=SelectConfig.warmup_epochs,
                   help="training epochs (default: %(default)s)")
    f.add_argument("--lr", type=float, default=SelectConfig.warmup_lr, help="learning rate (default: %(default)s)")
    add_config_flags(f, SelectConfig, only=("lora_r", "lora_alpha", "lora_targets"), from_config=False)
    from ntk_ray.config import LocalModelOptions

    add_config_flags(f, SelectConfig, only=("dtype",), from_config=False)
    add_config_flags(f, LocalModelOptions, from_config=False)  # --accelerator, the LR schedule, accumulation

    e = sub.add_parser("evaluate", help="mean per-token loss and perplexity on response tokens (and multiple-choice "
                                        "accuracy), as one JSON object",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Prints one JSON object: loss (mean per-token loss on the response positions), "
                                   "perplexity, tokens, rows, rejected, unreadable; and, when the rows carry a list of "
                                   "`choices` and an `answer` (index or the right choice's text): accuracy (the choice "
                                   "with the highest mean log-likelihood per token given the prompt), accuracy_rows, "
                                   "choices_per_row, accuracy_skipped (rows whose prompt + choice does not fit). (default: %(default)s)")
    e.add_argument("--data", nargs="+", required=True, metavar="PATH", help="the rows to evaluate on (required)")
    e.add_argument("--adapter", default=None, metavar="DIR",
                   help="peft adapter to load on the model (default: %(default)s: the base model)")
    e.add_argument("--choices-column", default="choices", metavar="NAME",
                   help="column holding the list of choices (default: %(default)s)")
    e.add_argument("--answer-column", default="answer", metavar="NAME",
                   help="column holding the right choice (its index or its text) (default: %(default)s)")
    add_config_flags(e, SelectConfig, only=MODEL_FIELDS, from_config=False)
    e.add_argument("--seed", type=int, default=SelectConfig.seed,
                   help="accepted like the other commands' --seed; the evaluation is deterministic (default: %(default)s)")
    add_config_flags(e, SelectConfig, only=("dtype",), from_config=False)
    add_config_flags(e, LocalModelOptions, only=("accelerator",), from_config=False)

    r = sub.add_parser("report", help="(re)build the selection report of a select output directory",
                       description="Writes OUT/report.html (self-contained: plots embedded, works offline), OUT/report.md "
                                   "and OUT/report/*.png from the files of a finished `select` run: the funnel from pool "
                                   "to selection with the rejects by reason, the score histogram with the cut and its "
                                   "margin, the composition of the selection against the pool by input file and token "
                                   "length, examples around the cut, the near-duplicate share of the selection, and the "
                                   "cost per stage with a projection to a 1M-row pool. `select` builds it at its end; "
                                   "this rebuilds it (e.g. after a failed build) and reads files only: no Ray, no model.")
    r.add_argument("out", metavar="OUT", help="the --out directory of a finished select run (a local directory)")
    return parser


def print_summary(manifest: dict, out: str, stream=None) -> None:
    stream = stream or sys.stdout  # looked up at call time (a redirected stdout is honoured)
    c = manifest["counts"]
    print(f"\nntk-ray select: done in {sum(manifest['stage_seconds'].values()):.1f}s", file=stream)
    print(f"  pool rows read {c['pool_rows']}, rejected {c['rejected']}, ranked {c['ranked']}, selected {c['selected']}", file=stream)
    print(f"  domain rows read {c['domain_rows']}, rejected {c['domain_rejected']}; truncated: pool {c['pool_truncated']}, "
          f"domain {c['domain_truncated']}", file=stream)
    print("  stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in manifest["stage_seconds"].items()), file=stream)
    for name in ("ranked.parquet", "selected.parquet", "rejects.parquet", "manifest.json"):
        print(f"  {redact(str(out)).rstrip('/')}/{name}", file=stream)
    from ntk_ray.runner import demo_model_notice

    notice = demo_model_notice(manifest.get("config", {}).get("model", "?"))
    if notice:
        print(f"  note: {notice}", file=stream)
    report = manifest.get("report")
    if report and report.get("error"):
        print(f"  report: not built ({report['error']}); build it with `ntk-ray report OUT`", file=stream)
    elif report:
        print(f"  report: {redact(str(out)).rstrip('/')}/{report['html']}", file=stream)
        for line in report["key_lines"]:
            print(f"    {line}", file=stream)


def _tokenized(paths, args):
    """Read + tokenize files on the driver (small sets: finetune/evaluate)."""
    from ntk_ray.io.paths import resolve_paths
    from ntk_ray.io.rows import Columns, check_columns, read_file_rows
    from ntk_ray.models import load_tokenizer
    from ntk_ray.stages.workers import ReadAndTokenize, ReadSpec

    cols = Columns.of(args)
    flag = "--train" if args.command == "finetune" else "--data"  # the flag the user gave the files with
    files = resolve_paths(paths, flag)
    mode = check_columns(files, cols, flag)
    reader = ReadAndTokenize.__new__(ReadAndTokenize)
    reader.spec = ReadSpec("data", mode, cols, args.model, args.max_length, args.on_too_long,
                           system_prompt=args.system_prompt)
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


def _validate_shared(args) -> None:
    """finetune / evaluate: the numbers they share with ``select`` in the same ranges (declared
    once, in ``config.py``), before any work; finetune's ``--out`` must not be a file."""
    from ntk_ray.config import LocalModelOptions, validate_values

    values = {"max_length": args.max_length, "seed": args.seed}
    if args.command == "finetune":
        validate_values(LocalModelOptions, {"warmup_ratio": args.warmup_ratio, "grad_accum_steps": args.grad_accum_steps,
                                            "train_batch_tokens": args.train_batch_tokens})
        import os

        from ntk_ray.io.accounting import UsageError

        values |= {"lora_r": args.lora_r, "lora_alpha": args.lora_alpha, "warmup_epochs": args.epochs,
                   "warmup_lr": args.lr}
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise UsageError(f"--out {args.out} is an existing file, not a directory; choose a directory")
    validate_values(SelectConfig, values, {"warmup_epochs": "--epochs", "warmup_lr": "--lr"})


def _device_and_dtype(args) -> tuple[str, str]:
    """finetune / evaluate: the device (``--accelerator``: this machine's GPU when it has one) and
    the model's dtype (``--dtype auto``: bfloat16 on a GPU that supports it, else float32)."""
    from ntk_ray.models import local_device, resolve_dtype

    device = local_device(args.accelerator)
    return device, resolve_dtype(args.dtype, device)


def cmd_finetune(args) -> int:
    from ntk_ray.models import attach_lora, load_model
    from ntk_ray.core.training import TrainConfig, train_lora

    _validate_shared(args)
    device, dtype = _device_and_dtype(args)
    seqs, masks, rejected = _tokenized(args.train, args)
    model = attach_lora(load_model(args.model, dtype=dtype, device=device), r=args.lora_r, alpha=args.lora_alpha,
                        targets=tuple(args.lora_targets), seed=args.seed)
    print(f"ntk-ray finetune: {len(seqs)} rows, the model on {device} in {dtype} (LoRA weights float32)", file=sys.stderr)
    tc = TrainConfig(epochs=args.epochs, lr=args.lr, seed=args.seed, batch_tokens=args.train_batch_tokens,
                     lr_schedule=args.lr_schedule, warmup_ratio=args.warmup_ratio, grad_accum_steps=args.grad_accum_steps)
    history = train_lora(model, seqs, masks, tc, device=device, log=lambda m: print(m, file=sys.stderr))
    model.save_pretrained(args.out)
    setup = {"device": device, "dtype": dtype, "lr": args.lr, "lr_schedule": args.lr_schedule,
             "warmup_ratio": args.warmup_ratio, "grad_accum_steps": args.grad_accum_steps,
             "batch_tokens": args.train_batch_tokens}
    (Path(args.out) / "ntk_ray_train.json").write_text(
        json.dumps({"rows": len(seqs), "tokens": sum(map(len, seqs)), "rejected": rejected, **setup, **history}, indent=2))
    print(json.dumps({"adapter": args.out, "rows": len(seqs), "rejected": rejected, "final_loss": history["epoch_loss"][-1],
                      "steps": history["steps"], "device": device, "dtype": dtype}))
    return 0


def cmd_evaluate(args) -> int:
    """Loss/perplexity on the response tokens, and multiple-choice accuracy when the rows carry
    ``choices`` and ``answer`` (``evaluation.evaluate_rows``)."""
    from ntk_ray.io.accounting import UsageError
    from ntk_ray.core.evaluation import evaluate_rows
    from ntk_ray.io.paths import resolve_paths
    from ntk_ray.io.rows import read_records
    from ntk_ray.models import load_adapter, load_model, load_tokenizer

    _validate_shared(args)
    rows, unreadable = [], 0
    for path in resolve_paths(args.data, "--data"):
        good, bad = read_records(path)
        rows.extend(good)
        unreadable += len(bad)
        for row, reason in bad[:3]:
            print(f"ntk-ray evaluate: {path}:{row}: {reason} (skipped)", file=sys.stderr)
    if not rows:
        raise UsageError(f"--data {' '.join(args.data)}: no readable rows")
    device, dtype = _device_and_dtype(args)
    model = load_model(args.model, dtype=dtype, device=device)
    if args.adapter:
        model = load_adapter(model, args.adapter).to(device)
    result = evaluate_rows(model, load_tokenizer(args.model), rows, max_length=args.max_length, device=device,
                           text_column=args.text_column, prompt_column=args.prompt_column,
                           response_column=args.response_column, choices_column=args.choices_column,
                           answer_column=args.answer_column, on_too_long=args.on_too_long,
                           messages_column=args.messages_column, assistant_turns=args.assistant_turns,
                           system_prompt=args.system_prompt)
    result.pop("predictions", None)
    print(json.dumps(result | {"unreadable": unreadable, "adapter": args.adapter, "device": device, "dtype": dtype}))
    return 0


def cmd_demo(args) -> int:
    from ntk_ray.demo import make_demo_split
    from ntk_ray.demo.report import label_lift_report
    from ntk_ray.runner import run_select

    make_demo_split(Path(args.out) / "data", domain_label=args.domain_label, n_domain=args.n_domain,
                    n_pool=args.n_pool, seed=args.seed)
    data = Path(args.out) / "data"
    cfg = SelectConfig(domain=[str(data / "domain.jsonl")], pool=[str(data / "pool.parquet")], budget=args.budget,
                       out=str(Path(args.out) / "select"), max_length=args.max_length, scorer=args.scorer,
                       warmup_epochs=args.warmup_epochs, seed=args.seed)
    manifest = run_select(cfg, overwrite=args.overwrite, progress=_progress(args))
    print_summary(manifest, cfg.out)
    print(label_lift_report(Path(cfg.out), data / "pool.parquet", args.domain_label, args.budget, args.seed))
    return 0


def cmd_report(args) -> int:
    """Build OUT's report (``ntk_ray.report``), record it in OUT/manifest.json, print its paths
    and key lines."""
    from ntk_ray.io.accounting import UsageError
    from ntk_ray.report import ReportError, build_report, record, report_entry

    try:
        rep = build_report(args.out)
        record(args.out, json.loads((Path(args.out) / "manifest.json").read_text()), report_entry(rep))
    except ReportError as e:
        raise UsageError(f"report {e}") from None
    print(f"ntk-ray report: {rep.html} ({rep.seconds:.1f}s)")
    print(f"  {rep.md}, {Path(rep.plots[0]).parent}/ ({len(rep.plots)} plots)")
    for line in rep.key_lines:
        print(f"  {line}")
    return 0


def cmd_config(args) -> int:
    """select, features, score: the config from defaults, --config and flags, then the job (through
    ``ntk_ray.runner``, the one door to the job layer)."""
    from ntk_ray import runner

    from ntk_ray.config import validate

    cfg = config_from_args(CONFIG_COMMANDS[args.command], args)
    if args.print_config:
        sys.stdout.write(config_toml(cfg))
        return 0
    validate(cfg)  # every number in its range, --out not a file: before any work
    if args.command == "select":
        manifest = runner.run_select(cfg, overwrite=args.overwrite, progress=_progress(args))
        print_summary(manifest, cfg.out)
    elif args.command == "features":
        m = runner.run_features(cfg, overwrite=args.overwrite, progress=_progress(args))
        print(json.dumps({"out": redact(cfg.out), **m["counts"], "seconds": m["stage_seconds"]}))
    else:
        m = runner.run_score(cfg, overwrite=args.overwrite, progress=_progress(args))
        print(json.dumps({"out": redact(cfg.out), **m["counts"]}))
    return 0


def main(argv=None) -> int:
    from ntk_ray.io.accounting import UsageError

    args = build_parser().parse_args(argv)
    try:
        if args.command in CONFIG_COMMANDS:
            return cmd_config(args)
        if args.command == "demo":
            return cmd_demo(args)
        if args.command == "finetune":
            return cmd_finetune(args)
        if args.command == "evaluate":
            return cmd_evaluate(args)
        if args.command == "report":
            return cmd_report(args)
    except (UsageError, ConfigError) as e:
        print(f"ntk-ray: error: {redact(str(e))}", file=sys.stderr)
        return 2
    except ValueError as e:
        # input/model errors from the library (InputError, ModelError) are one-line ValueErrors, and
        # so is a plain ValueError that names a flag (e.g. "--domain: non-finite gradients ...",
        # raised in a worker: the executor hands it over unwrapped from Ray's exceptions)
        message = str(e)
        if type(e).__name__ in ("InputError", "ModelError") or (
                type(e) is ValueError and message.startswith("--") and "\n" not in message):
            print(f"ntk-ray: error: {redact(message)}", file=sys.stderr)
            return 2
        raise
    except Exception as e:
        if getattr(e, "user_facing", False):  # a run that failed for a reason said in one line
            print(f"ntk-ray: error: {redact(str(e))}", file=sys.stderr)
            return 1
        raise
    return 1


if __name__ == "__main__":
    sys.exit(main())
