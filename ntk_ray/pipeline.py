"""The selection job on Ray: the thin layer that moves batches to the math and results out.

Stages (each leaves its output under ``OUT/_work/<stage>`` with a ``_SUCCESS`` marker; a rerun
of the same command with the same config skips finished stages):

  read      Ray Data: files -> ReadAndTokenize actors -> tokens/{domain,pool} Parquet
  validate  driver, Polars: rejects, duplicate ids, domain/pool id overlap, counts
  warmup    one Ray task (GPU if any): LoRA fine-tune on the domain set, save the adapter, and
            compute the (small) domain side: anchor embeddings and anchor NTK features
  embed     Ray Data: pool tokens -> Embedder actors -> embeddings (skipped when pool <= M)
  coarse    Ray tasks per embedding shard: per-anchor top-K, merged exactly -> votes -> top M
  features  Ray Data: candidate tokens -> Featurizer actors -> NTK features Parquet
  score     Ray tasks per feature shard: kernel scores (and per-anchor top-k for round-robin)
  write     driver, Polars: ranked / selected / rejects / manifest

``--selector random|bm25|embedding|less`` replaces warmup..score by ``baseline_stages``
(``selector_stages.py``): the baselines every selection should be compared with.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from ntk_ray.io.accounting import UsageError, account_rows
from ntk_ray.config import SelectConfig
from ntk_ray.core.scoring import SCORERS
from ntk_ray.sharded import merge_topk_tasks, score_shards, scores_frame
from ntk_ray.io.atomic import write_json_atomic, write_parquet_atomic
from ntk_ray.io.outputs import (empty_rejects, nonfinite_scores_rejected, rank_rows, read_parquet_dir, selected_rows)


class Progress:
    """Per-stage progress lines and wall times."""

    def __init__(self, stream=None, clock=time.time):
        self.stream = stream
        self.clock = clock
        self.times: dict[str, float] = {}
        self.started = clock()
        self._stage_t0: float | None = None

    def seconds(self) -> dict[str, float]:
        """Wall seconds per finished stage, the running stage so far, and ``setup``: the time
        outside any stage (input checks, Ray start or connect)."""
        now = self.clock()
        out = dict(self.times)
        if self._stage_t0 is not None:
            out[self._stage_name] = round(now - self._stage_t0, 3)
        out["setup"] = round(now - self.started - sum(out.values()), 3)
        return out

    def log(self, message: str) -> None:
        print(f"[ntk-ray {self.clock() - self.started:7.1f}s] {message}", file=self.stream or sys.stderr, flush=True)

    def stage(self, name: str):
        progress = self

        class _Stage:
            def __enter__(self):
                self.t0 = progress._stage_t0 = progress.clock()
                progress._stage_name = name
                progress.log(f"{name}: start")
                return self

            def __exit__(self, *exc):
                progress._stage_t0 = None
                progress.times[name] = round(progress.clock() - self.t0, 3)
                if exc[0] is None:
                    progress.log(f"{name}: done in {progress.times[name]:.1f}s")

        return _Stage()


# -------------------------------------------------------------------------------------------
# Ray plumbing
def init_ray(address: str | None, progress: Progress, wait_s: float = 600) -> dict:
    """Join a cluster (``--ray-address`` or RAY_ADDRESS, as inside ``ray job submit``/KubeRay)
    or start an embedded local Ray sized to this machine.

    ``wait_s`` (``--wait-for-resources``): how long a stage may wait for its actors to start
    (``DataContext.wait_for_min_actors_s``) and for any progress at all
    (``execution_no_progress_timeout_s``, at least Ray's default 1800 s) before failing with
    a timeout instead of hanging; raise it when an autoscaling cluster must first add GPU nodes."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        pass
    elif address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or None, log_to_driver=False)
    else:
        import torch

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        total = _memory_bytes()
        ray.init(num_cpus=os.cpu_count() or 1, num_gpus=torch.cuda.device_count(), include_dashboard=False,
                 object_store_memory=int(min(2 << 30, max(256 << 20, total * 0.15))), log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    ctx.wait_for_min_actors_s = int(wait_s)
    ctx.execution_no_progress_timeout_s = max(1800.0, float(wait_s))
    resources = ray.cluster_resources()
    progress.log(f"ray: {resources.get('CPU', 0):.0f} CPUs, {resources.get('GPU', 0):.0f} GPUs")
    return resources


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 << 30


def actor_plan(resources: dict, requested: int | None, accelerator: str = "auto") -> dict:
    """Actor pool size and per-actor resources.

    ``auto``: one actor per GPU where the cluster has GPUs now, else CPU actors that leave a
    core for reading and writing; an actor never asks for a GPU the cluster does not have (it
    would wait forever). ``gpu``: GPU actors (``requested`` of them, default one per GPU present,
    at least 1) even when the cluster has no GPU yet: for a KubeRay cluster that autoscales a
    GPU worker group up from zero (see ``--wait-for-resources``). ``cpu``: CPU actors even
    where there are GPUs."""
    if accelerator not in ("auto", "gpu", "cpu"):
        raise UsageError(f"--accelerator {accelerator!r}: choose auto, gpu or cpu")
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 1))
    if accelerator == "gpu":
        return {"size": max(1, requested or gpus), "num_gpus": 1, "num_cpus": 1, "device": "cuda"}
    if gpus and accelerator == "auto":
        size = min(requested or gpus, gpus)
        return {"size": size, "num_gpus": 1, "num_cpus": 1, "device": "cuda"}
    size = requested or max(1, (cpus - 1) // 2)
    size = max(1, min(size, cpus))
    return {"size": size, "num_gpus": 0, "num_cpus": 1, "device": "cpu", "threads": max(1, cpus // size)}


def _stage_done(work: Path, name: str) -> bool:
    return (work / name / "_SUCCESS").exists()


def _mark_done(work: Path, name: str, info: dict | None = None) -> None:
    (work / name).mkdir(parents=True, exist_ok=True)
    (work / name / "_SUCCESS").write_text(json.dumps(info or {}, default=str))


def _stage_info(work: Path, name: str) -> dict:
    return json.loads((work / name / "_SUCCESS").read_text() or "{}")


def _fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


# -------------------------------------------------------------------------------------------
# the job
def prepare_out_dir(out: str | Path, identity: dict, overwrite: bool) -> Path:
    """Create OUT; refuse one that holds a run with a different config (unless overwrite).
    The same config resumes: finished stages are reused."""
    import hashlib

    out = Path(out)
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    stamp = out / "_work" / "config.json"
    if out.exists() and any(out.iterdir()):
        if stamp.exists():
            previous = json.loads(stamp.read_text())
            if previous.get("fingerprint") != fingerprint and not overwrite:
                raise UsageError(f"--out {out} holds a run with a different config; pass --overwrite to replace it or choose another --out")
        elif not overwrite:
            raise UsageError(f"--out {out} exists and is not an ntk-ray run directory; pass --overwrite or choose another --out")
        if overwrite and (not stamp.exists() or json.loads(stamp.read_text()).get("fingerprint") != fingerprint):
            shutil.rmtree(out)
    (out / "_work").mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"fingerprint": fingerprint, "config": identity}, indent=2, default=str))
    return out


def check_inputs(cfg: SelectConfig):
    """Everything that can be checked before work starts: files, columns, row counts, flags,
    model, tokenizer and LoRA targets. Raises UsageError (one line) and starts nothing."""
    from ntk_ray.config import MIN_DOMAIN_ROWS
    from ntk_ray.io.paths import resolve_paths
    from ntk_ray.io.rows import Columns, InputError, check_columns, count_rows
    from ntk_ray.models import ModelError, check_lora_targets, load_tokenizer, resolve_model

    if cfg.budget < 1:
        raise UsageError(f"--budget must be at least 1 (got {cfg.budget})")
    if cfg.scorer not in SCORERS:
        raise UsageError(f"--scorer {cfg.scorer!r}: choose {', '.join(SCORERS[:-1])} or {SCORERS[-1]}")
    if cfg.selector not in ("ntk", "random", "bm25", "embedding", "less"):
        raise UsageError(f"--selector {cfg.selector!r}: choose ntk, random, bm25, embedding or less")
    if cfg.selector == "less" and (cfg.adapter or cfg.warmup != "train"):
        raise UsageError("--selector less needs the warm-up's optimizer state: drop --adapter / --warmup fresh")
    if cfg.on_too_long not in ("truncate", "reject"):
        raise UsageError(f"--on-too-long {cfg.on_too_long!r}: choose truncate or reject")
    if cfg.max_length < 8:
        raise UsageError(f"--max-length must be at least 8 (got {cfg.max_length})")
    if cfg.coarse_factor < 1:
        raise UsageError(f"--coarse-factor must be at least 1 (got {cfg.coarse_factor})")
    if cfg.adapter and not (Path(cfg.adapter).expanduser() / "adapter_config.json").is_file():
        raise UsageError(f"--adapter {cfg.adapter}: no adapter_config.json (not a saved LoRA adapter)")
    cols = Columns(text=cfg.text_column, prompt=cfg.prompt_column, response=cfg.response_column, id=cfg.id_column)
    try:
        domain = resolve_paths(cfg.domain, "--domain")
        pool = resolve_paths(cfg.pool, "--pool")
        modes = {"domain": check_columns(domain, cols, "--domain"), "pool": check_columns(pool, cols, "--pool")}
        # cheap counts (Parquet footers; JSON only as far as needed)
        n_domain = count_rows(domain, flag="--domain", at_most=MIN_DOMAIN_ROWS)
        n_pool = count_rows(pool, flag="--pool", at_most=cfg.budget)
    except InputError as e:
        raise UsageError(str(e)) from None
    if n_domain < MIN_DOMAIN_ROWS:
        raise UsageError(f"--domain: {n_domain} rows in {', '.join(domain[:3])}; at least {MIN_DOMAIN_ROWS} are needed")
    if n_pool < cfg.budget:
        raise UsageError(f"--budget {cfg.budget} is larger than the pool ({n_pool} rows in {', '.join(pool[:3])})")
    try:
        model = resolve_model(cfg.model)
        load_tokenizer(cfg.model)  # no tokenizer files; no pad, eos or unk token
        if not cfg.adapter:
            check_lora_targets(cfg.model, cfg.lora_targets)
    except ModelError as e:
        message = str(e)
        raise UsageError(message if message.startswith("--") else f"--model: {message}") from None
    return cols, {"domain": domain, "pool": pool}, modes, model


def run_select(cfg: SelectConfig, overwrite: bool = False, progress: Progress | None = None) -> dict:
    """Run the whole selection; returns the manifest (also written to OUT/manifest.json)."""
    progress = progress or Progress()
    # the driver resolves the model once (converting the demo GGUF if needed) to fail early;
    # workers are handed cfg.model and resolve it themselves, so a node that does not share
    # this machine's cache directory converts or finds its own copy
    from ntk_ray.io.storage import publish

    cols, paths, modes, model_path = check_inputs(cfg)
    out, remote = open_out_dir(cfg.out, cfg.work_dir, cfg.identity(), overwrite, progress)
    work = out / "_work"
    if _stage_done(work, "write") and (out / "manifest.json").exists():
        if remote:
            publish(out, cfg.out)
        progress.log(f"this run is already complete: outputs in {cfg.out} (nothing recomputed)")
        return json.loads((out / "manifest.json").read_text())
    resources = init_ray(cfg.ray_address, progress, cfg.wait_for_resources)
    plan = actor_plan(resources, cfg.actors, cfg.accelerator)
    progress.log(f"actors: {plan['size']} x ({'1 GPU' if plan['num_gpus'] else 'CPU'}); model {model_path}")

    with progress.stage("read"):
        read_inputs(cfg, cols, paths, modes, cfg.model, work, resources)
    with progress.stage("validate"):
        tables = validate_rows(cfg, work, paths)
    counts = tables["counts"]
    progress.log(f"read {counts['pool_rows']} pool rows ({counts['rejected']} rejected), "
                 f"{counts['domain_rows']} domain rows ({counts['domain_rejected']} rejected)")

    if cfg.selector == "ntk":
        with progress.stage("warmup"):
            warm = warmup(cfg, cfg.model, work, plan, tables["usable"]["domain"], progress)
        with progress.stage("coarse"):
            coarse = coarse_stage(cfg, cfg.model, work, plan, tables, warm, progress)
        with progress.stage("features"):
            features_stage(cfg, cfg.model, work, plan, coarse["candidates"], warm)
        with progress.stage("score"):
            scored = score_stage(cfg, work, warm, coarse["candidates"])
    else:
        coarse, scored, warm = baseline_stages(cfg, work, plan, tables, progress)
    with progress.stage("write"):
        manifest = write_outputs(cfg, out, tables, coarse, scored, warm, model_path, plan, progress)
    if cfg.keep_features and cfg.selector in ("ntk", "less"):
        export_features(work, warm, tables["usable"]["domain"])
    else:
        for stage in ("embed", "features"):
            shutil.rmtree(work / stage, ignore_errors=True)
    if remote:
        with progress.stage("publish"):
            for path in publish(out, cfg.out):
                progress.log(f"publish: {path}")
    _mark_done(work, "write")
    return manifest


def open_out_dir(out: str, work_dir: str | None, identity: dict, overwrite: bool, progress: Progress) -> tuple[Path, bool]:
    """(the directory the stages write into, whether ``out`` is a URI). For a URI the stages run
    in ``work_dir`` (default ``storage.default_work_dir``), a local or shared directory, and the
    results are copied to the URI at the end (``storage.publish``); an unreachable URI fails
    here, before any work."""
    from ntk_ray.io.storage import default_work_dir, is_uri

    if not is_uri(out):
        return prepare_out_dir(out, identity, overwrite), False
    _check_output_uri(out)
    local = prepare_out_dir(work_dir or default_work_dir(out), identity, overwrite)
    progress.log(f"results go to {out}; working directory {local}")
    return local, True


def _check_output_uri(uri: str) -> None:
    """Fail before any work when the output URI's file system cannot be reached."""
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(uri)
        fs.get_file_info(root)
    except Exception as e:
        raise UsageError(f"--out {uri}: cannot use this location ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e})") from None


def read_inputs(cfg, cols, paths, modes, model, work, resources) -> None:
    """Ray Data: every input file through ReadAndTokenize into tokens/<role>/ Parquet."""
    from ntk_ray.io.paths import fallback_id_prefixes
    from ntk_ray.workers import ReadSpec

    prefixes = fallback_id_prefixes(paths["domain"] + paths["pool"])  # over both roles: see its docstring
    for role in ("domain", "pool"):
        name = f"tokens/{role}"
        if _stage_done(work, name):
            continue
        spec = ReadSpec(role=role, mode=modes[role], columns=cols, model=model,
                        max_length=cfg.max_length, on_too_long=cfg.on_too_long,
                        id_prefixes={p: prefixes[p] for p in paths[role]})
        read_files(paths[role], spec, work / name, resources)
        _mark_done(work, name)


def read_files(files: list[str], spec, target: Path, resources: dict) -> None:
    """Ray Data: files -> ReadAndTokenize actors, which write token shards into ``target``
    (resuming: files with a done-marker there are skipped)."""
    import ray

    from ntk_ray.workers import ReadAndTokenize

    target.mkdir(parents=True, exist_ok=True)
    size = max(1, min(len(files), int(resources.get("CPU", 1)) - 1))  # a CPU stays free for the driver
    ds = ray.data.from_items([{"index": i, "path": p} for i, p in enumerate(files)], override_num_blocks=len(files))
    ds = ds.map_batches(ReadAndTokenize, fn_constructor_args=(spec, str(target)), batch_size=1, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=size), num_cpus=1)
    ds.take_all()


def validate_rows(cfg: SelectConfig, work: Path, paths: dict) -> dict:
    """Rejects (read/tokenize reasons, duplicate ids, pool ids also in the domain set), the
    usable rows of each side, and the counts. Nothing here holds token ids."""
    cols = ["role", "id", "key", "source", "row", "n_tokens", "truncated", "reject"]
    frames = {role: read_parquet_dir(work / f"tokens/{role}", cols) for role in ("domain", "pool")}
    try:
        return account_rows(frames, paths, cfg.budget)
    except UsageError as e:
        if e.rejects is not None:  # let the user see why: OUT/rejects.parquet
            write_parquet_atomic(e.rejects.cast({"row": pl.Int64}), work.parent / "rejects.parquet")
            raise UsageError(f"{e} (all rejects: {work.parent / 'rejects.parquet'})") from None
        raise


def _tokens(work: Path, role: str, keys: pl.DataFrame) -> tuple[list, list, list, list]:
    """(ids, input_ids, loss_masks, score_masks) of the rows in ``keys`` (key, source, row),
    ordered by key; for the small domain side only."""
    df = read_parquet_dir(work / f"tokens/{role}", ["id", "key", "source", "row", "input_ids", "loss_mask", "score_mask"])
    df = df.join(keys, on=["key", "source", "row"], how="semi")
    df = df.sort("key")
    return (df["id"].to_list(), df["input_ids"].to_list(), df["loss_mask"].to_list(), df["score_mask"].to_list())


def warmup(cfg: SelectConfig, model_path: str, work: Path, plan: dict, usable_domain: pl.DataFrame, progress: Progress) -> dict:
    """One Ray task on an accelerator worker: warm-up LoRA on the domain set, save the adapter,
    and compute the anchors' embeddings and NTK features with the warmed-up model."""
    import ray

    stage = work / "warmup"
    if _stage_done(work, "warmup"):
        progress.log("warmup: reusing the finished warm-up")
        return _load_warm(stage)
    _fresh(stage)
    ids, seqs, loss_masks, score_masks = _tokens(work, "domain", usable_domain.select("key", "source", "row"))
    env = {"NTK_RAY_THREADS": str(plan["threads"])} if plan.get("threads") else {}
    task = ray.remote(_warmup_task).options(num_gpus=plan["num_gpus"], num_cpus=1, max_retries=1,
                                            runtime_env={"env_vars": env})
    result = ray.get(task.remote(cfg, model_path, str(stage), ids, seqs, loss_masks, score_masks, plan["device"]))
    for line in result.pop("log"):
        progress.log("warmup: " + line)
    np.save(stage / "anchor_embeddings.npy", result.pop("anchor_embeddings"))
    np.save(stage / "anchor_features.npy", result.pop("anchor_features"))
    (stage / "info.json").write_text(json.dumps(result, default=str, indent=2))
    _mark_done(work, "warmup")
    return _load_warm(stage)


def export_features(work: Path, warm: dict, usable_domain: pl.DataFrame) -> None:
    """--keep-features: the pool features in features/ and the anchors in anchor_features/,
    both in the `ntk-ray features` format (adapter hash in the spec), for `ntk-ray score`."""
    import pyarrow as pa

    from ntk_ray.feature_jobs import SPEC_KEY, adapter_hash, stamp_adapter
    from ntk_ray.workers import fixed_size_list, write_table_atomic

    digest = adapter_hash(warm["adapter_dir"])
    stamp_adapter(feature_files(work / "features"), digest)
    ids = warm["anchor_ids"]
    where = usable_domain.select("id", "key", "source", "row")
    where = pl.DataFrame({"id": ids}).join(where, on="id", how="left")
    spec = dict(warm["projector_spec"], adapter_sha256=digest)
    table = pa.table({"id": pa.array(ids, pa.string()), "key": pa.array(where["key"].to_list(), pa.int64()),
                      "source": pa.array(where["source"].to_list(), pa.string()),
                      "row": pa.array(where["row"].to_list(), pa.int64()),
                      "feature": fixed_size_list(warm["anchor_features"]),
                      "norm": pa.array(np.asarray(warm["anchor_norms"], dtype=np.float32)),
                      "reject": pa.array([None] * len(ids), pa.string())})
    target = work / "anchor_features"
    target.mkdir(exist_ok=True)
    write_table_atomic(table.replace_schema_metadata({SPEC_KEY: json.dumps(spec).encode()}), target / "anchors.parquet")


def _load_warm(stage: Path) -> dict:
    info = json.loads((stage / "info.json").read_text())
    info["anchor_embeddings"] = np.load(stage / "anchor_embeddings.npy")
    info["anchor_features"] = np.load(stage / "anchor_features.npy")
    info["adapter_dir"] = str(stage / "adapter")
    if (stage / "adam_moments.pt").exists():
        info["adam_moments"] = str(stage / "adam_moments.pt")
    return info


def _warmup_task(cfg: SelectConfig, model_path, stage_dir, ids, seqs, loss_masks, score_masks, device) -> dict:
    """Runs on the worker. Plain torch from here on."""
    import torch

    from ntk_ray.core.features import FeatureComputer, mean_pooled_embeddings
    from ntk_ray.models import attach_lora, load_adapter, load_model
    from ntk_ray.core.training import TrainConfig, train_lora

    from ntk_ray.workers import _threads

    _threads()
    torch.manual_seed(cfg.seed)
    lines: list[str] = []
    base = load_model(model_path, device=device)
    if cfg.adapter:
        model = load_adapter(base, cfg.adapter)
        history = {"source": cfg.adapter}
    else:
        model = attach_lora(base, r=cfg.lora_r, alpha=cfg.lora_alpha, targets=tuple(cfg.lora_targets))
        if cfg.warmup == "train":
            tc = TrainConfig(epochs=cfg.warmup_epochs, lr=cfg.warmup_lr, batch_tokens=cfg.warmup_batch_tokens, seed=cfg.seed)
            less = cfg.selector == "less"
            history = train_lora(model, seqs, loss_masks, tc, device=device, log=lines.append,
                                 **({"keep_optimizer_state": True} if less else {}))
            if less:  # LESS preconditions pool gradients with the warm-up's Adam moments
                from ntk_ray.core.training import save_adam_moments

                save_adam_moments(Path(stage_dir) / "adam_moments.pt", history.pop("adam"))
        else:
            history = {"fresh": True}
    if cfg.selector == "less" and not (Path(stage_dir) / "adam_moments.pt").exists():
        raise ValueError("--selector less needs the warm-up's optimizer state: not available with --adapter or --warmup fresh")
    adapter_dir = Path(stage_dir) / "adapter"
    model.save_pretrained(str(adapter_dir))
    model.eval()
    autocast = torch.bfloat16 if device == "cuda" else None
    embeddings = mean_pooled_embeddings(model, seqs, cfg.batch_tokens, device).numpy()
    options = {"objective": "loss"} if cfg.selector == "less" else {}  # LESS anchors: plain loss gradients
    computer = FeatureComputer(model, projector=cfg.projector, dim=cfg.proj_dim, seed=cfg.seed, device=device,
                               autocast_dtype=autocast, **options)
    feats = computer.features(seqs, loss_masks if options else score_masks, cfg.batch_tokens)
    finite = np.isfinite(feats.feature.numpy()).all(axis=1)
    if not finite.all():
        bad = [ids[i] for i in np.nonzero(~finite)[0][:5]]
        raise ValueError(f"--domain: non-finite gradients for {len(bad)} rows, e.g. {bad}")
    return {"log": lines, "history": history, "anchor_ids": ids, "anchor_embeddings": embeddings,
            "anchor_features": feats.feature.numpy(), "anchor_norms": feats.norm.numpy().tolist(),
            "projector": computer.projector.spec() | {"modules": len(computer.shapes)},
            "projector_spec": computer.projector.spec(),
            "lora_parameters": computer.projector.grad_dim}


def model_map(tokens_dir: Path, target: Path, keep_rows: pl.DataFrame, actor_cls, args: tuple, plan: dict) -> None:
    """Ray Data: token shards -> ``actor_cls`` actors (restricted to ``keep_rows``: key, source,
    row), which write one output shard per token shard into ``target``. The shards are read
    inside the actors, so no separate read tasks compete with the model actors for CPUs, and
    shards finished by an earlier, interrupted run are skipped."""
    import ray

    target.mkdir(parents=True, exist_ok=True)
    shards = sorted(str(p) for p in tokens_dir.glob("*.parquet"))
    keep_ref = ray.put(keep_rows.select("key", "source", "row").to_arrow())
    ds = ray.data.from_items([{"path": p} for p in shards], override_num_blocks=max(1, len(shards)))
    env = {"NTK_RAY_THREADS": str(plan["threads"])} if plan.get("threads") else {}
    env.update(plan.get("extra_env", {}))
    ds = ds.map_batches(actor_cls, fn_constructor_args=(str(target), keep_ref, *args), batch_size=1, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=plan["size"]), num_gpus=plan["num_gpus"],
                        num_cpus=plan["num_cpus"], runtime_env={"env_vars": env})
    ds.take_all()


def coarse_stage(cfg, model_path, work, plan, tables, warm, progress) -> dict:
    """Reverse-kNN votes on embeddings; candidates = top M = coarse_factor * budget."""
    import ray

    from ntk_ray.core.coarse import coarse_order, votes
    from ntk_ray.workers import Embedder

    pool = tables["usable"]["pool"].select("id", "key", "source", "row")
    m = cfg.coarse_factor * cfg.budget
    if pool.height <= m:
        progress.log(f"coarse: skipped ({pool.height} usable pool rows <= M = {m})")
        cand = pool.with_columns(pl.lit(None, dtype=pl.Int64).alias("coarse_votes"), pl.lit(None, dtype=pl.Float64).alias("coarse_sim"))
        return {"candidates": cand, "cut": cand.head(0), "skipped": True, "M": m}
    emb_dir = work / "embed"
    if not _stage_done(work, "embed"):
        model_map(work / "tokens/pool", emb_dir, pool, Embedder, (model_path, warm["adapter_dir"], cfg.batch_tokens, plan["device"]), plan)
        _mark_done(work, "embed")
    k = min(cfg.coarse_k or cfg.budget, pool.height)
    anchors_ref = ray.put(warm["anchor_embeddings"])
    files = sorted(str(p) for p in emb_dir.glob("*.parquet"))
    topk = merge_topk_tasks(files, anchors_ref, k, "embedding", n_anchors=len(warm["anchor_embeddings"]))
    ordered = coarse_order(pool, votes(topk))
    progress.log(f"coarse: {pool.height} -> {m} candidates by kNN votes (K = {k} per domain sample)")
    return {"candidates": ordered.head(m), "cut": ordered.slice(m), "skipped": False, "M": m, "K": k}


def features_stage(cfg, model_path, work, plan, candidates: pl.DataFrame, warm: dict) -> None:
    """Ray Data: candidate token rows -> Featurizer actors -> features/ Parquet."""
    import ray

    from ntk_ray.workers import Featurizer

    if _stage_done(work, "features"):
        return
    args = (model_path, warm["adapter_dir"], cfg.projector, cfg.proj_dim, cfg.seed, cfg.batch_tokens, plan["device"])
    if cfg.selector == "less":  # loss gradients, Adam-preconditioned (selector_stages)
        args += ("loss", warm["adam_moments"])
    model_map(work / "tokens/pool", work / "features", candidates, Featurizer, args, plan)
    _mark_done(work, "features")


def baseline_stages(cfg, work: Path, plan: dict, tables: dict, progress: Progress) -> tuple[dict, dict, dict]:
    """``--selector random|bm25|embedding|less`` (``selector_stages``): every usable pool row is
    scored by the selector (no coarse cut). Returns (coarse, scored, warm) for ``write_outputs``."""
    from ntk_ray import selector_stages as stages
    from ntk_ray.workers import Embedder

    pool = tables["usable"]["pool"].select("id", "key", "source", "row")
    candidates = pool.with_columns(pl.lit(None, dtype=pl.Int64).alias("coarse_votes"), pl.lit(None, dtype=pl.Float64).alias("coarse_sim"))
    coarse = {"candidates": candidates, "cut": candidates.head(0), "skipped": True, "M": None}
    warm: dict = {}
    if cfg.selector in ("embedding", "less"):
        with progress.stage("warmup"):
            warm = warmup(cfg, cfg.model, work, plan, tables["usable"]["domain"], progress)
    if cfg.selector == "embedding" and not _stage_done(work, "embed"):
        with progress.stage("embed"):
            model_map(work / "tokens/pool", work / "embed", pool, Embedder,
                      (cfg.model, warm["adapter_dir"], cfg.batch_tokens, plan["device"]), plan)
            _mark_done(work, "embed")
    if cfg.selector == "less":
        with progress.stage("features"):
            features_stage(cfg, cfg.model, work, plan, pool, warm)
    with progress.stage("score"):
        if cfg.selector == "random":
            scored = stages.random_stage(cfg, pool)
        elif cfg.selector == "bm25":
            domain_ids = _tokens(work, "domain", tables["usable"]["domain"].select("key", "source", "row"))[1]
            scored = stages.bm25_stage(cfg, work, tables["usable"]["pool"], domain_ids)
        elif cfg.selector == "embedding":
            scored = stages.embedding_stage(cfg, work, warm["anchor_embeddings"])
        else:
            scored = stages.less_scores_stage(work, warm["anchor_features"])
    progress.log(f"{cfg.selector}: scored {scored['scores'].height} pool rows")
    return coarse, scored, warm


def score_stage(cfg, work: Path, warm: dict, candidates: pl.DataFrame) -> dict:
    """Kernel scores for every candidate against the warm-up's anchor features."""
    files = feature_files(work / "features")
    return score_features(files, warm["anchor_features"], cfg.scorer, cfg.budget)


def feature_files(directory: Path) -> list[str]:
    """The feature shards of a directory (names starting with '_' or '.' are not shards)."""
    return sorted(str(p) for p in Path(directory).glob("*.parquet") if not p.name.startswith(("_", ".")))


def score_features(files: list[str], anchors: np.ndarray, scorer: str, budget: int) -> dict:
    """Scores of every row of the feature shards (Ray tasks over shards); for round-robin also
    the picking order from the exact per-anchor top-``budget`` lists."""
    import ray

    anchors = np.asarray(anchors, dtype=np.float32)
    ref = ray.put(anchors)
    scores = scores_frame(score_shards(files, ref, scorer))
    result = {"scores": scores}
    if scorer == "round-robin":
        from ntk_ray.core.scoring import round_robin_order

        k = max(1, min(budget, len(scores)))
        topk = merge_topk_tasks(files, ref, k, "feature", n_anchors=len(anchors), unit=True)
        order = round_robin_order(topk, budget)
        result["order"] = pl.DataFrame({"key": np.asarray(order, dtype=np.int64), "order": np.arange(len(order), dtype=np.int64)})
    return result


def write_outputs(cfg, out: Path, tables, coarse, scored, warm, model_path, plan, progress) -> dict:
    """ranked / selected / rejects / manifest, each atomically."""
    from ntk_ray import __version__
    from ntk_ray.io.rows import read_original_rows
    from ntk_ray.models import model_identity

    scores = scored["scores"]
    cand = nonfinite_scores_rejected(coarse["candidates"].join(scores, on="key", how="left"))
    missing = cand.filter(pl.col("score").is_null() & pl.col("reject").is_null())
    if missing.height:
        raise RuntimeError(f"{missing.height} candidates came back from the feature stage without a score")
    bad = cand.filter(pl.col("reject").is_not_null())
    ntk = cand.filter(pl.col("reject").is_null()).drop("reject")
    if "order" in scored:
        ntk = ntk.join(scored["order"], on="key", how="left")
    ranked = rank_rows(ntk, coarse["cut"], cfg.budget, stage=cfg.selector)
    rejects = pl.concat([
        tables["rejects"],
        bad.select("id", "source", "row", pl.lit("pool").alias("role"), pl.col("reject").alias("reason")),
    ]) if tables["rejects"].height or bad.height else empty_rejects()
    counts = dict(tables["counts"])
    counts["rejected"] = int(rejects.filter(pl.col("role") == "pool").height)
    counts["ranked"] = ranked.height
    counts["selected"] = int(ranked["selected"].sum())
    if counts["pool_rows"] != counts["ranked"] + counts["rejected"]:
        raise RuntimeError(f"row accounting failed: {counts}")
    if counts["selected"] < cfg.budget:
        progress.log(f"warning: only {counts['selected']} usable pool rows for a budget of {cfg.budget}: all are selected")
    write_parquet_atomic(ranked, out / "ranked.parquet")
    write_parquet_atomic(selected_rows(ranked, read_original_rows), out / "selected.parquet")
    write_parquet_atomic(rejects.cast({"row": pl.Int64}), out / "rejects.parquet")
    import importlib.metadata as md

    versions = {}
    for pkg in ("ntk-ray", "ray", "torch", "transformers", "peft", "polars", "pyarrow", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = __version__ if pkg == "ntk-ray" else None
    manifest = {
        "counts": counts,
        "config": asdict(cfg),
        "model": model_identity(cfg.model) | {"resolved": model_path},
        "selector": cfg.selector,
        "adapter": {"path": str(out / "_work/warmup/adapter"), "warmup": warm.get("history"),
                    "lora_parameters": warm.get("lora_parameters")} if warm else None,
        "projector": warm.get("projector"),
        "coarse": {k: v for k, v in coarse.items() if k in ("skipped", "M", "K")},
        "actors": plan,
        "stage_seconds": progress.seconds(),  # the write stage so far: all but this file
        "versions": versions,
    }
    write_json_atomic(manifest, out / "manifest.json")
    return manifest
