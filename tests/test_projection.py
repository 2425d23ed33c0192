"""The CountSketch projector (``projection.SketchProjector``) on its own: its documented hash,
determinism, unbiasedness and JL-type error against the dense projection."""

import hashlib
import math

import numpy as np
import pytest
import torch

from ntk_ray.core.projection import (PROJECTORS, DenseProjector, ModuleShape, SketchProjector, make_projector,
                                sketch_hashes)

SHAPES = [ModuleShape("layers.0.q.lora_A", 4, 24), ModuleShape("layers.0.q.lora_B", 24, 4),
          ModuleShape("layers.1.v.lora_A", 4, 24), ModuleShape("layers.1.v.lora_B", 12, 4)]


def random_grads(n: int, seed: int, shapes=SHAPES) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, s.out_features, s.in_features, generator=g) for s in shapes]


def test_sketch_hashes_are_the_documented_bit_stream():
    """The hash must not change between versions (feature files are keyed on it): one PCG64 word
    w per parameter, bucket = ((w >> 32) * d) >> 32, sign = 1 - 2 * (w & 1)."""
    for n, d, seed, name in [(1, 1, 0, "a"), (100, 7, 1, "b"), (5000, 8192, 2**40 + 3, "sketch/x.lora_A")]:
        digest = hashlib.blake2b(name.encode(), digest_size=16).digest()
        words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
        seq = np.random.SeedSequence([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, *words])
        raw = [int(w) for w in np.random.PCG64(seq).random_raw(n)]
        bucket, sign = sketch_hashes(n, d, seed, name)
        assert bucket.dtype == np.int64 and sign.dtype == np.float32
        assert bucket.tolist() == [((w >> 32) * d) >> 32 for w in raw]  # exact integer arithmetic
        assert sign.tolist() == [1.0 - 2.0 * (w & 1) for w in raw]
        assert bucket.min() >= 0 and bucket.max() < d
    # roughly uniform buckets and balanced signs
    bucket, sign = sketch_hashes(200_000, 64, 0, "uniform")
    counts = np.bincount(bucket, minlength=64)
    assert counts.min() > 0.9 * 200_000 / 64 and counts.max() < 1.1 * 200_000 / 64
    assert abs(sign.mean()) < 0.01


def test_make_projector_knows_sketch_and_spec_identifies_it():
    assert "sketch" in PROJECTORS
    p = make_projector("sketch", SHAPES, 64, seed=5)
    assert isinstance(p, SketchProjector) and p.dim == 64
    spec = p.spec()
    assert spec["type"] == "sketch" and spec["dim"] == 64 and spec["seed"] == 5
    assert spec["version"] == SketchProjector.version
    assert spec["grad_dim"] == sum(s.numel for s in SHAPES)
    assert spec["modules"] == [[s.name, s.out_features, s.in_features] for s in SHAPES]
    assert spec != make_projector("sketch", SHAPES, 64, seed=6).spec()
    with pytest.raises(ValueError):
        make_projector("sketch", SHAPES, 0, seed=0)


def test_sketch_is_the_documented_linear_map():
    """psi = sum_m sum_j s_m(j) g_{m,j} e_{h_m(j)}, written out with numpy."""
    grads = random_grads(3, seed=1)
    p = SketchProjector(SHAPES, 16, seed=9)
    expected = np.zeros((3, 16))
    for m, g in zip(SHAPES, grads):
        bucket, sign = sketch_hashes(m.numel, 16, 9, f"sketch/{m.name}")
        flat = g.reshape(3, -1).double().numpy()
        for j in range(m.numel):
            expected[:, bucket[j]] += sign[j] * flat[:, j]
    torch.testing.assert_close(p.project_full(grads), torch.from_numpy(expected).float(), rtol=1e-5, atol=1e-5)


def test_sketch_is_a_function_of_seed_and_module_names_only():
    grads = random_grads(4, seed=2)
    a = SketchProjector(SHAPES, 32, seed=11).project_full(grads)
    b = SketchProjector(SHAPES, 32, seed=11).project_full(grads)
    c = SketchProjector(SHAPES, 32, seed=12).project_full(grads)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # a module's hash does not depend on the others or their order
    reordered = SketchProjector(SHAPES[::-1], 32, seed=11).project_full(grads[::-1])
    torch.testing.assert_close(a, reordered, rtol=1e-6, atol=1e-6)
    one = SketchProjector(SHAPES[1:2], 32, seed=11)
    full_one = SketchProjector(SHAPES, 32, seed=11)
    assert torch.equal(one.hashes(0)[0], full_one.hashes(1)[0]) and torch.equal(one.hashes(0)[1], full_one.hashes(1)[1])


def test_sketch_accumulate_per_module_equals_project_full():
    grads = random_grads(5, seed=3)
    p = SketchProjector(SHAPES, 24, seed=0)
    acc = torch.zeros(5, 24)
    for index in reversed(range(len(SHAPES))):  # any order
        p.accumulate(index, grads[index], acc)
    torch.testing.assert_close(acc, p.project_full(grads), rtol=1e-6, atol=1e-6)


def test_sketch_inner_products_are_unbiased():
    """Averaged over many seeds, <Sa, Sb> -> <a, b> (standard error ~ sqrt(var / seeds))."""
    grads = random_grads(2, seed=4)
    flat = torch.cat([g.flatten(1) for g in grads], dim=1).double()
    exact = (flat[0] @ flat[1]).item()
    d, seeds = 16, 400
    vals = []
    for seed in range(seeds):
        psi = SketchProjector(SHAPES, d, seed).project_full(grads).double()
        vals.append((psi[0] @ psi[1]).item())
    a2, b2 = flat[0].pow(2).sum().item(), flat[1].pow(2).sum().item()
    var = (a2 * b2 + exact**2 - 2 * (flat[0] ** 2 * flat[1] ** 2).sum().item()) / d  # the CountSketch variance
    assert abs(np.var(vals) / var - 1) < 0.25  # the documented variance (= dense Rademacher's)
    assert abs(np.mean(vals) - exact) < 4 * math.sqrt(var / seeds)


def _rms_error(psi: torch.Tensor, exact: torch.Tensor) -> float:
    gram = exact @ exact.T
    norms = exact.norm(dim=1)
    rel = (psi.double() @ psi.double().T - gram) / torch.outer(norms, norms)
    off = ~torch.eye(exact.shape[0], dtype=torch.bool)
    return rel[off].pow(2).mean().sqrt().item()


def test_sketch_error_shrinks_with_d_and_matches_dense():
    """On structured LoRA-like gradients (one side r = 4, most energy in a few factors), the
    sketch's inner-product error shrinks with d, and at d = 1024 is within 2x of a dense
    Rademacher projection's on the same gradients (averaged over seeds)."""
    shapes = [ModuleShape(f"l{k}.{side}", *dims) for k in range(6)
              for side, dims in (("lora_A", (4, 96)), ("lora_B", (96, 4)))]
    g = torch.Generator().manual_seed(7)
    base = torch.randn(1, sum(s.numel for s in shapes), generator=g)
    exact = (0.6 * base + torch.randn(12, base.shape[1], generator=g)).double()  # correlated samples
    exact[:, : shapes[0].numel] *= 5  # uneven energy across factors
    sizes = [s.numel for s in shapes]
    grads = [x.reshape(-1, s.out_features, s.in_features).float() for x, s in zip(exact.split(sizes, dim=1), shapes)]
    err = {}
    for d in (64, 1024):
        err[("sketch", d)] = np.mean([_rms_error(SketchProjector(shapes, d, s).project_full(grads), exact) for s in range(4)])
        err[("dense", d)] = np.mean([_rms_error(DenseProjector(shapes, d, s).project_full(grads), exact) for s in range(4)])
    assert err[("sketch", 1024)] < 0.5 * err[("sketch", 64)], err  # ~ 1/sqrt(d): 4x smaller expected
    assert err[("sketch", 1024)] < 2 * err[("dense", 1024)], err
    assert err[("sketch", 64)] < 2 * err[("dense", 64)], err
    assert err[("sketch", 1024)] < 3 / math.sqrt(1024), err
