"""Nothing a user owns is lost, corrupted or leaked: --overwrite deletes only ntk-ray's files and
never in the wrong place; credentials in URIs never reach a file, a name or a log line; the
output is locked for the run; a URI output is probed, stamped and published manifest-last; a
run interrupted while publishing, or with a corrupted marker, recovers on the rerun.

Every end-to-end run is the whole CLI on the tiny random Llama of conftest with
``--executor local`` (seconds, no Ray)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
from pathlib import Path

import polars as pl
import pytest

from ntk_ray.io.fs import redact


def select(data: Path, out, model: Path, *extra, selector: str = "random") -> int:
    from ntk_ray.cli import main

    return main(select_args(data, out, model, *extra, selector=selector))


def select_args(data: Path, out, model: Path, *extra, selector: str = "random") -> list[str]:
    args = ["select", "--domain", str(data / "domain.jsonl"), "--pool", str(data / "pool.jsonl"), "--budget", "5",
            "--out", str(out), "--model", str(model), "--max-length", "32", "--executor", "local",
            "--selector", selector, "--proj-dim", "64", "--coarse-factor", "2", "--warmup-epochs", "1"]
    # later flags win: callers may repeat --pool, --budget, ...
    return args + list(extra)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("ntk-ray: error: "), err
    return lines[0]


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def no_rmtree_outside(monkeypatch, tmp_path):
    """Safety net for the tests of places --overwrite must never delete: any rmtree/unlink
    outside the test's tmp_path fails the test instead of deleting (the old code called
    shutil.rmtree(out) on them)."""
    real_rmtree = shutil.rmtree

    def guarded(path, *a, **k):
        if not Path(os.path.realpath(path)).is_relative_to(os.path.realpath(tmp_path)):
            raise AssertionError(f"rmtree({path}) outside the test directory")
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", guarded)


# =============================================================================================
# 1. --overwrite
def test_overwrite_deletes_only_what_ntk_ray_wrote(tiny_data, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert select(tiny_data, out, tiny_model_dir) == 0
    (out / "notes.txt").write_text("mine")
    (out / "mine").mkdir()
    (out / "mine" / "data.parquet").write_bytes(b"PAR1")
    (out / "_work" / "stale-stage").mkdir()
    assert select(tiny_data, out, tiny_model_dir, "--budget", "4", "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "mine" / "data.parquet").read_bytes() == b"PAR1"
    assert not (out / "_work" / "stale-stage").exists()  # _work is ntk-ray's
    assert json.loads((out / "manifest.json").read_text())["counts"]["selected"] == 4


def test_the_non_run_message_no_longer_suggests_overwrite_and_overwrite_is_refused_there(
        tiny_data, tiny_model_dir, tmp_path, capsys, no_rmtree_outside):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8")
    assert select(tiny_data, out, tiny_model_dir) == 2
    line = one_error_line(capsys)
    assert "is not an ntk-ray run directory" in line and "--overwrite" not in line
    assert select(tiny_data, out, tiny_model_dir, "--overwrite") == 2
    assert "is not an ntk-ray run directory" in one_error_line(capsys)
    assert tree(out) == {"holiday.jpg": b"\xff\xd8"}


def stamped_run(at: Path, data: Path, model: Path) -> None:
    """A finished run of another config (budget 3) at ``at``, plus a user's file beside it."""
    assert select(data, at, model, "--budget", "3") == 0
    (at / "keep.txt").write_text("user file")


@pytest.mark.parametrize("case", ["empty string", "dot", "home", "parent of cwd", "cwd", "holds inputs", "root"])
def test_overwrite_refuses_places_it_must_never_delete(case, tiny_data, tiny_model_dir, tmp_path, monkeypatch, capsys,
                                                       no_rmtree_outside):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    work = tmp_path / "a" / "b"
    data = tiny_data
    extra = []
    if case in ("empty string", "dot", "cwd"):
        stamped_run(work, data, tiny_model_dir)
        out = {"empty string": "", "dot": ".", "cwd": str(work)}[case]
    elif case == "home":
        stamped_run(home, data, tiny_model_dir)
        out = str(home)
    elif case == "parent of cwd":
        stamped_run(tmp_path / "a", data, tiny_model_dir)
        out = str(tmp_path / "a")
    elif case == "holds inputs":
        stamped_run(tmp_path / "r", data, tiny_model_dir)
        shutil.copy(data / "pool.jsonl", tmp_path / "r" / "selected.parquet.jsonl")
        extra = ["--pool", str(tmp_path / "r" / "selected.parquet.jsonl")]
        out = str(tmp_path / "r")
    else:
        out = "/"
    work.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(work)
    capsys.readouterr()
    before = tree(tmp_path)
    assert select(data, out, tiny_model_dir, *extra, "--overwrite") == 2
    line = one_error_line(capsys)
    if case == "empty string":
        assert "--out is empty" in line
    elif case in ("holds inputs", "root"):  # refused before --overwrite is looked at: inputs under --out
        assert "is inside --out" in line and "keep inputs and outputs apart" in line
    else:
        assert "--overwrite never deletes there" in line
    assert tree(tmp_path) == before


def test_a_quoted_tilde_is_the_home_directory(tiny_data, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert select(tiny_data, "~/run", tiny_model_dir) == 0
    assert (tmp_path / "home" / "run" / "manifest.json").exists() and not (tmp_path / "~").exists()


def test_an_unreadable_stamp_is_not_a_run_named_in_one_line_and_overwrite_recovers(tiny_data, tiny_model_dir, tmp_path,
                                                                                    capsys):
    out = tmp_path / "run"
    assert select(tiny_data, out, tiny_model_dir) == 0
    (out / "keep.txt").write_text("user file")
    (out / "_work" / "config.json").write_text('{"fingerprint": "ab')  # truncated
    capsys.readouterr()
    assert select(tiny_data, out, tiny_model_dir) == 2
    line = one_error_line(capsys)
    assert str(out / "_work" / "config.json") in line and "cannot be read" in line
    assert select(tiny_data, out, tiny_model_dir, "--overwrite") == 0
    assert (out / "keep.txt").read_text() == "user file"
    assert json.loads((out / "_work" / "config.json").read_text())["fingerprint"]


def test_an_out_that_cannot_be_written_is_one_line_before_any_work(tiny_data, tiny_model_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert select(tiny_data, blocker / "run", tiny_model_dir) == 2
    assert "cannot write there" in one_error_line(capsys)


# =============================================================================================
# 2. credentials in URIs
@pytest.mark.parametrize("uri, expected", [
    ("s3://KEY:SECRET@bucket/run", "s3://***@bucket/run"),
    ("s3://KEY:SE/CRET@bucket/run", "s3://***@bucket/run"),
    ("s3://bucket/run?region=eu-west-1&access_key=A&secret_key=S&session_token=T",
     "s3://bucket/run?region=eu-west-1&access_key=***&secret_key=***&session_token=***"),
    ("https://h/x?X-Amz-Credential=c&X-Amz-Signature=s&x-amz-security-token=t&ok=1",
     "https://h/x?X-Amz-Credential=***&X-Amz-Signature=***&x-amz-security-token=***&ok=1"),
    ("abfs://container@acct.dfs.core.windows.net/p?sv=2020&sig=Z", "abfs://container@acct.dfs.core.windows.net/p?sv=2020&sig=***"),
    ("gs://b/x?TOKEN=1&Password=2&credential=3", "gs://b/x?TOKEN=***&Password=***&credential=***"),
    ("s3://bucket/runs/me@example/x", "s3://bucket/runs/me@example/x"),
    ("runs/local/dir", "runs/local/dir"),
    ("error: cannot open s3://K:S@b/x: denied", "error: cannot open s3://***@b/x: denied"),
])
def test_redact(uri, expected):
    assert redact(uri) == expected
    assert redact({"a": [uri], "b": 1}) == {"a": [expected], "b": 1}


def test_work_dir_names_and_run_identity_hold_no_secret(monkeypatch, tmp_path):
    from ntk_ray.io.outdir import fingerprint_of
    from ntk_ray.io.storage import default_work_dir

    monkeypatch.setenv("NTK_RAY_CACHE", str(tmp_path))
    a1, a2 = "s3://KEY:SECRET1@bucket-a/run", "s3://KEY:SECRET2@bucket-a/run"
    b = "s3://KEY:SECRET1@bucket-b/run"
    assert "SECRET" not in str(default_work_dir(a1))
    assert default_work_dir(a1) == default_work_dir(a2) != default_work_dir(b)
    ident = {"domain": ["d.jsonl"], "pool": [a1]}
    assert fingerprint_of(ident) == fingerprint_of(ident | {"pool": [a2]}) != fingerprint_of(ident | {"pool": [b]})
    endpoint = "s3://bucket-a/run?endpoint_override=minio-{}:9000&secret_key=S"
    assert default_work_dir(endpoint.format(1)) != default_work_dir(endpoint.format(2))


def test_no_secret_in_any_file_name_or_log_line_of_a_whole_run(tiny_data, tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NTK_RAY_CACHE", str(tmp_path / "cache"))
    out = f"file://{tmp_path}/remote/run?session_token=OUTSECRET&X-Amz-Signature=OUTSIG"
    pool = f"file://{tiny_data}/pool.jsonl?sig=POOLSECRET"
    assert select(tiny_data, out, tiny_model_dir, "--pool", pool) == 0
    assert select(tiny_data, out, tiny_model_dir, "--pool", pool) == 0  # the rerun's lines too
    err = capsys.readouterr().err
    secrets = [b"OUTSECRET", b"OUTSIG", b"POOLSECRET"]
    assert "results go to" in err and "session_token=***" in err
    assert not any(s.decode() in err for s in secrets), err
    ranked = pl.read_parquet(tmp_path / "remote" / "run" / "ranked.parquet")
    assert set(ranked["source"]) == {f"file://{tiny_data}/pool.jsonl?sig=***"}
    assert pl.read_parquet(tmp_path / "remote" / "run" / "selected.parquet").height == 5  # read back through the real URI
    checked = 0
    for root in (tmp_path / "remote", tmp_path / "cache"):
        for p in root.rglob("*"):
            assert not any(s.decode() in str(p) for s in secrets), p
            rel = p.relative_to(root).parts
            # the read stage's own token shards and unit markers (_work/tokens/) keep the real
            # input address: selected.parquet is read back through it (stages/workers.py)
            if p.is_file() and "tokens" not in rel:
                data = p.read_bytes()
                if p.suffix == ".parquet":
                    data += json.dumps(pl.read_parquet(p).to_dicts(), default=str).encode()
                assert not any(s in data for s in secrets), p
                checked += 1
    assert checked > 10
    manifest = json.loads((tmp_path / "remote" / "run" / "manifest.json").read_text())
    assert manifest["config"]["out"] == redact(out)


# =============================================================================================
# 3. URI outputs: probe, stamp, manifest last, intermediate shards kept until published
def test_a_uri_that_cannot_be_written_fails_before_any_work(tiny_data, tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NTK_RAY_CACHE", str(tmp_path / "cache"))
    (tmp_path / "a-file").write_text("x")
    assert select(tiny_data, f"file://{tmp_path}/a-file/run", tiny_model_dir) == 2
    assert "cannot write to this location" in one_error_line(capsys)
    assert not (tmp_path / "cache").exists()  # no work started
    assert not list(tmp_path.glob("**/_ntk-ray-probe-*"))


def test_the_probe_object_is_removed(tiny_data, tiny_model_dir, tmp_path, monkeypatch):
    from ntk_ray.io.storage import probe_uri

    probe_uri(f"file://{tmp_path}/remote")
    assert list((tmp_path / "remote").iterdir()) == []


def test_a_uri_holding_another_configs_run_is_refused_unless_overwrite(tiny_data, tiny_model_dir, tmp_path, monkeypatch,
                                                                      capsys):
    monkeypatch.setenv("NTK_RAY_CACHE", str(tmp_path / "cache"))
    uri = f"file://{tmp_path}/remote/run"
    assert select(tiny_data, uri, tiny_model_dir) == 0
    stamp = json.loads((tmp_path / "remote" / "run" / "_ntk_ray_stamp.json").read_text())
    other_work = ["--work-dir", str(tmp_path / "elsewhere")]  # another machine: another work dir
    capsys.readouterr()
    assert select(tiny_data, uri, tiny_model_dir, "--budget", "4", *other_work) == 2
    line = one_error_line(capsys)
    assert "holds a run with a different config" in line and "_ntk_ray_stamp.json" in line
    assert json.loads((tmp_path / "remote" / "run" / "manifest.json").read_text())["counts"]["selected"] == 5
    assert select(tiny_data, uri, tiny_model_dir, "--budget", "4", *other_work, "--overwrite") == 0
    assert json.loads((tmp_path / "remote" / "run" / "manifest.json").read_text())["counts"]["selected"] == 4
    assert json.loads((tmp_path / "remote" / "run" / "_ntk_ray_stamp.json").read_text())["fingerprint"] != stamp["fingerprint"]


def test_publish_deletes_a_stale_manifest_first_and_uploads_it_last(tmp_path, monkeypatch):
    from ntk_ray.io import storage

    local = tmp_path / "local"
    local.mkdir()
    for name in storage.RESULT_FILES:
        (local / name).write_text(f"new {name}")
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "manifest.json").write_text("old manifest")
    seen = []
    real = storage._upload

    def spy(fs, source, dest):
        seen.append((Path(dest).name, (remote / "manifest.json").exists()))
        return real(fs, source, dest)

    monkeypatch.setattr(storage, "_upload", spy)
    storage.publish(local, f"file://{remote}", names=("manifest.json", "ranked.parquet", "selected.parquet",
                                                       "rejects.parquet"))
    assert [name for name, _ in seen] == ["ranked.parquet", "selected.parquet", "rejects.parquet", "manifest.json"]
    assert not any(manifest_there for _, manifest_there in seen)  # the stale one went first
    assert (remote / "manifest.json").read_text() == "new manifest.json"
    assert not [p for p in remote.iterdir() if ".tmp-" in p.name]


def test_intermediate_shards_are_kept_until_the_results_are_published(tiny_data, tiny_model_dir, tmp_path, monkeypatch):
    from ntk_ray.io import storage

    monkeypatch.setenv("NTK_RAY_CACHE", str(tmp_path / "cache"))
    uri = f"file://{tmp_path}/remote/run"
    work = storage.default_work_dir(uri)
    present = []
    real = storage._upload

    def spy(fs, source, dest):
        if dest.endswith("_ntk_ray_stamp.json"):  # the stamp, written before any work
            return real(fs, source, dest)
        present.append(((work / "_work" / "embed" / "_SUCCESS").exists(), (work / "_work" / "features" / "_SUCCESS").exists()))
        return real(fs, source, dest)

    monkeypatch.setattr(storage, "_upload", spy)
    assert select(tiny_data, uri, tiny_model_dir, selector="ntk") == 0
    assert present and all(e and f for e, f in present)
    assert not (work / "_work" / "features").exists()  # dropped after publishing


# =============================================================================================
# 4. the lock
def hold_lock(out: Path, pid: int = 4242, host: str = "elsewhere"):
    (out / "_work").mkdir(parents=True, exist_ok=True)
    fd = os.open(out / "_work" / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps({"pid": pid, "host": host}).encode())
    return fd


def lock_is_free(out: Path) -> bool:
    fd = os.open(out / "_work" / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_a_second_run_into_a_locked_out_fails_at_once_naming_the_other(tiny_data, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert select(tiny_data, out, tiny_model_dir) == 0
    fd = hold_lock(out)
    try:
        capsys.readouterr()
        assert select(tiny_data, out, tiny_model_dir, "--budget", "4", "--overwrite") == 2
        line = one_error_line(capsys)
        assert "in use by another ntk-ray run" in line and "pid 4242 on host elsewhere" in line
        assert json.loads((out / "manifest.json").read_text())["counts"]["selected"] == 5  # nothing deleted
    finally:
        os.close(fd)
    assert select(tiny_data, out, tiny_model_dir, "--budget", "4", "--overwrite") == 0


def test_the_lock_is_held_during_the_run_and_released_on_errors(tiny_data, tiny_model_dir, tmp_path, monkeypatch):
    from ntk_ray.stages.write import WriteStage

    out = tmp_path / "run"
    during = []
    real = WriteStage.run

    def spy(self, ctx, *a, **k):
        during.append(lock_is_free(out))
        info = json.loads((out / "_work" / ".lock").read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        if len(during) == 1:
            raise RuntimeError("boom")
        return real(self, ctx, *a, **k)

    monkeypatch.setattr(WriteStage, "run", spy)
    with pytest.raises(RuntimeError, match="boom"):
        select(tiny_data, out, tiny_model_dir)
    assert during == [False] and lock_is_free(out)
    assert select(tiny_data, out, tiny_model_dir) == 0
    assert during == [False, False] and lock_is_free(out)


# =============================================================================================
# 5. faults: killed while publishing; corrupted markers
def test_a_run_killed_while_publishing_recovers_without_recomputing(tiny_data, tiny_model_dir, tmp_path, monkeypatch,
                                                                    capsys):
    from ntk_ray.io import storage

    monkeypatch.setenv("NTK_RAY_CACHE", str(tmp_path / "cache"))
    uri = f"file://{tmp_path}/remote/run"
    remote = tmp_path / "remote" / "run"
    assert select(tiny_data, uri, tiny_model_dir) == 0  # an earlier run at the URI
    real = storage._upload
    uploads = []

    def dies_after_one(fs, source, dest):
        if dest.endswith("_ntk_ray_stamp.json"):
            return real(fs, source, dest)
        if uploads:
            raise KeyboardInterrupt("killed")  # what a SIGINT does; a SIGKILL stops even earlier
        uploads.append(dest)
        return real(fs, source, dest)

    monkeypatch.setattr(storage, "_upload", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        select(tiny_data, uri, tiny_model_dir, "--budget", "4", "--overwrite")
    assert [Path(d).name for d in uploads] == ["report.html"]  # the first file up (data files next, manifest last)
    # a reader never takes the URI for a complete run: the earlier manifest went first
    assert not (remote / "manifest.json").exists()
    monkeypatch.setattr(storage, "_upload", real)
    capsys.readouterr()
    assert select(tiny_data, uri, tiny_model_dir, "--budget", "4") == 0
    err = capsys.readouterr().err
    for stage in ("read", "score", "write"):  # every saved stage (validate, coarse: cheap, not saved)
        assert f"{stage}: reusing the finished" in err, err
    manifest = json.loads((remote / "manifest.json").read_text())
    assert manifest["counts"]["selected"] == 4
    work = storage.default_work_dir(uri)
    for name in storage.RESULT_FILES:
        assert (remote / name).read_bytes() == (work / name).read_bytes()


def test_rerunning_a_complete_uri_run_does_not_upload_again(tiny_data, tiny_model_dir, tmp_path, monkeypatch, capsys):
    from ntk_ray.io import storage

    monkeypatch.setenv("NTK_RAY_CACHE", str(tmp_path / "cache"))
    uri = f"file://{tmp_path}/remote/run"
    assert select(tiny_data, uri, tiny_model_dir) == 0

    def no_upload(*a):
        raise AssertionError("uploaded again")

    monkeypatch.setattr(storage, "_upload", no_upload)
    assert select(tiny_data, uri, tiny_model_dir) == 0
    assert "already complete" in capsys.readouterr().err


@pytest.mark.parametrize("marker", ["stage _SUCCESS truncated", "stage _SUCCESS empty", "unit marker",
                                    "saved _result.json", "config.json"])
def test_a_corrupted_marker_is_redone_never_a_traceback(marker, tiny_data, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert select(tiny_data, out, tiny_model_dir) == 0
    first = pl.read_parquet(out / "ranked.parquet")["id"].to_list()
    work = out / "_work"
    (work / "write" / "_SUCCESS").unlink()  # the run stopped before its end: the rerun looks at every stage
    domain_shards = {p: p.stat().st_mtime_ns for p in (work / "tokens" / "domain").glob("*.parquet")}
    if marker == "stage _SUCCESS truncated":
        (work / "score" / "_SUCCESS").write_text('{"sta')
        redone = "score"
    elif marker == "stage _SUCCESS empty":
        (work / "score" / "_SUCCESS").write_text("")
        redone = "score"
    elif marker == "unit marker":
        (work / "read" / "_SUCCESS").unlink()  # killed while reading: the unit markers decide
        units = sorted((work / "tokens" / "pool" / "_done").glob("*.json"))
        units[0].write_text('{"path": "/x", "ro')
        redone = "read"
    elif marker == "saved _result.json":
        (work / "score" / "_result.json").write_text('{"scores": ')
        redone = "score"
    else:
        (work / "config.json").write_text("{")
        redone = None
    capsys.readouterr()
    if redone is None:  # the stamp vouches for every stage: a clear line, then --overwrite redoes all
        assert select(tiny_data, out, tiny_model_dir) == 2
        assert "config.json" in one_error_line(capsys)
        assert select(tiny_data, out, tiny_model_dir, "--overwrite") == 0
    else:
        assert select(tiny_data, out, tiny_model_dir) == 0
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert f"{redone}: reusing the finished" not in err
        if redone == "score":
            assert "read: reusing the finished" in err, err
        if redone == "read":  # only the pool file is read again; the domain file's shards stay
            assert {p: p.stat().st_mtime_ns for p in domain_shards} == domain_shards
    assert pl.read_parquet(out / "ranked.parquet")["id"].to_list() == first


def test_cli_error_lines_and_summaries_hold_no_secret(tmp_path, capsys):
    """An error naming a URI with credentials is printed redacted (cli.main prints every error)."""
    from ntk_ray.cli import main

    d = tmp_path / "d.jsonl"
    d.write_text("".join(f'{{"id": "d{i}", "text": "w{i}"}}\n' for i in range(6)))
    code = main(["select", "--domain", str(d), "--pool", "nosuchscheme://AKIDEXAMPLE:TOPSECRET42@bucket/pool.jsonl",
                 "--budget", "1", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "TOPSECRET42" not in err and "ntk-ray: error:" in err


def test_a_driver_sigkilled_while_publishing_recovers_without_recomputing(tiny_data, tiny_model_dir, tmp_path,
                                                                          monkeypatch, capsys):
    """A real SIGKILL of the driver process after its first result file reached the URI: the
    rerun reuses every saved stage, publishes all four files, manifest last."""
    from conftest import kill_driver_when_marked
    from ntk_ray.io import storage

    cache = tmp_path / "cache"
    monkeypatch.setenv("NTK_RAY_CACHE", str(cache))
    uri = f"file://{tmp_path}/remote/run"
    remote = tmp_path / "remote" / "run"
    mark = tmp_path / "uploaded.txt"
    patch = (
        "from ntk_ray.io import storage\n"
        "real = storage._upload\n"
        "def slow(fs, source, dest):\n"
        "    result = real(fs, source, dest)\n"
        "    if not dest.endswith('_ntk_ray_stamp.json'):\n"
        "        open(os.environ['MARK'], 'a').write(dest + '\\n')\n"
        "        time.sleep(120)\n"
        "    return result\n"
        "storage._upload = slow\n")
    kill_driver_when_marked(patch, select_args(tiny_data, uri, tiny_model_dir), mark, {"NTK_RAY_CACHE": str(cache)})
    assert [Path(line).name for line in mark.read_text().split()] == ["report.html"]  # the first file up
    assert not (remote / "manifest.json").exists()  # a reader never takes the URI for a complete run
    capsys.readouterr()
    assert select(tiny_data, uri, tiny_model_dir) == 0
    err = capsys.readouterr().err
    for stage in ("read", "score", "write"):
        assert f"{stage}: reusing the finished" in err, err
    work = storage.default_work_dir(uri)
    for name in storage.RESULT_FILES:
        assert (remote / name).read_bytes() == (work / name).read_bytes()
