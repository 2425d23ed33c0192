"""Every command and every flag of ``ntk-ray`` run at least once with a valid value, and each
case asserts what the flag did (the manifest's config and counts, the output files, the
adapter, the printed JSON, behaviour), not just exit status 0.

The list of flags comes from the parser (``ntk_ray.cli.build_parser()``): a new flag without a
case fails ``test_every_flag_of_every_command_has_a_case``. Each case says which flags it
covers with ``@covers(command, *flags)``.

Cheap by design: the tiny random Llama of conftest (``tiny_model_dir``) and ``--executor local``
(about a second a run). The ``--ray-address`` cases join the session Ray (marked ``ray``); the
``demo`` case runs the bundled model once at a tiny size (marked ``ray``, ``demo``)."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch

from ntk_ray.cli import build_parser, main

COVERED: dict[tuple[str, str], list[str]] = {}
COMMANDS = {"select", "features", "score", "finetune", "evaluate", "demo"}


def covers(command: str, *flags: str):
    """Record that the decorated test exercises ``flags`` of ``command`` (and asserts their effect)."""
    def deco(fn):
        for flag in flags:
            COVERED.setdefault((command, flag), []).append(fn.__name__)
        return fn
    return deco


def parser_flags(parser: argparse.ArgumentParser) -> set[tuple[str, str]]:
    """(command, flag) of every option of every subcommand, and ("ntk-ray", flag) of the top level."""
    out = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out |= {(name, o) for a in sub._actions for o in a.option_strings if o not in ("-h", "--help")}
        else:
            out |= {("ntk-ray", o) for o in action.option_strings if o not in ("-h", "--help")}
    return out


def uncovered(parser) -> set[tuple[str, str]]:
    return parser_flags(parser) - set(COVERED)


# ------------------------------------------------------------------------------------------------
# helpers

def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def manifest(out) -> dict:
    return json.loads((out / "manifest.json").read_text())


def jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def features_of(directory) -> dict[str, np.ndarray]:
    """id -> float64 feature of every unrejected row of a feature directory (pyarrow + numpy only)."""
    out = {}
    for path in sorted(directory.rglob("*.parquet")):
        if any(p.startswith(("_", ".")) for p in path.relative_to(directory).parts):
            continue
        t = pq.read_table(path).to_pydict()
        rejects = t.get("reject", [None] * len(t["id"]))
        for i, f, r in zip(t["id"], t["feature"], rejects):
            if r is None and f is not None:
                out[i] = np.asarray(f, dtype=np.float64)
    return out


def adapter_config(adapter_dir) -> dict:
    return json.loads((adapter_dir / "adapter_config.json").read_text())


def adapter_weights(adapter_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def lora_params(r: int, targets) -> int:
    """LoRA parameters of the tiny Llama (hidden 32, 4 heads, 2 kv heads of 8, 2 layers)."""
    out_dim = {"q_proj": 32, "k_proj": 16, "v_proj": 16, "o_proj": 32}
    return 2 * sum(r * 32 + out_dim[t] * r for t in targets)


@pytest.fixture
def data(tiny_data, tmp_path):
    """tiny_data in three shapes: text/id, body/key (renamed columns), q/a (prompt/response)."""
    d = tiny_data
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    qa = tmp_path / "qa"
    qa.mkdir()
    for name in ("domain", "pool"):
        rows = read_rows(d / f"{name}.jsonl")
        jsonl(renamed / f"{name}.jsonl", [{"key": "k-" + r["id"], "body": r["text"]} for r in rows])
        jsonl(qa / f"{name}.jsonl", [{"id": r["id"], "q": "what is " + r["text"].split()[0],
                                      "a": r["text"]} for r in rows])
    return {"text": d, "renamed": renamed, "qa": qa}


def select_argv(d, out, model, *extra, budget=3):
    return ["select", "--domain", d / "domain.jsonl", "--pool", d / "pool.jsonl", "--budget", budget, "--out", out,
            "--model", model, "--executor", "local", "--max-length", 32, "--proj-dim", 64, *extra]


@pytest.fixture
def trained(data, tiny_model_dir, tmp_path, capsys):
    """One plain select run with kept features: its adapter and features feed other cases."""
    out = tmp_path / "trained"
    rc, _, err = run(capsys, *select_argv(data["text"], out, tiny_model_dir, "--keep-features",
                                          "--warmup-lr", "0.01", "--warmup-epochs", "2"))
    assert rc == 0, err
    return out


# ------------------------------------------------------------------------------------------------
# the table itself

def test_every_flag_of_every_command_has_a_case():
    parser = build_parser()
    commands = {c for c, _ in parser_flags(parser)} - {"ntk-ray"}
    assert commands == COMMANDS, commands
    assert not uncovered(parser), f"flags without a case in tests/test_cli_flags.py: {sorted(uncovered(parser))}"
    stale = set(COVERED) - parser_flags(parser)
    assert not stale, f"cases for flags the parser no longer has: {sorted(stale)}"


def test_a_new_flag_without_a_case_is_caught():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub.choices["select"].add_argument("--brand-new-flag")
    assert uncovered(parser) == {("select", "--brand-new-flag")}


@covers("ntk-ray", "--version")
def test_version(capsys):
    from ntk_ray.version import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"ntk-ray {__version__}"


# ------------------------------------------------------------------------------------------------
# select

@covers("select", "--domain", "--pool", "--budget", "--out", "--text-column", "--id-column", "--model",
        "--executor", "--max-length", "--seed", "--proj-dim", "--projector", "--batch-tokens", "--keep-features",
        "--accelerator")
def test_select_renamed_columns_and_model_flags(data, tiny_model_dir, tmp_path, capsys):
    d = data["renamed"]
    out = tmp_path / "out"
    argv = ["select", "--domain", d / "domain.jsonl", "--pool", d / "pool.jsonl", "--budget", 4, "--out", out,
            "--model", tiny_model_dir, "--executor", "local", "--max-length", 8, "--seed", 5, "--proj-dim", 48,
            "--projector", "dense", "--batch-tokens", 96, "--accelerator", "cpu"]
    # without the column flags the rows have no `text` column: refused before any work
    rc, _, err = run(capsys, *argv)
    assert rc == 2 and "text" in err
    rc, _, err = run(capsys, *argv, "--text-column", "body", "--id-column", "key", "--keep-features")
    assert rc == 0, err
    m = manifest(out)
    c = m["counts"]
    assert (c["domain_rows"], c["pool_rows"], c["selected"], c["ranked"]) == (6, 30, 4, 30)  # --domain, --pool, --budget
    assert sorted(p.name for p in out.glob("*.parquet")) == ["ranked.parquet", "rejects.parquet", "selected.parquet"]
    ranked = pl.read_parquet(out / "ranked.parquet")
    assert set(ranked["id"]) == {f"k-p{i}" for i in range(30)}  # --id-column key
    selected = pl.read_parquet(out / "selected.parquet")
    assert selected.height == 4 and "body" in selected.columns  # --text-column body
    assert m["model"]["path"] == str(tiny_model_dir) and m["model"]["num_params"] == 21728  # --model
    assert m["config"]["executor"] == "local" and "in-process executor (cpu)" in err  # --executor, --accelerator
    assert m["actors"]["device"] == "cpu" and m["config"]["accelerator"] == "cpu"
    pool_words = [len(r["body"].split()) for r in read_rows(d / "pool.jsonl")]
    assert c["pool_truncated"] == sum(n > 8 for n in pool_words) > 0  # --max-length 8 (a token per word)
    assert c["domain_truncated"] == 0
    assert m["projector"]["type"] == "dense" and m["projector"]["dim"] == 48 and m["projector"]["seed"] == 5
    assert m["config"]["batch_tokens"] == 96
    feats = features_of(out / "_work" / "features")  # --keep-features
    assert feats and all(v.shape == (48,) for v in feats.values())  # --proj-dim
    anchors = features_of(out / "_work" / "anchor_features")
    assert set(anchors) == {f"k-d{i}" for i in range(6)}


@covers("select", "--prompt-column", "--response-column", "--on-too-long", "--lora-r", "--lora-alpha",
        "--lora-targets", "--warmup-epochs", "--warmup-lr", "--warmup-batch-tokens", "--coarse-factor",
        "--coarse-k", "--scorer")
def test_select_prompt_response_lora_warmup_coarse_scorer(data, tiny_model_dir, tmp_path, capsys):
    d = data["qa"]
    out = tmp_path / "out"
    rc, _, err = run(capsys, *select_argv(d, out, tiny_model_dir, "--prompt-column", "q", "--response-column", "a",
                                          "--max-length", 12, "--on-too-long", "reject", "--lora-r", 2,
                                          "--lora-alpha", 4, "--lora-targets", "q_proj", "v_proj",
                                          "--warmup-epochs", 2, "--warmup-lr", 0.05, "--warmup-batch-tokens", 40,
                                          "--coarse-factor", 2, "--coarse-k", 2, "--scorer", "max", "--keep-features",
                                          budget=2))
    assert rc == 0, err
    m = manifest(out)
    # --on-too-long reject with --max-length 12: every pool row over 12 tokens is a reject, none truncated
    pool = read_rows(d / "pool.jsonl")
    rejects = pl.read_parquet(out / "rejects.parquet").filter(pl.col("role") == "pool")
    assert rejects.height == m["counts"]["rejected"] > 0 and m["counts"]["pool_truncated"] == 0
    assert all("--max-length 12" in r for r in rejects["reason"])
    assert m["counts"]["ranked"] + rejects.height == len(pool)
    # --prompt-column q --response-column a: prompt + response rows, both columns kept in selected.parquet
    assert {"q", "a"} <= set(pl.read_parquet(out / "selected.parquet").columns)
    # --lora-r / --lora-alpha / --lora-targets: the warm-up's adapter
    cfg = adapter_config(out / "_work" / "warmup" / "adapter")
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 4 and set(cfg["target_modules"]) == {"q_proj", "v_proj"}
    assert m["adapter"]["lora_parameters"] == m["projector"]["grad_dim"] == lora_params(2, ["q_proj", "v_proj"])
    # --warmup-epochs 2, --warmup-batch-tokens 40: two epochs of several steps each (one step at the default)
    warm = m["adapter"]["warmup"]
    assert len(warm["epoch_loss"]) == 2 and warm["steps"] > 2
    assert m["config"]["warmup_lr"] == 0.05 and m["config"]["warmup_batch_tokens"] == 40
    # --warmup-lr: the B factors moved off zero by an amount the learning rate sets
    b_norm = sum(float(v.norm()) for k, v in adapter_weights(out / "_work" / "warmup" / "adapter").items()
                 if "lora_B" in k)
    assert b_norm > 0
    # --coarse-factor 2, --coarse-k 2: M = 2 x budget ntk rows, every domain sample votes for 2 rows
    ranked = pl.read_parquet(out / "ranked.parquet")
    assert m["coarse"]["M"] == 4 and m["coarse"]["K"] == 2
    assert ranked.filter(pl.col("stage") == "ntk").height == 4
    assert ranked["coarse_votes"].sum() == 2 * m["counts"]["domain_usable"]
    # --scorer max: each ntk score is max over anchors of <psi(x), psi(a)>, recomputed from the kept features
    feats, anchors = features_of(out / "_work" / "features"), features_of(out / "_work" / "anchor_features")
    a = np.stack(list(anchors.values()))
    for row in ranked.filter(pl.col("stage") == "ntk").iter_rows(named=True):
        want = float((a @ feats[row["id"]]).max())
        assert math.isclose(row["score"], want, rel_tol=1e-6, abs_tol=1e-12), (row, want)


@covers("select", "--warmup", "--adapter", "--selector")
def test_select_fresh_warmup_given_adapter_and_a_baseline(data, tiny_model_dir, trained, tmp_path, capsys):
    # --warmup fresh: a new adapter with B = 0, no training
    fresh = tmp_path / "fresh"
    rc, _, err = run(capsys, *select_argv(data["text"], fresh, tiny_model_dir, "--warmup", "fresh"))
    assert rc == 0, err
    m = manifest(fresh)
    assert m["config"]["warmup"] == "fresh" and not (m["adapter"].get("warmup") or {}).get("epoch_loss")
    weights = adapter_weights(fresh / "_work" / "warmup" / "adapter")
    assert all(float(v.abs().max()) == 0.0 for k, v in weights.items() if "lora_B" in k)
    # --adapter: the trained run's adapter, used as is: the same anchor features as that run
    adapter = trained / "_work" / "warmup" / "adapter"
    given = tmp_path / "given"
    rc, _, err = run(capsys, *select_argv(data["text"], given, tiny_model_dir, "--adapter", adapter, "--keep-features"))
    assert rc == 0, err
    m = manifest(given)
    assert m["config"]["adapter"] == str(adapter) and str(adapter) in json.dumps(m["adapter"])
    ours, theirs = features_of(given / "_work" / "anchor_features"), features_of(trained / "_work" / "anchor_features")
    assert ours.keys() == theirs.keys()
    for k in ours:
        np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-3, atol=1e-3 * np.abs(theirs[k]).max())
    # --selector random: the baseline ranks the whole pool, stage = its name
    rnd = tmp_path / "random"
    rc, _, err = run(capsys, *select_argv(data["text"], rnd, tiny_model_dir, "--selector", "random"))
    assert rc == 0, err
    ranked = pl.read_parquet(rnd / "ranked.parquet")
    assert set(ranked["stage"]) == {"random"} and manifest(rnd)["selector"] == "random" and ranked.height == 30


@covers("select", "--objective")
def test_select_objective_loss(data, tiny_model_dir, tmp_path, capsys):
    """--objective loss: recorded, part of the run's identity (another run than the default's);
    the default is left out of the identity, so runs from before the flag keep their fingerprint
    (the features themselves: tests/test_selectors_recompute.py)."""
    from ntk_ray.config import SelectConfig

    out = tmp_path / "loss"
    rc, _, err = run(capsys, *select_argv(data["text"], out, tiny_model_dir, "--objective", "loss"))
    assert rc == 0, err
    assert manifest(out)["config"]["objective"] == "loss"
    assert "objective" not in SelectConfig().identity()
    assert SelectConfig(objective="loss").identity()["objective"] == "loss"
    assert SelectConfig(objective="loss").fingerprint() != SelectConfig().fingerprint()


@covers("select", "--coarse-by")
def test_select_coarse_by_bm25_with_bm25_fusion(data, tiny_model_dir, tmp_path, capsys):
    """--coarse-by bm25 --fusion rrf-bm25 from the command line: recorded, no embed stage, and a
    new identity only when set (the stages themselves: tests/test_improvements.py)."""
    from ntk_ray.config import SelectConfig

    out = tmp_path / "bm25"
    rc, _, err = run(capsys, *select_argv(data["text"], out, tiny_model_dir, "--coarse-by", "bm25", "--fusion",
                                          "rrf-bm25", "--coarse-factor", "2"))
    assert rc == 0, err
    m = manifest(out)
    assert m["config"]["coarse_by"] == "bm25" and m["coarse"]["by"] == "bm25" and "embed" not in m["stage_seconds"]
    assert "by BM25 against the domain rows" in err and "fused with the BM25 ranking" in err
    assert "coarse_by" not in SelectConfig().identity()
    assert SelectConfig(coarse_by="bm25").fingerprint() != SelectConfig().fingerprint()
    rc, _, err = run(capsys, *select_argv(data["text"], tmp_path / "no", tiny_model_dir, "--coarse-by", "bm25",
                                          "--coarse-k", "2"))
    assert rc == 2 and "--coarse-by bm25 computes no embeddings: --coarse-k" in err


@covers("select", "--budget-tokens")
def test_select_budget_tokens_caps_the_selection_at_t_tokens(data, tiny_model_dir, tmp_path, capsys):
    """--budget-tokens T: the longest rank prefix of at most N rows whose n_tokens total at most
    T; n_tokens is each ranked row's token count as the read stage counted it; the same ranking
    as without the cap; the manifest counts the selected tokens; the identity changes only when
    set."""
    from ntk_ray.config import SelectConfig

    plain = tmp_path / "plain"
    rc, _, err = run(capsys, *select_argv(data["text"], plain, tiny_model_dir, budget=6))
    assert rc == 0, err
    ranked = pl.read_parquet(plain / "ranked.parquet").sort("rank")
    shards = sorted((plain / "_work" / "tokens" / "pool").glob("*.parquet"))
    counted = pl.concat([pl.read_parquet(f, columns=["source", "row", "n_tokens"]) for f in shards])
    joined = ranked.join(counted, on=["source", "row"], how="left", suffix="_read")
    assert ranked["n_tokens"].null_count() == 0 and (joined["n_tokens"] == joined["n_tokens_read"]).all()
    assert manifest(plain)["counts"]["selected_tokens"] == ranked.filter(pl.col("selected"))["n_tokens"].sum()

    n = ranked["n_tokens"].to_list()
    t = sum(n[:3]) + n[3] - 1  # three rows fit, the fourth would pass T
    capped = tmp_path / "capped"
    rc, _, err = run(capsys, *select_argv(data["text"], capped, tiny_model_dir, "--budget-tokens", t, budget=6))
    assert rc == 0, err
    r2 = pl.read_parquet(capped / "ranked.parquet").sort("rank")
    assert r2["id"].to_list() == ranked["id"].to_list(), "the cap changes the cut, not the ranking"
    assert r2.filter(pl.col("selected"))["rank"].to_list() == [1, 2, 3]
    assert pl.read_parquet(capped / "selected.parquet")["id"].to_list() == ranked["id"].to_list()[:3]
    m = manifest(capped)
    assert m["config"]["budget_tokens"] == t and m["counts"]["selected"] == 3
    assert m["counts"]["selected_tokens"] == sum(n[:3]) <= t
    assert "the token budget stops the selection at 3 rows" in err
    assert "selected | 3 | budget 6 rows" in (capped / "report.md").read_text()
    assert "budget_tokens" not in SelectConfig().identity()
    assert SelectConfig(budget_tokens=100).fingerprint() != SelectConfig().fingerprint()


@covers("select", "--allocation", "--checkpoints", "--fusion", "--fusion-k", "--center")
def test_select_allocation_checkpoints_and_fusion(data, tiny_model_dir, tmp_path, capsys):
    """The issue-16 options (reference tests in tests/test_improvements.py)."""
    from ntk_ray.core.scoring import stable_keys
    from ntk_ray.core.selectors import kernel_mean_matching_order

    # --allocation kernel-mean-matching --checkpoints 2: features of length 2 x 64, the picks the
    # greedy makes on the kept (combined) features
    out = tmp_path / "kmm"
    rc, _, err = run(capsys, *select_argv(data["text"], out, tiny_model_dir, "--allocation", "kernel-mean-matching",
                                          "--checkpoints", "2", "--warmup-batch-tokens", "24", "--keep-features"))
    assert rc == 0, err
    m = manifest(out)
    assert m["config"]["allocation"] == "kernel-mean-matching" and m["config"]["checkpoints"] == 2
    assert len(m["adapter"]["warmup"]["checkpoints"]["steps"]) == 2
    feats, anchors = features_of(out / "_work" / "features"), features_of(out / "_work" / "anchor_features")
    assert {len(f) for f in feats.values()} == {128} and {len(f) for f in anchors.values()} == {128}
    ids = sorted(feats, key=lambda i: int(stable_keys([i])[0]))
    x = np.array([feats[i] / np.linalg.norm(feats[i]) for i in ids])
    a = np.array([f / np.linalg.norm(f) for f in anchors.values()])
    want = kernel_mean_matching_order(x, a.mean(axis=0), stable_keys(ids), 3)
    id_of = dict(zip(stable_keys(ids).tolist(), ids))
    ranked = pl.read_parquet(out / "ranked.parquet")
    assert ranked.filter(pl.col("selected"))["id"].to_list() == [id_of[k] for k in want]
    # --fusion rrf --fusion-k 3: the candidates ordered by 1/(3 + NTK rank) + 1/(3 + embedding rank);
    # --center candidates: scores are mean cosines of features minus the candidates' mean feature
    out = tmp_path / "rrf"
    rc, _, err = run(capsys, *select_argv(data["text"], out, tiny_model_dir, "--fusion", "rrf", "--fusion-k", "3",
                                          "--center", "candidates", "--keep-features"))
    assert rc == 0, err
    assert manifest(out)["config"]["fusion"] == "rrf" and manifest(out)["config"]["fusion_k"] == 3
    ntk = pl.read_parquet(out / "ranked.parquet").filter(pl.col("stage") == "ntk")
    feats, anchors = features_of(out / "_work" / "features"), features_of(out / "_work" / "anchor_features")
    m = np.mean(list(feats.values()), axis=0)
    a = np.array([(f - m) / np.linalg.norm(f - m) for f in anchors.values()])
    for row in ntk.iter_rows(named=True):
        want = float((a @ ((feats[row["id"]] - m) / np.linalg.norm(feats[row["id"]] - m))).mean())
        assert math.isclose(row["score"], want, rel_tol=1e-5, abs_tol=1e-7), (row, want)
    keys = stable_keys(ntk["id"].to_list())
    rows = list(zip(ntk["score"], ntk["coarse_votes"], ntk["coarse_sim"], keys))
    r1 = {r[3]: i + 1 for i, r in enumerate(sorted(rows, key=lambda r: (-r[0], r[3])))}
    r2 = {r[3]: i + 1 for i, r in enumerate(sorted(rows, key=lambda r: (-r[1], -r[2], r[3])))}
    fused = sorted(keys, key=lambda k: (-(1 / (3 + r1[k]) + 1 / (3 + r2[k])), r1[k], k))
    assert list(keys) == fused


def _toml(values: dict) -> str:
    def v(x):
        return json.dumps(x) if not isinstance(x, list) else "[" + ", ".join(json.dumps(str(i)) for i in x) + "]"
    return "".join(f"{k} = {v(x)}\n" for k, x in values.items())


@covers("select", "--config", "--print-config", "--overwrite", "--work-dir")
def test_select_config_file_print_config_overwrite_and_work_dir(data, tiny_model_dir, tmp_path, capsys):
    d = data["text"]
    out = tmp_path / "out"
    toml = tmp_path / "run.toml"
    toml.write_text(_toml({"domain": [d / "domain.jsonl"], "pool": [d / "pool.jsonl"], "budget": 4, "out": str(out),
                           "model": str(tiny_model_dir), "executor": "local", "max_length": 32, "proj_dim": 32}))
    # --print-config: the resolved settings, nothing run
    rc, printed, _ = run(capsys, "select", "--config", toml, "--budget", 5, "--print-config")
    assert rc == 0 and "budget = 5" in printed and "proj_dim = 32" in printed and not out.exists()
    # --config: the file's settings reach the run
    rc, _, err = run(capsys, "select", "--config", toml)
    assert rc == 0, err
    assert manifest(out)["config"]["budget"] == 4 and manifest(out)["projector"]["dim"] == 32
    # a different config into the same --out is refused; --overwrite replaces the run
    rc, _, err = run(capsys, "select", "--config", toml, "--budget", 2)
    assert rc == 2 and "different config" in err
    rc, _, err = run(capsys, "select", "--config", toml, "--budget", 2, "--overwrite")
    assert rc == 0, err
    assert manifest(out)["counts"]["selected"] == 2
    # --work-dir with a URI --out: the stages run in the working directory, the results land at the URI
    uri_out, work = tmp_path / "uri-out", tmp_path / "scratch"
    rc, _, err = run(capsys, "select", "--config", toml, "--out", f"file://{uri_out}", "--work-dir", work)
    assert rc == 0, err
    assert (uri_out / "ranked.parquet").exists() and (uri_out / "manifest.json").exists()
    assert (work / "_work").is_dir() and not (uri_out / "_work").exists()
    assert manifest(uri_out)["config"]["work_dir"] == str(work)


@pytest.mark.ray
@covers("select", "--ray-address", "--actors", "--wait-for-resources")
def test_select_joins_the_session_ray(ray_session, data, tiny_model_dir, tmp_path, capsys):
    address = ray_session.get_runtime_context().gcs_address
    out = tmp_path / "out"
    argv = select_argv(data["text"], out, tiny_model_dir, "--ray-address", address, "--actors", 1,
                       "--wait-for-resources", 120, "--accelerator", "cpu")
    argv[argv.index("--executor") + 1] = "ray"
    rc, _, err = run(capsys, *argv)
    assert rc == 0, err
    m = manifest(out)
    assert m["config"]["ray_address"] == address and m["config"]["wait_for_resources"] == 120.0
    assert m["actors"]["size"] == 1 and m["actors"]["num_gpus"] == 0  # --actors 1, on the CPUs
    assert "executor: 1 x (CPU)" in err
    assert ray_session.is_initialized() and ray_session.get_runtime_context().gcs_address == address


@pytest.mark.ray
@covers("select", "--min-actors", "--max-actors", "--read-unit-mb")
@covers("features", "--min-actors", "--max-actors")
def test_pools_that_may_grow_and_read_units_on_the_session_ray(ray_session, data, tiny_model_dir, tmp_path, capsys):
    """--min-actors/--max-actors: a pool of 1 that may grow to 2 (recorded as size/max_size);
    --read-unit-mb: recorded, and ranks as the default does (units are cut at 2,048-row chunks, so a
    30-row file stays one unit here; tests/test_read_ranges.py cuts files with a smaller chunk)."""
    address = ray_session.get_runtime_context().gcs_address
    out, whole = tmp_path / "out", tmp_path / "whole"
    argv = select_argv(data["text"], out, tiny_model_dir, "--ray-address", address, "--min-actors", 1,
                       "--max-actors", 2, "--read-unit-mb", 0.0005, "--accelerator", "cpu", "--selector", "bm25")
    argv[argv.index("--executor") + 1] = "ray"
    rc, _, err = run(capsys, *argv)
    assert rc == 0, err
    m = manifest(out)
    assert (m["actors"]["size"], m["actors"]["max_size"]) == (1, 2) and m["config"]["read_unit_mb"] == 0.0005
    rc, _, err = run(capsys, *select_argv(data["text"], whole, tiny_model_dir, "--selector", "bm25"))
    assert rc == 0, err
    assert pl.read_parquet(out / "ranked.parquet")["id"].to_list() == pl.read_parquet(whole / "ranked.parquet")["id"].to_list()
    feats = tmp_path / "feats"
    rc, _, err = run(capsys, "features", "--data", data["text"] / "pool.jsonl", "--out", feats, "--model",
                     tiny_model_dir, "--proj-dim", 32, "--ray-address", address, "--min-actors", 1, "--max-actors", 2)
    assert rc == 0, err
    summary = json.loads((feats / "_manifest.json").read_text())
    assert (summary["actors"]["size"], summary["actors"]["max_size"]) == (1, 2) and len(features_of(feats)) == 30


@covers("select", "--save-hf")
def test_select_save_hf(data, tiny_model_dir, tmp_path, capsys):
    """--save-hf DIR: the rows of selected.parquet as a datasets save_to_disk directory (read here
    with pyarrow; tests/test_hf.py loads it with datasets.load_from_disk)."""
    import pyarrow as pa

    out, hf_dir = tmp_path / "out", tmp_path / "hf"
    rc, _, err = run(capsys, *select_argv(data["text"], out, tiny_model_dir, "--selector", "random", "--save-hf", hf_dir))
    assert rc == 0, err
    files = [d["filename"] for d in json.loads((hf_dir / "state.json").read_text())["_data_files"]]
    saved = pa.concat_tables(pa.ipc.open_stream(pa.OSFile(str(hf_dir / f))).read_all() for f in files)
    assert saved.to_pylist() == pq.read_table(out / "selected.parquet").to_pylist() and saved.num_rows == 3


# ------------------------------------------------------------------------------------------------
# features and score

@covers("features", "--data", "--out", "--adapter", "--model", "--executor", "--seed", "--projector", "--proj-dim",
        "--max-length")
def test_features_with_the_warmup_adapter_reproduce_selects_features(data, tiny_model_dir, trained, tmp_path, capsys):
    out = tmp_path / "feats"
    rc, printed, err = run(capsys, "features", "--data", data["text"] / "domain.jsonl", "--out", out,
                           "--adapter", trained / "_work" / "warmup" / "adapter", "--model", tiny_model_dir,
                           "--executor", "local", "--seed", 0, "--projector", "sketch", "--proj-dim", 64,
                           "--max-length", 32)
    assert rc == 0, err
    assert json.loads(printed.splitlines()[-1])["out"] == str(out)
    ours, theirs = features_of(out), features_of(trained / "_work" / "anchor_features")
    assert ours.keys() == theirs.keys() == {f"d{i}" for i in range(6)}
    for k in ours:
        np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-3, atol=1e-3 * np.abs(theirs[k]).max())
    # another seed: another projection
    other = tmp_path / "feats-seed1"
    rc, _, err = run(capsys, "features", "--data", data["text"] / "domain.jsonl", "--out", other,
                     "--adapter", trained / "_work" / "warmup" / "adapter", "--model", tiny_model_dir,
                     "--executor", "local", "--seed", 1, "--proj-dim", 64, "--max-length", 32)
    assert rc == 0, err
    assert not np.allclose(features_of(other)["d0"], ours["d0"])


@covers("features", "--text-column", "--id-column", "--prompt-column", "--response-column", "--on-too-long",
        "--lora-r", "--lora-alpha", "--lora-targets", "--batch-tokens", "--accelerator", "--config", "--print-config",
        "--overwrite")
def test_features_columns_fresh_lora_and_config(data, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "feats"
    base = ["features", "--model", tiny_model_dir, "--executor", "local", "--proj-dim", 32]
    rc, _, err = run(capsys, *base, "--data", data["renamed"] / "pool.jsonl", "--out", out, "--text-column", "body",
                     "--id-column", "key", "--lora-r", 2, "--lora-alpha", 4, "--lora-targets", "q_proj", "v_proj",
                     "--batch-tokens", 64, "--accelerator", "cpu", "--max-length", 8, "--on-too-long", "reject")
    assert rc == 0, err
    kept = features_of(out)
    too_long = pl.read_parquet(out / "_rejects.parquet")
    words = {r["key"]: len(r["body"].split()) for r in read_rows(data["renamed"] / "pool.jsonl")}
    assert set(kept) == {k for k, n in words.items() if n <= 8}  # --id-column key; --on-too-long reject, --max-length 8
    assert set(too_long["id"]) == {k for k, n in words.items() if n > 8} and too_long.height > 0
    assert all("--max-length 8" in r for r in too_long["reason"])
    # a fresh adapter of rank 2 on q/v: the exact gradient dimension is that adapter's parameter count
    summary = json.loads((out / "_manifest.json").read_text()) if (out / "_manifest.json").exists() else None
    text = json.dumps(summary) if summary else ""
    assert str(lora_params(2, ["q_proj", "v_proj"])) in text, text[:2000]
    assert '"batch_tokens": 64' in text and '"accelerator": "cpu"' in text
    # --prompt-column / --response-column
    qa = tmp_path / "qa-feats"
    rc, _, err = run(capsys, *base, "--data", data["qa"] / "domain.jsonl", "--out", qa, "--prompt-column", "q",
                     "--response-column", "a")
    assert rc == 0, err
    assert set(features_of(qa)) == {f"d{i}" for i in range(6)}
    # --config / --print-config / --overwrite
    toml = tmp_path / "f.toml"
    toml.write_text(_toml({"data": [data["text"] / "domain.jsonl"], "out": str(tmp_path / "cfg"), "proj_dim": 16,
                           "model": str(tiny_model_dir), "executor": "local"}))
    rc, printed, _ = run(capsys, "features", "--config", toml, "--print-config")
    assert rc == 0 and "proj_dim = 16" in printed and not (tmp_path / "cfg").exists()
    rc, _, err = run(capsys, "features", "--config", toml)
    assert rc == 0, err
    assert all(v.shape == (16,) for v in features_of(tmp_path / "cfg").values())
    rc, _, err = run(capsys, "features", "--config", toml, "--proj-dim", 24)
    assert rc == 2 and "different config" in err
    rc, _, err = run(capsys, "features", "--config", toml, "--proj-dim", 24, "--overwrite")
    assert rc == 0, err
    assert all(v.shape == (24,) for v in features_of(tmp_path / "cfg").values())


@covers("score", "--features", "--anchors", "--budget", "--out", "--scorer", "--executor", "--config", "--print-config",
        "--overwrite", "--work-dir")
def test_score_mean_against_numpy_config_overwrite_and_work_dir(trained, tmp_path, capsys):
    feats, anchors = trained / "_work" / "features", trained / "_work" / "anchor_features"
    out = tmp_path / "scored"
    rc, printed, err = run(capsys, "score", "--features", feats, "--anchors", anchors, "--budget", 2, "--out", out,
                           "--scorer", "mean", "--executor", "local")
    assert rc == 0, err
    ranked = pl.read_parquet(out / "ranked.parquet")
    x, a = features_of(feats), features_of(anchors)
    mean_anchor = np.stack(list(a.values())).mean(axis=0)
    want = {k: float(v @ mean_anchor) for k, v in x.items()}
    assert set(ranked["id"]) == set(want)
    for i, s in zip(ranked["id"], ranked["score"]):
        assert math.isclose(s, want[i], rel_tol=1e-6, abs_tol=1e-12)
    assert set(ranked.filter(pl.col("selected"))["id"]) == set(sorted(want, key=want.get)[-2:])  # --budget 2
    assert manifest(out)["config"]["scorer"] == "mean" and "in-process executor" in err  # --executor local
    toml = tmp_path / "s.toml"
    toml.write_text(_toml({"features": str(feats), "anchors": str(anchors), "budget": 3, "out": str(tmp_path / "c"),
                           "executor": "local"}))
    rc, printed, _ = run(capsys, "score", "--config", toml, "--print-config")
    assert rc == 0 and "budget = 3" in printed and not (tmp_path / "c").exists()
    rc, _, err = run(capsys, "score", "--config", toml)
    assert rc == 0, err
    assert manifest(tmp_path / "c")["counts"]["selected"] == 3
    rc, _, err = run(capsys, "score", "--config", toml, "--budget", 1)
    assert rc == 2 and "different config" in err
    rc, _, err = run(capsys, "score", "--config", toml, "--budget", 1, "--overwrite")
    assert rc == 0 and manifest(tmp_path / "c")["counts"]["selected"] == 1
    uri_out, work = tmp_path / "uri", tmp_path / "scratch"
    rc, _, err = run(capsys, "score", "--config", toml, "--out", f"file://{uri_out}", "--work-dir", work)
    assert rc == 0, err
    assert (uri_out / "ranked.parquet").exists() and (work / "ranked.parquet").exists()


@covers("score", "--allocation", "--center")
def test_score_allocation_and_center_against_the_reference_greedy(trained, tmp_path, capsys):
    """score --allocation kernel-mean-matching --center candidates: the picks of the literal
    greedy on the centred, normalised features (``core.selectors.kernel_mean_matching_order``);
    with round-robin it is one usage line."""
    from ntk_ray.core.scoring import stable_keys
    from ntk_ray.core.selectors import kernel_mean_matching_order

    feats, anchors = trained / "_work" / "features", trained / "_work" / "anchor_features"
    out = tmp_path / "kmm"
    rc, _, err = run(capsys, "score", "--features", feats, "--anchors", anchors, "--budget", 3, "--out", out,
                     "--allocation", "kernel-mean-matching", "--center", "candidates", "--executor", "local")
    assert rc == 0, err
    assert manifest(out)["config"]["allocation"] == "kernel-mean-matching" and manifest(out)["config"]["center"] == \
        "candidates"
    x, a = features_of(feats), features_of(anchors)
    ids = sorted(x, key=lambda i: int(stable_keys([i])[0]))
    m = np.mean([x[i] for i in ids], axis=0)
    u = np.array([(x[i] - m) / np.linalg.norm(x[i] - m) for i in ids])
    ua = np.array([(v - m) / np.linalg.norm(v - m) for v in a.values()])
    want = kernel_mean_matching_order(u, ua.mean(axis=0), stable_keys(ids), 3)
    id_of = dict(zip(stable_keys(ids).tolist(), ids))
    got = pl.read_parquet(out / "ranked.parquet").filter(pl.col("selected"))["id"].to_list()
    assert got == [id_of[k] for k in want]
    rc, _, err = run(capsys, "score", "--features", feats, "--anchors", anchors, "--budget", 3, "--out",
                     tmp_path / "rr", "--allocation", "facility-location", "--scorer", "round-robin")
    assert rc == 2 and "--allocation facility-location picks by itself" in err and not (tmp_path / "rr").exists()


@pytest.mark.ray
@covers("features", "--ray-address", "--actors")
@covers("score", "--ray-address")
def test_features_and_score_join_the_session_ray(ray_session, data, tiny_model_dir, tmp_path, capsys):
    address = ray_session.get_runtime_context().gcs_address
    feats = tmp_path / "feats"
    rc, _, err = run(capsys, "features", "--data", data["text"] / "pool.jsonl", "--out", feats, "--model",
                     tiny_model_dir, "--proj-dim", 32, "--ray-address", address, "--actors", 1)
    assert rc == 0, err
    assert "executor: 1 x (CPU)" in err and len(features_of(feats)) == 30
    anchors = tmp_path / "anchors"
    assert main(["features", "--data", str(data["text"] / "domain.jsonl"), "--out", str(anchors), "--model",
                 str(tiny_model_dir), "--proj-dim", "32", "--executor", "local"]) == 0
    out = tmp_path / "scored"
    rc, _, err = run(capsys, "score", "--features", feats, "--anchors", anchors, "--budget", 2, "--out", out,
                     "--ray-address", address)
    assert rc == 0, err
    assert "ray: 2 CPUs" in err and manifest(out)["counts"]["selected"] == 2  # ran on the session Ray
    assert ray_session.get_runtime_context().gcs_address == address


# ------------------------------------------------------------------------------------------------
# finetune and evaluate

@covers("finetune", "--train", "--out", "--text-column", "--id-column", "--model", "--max-length", "--on-too-long",
        "--seed", "--epochs", "--lr", "--lora-r", "--lora-alpha", "--lora-targets")
def test_finetune_flags(data, tiny_model_dir, tmp_path, capsys):
    rows = read_rows(data["renamed"] / "pool.jsonl")
    rows[0]["key"] = True  # an id that is not a string or number: rejected under --id-column key
    train = jsonl(tmp_path / "train.jsonl", rows)

    def finetune(out, *extra):
        rc, printed, err = run(capsys, "finetune", "--train", train, "--out", out, "--model", tiny_model_dir,
                               "--text-column", "body", "--id-column", "key", "--lora-r", 2, "--lora-alpha", 4,
                               "--lora-targets", "q_proj", "v_proj", *extra)
        assert rc == 0, err
        return json.loads(printed.splitlines()[-1])

    a = finetune(tmp_path / "a", "--epochs", 2, "--lr", 0.01, "--seed", 1)
    assert a["rows"] == 29 and a["rejected"] == 1  # --train, --text-column body, --id-column key
    cfg = adapter_config(tmp_path / "a")
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 4 and set(cfg["target_modules"]) == {"q_proj", "v_proj"}
    assert set(adapter_weights(tmp_path / "a")) and all(
        ("q_proj" in k or "v_proj" in k) for k in adapter_weights(tmp_path / "a"))
    history = json.loads((tmp_path / "a" / "ntk_ray_train.json").read_text())
    assert len(history["epoch_loss"]) == 2  # --epochs 2
    # --max-length 8 --on-too-long reject: every row over 8 tokens is rejected
    short = finetune(tmp_path / "short", "--epochs", 1, "--max-length", 8, "--on-too-long", "reject")
    lengths = [len(r["body"].split()) for r in rows[1:]]  # a token per word
    assert short["rows"] == sum(n <= 8 for n in lengths) and short["rejected"] == 1 + sum(n > 8 for n in lengths)
    # --seed: the same seed gives the same adapter, another seed another one
    same = finetune(tmp_path / "a2", "--epochs", 2, "--lr", 0.01, "--seed", 1)
    other = finetune(tmp_path / "b", "--epochs", 2, "--lr", 0.01, "--seed", 2)
    wa, wa2, wb = (adapter_weights(tmp_path / n) for n in ("a", "a2", "b"))
    assert same["final_loss"] == a["final_loss"] and all(torch.equal(wa[k], wa2[k]) for k in wa)
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)
    # --lr: a larger learning rate moves the B factors further (same seed, same data)
    slow = finetune(tmp_path / "slow", "--epochs", 2, "--lr", 1e-4, "--seed", 1)
    assert slow["final_loss"] != a["final_loss"]
    b_norm = {n: sum(float(v.norm()) for k, v in adapter_weights(tmp_path / n).items() if "lora_B" in k)
              for n in ("a", "slow")}
    assert b_norm["a"] > 10 * b_norm["slow"] > 0


@covers("finetune", "--prompt-column", "--response-column")
@covers("evaluate", "--data", "--adapter", "--model", "--prompt-column", "--response-column", "--choices-column",
        "--answer-column", "--max-length", "--on-too-long")
def test_finetune_and_evaluate_prompt_response_and_multiple_choice(data, tiny_model_dir, tmp_path, capsys):
    rc, printed, err = run(capsys, "finetune", "--train", data["qa"] / "domain.jsonl", "--out", tmp_path / "ad",
                           "--model", tiny_model_dir, "--prompt-column", "q", "--response-column", "a",
                           "--epochs", 3, "--lr", 0.05)
    assert rc == 0, err
    assert json.loads(printed.splitlines()[-1])["rows"] == 6
    words = [r["a"] for r in read_rows(data["qa"] / "domain.jsonl")]
    mc = jsonl(tmp_path / "mc.jsonl", [{"q": f"what is w{i}", "opts": [words[i], words[(i + 1) % 6], "food word"],
                                       "gold": 0, "a": words[i]} for i in range(6)])
    base = ["evaluate", "--data", mc, "--model", tiny_model_dir, "--prompt-column", "q", "--response-column", "a"]
    rc, printed, err = run(capsys, *base)
    assert rc == 0, err
    plain = json.loads(printed)
    assert plain["rows"] == 6 and plain["adapter"] is None and "accuracy" not in plain  # no `choices`/`answer` columns
    rc, printed, err = run(capsys, *base, "--choices-column", "opts", "--answer-column", "gold")
    assert rc == 0, err
    choice = json.loads(printed)
    assert choice["accuracy_rows"] == 6 and choice["choices_per_row"] == 3 and 0 <= choice["accuracy"] <= 1
    rc, printed, err = run(capsys, *base, "--adapter", tmp_path / "ad")
    assert rc == 0, err
    adapted = json.loads(printed)
    assert adapted["adapter"] == str(tmp_path / "ad") and adapted["loss"] < plain["loss"]  # trained on these responses
    # --max-length 8 --on-too-long reject: rows over 8 tokens leave the loss
    rc, printed, err = run(capsys, *base, "--max-length", 8, "--on-too-long", "reject")
    assert rc == 0, err
    short = json.loads(printed)
    assert short["rejected"] > 0 and short["rows"] + short["rejected"] == 6 and short["tokens"] < plain["tokens"]


@covers("evaluate", "--text-column", "--id-column", "--seed")
def test_evaluate_text_rows_id_column_and_seed(data, tiny_model_dir, tmp_path, capsys):
    base = ["evaluate", "--data", data["renamed"] / "pool.jsonl", "--model", tiny_model_dir]
    rc, _, err = run(capsys, *base)
    assert rc == 2 and "text" in err  # the rows have `body`, not `text`
    rc, printed, err = run(capsys, *base, "--text-column", "body")
    assert rc == 0, err
    first = json.loads(printed)
    assert first["rows"] == 30 and first["tokens"] > 0
    # --seed and --id-column are accepted like the other commands' and change nothing here: the
    # evaluation is deterministic, and evaluate does not use ids (documented in its --help)
    rc, printed, err = run(capsys, *base, "--text-column", "body", "--seed", 7, "--id-column", "key")
    assert rc == 0, err
    assert json.loads(printed) == first
    rc, _, err = run(capsys, *base, "--text-column", "body", "--seed", -1)
    assert rc == 2 and "--seed" in err  # but range-checked


# ------------------------------------------------------------------------------------------------
# chat rows (more in tests/test_chat.py)

@covers("select", "--messages-column", "--assistant-turns")
@covers("features", "--messages-column", "--assistant-turns")
@covers("finetune", "--messages-column", "--assistant-turns")
@covers("evaluate", "--messages-column", "--assistant-turns")
def test_chat_column_and_assistant_turns(tiny_data, tiny_chat_model_dir, tmp_path, capsys):
    """Conversations in a `dialog` column (named, since it is not messages/conversations): one or
    two user/assistant turns built from the tiny rows; `--assistant-turns last` trains and scores
    only the last reply."""
    def chats(name):
        out = []
        for i, r in enumerate(read_rows(tiny_data / f"{name}.jsonl")):
            words = r["text"].split()
            conv = [{"role": "user", "content": "what is"}, {"role": "assistant", "content": " ".join(words[:2])}]
            if i % 2:  # two turns
                conv += [{"role": "user", "content": "the word"}, {"role": "assistant", "content": " ".join(words[2:] or ["a"])}]
            out.append({"id": r["id"], "dialog": conv})
        return jsonl(tmp_path / f"{name}.jsonl", out)

    domain, pool = chats("domain"), chats("pool")
    model = tiny_chat_model_dir
    rc, _, err = run(capsys, "select", "--domain", domain, "--pool", pool, "--budget", 3, "--out", tmp_path / "s",
                     "--model", model, "--executor", "local", "--proj-dim", 32, "--warmup-epochs", 0.5)
    assert rc == 2 and "--messages-column" in err  # `dialog` is not found without the flag
    rc, _, err = run(capsys, "select", "--domain", domain, "--pool", pool, "--budget", 3, "--out", tmp_path / "s",
                     "--model", model, "--executor", "local", "--proj-dim", 32, "--warmup-epochs", 0.5,
                     "--messages-column", "dialog", "--assistant-turns", "last")
    assert rc == 0, err
    m = manifest(tmp_path / "s")
    assert m["counts"]["ranked"] == 30 and m["config"]["messages_column"] == "dialog"
    assert m["config"]["assistant_turns"] == "last"
    rows = {r["id"]: r["dialog"] for r in read_rows(tmp_path / "pool.jsonl")}
    tokens = pl.read_parquet(tmp_path / "s" / "_work" / "tokens" / "pool" / "*.parquet")
    for key, loss in zip(tokens["id"], tokens["loss_mask"]):  # the last reply and </s>: a token per word
        assert sum(loss) == len(rows[key][-1]["content"].split()) + 1

    def features(turns):
        out = tmp_path / f"f-{turns}"
        rc, _, err = run(capsys, "features", "--data", pool, "--out", out, "--model", model, "--executor", "local",
                         "--proj-dim", 32, "--messages-column", "dialog", "--assistant-turns", turns)
        assert rc == 0, err
        return features_of(out)

    f_all, f_last = features("all"), features("last")
    one_turn = {k for k, conv in rows.items() if len(conv) == 2}
    assert set(f_all) == set(f_last) == set(rows) and 0 < len(one_turn) < len(rows)
    assert all(np.array_equal(f_all[k], f_last[k]) == (k in one_turn) for k in rows)

    rc, printed, err = run(capsys, "finetune", "--train", pool, "--out", tmp_path / "ad", "--model", model,
                           "--epochs", 1, "--messages-column", "dialog", "--assistant-turns", "last")
    assert rc == 0, err
    assert json.loads(printed.splitlines()[-1])["rows"] == 30
    scored = {}
    for turns in ("all", "last"):
        rc, printed, err = run(capsys, "evaluate", "--data", pool, "--model", model, "--messages-column", "dialog",
                               "--assistant-turns", turns)
        assert rc == 0, err
        scored[turns] = json.loads(printed)
    assert scored["all"]["rows"] == scored["last"]["rows"] == 30
    assert scored["all"]["tokens"] == sum(len(" ".join(m["content"] for m in c if m["role"] == "assistant").split())
                                          + len(c) // 2 for c in rows.values())
    assert scored["last"]["tokens"] == sum(len(c[-1]["content"].split()) + 1 for c in rows.values())


# ------------------------------------------------------------------------------------------------
# demo: the bundled model through Ray, once, at a tiny size

@pytest.mark.ray
@pytest.mark.demo
@pytest.mark.timeout(600)
@covers("demo", "--out", "--domain-label", "--n-domain", "--n-pool", "--budget", "--scorer", "--seed", "--max-length",
        "--warmup-epochs", "--overwrite")
def test_demo_tiny(ray_session, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    # OUT/select first holds another run (the tiny model): the demo refuses it, then replaces it with --overwrite
    other = tmp_path / "other"
    other.mkdir()
    jsonl(other / "d.jsonl", [{"id": f"d{i}", "text": "w1 w2 w3"} for i in range(4)])
    jsonl(other / "p.jsonl", [{"id": f"p{i}", "text": f"w{i} w5"} for i in range(6)])
    assert main(["select", "--domain", str(other / "d.jsonl"), "--pool", str(other / "p.jsonl"), "--budget", "2",
                 "--out", str(out / "select"), "--model", str(tiny_model_dir), "--executor", "local",
                 "--proj-dim", "16"]) == 0
    argv = ["demo", "--out", out, "--domain-label", "noun.animal", "--n-domain", 4, "--n-pool", 24, "--budget", 2,
            "--scorer", "max", "--seed", 1, "--max-length", 48, "--warmup-epochs", 0.5]
    rc, _, err = run(capsys, *argv)
    assert rc == 2 and "different config" in err
    rc, printed, err = run(capsys, *argv, "--overwrite")
    assert rc == 0, err
    domain = pl.read_ndjson(out / "data" / "domain.jsonl")
    pool = pl.read_parquet(out / "data" / "pool.parquet")
    assert domain.height == 4 and set(domain["label"]) == {"noun.animal"}  # --n-domain, --domain-label
    assert pool.height == 24  # --n-pool
    m = manifest(out / "select")
    assert m["counts"]["selected"] == 2 and m["config"]["scorer"] == "max" and m["config"]["seed"] == 1
    assert m["config"]["max_length"] == 48 and m["config"]["warmup_epochs"] == 0.5 and m["model"]["path"] != str(tiny_model_dir)
    assert "noun.animal" in printed and "lift" in printed.lower()


# ------------------------------------------------------------------------------------------------
# precision (--dtype) and where finetune/evaluate run, finetune's schedule

@covers("select", "--dtype")
@covers("features", "--dtype")
def test_select_and_features_in_bfloat16(data, tiny_model_dir, tmp_path, capsys):
    d = data["text"]
    runs = {}
    for dtype in ("bfloat16", "auto"):
        out = tmp_path / dtype
        rc, _, err = run(capsys, *select_argv(d, out, tiny_model_dir, "--dtype", dtype))
        assert rc == 0, err
        runs[dtype] = manifest(out), pl.read_parquet(out / "ranked.parquet")
    m, ranked = runs["bfloat16"]
    assert m["config"]["dtype"] == "bfloat16" and m["model"]["dtype"] == "bfloat16"  # asked and resolved
    assert m["counts"]["ranked"] == 30 and m["counts"]["selected"] == 3
    assert ranked.filter(pl.col("stage") == "ntk")["score"].is_finite().all()
    assert runs["auto"][0]["config"]["dtype"] == "auto" and runs["auto"][0]["model"]["dtype"] == "float32"  # CPU
    feats = tmp_path / "feats"
    rc, _, err = run(capsys, "features", "--data", d / "pool.jsonl", "--out", feats, "--model", tiny_model_dir,
                     "--proj-dim", 32, "--executor", "local", "--dtype", "bfloat16")
    assert rc == 0, err
    summary = json.loads((feats / "_manifest.json").read_text())
    assert summary["dtype"] == "bfloat16" and summary["config"]["dtype"] == "bfloat16"
    assert len(features_of(feats)) == 30
    assert pq.read_schema(next(feats.glob("0*.parquet"))).field("feature").type.value_type == "float"  # float32


@covers("finetune", "--dtype", "--accelerator", "--lr-schedule", "--warmup-ratio", "--grad-accum-steps",
        "--batch-tokens")
@covers("evaluate", "--dtype", "--accelerator")
def test_finetune_and_evaluate_dtype_device_and_schedule(data, tiny_model_dir, tmp_path, capsys):
    train = data["text"] / "pool.jsonl"
    base = ["finetune", "--train", train, "--model", tiny_model_dir, "--epochs", 1, "--lr", 0.01]
    rc, printed, err = run(capsys, *base, "--out", tmp_path / "a", "--dtype", "bfloat16", "--accelerator", "cpu",
                           "--lr-schedule", "linear", "--warmup-ratio", 0.5, "--grad-accum-steps", 2,
                           "--batch-tokens", 24)
    assert rc == 0, err
    result = json.loads(printed.splitlines()[-1])
    assert result["device"] == "cpu" and result["dtype"] == "bfloat16"  # --accelerator cpu, --dtype
    history = json.loads((tmp_path / "a" / "ntk_ray_train.json").read_text())
    assert (history["lr_schedule"], history["warmup_ratio"], history["grad_accum_steps"]) == ("linear", 0.5, 2)
    assert history["batch_tokens"] == 24 and history["batches"] > 2  # --batch-tokens 24: several batches
    assert history["steps"] == math.ceil(history["batches"] / 2)  # --grad-accum-steps 2
    assert {t.dtype for t in adapter_weights(tmp_path / "a").values()} == {torch.float32}  # LoRA stays float32
    rc, printed, err = run(capsys, *base, "--out", tmp_path / "default")
    assert rc == 0, err
    defaults = json.loads((tmp_path / "default" / "ntk_ray_train.json").read_text())
    assert (defaults["lr_schedule"], defaults["warmup_ratio"], defaults["grad_accum_steps"]) == ("cosine", 0.03, 1)
    assert defaults["dtype"] == "float32" and defaults["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert defaults["steps"] == defaults["batches"]
    # evaluate the adapter in both precisions: the same loss to bfloat16's precision
    losses = {}
    for dtype in ("float32", "bfloat16"):
        rc, printed, err = run(capsys, "evaluate", "--data", train, "--model", tiny_model_dir, "--adapter",
                               tmp_path / "a", "--dtype", dtype, "--accelerator", "cpu")
        assert rc == 0, err
        out = json.loads(printed)
        assert out["dtype"] == dtype and out["device"] == "cpu"
        losses[dtype] = out["loss"]
    assert losses["bfloat16"] != losses["float32"] and math.isclose(losses["bfloat16"], losses["float32"], rel_tol=0.02)
    if not torch.cuda.is_available():  # --accelerator gpu on a machine without one: one line, exit 2
        for argv in ([*base, "--out", tmp_path / "gpu"], ["evaluate", "--data", train, "--model", tiny_model_dir]):
            rc, _, err = run(capsys, *argv, "--accelerator", "gpu")
            assert rc == 2 and err.count("\n") == 1 and "--accelerator gpu" in err, err


# ------------------------------------------------------------------------------------------------
# the coarse stage's cheaper embeddings and the chat template's default system turn

def test_an_embed_layer_past_the_models_layers_is_refused_up_front(data, tiny_model_dir, tmp_path, capsys):
    """The tiny model has 2 decoder layers: --embed-layer 3 is one line before any work (it used
    to fail in a worker, after the warm-up)."""
    out = tmp_path / "out"
    rc, _, err = run(capsys, *select_argv(data["text"], out, tiny_model_dir, "--embed-layer", 3))
    assert rc == 2 and "--embed-layer 3: the model has 2 decoder layers" in err
    assert not (out / "_work" / "warmup").exists()
    rc, _, err = run(capsys, *select_argv(data["text"], tmp_path / "ok", tiny_model_dir, "--embed-layer", 2))
    assert rc == 0, err


@covers("finetune", "--system-prompt")
@covers("evaluate", "--system-prompt")
def test_finetune_and_evaluate_system_prompt(data, tiny_chat_model_dir, tmp_path, capsys):
    """--system-prompt none in finetune and evaluate, as in select: a template that writes a
    default system turn loses it, so every row is shorter by that turn's tokens (evaluate counts
    only response tokens, so its token count is the same and its loss may differ)."""
    import shutil

    from transformers import AutoTokenizer

    model = tmp_path / "model"
    shutil.copytree(tiny_chat_model_dir, model)
    tok = AutoTokenizer.from_pretrained(str(model))
    tok.chat_template = "{% if messages[0]['role'] != 'system' %}system : the word is food\n{% endif %}" + tok.chat_template
    tok.save_pretrained(str(model))
    qa = ("--prompt-column", "q", "--response-column", "a", "--max-length", 48)
    pool = data["qa"] / "pool.jsonl"
    trained, scored = {}, {}
    for prompt in ("default", "none"):
        rc, printed, err = run(capsys, "finetune", "--train", pool, "--out", tmp_path / f"ft-{prompt}", "--model", model,
                               "--epochs", 1, "--system-prompt", prompt, *qa)
        assert rc == 0, err
        trained[prompt] = json.loads((tmp_path / f"ft-{prompt}" / "ntk_ray_train.json").read_text())
        rc, printed, err = run(capsys, "evaluate", "--data", pool, "--model", model, "--system-prompt", prompt, *qa)
        assert rc == 0, err
        scored[prompt] = json.loads(printed.splitlines()[-1])
    assert trained["none"]["rows"] == trained["default"]["rows"] == 30
    assert trained["none"]["tokens"] < trained["default"]["tokens"]
    assert scored["none"]["tokens"] == scored["default"]["tokens"] and scored["none"]["loss"] != scored["default"]["loss"]


@covers("select", "--embed-layer", "--embed-max-tokens", "--system-prompt")
@covers("features", "--system-prompt")
def test_embed_layer_max_tokens_and_system_prompt(data, tiny_chat_model_dir, tmp_path, capsys):
    """--embed-layer 1 --embed-max-tokens 4: the anchors' and the pool's embeddings are the
    mean-pooled hidden states after layer 1 of the first 4 tokens (recomputed here with the
    run's adapter); --system-prompt none: a template that writes a default system turn loses it
    (every row shorter by that turn's tokens), in select and in features."""
    import shutil

    from transformers import AutoTokenizer

    from ntk_ray.core.features import mean_pooled_embeddings
    from ntk_ray.models import load_adapter, load_model

    model = tmp_path / "model"
    shutil.copytree(tiny_chat_model_dir, model)
    tok = AutoTokenizer.from_pretrained(str(model))
    tok.chat_template = "{% if messages[0]['role'] != 'system' %}system : the word is food\n{% endif %}" + tok.chat_template
    tok.save_pretrained(str(model))
    d = data["qa"]
    qa = ("--prompt-column", "q", "--response-column", "a", "--max-length", 48)
    runs = {}
    for prompt in ("default", "none"):
        out = tmp_path / prompt
        rc, _, err = run(capsys, *select_argv(d, out, model, *qa, "--embed-layer", 1, "--embed-max-tokens", 4,
                                              "--system-prompt", prompt, "--coarse-factor", 2))
        assert rc == 0, err
        runs[prompt] = out
        assert manifest(out)["config"]["system_prompt"] == prompt and manifest(out)["coarse"]["skipped"] is False
    lengths = {p: pl.read_parquet(o / "_work" / "tokens" / "pool" / "*.parquet").sort("id")["n_tokens"].to_list()
               for p, o in runs.items()}
    block = len(tok("system : the word is food\n", add_special_tokens=False)["input_ids"])
    assert block == 6 and [a - b for a, b in zip(lengths["default"], lengths["none"])] == [block] * 30
    # the embeddings: layer 1 of 2, the first 4 tokens, for anchors (warm-up) and pool rows (embed) alike
    out = runs["none"]
    m = manifest(out)
    assert m["config"]["embed_layer"] == 1 and m["config"]["embed_max_tokens"] == 4
    adapted = load_adapter(load_model(str(model)), str(out / "_work" / "warmup" / "adapter")).eval()
    tokens = pl.concat([pl.read_parquet(out / "_work" / "tokens" / r / "*.parquet") for r in ("domain", "pool")])
    ids = dict(zip(tokens["id"].to_list(), tokens["input_ids"].to_list()))
    anchors = np.load(out / "_work" / "warmup" / "_anchor_embeddings.npy")
    anchor_ids = json.loads((out / "_work" / "warmup" / "_result.json").read_text())["anchor_ids"]
    want = mean_pooled_embeddings(adapted, [ids[k] for k in anchor_ids], layer=1, max_row_tokens=4).numpy()
    full = mean_pooled_embeddings(adapted, [ids[k] for k in anchor_ids]).numpy()
    assert np.allclose(anchors, want, atol=1e-5) and not np.allclose(anchors, full, atol=1e-3)
    # the pool side through the coarse votes: the summed similarity of all votes is the sum over the
    # anchors of their 3 (= budget) largest cosines to the pool (whichever rows tie)
    ranked = pl.read_parquet(out / "ranked.parquet")
    pool = [ids[k] for k in ranked["id"]]

    def top3(emb):
        return float(np.sort(want @ emb.T, axis=1)[:, -3:].sum())

    total = float(ranked["coarse_sim"].fill_null(0.0).sum())
    assert ranked["coarse_votes"].fill_null(0).sum() == 3 * len(anchor_ids)
    assert math.isclose(total, top3(mean_pooled_embeddings(adapted, pool, layer=1, max_row_tokens=4).numpy()),
                        rel_tol=1e-5)
    assert not math.isclose(total, top3(mean_pooled_embeddings(adapted, pool).numpy()), rel_tol=1e-3)
    # features --system-prompt none: the same tokens as select's
    f = tmp_path / "f"
    rc, _, err = run(capsys, "features", "--data", d / "pool.jsonl", "--out", f, "--model", model, "--executor", "local",
                     "--proj-dim", 32, *qa, "--system-prompt", "none")
    assert rc == 0, err
    got = pl.read_parquet(f / "_work" / "tokens" / "*.parquet").sort("id")["n_tokens"].to_list()
    assert got == lengths["none"] and json.loads((f / "_manifest.json").read_text())["config"]["system_prompt"] == "none"
    assert len(features_of(f)) == 30


@covers("select", "--quiet", "--verbose")
@covers("features", "--quiet", "--verbose")
@covers("score", "--quiet", "--verbose")
@covers("demo", "--quiet", "--verbose")
def test_quiet_and_verbose_set_the_run_s_verbosity(monkeypatch, tmp_path, capsys):
    """--quiet / --verbose reach the Progress each command runs with (the runner functions stubbed:
    what each verbosity prints is checked in tests/test_progress.py); the default is normal, and
    both at once is a usage error."""
    from ntk_ray import runner
    from ntk_ray.io.accounting import UsageError

    seen = []

    def stub(cfg, overwrite=False, progress=None, **kwargs):
        seen.append(progress.verbosity)
        raise UsageError("stubbed")

    for name in ("run_select", "run_features", "run_score"):
        monkeypatch.setattr(runner, name, stub)
    argvs = {"select": ["--domain", "d.jsonl", "--pool", "p.jsonl", "--budget", 1, "--out", tmp_path / "s"],
             "features": ["--data", "d.jsonl", "--out", tmp_path / "f"],
             "score": ["--features", "f", "--anchors", "a", "--budget", 1, "--out", tmp_path / "o"],
             "demo": ["--out", tmp_path / "demo", "--n-pool", 40, "--n-domain", 8]}
    for command, argv in argvs.items():
        for flag in ([], ["--quiet"], ["--verbose"]):
            seen.clear()
            rc, _, err = run(capsys, command, *argv, *flag)
            assert rc == 2 and err.strip() == "ntk-ray: error: stubbed", (command, flag, err)
            assert seen == [flag[0][2:] if flag else "normal"], (command, flag)
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, *map(str, argv), "--quiet", "--verbose"])
