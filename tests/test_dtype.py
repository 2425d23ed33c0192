"""``--dtype``: bfloat16 against float32 on the tiny Llama (CPU: torch runs bfloat16 there too).

What a bfloat16 model changes, measured on the tiny random Llama of ``conftest.tiny_model_dir``
with one float32 LoRA adapter loaded on both bases (B non-zero, so every factor has gradient),
80 random rows of 4-24 tokens (16 anchors, 64 pool rows), the sketch projector at d = 256 and
the cosine scorer. Measured when this test was written (CPU, torch 2.13), bfloat16 vs float32:

    objective       min feature cosine   max |norm| rel. error   Spearman of scores   top-16 overlap
    summed-logits   0.99931              3.5e-2                  0.99995              16 / 16
    loss (LESS)     0.99953              2.8e-2                  0.99968              16 / 16

The test asserts bounds about 3x looser than measured (cosine > 0.998, norm error < 0.1,
Spearman > 0.99, top-16 overlap >= 14), so other torch versions' bfloat16 kernels pass. For
scale: the same comparison with float16 instead of bfloat16 gives a min cosine of 0.999994, and
with the LoRA weights wrongly cast down to bfloat16 as well 0.9989 (vs 0.9996 without, on the
same rows).

The rule the code keeps (``core/features.py``, ``models/lora.py``): the base model runs in
--dtype; LoRA weights, gradients, projections and norms are float32; kernel sums float64.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ntk_ray.core.features import FeatureComputer
from ntk_ray.core.scoring import AnchorKernel
from ntk_ray.models import (
    ModelError,
    attach_lora,
    load_adapter,
    load_model,
    resolve_dtype,
    torch_dtype,
)

N_ANCHORS, N_POOL, TOP = 16, 64, 16


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") == "float32"  # auto is float32 on CPU
    for name in ("bfloat16", "float16", "float32"):
        assert resolve_dtype(name, "cpu") == name and resolve_dtype(name, "cuda") == name  # concrete: as given
    assert resolve_dtype(torch.bfloat16, "cpu") == "bfloat16"
    assert torch_dtype("auto", "cpu") is torch.float32 and torch_dtype("bfloat16") is torch.bfloat16
    if not torch.cuda.is_available():
        assert resolve_dtype("auto", "cuda") == "float32"  # no GPU here: nothing to run bfloat16 on natively
    with pytest.raises(ModelError, match="--dtype"):
        resolve_dtype("half", "cpu")


def _rows(vocab: int, n: int, seed: int = 0):
    g = np.random.default_rng(seed)
    seqs, masks = [], []
    for _ in range(n):
        length = int(g.integers(4, 25))
        seqs.append(g.integers(3, vocab, size=length).tolist())
        start = int(g.integers(1, length - 1))
        masks.append([0] * start + [1] * (length - start))
    return seqs, masks


@pytest.fixture(scope="module")
def shared_adapter(tiny_model_dir, tmp_path_factory):
    """One float32 adapter (seeded A, B drawn non-zero) saved to disk, to load on either base."""
    model = attach_lora(load_model(str(tiny_model_dir), dtype="float32"), r=4, alpha=8, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def features(tiny_model_dir, shared_adapter):
    """{(dtype, objective): FeatureBatch} of the same rows, adapter and projection."""
    seqs, masks = _rows(46, N_ANCHORS + N_POOL)
    out = {}
    for dtype in ("float32", "bfloat16"):
        model = load_adapter(load_model(str(tiny_model_dir), dtype=dtype), shared_adapter)
        base = {p.dtype for p in model.parameters() if not p.requires_grad}
        lora = {p.dtype for p in model.parameters() if p.requires_grad}
        assert base == {torch_dtype(dtype)} and lora == {torch.float32}  # base in --dtype, LoRA float32
        for objective in ("summed-logits", "loss"):
            computer = FeatureComputer(model, projector="sketch", dim=256, seed=3, objective=objective)
            out[dtype, objective] = computer.features(seqs, masks, max_tokens=512)
    return out


def _spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.mark.parametrize("objective", ["summed-logits", "loss"])
def test_bfloat16_features_and_ranking_match_float32(features, objective):
    f32, b16 = features["float32", objective], features["bfloat16", objective]
    assert b16.feature.dtype == torch.float32 and b16.norm.dtype == torch.float32  # accumulated in float32
    cos = torch.nn.functional.cosine_similarity(b16.feature, f32.feature, dim=1)
    norm_rel = ((b16.norm - f32.norm).abs() / f32.norm).max().item()
    scores = {}
    for name, out in (("f32", f32), ("b16", b16)):
        feats = out.feature.numpy()
        scores[name] = AnchorKernel(feats[:N_ANCHORS]).score(feats[N_ANCHORS:], "cosine")
    rho = _spearman(scores["f32"], scores["b16"])
    top = [set(np.argsort(-scores[name], kind="stable")[:TOP].tolist()) for name in ("f32", "b16")]
    overlap = len(top[0] & top[1])
    print(f"{objective}: min cosine {cos.min():.6f}, max norm rel err {norm_rel:.2e}, Spearman {rho:.5f}, "
          f"top-{TOP} overlap {overlap}")
    assert cos.min().item() > 0.998
    assert norm_rel < 0.1
    assert rho > 0.99
    assert overlap >= TOP - 2
    # and bfloat16 really ran: the features are not float32's bit for bit
    assert not torch.equal(b16.feature, f32.feature)
