"""Faults: a SIGKILLed driver resumes to the same ranking; a killed actor is retried by Ray."""

import json
import os
import signal
import subprocess
import sys
import time

import polars as pl
import pytest

from conftest import select_args
from ntk_ray.cli import main

pytestmark = [pytest.mark.ray, pytest.mark.demo, pytest.mark.timeout(900)]


def test_killed_driver_resumes_to_the_same_ranking(first_run, demo_data, capsys):
    d, _ = demo_data
    out = d / "killed"
    env = dict(os.environ, RAY_ADDRESS="")  # its own embedded Ray, which dies with it
    proc = subprocess.Popen([sys.executable, "-m", "ntk_ray.cli", *select_args(d, out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    # SIGKILL the whole process group as soon as the coarse stage has written its first shard
    while time.time() < deadline and proc.poll() is None:
        if list((out / "_work" / "embed").glob("*.parquet")):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "ranked.parquet").exists()
    assert (out / "_work" / "warmup" / "_SUCCESS").exists()
    # the same command again: finished stages are reused, the ranking is the uninterrupted one
    assert main(select_args(d, out)) == 0
    err = capsys.readouterr().err
    assert "reusing the finished warm-up" in err
    resumed = pl.read_parquet(out / "ranked.parquet")
    reference = pl.read_parquet(first_run / "ranked.parquet")
    assert resumed["id"].to_list() == reference["id"].to_list()
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["pool_rows"] == counts["ranked"] + counts["rejected"]


def test_a_killed_actor_is_retried_and_other_batching_gives_the_same_ranking(first_run, demo_data, tmp_path, monkeypatch):
    """One run checks two things: a model actor killed mid-stage is restarted by Ray and its
    shard redone, and a different token budget per batch (other batch composition and padding)
    gives the same ranking as the reference run for the same seed."""
    d, _ = demo_data
    marker = tmp_path / "fault-fired"
    # the actors get the variable through their runtime environment (plan["extra_env"])
    from ntk_ray import pipeline

    original = pipeline.model_map

    def model_map_with_fault(*args, **kwargs):
        ray_env = {"NTK_RAY_FAULT_ONCE": str(marker)}
        plan = dict(args[5]) if len(args) > 5 else dict(kwargs["plan"])
        plan["extra_env"] = ray_env
        args = (*args[:5], plan)
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "model_map", model_map_with_fault)
    out = d / "faulty"
    assert main(select_args(d, out, "--batch-tokens", "300")) == 0
    assert marker.exists(), "the fault was never injected"
    ranked = pl.read_parquet(out / "ranked.parquet")
    reference = pl.read_parquet(first_run / "ranked.parquet")
    assert ranked["id"].to_list() == reference["id"].to_list()
    a, b = reference["score"].drop_nulls().to_numpy(), ranked["score"].drop_nulls().to_numpy()
    assert abs(a - b).max() <= 1e-4 * abs(a).max()
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["pool_rows"] == counts["ranked"] + counts["rejected"] == 64
