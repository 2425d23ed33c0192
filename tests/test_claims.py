"""scripts/check_claims.py: every number in README.md and benchmarks/README.md is found in the
results file its paragraph names (or labelled with the commit it was measured at), and the check
fails on a number no file backs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load():
    if "check_claims" in sys.modules:
        return sys.modules["check_claims"]
    spec = importlib.util.spec_from_file_location("check_claims", ROOT / "scripts" / "check_claims.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_claims"] = module
    spec.loader.exec_module(module)
    return module


def test_every_number_in_the_readmes_is_backed(capsys):
    rc = _load().main([])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert " 0 unmatched" in out
    assert "MATCHED   README.md:" in out and "benchmarks/results/" in out  # where each one appears


def _fake(tmp_path, readme: str, results: dict[str, str]):
    res = tmp_path / "benchmarks" / "results"
    res.mkdir(parents=True)
    for name, text in results.items():
        (res / name).write_text(text)
    (tmp_path / "README.md").write_text(readme)
    return [str(tmp_path / "README.md"), "--results", str(res)]


def test_an_unbacked_number_fails(tmp_path, capsys):
    argv = _fake(tmp_path, "# x\n\n## Speed\n\nIt runs at 3.61 samples/s and 42.5x faster ([r](benchmarks/results/a.md)).\n",
                 {"a.md": "# a\n\n- command: `bench`\n\n| row | samples/s |\n|---|---:|\n| sketch | 3.613 |\n"})
    rc = _load().main(argv)
    out, err = capsys.readouterr()
    assert rc == 1
    assert "MATCHED" in out and "a.md:7" in out  # 3.61 rounds from the file's 3.613, on line 7
    assert "UNMATCHED" in out and "42.5" in err and "README.md:5" in err


def test_a_number_without_a_named_file_fails_and_a_labelled_one_passes(tmp_path, capsys):
    text = ("# x\n\n## Speed\n\nIt runs at 3.61 samples/s.\n\n## Old\n\n"
            "Lift 9.6x (measured at c96823d with the kron projector).\n")
    argv = _fake(tmp_path, text, {"a.md": "| sketch | 3.61 |\n"})
    rc = _load().main(argv)
    out, err = capsys.readouterr()
    assert rc == 1 and "README.md:5: 3.61" in err  # the paragraph names no results file
    assert "LABELLED  " in out and "measured at c96823d" in out and "9.6" not in err


def test_allowed_patterns_and_code_are_not_claims(tmp_path, capsys):
    text = ("# x\n\n## Setup\n\nWith torch 2.13.0 on a 2-core CPU, r=16, d = 8192 (default: 8192), `--budget 50`.\n\n"
            "```\nntk-ray select --budget 9000\n```\n")
    rc = _load().main(_fake(tmp_path, text, {}))
    out, _ = capsys.readouterr()
    assert rc == 0 and out.strip().endswith("0 unmatched") and out.startswith("0 numbers")
