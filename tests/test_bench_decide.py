"""The statistics of the decision benchmark (benchmarks/bench_selection.py): the bootstrap
interval on cases with a known answer, the call rule, the paired-difference table and the
results file from a fake cache (no model, no job: fast)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_selection", ROOT / "benchmarks" / "bench_selection.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_selection"] = module
    spec.loader.exec_module(module)
    return module


def test_bootstrap_ci_of_a_constant_is_that_constant(bench):
    mean, lo, hi = bench.bootstrap_ci([-0.03] * 7)
    assert mean == pytest.approx(-0.03) and lo == pytest.approx(-0.03) and hi == pytest.approx(-0.03)


def test_bootstrap_ci_matches_the_normal_interval_of_the_mean(bench):
    """n = 400 draws: the percentile interval of the resampled means is mean ± 1.96 s / sqrt(n)
    (s with ddof = 0, as the bootstrap's plug-in estimate) to within Monte-Carlo noise."""
    x = np.random.default_rng(1).normal(0.5, 2.0, size=400)
    mean, lo, hi = bench.bootstrap_ci(x)
    half = 1.959964 * x.std() / np.sqrt(x.size)
    assert mean == pytest.approx(x.mean())
    assert lo == pytest.approx(x.mean() - half, abs=0.06 * half)
    assert hi == pytest.approx(x.mean() + half, abs=0.06 * half)


def test_bootstrap_ci_by_brute_force_on_three_values(bench):
    """Three values: the resample mean takes 10 values with multinomial probabilities; the
    quantiles of 10,000 resamples sit where the exact distribution's do."""
    from itertools import product

    x = np.array([0.0, 1.0, 5.0])
    means = np.array([x[list(i)].mean() for i in product(range(3), repeat=3)])  # 27 equally likely resamples
    exact_lo, exact_hi = np.quantile(means, [0.025, 0.975], method="inverted_cdf")
    _, lo, hi = bench.bootstrap_ci(x)
    assert exact_lo - 1e-9 <= lo <= np.sort(means)[2] + 1e-9  # the 2.5% point lies in the lowest few
    assert np.sort(means)[-3] - 1e-9 <= hi <= exact_hi + 1e-9
    assert (lo, hi) == bench.bootstrap_ci(x)[1:], "a fixed seed gives the same interval"


def test_call_only_when_the_interval_excludes_zero(bench):
    n = bench.MIN_CELLS_TO_CALL
    assert bench.call(-0.05, -0.01, n) == "lower"
    assert bench.call(0.01, 0.05, n) == "higher"
    assert bench.call(-0.05, 0.01, n).startswith("no call")
    assert bench.call(-0.05, -0.01, n - 1).startswith("no call"), "too few cells"


def _fake_cache(bench, args, path: Path, loss_of):
    """A cache holding results of every main condition in every main cell with loss_of(domain,
    seed, condition), selections with a lift, and base-model records."""
    cache = bench.Cache(path)
    for seed in args.seeds:
        plans = bench.plans_for(args, seed)
        for d in args.domains:
            cache.add({"kind": "base", "domain": d, "seed": seed, "condition": "base", "fp": bench.base_fp(args),
                       "loss": 9.0})
            for name in bench.MAIN:
                p = plans[name]
                cache.add({"kind": "result", "domain": d, "seed": seed, "condition": name,
                           "fp": bench.result_fp(p, args), "loss": loss_of(d, seed, name), "train_seconds": 1.0,
                           "loss_seconds": 1.0})
                if p.kind != "none":
                    cache.add({"kind": "selection", "domain": d, "seed": seed, "condition": name, "fp": p.fp,
                               "ids": [], "parts": {"warmup": 2.0, "score": 1.0}, "borrows": p.borrows,
                               "lift": 3.0 if name == "ntk" else 1.0})
    return cache


def _args(bench, tmp_path):
    return bench.parse_args(["--domains", "noun.food", "noun.animal", "noun.body", "noun.plant", "--seeds", "0", "1",
                             "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache.jsonl"),
                             "--work", str(tmp_path / "work"), "--ablations", "ntk-max"])


def test_paired_differences_from_a_fake_cache(bench, tmp_path):
    args = _args(bench, tmp_path)
    rng = np.random.default_rng(0)
    noise = {(d, s): rng.normal(0, 0.01) for d in args.domains for s in args.seeds}
    # ntk 0.05 below random in every cell; embedding equal to ntk up to +-0.001 noise
    offsets = {"domain-only": 0.2, "random": 0.05, "bm25": 0.05, "less": 0.05, "ntk-mean": 0.05, "ntk": 0.0}

    def loss_of(d, s, name):
        if name == "embedding":
            return 3.0 + noise[(d, s)] + (0.001 if (args.domains.index(d) + s) % 2 else -0.001)
        return 3.0 + noise[(d, s)] + offsets[name]

    cache = _fake_cache(bench, args, tmp_path / "cache.jsonl", loss_of)
    rep = bench.Report(bench.Cache(tmp_path / "cache.jsonl"), args)  # read back from the file
    cells = rep.cells_of("main")
    assert len(cells) == 8 and rep.status()[:2] == (8, 8 + 4)  # 8 main cells done, 4 ablation cells not
    p = bench.paired(rep.loss, "ntk", "random", cells)
    assert p["n"] == 8 and p["mean"] == pytest.approx(-0.05) and p["lo"] == pytest.approx(-0.05)
    assert p["call"] == "lower" and p["wins"] == 8
    p = bench.paired(rep.loss, "ntk", "embedding", cells)
    assert p["n"] == 8 and p["lo"] < 0 < p["hi"] and p["call"].startswith("no call")
    # the results file says both, and the status line counts cells
    text = bench.write_results(cache, args, 0.0)
    assert "**status: 8 of 12 cells done** (main 8 of 8, ablation 0 of 4)" in text
    table = text.split("## ntk minus each baseline")[1].split("\n## ")[0]
    row = next(line for line in table.splitlines() if line.startswith("| random | "))
    assert row.startswith("| random | -0.0500 [-0.0500, -0.0500] | 8 | 8 of 8 | lower |")
    row = next(line for line in table.splitlines() if line.startswith("| embedding | "))
    assert "no call (interval includes 0)" in row
    assert (args.out / "decide.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # lift per domain and cost per 1,000 pool rows (stage seconds 3 / 1,000 rows; ntk-mean adds ntk's)
    lift = next(line for line in text.splitlines() if line.startswith("| ntk | ") and line.count("|") == 6)
    assert lift == "| ntk | 3.0 | 3.0 | 3.0 | 3.0 |"
    main_ntk = next(line for line in text.splitlines() if line.startswith("| ntk | `select` defaults"))
    assert "| 3.0 ± 0.0 | 3 | 8 |" in main_ntk
    main_mean = next(line for line in text.splitlines() if line.startswith("| ntk-mean | "))
    assert "| 6 | 8 |" in main_mean
    # a cell in progress (a selection, no result yet) counts in no column: lift and cost are over
    # the cells the loss is over
    plan = bench.plans_for(args, 2)["ntk"]
    cache.add({"kind": "selection", "domain": "noun.food", "seed": 2, "condition": "ntk", "fp": plan.fp, "ids": [],
               "parts": {"warmup": 500.0}, "borrows": None, "lift": 99.0})
    more = bench.parse_args(["--domains", *args.domains, "--seeds", "0", "1", "2", "--out", str(tmp_path / "o2"),
                             "--cache", str(tmp_path / "cache.jsonl"), "--work", str(tmp_path / "work"),
                             "--ablations", "ntk-max"])
    text = bench.write_results(bench.Cache(tmp_path / "cache.jsonl"), more, 0.0)
    main_ntk = next(line for line in text.splitlines() if line.startswith("| ntk | `select` defaults"))
    assert "| 3.0 ± 0.0 | 3 | 8 |" in main_ntk, main_ntk
    assert "| ntk | 3.0 | 3.0 | 3.0 | 3.0 |" in text


def test_stale_records_do_not_count(bench, tmp_path):
    """A record under another fingerprint (other fine-tune settings) is not a result of this run."""
    args = _args(bench, tmp_path)
    _fake_cache(bench, args, tmp_path / "cache.jsonl", lambda d, s, n: 3.0)
    other = bench.parse_args(["--domains", *args.domains, "--seeds", "0", "1", "--lr", "0.001",
                              "--cache", str(tmp_path / "cache.jsonl"), "--out", str(tmp_path / "o2"),
                              "--ablations", "ntk-max"])
    rep = bench.Report(bench.Cache(tmp_path / "cache.jsonl"), other)
    assert rep.loss == {} and rep.status()[0] == 0
    assert set(bench.todo("main", "noun.food", 0, other, bench.Cache(tmp_path / "cache.jsonl"))) == set(bench.MAIN)
    # ... while the selections and the base model's loss (which do not depend on the fine-tune) are still found
    rep = bench.Report(bench.Cache(tmp_path / "cache.jsonl"), other)
    assert ("noun.food", 0, "ntk") in rep.sel


def test_condition_table_resolution(bench, tmp_path):
    """Scorer variants score ntk's features, settings equal to ntk's are ntk, variants that keep
    the warm-up borrow ntk's adapter, LESS and warm-up/LoRA variants warm up themselves, and a
    flag the product does not have yet is pending."""
    args = _args(bench, tmp_path)
    plans = bench.plans_for(args, 0)
    assert plans["ntk-mean"].kind == "score" and plans["ntk-mean"].borrows == "ntk"
    assert plans["warmup-2"].kind == "alias" and plans["warmup-2"].alias == "ntk"
    assert plans["M=4N"].kind == "alias" and plans["K=N"].kind == "alias"
    assert plans["M=2N"].borrows == "ntk" and plans["embedding"].borrows == "ntk"
    assert plans["less"].borrows is None and plans["warmup-1"].borrows is None and plans["lora-qv"].borrows is None
    assert plans["random"].borrows is None
    assert plans["no-prefilter"].cfg["coarse_factor"] * args.budget >= args.n_pool
    assert len({p.fp for p in plans.values() if p.kind in ("select", "score")}) == \
        sum(p.kind in ("select", "score") for p in plans.values()), "every job its own fingerprint"
    bench.CONDITIONS.append(bench.Condition("future", "improvement", "x", {"no_such_flag": 1}))
    bench.BY_NAME["future"] = bench.CONDITIONS[-1]
    try:
        p = bench.plan_condition("future", args, 0)
        assert p.kind == "pending" and "--no-such-flag" in p.why
    finally:
        bench.CONDITIONS.pop()
        del bench.BY_NAME["future"]
    # a different seed is a different job
    assert bench.plans_for(args, 1)["ntk"].fp != plans["ntk"].fp
    assert json.dumps(plans["ntk"].cfg)  # serialisable (written to the cache's fingerprint)


def test_workers_share_cells_through_claims_and_the_cache(bench, tmp_path):
    """Two processes running the same command: a cell one of them holds is refused to the other
    (flock, per open file, so two opens in one process stand for two processes), free again when
    released; what one appends to the cache the other sees after ``reload``; a cut line is skipped."""
    args = bench.parse_args(["--work", str(tmp_path / "work"), "--cache", str(tmp_path / "c.jsonl"),
                             "--out", str(tmp_path / "out")])
    first = bench.claim_cell(args, "noun.food", 0)
    assert first is not None
    assert bench.claim_cell(args, "noun.food", 0) is None, "a held cell was handed out twice"
    other = bench.claim_cell(args, "noun.food", 1)
    assert other is not None, "another cell is free"
    first.close()
    again = bench.claim_cell(args, "noun.food", 0)
    assert again is not None, "a released cell stays locked"
    again.close(), other.close()

    a, b = bench.Cache(args.cache), bench.Cache(args.cache)
    rec = {"kind": "result", "domain": "noun.food", "seed": 0, "condition": "ntk", "fp": "x", "loss": 1.5}
    a.add(rec)
    with open(args.cache, "a") as f:
        f.write('{"kind": "result", "dom')  # a line cut by a kill
    assert b.get("result", "noun.food", 0, "ntk", "x") is None
    b.reload()
    assert b.get("result", "noun.food", 0, "ntk", "x") == rec
    later = dict(rec, condition="bm25")
    a.add(later)
    b.reload()
    assert b.get("result", "noun.food", 0, "bm25", "x") == later, "a record after a cut line was lost"


def test_cost_is_the_median_over_cells(bench):
    assert bench.median_n([10.0, 12.0, 500.0]) == (12.0, 0.0, 3), "one paused job must not set the cost"
    assert bench.median_n([None, float("nan")])[2] == 0


def test_improvement_options_run_before_the_ablations(bench, tmp_path):
    """Run order, seed by seed: its main cells, then the improvement options in its ablation
    cells; the ablations after every seed's; each phase runs only its own group's conditions;
    the status counts each."""
    args = bench.parse_args(["--work", str(tmp_path / "w"), "--cache", str(tmp_path / "c.jsonl"), "--out",
                             str(tmp_path / "o"), "--domains", "noun.food", "noun.animal", "--seeds", "0", "1",
                             "--ablations", "ntk-max", "ntk-rrf", "warmup-0"])
    order = bench.cells(args)
    assert [(ph, s) for ph, _, s in order] == [("main", 0)] * 2 + [("improvement", 0)] * 2 + [("main", 1)] * 2 + \
        [("improvement", 1)] * 2 + [("ablation", 0)] * 2 + [("ablation", 1)] * 2
    assert bench.conditions_for(args, "improvement") == ["ntk-rrf"]
    assert bench.conditions_for(args, "ablation") == ["ntk-max", "warmup-0"]
    assert set(bench.ablation_cells(args)) == {(d, s) for ph, d, s in order if ph != "main"}
    rep = bench.Report(bench.Cache(args.cache), args)
    assert rep.status() == (0, 12, "main 0 of 4, improvement 0 of 4, ablation 0 of 4")
    only = bench.parse_args(["--work", str(tmp_path / "w"), "--ablations", "ntk-max"])
    assert {ph for ph, _, _ in bench.cells(only)} == {"main", "ablation"}, "a phase without conditions has no cells"


def test_sign_flip_p_by_enumeration(bench):
    """Exact two-sided p of the paired sign-flip test against a literal loop over the patterns."""
    import itertools

    assert bench.sign_flip_p([-0.1] * 5) == 2 / 32, "5 of 5 the same sign: p = 2 / 2^5, however large"
    d = [-0.03, -0.01, 0.02, -0.05, -0.04, 0.01]
    want = np.mean([abs(np.mean(np.array(e) * d)) >= abs(np.mean(d)) - 1e-15
                    for e in itertools.product([-1, 1], repeat=len(d))])
    assert bench.sign_flip_p(d) == pytest.approx(want)
    big = list(np.random.default_rng(1).normal(-0.02, 0.01, size=20))  # beyond exact: sampled patterns
    assert bench.sign_flip_p(big) < 0.001
    null = np.random.default_rng(2).normal(0, 1, size=20)
    null -= null.mean()  # mean exactly 0: every pattern is at least as extreme
    assert bench.sign_flip_p(list(null)) == 1.0
    assert bench.paired({("d", 0, "a"): 1.0, ("d", 0, "b"): 2.0}, "a", "b", [("d", 0)])["p"] == 1.0


def test_token_cut_is_the_shortest_prefix_reaching_the_target(bench):
    tokens = {"a": 5, "b": 3, "c": 10, "e": 1}
    assert bench.token_cut(["a", "b", "c", "e"], tokens, 8) == ["a", "b"], "5 + 3 reaches 8"
    assert bench.token_cut(["a", "b", "c", "e"], tokens, 9) == ["a", "b", "c"], "8 < 9: one row more"
    assert bench.token_cut(["a", "d", "b"], tokens, 6) == ["a", "b"], "a row the harness rejected (d) is skipped"
    assert bench.token_cut(["a", "b"], tokens, 100) == ["a", "b"], "never reached: every ranked row"
    assert bench.token_cut(["a", "b"], tokens, 0) == []


def test_equal_token_conditions_and_the_tokens_table(bench, tmp_path):
    """The equal-token cuts: planned as cuts of ntk's and bm25's jobs (no job, a fingerprint of
    both), run right after each seed's main cells, kept out of the ablation table; the tokens
    table's ratio and within-cell association against a direct computation."""
    args = bench.parse_args(["--domains", "noun.food", "noun.animal", "noun.body", "noun.plant", "--seeds", "0", "1",
                             "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache.jsonl"),
                             "--work", str(tmp_path / "work"),
                             "--ablations", "ntk-max", "ntk@bm25-tokens", "bm25@ntk-tokens"])
    plans = bench.plans_for(args, 0)
    cut = plans["ntk@bm25-tokens"]
    assert cut.kind == "cut" and cut.borrows == "ntk" and plans["bm25@ntk-tokens"].borrows == "bm25"
    assert cut.fp != plans["bm25@ntk-tokens"].fp and cut.fp != bench.plans_for(args, 1)["ntk@bm25-tokens"].fp
    assert [ph for ph, _, s in bench.cells(args) if s == 0][:8] == ["main"] * 4 + ["tokens"] * 4
    assert bench.conditions_for(args, "tokens") == ["ntk@bm25-tokens", "bm25@ntk-tokens"]

    rng = np.random.default_rng(3)
    tok = {(d, s, n): int(rng.integers(300, 1000)) for d in args.domains for s in args.seeds for n in bench.MAIN}
    loss = {k: 4.0 - 0.001 * v + rng.normal(0, 0.05) for k, v in tok.items()}
    cache = _fake_cache(bench, args, tmp_path / "cache.jsonl", lambda d, s, n: loss[(d, s, n)])
    for s in args.seeds:  # the selections again, with token counts (a later record of a key wins)
        for d in args.domains:
            for n in bench.MAIN[1:]:
                p = bench.plans_for(args, s)[n]
                fp = p.fp if p.kind != "alias" else bench.plans_for(args, s)[p.alias].fp
                cache.add({"kind": "selection", "domain": d, "seed": s, "condition": n, "fp": fp, "ids": [],
                           "parts": {}, "borrows": p.borrows, "lift": 1.0, "tokens": tok[(d, s, n)]})
    rep = bench.Report(bench.Cache(tmp_path / "cache.jsonl"), args)
    cells_ = rep.cells_of("main")
    text = "\n".join(bench.token_section(rep, cells_))
    ratio = np.mean([tok[(d, s, "bm25")] / tok[(d, s, "ntk")] for d, s in cells_])
    row = next(line for line in text.splitlines() if line.startswith("| bm25 | "))
    assert f"| {ratio:.2f} ± " in row, (row, ratio)
    names = [n for n in bench.MAIN if n != "domain-only"]
    t = np.array([[tok[(d, s, n)] for n in names] for d, s in cells_], dtype=float)
    y = np.array([[loss[(d, s, n)] for n in names] for d, s in cells_])
    t, y = (t - t.mean(1, keepdims=True)).ravel(), (y - y.mean(1, keepdims=True)).ravel()
    assoc = bench.token_association(rep, cells_, names)
    assert assoc["n"] == t.size and assoc["r"] == pytest.approx(np.corrcoef(t, y)[0, 1])
    assert assoc["slope"] == pytest.approx(100 * np.polyfit(t, y, 1)[0]) and assoc["slope"] < 0
    assert f"Pearson r = {assoc['r']:+.2f}" in text
    # the cut conditions are rows of the tokens table, not of the ablation table
    full = bench.write_results(cache, args, 0.0)
    ablation = full.split("## Ablations")[1].split("\n## ")[0]
    assert "ntk@bm25-tokens" not in ablation and "| ntk-max |" in ablation
    assert "| ntk@bm25-tokens − bm25 | bm25's picks |" in full


def test_fixed_steps_fine_tune_against_train_lora(bench):
    """``train_steps`` (the /fixed-steps conditions): S steps over a permutation split into S
    batches of sizes within one row; with S = 1 it is one AdamW step on the mean token loss of
    all rows, which ``train_lora`` with one batch of every row also is: the same weights."""
    import torch
    from conftest import build_tiny_lora_model, random_samples

    from ntk_ray.core.training import TrainConfig, train_lora

    seqs, masks = random_samples(7, seed=4)
    model = build_tiny_lora_model(seed=1)
    out = bench.train_steps(model, seqs, masks, steps=3, lr=1e-2, seed=0)
    assert out["steps"] == 3 and sorted(out["batch_rows"]) == [2, 2, 3]
    assert bench.train_steps(build_tiny_lora_model(seed=1), seqs, masks, steps=50, lr=1e-2, seed=0)["steps"] == 7

    a, b = build_tiny_lora_model(seed=1), build_tiny_lora_model(seed=1)
    bench.train_steps(a, seqs, masks, steps=1, lr=1e-2, seed=0)
    train_lora(b, seqs, masks, TrainConfig(epochs=1.0, lr=1e-2, max_batch_rows=64, batch_tokens=1 << 16, seed=0),
               log=lambda *_: None)
    trained = [(n, p) for n, p in a.named_parameters() if p.requires_grad]
    assert trained and all(torch.allclose(p, dict(b.named_parameters())[n], atol=1e-6) for n, p in trained)
    moved = build_tiny_lora_model(seed=1)
    assert any(not torch.allclose(p, dict(moved.named_parameters())[n]) for n, p in trained), "no step was taken"


def test_fixed_steps_conditions_refit_another_selection(bench, tmp_path):
    args = bench.parse_args(["--work", str(tmp_path / "w"), "--cache", str(tmp_path / "c.jsonl"),
                             "--out", str(tmp_path / "o")])
    plans = bench.plans_for(args, 0)
    assert bench.fixed_steps(args) == 48, "(48 domain rows + N = 48) / 2 rows per step"
    p = plans["ntk@bm25-tokens/fixed-steps"]
    assert p.kind == "refit" and p.borrows == "ntk@bm25-tokens"
    assert bench.selection_key(plans, "ntk@bm25-tokens/fixed-steps") == ("ntk@bm25-tokens", plans["ntk@bm25-tokens"].fp)
    assert bench.selection_key(plans, "ntk/fixed-steps") == ("ntk", plans["ntk"].fp)
    assert bench.result_fp(p, args) != bench.result_fp(plans["ntk@bm25-tokens"], args), "its own result"
