"""Fast paths of features.py against the slow one-sample-at-a-time reference."""

import math

import pytest
import torch

from conftest import build_tiny_lora_model, random_samples
from ntk_ray.core.features import FeatureComputer, backbone_and_head, lm_head_column_sum, pack_by_tokens, summed_logit_objective, pad_batch
from ntk_ray.reference import reference_gradients, reference_loss, reference_objective


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


@pytest.mark.parametrize("projector", ["kron", "sketch", "dense"])
def test_projected_features_equal_projected_reference(tiny_model, projector):
    seqs, masks = random_samples(6, seed=3)
    ref = reference_gradients(tiny_model, seqs, masks)
    fc = FeatureComputer(tiny_model, projector=projector, dim=64, seed=7)
    out = fc.features(seqs, masks, max_tokens=40)  # several batches, mixed lengths
    # the same projection applied to the reference's full gradients
    shapes = fc.shapes
    sizes = [s.numel for s in shapes]
    full = [g.reshape(-1, s.out_features, s.in_features) for g, s in zip(ref.split(sizes, dim=1), shapes)]
    expected = fc.projector.project_full(full)
    assert out.feature.shape == (6, fc.dim)
    torch.testing.assert_close(out.feature, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.norm, ref.norm(dim=1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("projector", ["kron", "sketch"])
def test_batch_composition_and_padding_do_not_change_features(tiny_model, projector):
    seqs, masks = random_samples(9, seed=4)
    fc = FeatureComputer(tiny_model, projector=projector, dim=48, seed=1)
    together = fc.features(seqs, masks, max_tokens=10_000).feature
    alone = torch.cat([fc.features([s], [m]).feature for s, m in zip(seqs, masks)])
    reordered = fc.features(seqs[::-1], masks[::-1], max_tokens=30).feature.flip(0)
    # Other batches sum the same per-token terms in another float32 order (and with other
    # thread splits). A coordinate of psi is a signed sum of many terms that can cancel to
    # near zero, so the error is bounded by the size of the terms, not of the result: about
    # n_terms * 2^-24 * max|term| <= 64 * 2^-24 * max|psi| for these <= 17-token rows (a fixed
    # 1e-6 failed at 1.5e-6 on a coordinate of 1.7e-4, with max|psi| = 9.6: bound 3.7e-5).
    atol = 64 * 2**-24 * float(together.abs().max())
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=atol)
    torch.testing.assert_close(together, reordered, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("projector", ["kron", "sketch"])
def test_projection_is_a_function_of_seed_only(tiny_model, projector):
    seqs, masks = random_samples(3, seed=5)
    a = FeatureComputer(tiny_model, projector=projector, dim=48, seed=11).features(seqs, masks).feature
    b = FeatureComputer(tiny_model, projector=projector, dim=48, seed=11).features(seqs, masks).feature
    c = FeatureComputer(tiny_model, projector=projector, dim=48, seed=12).features(seqs, masks).feature
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("objective", ["summed-logits", "loss"])
def test_jvp_mean_scores_equal_mean_of_exact_inner_products(tiny_model, objective):
    anchors, anchor_masks = random_samples(5, seed=6)
    pool, pool_masks = random_samples(8, seed=7)
    fc = FeatureComputer(tiny_model, projector="none", objective=objective)
    g_bar = fc.mean_gradient(anchors, anchor_masks, max_tokens=30)
    fast = fc.mean_scores_jvp(pool, pool_masks, g_bar, max_tokens=30)
    ref_pool = reference_gradients(tiny_model, pool, pool_masks, objective=objective)
    ref_anchor = reference_gradients(tiny_model, anchors, anchor_masks, objective=objective)
    expected = (ref_pool @ ref_anchor.T).mean(dim=1)
    torch.testing.assert_close(fast, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("projector", ["kron", "sketch", "dense"])
def test_projected_inner_products_track_exact_within_jl_error(projector):
    """n = 12 samples, P = 1,792 LoRA parameters. Bounds, stated at d = 1024 where they mean
    something (a projector that returned unrelated or zero features has relative errors ~1):
    max |<Pa,Pb> - <a,b>| / (|a||b|) < 4 sqrt(log(n^2) / d) = 0.279 (JL with a generous c = 4;
    at d = 64 this was 1.11, which no error can exceed); for the JL-type projectors (sketch,
    dense) also rms < 2 sqrt(2 / d) = 0.088 (a +-1/sqrt(d) projection has rms about
    sqrt((1 + cos^2) / d) <= sqrt(2 / d)). kron degenerates on LoRA factors (README: its error
    barely falls with d), so only the max bound applies to it. Measured (seeds 0-2): max 0.06-0.10
    (sketch, dense), 0.25-0.37 (kron; seed 0: 0.256); rms 0.024-0.047 (sketch, dense)."""
    model = build_tiny_lora_model(seed=3)
    seqs, masks = random_samples(12, seed=8)
    exact = reference_gradients(model, seqs, masks)
    assert exact.shape == (12, 1792)
    exact_gram = exact @ exact.T
    norms = exact.norm(dim=1)
    errors = {}
    for d in (256, 1024):
        fc = FeatureComputer(model, projector=projector, dim=d, seed=0)
        psi = fc.features(seqs, masks).feature
        assert psi.shape == (12, d)
        rel = (psi @ psi.T - exact_gram) / torch.outer(norms, norms)
        errors[d] = (rel.abs().max().item(), rel.pow(2).mean().sqrt().item())
    max_err, rms_err = errors[1024]
    assert max_err < 4 * math.sqrt(math.log(12 * 12) / 1024), (projector, errors)  # 0.279
    if projector != "kron":
        assert rms_err < 2 * math.sqrt(2 / 1024), (projector, errors)  # 0.088
    assert errors[1024][0] < errors[256][0]


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
    from ntk_ray.core.projection import KronProjector

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
    from ntk_ray.core.features import pack_tight

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

    from ntk_ray.core.projection import rademacher_signs

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


# ---------------------------------------------------------------------------------------------
# options of the LESS baseline: objective="loss" and gradient_transform
def _split_full(flat: torch.Tensor, shapes) -> list[torch.Tensor]:
    sizes = [s.numel for s in shapes]
    return [g.reshape(-1, s.out_features, s.in_features) for g, s in zip(flat.split(sizes, dim=1), shapes)]


def test_loss_objective_features_equal_reference_loss_gradients():
    """objective="loss": per-sample gradients of each sample's mean token loss (loss-mask
    targets, logits[t-1] predict x_t), against plain autograd one sample at a time; an LM-head
    bias is included in the logits."""
    model = build_tiny_lora_model(lm_head_bias=True)
    seqs, masks = random_samples(7, seed=12)
    masks[0] = [0] * len(masks[0])  # no targets at all: L = 0, zero gradient
    masks[1] = [1] + [0] * (len(masks[1]) - 1)  # only position 0 set: predicts nothing, no targets
    ref = reference_gradients(model, seqs, masks, objective="loss")
    fc = FeatureComputer(model, projector="none", objective="loss")
    out = fc.features(seqs, masks, max_tokens=40)  # several batches, mixed lengths, padding
    torch.testing.assert_close(out.feature, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.norm, ref.norm(dim=1), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        losses = torch.stack([reference_loss(model, s, m) for s, m in zip(seqs, masks)])
    torch.testing.assert_close(out.objective, losses, rtol=1e-5, atol=1e-5)
    assert torch.all(ref[:2] == 0) and torch.all(out.feature[:2] == 0)


def test_loss_objective_matches_training_batch_loss(tiny_model):
    """The per-sample losses weighted by their target counts sum to ``training.batch_loss``."""
    from ntk_ray.core.training import batch_loss

    seqs, masks = random_samples(6, seed=13)
    ids, attn, mask = pad_batch(seqs, masks)
    fc = FeatureComputer(tiny_model, projector="none", objective="loss")
    with torch.no_grad():
        per_sample = fc.objective(ids, attn, mask)
        total, count = batch_loss(tiny_model, ids, attn, mask)
    torch.testing.assert_close((per_sample * mask[:, 1:].sum(dim=1)).sum(), total, rtol=1e-5, atol=1e-5)


def test_loss_objective_chunks_equal_one_chunk(tiny_model):
    """Chunked (checkpointed) target logits give the same loss and gradients as one chunk."""
    from ntk_ray.core.features import causal_lm_loss_objective

    seqs, masks = random_samples(5, seed=14)
    ids, attn, mask = pad_batch(seqs, masks)
    fc = FeatureComputer(tiny_model, projector="none", objective="loss")
    params = fc.params
    results = []
    for chunk in (3, 10_000):
        hidden = fc.backbone(input_ids=ids, attention_mask=attn).last_hidden_state
        loss = causal_lm_loss_objective(hidden, ids, mask, fc.head.weight, None, chunk_rows=chunk)
        results.append((loss.detach(), torch.autograd.grad(loss.sum(), params)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _fixed_transform(shapes, seed=0):
    """g -> g * c + g^2 with a fixed random c per module (elementwise, nonlinear)."""
    g = torch.Generator().manual_seed(seed)
    coef = [torch.randn(s.out_features, s.in_features, generator=g) for s in shapes]
    calls = []

    def transform(index, grad):
        assert grad.dtype == torch.float32 and grad.shape[1:] == coef[index].shape
        calls.append(index)
        return grad * coef[index].to(grad.device) + grad**2

    return transform, calls


@pytest.mark.parametrize("objective", ["summed-logits", "loss"])
@pytest.mark.parametrize("projector", ["none", "sketch", "dense", "kron"])
def test_gradient_transform_features_equal_transformed_reference(tiny_model, projector, objective):
    seqs, masks = random_samples(6, seed=15)
    ref = reference_gradients(tiny_model, seqs, masks, objective=objective)
    fc = FeatureComputer(tiny_model, projector=projector, dim=64, seed=3, objective=objective)
    transform, calls = _fixed_transform(fc.shapes)
    fc.gradient_transform = transform
    out = fc.features(seqs, masks, max_tokens=40)
    assert sorted(set(calls)) == list(range(len(fc.shapes)))
    transformed = [transform(i, g) for i, g in enumerate(_split_full(ref, fc.shapes))]
    expected = fc.projector.project_full(transformed)
    torch.testing.assert_close(out.feature, expected, rtol=1e-4, atol=1e-5)
    # the norm is the transformed gradient's
    norm = torch.cat([t.flatten(1) for t in transformed], dim=1).norm(dim=1)
    torch.testing.assert_close(out.norm, norm, rtol=1e-4, atol=1e-5)
    # constructor argument, same result
    again = FeatureComputer(tiny_model, projector=projector, dim=64, seed=3, objective=objective,
                            gradient_transform=_fixed_transform(fc.shapes)[0]).features(seqs, masks, max_tokens=40)
    torch.testing.assert_close(again.feature, out.feature, rtol=1e-6, atol=1e-7)


def test_gradient_transform_reaches_modules_without_gradient():
    """Zero per-sample gradients still go through the transform (LESS's Adam preconditioning of
    a zero gradient is not zero): lora_A factors behind a zero lora_B (their gradient is zero),
    and a module whose backward hook delivers nothing (the zero-gradient fallback)."""
    model = build_tiny_lora_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()
    seqs, masks = random_samples(3, seed=16)
    fc = FeatureComputer(model, projector="none")
    shift = [torch.full((s.out_features, s.in_features), float(i + 1)) for i, s in enumerate(fc.shapes)]
    fc.gradient_transform = lambda index, g: g + shift[index]
    active = fc.capture.active

    def dropping(on_backward, token_mask):  # module 0's hook result is lost: the fallback path
        return active(lambda index, a, g: None if index == 0 else on_backward(index, a, g), token_mask)

    fc.capture.active = dropping
    out = fc.features(seqs, masks)
    ref = reference_gradients(model, seqs, masks)
    assert torch.all(ref[:, : fc.shapes[0].numel] == 0)  # module 0 is a lora_A: zero gradient anyway
    expected = torch.cat([(g + sh).flatten(1) for g, sh in zip(_split_full(ref, fc.shapes), shift)], dim=1)
    torch.testing.assert_close(out.feature, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.norm, expected.norm(dim=1), rtol=1e-4, atol=1e-5)


def test_gradient_transform_and_objective_errors(tiny_model):
    seqs, masks = random_samples(2, seed=17)
    with pytest.raises(ValueError, match="unknown objective"):
        FeatureComputer(tiny_model, projector="none", objective="logits")
    bad = FeatureComputer(tiny_model, projector="sketch", dim=16, gradient_transform=lambda i, g: g.flatten(1))
    with pytest.raises(ValueError, match="gradient's shape"):
        bad.features(seqs, masks)
    fc = FeatureComputer(tiny_model, projector="none", gradient_transform=lambda i, g: g)
    with pytest.raises(ValueError, match="gradient_transform"):
        fc.mean_gradient(seqs, masks)
    with pytest.raises(ValueError, match="gradient_transform"):
        fc.mean_scores_jvp(seqs, masks, [torch.zeros_like(p) for p in fc.params])


def test_sketch_builds_one_module_gradient_at_a_time(tiny_model):
    """The sketch route projects each module's per-sample gradient inside the backward hook: the
    hook's result is a placeholder, never the (B, out, in) gradient, so no list of all modules'
    gradients is built."""
    seqs, masks = random_samples(4, seed=18)
    fc = FeatureComputer(tiny_model, projector="sketch", dim=32)
    sizes = []
    original = fc.projector.accumulate

    def spy(index, g, out):
        sizes.append(g.numel())
        return original(index, g, out)

    fc.projector.accumulate = spy
    ids, attn, mask = pad_batch(seqs, masks)
    results = []
    on_exit = fc.capture.active

    def recording(on_backward, token_mask):
        def wrapped(index, inputs, out_grads):
            r = on_backward(index, inputs, out_grads)
            results.append(r.numel())
            return r
        return on_exit(wrapped, token_mask)

    fc.capture.active = recording
    fc.features_padded(ids, attn, mask)
    assert len(sizes) == len(fc.shapes) and results and max(results) == 0
