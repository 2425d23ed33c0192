"""Seeded random projections of per-sample LoRA gradients.

A projector maps the per-sample gradient g(x) (all LoRA factors, concatenated in module order)
to psi(x) = Pi g(x) in R^d with E[<Pi a, Pi b>] = <a, b> (Johnson-Lindenstrauss).

Every random sign is derived from ``(seed, name)`` through numpy's SeedSequence and the PCG64
bit stream, whose outputs numpy guarantees not to change between versions and which do not
depend on hardware, thread count or device. So the same seed gives the same Pi on a laptop, on
every GPU worker of a cluster, and next year.

Projectors (chosen by name from the registry ``PROJECTORS``, see ``make_projector``; the
default, of ``FeatureComputer`` and of ``config.py``, is ``sketch``):

* ``kron``: Kronecker-factored per module (LoGra-style). For a linear factor with
  weight W (out x in), per-sample gradient G_W = sum_t g_t a_t^T (g_t output gradient, a_t input
  activation of token t). With Rademacher P_o (k_o x out) and P_i (k_i x in), each scaled
  by 1/sqrt(its k) (a side kept whole is the identity), so 1/sqrt(k_o k_i) in all,

      P_o G_W P_i^T = sum_t (P_o g_t)(P_i a_t)^T,

  so both sides can be projected per token without building the full gradient; for LoRA
  factors (one side r) building the small per-sample gradient and projecting it is cheaper,
  and ``project_module`` takes whichever exact route costs less. The output
  dimension d is split evenly over modules (d_m = d / n_modules) and each d_m = k_o * k_i is
  factored with the aspect ratio of W. (P_o (x) P_i) is itself a +-1/sqrt(k) matrix, so
  inner products are preserved in expectation, but its variance is higher than a dense
  projection of the same d: on the demo model's LoRA gradients (r = 16, so k_o = 1 or k_i = 1
  at d = 8192) about 5x the dense error at d = 8192, shrinking more slowly with d
  (``benchmarks/bench_features.py``, ``benchmarks/results/features_cpu.md``).
* ``sketch`` (default): a CountSketch of the per-sample gradient (``SketchProjector``). Every LoRA
  parameter j of module m gets a bucket h_m(j) in [0, d) and a sign s_m(j) in {-1, +1}, both
  from the key (seed, "sketch/<module name>") through the same SeedSequence + PCG64 stream as
  the Rademacher signs (``sketch_hashes`` documents the exact bits), and

      psi = sum_m sum_j s_m(j) g_{m,j} e_{h_m(j)},

  the whole gradient hashed into one d-vector. E[<psi(a), psi(b)>] = <g(a), g(b)>, and the
  variance, (|a|^2 |b|^2 + <a, b>^2 - 2 sum_j a_j^2 b_j^2) / d, is exactly that of a dense
  +-1/sqrt(d) Rademacher projection; on the demo model its error equals dense's (0.010 vs 0.011
  rms at d = 8192, ``benchmarks/README.md``) at kron's cost: one
  pass over each module's per-sample gradient (the r x in gradients of LoRA factors are cheap to
  build). Memory: an int64 bucket and a float32 sign per LoRA parameter (12 bytes: 22 MB for the
  demo model's 1.8M, ~165 MB for r = 16 on q/k/v/o of an 8B Llama), built once per device
  (int64, not int32: torch's CPU ``index_add_`` is ~10x slower with an int32 index).
* ``dense``: a dense Rademacher matrix over the flattened gradient, generated block by block
  (never stored whole); the reference projection of LESS/TRAK. Slow for millions of parameters.
* ``none``: no projection, psi = g (d = number of LoRA parameters). For small models and tests.

Every projector is one ``Projector`` subclass behind one interface, and one entry in
``PROJECTORS``; ``FeatureComputer`` never asks which one it has. Per batch of B samples it calls
``begin(B, device)`` for a ``ProjectionBatch``, hands each module's data to it as the backward
delivers it (in any module order), either the captures (``add_captures``: output gradients
g_t and inputs a_t of every token, from which the projector may avoid building G_W) or a
per-sample gradient G_W (``add_gradient``: after a gradient transform, or a zero gradient),
and reads psi from ``result()``. ``project_full`` is the same map on a list of full per-sample
gradients, ``spec`` what rebuilds it elsewhere, ``batch_cost_tokens`` what a batch costs it.

Precision: whatever the model's dtype (``--dtype``), every projector takes its inputs as float32
(``.float()`` on captures and gradients) and accumulates psi, per-sample gradients and squared
norms in float32 tensors; nothing is summed in bfloat16 or float16.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

_SIGNS_OF_BYTE = (1.0 - 2.0 * np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little")).astype(np.float32)


def rademacher_signs(n: int, seed: int, name: str) -> np.ndarray:
    """n signs in {-1, +1} (float32) from the stable key (seed, name)."""
    digest = hashlib.blake2b(name.encode(), digest_size=16).digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    seq = np.random.SeedSequence([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, *words])
    raw = np.random.PCG64(seq).random_raw((n + 63) // 64).astype("<u8")
    # bit j of byte k is sign 8k + j (little bit order): one table lookup per byte gives its 8
    # signs as float32, the same values as unpackbits(bitorder="little") -> 1 - 2 * bit
    return _SIGNS_OF_BYTE[raw.view(np.uint8)].reshape(-1)[:n]


def rademacher_matrix(rows: int, cols: int, seed: int, name: str) -> torch.Tensor:
    """A (rows x cols) matrix of +-1 drawn from (seed, name); unscaled."""
    return torch.from_numpy(rademacher_signs(rows * cols, seed, name).reshape(rows, cols))


def sketch_hashes(n: int, dim: int, seed: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """CountSketch hash of n parameters into ``dim`` buckets from the stable key (seed, name):
    (bucket int64 in [0, dim), sign float32 in {-1, +1}), one 64-bit PCG64 word w_j per
    parameter from the same SeedSequence as ``rademacher_signs``:

        bucket_j = ((w_j >> 32) * dim) >> 32     (multiply-shift of the high 32 bits)
        sign_j   = 1 - 2 * (w_j & 1)             (the lowest bit)

    Only the raw bit stream is used (numpy guarantees it; ``Generator.integers`` is not
    guaranteed stable across versions), in integer arithmetic, so every machine gets the same
    hash. Bucket bias from the multiply-shift: at most dim / 2^32 relative (2e-6 at d = 8192)."""
    if not 1 <= dim < 2**32:
        raise ValueError(f"sketch dimension must be in [1, 2^32), got {dim}")
    digest = hashlib.blake2b(name.encode(), digest_size=16).digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    seq = np.random.SeedSequence([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, *words])
    raw = np.random.PCG64(seq).random_raw(n).astype(np.uint64)
    bucket = (((raw >> np.uint64(32)) * np.uint64(dim)) >> np.uint64(32)).astype(np.int64)
    sign = (1.0 - 2.0 * (raw & np.uint64(1)).astype(np.float32)).astype(np.float32)
    return bucket, sign


def factor_dims(d_m: int, out_features: int, in_features: int) -> tuple[int, int]:
    """Split a module's share d_m into k_o * k_i <= d_m, k_o <= out, k_i <= in, following the
    module's aspect ratio. A side is kept whole (identity) when its share would exceed it."""
    if d_m >= out_features * in_features:
        return out_features, in_features
    best = None
    target = math.log(out_features / in_features)
    for k_o in range(1, min(d_m, out_features) + 1):
        k_i = min(d_m // k_o, in_features)
        if k_i < 1:
            continue
        key = (-(k_o * k_i), abs(math.log(k_o / k_i) - target))
        if best is None or key < best[0]:
            best = (key, (k_o, k_i))
    return best[1]


@dataclass(frozen=True)
class ModuleShape:
    """A trainable linear factor: its stable name and weight shape (out, in)."""

    name: str
    out_features: int
    in_features: int

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


def per_sample_gradient(inputs: torch.Tensor, out_grads: torch.Tensor) -> torch.Tensor:
    """(B, out, in) per-sample gradient G_W = sum_t g_t a_t^T of one linear factor (one bmm),
    from its inputs a (B, T, in) and output gradients g (B, T, out)."""
    return torch.bmm(out_grads.transpose(1, 2), inputs)


class ProjectionBatch:
    """The projection of one batch of B samples in progress (``Projector.begin``): each module's
    part as it arrives, in any module order, and a running (B, d) sum for a projector that adds
    modules into one vector (``total``, else None). Calls go to the projector's
    ``add_gradient`` / ``add_captures`` / ``result``, so a projector defines them in one place."""

    def __init__(self, projector: Projector, n_rows: int, device, total: torch.Tensor | None = None):
        self.projector = projector
        self.n_rows = n_rows
        self.device = device
        self.parts: list[torch.Tensor | None] = [None] * len(projector.modules)
        self.total = total

    def add_captures(self, index: int, out_grads: torch.Tensor, inputs: torch.Tensor,
                     want_norm: bool = False) -> torch.Tensor | None:
        """Module ``index``'s output gradients (B, T, out) and inputs (B, T, in), padded positions
        already zero on one side; returns its squared per-sample gradient norm (B,) when
        ``want_norm``, else None."""
        return self.projector.add_captures(self, index, out_grads, inputs, want_norm)

    def add_gradient(self, index: int, g: torch.Tensor) -> None:
        """Module ``index``'s per-sample gradient g (B, out, in)."""
        self.projector.add_gradient(self, index, g)

    def result(self) -> torch.Tensor:
        """psi (B, dim) float32, once every module has been added."""
        return self.projector.result(self)


class Projector:
    """Maps per-sample LoRA gradients, one module at a time, to a (B, dim) feature matrix.

    The interface (all that ``FeatureComputer`` uses):

    * ``kind`` (its name in ``PROJECTORS``), ``dim`` (output dimension), ``spec()``;
    * ``batch_cost_tokens(max_tokens)``: the fixed cost of one batch in padded-token units when
      the projector dominates it, else None (the caller's device default);
    * ``begin(n_rows, device)`` -> ``ProjectionBatch``, fed by ``add_captures`` /
      ``add_gradient`` per module and read by ``result()``;
    * ``project_full(grads)``: the same map on all modules' full per-sample gradients.

    A subclass defines ``project_gradient(index, g)`` (module ``index``'s part from its
    per-sample gradient) and, where the defaults do not fit, ``combine`` (the parts, in module
    order, -> psi), ``begin``/``add_gradient``/``result`` (a running sum instead of parts) or
    ``add_captures`` (a route that does not build the per-sample gradient)."""

    kind = "base"

    def __init__(self, modules: list[ModuleShape], dim: int, seed: int):
        self.modules = list(modules)
        self.seed = int(seed)
        self.requested_dim = int(dim)
        self.grad_dim = sum(m.numel for m in self.modules)

    def spec(self) -> dict:
        """What another machine needs to rebuild the same projection."""
        return {
            "type": self.kind,
            "dim": self.dim,
            "requested_dim": self.requested_dim,
            "seed": self.seed,
            "grad_dim": self.grad_dim,
            "modules": [[m.name, m.out_features, m.in_features] for m in self.modules],
        }

    def batch_cost_tokens(self, max_tokens: int) -> int | None:
        """Fixed cost of one batch in padded-token units (``features.pack_tight``) when this
        projector sets it, else None."""
        return None

    # per batch ---------------------------------------------------------------------------
    def begin(self, n_rows: int, device) -> ProjectionBatch:
        """A new batch of ``n_rows`` samples whose modules are added one at a time."""
        return ProjectionBatch(self, n_rows, device)

    def add_captures(self, batch: ProjectionBatch, index: int, out_grads: torch.Tensor, inputs: torch.Tensor,
                     want_norm: bool = False) -> torch.Tensor | None:
        """Default: build the per-sample gradient (one bmm), take its squared norm, add it."""
        g = per_sample_gradient(inputs, out_grads)
        sq = g.pow(2).sum(dim=(1, 2)) if want_norm else None
        self.add_gradient(batch, index, g)
        return sq

    def add_gradient(self, batch: ProjectionBatch, index: int, g: torch.Tensor) -> None:
        """Default: keep module ``index``'s part, ``project_gradient(index, g)``."""
        batch.parts[index] = self.project_gradient(index, g)

    def result(self, batch: ProjectionBatch) -> torch.Tensor:
        """Default: ``combine`` the parts."""
        return self.combine(batch.parts)

    # what a subclass defines -------------------------------------------------------------
    def project_gradient(self, index: int, g: torch.Tensor) -> torch.Tensor:
        """Module ``index``'s part (B, *) from its per-sample gradient g (B, out, in)."""
        raise NotImplementedError

    def combine(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The parts of every module, in module order -> psi (B, dim). Default: concatenation."""
        return torch.cat(parts, dim=1)

    def project_full(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """grads: per module (B, out, in) per-sample gradients, in module order -> (B, dim)."""
        batch = self.begin(grads[0].shape[0], grads[0].device)
        for index, g in enumerate(grads):
            self.add_gradient(batch, index, g)
        return self.result(batch)


class NoProjector(Projector):
    """psi = g: the flattened per-sample gradient itself."""

    kind = "none"

    def __init__(self, modules, dim=0, seed=0):
        super().__init__(modules, dim, seed)
        self.dim = self.grad_dim

    def project_gradient(self, index: int, g: torch.Tensor) -> torch.Tensor:
        """The module's gradient itself, flattened: (B, out * in)."""
        return g.flatten(1)


class DenseProjector(Projector):
    """psi = R^T g / sqrt(d), R (grad_dim x d) Rademacher, generated in row blocks from
    (seed, block index) and never held whole. The LESS/TRAK reference projection."""

    kind = "dense"
    block_rows = 8192

    def __init__(self, modules, dim, seed):
        super().__init__(modules, dim, seed)
        self.dim = self.requested_dim

    def block(self, j: int, rows: int) -> torch.Tensor:
        return rademacher_matrix(rows, self.dim, self.seed, f"dense/{self.dim}/block{j}")

    def project_flat(self, flat: torch.Tensor) -> torch.Tensor:
        """flat: (B, grad_dim) -> (B, d)."""
        out = torch.zeros(flat.shape[0], self.dim, dtype=torch.float32, device=flat.device)
        for j, start in enumerate(range(0, self.grad_dim, self.block_rows)):
            stop = min(start + self.block_rows, self.grad_dim)
            r = self.block(j, stop - start).to(flat.device)
            out += flat[:, start:stop].float() @ r
        return out / math.sqrt(self.dim)

    def batch_cost_tokens(self, max_tokens: int) -> int:
        """The whole matrix is regenerated per batch, so the fewest batches win."""
        return 4 * max_tokens

    def project_gradient(self, index: int, g: torch.Tensor) -> torch.Tensor:
        """Kept whole (B, out * in): the rows of R span all modules, ``combine`` projects."""
        return g.flatten(1)

    def combine(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return self.project_flat(torch.cat(parts, dim=1))


class KronProjector(Projector):
    """Per module m: psi_m = P_o G_W P_i^T / sqrt(k_o k_i), computed from token-side
    projections (see module docstring). dim = sum_m k_o k_i (= d unless a module is smaller
    than its share, in which case it is kept whole)."""

    kind = "kron"

    def __init__(self, modules, dim, seed):
        super().__init__(modules, dim, seed)
        n = len(self.modules)
        if n == 0:
            raise ValueError("no trainable modules to project")
        shares = [dim // n + (1 if i < dim % n else 0) for i in range(n)]
        self.factors = [factor_dims(max(s, 1), m.out_features, m.in_features) for s, m in zip(shares, self.modules)]
        self.dim = sum(k_o * k_i for k_o, k_i in self.factors)
        self._cache: dict[tuple[int, str], tuple[torch.Tensor | None, torch.Tensor | None]] = {}

    def side_matrices(self, index: int, device="cpu") -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(P_o, P_i) for module ``index``, each scaled by 1/sqrt(k); None where the side is
        kept whole (identity)."""
        key = (index, str(device))
        if key not in self._cache:
            m = self.modules[index]
            k_o, k_i = self.factors[index]
            p_o = p_i = None
            if k_o < m.out_features:  # a side kept whole is the identity
                p_o = rademacher_matrix(k_o, m.out_features, self.seed, f"kron/{m.name}/out/{k_o}")
                p_o = (p_o / math.sqrt(k_o)).to(device)
            if k_i < m.in_features:
                p_i = rademacher_matrix(k_i, m.in_features, self.seed, f"kron/{m.name}/in/{k_i}")
                p_i = (p_i / math.sqrt(k_i)).to(device)
            self._cache[key] = (p_o, p_i)
        return self._cache[key]

    def add_captures(self, batch: ProjectionBatch, index: int, out_grads: torch.Tensor, inputs: torch.Tensor,
                     want_norm: bool = False) -> torch.Tensor | None:
        """The cheaper exact route of ``project_module``; the per-sample gradient may never exist."""
        batch.parts[index], sq = self.project_module(index, out_grads, inputs, want_norm)
        return sq

    def project_tokens(self, index: int, out_grads: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """out_grads (B, T, out), inputs (B, T, in) -> (B, k_o * k_i) for module ``index``:
        sum_t (P_o g_t)(P_i a_t)^T, without forming the (out x in) gradient."""
        p_o, p_i = self.side_matrices(index, out_grads.device)
        g = out_grads.float()
        a = inputs.float()
        if p_o is not None:
            g = g @ p_o.T
        if p_i is not None:
            a = a @ p_i.T
        return torch.einsum("bto,bti->boi", g, a).flatten(1)

    def project_module(self, index: int, out_grads: torch.Tensor, inputs: torch.Tensor,
                       want_norm: bool = False, route: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """psi_m (B, k_o * k_i) of module ``index`` from its captures, by the cheaper of two exact
        routes, and the squared per-sample gradient norm ||G_W||_F^2 (B,) when ``want_norm``.

        * tokens: project each token's two sides, then sum_t (P_o g_t)(P_i a_t)^T
          (``project_tokens``); the norm then comes from the Gram form
          ||sum_t g_t a_t^T||^2 = sum_{t,s} (g_t . g_s)(a_t . a_s).
        * full: build the per-sample gradient G_W = sum_t g_t a_t^T (one bmm), take its norm,
          and project it, P_o G_W P_i^T. For LoRA factors (one side of size r) this is the
          cheaper route: the gradient has only r x in entries, fewer than the token projection's
          multiply-adds per token.

        The choice is by multiply-add count, per batch (T = padded tokens per row); ``route``
        ("tokens" or "full") forces one (tests)."""
        o, i = out_grads.shape[-1], inputs.shape[-1]
        t = out_grads.shape[1]
        k_o, k_i = self.factors[index]
        p_o, p_i = self.side_matrices(index, out_grads.device)
        side = (o * k_o if p_o is not None else 0) + (i * k_i if p_i is not None else 0)
        tokens = t * (side + k_o * k_i) + (t * t * (o + i + 1) if want_norm else 0)
        full = t * o * i + _full_projection_cost(o, i, k_o, k_i, p_o is not None, p_i is not None)
        if route not in (None, "tokens", "full"):
            raise ValueError(f"unknown route {route!r}")
        if route == "tokens" or (route is None and tokens < full):
            psi = self.project_tokens(index, out_grads, inputs)
            sq = None
            if want_norm:
                g, a = out_grads.float(), inputs.float()
                sq = (torch.bmm(g, g.transpose(1, 2)) * torch.bmm(a, a.transpose(1, 2))).sum(dim=(1, 2))
            return psi, sq
        g = per_sample_gradient(inputs.float(), out_grads.float())  # (B, out, in)
        sq = g.pow(2).sum(dim=(1, 2)) if want_norm else None
        return self._project_gradient(g, p_o, p_i).flatten(1), sq

    @staticmethod
    def _project_gradient(g: torch.Tensor, p_o: torch.Tensor | None, p_i: torch.Tensor | None) -> torch.Tensor:
        """P_o g P_i^T for g (B, out, in), multiplying in the cheaper order."""
        if p_o is None and p_i is None:
            return g
        if p_i is None:
            return p_o @ g
        if p_o is None:
            return g @ p_i.T
        k_o, o = p_o.shape
        k_i, i = p_i.shape
        if k_o * o * i + k_o * i * k_i <= o * i * k_i + k_o * o * k_i:
            return (p_o @ g) @ p_i.T
        return p_o @ (g @ p_i.T)

    def project_gradient(self, index: int, g: torch.Tensor) -> torch.Tensor:
        """psi_m (B, k_o * k_i) of module ``index`` from its full per-sample gradient g (B, out, in):
        P_o g P_i^T, multiplying in the cheaper order (``add_gradient``: after a gradient
        transform, or for a module without gradient)."""
        p_o, p_i = self.side_matrices(index, g.device)
        return self._project_gradient(g.float(), p_o, p_i).flatten(1)

    def project_full(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Same map applied to full per-sample gradients (B, out, in): P_o G P_i^T, always P_o
        first (``project_gradient`` takes the cheaper order; equal up to float rounding)."""
        parts = []
        for index, g in enumerate(grads):
            p_o, p_i = self.side_matrices(index, g.device)
            g = g.float()
            if p_o is not None:
                g = p_o @ g
            if p_i is not None:
                g = g @ p_i.T
            parts.append(g.flatten(1))
        return torch.cat(parts, dim=1)


class SketchProjector(Projector):
    """CountSketch of the concatenated per-sample gradient (see the module docstring):
    psi = sum_m sum_j s_m(j) g_{m,j} e_{h_m(j)}, hashes from ``sketch_hashes(p_m, d, seed,
    "sketch/<name>")`` per module m, j indexing the (out, in) gradient in row-major order (the
    order of ``weight.flatten()``). dim = d. A module's hash depends only on (seed, d, its name
    and size), not on the other modules or their order.

    ``accumulate`` adds one module's contribution into a (B, d) accumulator, so a caller can
    project each module's per-sample gradient as soon as it exists and drop it. On CUDA,
    ``index_add_`` sums colliding entries with atomic adds: the hash is identical everywhere,
    the float32 sums may differ in the last bits between runs there (on CPU they do not)."""

    kind = "sketch"
    version = "sketch-v1"  # bump when the hash (``sketch_hashes``) or the map changes

    def __init__(self, modules, dim, seed):
        super().__init__(modules, dim, seed)
        if self.requested_dim < 1:
            raise ValueError(f"sketch dimension must be >= 1, got {dim}")
        self.dim = self.requested_dim
        self._cache: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def spec(self) -> dict:
        return super().spec() | {"version": self.version}

    def hashes(self, index: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(bucket int64 (p_m,), sign float32 (p_m,)) of module ``index``, cached per device."""
        key = (index, str(device))
        if key not in self._cache:
            m = self.modules[index]
            bucket, sign = sketch_hashes(m.numel, self.dim, self.seed, f"sketch/{m.name}")
            self._cache[key] = (torch.from_numpy(bucket).to(device), torch.from_numpy(sign).to(device))
        return self._cache[key]

    def accumulate(self, index: int, g: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out (B, d) += sketch of module ``index``'s per-sample gradient g (B, out, in); returns out."""
        bucket, sign = self.hashes(index, g.device)
        return out.index_add_(1, bucket, g.reshape(g.shape[0], -1).float() * sign)

    def begin(self, n_rows: int, device) -> ProjectionBatch:
        """A batch whose modules are added into one (B, d) running sum as they arrive, so at
        most one module's per-sample gradient need exist at a time."""
        total = torch.zeros(n_rows, self.dim, dtype=torch.float32, device=device)
        return ProjectionBatch(self, n_rows, device, total=total)

    def add_gradient(self, batch: ProjectionBatch, index: int, g: torch.Tensor) -> None:
        self.accumulate(index, g, batch.total)

    def result(self, batch: ProjectionBatch) -> torch.Tensor:
        return batch.total

    def project_gradient(self, index: int, g: torch.Tensor) -> torch.Tensor:
        """Module ``index``'s sketch alone (B, d)."""
        return self.accumulate(index, g, torch.zeros(g.shape[0], self.dim, dtype=torch.float32, device=g.device))


def _full_projection_cost(o: int, i: int, k_o: int, k_i: int, has_o: bool, has_i: bool) -> int:
    """Multiply-adds of P_o G P_i^T for one (o x in) gradient, in the cheaper order."""
    if has_o and has_i:
        return min(k_o * o * i + k_o * i * k_i, o * i * k_i + k_o * o * k_i)
    if has_o:
        return k_o * o * i
    if has_i:
        return o * i * k_i
    return 0


# The registry: one entry per projector, the default (``sketch``) first. Code that offers a choice
# of projector (the CLI) takes the names from here.
PROJECTORS: dict[str, type[Projector]] = {cls.kind: cls for cls in (SketchProjector, KronProjector, DenseProjector, NoProjector)}


def make_projector(kind: str, modules: list[ModuleShape], dim: int, seed: int) -> Projector:
    """Projector by its name in ``PROJECTORS``: 'sketch' (default), 'kron', 'dense' or 'none'."""
    cls = PROJECTORS.get(kind)
    if cls is None:
        raise ValueError(f"unknown projector {kind!r} (choose from {', '.join(PROJECTORS)})")
    return cls(modules, dim, seed)
