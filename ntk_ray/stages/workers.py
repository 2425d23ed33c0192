"""Batch callables the executor runs in its workers: read+tokenize, embed, NTK features.

Each is a plain class (load once in ``__init__``, one pyarrow Table in, one summary Table out)
that knows nothing about Ray, so tests call ``Cls(...)(table)`` directly and the in-process
executor runs them as they are. Each writes its own output shards and, after them, a unit
marker (``io.markers``), so a rerun after a crash skips the units already done.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from ntk_ray.core.scoring import stable_keys
from ntk_ray.io.feature_files import SPEC_KEY
from ntk_ray.io.location import local_copy, location
from ntk_ray.io.markers import is_done, mark_done, read_marker
from ntk_ray.io.shards import fixed_size_list, keep_set, read_shard, write_table_atomic

TOKENS_SCHEMA = pa.schema([
    ("role", pa.string()), ("id", pa.string()), ("key", pa.int64()), ("source", pa.string()),
    ("row", pa.int64()), ("input_ids", pa.list_(pa.int32())), ("loss_mask", pa.list_(pa.int8())),
    ("score_mask", pa.list_(pa.int8())), ("n_tokens", pa.int64()), ("truncated", pa.bool_()),
    ("reject", pa.string()),
])



def pick_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def set_threads_from_env() -> None:
    """Torch threads in a CPU worker: Ray sets OMP_NUM_THREADS to the actor's num_cpus (1), which
    would leave the other cores idle; NTK_RAY_THREADS (set by the executor from the cluster's
    CPUs per actor) says how many, capped at the cores this node lets the process use (on a
    multi-node cluster the cluster's CPUs are not one node's)."""
    n = int(os.environ.get("NTK_RAY_THREADS", "0") or 0)
    if n > 0:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or n
        torch.set_num_threads(max(1, min(n, cores)))


@dataclass
class ReadSpec:
    role: str  # "domain" | "pool"
    mode: str  # "text" | "prompt_response" | "chat"
    columns: object  # io.rows.Columns
    model: str | None
    max_length: int
    on_too_long: str
    id_prefixes: dict | None = None  # path -> fallback id prefix (io.paths.fallback_id_prefixes of domain + pool)
    system_prompt: str = "default"  # --system-prompt: "none" drops a chat template's default system turn


class ReadAndTokenize:
    """Reads input files, whole or in spans (``io.formats.Span``: a byte range of a JSONL file, a
    row range of a Parquet file), and tokenizes their rows into ``out_dir`` shards
    ``<file index>-<chunk>.parquet``, a chunk being ``chunk_rows`` records counted from the
    start of the file (so the shards are the same whether a file is read whole or in spans of
    any size). An item is ``{"index", "path", "unit", "span"}`` (``span``: the span as JSON, or
    ``""`` for the whole file; ``read.plan_units`` makes them); the unit marker ``unit`` is
    written once its rows are all written, and a rerun skips units that have one. Every row
    read comes out, usable or with a ``reject`` reason."""

    def __init__(self, spec: ReadSpec, out_dir: str | None = None, chunk_rows: int = 2048):
        from ntk_ray.models import load_tokenizer

        self.spec = spec
        self.out_dir = location(out_dir) if out_dir else None  # local, or a URI (--work-dir s3://...)
        self.chunk_rows = chunk_rows
        self.tokenizer = load_tokenizer(spec.model)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import json

        from ntk_ray.io.formats import Span
        from ntk_ray.io.rows import read_file_rows

        done = []
        for item in batch.to_pylist():
            index, path = item["index"], item["path"]
            unit = item.get("unit") or f"{index:06d}"
            span = Span(**json.loads(item["span"])) if item.get("span") else None
            if not is_done(self.out_dir, unit):
                first = 0 if span is None else span.ordinal // self.chunk_rows
                if span is not None and span.ordinal % self.chunk_rows:
                    raise ValueError(f"{path}: span at record {span.ordinal} is not aligned to {self.chunk_rows} rows")
                if span is None:
                    stale = list(self.out_dir.glob(f"{index:06d}-*.parquet"))
                else:  # the chunks this span writes
                    last = -(-(span.ordinal + span.count) // self.chunk_rows)
                    stale = [self.out_dir / f"{index:06d}-{c:06d}.parquet" for c in range(first, last)]
                for shard in stale:
                    shard.unlink(missing_ok=True)  # a unit interrupted half-way is read again from its start
                rows, started, cpu = 0, time.perf_counter(), time.process_time()
                chunks = read_file_rows(path, self.spec.columns, self.spec.mode, chunk_rows=self.chunk_rows,
                                        id_prefix=(self.spec.id_prefixes or {}).get(path), on_corrupt="reject",
                                        span=span)
                for c, chunk in enumerate(chunks, first):
                    write_table_atomic(self.tokenize(chunk), self.out_dir / f"{index:06d}-{c:06d}.parquet")
                    rows += chunk.num_rows
                mark_done(self.out_dir, unit, {"path": path, "rows": rows, "seconds": time.perf_counter() - started,
                                               "cpu_seconds": time.process_time() - cpu})
            done.append(read_marker(self.out_dir, unit))
        return pa.table({"path": [d["path"] for d in done], "rows": [d["rows"] for d in done]})

    def tokenize(self, chunk: pa.Table) -> pa.Table:
        from ntk_ray.core.tokenize import tokenize_batch

        n = chunk.num_rows
        reject = chunk.column("reject").to_pylist()
        usable = [i for i in range(n) if reject[i] is None]
        ids = [[] for _ in range(n)]
        loss = [[] for _ in range(n)]
        score = [[] for _ in range(n)]
        n_tokens = [0] * n
        truncated = [False] * n
        if usable:
            if self.spec.mode == "text":
                texts = chunk.column("text").to_pylist()
                tok = tokenize_batch(self.tokenizer, texts=[texts[i] for i in usable],
                                     max_length=self.spec.max_length, on_too_long=self.spec.on_too_long)
            elif self.spec.mode == "chat":
                convs = chunk.column("messages").to_pylist()
                tok = tokenize_batch(self.tokenizer, messages=[convs[i] for i in usable],
                                     assistant_turns=self.spec.columns.assistant_turns,
                                     max_length=self.spec.max_length, on_too_long=self.spec.on_too_long,
                                     system_prompt=self.spec.system_prompt)
            else:
                prompts, responses = chunk.column("prompt").to_pylist(), chunk.column("response").to_pylist()
                tok = tokenize_batch(self.tokenizer, prompts=[prompts[i] for i in usable],
                                     responses=[responses[i] for i in usable],
                                     max_length=self.spec.max_length, on_too_long=self.spec.on_too_long,
                                     system_prompt=self.spec.system_prompt)
            for j, i in enumerate(usable):
                ids[i], loss[i], score[i] = tok.input_ids[j], tok.loss_mask[j], tok.score_mask[j]
                n_tokens[i], truncated[i] = tok.n_tokens[j], tok.truncated[j]
                if tok.reject[j] is not None:
                    reject[i] = tok.reject[j]
                    ids[i], loss[i], score[i] = [], [], []
        id_list = chunk.column("id").to_pylist()
        return pa.table({
            "role": pa.array([self.spec.role] * n, pa.string()),
            "id": pa.array(id_list, pa.string()),
            "key": pa.array(stable_keys(id_list), pa.int64()),
            "source": chunk.column("source").cast(pa.string()),
            "row": chunk.column("row").cast(pa.int64()),
            "input_ids": pa.array(ids, pa.list_(pa.int32())),
            "loss_mask": pa.array(loss, pa.list_(pa.int8())),
            "score_mask": pa.array(score, pa.list_(pa.int8())),
            "n_tokens": pa.array(n_tokens, pa.int64()),
            "truncated": pa.array(truncated, pa.bool_()),
            "reject": pa.array(reject, pa.string()),
        }, schema=TOKENS_SCHEMA)


def load_adapted_model(model: str | None, adapter_dir: str | None, device: str, lora: dict | None = None,
                       dtype: str = "float32"):
    """The base model in ``dtype`` (``auto`` resolved for ``device``) with the warmed-up adapter
    (trainable, so gradients reach LoRA; its factors float32, ``models.lora``)."""
    from ntk_ray.models import attach_lora, load_adapter, load_model

    base = load_model(model, dtype=dtype, device=device)
    if adapter_dir:
        return load_adapter(base, local_copy(adapter_dir)).to(device)  # a URI work dir's adapter: copied here
    return attach_lora(base, **(lora or {})).to(device)


def less_transform_for(model, moments_path: str, device):
    """The LESS Adam transform (``core.selectors.adam_gradient_transform``) for ``model``'s
    trainable linears, in ``FeatureComputer``'s module order, from the warm-up's saved moments
    (keyed by parameter name)."""
    from ntk_ray.core.features import trainable_linears
    from ntk_ray.core.selectors import adam_gradient_transform
    from ntk_ray.core.training import as_moments, load_adam_moments

    names = [f"{name}.weight" for name, _ in trainable_linears(model)]
    m = as_moments(load_adam_moments(local_copy(moments_path))).select(names)  # ValueError naming what is missing
    return adam_gradient_transform([t.to(device) for t in m.exp_avg], [t.to(device) for t in m.exp_avg_sq],
                                   m.step, m.betas, m.eps)


class ShardMapper:
    """Base of the model workers: a batch of token-shard paths in; for each, the rows in the
    keep-set go through ``process`` and the result is written atomically to
    ``out_dir/<shard name>`` (no file when no row is kept), then the shard's unit marker.
    Shards with a marker are skipped, so a rerun after a crash resumes where it stopped.
    Returns one summary row per shard."""

    columns = ["id", "key", "source", "row", "input_ids", "score_mask", "loss_mask"]
    out_dir: Path
    keep: set
    metadata: dict | None = None

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for path in batch.column("path").to_pylist():
            unit = Path(path).stem
            if not is_done(self.out_dir, unit):
                table = read_shard(path, self.columns, self.keep)
                if table.num_rows:
                    result = self.process(table)
                    if self.metadata:
                        result = result.replace_schema_metadata({k.encode(): v.encode() for k, v in self.metadata.items()})
                    write_table_atomic(result, self.out_dir / Path(path).name)
                mark_done(self.out_dir, unit, {"rows": table.num_rows})
            rows.append((path, read_marker(self.out_dir, unit)["rows"]))
        return pa.table({"path": [r[0] for r in rows], "rows": [r[1] for r in rows]})

    def process(self, table: pa.Table) -> pa.Table:
        raise NotImplementedError


NONFINITE_EMBEDDING = "non-finite embedding (NaN/inf)"


class Embedder(ShardMapper):
    """Coarse-stage embeddings: mean-pooled final hidden states, L2-normalised, in length-sorted
    batches of ``batch_tokens`` padded tokens (``features.pack_by_tokens``). A row whose
    embedding is not finite gets a ``reject`` reason and a zero embedding (the coarse stage and
    the kernel skip rejected rows; the write stage lists them in rejects.parquet). ``dtype``:
    the model's (``--dtype``; the pooling sums are float32). ``layer`` (``--embed-layer``) and
    ``max_row_tokens`` (``--embed-max-tokens``): the cheaper embeddings of ``core.coarse``."""

    def __init__(self, out_dir: str, keep: pa.Table, model: str | None, adapter_dir: str | None, batch_tokens: int = 8192,
                 device: str | None = None, dtype: str = "float32", layer: int | None = None,
                 max_row_tokens: int | None = None):
        set_threads_from_env()
        self.out_dir = location(out_dir)
        self.keep = keep_set(keep)
        self.device = device or pick_device()
        self.model = load_adapted_model(model, adapter_dir, self.device, dtype=dtype).eval()
        self.batch_tokens = batch_tokens
        self.layer, self.max_row_tokens = layer, max_row_tokens

    def process(self, batch: pa.Table) -> pa.Table:
        from ntk_ray.core.features import mean_pooled_embeddings

        seqs = batch.column("input_ids").to_pylist()
        emb = np.array(mean_pooled_embeddings(self.model, seqs, self.batch_tokens, self.device, layer=self.layer,
                                              max_row_tokens=self.max_row_tokens).numpy())
        finite = np.isfinite(emb).all(axis=1)
        emb[~finite] = 0.0
        return pa.table({"id": batch.column("id"), "key": batch.column("key"),
                         "source": batch.column("source"), "row": batch.column("row"),
                         "embedding": fixed_size_list(emb),
                         "reject": pa.array([None if ok else NONFINITE_EMBEDDING for ok in finite], pa.string())})


class Featurizer(ShardMapper):
    """NTK features psi(x) (``core.features.FeatureComputer``) for batches of tokenized rows. A
    row whose gradient is not finite gets a ``reject`` reason and a zero feature instead of
    poisoning the ranking. ``dtype``: the model's (``--dtype``); the forward and backward run in
    it (no autocast), the per-sample gradients are accumulated and projected in float32."""

    mask_column = "score_mask"  # "loss_mask" for objective="loss"

    def __init__(self, out_dir: str, keep: pa.Table, model: str | None, adapter_dir: str | None, projector: str, dim: int,
                 seed: int, batch_tokens: int = 8192, device: str | None = None, objective: str = "summed-logits",
                 adam_moments: str | None = None, dtype: str = "float32"):
        from ntk_ray.core.features import FeatureComputer

        set_threads_from_env()
        self.out_dir = location(out_dir)
        self.keep = keep_set(keep)
        self.device = device or pick_device()
        adapted = load_adapted_model(model, adapter_dir, self.device, dtype=dtype)
        options = {}
        if objective != "summed-logits":  # LESS: loss gradients
            options["objective"] = objective
        if adam_moments:  # LESS: Adam-preconditioned by the warm-up's optimizer state
            options["gradient_transform"] = less_transform_for(adapted, adam_moments, self.device)
        self.mask_column = "loss_mask" if objective == "loss" else "score_mask"
        self.computer = FeatureComputer(adapted, projector=projector, dim=dim, seed=seed, device=self.device, **options)
        self.batch_tokens = batch_tokens
        import json

        self.metadata = {SPEC_KEY.decode(): json.dumps(self.computer.projector.spec())}

    def process(self, batch: pa.Table) -> pa.Table:
        seqs = batch.column("input_ids").to_pylist()
        masks = batch.column(self.mask_column).to_pylist()
        out = self.computer.features(seqs, masks, self.batch_tokens)
        feature = out.feature.numpy()
        finite = np.isfinite(feature).all(axis=1) & np.isfinite(out.norm.numpy())
        feature[~finite] = 0.0
        reject = [None if ok else "non-finite gradient (NaN/inf)" for ok in finite]
        return pa.table({
            "id": batch.column("id"), "key": batch.column("key"),
            "source": batch.column("source"), "row": batch.column("row"),
            "feature": fixed_size_list(feature),
            "norm": pa.array(out.norm.numpy().astype(np.float32)),
            "reject": pa.array(reject, pa.string()),
        })

