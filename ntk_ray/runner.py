"""The stage runner: checks the inputs, opens the output directory, runs a selector's plan and
owns resume.

    run_select(cfg)  ->  check_inputs  ->  open OUT (stamp)  ->  plan = registry[cfg.selector]
                     ->  for stage in plan: reuse its saved result, or run it and save it
                     ->  keep or drop the intermediate shards  ->  manifest

Resume is one mechanism for every stage (``stages.base``, ``io.markers``): a stage that
finished left its result under ``_work/<stage>/`` and, after it, a ``_SUCCESS`` marker; a rerun
of the same config loads that result instead of running the stage. Inside the model stages the
workers skip the shards they already wrote (unit markers, same module).

Where the stages run is the executor's business: ``RayExecutor`` (the CLI, ``ray job submit``,
KubeRay) or ``LocalExecutor`` (in this process; tests, benchmarks, notebooks). The executor is
started only when a stage has to run, so a rerun of a complete run starts no Ray.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ntk_ray.config import MIN_DOMAIN_ROWS, FeaturesConfig, ScoreConfig, SelectConfig
from ntk_ray.io.accounting import UsageError
from ntk_ray.io.fs import redact
from ntk_ray.io.location import rmtree
from ntk_ray.io.markers import is_done, mark_done
from ntk_ray.io.outdir import open_out_dir, releases_out_locks, work_location
from ntk_ray.progress import Progress
from ntk_ray.stages.base import Context, Stage, load_result, save_result


@dataclass
class CheckedInputs:
    """What ``check_inputs`` found: the resolved files of each role, their column mode, the
    column names and the resolved model path."""
    columns: object  # io.rows.Columns
    paths: dict  # role -> [file, ...]
    modes: dict  # role -> "text" | "prompt_response" | "chat"
    model_path: str


def columns_of(cfg):
    from ntk_ray.io.rows import Columns

    return Columns.of(cfg)


def check_model(cfg, lora_targets=None) -> str:
    """Resolve the model (converting the demo GGUF if needed), load its tokenizer, check the
    LoRA targets: every model problem as one UsageError before any work."""
    from ntk_ray.models import ModelError, check_lora_targets, load_tokenizer, resolve_model

    try:
        from ntk_ray.models.loading import check_model_files

        model = resolve_model(cfg.model)
        load_tokenizer(cfg.model)  # no tokenizer files; no pad, eos or unk token
        check_model_files(cfg.model)  # no config.json; no weight files
        if lora_targets is not None:
            check_lora_targets(cfg.model, lora_targets)
        _check_embed_layer(cfg, model)
    except ModelError as e:
        message = str(e)
        raise UsageError(message if message.startswith("--") else f"--model: {message}") from None
    return model


def _check_embed_layer(cfg, model: str) -> None:
    """--embed-layer K names hidden_states[K]: K may be 0 (the token embeddings) up to the number
    of decoder layers. Checked here from the model's config, not in a worker after the warm-up."""
    layer = getattr(cfg, "embed_layer", None)
    if layer is None:
        return
    from transformers import AutoConfig

    from ntk_ray.models import ModelError

    try:
        layers = getattr(AutoConfig.from_pretrained(model), "num_hidden_layers", None)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read the config of {model}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if layers is not None and layer > layers:
        raise UsageError(f"--embed-layer {layer}: the model has {layers} decoder layers; choose 0 (the token "
                         f"embeddings) to {layers}, or leave it out for the final layer")


def _check_out_outside_inputs(cfg, inputs: dict) -> None:
    """An --out (or --work-dir) inside a directory given as input would be read as input by the
    next run (its ranked.parquet is a pool file): refused, as is an input file under --out."""
    import os

    from ntk_ray.io.fs import is_uri

    places = [("--out", cfg.out), ("--work-dir", getattr(cfg, "work_dir", None))]
    for oflag, place in places:
        if not place or is_uri(str(place)):
            continue
        here = os.path.realpath(os.path.expanduser(str(place)))
        for flag, (specs, files) in inputs.items():
            for spec in [specs] if isinstance(specs, (str, os.PathLike)) else list(specs or []):
                spec = str(spec)
                if is_uri(spec) or not os.path.isdir(os.path.expanduser(spec)):
                    continue
                root = os.path.realpath(os.path.expanduser(spec))
                if here == root or here.startswith(root.rstrip(os.sep) + os.sep):
                    raise UsageError(f"{oflag} {place} is inside the {flag} directory {spec}: the next run would read "
                                     f"this run's files as input; choose an {oflag} outside it")
            for f in files:
                if not is_uri(f) and os.path.realpath(f).startswith(here.rstrip(os.sep) + os.sep):
                    raise UsageError(f"{flag} file {f} is inside {oflag} {place}; keep inputs and outputs apart")


def check_inputs(cfg: SelectConfig) -> CheckedInputs:
    """Everything that can be checked before work starts: files, columns, row counts, flags,
    model, tokenizer and LoRA targets. Raises UsageError (one line) and starts nothing."""
    from ntk_ray.core.scoring import SCORERS
    from ntk_ray.io.paths import InputError, resolve_paths
    from ntk_ray.io.rows import check_columns, count_rows
    from ntk_ray.config import validate
    from ntk_ray.stages.registry import get_selector

    validate(cfg)  # every number in its declared range; --out not an existing file
    if cfg.scorer not in SCORERS:
        raise UsageError(f"--scorer {cfg.scorer!r}: choose {', '.join(SCORERS[:-1])} or {SCORERS[-1]}")
    try:
        selector = get_selector(cfg.selector)
    except KeyError as e:
        raise UsageError(e.args[0]) from None
    if selector.check:
        selector.check(cfg)
    if cfg.on_too_long not in ("truncate", "reject"):
        raise UsageError(f"--on-too-long {cfg.on_too_long!r}: choose truncate or reject")
    if cfg.adapter:  # a local directory or an object-store prefix (copied where it is loaded)
        from ntk_ray.io.fs import is_uri, redact
        from ntk_ray.io.location import location

        where = location(cfg.adapter) if is_uri(str(cfg.adapter)) else Path(cfg.adapter).expanduser()
        try:
            found = (where / "adapter_config.json").is_file()
        except OSError as e:
            raise UsageError(f"--adapter {redact(str(cfg.adapter))}: cannot read it ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from None
        if not found:
            raise UsageError(f"--adapter {redact(str(cfg.adapter))}: no adapter_config.json (not a saved LoRA adapter)")
    cols = columns_of(cfg)
    try:
        domain = resolve_paths(cfg.domain, "--domain")
        pool = resolve_paths(cfg.pool, "--pool")
        modes = {"domain": check_columns(domain, cols, "--domain"), "pool": check_columns(pool, cols, "--pool")}
        # cheap counts (Parquet footers; JSON only as far as needed)
        n_domain = count_rows(domain, flag="--domain", at_most=MIN_DOMAIN_ROWS)
        n_pool = count_rows(pool, flag="--pool", at_most=cfg.budget)
    except InputError as e:
        raise UsageError(str(e)) from None
    _check_out_outside_inputs(cfg, {"--domain": (cfg.domain, domain), "--pool": (cfg.pool, pool)})
    if n_domain < MIN_DOMAIN_ROWS:
        raise UsageError(f"--domain: {n_domain} rows in {', '.join(domain[:3])}; at least {MIN_DOMAIN_ROWS} are needed")
    if n_pool < cfg.budget:
        raise UsageError(f"--budget {cfg.budget} is larger than the pool ({n_pool} rows in {', '.join(pool[:3])})")
    model = check_model(cfg, None if cfg.adapter else cfg.lora_targets)
    return CheckedInputs(columns=cols, paths={"domain": domain, "pool": pool}, modes=modes, model_path=model)


def demo_model_notice(model: str | None) -> str | None:
    """What a run without ``--model`` says at its start and in its summary: it used the small
    bundled demo model, and how to pass a real one (None when a model was given)."""
    if model:
        return None
    return ("no --model given: this run uses the bundled demo model SmolLM2-135M-Instruct (135M parameters, "
            "for trying ntk-ray out); for a real selection pass the model you will fine-tune: "
            "--model DIR (a local Hugging Face model directory) or --model ORG/NAME (a hub id)")


def executor_factory(cfg) -> Callable[[Progress], object]:
    """The executor the config asks for: Ray (``--executor ray``, the default: address, actors,
    accelerator, wait) or this process (``--executor local``)."""
    def make(progress: Progress):
        if getattr(cfg, "executor", "ray") == "local":
            from ntk_ray.runtime.local import LocalExecutor

            return LocalExecutor(device="cpu" if getattr(cfg, "accelerator", "auto") == "cpu" else None,
                                 verbosity=progress.verbosity)
        from ntk_ray.runtime.ray_executor import RayExecutor

        return RayExecutor(address=cfg.ray_address, actors=getattr(cfg, "actors", None),
                           min_actors=getattr(cfg, "min_actors", None), max_actors=getattr(cfg, "max_actors", None),
                           accelerator=getattr(cfg, "accelerator", "auto"),
                           wait_for_resources=getattr(cfg, "wait_for_resources", 600), log=progress.log,
                           verbosity=progress.verbosity)

    return make


class Runner:
    """Runs a plan (a list of stages) in order, reusing finished stages' saved results."""

    def __init__(self, ctx: Context, make_executor: Callable[[Progress], object]):
        self.ctx = ctx
        self.make_executor = make_executor
        self.results: dict[str, object] = {}

    def _executor(self):
        if self.ctx.executor is None:
            self.ctx.executor = self.make_executor(self.ctx.progress)
            model = getattr(self.ctx.inputs, "model_path", None)
            self.ctx.progress.log(f"executor: {self.ctx.executor.describe()}" + (f"; model {model}" if model else ""))
        return self.ctx.executor

    def run(self, plan: list[Stage]) -> dict[str, object]:
        names = [s.name for s in plan]
        if len(set(names)) != len(names):
            raise ValueError(f"a plan names a stage twice: {names}")
        for stage in plan:
            missing = [n for n in stage.needs if n not in self.results]
            if missing:
                raise ValueError(f"stage {stage.name!r} needs {missing}, which no earlier stage of the plan makes")
            directory = self.ctx.stage_dir(stage.name)
            needed = {n: self.results[n] for n in stage.needs}
            if stage.resumable and is_done(directory):
                try:
                    self.results[stage.name] = load_result(stage.output, directory)
                except (OSError, ValueError, KeyError, TypeError) as e:  # a marker without a readable result
                    self.ctx.progress.log(f"{stage.name}: its saved result is unreadable ({type(e).__name__}); running it again")
                else:
                    self.ctx.progress.log(f"{stage.name}: reusing the finished {stage.title}")
                    continue
            self._executor()
            with self.ctx.progress.stage(stage.name):
                result = stage.run(self.ctx, **needed)
            if stage.resumable:
                save_result(result, directory)
                mark_done(directory, info={"stage": type(stage).__name__})
            self.results[stage.name] = result
        return self.results


def run_plan(cfg, plan: list[Stage], out: Path, inputs, progress: Progress, executor=None,
             make_executor: Callable | None = None, work=None) -> dict[str, object]:
    """``work``: where the stages keep their state (default ``out/_work``; a ``UriPath`` for
    ``--work-dir s3://...``, ``io.outdir.work_location``)."""
    ctx = Context(cfg=cfg, work=out / "_work" if work is None else work, out=out, executor=executor, progress=progress,
                  inputs=inputs)
    return Runner(ctx, make_executor or executor_factory(cfg)).run(plan)


@releases_out_locks  # OUT/_work/.lock is held for the whole run, released on return or error
def run_select(cfg: SelectConfig, overwrite: bool = False, progress: Progress | None = None, executor=None,
               make_executor: Callable | None = None) -> dict:
    """Run the whole selection; returns the manifest (also written to OUT/manifest.json).
    ``executor``: run on this executor (e.g. ``runtime.local.LocalExecutor()``) instead of
    starting Ray."""
    from ntk_ray.report import ReportStage, build_and_record
    from ntk_ray.stages.registry import plan_for
    from ntk_ray.stages.registry import get_selector

    progress = progress or Progress()
    # the driver resolves the model once (converting the demo GGUF if needed) to fail early;
    # workers are handed cfg.model and resolve it themselves, so a node that does not share
    # this machine's cache directory converts or finds its own copy
    inputs = check_inputs(cfg)
    if demo_model_notice(cfg.model):
        progress.log(demo_model_notice(cfg.model))
    # inputs: the files as they are now against the ones this directory's run read (a changed
    # file or a glob that matches other files is refused, the finished run included)
    out, remote = open_out_dir(cfg.out, cfg.work_dir, cfg.identity(), overwrite, progress.log, inputs=inputs.paths)
    work = work_location(out, cfg.work_dir if remote else None)  # a URI --work-dir: the stages' state is there
    plan = plan_for(cfg, publish_to=cfg.out if remote else None)
    plan.insert([s.name for s in plan].index("write") + 1, ReportStage())  # after write, before publish
    last = [s for s in plan if s.resumable][-1].name  # the report is not saved: it reruns with the plan
    if work != out / "_work" and not (out / "manifest.json").exists():
        # a URI work dir and a driver on another machine (or a cleared scratch): a published run's
        # files are fetched back from --out; otherwise the result files are written again from
        # the saved stages (write is cheap) and published
        from ntk_ray.io.storage import fetch_published

        if not (is_done(work / last) and fetch_published(cfg.out, out)):
            names = [s.name for s in plan]
            for name in names[names.index("write"):]:
                (work / name / "_SUCCESS").unlink(missing_ok=True)
    if is_done(work / last) and (out / "manifest.json").exists():
        if remote:
            from ntk_ray.io.storage import is_published, publish

            if not is_published(out, cfg.out):  # e.g. removed at the URI since: manifest.json last again
                publish(out, cfg.out)
        progress.log(f"this run is already complete: outputs in {redact(cfg.out)} (nothing recomputed)")
        if getattr(cfg, "save_hf", None):  # not part of the run's identity: written on request
            import polars as pl

            from ntk_ray.stages.write import save_selection_hf

            save_selection_hf(pl.read_parquet(out / "selected.parquet"), cfg.save_hf, progress.log)
        manifest = json.loads((out / "manifest.json").read_text())
        # a run killed while its report was built, or finished before reports existed
        return manifest if "report" in manifest else build_and_record(out, manifest, progress.log)
    results = run_plan(cfg, plan, out, inputs, progress, executor, make_executor, work=work)
    # the plan ended with write (and publish, for a URI): only now, with the results published,
    # are the intermediate shards (embed/, features/) dropped; a run killed before this point
    # resumes from them
    selector = get_selector(cfg.selector)
    if cfg.keep_features and selector.keeps_features:
        from ntk_ray.stages.features_job import export_features

        export_features(Context(cfg, work, out, None, progress), results["warmup"],
                        results["validate"].usable_domain, results["features"])
    else:
        for stage in ("embed", "features"):
            rmtree(work / stage)
    return results["report"].manifest


@releases_out_locks
def run_features(cfg: FeaturesConfig, overwrite: bool = False, progress: Progress | None = None, executor=None) -> dict:
    """Features of every usable row of ``cfg.data`` into ``cfg.out`` (shards), rejects into
    ``out/_rejects.parquet``, a summary into ``out/_manifest.json`` (``stages.features_job``)."""
    from dataclasses import asdict

    from ntk_ray.io.outdir import prepare_out_dir
    from ntk_ray.io.paths import InputError, resolve_paths
    from ntk_ray.io.rows import check_columns
    from ntk_ray.stages.features_job import features_plan

    from ntk_ray.config import validate

    validate(cfg)
    progress = progress or Progress()
    cols = columns_of(cfg)
    try:
        files = resolve_paths(cfg.data, "--data")
        mode = check_columns(files, cols, "--data")
    except InputError as e:
        raise UsageError(str(e)) from None
    model = check_model(cfg)
    identity = {k: v for k, v in asdict(cfg).items()
                if k not in ("out", "actors", "min_actors", "max_actors", "accelerator", "ray_address", "executor",
                             "batch_tokens")}
    identity["data"] = files
    out = prepare_out_dir(cfg.out, identity, overwrite, inputs={"data": files})
    inputs = CheckedInputs(columns=cols, paths={"data": files}, modes={"data": mode}, model_path=model)
    results = run_plan(cfg, features_plan(), out, inputs, progress, executor)
    return results["summary"].manifest


@releases_out_locks
def run_score(cfg: ScoreConfig, overwrite: bool = False, progress: Progress | None = None, executor=None) -> dict:
    """Rank the rows of a feature directory against the anchors of another (``stages.features_job``).
    ``cfg.out`` may be an object-store URI: the files are written in ``cfg.work_dir`` and copied
    there at the end, as ``select`` does."""
    from ntk_ray.report import ReportStage
    from ntk_ray.stages.features_job import check_score_inputs, score_plan

    from ntk_ray.config import validate

    validate(cfg)
    progress = progress or Progress()
    inputs = check_score_inputs(cfg)
    from ntk_ray.core.selectors import allocation_conflict

    conflict = allocation_conflict(cfg.allocation, cfg.scorer)
    if conflict:
        raise UsageError(conflict)
    out, remote = open_out_dir(cfg.out, cfg.work_dir, cfg.identity(), overwrite, progress.log)
    plan = score_plan(publish_to=cfg.out if remote else None)
    plan.insert([s.name for s in plan].index("write") + 1, ReportStage())  # after write, before publish, as select
    results = run_plan(cfg, plan, out, inputs, progress, executor,
                       work=work_location(out, cfg.work_dir if remote else None))
    return results["report"].manifest
