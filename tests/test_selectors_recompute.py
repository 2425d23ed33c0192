"""The model selectors end to end (tiny model, in-process executor), each checked against an
independent recomputation from what the run saved, not against the code that produced it:

* embedding (RDS+): the adapter the warm-up saved, loaded with peft; every row's embedding is
  the mean of the final hidden states of one unpadded forward pass; the round-robin picks and
  the best-cosine scores are recomputed with plain numpy loops.
* less: with ``--projector none`` (exact gradients), each pool row's loss gradient by plain
  autograd, Adam-preconditioned by hand from the saved moments file, and its max cosine to the
  anchors' plain loss gradients.
* ntk with ``--scorer round-robin``: the picks from plain per-anchor sorts of the kernel rows
  of the kept features.
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from ntk_ray.config import SelectConfig
from ntk_ray.runner import run_select
from ntk_ray.runtime.local import LocalExecutor

BUDGET = 5


def _run(data, out, model, **options):
    cfg = SelectConfig(domain=[str(data / "domain.jsonl")], pool=[str(data / "pool.jsonl")], budget=BUDGET,
                       out=str(out), model=str(model), max_length=32, proj_dim=64, warmup_epochs=2.0,
                       warmup_lr=1e-2, batch_tokens=256, **options)
    manifest = run_select(cfg, executor=LocalExecutor(device="cpu"))
    ranked = pl.read_parquet(out / "ranked.parquet")
    assert ranked.height == manifest["counts"]["ranked"] == 30 and manifest["counts"]["rejected"] == 0
    assert ranked["rank"].to_list() == list(range(1, 31)) and ranked["selected"].sum() == BUDGET
    return ranked, manifest


def _tokens(out, role) -> pl.DataFrame:
    files = sorted((out / "_work" / "tokens" / role).glob("*.parquet"))
    return pl.concat([pl.read_parquet(f) for f in files]).filter(pl.col("reject").is_null()).sort("key")


def _adapted(model_dir, adapter_dir, trainable=False):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable).eval()


def _round_robin(sims: np.ndarray, keys: np.ndarray, budget: int) -> list[int]:
    """Anchors take turns; each picks its best row not yet picked at its current rank (sorted
    by similarity desc, key asc), skipping a turn when that row is taken (the documented rule)."""
    orders = [sorted(range(len(keys)), key=lambda j: (-sims[a, j], keys[j])) for a in range(len(sims))]
    picked: list[int] = []
    for rank in range(len(keys)):
        for order in orders:
            key = int(keys[order[rank]])
            if key not in picked:
                picked.append(key)
                if len(picked) == budget:
                    return picked
    return picked


def test_embedding_selector_matches_a_plain_recomputation(tiny_data, tiny_model_dir, tmp_path):
    out = tmp_path / "emb"
    ranked, manifest = _run(tiny_data, out, tiny_model_dir, selector="embedding")
    assert set(ranked["stage"]) == {"embedding"} and manifest["adapter"] is not None
    model = _adapted(tiny_model_dir, out / "_work" / "warmup" / "adapter")

    def embed(rows: pl.DataFrame) -> np.ndarray:
        vecs = []
        with torch.no_grad():
            for ids in rows["input_ids"].to_list():
                hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
                v = hidden.mean(0).double().numpy()
                vecs.append(v / np.linalg.norm(v))
        return np.stack(vecs)

    pool, domain = _tokens(out, "pool"), _tokens(out, "domain")
    x, a = embed(pool), embed(domain)
    sims = a @ x.T  # cosines, float64
    keys = pool["key"].to_numpy()
    by_key = dict(zip(pool["key"].to_list(), pool["id"].to_list()))
    # the picks: round robin over the anchors (float32-level agreement is enough to order them)
    picks = [by_key[k] for k in _round_robin(sims, keys, BUDGET)]
    assert ranked["id"].head(BUDGET).to_list() == picks
    # every score is the row's best cosine to any anchor
    best = dict(zip(pool["id"].to_list(), sims.max(axis=0)))
    got = dict(zip(ranked["id"].to_list(), ranked["score"].to_list()))
    np.testing.assert_allclose([got[i] for i in best], list(best.values()), rtol=0, atol=2e-6)
    # after the picks, the rest by best cosine
    rest = ranked["score"].to_list()[BUDGET:]
    assert rest == sorted(rest, reverse=True)


def test_less_selector_matches_hand_preconditioned_gradients(tiny_data, tiny_model_dir, tmp_path):
    from ntk_ray.core.features import trainable_linears
    from ntk_ray.reference import reference_gradient

    out = tmp_path / "less"
    ranked, _ = _run(tiny_data, out, tiny_model_dir, selector="less", projector="none")
    assert set(ranked["stage"]) == {"less"}
    model = _adapted(tiny_model_dir, out / "_work" / "warmup" / "adapter", trainable=True)
    saved = torch.load(out / "_work" / "warmup" / "adam_moments.pt", weights_only=True)
    b1, b2 = saved["betas"]
    step, eps = saved["step"], saved["eps"]
    # the moments, keyed by parameter name, in the order reference_gradient flattens the LoRA weights
    names = [f"{name}.weight" for name, _ in trainable_linears(model)]
    assert sorted(names) == sorted(saved["exp_avg"])
    m = torch.cat([saved["exp_avg"][n].flatten() for n in names]).double()
    v = torch.cat([saved["exp_avg_sq"][n].flatten() for n in names]).double()

    def gamma(g):
        g = g.double()
        m_hat = (b1 * m + (1 - b1) * g) / (1 - b1 ** (step + 1))
        v_hat = (b2 * v + (1 - b2) * g * g) / (1 - b2 ** (step + 1))
        return m_hat / (v_hat.sqrt() + eps)

    pool, domain = _tokens(out, "pool"), _tokens(out, "domain")
    anchors = torch.stack([reference_gradient(model, ids, mask, "loss").double()
                           for ids, mask in zip(domain["input_ids"].to_list(), domain["loss_mask"].to_list())])
    rows = torch.stack([gamma(reference_gradient(model, ids, mask, "loss"))
                        for ids, mask in zip(pool["input_ids"].to_list(), pool["loss_mask"].to_list())])
    unit = lambda t: t / t.norm(dim=1, keepdim=True)  # noqa: E731
    expected = (unit(rows) @ unit(anchors).T).max(dim=1).values.numpy()
    got = dict(zip(ranked["id"].to_list(), ranked["score"].to_list()))
    np.testing.assert_allclose([got[i] for i in pool["id"].to_list()], expected, rtol=0, atol=1e-4)
    # the check can tell: without the preconditioning the scores are far from the product's
    plain = torch.stack([reference_gradient(model, ids, mask, "loss").double()
                         for ids, mask in zip(pool["input_ids"].to_list(), pool["loss_mask"].to_list())])
    unconditioned = (unit(plain) @ unit(anchors).T).max(dim=1).values.numpy()
    assert np.abs(unconditioned - expected).max() > 1e-2
    assert ranked["id"].head(BUDGET).to_list() == [pool["id"][int(j)] for j in np.lexsort((pool["key"].to_numpy(), -expected))[:BUDGET]]


def test_ntk_round_robin_scorer_end_to_end(tiny_data, tiny_model_dir, tmp_path):
    from ntk_ray.io.shards import read_vectors

    out = tmp_path / "rr"
    ranked, manifest = _run(tiny_data, out, tiny_model_dir, scorer="round-robin", keep_features=True, coarse_factor=2)
    ntk = ranked.filter(pl.col("stage") == "ntk")
    assert ntk.height == 2 * BUDGET and manifest["config"]["scorer"] == "round-robin"
    tables = [read_vectors(str(f), "feature", ("key", "id")) for f in sorted((out / "_work" / "features").glob("*.parquet"))]
    keys = np.concatenate([t.column("key").to_numpy() for t, _ in tables])
    ids = [i for t, _ in tables for i in t.column("id").to_pylist()]
    x = np.concatenate([v for _, v in tables]).astype(np.float64)
    anchors = read_vectors(str(out / "_work" / "anchor_features" / "anchors.parquet"), "feature", ("id",))[1].astype(np.float64)
    sims = (anchors / np.linalg.norm(anchors, axis=1, keepdims=True)) @ (x / np.linalg.norm(x, axis=1, keepdims=True)).T
    by_key = dict(zip(keys.tolist(), ids))
    assert ntk["id"].head(BUDGET).to_list() == [by_key[k] for k in _round_robin(sims, keys, BUDGET)]
    assert json.loads((out / "manifest.json").read_text())["counts"]["selected"] == BUDGET


@pytest.mark.parametrize("scorer", ["mean", "max"])
def test_ntk_scorers_rank_by_their_plain_formula(tiny_data, tiny_model_dir, tmp_path, scorer):
    from ntk_ray.io.shards import read_vectors

    out = tmp_path / scorer
    ranked, _ = _run(tiny_data, out, tiny_model_dir, scorer=scorer, keep_features=True, coarse_factor=2)
    tables = [read_vectors(str(f), "feature", ("id",)) for f in sorted((out / "_work" / "features").glob("*.parquet"))]
    ids = [i for t, _ in tables for i in t.column("id").to_pylist()]
    x = np.concatenate([v for _, v in tables]).astype(np.float64)
    anchors = read_vectors(str(out / "_work" / "anchor_features" / "anchors.parquet"), "feature", ("id",))[1].astype(np.float64)
    k = anchors @ x.T
    expected = k.mean(axis=0) if scorer == "mean" else k.max(axis=0)
    got = dict(zip(ranked["id"].to_list(), ranked["score"].to_list()))
    np.testing.assert_allclose([got[i] for i in ids], expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("objective", ["summed-logits", "loss"])
def test_ntk_features_are_the_saved_adapters_gradients(tiny_data, tiny_model_dir, tmp_path, objective):
    """With ``--projector none`` the kept pool features and the anchors are exactly the gradients
    of the objective (``--objective``: the summed logits over the score mask, or the mean loss
    over the loss mask) under the warmed-up adapter: recomputed one row at a time by plain
    autograd over the full vocabulary (``reference.reference_gradient``)."""
    from ntk_ray.io.shards import read_vectors
    from ntk_ray.reference import reference_gradient

    out = tmp_path / "exact"
    _, manifest = _run(tiny_data, out, tiny_model_dir, projector="none", keep_features=True, coarse_factor=2,
                       objective=objective)
    assert manifest["projector"]["type"] == "none"
    model = _adapted(tiny_model_dir, out / "_work" / "warmup" / "adapter", trainable=True)
    mask_column = "loss_mask" if objective == "loss" else "score_mask"
    for role, path in (("pool", sorted((out / "_work" / "features").glob("*.parquet"))),
                       ("domain", [out / "_work" / "anchor_features" / "anchors.parquet"])):
        tokens = _tokens(out, role)
        rows = {i: (ids, mask) for i, ids, mask in zip(tokens["id"], tokens["input_ids"], tokens[mask_column])}
        for f in path:
            table, x = read_vectors(str(f), "feature", ("id",))
            for i, feature in zip(table.column("id").to_pylist(), x):
                g = reference_gradient(model, *rows[i], objective).numpy()
                np.testing.assert_allclose(feature, g, rtol=1e-4, atol=1e-5 * np.abs(g).max())
