"""Every projector against an explicit projection matrix built here, independently of the
projector's code: psi(x) = P g(x) with g(x) from ``reference.reference_gradients`` (one sample
at a time, full logits, plain autograd) and P written out from its documented definition:

* none: the identity;
* dense: R^T / sqrt(d), R (grad_dim x d) of +-1 from ``rademacher_matrix`` in row blocks of 8192
  keyed ``dense/<d>/block<j>`` (the model below has 12288 LoRA parameters: two blocks);
* sketch: the CountSketch matrix, one +-1 per column, s_m(j) at row h_m(j), from
  ``sketch_hashes(p_m, d, seed, "sketch/<name>")``, columns in row-major (out, in) order;
* kron: block-diagonal over modules of P_o (x) P_i (row-major vec(P_o G P_i^T) = (P_o (x) P_i)
  vec(G)), each side +-1 from ``rademacher_matrix`` keyed ``kron/<name>/out|in/<k>`` and scaled
  by 1/sqrt(k), the identity where the side is kept whole; k_o, k_i are the projector's
  (``factor_dims``).

Tolerance, per sample: ||psi - P g_ref||_2 <= eps ||P||_2 ||g_ref||_2 with eps = 2e-5. Both
sides compute g in float32 (unit roundoff u = 2^-24 = 6.0e-8) in different orders (batched,
padded, per-token sums g_t a_t^T vs one sample through autograd). A float32 product of inner
length n has normwise error ~ sqrt(n) u (probabilistic rounding-error bound, Higham & Mary 2019;
the worst case n u is ~ 10x larger at these sizes); the inner lengths here are <= 128 (T <= 17
tokens, hidden 32, MLP 64, vocabulary 97), so <= 11 u = 7e-7 per product, and the longest chain
of the backward (3 layers, ~4 products per layer) has about 12: <= 8e-6 for g. The projection
adds a sum of up to grad_dim = 12288 terms: sqrt(12288) u = 7e-6, relative to ||P|| ||g||.
Together ~1.5e-5 -> eps = 2e-5. A wrong P (a sign, a bucket, a scale) gives O(1) relative error.
(Observed: <= 6e-7.) P is applied in float64 to the float32 reference gradient."""

import math

import pytest
import torch

from conftest import random_samples
from ntk_ray.core.features import FeatureComputer
from ntk_ray.core.projection import rademacher_matrix, sketch_hashes
from ntk_ray.reference import reference_gradients

EPS = 2e-5
SEED = 5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def model():
    """3-layer random Llama, LoRA r = 8 on every linear: 84 factors, 12288 parameters."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    m = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))
    for name, p in m.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    return m.eval()


@pytest.fixture(scope="module")
def samples():
    return random_samples(6, seed=21)


@pytest.fixture(scope="module")
def reference(model, samples):
    return {obj: reference_gradients(model, *samples, objective=obj).double() for obj in ("summed-logits", "loss")}


def dense_matrix(grad_dim: int, d: int) -> torch.Tensor:
    blocks = [rademacher_matrix(min(8192, grad_dim - start), d, SEED, f"dense/{d}/block{j}")
              for j, start in enumerate(range(0, grad_dim, 8192))]
    return torch.cat(blocks).double().T / math.sqrt(d)


def sketch_matrix(shapes, d: int) -> torch.Tensor:
    p = torch.zeros(d, sum(s.numel for s in shapes), dtype=torch.float64)
    offset = 0
    for s in shapes:
        bucket, sign = sketch_hashes(s.numel, d, SEED, f"sketch/{s.name}")
        p[torch.from_numpy(bucket), offset + torch.arange(s.numel)] = torch.from_numpy(sign).double()
        offset += s.numel
    return p


def kron_matrix(shapes, factors) -> torch.Tensor:
    def side(k, size, name):
        if k == size:
            return torch.eye(size, dtype=torch.float64)
        return rademacher_matrix(k, size, SEED, name).double() / math.sqrt(k)

    blocks = [torch.kron(side(k_o, s.out_features, f"kron/{s.name}/out/{k_o}"), side(k_i, s.in_features, f"kron/{s.name}/in/{k_i}"))
              for s, (k_o, k_i) in zip(shapes, factors)]
    return torch.block_diag(*blocks)


def operator_norm(p: torch.Tensor, iterations: int = 60) -> float:
    """||P||_2 by power iteration on P^T P (converges from below; +1% margin): a few
    matrix-vector products where an SVD of a 640 x 12288 matrix takes seconds."""
    x = torch.randn(p.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for _ in range(iterations):
        x = p.T @ (p @ x)
        x = x / x.norm()
    return 1.01 * (p @ x).norm().item()


def assert_projects(feature: torch.Tensor, p: torch.Tensor | None, g: torch.Tensor) -> None:
    """||psi - P g|| <= EPS ||P||_2 ||g|| per sample (P None: the identity, ||P||_2 = 1)."""
    expected = g if p is None else g @ p.T
    op_norm = 1.0 if p is None else operator_norm(p)
    err = (feature.double() - expected).norm(dim=1)
    bound = EPS * op_norm * g.norm(dim=1)
    assert torch.all(err <= bound), (err / (op_norm * g.norm(dim=1))).max().item()


@pytest.mark.parametrize("objective", ["summed-logits", "loss"])
@pytest.mark.parametrize("projector", ["none", "sketch", "dense", "kron"])
def test_features_equal_explicit_projection_of_reference_gradients(model, samples, reference, projector, objective):
    g = reference[objective]
    for d in ((64,) if projector == "none" else (64, 640)):
        fc = FeatureComputer(model, projector=projector, dim=d, seed=SEED, objective=objective)
        out = fc.features(*samples, max_tokens=40)  # several batches, mixed lengths, padding
        shapes = fc.shapes
        grad_dim = sum(s.numel for s in shapes)
        assert grad_dim == g.shape[1] == 12288
        if projector == "none":
            p = None
        elif projector == "dense":
            p = dense_matrix(grad_dim, d)
        elif projector == "sketch":
            p = sketch_matrix(shapes, d)
        else:
            p = kron_matrix(shapes, fc.projector.factors)
        assert out.feature.shape == (len(samples[0]), grad_dim if p is None else p.shape[0]) and fc.dim == out.feature.shape[1]
        assert_projects(out.feature, p, g)
        torch.testing.assert_close(out.norm.double(), g.norm(dim=1), rtol=EPS, atol=0)
