"""What a stage is, what it may ask of the executor that runs it, and how its result is kept.

A **stage** is a small class with a ``name``, the names of the earlier stages whose results it
``needs``, and ``run(ctx, **needed) -> result``, where the result is a dataclass (``Output``).
It never imports Ray: it asks ``ctx.executor`` to run model actors over shards, one remote task,
or many small tasks, and the executor decides where (``runtime.ray_executor`` on a cluster,
``runtime.local`` in this process). A **plan** is the list of stages of one selector
(``stages.plans``). The **runner** (``ntk_ray.runner``) runs a plan in order and owns resume:
after a stage returns, it saves the result under ``_work/<stage>/`` and then writes the
stage's ``_SUCCESS`` marker (``io.markers``); a rerun loads the saved result instead of running
the stage again.

Results are saved field by field: a Polars frame as Parquet, a numpy array as ``.npy``, anything
else (numbers, strings, paths, lists, dicts) in ``result.json``.

``Context.work`` is a ``pathlib.Path`` or, with ``--work-dir s3://...``, an
``io.location.UriPath`` (the same small API: ``/``, ``mkdir``, ``str``); stages hand workers
``str(ctx.work / ...)`` and the io functions accept both.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import polars as pl

from ntk_ray.io.atomic import write_bytes_atomic, write_json_atomic
from ntk_ray.io.location import UriPath
from ntk_ray.io.shards import write_table_atomic


@dataclass(frozen=True)
class ActorPlan:
    """How many model actors, and what each asks for (``runtime.actor_plan``)."""
    size: int
    num_gpus: int
    num_cpus: int
    device: str  # "cuda" | "cpu"
    threads: int | None = None  # torch threads per CPU actor (NTK_RAY_THREADS)
    max_size: int | None = None  # the pool may grow to this many as nodes join (size: its minimum); None: fixed


class Executor(Protocol):
    """Where stages run. ``runtime.ray_executor.RayExecutor`` and ``runtime.local.LocalExecutor``
    implement it; a stage sees nothing else of the runtime."""

    plan: ActorPlan
    cpus: int  # CPUs of the cluster (or this machine)

    def map_shards(self, worker: type, args: tuple, items: list[dict], *, model: bool = True,
                   on_result: Callable[[dict], None] | None = None) -> list[dict]:
        """Run ``worker(*args)`` (a batch callable: one pyarrow Table of ``items`` rows in, one
        summary Table out) over ``items``, one item per call: on the model actor pool
        (``model=True``, ``plan``) or on CPU actors that read and tokenize. Objects from ``put``
        among ``args`` arrive resolved. Returns the summary rows; ``on_result`` is called on the
        driver with each summary row as its item finishes (progress)."""

    def run_task(self, fn: Callable, *args, gpu: bool = True) -> Any:
        """``fn(*args)`` once, on a model worker (a GPU one where the plan has GPUs)."""

    def map_tasks(self, fn: Callable, items: list, *shared) -> Iterator[tuple[int, Any]]:
        """``fn(item, *shared)`` for every item as small CPU tasks; yields (index, result) in
        completion order, with a bounded number in flight."""

    def put(self, obj) -> Any:
        """A handle to a large read-only object shared by many tasks or actors."""


@dataclass
class Context:
    """What every stage gets: the config, the working directory and the executor."""
    cfg: Any  # SelectConfig (or FeaturesConfig / ScoreConfig for those commands)
    work: Path | UriPath  # OUT/_work (a URI with --work-dir s3://...)
    out: Path  # where the result files go (local)
    executor: Executor
    progress: Any  # ntk_ray.progress.Progress
    inputs: Any = None  # the checked inputs (runner.CheckedInputs)

    def stage_dir(self, name: str) -> Path | UriPath:
        return self.work / name


class Stage:
    """Base of every stage: ``name``, ``needs`` and ``run``; see the module docstring."""

    name: str = ""
    title: str = ""  # for log lines; default: the name
    needs: tuple[str, ...] = ()
    output: type | None = None  # the result's dataclass (what a resumed run loads)
    resumable: bool = True  # False: cheap, always rerun (its result is not saved)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.title = cls.__dict__.get("title") or cls.name

    def run(self, ctx: Context, **needed) -> Any:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


# -------------------------------------------------------------------------------------------
# saving and loading results
def save_result(result, directory: Path | UriPath) -> None:
    """Save a dataclass result into ``directory`` (see the module docstring)."""
    directory.mkdir(parents=True, exist_ok=True)
    plain = {}
    for f in dataclasses.fields(result):
        value = getattr(result, f.name)
        if isinstance(value, pl.DataFrame):
            write_table_atomic(value.to_arrow(), directory / f"_{f.name}.parquet")
            plain[f.name] = {"__frame__": f"_{f.name}.parquet"}
        elif isinstance(value, np.ndarray) and isinstance(directory, UriPath):
            import io

            buffer = io.BytesIO()
            np.save(buffer, value)
            write_bytes_atomic(buffer.getvalue(), directory / f"_{f.name}.npy")
            plain[f.name] = {"__array__": f"_{f.name}.npy"}
        elif isinstance(value, np.ndarray):
            np.save(directory / f"_{f.name}.npy", value)
            plain[f.name] = {"__array__": f"_{f.name}.npy"}
        else:
            plain[f.name] = value
    write_json_atomic(plain, directory / "_result.json")


def load_result(cls, directory: Path | UriPath):
    """The result ``save_result`` saved (``cls`` is its dataclass)."""
    import io

    def source(name: str):
        return io.BytesIO((directory / name).read_bytes()) if isinstance(directory, UriPath) else directory / name

    plain = json.loads((directory / "_result.json").read_text())
    values = {}
    for name, value in plain.items():
        if isinstance(value, dict) and "__frame__" in value:
            value = pl.read_parquet(source(value["__frame__"]))
        elif isinstance(value, dict) and "__array__" in value:
            value = np.load(source(value["__array__"]))
        values[name] = value
    return cls(**values)
