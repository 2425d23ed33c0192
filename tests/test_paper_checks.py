"""benchmarks/paper_checks.py: the H-dim factorisation of the exact multi-output NTK against the
brute-force sum over the vocabulary, the Hutchinson tail estimate, the rank statistics, and a
smoke run of all three sections on a random tiny Llama."""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import build_tiny_lora_model, random_samples

ROOT = Path(__file__).resolve().parents[1]


def _load():
    if "paper_checks" in sys.modules:
        return sys.modules["paper_checks"]
    spec = importlib.util.spec_from_file_location("paper_checks", ROOT / "benchmarks" / "paper_checks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["paper_checks"] = module
    spec.loader.exec_module(module)
    return module


def _rows(pc, seqs, masks):
    return pc.Rows(seqs=seqs, score=masks, loss=[[0] + m[:-1] for m in masks], domain=[False] * len(seqs))


def brute_force_kernel(model, seqs, masks) -> np.ndarray:
    """sum_v <grad F_v(x), grad F_v(a)>, F_v(x) = mean over x's score positions of logit[t, v]:
    the full V x P Jacobian of every sample, one backward per vocabulary entry, logits from the
    model's own forward (LM head and its bias included)."""
    from ntk_ray.core.features import trainable_linears

    params = [m.weight for _, m in trainable_linears(model)]
    jacobians = []
    for s, m in zip(seqs, masks):
        logits = model(input_ids=torch.as_tensor([s])).logits[0].double()  # (T, V)
        w = torch.as_tensor(m, dtype=torch.float64)
        f = (logits * w[:, None]).sum(0) / w.sum()  # (V,)
        rows = []
        for v in range(f.shape[0]):
            grads = torch.autograd.grad(f[v], params, retain_graph=True)
            rows.append(torch.cat([g.flatten() for g in grads]).double())
        jacobians.append(torch.stack(rows))  # (V, P)
    n = len(jacobians)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            out[i, j] = float((jacobians[i] * jacobians[j]).sum())
    return out


@pytest.mark.parametrize("bias", [False, True])
def test_factorisation_equals_brute_force_vocabulary_sum(bias):
    pc = _load()
    model = build_tiny_lora_model(seed=3, lm_head_bias=bias, vocab=41)  # V > H = 32: W^T W full rank
    seqs, masks = random_samples(4, vocab=41, max_len=9, seed=11)
    parts = pc.exact_kernel_parts(model, _rows(pc, seqs, masks), top=10_000, probes=0, seed=0)
    assert parts["top"] == 32 and not parts["tail_grams"]  # H = 32 directions, no estimate
    factorised = pc.assemble(parts)
    brute = brute_force_kernel(model, seqs, masks)
    assert np.abs(brute).max() > 0
    np.testing.assert_allclose(factorised, brute, rtol=2e-4, atol=1e-6 * np.abs(brute).max())
    # the JF kernel: the Gram of the reference (full-logit, one-sample-at-a-time) gradients
    from ntk_ray.reference import reference_gradients

    ref = reference_gradients(model, seqs, masks).double()
    np.testing.assert_allclose(parts["jf"], (ref @ ref.T).numpy(), rtol=2e-4, atol=1e-6 * float((ref @ ref.T).abs().max()))
    # and the two differ: the JF kernel is not the exact one (else the check above proves little)
    assert not np.allclose(parts["jf"] / np.linalg.norm(parts["jf"]), brute / np.linalg.norm(brute), rtol=1e-2)


def test_truncation_and_tail_estimate():
    pc = _load()
    model = build_tiny_lora_model(seed=1)
    seqs, masks = random_samples(6, max_len=9, seed=5)
    rows = _rows(pc, seqs, masks)
    full = pc.exact_kernel_parts(model, rows, top=32, probes=0, seed=0)
    exact = pc.assemble(full)
    truncated = dict(full, top=4, top_grams=full["top_grams"][:4])
    # the top directions alone are a strict part of the kernel (the tail is PSD and non-zero)
    gap = exact - pc.assemble(truncated)
    assert np.linalg.eigvalsh(gap).min() > -1e-6 * np.abs(exact).max()
    assert np.trace(gap) > 0.1 * np.trace(exact)
    # top 4 exact + Rademacher probes of the tail: close to the exact kernel, closer with more probes
    parts = pc.exact_kernel_parts(model, rows, top=4, probes=96, seed=0)
    assert len(parts["tail_grams"]) == 96
    np.testing.assert_allclose(np.sum(parts["top_grams"], axis=0), pc.assemble(truncated), rtol=1e-6)
    err = [np.linalg.norm(pc.assemble(parts, np.arange(n)) - exact) / np.linalg.norm(exact) for n in (4, 96)]
    print("tail estimate relative error with 4 / 96 probes:", err)
    assert err[1] < 0.1, err
    assert err[1] < err[0], err


def test_rank_statistics():
    pc = _load()
    np.testing.assert_allclose(pc.rankdata([3.0, 1.0, 3.0, 2.0]), [2.5, 0.0, 2.5, 1.0])
    assert pc.spearman([1, 2, 3, 4], [10, 20, 35, 100]) == pytest.approx(1.0)
    assert pc.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert pc.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pc.topk_overlap([5, 4, 3, 2, 1], [1, 4, 5, 2, 0], 2) == pytest.approx(0.5)
    a = np.array([[2.0, 1.0], [1.0, 3.0]])
    assert pc.frobenius_cosine(a, 2 * a) == pytest.approx(1.0)
    g = torch.randn(5, 70_000)
    np.testing.assert_allclose(pc.gram64(g, chunk=1 << 12), (g.double() @ g.double().T).numpy(), rtol=1e-5, atol=1e-3)


def test_gram64_accumulates_in_float64_where_float32_loses_the_small_terms():
    """Two rows whose large products cancel across chunks (+2^28 in chunk A, -2^28 in chunk B)
    with small ones in between (chunk C: 4096 x 1/16 = 256): the exact off-diagonal entry is 256.
    A float32 accumulation over the whole row adds the 1/16s to a running sum near 2^24..2^28,
    where they round away; gram64 sums each chunk's (exact, powers-of-two) float32 product in
    float64 and gets 256 exactly. The input is checked to separate the two."""
    pc = _load()
    chunk = 1 << 12
    big = torch.full((chunk,), 2.0 ** 8)
    small = torch.full((chunk,), 0.25)
    g = torch.stack([torch.cat([big, small, big]), torch.cat([big, small, -big])])  # chunks A, C, B
    exact = (g.double() @ g.double().T).numpy()
    assert exact[0, 1] == 256.0
    tolerance = dict(rtol=1e-9, atol=1e-6)
    float32 = (g @ g.T).double().numpy()
    assert not np.allclose(float32, exact, **tolerance), float32  # float32 accumulation fails this tolerance
    assert abs(float32[0, 1] - 256.0) > 1.0, float32
    np.testing.assert_allclose(pc.gram64(g, chunk=chunk), exact, **tolerance)


def _table_numbers(text: str) -> list[float]:
    values = []
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            for cell in line.strip("|").split("|"):
                m = re.match(r"\s*([+-]?\d+(?:\.\d+)?(?:e[+-]?\d+)?)\s*(?:±|\[|$)", cell)
                if m:
                    values.append(float(m.group(1)))
    return values


def test_smoke_all_sections_tiny_model(tmp_path):
    pc = _load()
    out = tmp_path / "paper_checks.md"
    assert pc.main(["--tiny", "--smoke", "--out", str(out)]) == 0
    md = out.read_text()
    assert md.startswith("# The paper's own checks")
    assert "- command: `.venv/bin/python benchmarks/paper_checks.py --tiny --smoke --out " in md
    for title in ("## 1. Kernel stability", "## 2. Jacobian-free vs exact", "## 3. Projection vs d"):
        assert title in md
    assert "nan" not in md.lower()
    numbers = _table_numbers(md)
    assert numbers and all(math.isfinite(v) for v in numbers)
    # the built-in consistency checks of sections 2 and 3 hold
    assert float(re.search(r"`FeatureComputer\(projector='none'\)`: relative difference (\d+(?:\.\d+)?(?:e[+-]\d+)?)", md).group(1)) < 1e-4
    assert float(re.search(r"per-sample gradients: relative difference (\d+(?:\.\d+)?(?:e[+-]\d+)?)", md).group(1)) < 1e-4
    assert float(re.search(r"vs `mean_gradient`: (\d+(?:\.\d+)?(?:e[+-]\d+)?)", md).group(1)) < 1e-4
    for value in re.findall(r"(?:kron|sketch) d=\d+: (\d+(?:\.\d+)?(?:e[+-]\d+)?)", md):
        assert float(value) < 1e-4
    # section 1: a (checkpoints x checkpoints) Frobenius-cosine matrix with unit diagonal
    block = md.split("Frobenius cosine between all checkpoints:")[1].split("##")[0]
    rows = [line for line in block.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == 3  # --smoke: 2 epochs -> checkpoints 0, 1, 2
    for i, line in enumerate(rows):
        cells = [float(c) for c in line.strip("|").split("|")[1:]]
        assert cells[i] == pytest.approx(1.0)
        assert all(-1.0 - 1e-9 <= c <= 1.0 + 1e-9 for c in cells)
    # section 3: one row per projector and d
    table = md.split("## 3. Projection vs d")[1]
    for kind in ("kron", "dense"):
        assert re.search(rf"\| 64 \| {kind} \|", table) and re.search(rf"\| 256 \| {kind} \|", table)
