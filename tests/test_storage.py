"""--out as a URI: stages run in a local work dir, results are copied through pyarrow.fs.
(The end-to-end run with a file:// URI is in test_selectors_e2e.py, with the random selector.)"""

import pytest

from ntk_ray.io.storage import RESULT_FILES, default_work_dir, is_uri, publish


def test_is_uri():
    assert is_uri("s3://bucket/run") and is_uri("gs://b/x") and is_uri("file:///tmp/x")
    assert not is_uri("runs/demo") and not is_uri("/abs/path") and not is_uri("C:/x")


def test_default_work_dir_is_stable_and_distinct(monkeypatch, tmp_path):
    monkeypatch.setenv("NTK_RAY_CACHE", str(tmp_path))
    a, b = default_work_dir("s3://bucket/run-a"), default_work_dir("s3://bucket/run-b")
    assert a == default_work_dir("s3://bucket/run-a") and a != b
    assert a.parent == tmp_path / "runs"


def test_publish_copies_every_result_file(tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    for i, name in enumerate(RESULT_FILES):
        (local / name).write_bytes(bytes([i]) * (1000 + i))
    written = publish(local, f"file://{tmp_path}/remote/run")
    assert written == [f"file://{tmp_path}/remote/run/{n}" for n in RESULT_FILES]
    for name in RESULT_FILES:
        assert (tmp_path / "remote/run" / name).read_bytes() == (local / name).read_bytes()


def test_publish_to_an_unknown_scheme_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="--out nosuch://"):
        publish(tmp_path, "nosuch://bucket/x")


def test_unreachable_uri_fails_before_any_work(demo_data, capsys):
    from conftest import run_select

    d, _ = demo_data
    assert run_select(d, "nosuch://bucket/run", "--selector", "random") == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "no --model given" not in line]
    assert len(err) == 1 and "--out nosuch://bucket/run" in err[0]  # (besides the demo-model notice)


def test_publish_returns_redacted_destinations_and_leaves_no_temporaries(tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    for name in RESULT_FILES:
        (local / name).write_text(name)
    written = publish(local, f"file://{tmp_path}/remote?session_token=SECRET")
    assert written == [f"file://{tmp_path}/remote/{n}?session_token=***" for n in RESULT_FILES]
    assert sorted(p.name for p in (tmp_path / "remote").iterdir()) == sorted(RESULT_FILES)


def test_default_work_dir_never_holds_a_credential(monkeypatch, tmp_path):
    monkeypatch.setenv("NTK_RAY_CACHE", str(tmp_path))
    one, two = default_work_dir("s3://AKIA:SECRET1@bucket/run"), default_work_dir("s3://AKIA:SECRET2@bucket/run")
    assert one == two and "SECRET" not in str(one) and "AKIA" not in str(one)
