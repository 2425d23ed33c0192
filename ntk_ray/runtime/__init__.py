"""Where the stages run: ``ray_executor`` (the only code that imports Ray) and ``local`` (this
process, no Ray), both implementing ``stages.base.Executor``; ``actor_plan`` sizes the pools."""

from __future__ import annotations

from ntk_ray.config import ACCELERATORS, check_pool
from ntk_ray.io.accounting import UsageError
from ntk_ray.stages.base import ActorPlan

#: the most actors a pool is planned with (as ``--max-actors`` allows), also where a cluster's
#: published maximum is unbounded
MAX_POOL = 100000


def actor_plan(resources: dict, requested: int | None = None, accelerator: str = "auto", *,
               min_actors: int | None = None, max_actors: int | None = None,
               max_resources: dict | None = None) -> ActorPlan:
    """Model actor pool: its size (``size``, the minimum, started first; ``max_size``, what it may
    grow to as nodes join, None for a fixed pool) and what each actor asks for.

    Kind of actor: ``auto``: GPU actors where the cluster has GPUs now, else CPU actors; an
    actor never asks for a GPU the cluster does not have (it would wait forever). ``gpu``: GPU
    actors even when the cluster has no GPU yet (a KubeRay GPU group autoscaling up from zero;
    the pending actors are the autoscaler's demand, see ``--wait-for-resources``). ``cpu``: CPU
    actors even where there are GPUs.

    Size: ``requested`` (``--actors N``) is a fixed pool of N, as before: capped at the GPUs
    (``auto``) or CPUs present, not with ``gpu``. Otherwise a pool from a minimum to a maximum
    (``--min-actors``, ``--max-actors``); each one not given is

    * minimum: what the cluster holds now (``resources``): one actor per GPU, or
      ``(CPUs - 1) // 2`` CPU actors (a core left for reading and writing), at least 1 (and no
      more than a given maximum);
    * maximum: the same count for what the cluster can grow to (``max_resources``: the maximum
      the autoscaler publishes, where Ray knows it), else for what it holds now (and no less
      than the minimum).

    So on a fixed cluster without flags the pool is fixed, as before. Neither a given
    ``--min-actors`` nor the maximum is capped by what is present: a stage waits (at most
    ``--wait-for-resources``, then fails) until the minimum has started, and actors up to the
    maximum go to workers as they join. CPU actors get ``CPUs // minimum`` torch threads each
    (capped at their node's cores)."""
    if accelerator not in ACCELERATORS:
        raise UsageError(f"--accelerator {accelerator!r}: choose auto, gpu or cpu")
    for flag, value in (("--actors", requested), ("--min-actors", min_actors), ("--max-actors", max_actors)):
        if value is not None and not 1 <= value <= MAX_POOL:
            raise UsageError(f"{flag} {value}: must be from 1 to {MAX_POOL}")
    check_pool(requested, min_actors, max_actors)
    gpus = int(resources.get("GPU", 0))
    cpus = max(1, int(resources.get("CPU", 1)))
    top = max_resources or resources
    if accelerator == "gpu" or (accelerator == "auto" and gpus):
        kind = {"num_gpus": 1, "num_cpus": 1, "device": "cuda"}
        present = gpus if accelerator == "auto" else None  # gpu: asks before they are there
        now, most = max(1, gpus), int(top.get("GPU", 0))
    else:
        kind = {"num_gpus": 0, "num_cpus": 1, "device": "cpu"}
        present = cpus
        now, most = max(1, (cpus - 1) // 2), (int(top.get("CPU", 1)) - 1) // 2
    if requested is not None:
        low = high = min(requested, present) if present else requested
    else:
        low = min(now, max_actors or now) if min_actors is None else min_actors
        high = max_actors if max_actors is not None else max(low, now, min(most, MAX_POOL))
    threads = max(1, cpus // low) if kind["device"] == "cpu" else None
    return ActorPlan(size=low, threads=threads, max_size=high if high > low else None, **kind)
