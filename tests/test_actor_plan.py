"""Actor pool sizing from the cluster's resources (plain Python, no Ray started)."""

import os

import pytest

from ntk_ray.io.accounting import UsageError
from ntk_ray.cli import build_parser, select_config
from ntk_ray.runtime import actor_plan
from ntk_ray.stages.base import ActorPlan


def test_auto_uses_the_gpus_present_and_never_asks_for_missing_ones():
    assert actor_plan({"CPU": 16, "GPU": 4}, None) == ActorPlan(size=4, num_gpus=1, num_cpus=1, device="cuda")
    assert actor_plan({"CPU": 16, "GPU": 4}, 8).size == 4  # capped at the GPUs there are
    cpu = actor_plan({"CPU": 8}, None)
    assert cpu.num_gpus == 0 and cpu.device == "cpu" and cpu.size == 3 and cpu.threads == 2
    assert actor_plan({"CPU": 2}, None).size == 1


def test_gpu_asks_for_gpu_actors_before_the_autoscaler_has_added_them():
    plan = actor_plan({"CPU": 4}, 3, "gpu")  # a KubeRay GPU group at zero replicas
    assert plan == ActorPlan(size=3, num_gpus=1, num_cpus=1, device="cuda")
    assert actor_plan({"CPU": 4}, None, "gpu").size == 1
    assert actor_plan({"CPU": 4, "GPU": 2}, 5, "gpu").size == 5  # more may be added


def test_cpu_never_uses_gpus():
    plan = actor_plan({"CPU": 8, "GPU": 2}, None, "cpu")
    assert plan.num_gpus == 0 and plan.device == "cpu"


def test_bad_accelerator_is_a_usage_error():
    with pytest.raises(UsageError, match="--accelerator"):
        actor_plan({"CPU": 2}, None, "tpu")


def test_execution_flags_reach_the_config_but_not_its_identity():
    args = build_parser().parse_args(["select", "--domain", "d.jsonl", "--pool", "p.jsonl", "--budget", "3", "--out", "o",
                                      "--accelerator", "gpu", "--actors", "2", "--wait-for-resources", "3600"])
    cfg = select_config(args)
    assert cfg.accelerator == "gpu" and cfg.wait_for_resources == 3600 and cfg.actors == 2
    base = select_config(build_parser().parse_args(["select", "--domain", "d.jsonl", "--pool", "p.jsonl", "--budget", "3",
                                                    "--out", "o"]))
    assert cfg.fingerprint() == base.fingerprint()  # where/how it runs does not change the result


def test_batch_tokens_is_an_execution_setting_not_part_of_the_identity():
    """test_resume.py relies on it: the same run with another --batch-tokens resumes, and must rank the same."""
    args = ["select", "--domain", "d.jsonl", "--pool", "p.jsonl", "--budget", "3", "--out", "o"]
    cfg = select_config(build_parser().parse_args(args + ["--batch-tokens", "300"]))
    assert cfg.batch_tokens == 300 and "batch_tokens" not in cfg.identity()
    assert cfg.fingerprint() == select_config(build_parser().parse_args(args)).fingerprint()


def test_progress_seconds_split_setup_from_the_stages():
    """manifest stage_seconds: finished stages, the running one so far, and the time outside
    any stage as ``setup`` (it used to be folded into ``write``)."""
    import io

    from ntk_ray.progress import Progress

    now = [0.0]
    progress = Progress(stream=io.StringIO(), clock=lambda: now[0])
    now[0] = 2.0
    with progress.stage("a"):
        now[0] = 5.0
    now[0] = 6.0
    with progress.stage("b"):
        now[0] = 10.0
        assert progress.seconds() == {"a": 3.0, "b": 4.0, "setup": 3.0}
    now[0] = 11.0
    assert progress.seconds() == {"a": 3.0, "b": 4.0, "setup": 4.0}
    assert set(progress.seconds()) == {"a", "b", "setup"}


def test_actor_threads_are_set_from_the_env_and_capped_at_this_nodes_cores(monkeypatch):
    """Observes a change: the threads start at 1, so a set_threads_from_env that did nothing fails."""
    import torch

    from ntk_ray.stages.workers import set_threads_from_env

    cores = len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    try:
        if cores >= 2:
            torch.set_num_threads(1)
            monkeypatch.setenv("NTK_RAY_THREADS", "2")
            set_threads_from_env()
            assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        monkeypatch.setenv("NTK_RAY_THREADS", "4096")  # the CPUs of a whole cluster: capped at this node's cores
        set_threads_from_env()
        assert torch.get_num_threads() == cores
        torch.set_num_threads(1)
        monkeypatch.setenv("NTK_RAY_THREADS", "0")  # unset / 0: left alone
        set_threads_from_env()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.ray
def test_warmup_task_honours_wait_for_resources_on_a_cluster_without_gpus(ray_session):
    """--accelerator gpu on a CPU-only Ray: the warm-up task would wait for a GPU forever; it
    fails with one line after --wait-for-resources instead (and a CPU task runs at once)."""
    import time

    from ntk_ray.runtime.ray_executor import RayExecutor

    def power(a, b):
        return a ** b

    try:
        gpu = RayExecutor(accelerator="gpu", actors=1, wait_for_resources=2, log=lambda m: None)
        t0 = time.monotonic()
        with pytest.raises(UsageError, match="within --wait-for-resources 2 s"):
            gpu.run_task(power, 2, 3)
        assert time.monotonic() - t0 < 30
        cpu = RayExecutor(accelerator="cpu", wait_for_resources=2, log=lambda m: None)
        assert cpu.run_task(power, 2, 3) == 8
    finally:
        RayExecutor(log=lambda m: None)  # the session's Ray Data waits reset to the defaults
