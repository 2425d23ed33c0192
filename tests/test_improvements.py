"""The selection options of issue 16 ("try to make it win"), each against a slow reference:

* ``--allocation facility-location | kernel-mean-matching``: the fast greedies of
  ``core.selectors`` against literal loops that recompute the objective from scratch for every
  candidate at every step (and against the exhaustive optimum on tiny sets);
* ``--fusion rrf``: reciprocal rank fusion against hand-computed numbers;
* ``--checkpoints K``: the kernel of the concatenated weighted features against the weighted sum
  of the per-checkpoint kernels;
* ``--center candidates``: the centred kernel against explicitly shifted vectors;

and end to end on the tiny model in-process (``--executor local``), the picks and scores
recomputed from the kept feature files: facility location on centred features and checkpoints
here; kernel-mean-matching, fusion and centring in ``tests/test_cli_flags.py``'s case.
"""

from __future__ import annotations

import itertools

import numpy as np
import polars as pl
import pytest

from ntk_ray.core.selectors import (
    facility_location_order,
    kernel_mean_matching_order,
    ranks_of,
    reciprocal_rank_fusion,
)

# ---- references --------------------------------------------------------------------------------

def coverage(kernel: np.ndarray, picked: list[int]) -> float:
    """f(S) = sum_j max(0, max_{i in S} K[j, i]), from scratch."""
    if not picked:
        return 0.0
    return float(sum(max(0.0, max(kernel[j, i] for i in picked)) for j in range(kernel.shape[0])))


def facility_location_reference(kernel: np.ndarray, keys: np.ndarray, budget: int) -> list[int]:
    """Plain greedy: every step evaluates f(S + {i}) for every i from scratch; ties: smaller key."""
    picked: list[int] = []
    for _ in range(min(budget, kernel.shape[1])):
        best = None
        for i in range(kernel.shape[1]):
            if i in picked:
                continue
            value = coverage(kernel, picked + [i])
            if best is None or value > best[0] + 1e-12 or (abs(value - best[0]) <= 1e-12 and keys[i] < keys[best[1]]):
                best = (value, i)
        picked.append(best[1])
    return [int(keys[i]) for i in picked]


def mmd2(x: np.ndarray, mu: np.ndarray, picked: list[int]) -> float:
    """|mu - mean of the picked rows|^2, from scratch (float64)."""
    return float(np.sum((mu - x[picked].mean(axis=0)) ** 2))


def kernel_mean_matching_reference(x: np.ndarray, mu: np.ndarray, keys: np.ndarray, budget: int) -> list[int]:
    picked: list[int] = []
    for _ in range(min(budget, len(x))):
        best = None
        for i in range(len(x)):
            if i in picked:
                continue
            value = mmd2(x, mu, picked + [i])
            if best is None or value < best[0] - 1e-12 or (abs(value - best[0]) <= 1e-12 and keys[i] < keys[best[1]]):
                best = (value, i)
        picked.append(best[1])
    return [int(keys[i]) for i in picked]


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ---- facility location -------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_facility_location_equals_the_plain_greedy(seed):
    rng = np.random.default_rng(seed)
    anchors, rows = int(rng.integers(2, 7)), int(rng.integers(3, 14))
    kernel = rng.normal(size=(anchors, rows))  # negative values too: clipped at 0 by f
    keys = rng.permutation(1000)[:rows].astype(np.int64) - 500
    for budget in (1, 3, rows, rows + 2):
        assert facility_location_order(kernel, keys, budget) == facility_location_reference(kernel, keys, budget)


def test_facility_location_ties_go_to_the_smaller_key_and_duplicates_wait():
    # rows 0 and 1 are copies (both cover anchor 0 best); row 2 covers anchor 1
    kernel = np.array([[0.9, 0.9, 0.1],
                       [0.2, 0.2, 0.6]])
    keys = np.array([7, 3, 5])
    order = facility_location_order(kernel, keys, 3)
    assert order[:2] == [3, 5]  # the smaller key of the tie, then the other anchor, not the duplicate
    assert order == facility_location_reference(kernel, keys, 3)


def test_facility_location_is_within_1_minus_1_over_e_of_the_best_set():
    rng = np.random.default_rng(3)
    for _ in range(5):
        kernel = rng.random((5, 8))
        keys = np.arange(8)
        greedy = facility_location_order(kernel, keys, 3)
        idx = [int(np.nonzero(keys == k)[0][0]) for k in greedy]
        best = max(coverage(kernel, list(s)) for s in itertools.combinations(range(8), 3))
        assert coverage(kernel, idx) >= (1 - 1 / np.e) * best - 1e-12
        # the first pick is the exhaustive best single row
        assert coverage(kernel, idx[:1]) == pytest.approx(max(coverage(kernel, [i]) for i in range(8)))


# ---- kernel mean matching ----------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("unit", [True, False])
def test_kernel_mean_matching_equals_the_plain_greedy(seed, unit):
    import torch

    rng = np.random.default_rng(seed)
    rows, d = int(rng.integers(3, 12)), int(rng.integers(2, 9))
    x = rng.normal(size=(rows, d)).astype(np.float32)
    anchors = rng.normal(size=(4, d)).astype(np.float32)
    if unit:
        x, anchors = _unit(x).astype(np.float32), _unit(anchors)
    mu = anchors.astype(np.float64).mean(axis=0)
    keys = rng.permutation(rows).astype(np.int64) * 11
    for budget in (1, 2, rows):
        want = kernel_mean_matching_reference(x.astype(np.float64), mu, keys, budget)
        assert kernel_mean_matching_order(x, mu, keys, budget) == want
        # torch input, tiny row blocks: the same picks
        assert kernel_mean_matching_order(torch.from_numpy(x), mu, keys, budget, block_rows=2) == want


def test_kernel_mean_matching_prefers_coverage_over_a_duplicate():
    # anchors split between two directions; two copies of direction 0 score a bit higher than
    # direction 1, so a top-2 by score would take both copies; the matching takes one of each
    e0, e1 = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    x = np.array([e0, e0, 0.8 * e1 + 0.6 * e0], dtype=np.float32)
    mu = (e0 + e1) / 2
    keys = np.array([0, 1, 2])
    order = kernel_mean_matching_order(x, mu, keys, 2)
    assert order[0] == 2 or order[1] == 2
    assert order == kernel_mean_matching_reference(x.astype(np.float64), mu, keys, 2)
    # the exhaustive best pair is what the greedy found
    best = min(itertools.combinations(range(3), 2), key=lambda s: mmd2(x.astype(np.float64), mu, list(s)))
    assert sorted(order) == sorted(keys[list(best)].tolist())


# ---- rank fusion -------------------------------------------------------------------------------

def test_reciprocal_rank_fusion_by_hand():
    # k = 1: row a: 1/(1+1) + 1/(1+3) = 0.75; row b: 1/3 + 1/2 = 0.8333; row c: 1/4 + 1/3 = 0.5833
    fused = reciprocal_rank_fusion([np.array([1, 2, 3]), np.array([3, 1, 2])], k=1)
    np.testing.assert_allclose(fused, [0.75, 5 / 6, 7 / 12])
    # k = 60 (the default): 1/61 + 1/63 etc.
    np.testing.assert_allclose(reciprocal_rank_fusion([np.array([1, 2]), np.array([2, 1])], 60), [1 / 61 + 1 / 62] * 2)
    with pytest.raises(ValueError):
        reciprocal_rank_fusion([np.array([1, 2]), np.array([1])], 1)


def test_ranks_of_sorts_like_rank_rows():
    keys = np.array([30, 10, 20, 40])
    # score desc, ties by key asc: 0.5 (key 10), 0.5 (key 30), 0.2 (key 20), 0.1 (key 40)
    assert ranks_of(keys, np.array([0.5, 0.5, 0.2, 0.1]), descending=(True,)).tolist() == [2, 1, 3, 4]
    # an explicit order first (asc), then score desc
    assert ranks_of(keys, np.array([1.0, 4, 4, 0]), np.array([0.0, 0.1, 0.9, 0.0]),
                    descending=(False, True)).tolist() == [2, 4, 3, 1]


def test_fuse_with_coarse_by_hand():
    from ntk_ray.stages.rank import Scores, fuse_with_coarse

    # NTK ranking: k1 (0.9), k2 (0.5), k3 (0.4), k4 (0.1); k5 is rejected and stays out
    scores = pl.DataFrame({"key": [1, 2, 3, 4, 5], "score": [0.9, 0.5, 0.4, 0.1, None],
                           "reject": [None, None, None, None, "non-finite gradient (NaN/inf)"]},
                          schema={"key": pl.Int64, "score": pl.Float64, "reject": pl.String})
    # embedding ranking (votes desc, sim desc): k4 (3 votes), k3 (2, 1.5), k2 (2, 1.0), k1 (0)
    cand = pl.DataFrame({"key": [1, 2, 3, 4, 5], "coarse_votes": [0, 2, 2, 3, 1],
                         "coarse_sim": [0.0, 1.0, 1.5, 2.9, 0.7]})
    order = fuse_with_coarse(Scores(scores), cand, k=1)
    # k = 1: k1 1/2 + 1/5 = 0.7; k2 1/3 + 1/4 = 0.583; k3 1/4 + 1/3 = 0.583; k4 1/5 + 1/2 = 0.7
    # ties: the better NTK rank first -> k1, k4 (NTK ranks 1, 4), then k2, k3 (NTK ranks 2, 3)
    assert order["key"].to_list() == [1, 4, 2, 3]
    assert order["order"].to_list() == [0, 1, 2, 3]
    # k = 100: nearly the mean rank: k1 (1, 4), k2 (2, 3), k3 (3, 2), k4 (4, 1): all tied at 2.5
    # mean rank but 1/(k + r) is convex, so the extremes (k1, k4) still win, by NTK rank
    assert fuse_with_coarse(Scores(scores), cand, k=100)["key"].to_list() == [1, 4, 2, 3]
    # an explicit NTK order (e.g. a greedy allocation) is the NTK ranking
    explicit = pl.DataFrame({"key": [3, 2], "order": [0, 1]})
    got = fuse_with_coarse(Scores(scores, explicit), cand, k=1)
    # NTK ranks: k3 1, k2 2, k1 3, k4 4; embedding ranks k4 1, k3 2, k2 3, k1 4
    # k3: 1/2 + 1/3 = 0.833; k2: 1/3 + 1/4 = 0.583; k1: 1/4 + 1/5 = 0.45; k4: 1/5 + 1/2 = 0.7
    assert got["key"].to_list() == [3, 4, 2, 1]


def test_fuse_with_bm25_by_hand():
    from ntk_ray.stages.rank import Scores, fuse_with_bm25

    # NTK ranking: k1 (0.9), k2 (0.5), k3 (0.4), k4 (0.1); k5 rejected; k6 is no candidate
    scores = pl.DataFrame({"key": [1, 2, 3, 4, 5], "score": [0.9, 0.5, 0.4, 0.1, None],
                           "reject": [None, None, None, None, "non-finite gradient (NaN/inf)"]},
                          schema={"key": pl.Int64, "score": pl.Float64, "reject": pl.String})
    # BM25 of every usable pool row: among the candidates k4 (7.0), k2 = k3 (2.0: key asc), k1 (0.5)
    bm25 = pl.DataFrame({"key": [1, 2, 3, 4, 5, 6], "score": [0.5, 2.0, 2.0, 7.0, 9.0, 99.0],
                         "reject": [None] * 6}, schema={"key": pl.Int64, "score": pl.Float64, "reject": pl.String})
    # k = 1, BM25 ranks k4 1, k2 2, k3 3, k1 4: k1 1/2 + 1/5 = 0.7; k2 1/3 + 1/3 = 0.667;
    # k3 1/4 + 1/4 = 0.5; k4 1/5 + 1/2 = 0.7 -> k1, k4 (tie: NTK rank), k2, k3
    order = fuse_with_bm25(Scores(scores), bm25, k=1)
    assert order["key"].to_list() == [1, 4, 2, 3] and order["order"].to_list() == [0, 1, 2, 3]
    # BM25 that agrees with NTK changes nothing
    same = bm25.with_columns(pl.Series("score", [4.0, 3.0, 2.0, 1.0, 0.0, 0.0]))
    assert fuse_with_bm25(Scores(scores), same, k=1)["key"].to_list() == [1, 2, 3, 4]


# ---- end to end on the tiny model --------------------------------------------------------------

def _select(tiny_data, tiny_model_dir, out, **options):
    from ntk_ray.config import SelectConfig
    from ntk_ray.runner import run_select
    from ntk_ray.runtime.local import LocalExecutor

    cfg = SelectConfig(domain=[str(tiny_data / "domain.jsonl")], pool=[str(tiny_data / "pool.jsonl")], budget=5,
                       out=str(out), model=str(tiny_model_dir), max_length=32, proj_dim=64, warmup_epochs=1.0,
                       batch_tokens=512, keep_features=True, **options)
    manifest = run_select(cfg, executor=LocalExecutor())
    ranked = pl.read_parquet(out / "ranked.parquet")
    c = manifest["counts"]
    assert c["pool_rows"] == c["ranked"] + c["rejected"] == 30
    assert ranked["rank"].to_list() == list(range(1, ranked.height + 1))
    assert ranked["selected"].sum() == 5
    return manifest, ranked


def _kept_features(out):
    from ntk_ray.io.shards import list_shards
    from ntk_ray.stages.kernel import usable_vectors

    parts = [usable_vectors(f) for f in list_shards(str(out / "_work" / "features"))]
    keys = np.concatenate([p[0] for p in parts])
    x = np.concatenate([p[1] for p in parts]).astype(np.float64)
    anchors = usable_vectors(str(out / "_work" / "anchor_features" / "anchors.parquet"))[1].astype(np.float64)
    return keys, x, anchors


def _ids_of_keys(out, keys):
    from ntk_ray.io.shards import list_shards, shards_frame

    frame = shards_frame(list_shards(str(out / "_work" / "features")), ["id", "key"])
    by_key = dict(zip(frame["key"].to_list(), frame["id"].to_list()))
    return [by_key[k] for k in keys]


def test_select_with_facility_location_on_centred_features_picks_the_reference_greedy(tiny_data, tiny_model_dir,
                                                                                       tmp_path):
    """End to end: --allocation facility-location --center candidates picks what the literal
    greedy picks on the centred cosine kernel of the kept features; the scores are the centred
    mean cosines. (kernel-mean-matching, --fusion and --checkpoints run end to end in
    tests/test_cli_flags.py's case too.)"""
    from ntk_ray.core.scoring import round_scores

    out = tmp_path / "out"
    _, ranked = _select(tiny_data, tiny_model_dir, out, allocation="facility-location", center="candidates")
    keys, x, anchors = _kept_features(out)
    order = np.argsort(keys)
    keys, x = keys[order], x[order]
    m = x.mean(axis=0)
    u, ua = _unit(x - m), _unit(anchors - m)
    want = facility_location_reference(round_scores(ua @ u.T), keys, 5)  # the job's cosines are on the float32 grid
    assert ranked.filter(pl.col("selected"))["id"].to_list() == _ids_of_keys(out, want)
    got = dict(zip(ranked["id"].to_list(), ranked["score"].to_list()))
    np.testing.assert_allclose([got[i] for i in _ids_of_keys(out, keys.tolist())], (u @ ua.T).mean(axis=1),
                               rtol=1e-5, atol=1e-7)
    # the rows after the picks keep the score order
    rest = ranked.filter(~pl.col("selected") & (pl.col("stage") == "ntk"))["score"].to_list()
    assert rest == sorted(rest, reverse=True)
    # `ntk-ray score` with the same options on the kept features picks the same rows in the same
    # order (what lets the decide benchmark score these options without a model pass)
    from ntk_ray.config import ScoreConfig
    from ntk_ray.runner import run_score
    from ntk_ray.runtime.local import LocalExecutor

    run_score(ScoreConfig(features=str(out / "_work" / "features"), anchors=str(out / "_work" / "anchor_features"),
                          budget=5, out=str(tmp_path / "scored"), allocation="facility-location", center="candidates"),
              executor=LocalExecutor())
    scored = pl.read_parquet(tmp_path / "scored" / "ranked.parquet")
    assert scored.filter(pl.col("selected"))["id"].to_list() == ranked.filter(pl.col("selected"))["id"].to_list()
    assert scored["id"].to_list() == ranked.filter(pl.col("stage") == "ntk")["id"].to_list()


def test_select_with_bm25_fusion_fuses_the_bm25_selectors_ranking(tiny_data, tiny_model_dir, tmp_path):
    """End to end: --fusion rrf-bm25 orders the candidates by 1/(k + NTK rank) + 1/(k + BM25
    rank), the BM25 ranking being the bm25 selector's own job on the same files (a slow,
    independent reference: dicts and sorts over the two jobs' ranked.parquet); the rows cut by
    the coarse stage stay below every candidate; the scores stay the NTK scores."""
    out = tmp_path / "fused"
    manifest, ranked = _select(tiny_data, tiny_model_dir, out, fusion="rrf-bm25", fusion_k=2)
    assert manifest["config"]["fusion"] == "rrf-bm25"
    _, plain = _select(tiny_data, tiny_model_dir, tmp_path / "plain", fusion="none", adapter=str(
        out / "_work" / "warmup" / "adapter"))
    _, lexical = _select(tiny_data, tiny_model_dir, tmp_path / "bm25", selector="bm25")
    ntk = plain.filter(pl.col("stage") == "ntk")
    got = ranked.filter(pl.col("stage") == "ntk")
    assert sorted(got["id"].to_list()) == sorted(ntk["id"].to_list()), "the same candidates"
    ntk_score = dict(zip(ntk["id"].to_list(), ntk["score"].to_list()))
    np.testing.assert_allclose([ntk_score[i] for i in got["id"].to_list()], got["score"].to_list(), rtol=1e-6)
    bm = dict(zip(lexical["id"].to_list(), lexical["score"].to_list()))
    from ntk_ray.core.scoring import stable_keys

    key = dict(zip(ntk["id"].to_list(), stable_keys(ntk["id"].to_list()).tolist()))
    ids = ntk["id"].to_list()
    r_ntk = {i: n + 1 for n, i in enumerate(sorted(ids, key=lambda i: (-ntk_score[i], key[i])))}
    r_bm = {i: n + 1 for n, i in enumerate(sorted(ids, key=lambda i: (-bm[i], key[i])))}
    want = sorted(ids, key=lambda i: (-(1 / (2 + r_ntk[i]) + 1 / (2 + r_bm[i])), r_ntk[i], key[i]))
    assert got["id"].to_list() == want
    assert ranked["stage"].to_list()[:len(want)] == ["ntk"] * len(want), "cut rows stay below the candidates"
    assert want[:5] != sorted(ids, key=lambda i: r_ntk[i])[:5] or want[:5] != sorted(ids, key=lambda i: r_bm[i])[:5], \
        "the fixture cannot tell a fusion from either ranking alone"


def test_bm25_coarse_stage_keeps_the_bm25_selectors_top_m(tiny_data, tiny_model_dir, tmp_path):
    """--coarse-by bm25: the candidates are the top M = 4 x 5 rows of the bm25 selector's own
    ranking on the same files, the cut rows follow in that order with coarse_sim = its BM25
    score and no votes; no embed stage runs; a candidate's NTK score is the one a plain ntk run
    with the same warm-up gives it (the kernel of a row does not depend on the other rows)."""
    out = tmp_path / "bm25coarse"
    manifest, ranked = _select(tiny_data, tiny_model_dir, out, coarse_by="bm25")
    _, lexical = _select(tiny_data, tiny_model_dir, tmp_path / "bm25", selector="bm25")
    assert manifest["coarse"] == {"skipped": False, "M": 20, "by": "bm25"}
    assert "embed" not in manifest["stage_seconds"] and "coarse" in manifest["stage_seconds"]
    assert manifest["config"]["coarse_by"] == "bm25"
    want = lexical["id"].to_list()  # the bm25 selector's order: BM25 desc, then key
    assert set(ranked.filter(pl.col("stage") == "ntk")["id"]) == set(want[:20])
    cut = ranked.filter(pl.col("stage") == "coarse")
    assert cut["id"].to_list() == want[20:]
    bm = dict(zip(lexical["id"].to_list(), lexical["score"].to_list()))
    np.testing.assert_allclose(cut["coarse_sim"].to_list(), [bm[i] for i in cut["id"]], rtol=1e-12)
    assert cut["coarse_votes"].null_count() == cut.height
    _, plain = _select(tiny_data, tiny_model_dir, tmp_path / "plain", adapter=str(out / "_work" / "warmup" / "adapter"))
    both = ranked.filter(pl.col("stage") == "ntk").join(plain.filter(pl.col("stage") == "ntk"), on="id")
    assert both.height >= 5, "too few common candidates to compare"
    np.testing.assert_allclose(both["score"].to_numpy(), both["score_right"].to_numpy(), rtol=1e-6)
    # with --fusion rrf-bm25 the candidates are fused with the BM25 ranking (taken from the coarse
    # stage's scores): the literal RRF of this run's NTK scores and the bm25 selector's scores
    from ntk_ray.core.scoring import stable_keys

    _, fused = _select(tiny_data, tiny_model_dir, tmp_path / "fused", coarse_by="bm25", fusion="rrf-bm25",
                       fusion_k=2, adapter=str(out / "_work" / "warmup" / "adapter"))
    ntk = ranked.filter(pl.col("stage") == "ntk")
    ids = ntk["id"].to_list()
    score, key = dict(zip(ids, ntk["score"].to_list())), dict(zip(ids, stable_keys(ids).tolist()))
    r_ntk = {i: n + 1 for n, i in enumerate(sorted(ids, key=lambda i: (-score[i], key[i])))}
    r_bm = {i: n + 1 for n, i in enumerate(sorted(ids, key=lambda i: (-bm[i], key[i])))}
    want = sorted(ids, key=lambda i: (-(1 / (2 + r_ntk[i]) + 1 / (2 + r_bm[i])), r_ntk[i], key[i]))
    assert fused.filter(pl.col("stage") == "ntk")["id"].to_list() == want


@pytest.mark.parametrize("option, value", [("coarse_k", 3), ("fusion", "rrf"), ("embed_layer", 1)])
def test_bm25_coarse_refuses_the_embedding_options(tiny_data, tiny_model_dir, tmp_path, option, value):
    from ntk_ray.io.accounting import UsageError

    with pytest.raises(UsageError, match="--coarse-by bm25 computes no embeddings"):
        _select(tiny_data, tiny_model_dir, tmp_path / "out", coarse_by="bm25", **{option: value})


def test_allocation_with_round_robin_is_a_usage_error(tiny_data, tiny_model_dir, tmp_path):
    from ntk_ray.io.accounting import UsageError

    with pytest.raises(UsageError, match="--allocation"):
        _select(tiny_data, tiny_model_dir, tmp_path / "out", allocation="facility-location", scorer="round-robin")


# ---- features over warm-up checkpoints ---------------------------------------------------------

def test_checkpoint_steps_and_weights():
    from ntk_ray.core.selectors import checkpoint_steps, checkpoint_weights

    assert checkpoint_steps(10, 1) == [10]
    assert checkpoint_steps(10, 3) == [4, 7, 10]
    assert checkpoint_steps(2, 3) == [1, 2, 2]  # fewer steps than checkpoints: some coincide
    assert checkpoint_weights([1e-4, 1e-4]) == [0.5, 0.5]
    assert checkpoint_weights([3.0, 1.0]) == [0.75, 0.25]


def test_combined_checkpoint_features_give_the_weighted_sum_of_kernels():
    from ntk_ray.core.selectors import (
        combine_checkpoint_features,
        combine_checkpoint_norms,
    )

    rng = np.random.default_rng(0)
    weights = [0.5, 0.3, 0.2]
    xs = [rng.normal(size=(7, 5)).astype(np.float32) for _ in weights]
    anchors = [rng.normal(size=(3, 5)).astype(np.float32) for _ in weights]
    x, a = combine_checkpoint_features(xs, weights), combine_checkpoint_features(anchors, weights)
    assert x.shape == (7, 15) and x.dtype == np.float32
    want = sum(w * (xi.astype(np.float64) @ ai.T.astype(np.float64)) for w, xi, ai in zip(weights, xs, anchors))
    np.testing.assert_allclose(x.astype(np.float64) @ a.T.astype(np.float64), want, rtol=1e-5, atol=1e-6)
    norms = [np.linalg.norm(xi, axis=1) for xi in xs]
    np.testing.assert_allclose(combine_checkpoint_norms(norms, weights), np.linalg.norm(x, axis=1), rtol=1e-5)


def _features_under(adapter_dir, model_dir, tokens_dir, keys, proj_dim):
    """psi of the rows ``keys`` of a token directory under one adapter, computed from scratch."""
    from ntk_ray.core.features import FeatureComputer
    from ntk_ray.io.shards import list_shards, shards_frame
    from ntk_ray.models import load_adapter, load_model

    tokens = shards_frame(list_shards(tokens_dir), ["key", "input_ids", "score_mask"])
    tokens = pl.DataFrame({"key": keys}).join(tokens, on="key", how="left")
    model = load_adapter(load_model(str(model_dir), device="cpu"), str(adapter_dir))
    computer = FeatureComputer(model, projector="sketch", dim=proj_dim, seed=0, device="cpu")
    out = computer.features(tokens["input_ids"].to_list(), tokens["score_mask"].to_list(), 512)
    return out.feature.numpy().astype(np.float64)


def test_select_with_checkpoints_scores_with_the_weighted_sum_of_checkpoint_kernels(tiny_data, tiny_model_dir,
                                                                                   tmp_path):
    import json

    import pyarrow.parquet as pq

    from ntk_ray.io.feature_files import SPEC_KEY
    from ntk_ray.io.shards import list_shards, shards_frame

    out = tmp_path / "out"
    # a small token budget per step: several optimizer steps, so the checkpoints differ
    manifest, ranked = _select(tiny_data, tiny_model_dir, out, checkpoints=2, warmup_batch_tokens=24,
                               warmup_lr=5e-2)
    info = manifest["adapter"]["warmup"]["checkpoints"]
    steps = manifest["adapter"]["warmup"]["steps"]
    assert info["steps"] == [-(-steps // 2), steps] and info["weights"] == [0.5, 0.5] and steps >= 2
    work = out / "_work"
    ckpts = [work / "warmup" / "checkpoints" / str(i) for i in range(2)]
    keys, x, anchors = _kept_features(out)
    assert x.shape[1] == 2 * 64 and anchors.shape[1] == 2 * 64
    spec = json.loads(pq.ParquetFile(list_shards(str(work / "features"))[0]).schema_arrow.metadata[SPEC_KEY])
    assert spec["checkpoints"] == 2 and spec["checkpoint_weights"] == [0.5, 0.5]
    anchor_keys = shards_frame([str(work / "anchor_features" / "anchors.parquet")], ["key"])["key"].to_list()
    per = []
    for ckpt in ckpts:
        xi = _features_under(ckpt, tiny_model_dir, str(work / "tokens" / "pool"), keys.tolist(), 64)
        ai = _features_under(ckpt, tiny_model_dir, str(work / "tokens" / "domain"), anchor_keys, 64)
        per.append(xi @ ai.T)
    assert not np.allclose(per[0], per[1], rtol=1e-3)  # the checkpoints really differ
    want = 0.5 * per[0] + 0.5 * per[1]
    np.testing.assert_allclose(x @ anchors.T, want, rtol=2e-3, atol=1e-5 * np.abs(want).max())
    # the ranking is the cosine of the combined kernel
    cos = (x @ anchors.T) / np.linalg.norm(x, axis=1)[:, None] / np.linalg.norm(anchors, axis=1)[None, :]
    by_key = dict(zip(keys.tolist(), cos.mean(axis=1)))
    id_of = dict(zip(*[shards_frame(list_shards(str(work / "features")), ["key", "id"])[c].to_list()
                       for c in ("key", "id")]))
    top = sorted(by_key, key=lambda k: -by_key[k])[:5]
    assert set(ranked.filter(pl.col("selected"))["id"].to_list()) == {id_of[k] for k in top}


# ---- centred kernels ---------------------------------------------------------------------------

@pytest.mark.parametrize("scorer", ["mean", "cosine", "max", "max-cosine"])
def test_centred_kernel_equals_the_kernel_of_shifted_vectors(scorer):
    from ntk_ray.core.scoring import AnchorKernel

    rng = np.random.default_rng(1)
    x = rng.normal(size=(70, 12)).astype(np.float32) + 3.0  # a large shared component
    anchors = rng.normal(size=(5, 12)).astype(np.float32) + 3.0
    c = x.astype(np.float64).mean(axis=0)
    got = AnchorKernel(anchors, center=c).score(x, scorer)
    xs, as_ = x.astype(np.float64) - c, anchors.astype(np.float64) - c
    k = as_ @ xs.T
    if scorer in ("cosine", "max-cosine"):
        k = k / np.linalg.norm(as_, axis=1)[:, None] / np.linalg.norm(xs, axis=1)[None, :]
    want = k.mean(axis=0) if scorer in ("mean", "cosine") else k.max(axis=0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    block = AnchorKernel(anchors, center=c).kernel_block(x, unit=True)
    np.testing.assert_allclose(block, (as_ / np.linalg.norm(as_, axis=1)[:, None]) @ (xs / np.linalg.norm(xs, axis=1)[:, None]).T,
                               rtol=1e-6, atol=1e-9)
    # without a centre: the raw kernel (the shared component makes every cosine near 1)
    assert AnchorKernel(anchors).score(x, "cosine").min() > 0.8 > np.abs(AnchorKernel(anchors, center=c).score(x, "cosine")).max()

