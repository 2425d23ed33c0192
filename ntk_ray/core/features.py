"""Jacobian-free NTK features of NTK-Selector, from batched backward passes.

For a sample x with scored positions R(x) (response positions under teacher forcing, or all
positions for plain text):

    F(x)   = 1/|R(x)| * sum_{t in R(x)} sum_v logit[t, v]
    g(x)   = dF(x)/d theta_LoRA                     (one row instead of the V-row Jacobian)
    psi(x) = Pi g(x)                                (seeded projection, ``projection.py``)

Shortcuts, each named where it happens below:

1. LM-head column-sum (``lm_head_column_sum``): sum_v logit[t, v] = h_t . w_sum + sum_v b_v with
   w_sum = sum_v W_head[v, :]. F is computed from the final hidden states; the V-sized logits
   are never formed.
2. Batched per-sample gradients (``GradientCapture``): samples in a batch do not interact
   (causal attention masks padding, norms are per token), so one backward of sum_b F(x_b) gives
   every sample's output gradients. For a linear LoRA factor W with input activations a_t and
   output gradients g_t, dF(x)/dW = sum_{t in x} g_t a_t^T. Hooks capture a and g per module and
   the projector works on them directly. The backward is taken with respect to the module
   outputs, not the weights, so autograd skips the (unused) LoRA weight-gradient matmuls. The
   Kronecker projector picks, per module and batch, the cheaper exact route: project both sides
   per token, or build the small per-sample gradient (r x in for LoRA) and project that.
   Batches are packed by ``pack_tight`` (least padding; batch composition never changes a result).
3. Exact mean scores by forward-mode JVP (``mean_scores_jvp``): mean_a <g(x), g(a)> =
   <g(x), g_bar> is the directional derivative of F(x) along g_bar = d(mean_a F(a))/d theta,
   so one backward over the anchors and one JVP per pool batch give exact, unprojected scores.

Options of ``FeatureComputer`` for LESS-style features (the LESS baseline selector):

* ``objective="loss"``: differentiate the per-sample mean causal-LM cross-entropy over the
  sample's loss-mask target positions instead of F (``causal_lm_loss_objective``; the mask
  passed to ``features`` is then the loss mask, as in ``training.batch_loss``). Each sample's
  loss depends only on its own sample, so one batched backward still gives exact per-sample
  gradients.
* ``gradient_transform(index, G) -> G'``: applied to each module's per-sample gradient
  G (B, out, in) before projection (LESS: Adam preconditioning). Every projector then takes the
  full-gradient route, and the norm is of the transformed gradient.

Precision (``--dtype``). The model's forward and backward run in the dtype its weights were
loaded in (bfloat16 on a GPU by default, float32 on CPU; ``models.loading``), without autocast
(``autocast_dtype`` remains an option of ``FeatureComputer`` for a float32 model, unused by the
stages). Everything that is summed stays float32 or wider, whatever that dtype:

* the LoRA factors and the captured activations a_t and output gradients g_t are float32 (peft
  runs the LoRA branch in its float32 weights' dtype; ``_mask_smaller_side`` casts anyway);
* the objective: F from ``hidden.float() @ w_sum`` with w_sum the float32 column-sum of the
  head, the loss from float32 logits, both reduced over positions in float32;
* per-sample gradients sum_t g_t a_t^T, their projections (``projection.py``: float32
  accumulators, one module at a time) and the squared norms are float32;
* kernel values and scores are float64 (``scoring.py``), rounded to the float32 grid.

So a bfloat16 model changes the features by what its activations and backward carry (about 3
significant digits per element), not by any low-precision accumulation: on the tiny test
model the cosine between bfloat16 and float32 features is above 0.999
(``tests/test_dtype.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ntk_ray.core.projection import ModuleShape, Projector, make_projector, per_sample_gradient

OBJECTIVES = ("summed-logits", "loss")


# ---------------------------------------------------------------------------------------------
# model plumbing
def trainable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The linear modules whose weight is trained (LoRA's lora_A / lora_B), in module order."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.weight.requires_grad:
            if module.bias is not None and module.bias.requires_grad:
                raise ValueError(f"trainable bias in {name} is not supported (LoRA bias must be 'none')")
            found.append((name, module))
    if not found:
        raise ValueError("model has no trainable linear modules: attach a LoRA adapter first")
    return found


def module_shapes(model: nn.Module) -> list[ModuleShape]:
    """Stable names and shapes of the trainable factors (the projection is keyed on these)."""
    shapes = []
    for name, m in trainable_linears(model):
        # names from PeftModel and from its base model differ by a prefix; strip it so the same
        # adapter gives the same keys either way
        stable = name.removeprefix("base_model.model.")
        shapes.append(ModuleShape(stable, m.out_features, m.in_features))
    return shapes


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder that returns final hidden states, LM head) of a causal LM, through peft."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = hf.get_output_embeddings()
    backbone = getattr(hf, hf.base_model_prefix, None)
    if head is None or backbone is None or backbone is hf:
        raise ValueError(f"{type(hf).__name__}: cannot find the decoder and LM head of this causal LM")
    cfg = hf.config
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            raise ValueError(f"{type(hf).__name__} transforms its logits ({attr}); the LM-head column-sum is not exact for it")
    return backbone, head


def lm_head_column_sum(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Shortcut 1: w_sum = sum_v W[v, :] (H,) and b_sum = sum_v b[v] (scalar)."""
    w_sum = head.weight.detach().float().sum(dim=0)
    b_sum = head.bias.detach().float().sum() if getattr(head, "bias", None) is not None else torch.zeros(())
    return w_sum, b_sum.to(w_sum.device)


def summed_logit_objective(hidden: torch.Tensor, score_mask: torch.Tensor, w_sum: torch.Tensor, b_sum: torch.Tensor) -> torch.Tensor:
    """F per sample (B,) from final hidden states (B, T, H): the masked mean over positions of
    h_t . w_sum + b_sum, which equals the mean of the summed logits (shortcut 1)."""
    per_position = hidden.float() @ w_sum + b_sum
    mask = score_mask.to(per_position.dtype)
    return (per_position * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def causal_lm_loss_objective(hidden: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                             weight: torch.Tensor, bias: torch.Tensor | None, chunk_rows: int = 2048,
                             autocast=contextlib.nullcontext) -> torch.Tensor:
    """Per-sample mean causal-LM loss (B,) from final hidden states (B, T, H):

        L(x) = sum_t m[t] * -log p(x_t | x_<t) / sum_t m[t],   t = 1 .. T-1, m = loss_mask

    (the convention of ``training.batch_loss``: logits[:, :-1] predict input_ids[:, 1:], weighted
    by loss_mask[:, 1:]; 0 for a sample without targets). Logits are formed only at target
    positions, ``chunk_rows`` at a time; while gradients are recorded each chunk is
    checkpointed, so the V-sized logits of at most one chunk are alive at once (the head's matmul
    runs again in the backward). ``weight``/``bias``: the LM head's (frozen) parameters."""
    mask = loss_mask[:, 1:].float()
    rows, cols = torch.nonzero(mask > 0, as_tuple=True)
    h = hidden[:, :-1][rows, cols]  # (N, H): target positions only
    targets = input_ids[:, 1:][rows, cols]

    def chunk_loss(h_chunk, t_chunk):
        with autocast():
            logits = torch.nn.functional.linear(h_chunk, weight, bias)
        return torch.nn.functional.cross_entropy(logits.float(), t_chunk, reduction="none")

    parts = []
    for start in range(0, h.shape[0], chunk_rows):
        h_c, t_c = h[start : start + chunk_rows], targets[start : start + chunk_rows]
        if torch.is_grad_enabled() and h_c.requires_grad:
            from torch.utils.checkpoint import checkpoint

            parts.append(checkpoint(chunk_loss, h_c, t_c, use_reentrant=False))
        else:
            parts.append(chunk_loss(h_c, t_c))
    token_loss = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    weighted = token_loss * mask[rows, cols]
    total = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device).index_add(0, rows, weighted)
    return total / mask.sum(dim=1).clamp(min=1)


def pad_batch(sequences: list[list[int]], masks: list[list[int]], pad_id: int = 0, device="cpu"):
    """Right-pad token ids and a per-position mask: (input_ids, attention_mask, mask) tensors."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(sequences), width), dtype=torch.long)
    pos_mask = torch.zeros((len(sequences), width), dtype=torch.float32)
    for i, (s, m) in enumerate(zip(sequences, masks)):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        attn[i, : len(s)] = 1
        pos_mask[i, : len(m)] = torch.as_tensor(m, dtype=torch.float32)
    return ids.to(device), attn.to(device), pos_mask.to(device)


def pack_by_tokens(lengths: list[int], max_tokens: int, max_rows: int = 256) -> list[list[int]]:
    """Group row indices into batches whose padded size (rows x longest) stays within
    ``max_tokens``; rows are taken longest first so that similar lengths share a batch.
    A row longer than max_tokens gets a batch of its own. Deterministic for given lengths."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, current, longest = [], [], 0
    for i in order:
        width = max(longest, lengths[i])
        if current and (width * (len(current) + 1) > max_tokens or len(current) >= max_rows):
            batches.append(current)
            current, width = [], lengths[i]
        current.append(i)
        longest = width
    if current:
        batches.append(current)
    return batches


def pack_tight(lengths: list[int], max_tokens: int, max_rows: int = 256, batch_cost_tokens: int | None = None) -> list[list[int]]:
    """Batches for the feature passes, where batch composition does not change any result:
    the rows sorted longest first (as ``pack_by_tokens``) and cut into the contiguous runs that
    minimise padded tokens + ``batch_cost_tokens`` per batch (default max_tokens // 32, the
    fixed cost of a batch in token units), each within ``max_tokens`` padded tokens and
    ``max_rows`` rows. ``pack_by_tokens`` fills every batch to the budget, so a few long rows
    pad a whole batch of short ones; this wastes less (exact dynamic programme, O(n * rows)).
    Deterministic for given lengths. Training keeps ``pack_by_tokens`` (its batches are steps)."""
    n = len(lengths)
    if n == 0:
        return []
    cost = max(max_tokens // 32, 1) if batch_cost_tokens is None else batch_cost_tokens
    order = sorted(range(n), key=lambda i: (-lengths[i], i))
    width = np.asarray([lengths[i] for i in order], dtype=np.int64)  # non-increasing
    best = np.zeros(n + 1, dtype=np.float64)
    start = np.zeros(n + 1, dtype=np.int64)
    # a batch [s, e) of the sorted rows has width width[s]; it may hold rows s..e-1 when
    # width[s] * (e - s) <= max_tokens (or e - s == 1) and e - s <= max_rows
    fits = np.maximum(np.minimum(max_tokens // np.maximum(width, 1), max_rows), 1)
    for e in range(1, n + 1):
        lo = max(0, e - max_rows)
        s = np.arange(lo, e)
        ok = fits[lo:e] >= e - s
        total = np.where(ok, best[lo:e] + width[lo:e] * (e - s) + cost, np.inf)
        j = int(np.argmin(total))  # first minimum: deterministic
        best[e], start[e] = total[j], lo + j
    cuts, e = [], n
    while e > 0:
        cuts.append((int(start[e]), e))
        e = int(start[e])
    return [[order[k] for k in range(s, e)] for s, e in reversed(cuts)]


# ---------------------------------------------------------------------------------------------
# shortcut 2: batched per-sample gradients
class GradientCapture:
    """Hooks on the trainable linears that hand (inputs, output gradients) of every module to a
    callback during backward.

    ``grad_targets()`` names the tensors to differentiate with respect to so that every hooked
    output receives its gradient but no weight gradient is computed (the per-sample work needs
    only the output gradients): the outputs of the modules whose input is not the output of
    another hooked module. For LoRA that is the ``lora_A`` outputs; the gradient on the way to them
    passes through every ``lora_B`` output, whose hooks fire too. The callback also gets the
    token mask; padded positions are zeroed there, on whichever side is cheaper."""

    def __init__(self, modules: list[nn.Linear]):
        self.modules = modules
        n = len(modules)
        self.inputs: list[torch.Tensor | None] = [None] * n
        self.outputs: list[torch.Tensor | None] = [None] * n
        self.fed: list[bool] = [False] * n  # input is another hooked module's output
        self.results: list[torch.Tensor | None] = [None] * n
        self.on_backward = None  # callable(index, inputs, out_grads) -> tensor
        self.token_mask: torch.Tensor | None = None
        self._output_index: dict[int, int] = {}
        self.called: list[bool] = [False] * n

    @contextlib.contextmanager
    def active(self, on_backward, token_mask: torch.Tensor):
        self.on_backward, self.token_mask = on_backward, token_mask
        self.results = [None] * len(self.modules)
        self.called = [False] * len(self.modules)
        handles = [m.register_forward_hook(self._forward_hook(i)) for i, m in enumerate(self.modules)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self.inputs = [None] * len(self.modules)
            self.outputs = [None] * len(self.modules)
            self._output_index = {}
            self.on_backward = self.token_mask = None

    def grad_targets(self) -> list[torch.Tensor]:
        """Tensors whose gradients reach every hooked output (see the class docstring)."""
        return [o for o, fed in zip(self.outputs, self.fed) if o is not None and not fed]

    def _forward_hook(self, index: int):
        def hook(module, args, output):
            self.called[index] = True
            x = args[0]
            # ids are unique here: every recorded output stays alive until the context exits
            self.fed[index] = id(x) in self._output_index
            self.inputs[index] = x.detach()

            def grad_hook(grad):
                self.results[index] = self.on_backward(index, self.inputs[index], grad.detach())
                self.inputs[index] = None  # free activations as soon as they are used

            if output.requires_grad:
                self.outputs[index] = output
                self._output_index[id(output)] = index
                output.register_hook(grad_hook)

        return hook


def _mask_smaller_side(inputs: torch.Tensor, out_grads: torch.Tensor, token_mask: torch.Tensor):
    """Zero the padded positions of the side with fewer features (the product g_t a_t^T is zero
    at a position either way); float32 copies of both sides."""
    mask = token_mask.unsqueeze(-1)
    if out_grads.shape[-1] <= inputs.shape[-1]:
        return inputs.float(), out_grads.float() * mask.to(torch.float32)
    return inputs.float() * mask.to(torch.float32), out_grads.float()


_HANDED_OVER = torch.empty(0)  # a backward hook's result: its module went to the projection batch


@dataclass
class FeatureBatch:
    """Per-sample outputs of one batch, rows in input order."""

    feature: torch.Tensor  # (B, d) projected gradient psi(x)
    norm: torch.Tensor  # (B,) ||g(x)|| before projection
    objective: torch.Tensor  # (B,) the differentiated objective: F(x), or L(x) with objective="loss"


class FeatureComputer:
    """Computes psi(x) for batches of tokenized samples with a LoRA-adapted causal LM.

    ``model`` must be a peft model (or any model whose trainable parameters are in nn.Linear
    modules without bias). It is used in eval mode; the projection is built from ``seed``.

    * ``projector``: a name in ``projection.PROJECTORS`` ('sketch', 'kron', 'dense' or 'none';
      ``projection.make_projector``), with output dimension ``dim``.
    * ``objective``: what is differentiated per sample. 'summed-logits' (default): NTK-Selector's
      F(x), the masked mean over positions of the logits summed over the vocabulary (the mask
      given to ``features`` is the score mask). 'loss': LESS's per-sample mean causal-LM
      cross-entropy over the target positions of the mask given to ``features`` (a loss mask,
      ``causal_lm_loss_objective``), through the LM head's V-sized logits at target positions.
    * ``gradient_transform``: None, or a callable (module index, G) -> G' where G is that
      module's per-sample gradient (B, out, in) float32, in ``self.shapes`` order, and G' a tensor
      of the same shape; psi is then the projection of the transformed gradient and ``norm`` its
      norm ||G'(x)|| over all modules. Every projector then builds the per-sample gradient of
      each module (kron projects it as P_o G' P_i^T), which kron otherwise may avoid. It is also
      applied to the zero gradient of a module that the objective does not reach. LESS uses it
      for Adam preconditioning. ``mean_gradient`` / ``mean_scores_jvp`` refuse it (the mean of
      transformed gradients is not the transform of the mean).
    * ``compute_norm``: also return ||g(x)|| (before projection; of the transformed gradient
      when a ``gradient_transform`` is given).
    """

    def __init__(self, model: nn.Module, projector: str = "sketch", dim: int = 8192, seed: int = 0,
                 device: str | torch.device = "cpu", autocast_dtype: torch.dtype | None = None,
                 compute_norm: bool = True, batch_cost_tokens: int | None = None,
                 objective: str = "summed-logits",
                 gradient_transform: Callable[[int, torch.Tensor], torch.Tensor] | None = None):
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r} (choose from {', '.join(OBJECTIVES)})")
        if gradient_transform is not None and not callable(gradient_transform):
            raise ValueError("gradient_transform must be callable (module index, gradient) -> gradient")
        self.objective_name = objective
        self.gradient_transform = gradient_transform
        self.model = model.eval()
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        self.compute_norm = compute_norm
        self.backbone, head = backbone_and_head(model)
        self.w_sum, self.b_sum = (t.to(self.device) for t in lm_head_column_sum(head))
        self.head = head  # objective="loss": the LM head's weight and bias, read at call time
        named = trainable_linears(model)
        self.linears = [m for _, m in named]
        self.params = [m.weight for m in self.linears]
        self.shapes = module_shapes(model)
        self.projector: Projector = make_projector(projector, self.shapes, dim, seed)
        self.capture = GradientCapture(self.linears)
        # fixed cost of one batch in padded-token units, for ``pack_tight``: small on CPU (the
        # model's matmuls dominate from a few hundred tokens on), larger on accelerators (Python
        # and kernel-launch overhead per batch), unless the projector sets it
        # (``Projector.batch_cost_tokens``: a dense projection regenerates its whole matrix per
        # batch, so there the fewest batches win)
        self.batch_cost_tokens = batch_cost_tokens

    def batches(self, lengths: list[int], max_tokens: int) -> list[list[int]]:
        """The batches (row indices) that ``features`` / ``mean_gradient`` / ``mean_scores_jvp``
        use for rows of these lengths (``pack_tight``)."""
        cost = self.batch_cost_tokens
        if cost is None:
            cost = self.projector.batch_cost_tokens(max_tokens)
        if cost is None:
            cost = 32 if self.device.type == "cpu" else max(max_tokens // 4, 1)
        return pack_tight(lengths, max_tokens, batch_cost_tokens=cost)

    @property
    def dim(self) -> int:
        return self.projector.dim

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def objective(self, input_ids, attention_mask, score_mask) -> torch.Tensor:
        """The per-sample objective (B,) of a padded batch: F(x), or L(x) with objective="loss"
        (``score_mask`` is then the loss mask); differentiable w.r.t. the LoRA parameters."""
        with self._autocast():
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self._objective_from_hidden(hidden, input_ids, score_mask)

    def _objective_from_hidden(self, hidden, input_ids, mask) -> torch.Tensor:
        if self.objective_name == "loss":
            bias = getattr(self.head, "bias", None)
            return causal_lm_loss_objective(hidden, input_ids, mask, self.head.weight, bias, autocast=self._autocast)
        return summed_logit_objective(hidden, mask, self.w_sum, self.b_sum)

    def _transformed(self, index: int, full: torch.Tensor) -> torch.Tensor:
        out = self.gradient_transform(index, full)
        if not isinstance(out, torch.Tensor) or out.shape != full.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"gradient_transform must return a tensor of the gradient's shape {tuple(full.shape)} "
                             f"for module {index} ({self.shapes[index].name}), got {got}")
        return out.float()

    def features_padded(self, input_ids, attention_mask, score_mask) -> FeatureBatch:
        """psi, ||g|| and F for one padded batch: one forward, one backward.

        The backward is taken with respect to the hooked module outputs
        (``GradientCapture.grad_targets``), not the LoRA weights, so autograd skips the
        weight-gradient matmuls that nothing here uses. Each module's captures go to the
        projector's batch right in the backward hook (``ProjectionBatch.add_captures``), which
        takes its own route: the Kronecker projector the cheaper exact one
        (``KronProjector.project_module``), the sketch projector adds the module's per-sample
        gradient into a (B, d) running sum, so at most one module's per-sample gradient exists at
        a time. With a ``gradient_transform`` the per-sample gradient is built here, transformed
        and handed over (``ProjectionBatch.add_gradient``)."""
        n_rows = input_ids.shape[0]
        norms = torch.zeros(n_rows, device=self.device)
        want_norm = self.compute_norm
        transform = self.gradient_transform
        token_mask = attention_mask
        batch = self.projector.begin(n_rows, self.device)

        def add_gradient(index, full):
            """A module's per-sample gradient (B, out, in) -> (transform) -> norm -> projection."""
            if transform is not None:
                full = self._transformed(index, full)
            if want_norm:
                norms.add_(full.pow(2).sum(dim=(1, 2)))
            batch.add_gradient(index, full)

        def on_backward(index, inputs, out_grads):
            a, g = _mask_smaller_side(inputs, out_grads, token_mask)
            if transform is None:
                sq_norm = batch.add_captures(index, g, a, want_norm)
                if sq_norm is not None:
                    norms.add_(sq_norm)
            else:
                add_gradient(index, per_sample_gradient(a, g))
            return _HANDED_OVER

        with self.capture.active(on_backward, attention_mask):
            objective = self.objective(input_ids, attention_mask, score_mask)
            targets = self.capture.grad_targets()
            if targets:
                torch.autograd.grad(objective.sum(), targets, allow_unused=True)
            delivered = list(self.capture.results)
        for index, part in enumerate(delivered):
            if part is None:
                if not self.capture.called[index]:
                    raise ValueError(f"trainable module {self.shapes[index].name} is not used by the decoder's forward "
                                     "(LoRA on the LM head is not supported: F is taken through the head's column-sum)")
                # the objective does not depend on it: a zero gradient (through the transform too)
                shape = self.shapes[index]
                add_gradient(index, torch.zeros(n_rows, shape.out_features, shape.in_features, device=self.device))
        feature = batch.result()
        return FeatureBatch(feature.float(), norms.sqrt(), objective.detach().float())

    def features(self, sequences: list[list[int]], score_masks: list[list[int]], max_tokens: int = 8192) -> FeatureBatch:
        """psi for any number of samples, packed into batches of at most ``max_tokens`` padded
        tokens (``batches``); rows come back in input order."""
        n = len(sequences)
        feature = torch.zeros(n, self.dim)
        norm = torch.zeros(n)
        objective = torch.zeros(n)
        for batch in self.batches([len(s) for s in sequences], max_tokens):
            ids, attn, mask = pad_batch([sequences[i] for i in batch], [score_masks[i] for i in batch], device=self.device)
            out = self.features_padded(ids, attn, mask)
            index = torch.as_tensor(batch)
            feature[index] = out.feature.cpu()
            norm[index] = out.norm.cpu()
            objective[index] = out.objective.cpu()
        return FeatureBatch(feature, norm, objective)

    # -----------------------------------------------------------------------------------------
    # shortcut 3: exact mean scores by forward-mode JVP
    def mean_gradient(self, sequences, score_masks, max_tokens: int = 8192) -> list[torch.Tensor]:
        """g_bar = mean over samples of g(x), per trainable weight (one backward per batch)."""
        self._refuse_transform("mean_gradient")
        total = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        for batch in self.batches([len(s) for s in sequences], max_tokens):
            ids, attn, mask = pad_batch([sequences[i] for i in batch], [score_masks[i] for i in batch], device=self.device)
            grads = torch.autograd.grad(self.objective(ids, attn, mask).sum(), self.params)
            for t, g in zip(total, grads):
                t.add_(g.float())
        return [t / len(sequences) for t in total]

    def mean_scores_jvp(self, sequences, score_masks, direction: list[torch.Tensor], max_tokens: int = 8192) -> torch.Tensor:
        """s(x) = <g(x), direction> for every sample, exactly, as the JVP of F along
        ``direction`` (no per-sample gradients, no projection)."""
        from torch.func import functional_call, jvp

        self._refuse_transform("mean_scores_jvp")
        by_param = {id(p): d for p, d in zip(self.params, direction)}
        trainable = {n: p for n, p in self.backbone.named_parameters() if p.requires_grad}
        if len(trainable) != len(self.params):
            raise ValueError("JVP scoring needs every trainable parameter inside the decoder")
        primals = {n: p.detach() for n, p in trainable.items()}
        tangents = {n: by_param[id(p)].to(p.device, p.dtype) for n, p in trainable.items()}
        out = torch.zeros(len(sequences))
        for batch in self.batches([len(s) for s in sequences], max_tokens):
            ids, attn, mask = pad_batch([sequences[i] for i in batch], [score_masks[i] for i in batch], device=self.device)

            def objective_of(p):
                with self._autocast():
                    hidden = functional_call(self.backbone, p, kwargs={"input_ids": ids, "attention_mask": attn}, strict=False).last_hidden_state
                return self._objective_from_hidden(hidden, ids, mask)

            with torch.no_grad(), eager_attention(self.model):
                _, tangent_out = jvp(objective_of, (primals,), (tangents,))
            out[torch.as_tensor(batch)] = tangent_out.float().cpu()
        return out

    def _refuse_transform(self, what: str) -> None:
        if self.gradient_transform is not None:
            raise ValueError(f"{what} works on untransformed gradients; it cannot honour gradient_transform "
                             "(the mean of transformed gradients is not the transform of the mean)")


@contextlib.contextmanager
def eager_attention(model: nn.Module):
    """Temporarily switch to the eager attention kernel: the fused SDPA kernels have no
    forward-mode derivative in PyTorch."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = getattr(hf.config, "_attn_implementation", None)
    if before in (None, "eager"):
        yield
        return
    hf.set_attn_implementation("eager")
    try:
        yield
    finally:
        hf.set_attn_implementation(before)


def mean_pooled_embeddings(model: nn.Module, sequences: list[list[int]], max_tokens: int = 8192, device="cpu",
                           layer: int | None = None, max_row_tokens: int | None = None) -> torch.Tensor:
    """Coarse-stage embedding: mean over tokens of the final hidden states, L2-normalised (N, H).
    Rows in length-sorted batches of at most ``max_tokens`` padded tokens (``pack_by_tokens``).
    ``layer`` K: the hidden states after K decoder layers instead (the pass stops there);
    ``max_row_tokens`` T: the first T tokens of each row only (``core.coarse`` has the equation)."""
    from ntk_ray.core.coarse import hidden_states_at, masked_mean_normalized

    backbone, _ = backbone_and_head(model)
    if max_row_tokens is not None:
        sequences = [s[:max_row_tokens] for s in sequences]
    parts = []
    with torch.inference_mode():
        for batch in pack_by_tokens([len(s) for s in sequences], max_tokens):
            ones = [[1] * len(sequences[i]) for i in batch]
            ids, attn, _ = pad_batch([sequences[i] for i in batch], ones, device=device)
            hidden = hidden_states_at(backbone, ids, attn, layer)
            parts.append((batch, masked_mean_normalized(hidden, attn).cpu()))
    width = parts[0][1].shape[1] if parts else 0
    out = torch.zeros(len(sequences), width)
    for batch, pooled in parts:
        out[torch.as_tensor(batch)] = pooled.clone()  # a normal tensor (inference tensors stay in inference mode)
    return out
