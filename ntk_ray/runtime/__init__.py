"""Where the stages run: ``ray_executor`` (the only code that imports Ray) and ``local`` (this
process, no Ray), both implementing ``stages.base.Executor``; ``actor_plan`` sizes the pools."""

from __future__ import annotations

from ntk_ray.config import ACCELERATORS
from ntk_ray.io.accounting import UsageError
from ntk_ray.stages.base import ActorPlan


def actor_plan(resources: dict, requested: int | None, accelerator: str = "auto") -> ActorPlan:
    """Actor pool size and per-actor resources.

    ``auto``: one actor per GPU where the cluster has GPUs now, else CPU actors that leave a
    core for reading and writing; an actor never asks for a GPU the cluster does not have (it
    would wait forever). ``gpu``: GPU actors (``requested`` of them, default one per GPU present,
    at least 1) even when the cluster has no GPU yet: for a KubeRay cluster that autoscales a
    GPU worker group up from zero (see ``--wait-for-resources``). ``cpu``: CPU actors even
    where there are GPUs."""
    if accelerator not in ACCELERATORS:
        raise UsageError(f"--accelerator {accelerator!r}: choose auto, gpu or cpu")
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 1))
    if accelerator == "gpu":
        return ActorPlan(size=max(1, requested or gpus), num_gpus=1, num_cpus=1, device="cuda")
    if gpus and accelerator == "auto":
        return ActorPlan(size=min(requested or gpus, gpus), num_gpus=1, num_cpus=1, device="cuda")
    size = requested or max(1, (cpus - 1) // 2)
    size = max(1, min(size, cpus))
    return ActorPlan(size=size, num_gpus=0, num_cpus=1, device="cpu", threads=max(1, cpus // size))
