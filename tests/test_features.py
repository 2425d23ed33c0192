"""Fast paths of features.py against the slow one-sample-at-a-time reference."""

import math

import pytest
import torch

from conftest import build_tiny_lora_model, random_samples
from ntk_ray.features import FeatureComputer, backbone_and_head, lm_head_column_sum, pack_by_tokens, summed_logit_objective, pad_batch
from ntk_ray.reference import reference_gradients, reference_objective


def test_lm_head_column_sum_equals_naive_logit_sum():
    model = build_tiny_lora_model(lm_head_bias=True)
    backbone, head = backbone_and_head(model)
    seqs, masks = random_samples(5, seed=1)
    ids, attn, mask = pad_batch(seqs, masks)
    with torch.no_grad():
        hidden = backbone(input_ids=ids, attention_mask=attn).last_hidden_state
        w_sum, b_sum = lm_head_column_sum(head)
        fast = summed_logit_objective(hidden, mask, w_sum, b_sum)
        naive = torch.stack([reference_objective(model, s, m) for s, m in zip(seqs, masks)])
    torch.testing.assert_close(fast, naive, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")])
def test_unprojected_features_equal_reference(targets):
    model = build_tiny_lora_model(targets=targets)
    seqs, masks = random_samples(7, seed=2)
    ref = reference_gradients(model, seqs, masks)
    fc = FeatureComputer(model, projector="none")
    out = fc.features(seqs, masks, max_tokens=40)  # several batches, mixed lengths
    torch.testing.assert_close(out.feature, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.norm, ref.norm(dim=1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("projector", ["kron", "dense"])
def test_projected_features_equal_projected_reference(tiny_model, projector):
    seqs, masks = random_samples(6, seed=3)
    ref = reference_gradients(tiny_model, seqs, masks)
    fc = FeatureComputer(tiny_model, projector=projector, dim=64, seed=7)
    out = fc.features(seqs, masks)
    # the same projection applied to the reference's full gradients
    shapes = fc.shapes
    sizes = [s.numel for s in shapes]
    full = [g.reshape(-1, s.out_features, s.in_features) for g, s in zip(ref.split(sizes, dim=1), shapes)]
    expected = fc.projector.project_full(full)
    assert out.feature.shape == (6, fc.dim)
    torch.testing.assert_close(out.feature, expected, rtol=1e-4, atol=1e-5)


def test_batch_composition_and_padding_do_not_change_features(tiny_model):
    seqs, masks = random_samples(9, seed=4)
    fc = FeatureComputer(tiny_model, projector="kron", dim=48, seed=1)
    together = fc.features(seqs, masks, max_tokens=10_000).feature
    alone = torch.cat([fc.features([s], [m]).feature for s, m in zip(seqs, masks)])
    reordered = fc.features(seqs[::-1], masks[::-1], max_tokens=30).feature.flip(0)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(together, reordered, rtol=1e-4, atol=1e-6)


def test_projection_is_a_function_of_seed_only(tiny_model):
    seqs, masks = random_samples(3, seed=5)
    a = FeatureComputer(tiny_model, projector="kron", dim=48, seed=11).features(seqs, masks).feature
    b = FeatureComputer(tiny_model, projector="kron", dim=48, seed=11).features(seqs, masks).feature
    c = FeatureComputer(tiny_model, projector="kron", dim=48, seed=12).features(seqs, masks).feature
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_jvp_mean_scores_equal_mean_of_exact_inner_products(tiny_model):
    anchors, anchor_masks = random_samples(5, seed=6)
    pool, pool_masks = random_samples(8, seed=7)
    fc = FeatureComputer(tiny_model, projector="none")
    g_bar = fc.mean_gradient(anchors, anchor_masks, max_tokens=30)
    fast = fc.mean_scores_jvp(pool, pool_masks, g_bar, max_tokens=30)
    ref_pool = reference_gradients(tiny_model, pool, pool_masks)
    ref_anchor = reference_gradients(tiny_model, anchors, anchor_masks)
    expected = (ref_pool @ ref_anchor.T).mean(dim=1)
    torch.testing.assert_close(fast, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("projector", ["kron", "dense"])
def test_projected_inner_products_track_exact_within_jl_error(projector):
    model = build_tiny_lora_model(seed=3)
    seqs, masks = random_samples(12, seed=8)
    exact = reference_gradients(model, seqs, masks)
    exact_gram = exact @ exact.T
    norms = exact.norm(dim=1)
    errors = {}
    for d in (64, 1024):
        fc = FeatureComputer(model, projector=projector, dim=d, seed=0)
        psi = fc.features(seqs, masks).feature
        rel = (psi @ psi.T - exact_gram) / torch.outer(norms, norms)
        errors[d] = rel.abs().max().item()
        # JL: |<Pa,Pb> - <a,b>| <= eps |a||b| with eps ~ c * sqrt(log(n) / d); c = 4 is generous
        assert errors[d] < 4 * math.sqrt(math.log(12 * 12) / fc.dim), (d, errors[d])
    assert errors[1024] < errors[64]


def test_pack_by_tokens_respects_budget_and_covers_every_row():
    lengths = [5, 50, 3, 3, 20, 7, 100, 1]
    batches = pack_by_tokens(lengths, max_tokens=60)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 60


@pytest.mark.parametrize("route", ["tokens", "full"])
@pytest.mark.parametrize("compute_norm", [True, False])
def test_kron_routes_equal_projected_reference(tiny_model, route, compute_norm):
    """Both exact routes of KronProjector.project_module (token-side projection with the Gram
    norm, or the per-sample gradient then P_o G P_i^T) against the projected reference."""
    from ntk_ray.projection import KronProjector

    seqs, masks = random_samples(7, seed=9)
    ref = reference_gradients(tiny_model, seqs, masks)
    fc = FeatureComputer(tiny_model, projector="kron", dim=40, seed=5, compute_norm=compute_norm)
    calls = []

    def forced(index, out_grads, inputs, want_norm=False):
        calls.append(index)
        return KronProjector.project_module(fc.projector, index, out_grads, inputs, want_norm, route=route)

    fc.projector.project_module = forced
    out = fc.features(seqs, masks, max_tokens=50)  # several batches with padding
    assert calls
    sizes = [s.numel for s in fc.shapes]
    full = [g.reshape(-1, s.out_features, s.in_features) for g, s in zip(ref.split(sizes, dim=1), fc.shapes)]
    torch.testing.assert_close(out.feature, fc.projector.project_full(full), rtol=1e-4, atol=1e-5)
    if compute_norm:
        torch.testing.assert_close(out.norm, ref.norm(dim=1), rtol=1e-4, atol=1e-5)
    else:
        assert torch.all(out.norm == 0)


def test_features_leave_lora_weight_grads_alone(tiny_model):
    """The feature backward differentiates w.r.t. module outputs: no .grad is written."""
    seqs, masks = random_samples(3, seed=10)
    params = [p for p in tiny_model.parameters() if p.requires_grad]
    assert all(p.grad is None for p in params)
    FeatureComputer(tiny_model, projector="kron", dim=32).features(seqs, masks)
    assert all(p.grad is None for p in params)


def test_lora_outside_the_decoder_is_an_error():
    model = build_tiny_lora_model(targets=("q_proj", "lm_head"))
    seqs, masks = random_samples(2, seed=11)
    with pytest.raises(ValueError, match="not used by the decoder"):
        FeatureComputer(model, projector="kron", dim=32).features(seqs, masks)


def test_pack_tight_covers_rows_within_budget_and_pads_no_more():
    from ntk_ray.features import pack_tight

    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = int(torch.randint(1, 120, (1,), generator=g))
        lengths = torch.randint(1, 130, (n,), generator=g).tolist()
        budget = int(torch.randint(100, 3000, (1,), generator=g))
        for max_rows in (256, 7):
            batches = pack_tight(lengths, budget, max_rows=max_rows)
            assert sorted(i for b in batches for i in b) == list(range(n))
            for b in batches:
                assert len(b) <= max_rows
                assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= budget
            assert batches == pack_tight(lengths, budget, max_rows=max_rows)  # deterministic

            def padded(bs):
                return sum(max(lengths[i] for i in b) * len(b) for b in bs)

            old = pack_by_tokens(lengths, budget, max_rows=max_rows)
            cost = max(budget // 32, 1)
            assert padded(batches) + cost * len(batches) <= padded(old) + cost * len(old)
    assert pack_tight([], 100) == []


def test_rademacher_signs_are_the_documented_bit_stream():
    """The sign generator must not change between versions (the projection is keyed on it):
    bit j of byte k of the PCG64 raw stream (little-endian) gives sign 8k + j = 1 - 2 * bit."""
    import hashlib

    import numpy as np

    from ntk_ray.projection import rademacher_signs

    for n, seed, name in [(1, 0, "a"), (63, 1, "b"), (64, 2, "c"), (1000, 2**40 + 3, "kron/x/in/7")]:
        digest = hashlib.blake2b(name.encode(), digest_size=16).digest()
        words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
        seq = np.random.SeedSequence([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, *words])
        raw = np.random.PCG64(seq).random_raw((n + 63) // 64).astype("<u8")
        bits = np.unpackbits(raw.view(np.uint8), bitorder="little")[:n]
        expected = (1.0 - 2.0 * bits).astype(np.float32)
        got = rademacher_signs(n, seed, name)
        assert got.dtype == np.float32 and got.shape == (n,)
        assert np.array_equal(got, expected)
