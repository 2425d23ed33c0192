"""Progress that works in logs: rows done / total, rows/s and ETA per stage (a tqdm bar on a
terminal, a line per interval elsewhere), warm-up batches, --quiet / --verbose, the demo-model
notice, and the filter that holds back Ray's error-level line about an expected condition."""

from __future__ import annotations

import io
import json
import os
import re

import pytest

from ntk_ray.progress import Progress

LINE = re.compile(r"\] (?P<name>[\w ]+): (?P<n>\d+)/(?P<total>\d+) (?P<unit>\w+) \((?P<pct>\d+)%\), "
                  r"(?P<rate>[\d.]+) (?P=unit)/s, ETA (?P<mm>\d\d):(?P<ss>\d\d)")
LAST = re.compile(r"\] (?P<name>[\w ]+): (?P<n>\d+)/(?P<total>\d+) (?P<unit>\w+) in \d\d:\d\d \((?P<rate>[\d.]+) (?P=unit)/s\)")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def log_progress(clock, interval=10.0, verbosity="normal"):
    stream = io.StringIO()
    return Progress(stream=stream, clock=clock, interval=interval, tty=False, verbosity=verbosity), stream


def test_log_lines_every_interval_with_rate_and_eta():
    """Not a terminal: one line per interval (none before the first interval has passed), rows
    done / total, the rate and the ETA it implies; a last line with the stage's average rate."""
    clock = Clock()
    progress, stream = log_progress(clock, interval=10.0)
    with progress.stage("embed"), progress.track(100) as rows:
        for _ in range(10):  # 10 rows every 2.5 s: 4 rows/s
            clock.now += 2.5
            rows.update(10)
    text = stream.getvalue()
    lines = [m.groupdict() for m in LINE.finditer(text)]
    # t = 10, 20 (and 25: 100 rows only after 25 s: the last update comes 5 s after the one at 20)
    assert [int(m["n"]) for m in lines] == [40, 80]
    for m in lines:
        assert m["name"] == "embed" and int(m["total"]) == 100 and m["unit"] == "rows"
        assert int(m["pct"]) == int(m["n"])
        assert float(m["rate"]) == pytest.approx(4.0, abs=0.01)
        eta = 60 * int(m["mm"]) + int(m["ss"])
        assert abs(eta - (100 - int(m["n"])) / 4.0) <= 1
    last = LAST.search(text)
    assert last and int(last["n"]) == 100 and float(last["rate"]) == pytest.approx(4.0, abs=0.01)
    assert "[ntk-ray    25.0s] embed: done in 25.0s" in text
    assert "\r" not in text  # plain lines for a log, no bar redraws


def test_rate_and_eta_follow_a_slower_phase():
    """The rate is tqdm's moving average between lines: after a slow start it moves towards the
    current speed, and the ETA with it (the last line still gives the average)."""
    clock = Clock()
    progress, stream = log_progress(clock, interval=0.0)
    with progress.track(30, name="features") as rows:
        clock.now += 10.0
        rows.update(10)  # 1 row/s
        for _ in range(10):
            clock.now += 0.5
            rows.update(1)  # 2 rows/s
    found = [m.groupdict() for m in LINE.finditer(stream.getvalue())]
    assert len(found) == 11 and float(found[0]["rate"]) == pytest.approx(1.0, abs=0.01)
    assert 1.0 < float(found[-1]["rate"]) <= 2.0  # moving towards 2 rows/s
    assert float(LAST.search(stream.getvalue())["rate"]) == pytest.approx(20 / 15, abs=0.01)


def test_unknown_total_and_quiet_and_a_terminal_bar():
    clock = Clock()
    progress, stream = log_progress(clock, interval=0.0)
    with progress.track(None, name="read pool") as rows:
        clock.now += 2.0
        rows.update(50)
    assert "read pool: 50 rows, 25.00 rows/s" in stream.getvalue() and "ETA" not in stream.getvalue()
    assert "read pool: 50 rows in 00:02 (25.00 rows/s)" in stream.getvalue()

    quiet, stream = log_progress(clock, interval=0.0, verbosity="quiet")
    with quiet.stage("embed"), quiet.track(10) as rows:
        quiet.log("anything")
        rows.update(10)
    assert stream.getvalue() == ""

    tty = io.StringIO()
    bar = Progress(stream=tty, tty=True)
    with bar.track(4, name="embed") as rows:
        rows.update(4)
    assert "embed: 100%" in tty.getvalue() and "4/4" in tty.getvalue() and "rows/s" in tty.getvalue()


def test_slow_rates_keep_two_significant_digits():
    """Hours-long GPU stages on a busy machine: 0.0042 batches/s, not 0.00."""
    clock = Clock()
    progress, stream = log_progress(clock, interval=0.0)
    with progress.track(3, unit="batches", name="warmup") as batches:
        clock.now += 240.0
        batches.update(1, loss=2.5)
    assert "warmup: 1/3 batches (33%), 0.0042 batches/s, ETA 08:00, loss=2.5" in stream.getvalue()


def test_training_batches_are_tracked_from_the_start_with_the_loss(tiny_model):
    """train_lora's on_batch drives ``Progress.steps``: batches done / total with the loss, and
    the rate counts from when the training started (not from the first batch's end)."""
    from conftest import random_samples

    from ntk_ray.core.training import TrainConfig, train_lora

    clock = Clock()
    progress, stream = log_progress(clock, interval=0.0)
    steps = progress.steps("warmup")
    calls = []

    def on_batch(done, total, loss):
        clock.now += 2.0  # every batch takes 2 s on the fake clock
        calls.append((done, total))
        steps(done, total, loss)

    seqs, masks = random_samples(8)
    train_lora(tiny_model, seqs, masks, TrainConfig(epochs=1.5, batch_tokens=40, max_batch_rows=4), log=lambda m: None,
               on_batch=on_batch)
    total = calls[0][1]
    assert [c[0] for c in calls] == list(range(1, total + 1)) and all(c[1] == total for c in calls)
    assert total > 2
    lines = [m.groupdict() for m in LINE.finditer(stream.getvalue())]
    assert [int(m["n"]) for m in lines] == list(range(1, total))  # total/total: said by the last line
    assert all(m["unit"] == "batches" and float(m["rate"]) == pytest.approx(0.5, abs=0.01) for m in lines)
    assert re.search(r"warmup: 1/\d+ batches .*, loss=\d", stream.getvalue())
    assert LAST.search(stream.getvalue())["n"] == str(total)


def _select_argv(tiny_data, tiny_model_dir, out, *extra):
    """The tiny pool in 3 files: 3 read units and 3 token shards, so progress has lines before the last."""
    lines = (tiny_data / "pool.jsonl").read_text().splitlines(keepends=True)
    pool = tiny_data / "pool"
    pool.mkdir(exist_ok=True)
    for i in range(3):
        (pool / f"part-{i}.jsonl").write_text("".join(lines[10 * i:10 * (i + 1)]))
    return ["select", "--domain", str(tiny_data / "domain.jsonl"), "--pool", str(pool),
            "--budget", "4", "--out", str(out), "--model", str(tiny_model_dir), "--executor", "local",
            "--proj-dim", "64", "--coarse-factor", "2", "--max-length", "32", *extra]


def test_select_prints_progress_and_nothing_alarming(tiny_data, tiny_model_dir, tmp_path, capsys, monkeypatch):
    """A local select into a log (not a terminal): every model stage and the reads report rows
    done / total, rows/s and ETA, the warm-up its batches; no loading bars, no error lines."""
    from ntk_ray.cli import main

    monkeypatch.setenv("NTK_RAY_PROGRESS_INTERVAL", "0")
    capsys.readouterr()
    assert main(_select_argv(tiny_data, tiny_model_dir, tmp_path / "out")) == 0
    captured = capsys.readouterr()
    err = captured.err
    found = {m["name"]: m.groupdict() for m in LINE.finditer(err)}  # lines with rows/s and ETA
    last = {m["name"]: m.groupdict() for m in LAST.finditer(err)}  # each one's last line: its average rate
    assert {"read pool", "warmup", "embed", "features"} <= set(found), err
    assert {"read domain", "read pool", "warmup", "embed", "features"} <= set(last), err
    assert found["read pool"]["total"] == "30" and found["embed"]["total"] == "30" and found["features"]["total"] == "8"
    assert int(found["embed"]["n"]) < 30 and last["embed"]["n"] == "30" and last["features"]["n"] == "8"
    assert found["warmup"]["unit"] == "batches"
    assert "warmup: epoch 1: loss" in err
    for bad in ("Loading weights", "ERROR", "Traceback", "Warning", "\r"):
        assert bad not in err, (bad, err)
    assert "ntk-ray select: done" in captured.out and "note:" not in captured.out  # --model given: no demo notice


def test_quiet_prints_only_the_summary(tiny_data, tiny_model_dir, tmp_path, capsys, monkeypatch):
    from ntk_ray.cli import main

    monkeypatch.setenv("NTK_RAY_PROGRESS_INTERVAL", "0")
    capsys.readouterr()
    assert main(_select_argv(tiny_data, tiny_model_dir, tmp_path / "out", "--selector", "random", "--quiet")) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "ntk-ray select: done" in captured.out and "selected 4" in captured.out


def test_the_demo_model_notice_at_the_start_and_in_the_summary():
    """Without --model, the run says it uses the bundled 135M demo model and how to pass a real
    one; the summary repeats it (read from the manifest's config)."""
    from ntk_ray.cli import print_summary
    from ntk_ray.runner import demo_model_notice

    notice = demo_model_notice(None)
    assert "SmolLM2-135M-Instruct" in notice and "--model DIR" in notice and "hub id" in notice
    assert demo_model_notice("my/model") is None
    manifest = {"counts": {k: 1 for k in ("pool_rows", "rejected", "ranked", "selected", "domain_rows",
                                          "domain_rejected", "pool_truncated", "domain_truncated")},
                "stage_seconds": {"read": 1.0}, "config": {"model": None}}
    out = io.StringIO()
    print_summary(manifest, "runs/x", stream=out)
    assert f"note: {notice}" in out.getvalue()
    out = io.StringIO()
    print_summary(manifest | {"config": {"model": "my/model"}}, "runs/x", stream=out)
    assert "note:" not in out.getvalue()


def test_run_select_says_it_at_the_start(monkeypatch, tmp_path):
    """The start of a run without --model (the checks stubbed: no model is loaded)."""
    from ntk_ray import runner
    from ntk_ray.config import SelectConfig

    class Stop(Exception):
        pass

    monkeypatch.setattr(runner, "check_inputs", lambda cfg: runner.CheckedInputs(None, {}, {}, "demo"))

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(runner, "open_out_dir", stop)
    stream = io.StringIO()
    cfg = SelectConfig(domain=["d.jsonl"], pool=["p.jsonl"], budget=1, out=str(tmp_path / "o"))
    with pytest.raises(Stop):
        runner.run_select(cfg, progress=Progress(stream=stream, tty=False))
    assert runner.demo_model_notice(None) in stream.getvalue()


def test_ray_is_joined_with_worker_output_forwarded(monkeypatch):
    """connect: workers' output reaches the driver (``ray job logs``), Ray's info logs only with
    --verbose (ray.init stubbed: no Ray is started)."""
    import ray

    from ntk_ray.runtime import ray_executor

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(ray_executor, "quiet_ray", lambda: calls.append("quiet"))
    monkeypatch.setenv("RAY_ADDRESS", "ray://example:10001")
    ray_executor.connect(None, lambda m: None, verbosity="normal")
    ray_executor.connect(None, lambda m: None, verbosity="verbose")
    assert calls[0]["log_to_driver"] is True and calls[0]["logging_level"] == 30 and calls[1] == "quiet"
    assert calls[2]["log_to_driver"] is True and calls[2]["logging_level"] == 20 and len(calls) == 3


def test_the_stderr_filter_drops_only_the_expected_ray_line(tmp_path):
    """The filter in front of a file descriptor (here a pipe of the test's, not the real stderr)
    drops Ray's C++ line about constructor arguments in the object store and passes the rest on,
    partial lines included."""
    from ntk_ray.runtime.ray_executor import _StderrFilter

    read, write = os.pipe()
    f = _StderrFilter(fd=write)
    noise = (b"[2026-12-01 03:17:41,810 E 18790 18790] core_worker.cc:2465: Actor with class name: "
             b"'MapWorker(MapBatches(W))' and ID: 'e0' has constructor arguments in the object store and "
             b"max_restarts > 0. If the arguments in the object store go out of scope or are lost, ...\n")
    os.write(write, b"kept 1\n")
    os.write(write, noise)
    os.write(write, b"[2026-12-01 03:17:42,000 E 1 1] core_worker.cc:99: a real error\n")
    os.write(write, b"\rbar 50%")
    f.close()
    os.close(write)
    with os.fdopen(read, "rb") as fh:
        passed = fh.read()
    assert passed == b"kept 1\n[2026-12-01 03:17:42,000 E 1 1] core_worker.cc:99: a real error\n\rbar 50%"


def test_closing_the_stderr_filter_twice_closes_no_one_elses_descriptor():
    """The exit hook calls ``close`` again after an explicit close: by then the numbers of the
    filter's descriptors may belong to another library (the AWS SDK's wake-up fd once: a hang at
    exit). The second call closes nothing."""
    from ntk_ray.runtime.ray_executor import _StderrFilter

    read, write = os.pipe()
    f = _StderrFilter(fd=write)
    f.close()
    os.close(write)
    os.close(read)
    other_r, other_w = os.pipe()
    os.dup2(other_r, f.target)  # someone else now owns the number the filter closed
    try:
        f.close()
        os.fstat(f.target)  # still open
    finally:
        for fd in (f.target, other_r, other_w):
            os.close(fd)


def test_workers_get_the_quiet_library_environment():
    from ntk_ray.progress import library_env

    assert library_env("normal")["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert library_env("quiet")["TRANSFORMERS_VERBOSITY"] == "error"
    assert library_env("verbose") == {}
    json.dumps(library_env("normal"))  # plain strings: a runtime_env's env_vars
