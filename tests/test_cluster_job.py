"""End to end on a real (local) multi-node Ray cluster that grows while the job runs:
`ray job submit ... python jobs/ntk_ray_select.py`.

A head node (1 CPU) is started as a `ray start` process on this machine and the job is
submitted to it with ``--min-actors 2 --max-actors 3``: more model actors than the head alone
can hold. Once the job's first stage runs, a worker node (2 CPUs) joins with its own `ray
start`, as an autoscaler's new node would; the model stages' actor pools take it in, and the
test checks with Ray's state API that the new node ran model work, then that every row is
accounted for. Each node has its own free ports and a short temp dir (AF_UNIX paths must stay
under 107 bytes). The job is submitted with the repository as working_dir, exactly as on a real
cluster, so it also checks that jobs/ntk_ray_select.py finds the uploaded package and that the
job joins the cluster (RAY_ADDRESS set by the job) instead of starting its own.

Teardown never uses `ray stop` (that stops every Ray on the machine, including other people's):
it terminates, by pid, the processes whose command line names this test's temp dir and their
descendants (the GCS last), and it runs even when the test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: `ray` and the `python` job entrypoints run


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _cluster_processes(temp_dir: str):
    """Processes of this test's cluster: command line names ``temp_dir``, plus all their
    descendants (job drivers, workers). Matched by our unique temp dir, never by a name."""
    import psutil

    marker = temp_dir.rstrip("/") + "/"  # /tmp/ntkr-12/ must not match /tmp/ntkr-123/
    found = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(marker in part for part in (p.info["cmdline"] or [])):
                found[p.pid] = p
                for c in p.children(recursive=True):
                    found[c.pid] = c
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def _is_gcs(p) -> bool:
    import psutil

    try:
        return p.name() == "gcs_server"
    except psutil.Error:
        return False


def _teardown(temp_dir: str) -> None:
    """SIGTERM everything but the GCS, then the GCS, then SIGKILL whatever outlived SIGTERM. In
    this order the cluster is down in a few seconds: a raylet that gets SIGTERM after its GCS is
    gone waits about 10 s before it exits, and a GCS that still has raylets does not exit on SIGTERM."""
    import psutil

    for sig, wait, spare_gcs in ((signal.SIGTERM, 10, True), (signal.SIGTERM, 10, False), (signal.SIGKILL, 5, False)):
        procs = [p for p in _cluster_processes(temp_dir) if not (spare_gcs and _is_gcs(p))]
        if not procs:
            continue
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=wait)
    shutil.rmtree(temp_dir, ignore_errors=True)


def _env() -> dict:
    env = dict(os.environ)
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(var, None)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # job entrypoints resolve `python` here
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", RAY_DATA_DISABLE_PROGRESS_BARS="1",
               TOKENIZERS_PARALLELISM="false")
    return env


def _run(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_ray_job_on_a_cluster_that_gains_a_node_mid_run(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The tiny random Llama of conftest (a directory both nodes of this machine can read): the
    cluster path is what is tested here; the demo model's runs are in test_select_e2e. The pool
    is four files, so each model stage has four token shards to hand out."""
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_nodes, list_tasks

    from ntk_ray.demo import make_demo_split

    t0 = time.time()
    data = tmp_path / "data"
    make_demo_split(data, n_domain=8, n_pool=60, seed=0)
    pool = pl.read_parquet(data / "pool.parquet")
    (data / "pool").mkdir()
    for k in range(4):
        pool.slice(15 * k, 15).write_parquet(data / "pool" / f"part-{k}.parquet")
    out = tmp_path / "out"

    temp_dir = f"/tmp/ntkr-{os.getpid()}"
    shutil.rmtree(temp_dir, ignore_errors=True)
    (gcs, dash, client, head_agent, head_grpc, head_rt, head_metrics,
     wk_agent, wk_grpc, wk_rt, wk_metrics) = _free_ports(11)
    env = _env()
    ray = str(BIN / "ray")
    address = f"http://127.0.0.1:{dash}"
    # one temp dir per node: nodes sharing one would share runtime_resources/, and a node's
    # runtime-env agent would delete the working_dir copy the other node's job driver runs in
    common = ["--node-ip-address=127.0.0.1", "--disable-usage-stats", f"--object-store-memory={200 * 2**20}",
              "--num-gpus=0"]

    def alive_nodes() -> list:
        return [n for n in list_nodes(address=address, raise_on_missing_output=False) if n.state == "ALIVE"]

    try:
        _run([ray, "start", "--head", "--num-cpus=1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
              f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
              f"--dashboard-agent-listen-port={head_agent}", f"--dashboard-agent-grpc-port={head_grpc}",
              f"--runtime-env-agent-port={head_rt}", f"--metrics-export-port={head_metrics}",
              f"--temp-dir={temp_dir}/h", *common], env, 120)
        t_cluster = time.time()
        client_api = JobSubmissionClient(address)
        head = [n.node_id for n in alive_nodes()]
        assert len(head) == 1, head

        job_id = f"ntkr-{os.getpid()}"
        _run([ray, "job", "submit", f"--address={address}", f"--working-dir={REPO}", f"--submission-id={job_id}",
              "--no-wait", "--", "python", "jobs/ntk_ray_select.py",
              "--domain", str(data / "domain.jsonl"), "--pool", str(data / "pool"), "--budget", "5",
              "--out", str(out), "--max-length", "48", "--warmup-epochs", "0.5", "--proj-dim", "256",
              "--model", str(tiny_model_dir), "--min-actors", "2", "--max-actors", "3"], env, 120)

        def finished():
            return client_api.get_job_status(job_id) in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED)

        deadline = time.time() + 300
        while not (out / "_work" / "tokens").exists() and not finished() and time.time() < deadline:
            time.sleep(0.5)  # the job's first stage (read) has started on the 1-CPU head alone
        assert (out / "_work" / "tokens").exists(), client_api.get_job_logs(job_id)[-6000:]
        t_read = time.time()
        _run([ray, "start", f"--address=127.0.0.1:{gcs}", "--num-cpus=2",
              f"--dashboard-agent-listen-port={wk_agent}", f"--dashboard-agent-grpc-port={wk_grpc}",
              f"--runtime-env-agent-port={wk_rt}", f"--metrics-export-port={wk_metrics}",
              f"--temp-dir={temp_dir}/w", *common], env, 120)
        t_join = time.time()

        status = None
        deadline = time.time() + 600
        while time.time() < deadline:
            status = client_api.get_job_status(job_id)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                break
            time.sleep(0.5)
        logs = client_api.get_job_logs(job_id)
        assert status == JobStatus.SUCCEEDED, f"job {job_id}: {status}\n{logs[-6000:]}"
        t_job = time.time()
        workers = [n.node_id for n in alive_nodes() if n.node_id not in head]
        assert len(workers) == 1, workers
        # where our workers' calls ran (Ray Data runs each as MapWorker(MapBatches(<class>)).submit)
        ran: dict[str, set] = {}
        for t in list_tasks(address=address, filters=[("state", "=", "FINISHED")], limit=10000, detail=True,
                            raise_on_missing_output=False):
            for name in ("ReadAndTokenize", "Embedder", "Featurizer"):
                if f"({name}))" in t.name and t.name.endswith(".submit"):
                    ran.setdefault(name, set()).add(t.node_id)
    finally:
        _teardown(temp_dir)
    t_down = time.time()
    assert not _cluster_processes(temp_dir)

    # the job joined the 1-CPU head rather than starting an embedded Ray, and planned a pool of
    # 2 to 3 actors it could not start until a node joined
    assert "ray: 1 CPUs, 0 GPUs" in logs, logs[-3000:]
    assert "executor: 2-3 x (CPU)" in logs, logs[-3000:]
    assert "ray: 2 model actors need 2 CPUs and the cluster has 1" in logs, logs[-3000:]
    # ... ran the package uploaded as working_dir, not an installed copy
    origin = next(line for line in logs.splitlines() if line.startswith("[jobs/ntk_ray_select.py] ntk_ray"))
    assert "working_dir_files" in origin and str(REPO) not in origin, origin
    # ... and the node that joined mid-run did model work, and so did the head (actors on both)
    assert workers[0] in ran.get("Embedder", set()) and workers[0] in ran.get("Featurizer", set()), ran
    assert head[0] in set().union(*ran.values()), ran
    ranked = pl.read_parquet(out / "ranked.parquet")
    rejects = pl.read_parquet(out / "rejects.parquet")
    selected = pl.read_parquet(out / "selected.parquet")
    manifest = json.loads((out / "manifest.json").read_text())
    n_rejected = rejects.filter(pl.col("role") == "pool").height
    assert ranked.height == 60 - n_rejected
    assert sorted(ranked["rank"].to_list()) == list(range(1, ranked.height + 1))
    assert ranked["id"].n_unique() == ranked.height
    assert int(ranked["selected"].sum()) == 5 == selected.height
    assert set(selected["id"]) == set(ranked.filter(pl.col("rank") <= 5)["id"])
    assert manifest["counts"]["selected"] == 5 and manifest["counts"]["pool_rows"] == 60
    assert manifest["coarse"]["skipped"] is False  # 60 rows > M = 4 x 5: the kNN-vote stage ran
    assert (manifest["actors"]["size"], manifest["actors"]["max_size"]) == (2, 3)
    print("\nstage seconds:", manifest["stage_seconds"])
    print(f"cluster job test: data + head start {t_cluster - t0:.1f}s, submit to read stage {t_read - t_cluster:.1f}s, "
          f"worker start {t_join - t_read:.1f}s, rest of the job {t_job - t_join:.1f}s, teardown {t_down - t_job:.1f}s; "
          f"nodes that ran each worker class: { {k: len(v) for k, v in ran.items()} }")
