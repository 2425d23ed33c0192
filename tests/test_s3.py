"""Object-store work dirs and outputs against a real S3 server on 127.0.0.1 (moto's server mode,
started here): ``io.location`` does the same operations on a local directory and on a URI; a
``select`` with ``--out s3://`` and ``--work-dir s3://`` completes and ranks as a local run;
``--out s3://`` with the default local work dir too; a driver SIGKILLed after some stages
finished is resumed by a driver with an empty local cache (another pod) from the URI work dir;
the work dir's lock object and its refusals."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import moto.server as moto_server  # moto[server] is in the test extra: missing it fails, never skips the S3 tests
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

BUCKET = "ntk-test"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free 127.0.0.1 port, the AWS_* variables pointing at it (pyarrow's
    ``FileSystem.from_uri`` honours AWS_ENDPOINT_URL; the bare ``S3FileSystem()`` does not), and one bucket; yields its ``s3://`` root."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3  # moto's own dependency

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    try:
        yield f"s3://{BUCKET}"
    finally:
        from ntk_ray.io import location

        location._FS_CACHE.clear()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def select_args(data: Path, out, model: Path, *extra) -> list[str]:
    args = ["select", "--domain", str(data / "domain.jsonl"), "--pool", str(data / "pool.jsonl"), "--budget", "5",
            "--out", str(out), "--model", str(model), "--max-length", "32", "--executor", "local",
            "--selector", "ntk", "--proj-dim", "64", "--coarse-factor", "2", "--warmup-epochs", "1"]
    return args + list(extra)


def select(*args) -> int:
    from ntk_ray.cli import main

    return main(select_args(*args))


def read_uri(uri: str) -> bytes:
    from ntk_ray.io.location import UriPath

    return UriPath(uri).read_bytes()


_LOCAL: dict[str, list] = {}  # data files -> the local run's ranking (computed once per module)


def local_ranking(data: Path, model: Path, out: Path) -> list[tuple]:
    """The ranking of the same run with a local ``--out`` (the reference of every S3 run)."""
    key = (data / "domain.jsonl").read_text() + (data / "pool.jsonl").read_text() + str(model)
    if key not in _LOCAL:
        assert select(data, out, model) == 0
        _LOCAL[key] = ranking(out / "ranked.parquet")
    return _LOCAL[key]


def ranking(data: bytes | Path) -> list[tuple]:
    table = pq.read_table(pa.BufferReader(data) if isinstance(data, bytes) else data)
    return list(zip(table.column("id").to_pylist(), table.column("rank").to_pylist(),
                    table.column("selected").to_pylist()))


# ---------------------------------------------------------------------------------------------
# io.location: the same operations on a local directory and on a URI
@pytest.mark.parametrize("kind", ["local", "uri"])
def test_location_operations_agree_on_a_local_dir_and_a_uri(kind, s3, tmp_path):
    from dataclasses import dataclass

    from ntk_ray.io.atomic import write_json_atomic
    from ntk_ray.io.location import location, rmtree
    from ntk_ray.io.markers import is_done, mark_done, read_marker
    from ntk_ray.io.outdir import read_stamp
    from ntk_ray.io.shards import list_shards, read_shards, write_table_atomic
    from ntk_ray.stages.base import load_result, save_result

    base = location(str(tmp_path / "w") if kind == "local" else f"{s3}/ops-{time.time_ns()}")
    d = base / "tokens"
    d.mkdir(parents=True, exist_ok=True)
    assert read_stamp(base / "config.json") == (False, None)
    for i in range(3):
        write_table_atomic(pa.table({"id": [f"r{i}"], "x": [i]}), d / f"00000{i}.parquet")
    write_table_atomic(pa.table({"id": ["no"], "x": [9]}), d / "_result.parquet")  # not a shard
    (d / ".000009.parquet.tmp-1-abcdef12").write_bytes(b"partial")  # an interrupted local temp name
    shards = list_shards(str(d))
    assert [Path(s).name for s in shards] == ["000000.parquet", "000001.parquet", "000002.parquet"]
    assert all(s.startswith("s3://") for s in shards) == (kind == "uri")
    assert read_shards(str(d), ["id", "x"])["x"].to_list() == [0, 1, 2]
    assert not is_done(str(d)) and not is_done(str(d), "000001")
    mark_done(str(d), "000001", {"rows": 1})
    mark_done(str(d))
    assert is_done(str(d)) and read_marker(str(d), "000001") == {"rows": 1}
    (d / "_done" / "000002.json").write_bytes(b"")  # a truncated marker: not done
    assert not is_done(str(d), "000002")
    write_json_atomic({"fingerprint": "abc"}, base / "config.json")
    assert read_stamp(base / "config.json") == (True, "abc")
    assert sorted(p.name for p in d.glob("00000*.parquet")) == ["000000.parquet", "000001.parquet", "000002.parquet"]
    (d / "000000.parquet").unlink(missing_ok=True)
    (d / "000000.parquet").unlink(missing_ok=True)
    assert [Path(s).name for s in list_shards(str(d))] == ["000001.parquet", "000002.parquet"]

    @dataclass
    class Result:
        frame: pl.DataFrame
        array: np.ndarray
        note: dict

    saved = Result(pl.DataFrame({"a": [1, 2]}), np.arange(6, dtype=np.float32).reshape(2, 3), {"k": [1, "x"]})
    save_result(saved, base / "stage")
    loaded = load_result(Result, base / "stage")
    assert loaded.frame.equals(saved.frame) and np.array_equal(loaded.array, saved.array) and loaded.note == saved.note
    rmtree(d)
    assert list_shards(str(d)) == [] and not is_done(str(d))


def test_an_unfinished_multipart_upload_is_never_a_shard(s3):
    """An S3 writer killed mid-upload leaves an incomplete multipart upload: no object, so no
    shard in a listing and no marker."""
    import boto3

    from ntk_ray.io.shards import list_shards

    client = boto3.client("s3")
    prefix = f"mpu-{time.time_ns()}"
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/000000.parquet", Body=b"whole")
    upload = client.create_multipart_upload(Bucket=BUCKET, Key=f"{prefix}/000001.parquet")
    client.upload_part(Bucket=BUCKET, Key=f"{prefix}/000001.parquet", UploadId=upload["UploadId"], PartNumber=1,
                       Body=b"x" * (5 << 20))
    assert [Path(s).name for s in list_shards(f"{s3}/{prefix}")] == ["000000.parquet"]


# ---------------------------------------------------------------------------------------------
# the work dir's lock object
def test_uri_work_dir_lock_refuses_a_live_run_and_takes_over_a_stale_one(s3, monkeypatch):
    from ntk_ray.io.accounting import UsageError
    from ntk_ray.io.location import UriPath
    from ntk_ray.io.outdir import URI_LOCK, prepare_uri_work_dir, releases_out_locks

    uri = f"{s3}/lock-{time.time_ns()}"
    lock = UriPath(uri) / "_work" / URI_LOCK
    other = {"owner": "x", "pid": 4242, "host": "another-pod", "started": "then", "heartbeat": time.time()}
    lock.write_bytes(json.dumps(other).encode())
    with pytest.raises(UsageError, match="in use by another ntk-ray run .pid 4242 on host another-pod"):
        prepare_uri_work_dir(uri, {"a": 1}, overwrite=False)
    lock.write_bytes(json.dumps(other | {"heartbeat": time.time() - 3600}).encode())  # a driver gone for an hour

    @releases_out_locks
    def run() -> dict:
        prepare_uri_work_dir(uri, {"a": 1}, overwrite=False)
        return json.loads(lock.read_text())

    held = run()
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    assert not lock.exists()  # released with the entry point
    with pytest.raises(UsageError, match="holds a run with a different config"):
        prepare_uri_work_dir(uri, {"a": 2}, overwrite=False)


def test_a_credential_in_a_work_dir_uri_is_refused_in_one_line(s3):
    from ntk_ray.io.accounting import UsageError
    from ntk_ray.io.outdir import prepare_uri_work_dir

    with pytest.raises(UsageError) as e:
        prepare_uri_work_dir(f"s3://AKIAEXAMPLE:s3cr3t@{BUCKET}/w", {"a": 1}, overwrite=False)
    assert "s3cr3t" not in str(e.value) and "from the environment" in str(e.value) and "\n" not in str(e.value)


def test_a_uri_work_dir_that_is_not_a_run_is_refused_and_overwrite_clears_only_work(s3):
    from ntk_ray.io.accounting import UsageError
    from ntk_ray.io.location import UriPath
    from ntk_ray.io.outdir import prepare_uri_work_dir, releases_out_locks

    foreign = f"{s3}/foreign-{time.time_ns()}"
    (UriPath(foreign) / "data.csv").write_bytes(b"a,b\n")
    with pytest.raises(UsageError, match="is not an ntk-ray working directory .data.csv is there"):
        prepare_uri_work_dir(foreign, {"a": 1}, overwrite=True)
    assert (UriPath(foreign) / "data.csv").is_file()

    uri = f"{s3}/over-{time.time_ns()}"
    prepare = releases_out_locks(prepare_uri_work_dir)
    work = prepare(uri, {"a": 1}, overwrite=False)
    (work / "read" / "_SUCCESS").write_bytes(b"{}")
    (UriPath(uri) / "ranked.parquet").write_bytes(b"published")  # --work-dir == --out: a published file
    prepare(uri, {"a": 2}, overwrite=True)
    assert not (work / "read" / "_SUCCESS").exists() and (UriPath(uri) / "ranked.parquet").is_file()
    assert json.loads((work / "config.json").read_text())["config"] == {"a": 2}


def test_a_refused_prepare_leaves_no_lock_held(s3):
    """A refusal after the lock was taken (another config's run, no --overwrite) releases it: the
    lock object is gone and this process holds nothing (a held lock keeps a heartbeat thread and
    an S3 file system alive until exit)."""
    from ntk_ray.io import outdir
    from ntk_ray.io.accounting import UsageError
    from ntk_ray.io.location import UriPath

    uri = f"{s3}/refused-{time.time_ns()}"
    outdir.releases_out_locks(outdir.prepare_uri_work_dir)(uri, {"a": 1}, overwrite=False)
    with pytest.raises(UsageError, match="holds a run with a different config"):
        outdir.prepare_uri_work_dir(uri, {"a": 2}, overwrite=False)
    assert not outdir._URI_HELD and not (UriPath(uri) / "_work" / outdir.URI_LOCK).exists()


def test_at_exit_uri_locks_are_released_and_file_systems_dropped(s3):
    """The exit hook (``location._close_filesystems``, run before pyarrow's own S3 shutdown):
    releases the URI locks still held (their objects deleted, heartbeats stopped) and drops
    every cached file system, so pyarrow's ``ensure_s3_finalized`` never waits on a live one
    (apache/arrow#50188: a process that never exits). Called here on copies of the module
    state: the real hook must stay usable by later tests."""
    from ntk_ray.io import location, outdir

    uri = f"{s3}/atexit-{time.time_ns()}"
    work = outdir.prepare_uri_work_dir(uri, {"a": 1}, overwrite=False)  # no entry point: the lock stays held
    lock = work / outdir.URI_LOCK
    (_, _, thread, _), = outdir._URI_HELD.values()
    assert lock.exists() and thread.is_alive() and location._FS_CACHE and location._REGISTERED
    finalized = []
    saved = dict(location._FS_CACHE)
    real = location.pafs.finalize_s3
    location.pafs.finalize_s3 = lambda: finalized.append(True)
    try:
        location._close_filesystems()
    finally:
        location.pafs.finalize_s3 = real
        location._FS_CACHE.update(saved)
    assert not outdir._URI_HELD and not thread.is_alive() and not lock.exists()
    assert finalized == [True]


def test_a_process_that_used_s3_exits(s3, tmp_path):
    """A driver that wrote to S3 and still holds a URI lock and a cached file system ends within
    seconds (the exit hook releases both before pyarrow shuts the AWS SDK down)."""
    import subprocess
    import sys

    script = tmp_path / "use_s3.py"
    script.write_text(
        "from ntk_ray.io.outdir import prepare_uri_work_dir\n"
        f"work = prepare_uri_work_dir({s3 + '/exits-' + str(time.time_ns())!r}, {{'a': 1}}, overwrite=False)\n"
        "(work / 'x').write_bytes(b'1')\nprint('done', flush=True)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# select end to end
def test_select_with_s3_out_and_s3_work_dir_ranks_like_a_local_run(s3, tiny_data, tiny_model_dir, tmp_path,
                                                                    monkeypatch, capsys):
    from ntk_ray.io.location import UriPath

    monkeypatch.setenv("NTK_RAY_CACHE", str(tmp_path / "cache"))
    local = local_ranking(tiny_data, tiny_model_dir, tmp_path / "local")
    run = f"{s3}/run-{time.time_ns()}"
    work = f"{s3}/work-{time.time_ns()}"
    assert select(tiny_data, run, tiny_model_dir, "--work-dir", work, "--keep-features") == 0
    assert ranking(read_uri(f"{run}/ranked.parquet")) == local
    for name in ("selected.parquet", "rejects.parquet", "manifest.json"):
        assert UriPath(f"{run}/{name}").is_file()
    state = UriPath(work) / "_work"
    for stage in ("read", "warmup", "coarse", "score", "write"):
        assert (state / stage / "_SUCCESS").is_file(), stage
    assert [p.name for p in (state / "tokens" / "pool").glob("*.parquet")]
    assert UriPath(str(state / "warmup" / "adapter")).is_dir()  # uploaded by the warm-up task
    from ntk_ray.io.feature_files import read_spec

    features = [p for p in (state / "features").glob("*.parquet")]  # --keep-features: kept at the URI
    assert features and read_spec(str(features[0])).get("adapter_sha256")
    assert read_spec(str(state / "anchor_features" / "anchors.parquet")).get("adapter_sha256")
    assert not (state / "_lock.json").exists()
    from ntk_ray.io.storage import default_work_dir

    scratch = default_work_dir(run)
    assert not (scratch / "_work" / "tokens").exists()  # no shard on the driver's disk
    # a rerun is complete at once
    capsys.readouterr()
    assert select(tiny_data, run, tiny_model_dir, "--work-dir", work, "--keep-features") == 0
    assert "already complete" in capsys.readouterr().err
    # `ntk-ray score` on the kept features at the URI, its own state in a URI work dir, its output
    # at a URI: the same ntk ranking of the candidates as the select job's
    from ntk_ray.cli import main

    scored, score_work = f"{s3}/score-{time.time_ns()}", f"{s3}/score-work-{time.time_ns()}"
    assert main(["score", "--features", str(state / "features"), "--anchors", str(state / "anchor_features"),
                 "--budget", "5", "--out", scored, "--work-dir", score_work, "--executor", "local"]) == 0
    rescored = pq.read_table(pa.BufferReader(read_uri(f"{scored}/ranked.parquet")))
    ntk_rows = [(i, r) for i, r, stage in zip(*(pq.read_table(pa.BufferReader(read_uri(f"{run}/ranked.parquet")))
                                               .column(c).to_pylist() for c in ("id", "rank", "stage"))) if stage == "ntk"]
    assert rescored.column("id").to_pylist() == [i for i, _ in ntk_rows]
    assert read_uri(f"{scored}/report.html").startswith(b"<!DOCTYPE html>"), "score publishes its report too"
    assert (UriPath(score_work) / "_work" / "config.json").is_file()


def test_a_model_directory_in_s3_is_copied_once_per_machine_and_ranks_as_the_local_one(
        s3, tiny_data, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """--model s3://.../tiny: the objects are copied into the cache (one copy per URI, named by a
    hash, no secret in it), the run ranks as with the local directory, a second use downloads
    nothing, a re-uploaded model is copied again; an empty prefix is one line."""
    from ntk_ray.io.location import UriPath
    from ntk_ray.models import resolve_model
    from ntk_ray.models.remote import REMOTE_FILE

    monkeypatch.setenv("NTK_RAY_CACHE", str(tmp_path / "cache"))
    model = f"{s3}/models-{time.time_ns()}/tiny"
    UriPath(model).upload(tiny_model_dir)
    local = local_ranking(tiny_data, tiny_model_dir, tmp_path / "local")
    run = tmp_path / "from-s3"
    assert select(tiny_data, run, model) == 0
    assert ranking(run / "ranked.parquet") == local
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["model"]["source"] == "uri" and manifest["model"]["name"] == model
    copy = Path(resolve_model(model))
    assert copy.parent == tmp_path / "cache" / "models" and copy.name.startswith("uri-")
    assert sorted(p.name for p in copy.iterdir()) == sorted([p.name for p in tiny_model_dir.iterdir()] + [REMOTE_FILE])
    stamp = (copy / REMOTE_FILE).stat().st_mtime_ns
    assert Path(resolve_model(model)) == copy and (copy / REMOTE_FILE).stat().st_mtime_ns == stamp  # nothing fetched
    (UriPath(model) / "README.md").write_bytes(b"re-uploaded")
    assert (Path(resolve_model(model)) / "README.md").read_bytes() == b"re-uploaded"
    capsys.readouterr()
    assert select(tiny_data, tmp_path / "none", f"{s3}/no-such-model-{time.time_ns()}") == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert len(err) == 1 and "no objects under this prefix" in err[0], err


def test_an_adapter_in_s3_ranks_as_the_same_adapter_on_disk(s3, tiny_data, tiny_model_dir, tmp_path, monkeypatch):
    """select --adapter s3://.../adapter (a warmed-up adapter kept in an object store) ranks as
    --adapter with the same directory on disk."""
    from ntk_ray.io.location import UriPath

    monkeypatch.setenv("NTK_RAY_CACHE", str(tmp_path / "cache"))
    assert select(tiny_data, tmp_path / "local", tiny_model_dir) == 0  # its own run (local_ranking's is cached)
    adapter = tmp_path / "local" / "_work" / "warmup" / "adapter"
    remote = f"{s3}/adapters-{time.time_ns()}/a"
    UriPath(remote).upload(adapter)
    assert select(tiny_data, tmp_path / "disk", tiny_model_dir, "--adapter", str(adapter)) == 0
    assert select(tiny_data, tmp_path / "uri", tiny_model_dir, "--adapter", remote) == 0
    assert ranking(tmp_path / "uri" / "ranked.parquet") == ranking(tmp_path / "disk" / "ranked.parquet")


def test_select_with_s3_out_and_the_default_local_work_dir(s3, tiny_data, tiny_model_dir, tmp_path, monkeypatch):
    from ntk_ray.io.storage import default_work_dir

    monkeypatch.setenv("NTK_RAY_CACHE", str(tmp_path / "cache"))
    run = f"{s3}/plain-{time.time_ns()}"
    assert select(tiny_data, run, tiny_model_dir) == 0
    work = default_work_dir(run)
    assert (work / "_work" / "read" / "_SUCCESS").is_file()
    for name in ("ranked.parquet", "selected.parquet", "rejects.parquet", "manifest.json"):
        assert read_uri(f"{run}/{name}") == (work / name).read_bytes()


def test_a_driver_sigkilled_mid_run_is_resumed_from_the_uri_work_dir_by_another_driver(
        s3, tiny_data, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The driver is SIGKILLed right after the coarse stage's marker reached the URI work dir;
    a driver with an empty local cache (another pod) reuses read, warm-up, embed and coarse from
    the URI, takes over the dead driver's lock, and ranks as an uninterrupted run; a third driver
finds the run complete."""
    from conftest import kill_driver_when_marked

    run = f"{s3}/killed-{time.time_ns()}"
    work = f"{s3}/killed-work-{time.time_ns()}"
    mark = tmp_path / "marked.txt"
    patch = (
        "from ntk_ray.io import markers\n"
        "real = markers.mark_done\n"
        "def slow(directory, unit=None, info=None):\n"
        "    real(directory, unit, info)\n"
        "    if unit is None and str(directory).endswith('/coarse'):\n"
        "        open(os.environ['MARK'], 'a').write(str(directory) + '\\n')\n"
        "        time.sleep(120)\n"
        "markers.mark_done = slow\n"
        "import ntk_ray.runner\n"
        "ntk_ray.runner.mark_done = slow\n")
    kill_driver_when_marked(patch, select_args(tiny_data, run, tiny_model_dir, "--work-dir", work), mark,
                            {"NTK_RAY_CACHE": str(tmp_path / "cache-pod-1")})
    from ntk_ray.io.location import UriPath

    assert (UriPath(work) / "_work" / "_lock.json").is_file()  # the dead driver's lock is still there
    assert not UriPath(f"{run}/manifest.json").exists()
    monkeypatch.setenv("NTK_RAY_CACHE", str(tmp_path / "cache-pod-2"))  # a new pod: nothing local
    capsys.readouterr()
    assert select(tiny_data, run, tiny_model_dir, "--work-dir", work) == 0
    err = capsys.readouterr().err
    for stage in ("read", "warmup", "embed", "coarse"):
        assert f"{stage}: reusing the finished" in err, err
    assert "features: reusing" not in err
    state = UriPath(work) / "_work"
    assert not (state / "embed").exists() and not (state / "features").exists()  # dropped once published
    assert ranking(read_uri(f"{run}/ranked.parquet")) == local_ranking(tiny_data, tiny_model_dir, tmp_path / "local")
    # a third driver, again with nothing local: the finished run is fetched back, nothing recomputed
    monkeypatch.setenv("NTK_RAY_CACHE", str(tmp_path / "cache-pod-3"))
    manifest = read_uri(f"{run}/manifest.json")
    capsys.readouterr()
    assert select(tiny_data, run, tiny_model_dir, "--work-dir", work) == 0
    assert "already complete" in capsys.readouterr().err
    assert read_uri(f"{run}/manifest.json") == manifest
