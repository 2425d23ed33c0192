"""The in-process executor: the same stages, run one after another in this process, no Ray.

For tests, benchmarks and notebooks on one machine: a worker class is built once per
``map_shards`` call and fed the items one at a time (as a one-actor pool would); tasks run in
order. Results are those of the Ray executor (the stage code is the same).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import torch

from ntk_ray.progress import quiet_libraries
from ntk_ray.stages.base import ActorPlan


class LocalExecutor:
    def __init__(self, device: str | None = None, threads: int | None = None, verbosity: str = "normal"):
        quiet_libraries(verbosity)  # the workers run here: no "Loading weights" bars unless verbose
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.cpus = os.cpu_count() or 1
        self.plan = ActorPlan(size=1, num_gpus=int(device == "cuda"), num_cpus=1, device=device, threads=threads)
        self.resources = {"CPU": self.cpus, "GPU": self.plan.num_gpus}

    def describe(self) -> str:
        return f"in-process executor ({self.plan.device})"

    def map_shards(self, worker: type, args: tuple, items: list[dict], *, model: bool = True,
                   on_result: Callable[[dict], None] | None = None) -> list[dict]:
        if not items:
            return []
        fn = worker(*args)
        rows: list[dict] = []
        for item in items:
            done = fn(pa.Table.from_pylist([item])).to_pylist()
            rows.extend(done)
            for row in done if on_result is not None else ():
                on_result(row)
        return rows

    def run_task(self, fn: Callable, *args, gpu: bool = True) -> Any:
        return fn(*args)

    def map_tasks(self, fn: Callable, items: list, *shared) -> Iterator[tuple[int, Any]]:
        for i, item in enumerate(items):
            yield i, fn(item, *shared)

    def put(self, obj):
        return obj
