"""Actor pool sizing from the cluster's resources (plain Python, no Ray started)."""

import os
import re
import sys

import pytest

from ntk_ray.cli import build_parser, select_config
from ntk_ray.io.accounting import UsageError
from ntk_ray.runtime import MAX_POOL, actor_plan
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


def test_actors_n_is_a_fixed_pool_as_before():
    assert actor_plan({"CPU": 16, "GPU": 4}, 2).max_size is None
    assert actor_plan({"CPU": 16, "GPU": 4}, 2, max_resources={"CPU": 64, "GPU": 16}) == actor_plan({"CPU": 16, "GPU": 4}, 2)
    assert actor_plan({"CPU": 4}, 9) == ActorPlan(size=4, num_gpus=0, num_cpus=1, device="cpu", threads=1)  # CPUs present


def test_min_and_max_give_a_pool_that_grows_as_workers_join():
    # auto on a cluster with 2 GPUs now: the minimum is what is there, the maximum is not capped by it
    plan = actor_plan({"CPU": 16, "GPU": 2}, None, min_actors=None, max_actors=8)
    assert plan == ActorPlan(size=2, num_gpus=1, num_cpus=1, device="cuda", max_size=8)
    assert actor_plan({"CPU": 16, "GPU": 2}, None, min_actors=5, max_actors=8).size == 5  # waits for 3 more GPUs
    # gpu: a GPU group autoscaling from zero; the first actor is the autoscaler's demand, more as GPUs join
    plan = actor_plan({"CPU": 2}, None, "gpu", max_actors=4)
    assert (plan.size, plan.max_size, plan.device) == (1, 4, "cuda")
    assert actor_plan({"CPU": 2}, None, "gpu", min_actors=3, max_actors=4).size == 3  # waits (--wait-for-resources)
    # CPU actors: the test cluster's head (1 CPU) alone holds 1; a worker node that joins gets more
    plan = actor_plan({"CPU": 1}, None, max_actors=3)
    assert (plan.size, plan.max_size, plan.device, plan.threads) == (1, 3, "cpu", 1)
    assert actor_plan({"CPU": 8}, None, max_actors=2).size == 2  # the default minimum never exceeds the maximum
    assert actor_plan({"CPU": 8}, None, min_actors=2).max_size == 3  # default maximum: the cluster now, >= min
    assert actor_plan({"CPU": 8}, None, min_actors=3, max_actors=3).max_size is None  # min == max: fixed


def test_defaults_follow_the_maximum_the_cluster_publishes_else_stay_fixed():
    now = {"CPU": 16, "GPU": 2}
    assert actor_plan(now, None) == ActorPlan(size=2, num_gpus=1, num_cpus=1, device="cuda")  # fixed cluster: as before
    assert actor_plan(now, None, max_resources={"CPU": 64, "GPU": 8}).max_size == 8
    assert actor_plan(now, None, max_resources={"CPU": 16, "GPU": 2}).max_size is None
    plan = actor_plan({"CPU": 8}, None, max_resources={"CPU": 33})  # CPU actors: (CPUs - 1) // 2 of each
    assert (plan.size, plan.max_size, plan.threads) == (3, 16, 2)
    assert actor_plan({"CPU": 2}, None, "gpu", max_resources={"CPU": 2, "GPU": 4}).max_size == 4
    unbounded = actor_plan(now, None, max_resources={"GPU": sys.maxsize})  # a group with no max_count
    assert unbounded.max_size == MAX_POOL
    # auto never asks for a GPU that is not there now, even if the cluster could add one
    assert actor_plan({"CPU": 8}, None, max_resources={"CPU": 8, "GPU": 4}).device == "cpu"


@pytest.mark.parametrize("kwargs, message", [
    ({"requested": 2, "min_actors": 1}, "--actors 2 is a fixed pool: give it alone, or --min-actors/--max-actors"),
    ({"requested": 2, "max_actors": 4}, "--actors 2 is a fixed pool"),
    ({"min_actors": 5, "max_actors": 3}, "--min-actors 5 is more than --max-actors 3"),
    ({"max_actors": 0}, "--max-actors 0: must be from 1 to 100000"),
    ({"min_actors": -1}, "--min-actors -1: must be from 1 to 100000"),
])
def test_bad_pool_sizes_are_one_line_usage_errors(kwargs, message):
    with pytest.raises(UsageError, match=re.escape(message)) as e:
        actor_plan({"CPU": 8, "GPU": 2}, **kwargs)
    assert "\n" not in str(e.value)


def test_bad_pool_flags_fail_on_the_command_line_before_any_work(tmp_path, capsys):
    from ntk_ray import cli

    base = ["select", "--domain", "d.jsonl", "--pool", "p.jsonl", "--budget", "3", "--out", str(tmp_path / "o")]
    for extra, message in ((["--actors", "2", "--min-actors", "1"], "--actors 2 is a fixed pool"),
                           (["--min-actors", "4", "--max-actors", "2"], "--min-actors 4 is more than --max-actors 2"),
                           (["--max-actors", "0"], "--max-actors")):
        assert cli.main(base + extra) != 0
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_execution_flags_reach_the_config_but_not_its_identity():
    args = build_parser().parse_args(["select", "--domain", "d.jsonl", "--pool", "p.jsonl", "--budget", "3", "--out", "o",
                                      "--accelerator", "gpu", "--actors", "2", "--wait-for-resources", "3600"])
    cfg = select_config(args)
    assert cfg.accelerator == "gpu" and cfg.wait_for_resources == 3600 and cfg.actors == 2
    base = select_config(build_parser().parse_args(["select", "--domain", "d.jsonl", "--pool", "p.jsonl", "--budget", "3",
                                                    "--out", "o"]))
    assert cfg.fingerprint() == base.fingerprint()  # where/how it runs does not change the result
    pool = select_config(build_parser().parse_args(["select", "--domain", "d.jsonl", "--pool", "p.jsonl", "--budget",
                                                    "3", "--out", "o", "--min-actors", "1", "--max-actors", "8"]))
    assert (pool.min_actors, pool.max_actors) == (1, 8) and pool.fingerprint() == base.fingerprint()
    assert not {"actors", "min_actors", "max_actors"} & set(pool.identity())


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
        # a pool whose minimum the cluster cannot hold waits --wait-for-resources, then one line
        lines = []
        big = RayExecutor(accelerator="cpu", min_actors=3, max_actors=4, wait_for_resources=2, log=lines.append)
        assert (big.plan.size, big.plan.max_size) == (3, 4) and "waits up to --wait-for-resources 2 s" in lines[-1]

        class Echo:
            def __call__(self, batch):
                return batch

        t0 = time.monotonic()
        with pytest.raises(UsageError, match=r"Echo: the pool's first 3 actors did not all start within "
                                             r"--wait-for-resources 2 s \(each needs 1 CPU; the cluster has 2 CPUs\)"):
            big.map_shards(Echo, (), [{"i": 0}])
        assert time.monotonic() - t0 < 60
    finally:
        RayExecutor(log=lambda m: None)  # the session's Ray Data waits reset to the defaults
