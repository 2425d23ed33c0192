"""Every number of every config is range-checked before any work starts: the range is declared
once, in the field's metadata (``config.opt(..., min=, gt=, max=)``), and ``config.validate``
checks all of them (the CLI and the runner call it, so the Python API gets it too). Table-driven
over every numeric field of SelectConfig, FeaturesConfig and ScoreConfig, then the flags of
``finetune`` and ``evaluate`` that share those fields."""

from __future__ import annotations

import dataclasses
import math

import pytest

from ntk_ray.cli import main
from ntk_ray.config import (INT_MAX, SEED_MAX, FeaturesConfig, ScoreConfig, SelectConfig, flag_of, numeric_fields,
                            validate)
from ntk_ray.io.accounting import UsageError

CONFIGS = (SelectConfig, FeaturesConfig, ScoreConfig)


def valid(cls):
    """A config of ``cls`` whose numbers are all fine (the required ones filled in)."""
    if cls is SelectConfig:
        return SelectConfig(domain=["d.jsonl"], pool=["p.jsonl"], budget=3, out="runs/x")
    if cls is FeaturesConfig:
        return FeaturesConfig(data=["d.jsonl"], out="feats/x")
    return ScoreConfig(features="f", anchors="a", budget=3, out="runs/y")


def bad_values(cls, f) -> list:
    """Values outside the declared range of a field: below the bound, above the cap, non-finite
    or of the wrong type."""
    m = f.metadata
    typ = int if "int" in str(f.type) else float
    out = []
    if "min" in m:
        out.append(m["min"] - 1 if typ is int else m["min"] - 0.5)
    if "gt" in m:
        out += [m["gt"], m["gt"] - 1]
    hi = m.get("max", INT_MAX if typ is int else None)
    if hi is not None:
        out.append(hi + 1)
    out += ["5", True]
    if typ is float:
        out += [math.nan, math.inf, -math.inf]
    else:
        out += [2.5]
    return out


CASES = [(cls, f, v) for cls in CONFIGS for f in numeric_fields(cls) for v in bad_values(cls, f)]


def test_the_table_covers_every_numeric_field_and_each_declares_a_lower_bound():
    names = {(cls.__name__, f.name) for cls, f, _ in CASES}
    expected = {(cls.__name__, f.name) for cls in CONFIGS for f in dataclasses.fields(cls)
                if f.type in ("int", "float", "int | None", "float | None")}
    assert names == expected
    assert ("SelectConfig", "wait_for_resources") in names and ("FeaturesConfig", "seed") in names
    for cls in CONFIGS:
        for f in numeric_fields(cls):
            assert "min" in f.metadata or "gt" in f.metadata, f"{cls.__name__}.{f.name} declares no lower bound"


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_defaults_and_bounds_themselves_pass(cls):
    validate(valid(cls))
    for f in numeric_fields(cls):
        for edge in (f.metadata.get("min"), f.metadata.get("max")):
            if edge is not None:
                validate(dataclasses.replace(valid(cls), **{f.name: edge}))


@pytest.mark.parametrize("cls,f,value", CASES,
                         ids=[f"{c.__name__}.{f.name}={v!r}" for c, f, v in CASES])
def test_a_value_out_of_range_is_one_line_naming_flag_value_and_range(cls, f, value):
    cfg = dataclasses.replace(valid(cls), **{f.name: value})
    with pytest.raises(UsageError) as info:
        validate(cfg)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(flag_of(f) + " must be "), message
    assert f"(got {value!r})" in message
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
            and not (isinstance(value, float) and "int" in str(f.type)):
        bound = f.metadata.get("min", f.metadata.get("gt"))
        assert str(int(bound) if float(bound).is_integer() else bound) in message or "at most" in message


def test_messages_read_well():
    def error(**kw):
        with pytest.raises(UsageError) as info:
            validate(dataclasses.replace(valid(SelectConfig), **kw))
        return str(info.value)

    assert error(seed=-1) == f"--seed must be between 0 and {SEED_MAX} (got -1)"
    assert error(seed=2**64) == f"--seed must be between 0 and {SEED_MAX} (got {2**64})"
    assert error(proj_dim=0) == "--proj-dim must be at least 1 (got 0)"
    assert error(lora_r=0) == "--lora-r must be between 1 and 65536 (got 0)"
    assert error(actors=-3) == "--actors must be between 1 and 100000 (got -3)"
    assert error(coarse_k=-1) == "--coarse-k must be at least 1 (got -1)"
    assert error(warmup_epochs=-2.0) == "--warmup-epochs must be between 0 and 1000000 (got -2.0)"
    assert error(wait_for_resources=-5.0) == \
        "--wait-for-resources must be greater than 0 and at most 10000000 (got -5.0)"
    assert error(warmup_lr=math.nan) == "--warmup-lr must be a finite number (got nan)"
    assert error(budget="5") == "--budget must be an integer (got '5')"
    assert error(batch_tokens=2**40) == f"--batch-tokens must be at most {INT_MAX} (got {2**40})"
    validate(dataclasses.replace(valid(SelectConfig), actors=None, coarse_k=None))  # None: the default


def test_out_or_work_dir_that_is_an_existing_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("mine")
    for cls in CONFIGS:
        with pytest.raises(UsageError, match=r"^--out .* is an existing file, not a directory"):
            validate(dataclasses.replace(valid(cls), out=str(f)))
    with pytest.raises(UsageError, match=r"^--work-dir .* is an existing file"):
        validate(dataclasses.replace(valid(SelectConfig), work_dir=str(f)))
    validate(dataclasses.replace(valid(SelectConfig), out=str(tmp_path)))  # a directory is fine
    validate(dataclasses.replace(valid(SelectConfig), out="s3://bucket/run"))  # URIs are not looked at here
    assert f.read_text() == "mine"


# ---- through the CLI and the Python API: before any work ---------------------------------------

def _error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("ntk-ray: error: ")
    return err[0][len("ntk-ray: error: "):]


SELECT_FLAGS = [("--seed", "-1"), ("--seed", str(2**64)), ("--proj-dim", "0"), ("--lora-r", "0"),
                ("--batch-tokens", "0"), ("--actors", "-3"), ("--coarse-k", "-1"), ("--warmup-epochs", "-2"),
                ("--wait-for-resources", "-5"), ("--lora-alpha", "0"), ("--warmup-lr", "0"), ("--warmup-lr", "nan"),
                ("--max-length", "0"), ("--budget", "-1"), ("--coarse-factor", "0"),
                ("--warmup-batch-tokens", "0")]


@pytest.mark.parametrize("flag,value", SELECT_FLAGS)
def test_select_flags_out_of_range_exit_2_before_anything_is_read(capsys, tmp_path, monkeypatch, flag, value):
    from ntk_ray import runner

    def nothing(*a, **k):
        raise AssertionError("work started")

    monkeypatch.setattr(runner, "check_model", nothing)
    out = tmp_path / "out"
    argv = ["select", "--domain", str(tmp_path / "missing.jsonl"), "--pool", str(tmp_path / "missing.jsonl"),
            "--budget", "3", "--out", str(out), flag, value]
    assert _error(capsys, argv).startswith(f"{flag} must be ")
    assert not out.exists()


@pytest.mark.parametrize("argv,start", [
    (["features", "--data", "x.jsonl", "--out", "OUT", "--proj-dim", "0"], "--proj-dim must be"),
    (["features", "--data", "x.jsonl", "--out", "OUT", "--seed", "-1"], "--seed must be"),
    (["score", "--features", "f", "--anchors", "a", "--budget", "0", "--out", "OUT"], "--budget must be"),
    (["finetune", "--train", "x.jsonl", "--out", "OUT", "--lora-r", "0"], "--lora-r must be"),
    (["finetune", "--train", "x.jsonl", "--out", "OUT", "--epochs", "-1"], "--epochs must be"),
    (["finetune", "--train", "x.jsonl", "--out", "OUT", "--lr", "inf"], "--lr must be a finite number"),
    (["finetune", "--train", "x.jsonl", "--out", "OUT", "--lora-alpha", "-4"], "--lora-alpha must be"),
    (["evaluate", "--data", "x.jsonl", "--max-length", "2"], "--max-length must be"),
    (["evaluate", "--data", "x.jsonl", "--seed", "-5"], "--seed must be"),
])
def test_the_other_commands_check_the_same_ranges(capsys, tmp_path, argv, start):
    argv = [str(tmp_path / "OUT") if a == "OUT" else a for a in argv]
    assert _error(capsys, argv).startswith(start)
    assert not (tmp_path / "OUT").exists()


def test_finetune_out_that_is_a_file(capsys, tmp_path):
    f = tmp_path / "adapter"
    f.write_text("mine")
    line = _error(capsys, ["finetune", "--train", "x.jsonl", "--out", str(f)])
    assert line == f"--out {f} is an existing file, not a directory; choose a directory"


def test_the_python_api_gets_the_same_check(tmp_path):
    from ntk_ray.runner import check_inputs, run_features, run_score

    with pytest.raises(UsageError, match=r"^--lora-r must be between 1 and 65536 \(got 0\)$"):
        check_inputs(dataclasses.replace(valid(SelectConfig), lora_r=0))
    with pytest.raises(UsageError, match=r"^--proj-dim must be at least 1"):
        run_features(dataclasses.replace(valid(FeaturesConfig), proj_dim=0, out=str(tmp_path / "f")))
    with pytest.raises(UsageError, match=r"^--budget must be at least 1"):
        run_score(dataclasses.replace(valid(ScoreConfig), budget=0, out=str(tmp_path / "s")))
    assert not (tmp_path / "f").exists() and not (tmp_path / "s").exists()
