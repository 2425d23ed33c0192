"""Baseline selectors (plain numpy/torch, no model, no Ray): random, embedding (RDS+), LESS, BM25."""

from __future__ import annotations

import copy
import math
from collections import Counter

import numpy as np
import polars as pl
import pytest
import torch

from ntk_ray.core.lexical import BM25Stats, bm25_scores, bm25_stats, merge_bm25_stats
from ntk_ray.core.scoring import AnchorTopK, round_robin_order
from ntk_ray.core.selectors import SELECTORS, adam_gradient_transform, random_scores
from ntk_ray.reference import bm25_text_scores, embedding_selection, embedding_shard, less_scores
from ntk_ray.core.training import adam_moments


def test_selector_names():
    assert SELECTORS == ("ntk", "random", "embedding", "less", "bm25")


# ----------------------------------------------------------------------------------------------
# random


def test_random_scores_are_a_pure_function_of_seed_and_key():
    rng = np.random.default_rng(0)
    keys = rng.integers(-2**63, 2**63 - 1, size=5000, dtype=np.int64)
    full = random_scores(keys, seed=3)
    assert full.dtype == np.float64 and full.shape == keys.shape
    assert (full >= 0).all() and (full < 1).all()
    # any order and any sharding of the pool gives each key the same value
    perm = rng.permutation(len(keys))
    np.testing.assert_array_equal(random_scores(keys[perm], seed=3), full[perm])
    shards = np.array_split(np.arange(len(keys)), [1, 17, 2000, 2001])
    np.testing.assert_array_equal(np.concatenate([random_scores(keys[s], 3) for s in shards]), full)
    # pinned values: the same seed gives the same ranking in every version and on every machine
    pinned = random_scores(np.array([0, 1, -1, 2**62], dtype=np.int64), 0)
    assert pinned.tolist() == pytest.approx(PINNED, abs=0, rel=0)


PINNED = [0.91970127789074, 0.5385560528693344, 0.5098029187193889, 0.5829538716714575]


def test_random_scores_depend_on_the_seed_and_look_uniform():
    keys = np.arange(100_000, dtype=np.int64)  # consecutive keys: the worst case for a weak hash
    a, b = random_scores(keys, 0), random_scores(keys, 1)
    assert not np.array_equal(a, b)
    assert abs(np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1]) < 0.02
    for s in (a, b):
        counts = np.histogram(s, bins=20, range=(0, 1))[0]
        assert counts.min() > 4500 and counts.max() < 5500  # ~5000 per bin
        assert len(np.unique(s)) == len(s)
    # a large seed and a negative seed work and differ
    assert not np.array_equal(random_scores(keys[:10], -1), random_scores(keys[:10], 2**64 - 1 - 5))
    assert np.array_equal(random_scores(keys[:10], -1), random_scores(keys[:10], 2**64 - 1))  # modulo 2^64


def test_random_scores_reject_non_integer_keys():
    with pytest.raises(ValueError):
        random_scores(np.array([0.5, 1.5]), 0)
    with pytest.raises(ValueError):
        random_scores(np.zeros((2, 2), dtype=np.int64), 0)
    assert random_scores(np.zeros(0, dtype=np.int64), 0).shape == (0,)


# ----------------------------------------------------------------------------------------------
# embedding (RDS+)


def brute_round_robin(pool, anchors, keys, budget):
    """Full cosine matrix in float64; each anchor's whole pool sorted by (cos desc, key asc); in
    round r every anchor in turn takes its r-th row unless already taken."""
    def unit(x):
        x = np.asarray(x, dtype=np.float64)
        n = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.where(n > 0, n, 1)
    cos = unit(anchors) @ unit(pool).T
    ranked = [keys[np.lexsort((keys, -row))] for row in cos]
    picked, seen = [], set()
    for r in range(len(keys)):
        for lst in ranked:
            if len(picked) < budget and lst[r] not in seen:
                seen.add(lst[r])
                picked.append(int(lst[r]))
    return cos.max(axis=0), picked


def tied_embeddings(n_pool, n_anchors, seed):
    """Rows with four +-1 entries in dim 8 (norm 2): every cosine is a multiple of 1/4, exact in
    float32, and rows repeat, so ties are everywhere. One all-zero pool row (cosine 0)."""
    rng = np.random.default_rng(seed)

    def rows(n):
        x = np.zeros((n, 8), dtype=np.float32)
        for i in range(n):
            x[i, rng.choice(8, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
        return x
    pool = rows(n_pool)
    pool[n_pool // 2] = 0
    return pool, rows(n_anchors)


def test_round_robin_semantics_on_a_small_hand_example():
    # one-hot pool rows (keys 10..13): anchor 0 prefers 10 > 11 > 12 > 13, anchor 1 10 > 13 > 12 > 11.
    # Round 0: anchor 0 takes 10, anchor 1's first choice is taken (it loses the turn); round 1:
    # 11, 13; round 2: anchor 0 takes 12
    pool = np.eye(4, dtype=np.float32)
    anchors = np.array([[4, 3, 2, 1], [4, 1, 2, 3]], dtype=np.float32)
    keys = np.array([10, 11, 12, 13])
    scores, order = embedding_selection(pool, anchors, keys, 10)
    assert order.tolist() == [10, 11, 13, 12]
    assert embedding_selection(pool, anchors, keys, 3)[1].tolist() == [10, 11, 13]
    unit = anchors / np.linalg.norm(anchors, axis=1, keepdims=True)
    np.testing.assert_allclose(scores, unit.max(axis=0), rtol=1e-6)


@pytest.mark.parametrize("budget", [1, 3, 8, 40, 59, 60, 100])
def test_embedding_selection_equals_brute_force_round_robin_with_ties(budget):
    pool, anchors = tied_embeddings(60, 5, seed=budget)
    keys = np.random.default_rng(budget).permutation(1000)[:60].astype(np.int64) - 500
    scores, order = embedding_selection(pool, anchors, keys, budget)
    want_scores, want_order = brute_round_robin(pool, anchors, keys, budget)
    assert order.dtype == np.int64 and len(order) == min(budget, len(keys))
    assert order.tolist() == want_order
    np.testing.assert_array_equal(scores, want_scores)  # exact: cosines are multiples of 1/4
    assert scores.dtype == np.float64
    assert len(set(order.tolist())) == len(order)


def test_embedding_selection_on_continuous_embeddings():
    rng = np.random.default_rng(7)
    pool = rng.normal(size=(300, 16)).astype(np.float32)
    anchors = rng.normal(size=(9, 16)).astype(np.float32)
    keys = rng.permutation(300).astype(np.int64)
    for budget in (1, 25, 300):
        scores, order = embedding_selection(pool, anchors, keys, budget)
        want_scores, want_order = brute_round_robin(pool, anchors, keys, budget)
        assert order.tolist() == want_order
        np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shards", [[60], [30, 30], [1, 2, 3, 54], [7] * 8 + [4], [1] * 60])
def test_embedding_shards_merge_to_the_unsharded_result(shards):
    pool, anchors = tied_embeddings(60, 6, seed=11)
    keys = np.arange(60, dtype=np.int64)[::-1] * 3
    budget = 13
    want_scores, want_order = embedding_selection(pool, anchors, keys, budget)
    bounds = np.cumsum([0] + shards)
    parts = [embedding_shard(pool[s:e], anchors, keys[s:e], budget) for s, e in zip(bounds[:-1], bounds[1:])]
    merged = AnchorTopK(len(anchors), budget)
    for _, topk in reversed(parts):  # merge order does not matter either
        merged.merge(topk)
    assert round_robin_order(merged, budget) == want_order.tolist()
    np.testing.assert_array_equal(np.concatenate([s for s, _ in parts]), want_scores)


def test_embedding_selection_edge_cases():
    pool, anchors = tied_embeddings(10, 2, seed=0)
    keys = np.arange(10, dtype=np.int64)
    scores, order = embedding_selection(pool, anchors, keys, 0)
    assert order.shape == (0,) and scores.shape == (10,)
    scores, order = embedding_selection(pool[:0], anchors, keys[:0], 5)
    assert order.shape == (0,) and scores.shape == (0,)
    with pytest.raises(ValueError):
        embedding_selection(pool, anchors[:, :4], keys, 3)
    with pytest.raises(ValueError):
        embedding_selection(pool, anchors, keys[:5], 3)
    with pytest.raises(ValueError):
        embedding_selection(pool, anchors[:0], keys, 3)
    bad = pool.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        embedding_selection(bad, anchors, keys, 3)


# ----------------------------------------------------------------------------------------------
# LESS


def _toy_problem(seed=0):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(2, 3))]
    return params


@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("steps", [0, 1, 4])
def test_adam_transform_is_the_direction_of_the_next_adam_step(opt_cls, steps):
    params = _toy_problem()
    betas, eps = (0.8, 0.95), 1e-3  # far from the defaults, so a hard-coded beta would show
    opt = opt_cls(params, lr=1.0, betas=betas, eps=eps, **({"weight_decay": 0.0} if opt_cls is torch.optim.AdamW else {}))
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    moments = adam_moments(opt, params, ["w1", "w2"])
    assert moments.step == steps and moments.betas == betas and moments.eps == eps
    transform = adam_gradient_transform(moments.exp_avg, moments.exp_avg_sq, moments.step, moments.betas, moments.eps)
    for index, p in enumerate(params):
        per_sample = torch.randn((3, *p.shape), generator=g) * torch.tensor([1.0, 1e-3, 10.0])[:, None, None]
        got = transform(index, per_sample)
        assert got.shape == per_sample.shape and got.dtype == per_sample.dtype
        for b in range(3):
            trial_params = [q.detach().clone().requires_grad_(True) for q in params]
            trial = opt_cls(trial_params, lr=1.0, betas=betas, eps=eps)
            state = copy.deepcopy(opt.state_dict())
            trial.load_state_dict(state)
            for q, src in zip(trial_params, params):
                q.grad = torch.zeros_like(q)
            trial_params[index].grad = per_sample[b].clone()
            before = trial_params[index].detach().clone()
            trial.step()
            direction = before - trial_params[index].detach()
            torch.testing.assert_close(got[b], direction, rtol=1e-5, atol=1e-6)


def test_adam_transform_equals_the_formula_by_hand():
    m_t = [torch.tensor([[0.1, -0.2]]), torch.tensor([[0.0]])]
    v_t = [torch.tensor([[0.01, 0.04]]), torch.tensor([[0.0]])]
    transform = adam_gradient_transform(m_t, v_t, step=2, betas=(0.9, 0.99), eps=1e-8)
    g = torch.tensor([[[0.5, 1.0]], [[-1.0, 0.0]]], dtype=torch.float64)
    got = transform(0, g)
    assert got.dtype == torch.float64
    for b in range(2):
        for j in range(2):
            gj = float(g[b, 0, j])
            m = 0.9 * float(m_t[0][0, j]) + 0.1 * gj
            v = 0.99 * float(v_t[0][0, j]) + 0.01 * gj * gj
            want = (m / (1 - 0.9 ** 3)) / (math.sqrt(v / (1 - 0.99 ** 3)) + 1e-8)
            assert float(got[b, 0, j]) == pytest.approx(want, rel=1e-6)
    # zero moments, zero gradient: 0 / (0 + eps) = 0, never NaN
    assert float(transform(1, torch.zeros(4, 1, 1)).abs().max()) == 0.0
    with pytest.raises(ValueError, match="shape"):
        transform(0, torch.zeros(2, 2, 1))
    with pytest.raises(IndexError):
        transform(2, torch.zeros(1, 1, 1))
    with pytest.raises(ValueError):
        adam_gradient_transform(m_t, v_t[:1], step=0)


def brute_less(pool, anchors):
    out = []
    for x in np.asarray(pool, dtype=np.float64):
        best = -np.inf
        for a in np.asarray(anchors, dtype=np.float64):
            nx, na = np.linalg.norm(x), np.linalg.norm(a)
            best = max(best, 0.0 if nx == 0 or na == 0 else float(x @ a) / (nx * na))
        out.append(best)
    return np.array(out)


def test_less_scores_equal_brute_force_max_cosine():
    rng = np.random.default_rng(3)
    pool = rng.normal(size=(80, 32)).astype(np.float32) * rng.uniform(0.01, 100, size=(80, 1)).astype(np.float32)
    anchors = rng.normal(size=(11, 32)).astype(np.float32)
    pool[5] = 0
    pool[6] = anchors[3] * 7  # cosine 1 with anchor 3
    got = less_scores(pool, anchors)
    assert got.dtype == np.float64 and got.shape == (80,)
    np.testing.assert_allclose(got, brute_less(pool, anchors), rtol=1e-5, atol=1e-6)
    assert got[5] == 0 and got[6] == pytest.approx(1.0, abs=1e-6)
    # row-wise: shards score independently (up to float32 rounding of differently blocked matmuls)
    np.testing.assert_allclose(np.concatenate([less_scores(pool[:30], anchors), less_scores(pool[30:], anchors)]), got,
                               rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError):
        less_scores(pool[:, :8], anchors)
    with pytest.raises(ValueError):
        less_scores(pool, anchors[:0])


# ----------------------------------------------------------------------------------------------
# BM25


def brute_bm25(docs, queries, k1=1.5, b=0.75):
    n = len(docs)
    df = Counter(t for d in docs for t in set(d))
    avgdl = sum(len(d) for d in docs) / n
    out = []
    for x in docs:
        tf = Counter(x)
        total = 0.0
        for q in queries:
            s = 0.0
            for t in q:  # every occurrence of a term in the query counts
                if tf[t] == 0:
                    continue
                idf = math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5))
                s += idf * tf[t] * (k1 + 1) / (tf[t] + k1 * (1 - b + b * len(x) / avgdl))
            total += s
        out.append(total / len(queries))
    return np.array(out)


def random_docs(n, vocab, seed, max_len=25):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, vocab, size=rng.integers(0, max_len)).tolist() for _ in range(n)]
    docs[3] = []
    return docs


@pytest.mark.parametrize("k1,b", [(1.5, 0.75), (0.9, 0.4), (2.0, 1.0), (1.2, 0.0)])
def test_bm25_equals_brute_force(k1, b):
    docs = random_docs(120, vocab=40, seed=1)
    queries = random_docs(9, vocab=50, seed=2)  # ids 40..49 never occur in the pool
    got = bm25_scores(docs, queries, bm25_stats(docs), k1=k1, b=b)
    assert got.dtype == np.float64 and got.shape == (120,)
    np.testing.assert_allclose(got, brute_bm25(docs, queries, k1, b), rtol=1e-12, atol=1e-12)
    assert got[3] == 0.0
    assert (got > 0).sum() > 100


@pytest.mark.parametrize("shards", [[120], [60, 60], [1, 2, 3, 114], [10] * 12, [0, 120, 0]])
def test_bm25_sharded_stats_merge_to_the_unsharded(shards):
    docs = random_docs(120, vocab=40, seed=4)
    queries = random_docs(5, vocab=40, seed=5)
    whole = bm25_stats(docs)
    bounds = np.cumsum([0] + shards)
    parts = [bm25_stats(docs[s:e]) for s, e in zip(bounds[:-1], bounds[1:])]
    merged = merge_bm25_stats(reversed(parts))
    assert isinstance(merged, BM25Stats)
    assert (merged.n_docs, merged.total_len) == (whole.n_docs, whole.total_len) == (120, sum(map(len, docs)))
    assert merged.df.equals(whole.df)
    assert merged.df.schema == pl.Schema({"term": pl.Int64, "df": pl.Int64})
    # each shard scored against the merged stats = the unsharded scores
    want = bm25_scores(docs, queries, whole)
    got = np.concatenate([bm25_scores(docs[s:e], queries, merged) for s, e in zip(bounds[:-1], bounds[1:])])
    np.testing.assert_array_equal(got, want)


def test_bm25_inputs_and_edge_cases():
    docs = [np.array([1, 2, 2], dtype=np.int32), [3], []]  # numpy rows are fine
    stats = bm25_stats(docs)
    assert stats.df.to_dict(as_series=False) == {"term": [1, 2, 3], "df": [1, 1, 1]}
    np.testing.assert_allclose(bm25_scores(docs, [[2, 9]], stats), brute_bm25([[1, 2, 2], [3], []], [[2, 9]]), rtol=1e-12)
    assert merge_bm25_stats([]).n_docs == 0
    assert bm25_scores([], [[1]], stats).shape == (0,)
    empty = bm25_stats([[], []])
    np.testing.assert_array_equal(bm25_scores([[], []], [[1]], empty), [0.0, 0.0])
    with pytest.raises(ValueError, match="query"):
        bm25_scores(docs, [], stats)
    with pytest.raises(ValueError):
        bm25_scores(docs, [[1]], stats, b=1.5)


def test_bm25_text_scores_use_the_same_core_on_words():
    pool = ["The heart pumps blood through the arteries.", "Stocks fell as bond yields rose.",
            "Blood pressure and heart rate rose.", "", "A court ruled on the contract dispute."]
    domain = ["heart disease and blood pressure", "Blood tests for the heart"]
    got = bm25_text_scores(pool, domain)
    words = lambda t: [w for w in "".join(c if c.isalnum() else " " for c in t.lower()).split()]  # noqa: E731
    vocab: dict[str, int] = {}
    ids = lambda ts: [[vocab.setdefault(w, len(vocab)) for w in words(t)] for t in ts]  # noqa: E731
    pool_ids, dom_ids = ids(pool), ids(domain)
    np.testing.assert_allclose(got, brute_bm25(pool_ids, dom_ids), rtol=1e-12)
    assert set(np.argsort(-got)[:2]) == {0, 2}
    assert got[3] == 0.0


def test_bm25_identical_rows_tie_exactly():
    docs = random_docs(50, vocab=300, seed=8, max_len=200)
    docs = docs + [list(reversed(d)) for d in docs]  # same multiset of terms, another order
    queries = random_docs(20, vocab=300, seed=9, max_len=100)
    got = bm25_scores(docs, queries, bm25_stats(docs))
    np.testing.assert_array_equal(got[:50], got[50:])
    np.testing.assert_array_equal(got, bm25_scores(docs, queries, bm25_stats(docs)))


def test_bm25_with_sparse_64_bit_term_ids():
    # ids over the whole int64 range (e.g. hashed words): the lexsort and binary-search paths
    base = random_docs(60, vocab=30, seed=12)
    big = np.random.default_rng(0).integers(-2**62, 2**62, size=40, dtype=np.int64)
    docs = [[int(big[t]) for t in d] for d in base]
    queries = [[int(big[t]) for t in q] for q in random_docs(4, vocab=40, seed=13)]
    got = bm25_scores(docs, queries, bm25_stats(docs))
    np.testing.assert_allclose(got, brute_bm25(docs, queries), rtol=1e-12, atol=1e-12)
    # relabelling the terms changes nothing but the order of each row's sum
    np.testing.assert_allclose(got, bm25_scores(base, random_docs(4, vocab=40, seed=13), bm25_stats(base)), rtol=1e-13)
