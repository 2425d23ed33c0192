"""Faults: a SIGKILLed driver resumes to the same ranking, a killed actor is retried by Ray, and
another token budget per batch does not change the ranking.

The three are checked on one run, with the tiny random Llama of conftest on Ray (the stages and
their resume are what is tested; the demo model's runs are in test_select_e2e): the driver is
killed in the coarse stage, and the resumed run gets a model actor killed in its first stage
that uses actors. The whole run, killed part and resumed part, uses ``--batch-tokens 64``
instead of the default 8192, an execution setting that is not part of the run's identity
(``SelectConfig.identity``; checked in test_actor_plan.py). So other batch composition and
padding are compared with an uninterrupted default-batching reference run on every model pass:
warm-up anchors, coarse embeddings and NTK features."""

import json
import os
import signal
import subprocess
import sys
import time

import polars as pl
import pytest

from ntk_ray.cli import main

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

BATCHING = ("--batch-tokens", "64")  # the reference run uses the default, 8192


def select_args(data, model, out, *extra) -> list[str]:
    return ["select", "--domain", str(data / "domain.jsonl"), "--pool", str(data / "pool.jsonl"), "--budget", "5",
            "--out", str(out), "--model", str(model), "--max-length", "32", "--warmup-epochs", "1", "--proj-dim", "64",
            "--coarse-factor", "2", *extra]


def _with_actor_fault(monkeypatch, marker) -> None:
    """The next in-process run gets a test-only Ray executor whose model workers, on their first
    call, create ``marker`` and kill their own worker process (as a preempted node or an OOM
    kill would). Nothing of this is in the production code path."""
    from ntk_ray import runner
    from ntk_ray.runtime.ray_executor import RayExecutor

    class FaultOnceExecutor(RayExecutor):
        def map_shards(self, worker, args, items, *, model=True, **options):
            if not model:
                return super().map_shards(worker, args, items, model=model, **options)
            path = str(marker)

            class DiesOnce(worker):  # defined here, so Ray ships it by value
                def __call__(self, batch):
                    import os

                    if not os.path.exists(path):
                        with open(path, "w") as f:
                            f.write(str(os.getpid()))
                        os._exit(1)
                    return super().__call__(batch)

            return super().map_shards(DiesOnce, args, items, model=model, **options)

    def factory(cfg):
        return lambda progress: FaultOnceExecutor(address=cfg.ray_address, actors=cfg.actors, accelerator=cfg.accelerator,
                                                  wait_for_resources=cfg.wait_for_resources, log=progress.log)

    monkeypatch.setattr(runner, "executor_factory", factory)


def test_killed_driver_and_killed_actor_resume_to_the_same_ranking_with_other_batching(
        ray_session, tiny_data, tiny_model_dir, tmp_path, monkeypatch, capsys):
    d, model = tiny_data, tiny_model_dir
    reference_out = tmp_path / "reference"
    # the reference in-process (LocalExecutor: the same stages, ranking equal to Ray's, test_runner.py)
    assert main(select_args(d, model, reference_out, "--executor", "local")) == 0
    out = tmp_path / "killed"
    # 1. the driver, in its own process with its own embedded Ray (which dies with it), is
    #    SIGKILLed with its whole process group as soon as the coarse stage has written its first shard
    env = dict(os.environ, RAY_ADDRESS="")
    proc = subprocess.Popen([sys.executable, "-m", "ntk_ray", *select_args(d, model, out, *BATCHING)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if list((out / "_work" / "embed").glob("*.parquet")):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished (or failed) before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "ranked.parquet").exists(), "killed driver: the run completed anyway"
    assert (out / "_work" / "warmup" / "_SUCCESS").exists(), "killed driver: the warm-up had not finished"

    # 2. the same command again, in this process, with a model actor killed once along the way
    marker = tmp_path / "fault-fired"
    _with_actor_fault(monkeypatch, marker)
    capsys.readouterr()
    assert main(select_args(d, model, out, *BATCHING)) == 0
    err = capsys.readouterr().err
    assert marker.exists(), "killed actor: the fault was never injected"
    assert "reusing the finished warm-up" in err, "killed driver: the resumed run did not reuse the finished warm-up"

    # 3. the uninterrupted reference ranking, with the same scores (other batching: float noise only)
    resumed = pl.read_parquet(out / "ranked.parquet")
    reference = pl.read_parquet(reference_out / "ranked.parquet")
    assert resumed["id"].to_list() == reference["id"].to_list(), \
        "the resumed run (killed driver, killed actor, --batch-tokens 64) ranks differently from the reference run"
    a, b = reference["score"].drop_nulls().to_numpy(), resumed["score"].drop_nulls().to_numpy()
    assert len(a) == len(b), f"{len(b)} scored rows after the resume, {len(a)} in the reference run"
    assert abs(a - b).max() <= 1e-4 * abs(a).max(), \
        f"--batch-tokens 64 changed the scores by up to {abs(a - b).max():.3g} (reference max |score| {abs(a).max():.3g})"
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["pool_rows"] == counts["ranked"] + counts["rejected"] == 30, f"row accounting after the resume: {counts}"
