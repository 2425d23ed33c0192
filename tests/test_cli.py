"""The command line is generated from the config dataclasses (ntk_ray/config.py): every field has
a flag and every flag a field, every flag of every command says what it does and its default,
--config TOML files (and a manifest's config written as TOML) give back the same config,
--version and `python -m ntk_ray` work. Plain Python: no model, no Ray."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

import ntk_ray
from ntk_ray import cli
from ntk_ray.config import FeaturesConfig, ScoreConfig, SelectConfig

REQUIRED = {
    "select": ["--domain", "d.jsonl", "--pool", "p.jsonl", "--budget", "3", "--out", "o"],
    "features": ["--data", "d.jsonl", "--out", "o"],
    "score": ["--features", "f", "--anchors", "a", "--budget", "3", "--out", "o"],
}
# flags of the config commands that are not config fields
RUN_FLAGS = {"--help", "--config", "--print-config", "--overwrite", "--verbose", "--quiet"}


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def flags(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.option_strings[-1]: a for a in p._actions if a.option_strings}


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def help_text(p: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help line as --help prints it (%(default)s expanded)."""
    return p._get_formatter()._expand_help(action) if action.help else ""


@pytest.mark.parametrize("command,cls", cli.CONFIG_COMMANDS.items())
def test_every_field_has_a_flag_and_every_flag_a_field(command, cls):
    p = subparsers(cli.build_parser())[command]
    field_flags = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(cls)}
    given = set(flags(p)) - RUN_FLAGS
    assert field_flags - given == set(), f"fields without a flag in `{command}`"
    assert given - field_flags == set(), f"flags without a field in `{command}`"
    for f in dataclasses.fields(cls):
        assert flags(p)["--" + f.name.replace("_", "-")].dest == f.name


@pytest.mark.parametrize("command,cls", cli.CONFIG_COMMANDS.items())
def test_generated_help_shows_the_dataclass_default(command, cls):
    p = subparsers(cli.build_parser())[command]
    for f in dataclasses.fields(cls):
        text = help_text(p, flags(p)["--" + f.name.replace("_", "-")])
        if f.metadata.get("required"):
            assert "(required" in text, (command, f.name, text)
            continue
        value = default_of(f)
        if value is None:  # said in words: "(default: the budget)"
            assert "(default: " in text and f.metadata.get("shown_default"), (command, f.name, text)
            continue
        shown = " ".join(map(str, value)) if isinstance(value, list) else str(value)
        assert text.endswith(f"(default: {shown})"), (command, f.name, text)


def test_every_flag_of_every_command_has_help_with_its_default():
    parser = cli.build_parser()
    for name, p in subparsers(parser).items():
        for flag, action in flags(p).items():
            if flag == "--help":
                continue
            text = help_text(p, action)
            assert text.strip(), f"`{name} {flag}` has no help"
            assert "(default: " in text or "(required" in text, f"`{name} {flag}` does not say its default: {text!r}"
    version = flags(parser)["--version"]
    assert version.help


@pytest.mark.parametrize("command,cls", cli.CONFIG_COMMANDS.items())
def test_flags_left_out_give_the_dataclass_defaults(command, cls):
    args = cli.build_parser().parse_args([command, *REQUIRED[command]])
    cfg = cli.config_from_args(cls, args)
    required = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if f.metadata.get("required")}
    assert cfg == cls(**required)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("required"):
            assert getattr(cfg, f.name) == default_of(f), f.name


def test_shared_flags_of_the_hand_written_commands_default_to_the_dataclass():
    parsers = subparsers(cli.build_parser())
    fields = {f.name: f for f in dataclasses.fields(SelectConfig)}
    for name in ("finetune", "evaluate"):
        for flag, action in flags(parsers[name]).items():
            if action.dest in fields and action.dest not in ("out", "adapter"):
                assert action.default == default_of(fields[action.dest]), (name, flag)
    assert flags(parsers["finetune"])["--epochs"].default == SelectConfig().warmup_epochs


def test_flags_reach_the_config():
    argv = ["select", *REQUIRED["select"], "--domain", "a.jsonl", "b.jsonl", "--lora-targets", "q_proj",
            "--coarse-k", "7", "--keep-features", "--warmup-lr", "0.001", "--selector", "bm25", "--warmup-batch-tokens",
            "1024", "--accelerator", "cpu"]
    cfg = cli.select_config(cli.build_parser().parse_args(argv))
    assert cfg.domain == ["a.jsonl", "b.jsonl"] and cfg.lora_targets == ["q_proj"] and cfg.coarse_k == 7
    assert cfg.keep_features is True and cfg.warmup_lr == 0.001 and cfg.selector == "bm25"
    assert cfg.warmup_batch_tokens == 1024 and cfg.accelerator == "cpu"
    feats = cli.config_from_args(FeaturesConfig, cli.build_parser().parse_args(
        ["features", *REQUIRED["features"], "--accelerator", "gpu", "--actors", "2"]))
    assert feats.accelerator == "gpu" and feats.actors == 2


def test_choices_come_from_the_registries():
    from ntk_ray.core.projection import PROJECTORS
    from ntk_ray.core.scoring import SCORERS
    from ntk_ray.core.tokenize import ON_TOO_LONG
    from ntk_ray.stages.registry import selector_names

    s = flags(subparsers(cli.build_parser())["select"])
    assert tuple(s["--selector"].choices) == tuple(selector_names())
    assert tuple(s["--scorer"].choices) == tuple(SCORERS)
    assert tuple(s["--projector"].choices) == tuple(PROJECTORS)
    assert tuple(s["--on-too-long"].choices) == tuple(ON_TOO_LONG)


# ---- --config ------------------------------------------------------------------------------------

def toml_of(d: dict) -> str:
    """A tiny TOML writer, independent of cli.config_toml: None values are left out (no null)."""
    def value(v):
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v)
    return "".join(f"{k} = {value(v)}\n" for k, v in d.items() if v is not None)


def a_config() -> SelectConfig:
    return SelectConfig(domain=["med.jsonl"], pool=["pool/*.parquet", "more.jsonl"], budget=9000, out="runs/med",
                        text_column="body", model="some/model", max_length=256, on_too_long="reject", lora_r=8,
                        lora_targets=["q_proj", "v_proj"], warmup_epochs=1.5, warmup_lr=3e-4, coarse_k=40,
                        selector="embedding", scorer="mean", projector="kron", proj_dim=1024, seed=7, actors=3,
                        accelerator="gpu", wait_for_resources=60.0, keep_features=True, work_dir='/tmp/"w"')


def test_a_manifest_config_written_as_toml_gives_back_the_same_config(tmp_path):
    cfg = a_config()
    manifest = {"config": dataclasses.asdict(cfg)}  # what manifest.json holds, None values included
    path = tmp_path / "run.toml"
    path.write_text(toml_of(json.loads(json.dumps(manifest))["config"]))
    assert cli.select_config(cli.build_parser().parse_args(["select", "--config", str(path)])) == cfg
    # and the defaults alone (every None field of the dataclass left out of the file)
    path.write_text(toml_of(dataclasses.asdict(SelectConfig(domain=["d"], pool=["p"], budget=1, out="o"))))
    assert cli.select_config(cli.build_parser().parse_args(["select", "--config", str(path)])) == \
        SelectConfig(domain=["d"], pool=["p"], budget=1, out="o")


def test_print_config_round_trips(tmp_path, capsys):
    cfg = a_config()
    path = tmp_path / "run.toml"
    path.write_text(toml_of(dataclasses.asdict(cfg)))
    assert cli.main(["select", "--config", str(path), "--print-config"]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "printed.toml").write_text(printed)
    args = cli.build_parser().parse_args(["select", "--config", str(tmp_path / "printed.toml")])
    assert cli.select_config(args) == cfg
    assert cli.config_toml(cfg) == printed


def test_flags_override_the_config_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(toml_of(dataclasses.asdict(a_config())))
    args = cli.build_parser().parse_args(["select", "--config", str(path), "--seed", "0", "--budget", "5",
                                          "--scorer", "cosine", "--lora-targets", "o_proj"])
    cfg = cli.select_config(args)
    assert (cfg.seed, cfg.budget, cfg.scorer, cfg.lora_targets) == (0, 5, "cosine", ["o_proj"])  # 0 = the default, given
    assert cfg.projector == "kron" and cfg.domain == ["med.jsonl"]


def test_config_for_features_and_score(tmp_path):
    path = tmp_path / "f.toml"
    path.write_text('data = "pool.jsonl"\nout = "feats"\naccelerator = "cpu"\nproj_dim = 64\n')
    args = cli.build_parser().parse_args(["features", "--config", str(path)])
    assert cli.config_from_args(FeaturesConfig, args) == FeaturesConfig(data=["pool.jsonl"], out="feats",
                                                                        accelerator="cpu", proj_dim=64)
    path.write_text('features = "f"\nanchors = "a"\nbudget = 2\nout = "o"\n')
    args = cli.build_parser().parse_args(["score", "--config", str(path), "--scorer", "max"])
    assert cli.config_from_args(ScoreConfig, args) == ScoreConfig(features="f", anchors="a", budget=2, out="o",
                                                                  scorer="max")


def _error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("text,expected", [
    ("domain = ['d']\nbudgett = 3\n", "unknown key 'budgett'"),
    ("domain = ['d']\nbudget = '3'\n", "budget must be int"),
    ("domain = ['d']\nscorer = 'best'\n", "scorer 'best' is not one of"),
    ("domain = ['d'\n", "not valid TOML"),
])
def test_bad_config_file_is_one_line_naming_the_key(tmp_path, capsys, text, expected):
    path = tmp_path / "run.toml"
    path.write_text(text)
    line = _error(capsys, ["select", "--config", str(path), "--pool", "p", "--out", "o"])
    assert line.startswith("ntk-ray: error: --config ") and expected in line, line


def test_required_flags_may_come_from_the_file_but_must_come_from_somewhere(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text('domain = ["d.jsonl"]\npool = ["p.jsonl"]\n')
    line = _error(capsys, ["select", "--config", str(path), "--out", "o"])
    assert "required" in line and "--budget" in line and "--domain" not in line and "--out" not in line
    line = _error(capsys, ["select", "--domain", "d"])
    assert "--pool, --budget, --out" in line


def test_missing_config_file(tmp_path, capsys):
    line = _error(capsys, ["select", "--config", str(tmp_path / "nope.toml")])
    assert "nope.toml" in line


# ---- entry points --------------------------------------------------------------------------------

def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"ntk-ray {ntk_ray.__version__}"


def test_python_dash_m_ntk_ray_version():
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "ntk_ray", "--version"], capture_output=True, text=True, cwd=root,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"ntk-ray {ntk_ray.__version__}"
    bad = subprocess.run([sys.executable, "-m", "ntk_ray", "select", "--budget", "x"], capture_output=True, text=True,
                         cwd=root, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1, bad.stderr


def test_job_entrypoint_is_not_named_after_a_stdlib_module():
    root = Path(__file__).resolve().parents[1]
    assert not (root / "jobs" / "select.py").exists()
    stdlib = set(sys.stdlib_module_names)
    assert not [p.name for p in (root / "jobs").glob("*.py") if p.stem in stdlib]


# ---- finetune ------------------------------------------------------------------------------------

def test_finetune_column_errors_name_the_train_flag(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    line = _error(capsys, ["finetune", "--train", str(data), "--out", str(tmp_path / "adapter")])
    assert "--train" in line and "--data" not in line, line


def test_finetune_seed_reaches_the_lora_init_and_the_training(tmp_path, monkeypatch, capsys):
    import inspect

    import ntk_ray.core.training as training
    import ntk_ray.models as models

    assert "seed" in inspect.signature(models.attach_lora).parameters
    seen = {}

    class Model:
        def save_pretrained(self, out):
            Path(out).mkdir(parents=True, exist_ok=True)

    monkeypatch.setattr(cli, "_tokenized", lambda paths, args: ([[1, 2, 3]], [[0, 1, 1]], 0))
    monkeypatch.setattr(models, "load_model", lambda name, **kw: object())
    monkeypatch.setattr(models, "attach_lora", lambda model, **kw: seen.setdefault("lora", kw) and Model())
    monkeypatch.setattr(training, "train_lora",
                        lambda model, seqs, masks, tc, **kw: seen.setdefault("train", tc) and {"epoch_loss": [1.0], "steps": 1})
    assert cli.main(["finetune", "--train", "t.jsonl", "--out", str(tmp_path / "a"), "--seed", "7", "--lora-r", "4"]) == 0
    assert seen["lora"]["seed"] == 7 and seen["lora"]["r"] == 4
    assert seen["train"].seed == 7
