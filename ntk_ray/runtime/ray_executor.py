"""The Ray executor: the only module that imports Ray.

* ``connect``: join a cluster (``--ray-address`` or RAY_ADDRESS, as inside ``ray job submit``
  and KubeRay RayJobs) or start an embedded local Ray sized to this machine.
* ``RayExecutor.map_shards``: Ray Data over the items (one block each) into the worker class
  on an actor pool (``ActorPoolStrategy``): the model pool sized by ``actor_plan`` (GPU actors
  where there are GPUs), or CPU actors for reading.
* ``run_task``: one Ray task on a model worker (the warm-up).
* ``map_tasks``: Ray tasks, at most twice the cluster's CPUs in flight, yielded as they finish.
* ``put``: the object store; handles among a worker's constructor arguments are resolved before
  the worker is built (Ray Data does not resolve them), so workers never see Ray.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Iterator

import ray

from ntk_ray.runtime import actor_plan
from ntk_ray.stages.base import ActorPlan


def connect(address: str | None, log, wait_s: float = 600) -> dict:
    """Join a cluster or start an embedded local Ray; returns the cluster's resources.

    ``wait_s`` (``--wait-for-resources``): how long a stage may wait for its actors to start
    (``DataContext.wait_for_min_actors_s``) and for any progress at all
    (``execution_no_progress_timeout_s``, at least Ray's default 1800 s) before failing with
    a timeout instead of hanging; raise it when an autoscaling cluster must first add GPU nodes."""
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
    log(f"ray: {resources.get('CPU', 0):.0f} CPUs, {resources.get('GPU', 0):.0f} GPUs")
    return resources


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 << 30


def _resolving(worker: type) -> type:
    """``worker`` whose constructor arguments that are object refs are fetched first."""
    class Resolving(worker):
        def __init__(self, *args):
            super().__init__(*[ray.get(a) if isinstance(a, ray.ObjectRef) else a for a in args])

    Resolving.__name__ = Resolving.__qualname__ = worker.__name__
    return Resolving


class RayExecutor:
    def __init__(self, address: str | None = None, actors: int | None = None, accelerator: str = "auto",
                 wait_for_resources: float = 600, log=print):
        self.resources = connect(address, log, wait_for_resources)
        self.cpus = int(self.resources.get("CPU", 1))
        self.plan: ActorPlan = actor_plan(self.resources, actors, accelerator)
        self.extra_env: dict[str, str] = {}  # added to every worker's environment

    def describe(self) -> str:
        return f"{self.plan.size} x ({'1 GPU' if self.plan.num_gpus else 'CPU'})"

    def _env(self) -> dict:
        env = {"NTK_RAY_THREADS": str(self.plan.threads)} if self.plan.threads else {}
        return {"env_vars": env | self.extra_env}

    def map_shards(self, worker: type, args: tuple, items: list[dict], *, model: bool = True) -> list[dict]:
        if not items:
            return []
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        if model:
            size, gpus, cpus = self.plan.size, self.plan.num_gpus, self.plan.num_cpus
        else:  # readers: a CPU stays free for the driver
            size, gpus, cpus = max(1, min(len(items), self.cpus - 1)), 0, 1
        ds = ds.map_batches(_resolving(worker), fn_constructor_args=args, batch_size=1, batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(size=size), num_gpus=gpus, num_cpus=cpus,
                            runtime_env=self._env() if model else None)
        return ds.take_all()

    def run_task(self, fn: Callable, *args, gpu: bool = True) -> Any:
        task = ray.remote(fn).options(num_gpus=self.plan.num_gpus if gpu else 0, num_cpus=1, max_retries=1,
                                      runtime_env=self._env())
        return ray.get(task.remote(*args))

    def map_tasks(self, fn: Callable, items: list, *shared) -> Iterator[tuple[int, Any]]:
        task = ray.remote(fn)
        max_in_flight = max(2, 2 * self.cpus)
        pending: dict = {}
        for i, item in enumerate(items):
            pending[task.remote(item, *shared)] = i
            if len(pending) >= max_in_flight:
                done, _ = ray.wait(list(pending), num_returns=1)
                yield pending.pop(done[0]), ray.get(done[0])
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            yield pending.pop(done[0]), ray.get(done[0])

    def put(self, obj):
        return ray.put(obj)
