"""Kernel scoring against the anchors, blockwise, and exact per-anchor top-k.

Theta(x, a) = <psi(x), psi(a)> for pool rows x and anchors a (rows of ``anchors``).
Scorers, chosen by name:

* ``mean`` (the paper): s(x) = 1/|A| sum_a Theta(x, a) = <psi(x), psi_bar>, psi_bar the mean
  anchor feature. Linear, so no kernel block is ever formed.
* ``cosine`` (LESS-style normalisation): s(x) = 1/|A| sum_a cos(psi(x), psi(a))
  = <psi(x)/|psi(x)|, mean_a psi(a)/|psi(a)|>. Removes the pull of large gradient norms.
* ``max``: s(x) = max_a Theta(x, a), over anchor blocks of ``anchor_block`` rows.
* ``round-robin`` (RDS+-style diversity): anchors take turns picking their best unpicked row,
  by cosine; rows beyond the round-robin picks are ordered by their best cosine. Needs each
  anchor's top-k over the whole pool: ``AnchorTopK``.
* ``max-cosine`` (LESS): s(x) = max_a cos(psi(x), psi(a)); also the per-row score that
  ``round-robin`` orders its remaining rows by. Used by the ``less`` and ``embedding``
  selectors; not offered as an NTK ``--scorer``.

All of them accumulate in float64 and round to the float32 grid (``AnchorKernel``,
``round_scores``): reproducible scores at about 3x the cost of a float32 matrix-vector product.
The features come in as float16 or float32 whatever dtype the model ran in (``--dtype``: see
``features.py``), and every sum over d or over anchors is float64.

``AnchorTopK`` keeps, per anchor, the k best (score, key) pairs seen so far, ordered by score
descending then key ascending, so merging partial results from any sharding of the pool gives
exactly the result of one full sort. The coarse stage's kNN votes use the same structure.
"""

from __future__ import annotations

import hashlib
import warnings

import numpy as np

SCORERS = ("mean", "cosine", "max", "round-robin")
ROW_SCORERS = SCORERS + ("max-cosine",)  # what ``AnchorKernel.score`` accepts


def stable_keys(ids) -> np.ndarray:
    """int64 key per id string (first 8 bytes of blake2b): the deterministic tie-breaker,
    identical on every machine and Python process (unlike ``hash``)."""
    out = np.empty(len(ids), dtype=np.int64)
    for i, s in enumerate(ids):
        out[i] = int.from_bytes(hashlib.blake2b(str(s).encode(), digest_size=8).digest(), "little", signed=True)
    return out


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


class AnchorKernel:
    """The anchors' features and the reductions the scorers need, computed once.

    ``score`` accumulates in float64 a block of ``row_block`` rows at a time: each block is
    converted float16/float32 -> float64 while it sits in cache (converting a whole shard first
    costs 5-30x the matmul itself), and the float64 result is rounded to float32's 24-bit
    significand (``round_scores``). float64 dot products of length d differ between BLAS
    libraries, thread counts and block positions by ~sqrt(d) 2^-53 |x||m| (about 1e-14 relative);
    rounding absorbs that, so the same features give the same scores, hence the same ranking
    (ties broken by ``stable_keys``), on every machine and sharding, except for the ~1e-7 of
    rows whose float64 score lies within that noise of a rounding boundary (a flip there moves
    a score by one float32 ulp)."""

    row_block = 64  # 64 x 8192 float64 = 4 MiB: converted and reduced while in cache

    def __init__(self, anchor_features: np.ndarray, anchor_block: int = 1024, center: np.ndarray | None = None):
        a = np.asarray(anchor_features, dtype=np.float32)
        if a.ndim != 2 or a.shape[0] == 0:
            raise ValueError("need a non-empty (anchors x d) feature matrix")
        if not np.isfinite(a).all():
            raise ValueError("anchor features contain NaN or inf")
        a64 = a.astype(np.float64)
        # ``center`` c (``select --center``): every row and anchor is shifted to x - c (in float64,
        # as each block is converted) before any kernel: Theta_c(x, a) = <x - c, a - c>
        self.center = None if center is None else np.asarray(center, dtype=np.float64)
        if self.center is not None:
            if self.center.shape != (a.shape[1],) or not np.isfinite(self.center).all():
                raise ValueError(f"center of shape {self.center.shape} for anchors of width {a.shape[1]}")
            a64 = a64 - self.center
        self._anchors64 = a64 if self.center is not None else None
        self.features = a
        self.mean = a64.mean(axis=0)
        self.unit_mean = _unit_rows(a64).mean(axis=0)
        self.anchor_block = anchor_block
        self._float64 = {}  # torch float64 copies, made on first use

    @property
    def n_anchors(self) -> int:
        return self.features.shape[0]

    def _torch64(self, name: str):
        """float64 torch copies made on first use: ``mean``, ``unit_mean``, ``features``
        (anchors x d) and ``unit`` (the anchors scaled to unit norm in float64)."""
        import torch

        if name not in self._float64:
            if name in ("features", "unit"):
                a64 = self._anchors64 if self._anchors64 is not None else self.features.astype(np.float64)
                value = _unit_rows(a64) if name == "unit" else a64
            else:
                value = getattr(self, name)
            self._float64[name] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float64))
        return self._float64[name]

    def _rows_as_torch(self, x: np.ndarray):
        """(rows x d) float16/float32 torch view of ``x`` (other dtypes -> float32), checked."""
        import torch

        x = np.asarray(x)
        if x.dtype not in (np.float16, np.float32):
            x = x.astype(np.float32)
        if x.ndim != 2 or x.shape[1] != self.features.shape[1]:
            raise ValueError(f"rows of shape {x.shape} for anchors of width {self.features.shape[1]}")
        with warnings.catch_warnings():  # read-only Arrow buffers: only ever read here
            warnings.filterwarnings("ignore", message=".*not writable")
            return torch.from_numpy(np.ascontiguousarray(x))

    def _float64_rows(self, xt, lo: int, hi: int):
        """Yield (start, stop, float64 block of rows [start, stop)), converted f16/f32 -> f32 ->
        f64 (the fastest path) a ``row_block`` at a time, so the copy stays in cache."""
        import torch

        center = None if self.center is None else torch.from_numpy(self.center)
        for start in range(lo, hi, self.row_block):
            stop = min(hi, start + self.row_block)
            block = xt[start:stop].to(torch.float32).to(torch.float64)
            yield start, stop, block if center is None else block - center

    def kernel_block(self, x: np.ndarray, unit: bool = False) -> np.ndarray:
        """(anchors x rows) Theta(a, x) (``unit``: cos(a, x)), float64 on the float32 grid: the
        same values ``score`` reduces, for the per-anchor top-k (``AnchorTopK``)."""
        import torch

        xt = self._rows_as_torch(x)
        anchors = self._torch64("unit" if unit else "features")
        out = torch.empty((self.n_anchors, xt.shape[0]), dtype=torch.float64)
        with torch.inference_mode():
            for start, stop, block in self._float64_rows(xt, 0, xt.shape[0]):
                k = anchors @ block.T
                out[:, start:stop] = _per_row_norm(k, block) if unit else k
        return round_scores(out.numpy())

    def score(self, x: np.ndarray, scorer: str) -> np.ndarray:
        """s(x) (float64 values on the float32 grid, one per row of x) for the scorers that
        reduce over anchors per row. ``x``: (rows x d) float16 or float32 (other dtypes are
        converted to float32 first)."""
        import torch

        if scorer not in ROW_SCORERS:
            raise ValueError(f"unknown scorer {scorer!r} (choose from {', '.join(ROW_SCORERS)})")
        xt = self._rows_as_torch(x)
        out = torch.empty(xt.shape[0], dtype=torch.float64)
        unit = scorer != "max" and scorer != "mean"
        reduce_to = self._torch64("unit_mean" if scorer == "cosine" else "mean") if scorer in ("mean", "cosine") else None
        anchors = None if reduce_to is not None else self._torch64("unit" if unit else "features")

        def rows(lo: int, hi: int) -> None:
            with torch.inference_mode():
                for start, stop, block in self._float64_rows(xt, lo, hi):
                    if reduce_to is not None:
                        s = torch.mv(block, reduce_to)
                    else:
                        s = torch.full((stop - start,), -torch.inf, dtype=torch.float64)
                        for a in range(0, self.n_anchors, self.anchor_block):
                            s = torch.maximum(s, (block @ anchors[a : a + self.anchor_block].T).amax(dim=1))
                    out[start:stop] = _per_row_norm(s, block) if unit else s

        # the rows are split over torch's intra-op threads (1 in a Ray task), each running
        # single-threaded ops; a row's score does not depend on which thread or block computes it
        n, before = xt.shape[0], torch.get_num_threads()
        threads = min(before, n // (4 * self.row_block))
        if threads <= 1:
            rows(0, n)
        else:
            from concurrent.futures import ThreadPoolExecutor

            cuts = [self.row_block * round(n * t / threads / self.row_block) for t in range(threads)] + [n]
            torch.set_num_threads(1)
            try:
                with ThreadPoolExecutor(threads) as pool:
                    list(pool.map(rows, cuts[:-1], cuts[1:]))
            finally:
                torch.set_num_threads(before)
        return round_scores(out.numpy())


def _per_row_norm(values, block):
    """``values`` (..., rows) divided by the norms of ``block``'s rows (zero rows: by 1):
    <x/|x|, v> = <x, v>/|x|, and max_a of it likewise, without a normalised copy of the block."""
    import torch

    norm = torch.linalg.vector_norm(block, dim=1)
    return values / torch.where(norm > 0, norm, 1.0)


def round_scores(scores: np.ndarray) -> np.ndarray:
    """float64 scores rounded to float32's 24-bit significand (kept as float64): the last-bit
    differences of float64 accumulation across BLAS libraries and block positions vanish, so
    duplicates tie exactly and near-ties are broken by key, the same way everywhere."""
    return np.asarray(scores, dtype=np.float64).astype(np.float32).astype(np.float64)


class AnchorTopK:
    """Exact running top-k per anchor of (score, key); mergeable across shards.

    ``scores`` / ``keys`` (anchors x w, w <= k) hold each anchor's best w entries, unordered
    (``sorted()`` orders them). Memory is O(anchors x k) for the state plus O(rows_per_chunk x
    width) scratch: blocks and merges are reduced a chunk of anchor rows at a time and a block's
    keys are never broadcast to (anchors x B). Once the state is full, a block is first cut by
    one comparison to the entries at or above each anchor's current k-th best score (nothing
    below it can ever get in); those few candidates are buffered and folded into the state
    only when about k per anchor have piled up, so on a large pool the cost per block is the
    comparison, not a re-selection of the whole (anchors x k) state."""

    # scratch entries (anchor rows x candidates) reduced at once; ~8 bytes each, a few times
    chunk_entries = 1 << 21

    def __init__(self, n_anchors: int, k: int):
        self.k = int(k)
        self._scores = np.empty((n_anchors, 0), dtype=np.float64)
        self._keys = np.empty((n_anchors, 0), dtype=np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []  # packed candidates, -inf padded
        self._pending_width = 0
        self._threshold = None  # each anchor's k-th best score while the state is full

    # the state, with buffered candidates folded in first
    @property
    def scores(self) -> np.ndarray:
        self._flush()
        return self._scores

    @property
    def keys(self) -> np.ndarray:
        self._flush()
        return self._keys

    @property
    def n_anchors(self) -> int:
        return self._scores.shape[0]

    def __getstate__(self):
        self._flush()
        return {"k": self.k, "scores": self._scores, "keys": self._keys}

    def __setstate__(self, state):
        self.__init__(state["scores"].shape[0], state["k"])
        self._set(np.asarray(state["scores"], dtype=np.float64), np.asarray(state["keys"], dtype=np.int64))

    def _set(self, scores: np.ndarray, keys: np.ndarray) -> None:
        self._scores, self._keys = scores, keys
        self._threshold = None
        if self.k > 0 and scores.shape[1] == self.k:
            threshold = scores.min(axis=1)
            if np.isfinite(threshold).all():
                self._threshold = threshold

    def _chunks(self, width: int):
        rows = self.n_anchors
        step = max(1, self.chunk_entries // max(1, width))
        for start in range(0, rows, step):
            yield slice(start, min(rows, start + step))

    def update(self, scores: np.ndarray, keys: np.ndarray) -> "AnchorTopK":
        """Add a block: scores (anchors x B) for rows with ``keys`` (B,)."""
        block = np.asarray(scores)
        if block.dtype != np.float32:  # float32 kernel blocks are selected as they are (exact)
            block = block.astype(np.float64, copy=False)
        block_keys = np.asarray(keys, dtype=np.int64)
        if block.ndim != 2 or block.shape[0] != self.n_anchors or block_keys.shape[-1] != block.shape[1]:
            raise ValueError(f"block of shape {block.shape} for {self.n_anchors} anchors and keys of shape {block_keys.shape}")
        if block_keys.ndim == 2 and block_keys.shape[0] == 1:
            block_keys = block_keys[0]
        elif block_keys.ndim != 1:
            block_keys = np.broadcast_to(block_keys, block.shape)
        if block.shape[1] == 0:
            return self
        if self._threshold is not None:
            packed = _above(block, block_keys, self._threshold)
            if packed is None:  # nothing can get in
                return self
            if 2 * packed[0].shape[1] <= block.shape[1]:
                self._pending.append(packed)
                self._pending_width += packed[0].shape[1]
                if self._pending_width >= max(1, self.k):
                    self._flush()
                return self
        self._flush()
        return self._absorb(block, block_keys)

    def merge(self, other: "AnchorTopK") -> "AnchorTopK":
        if other.n_anchors != self.n_anchors:
            raise ValueError(f"{other.n_anchors} anchors merged into a state of {self.n_anchors}")
        self._flush()
        return self._absorb(other.scores, other.keys)

    def _flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending, self._pending_width = self._pending, [], 0
        if len(pending) == 1:
            cand_s, cand_k = pending[0]
        else:
            cand_s = np.concatenate([p[0] for p in pending], axis=1)
            cand_k = np.concatenate([p[1] for p in pending], axis=1)
        del pending
        # already cut by the threshold; the state is full with finite scores, so the -inf pads
        # can never get in
        self._absorb(cand_s, cand_k, prune=False)

    def _absorb(self, scores: np.ndarray, keys: np.ndarray, prune: bool = True) -> "AnchorTopK":
        """Merge candidates (anchors x w; keys (w,) or (anchors x w)) into the state, a chunk of
        anchor rows at a time. Always builds new arrays: the state never aliases its input
        (possibly a read-only object-store buffer)."""
        have = self._scores.shape[1]
        out_w = min(self.k, have + scores.shape[1])
        out_s = np.empty((scores.shape[0], out_w), dtype=np.float64)
        out_k = np.empty((scores.shape[0], out_w), dtype=np.int64)
        for rows in self._chunks(have + scores.shape[1]):
            out_s[rows], out_k[rows] = _merge_rows(self._scores[rows], self._keys[rows], scores[rows],
                                                   keys if keys.ndim == 1 else keys[rows], self.k, prune)
        self._set(out_s, out_k)
        return self

    def sorted(self) -> tuple[np.ndarray, np.ndarray]:
        """(scores, keys) per anchor ordered by score descending, key ascending."""
        scores, keys = self.scores, self.keys
        order = np.lexsort((keys, -scores), axis=1)
        return np.take_along_axis(scores, order, 1), np.take_along_axis(keys, order, 1)


def _above(cand_s: np.ndarray, cand_k: np.ndarray, threshold: np.ndarray):
    """Per row, the candidates scoring >= the row's threshold (a superset is fine: it only
    filters), packed to the left of a (rows x widest) float64 array padded with -inf (keys
    (rows x widest), pads 0); None when there are none."""
    if cand_s.dtype == np.float32:
        # compare in float32 (no float64 copy of the block) against the threshold rounded down
        t32 = threshold.astype(np.float32)
        low = t32 > threshold
        t32[low] = np.nextafter(t32[low], np.float32(-np.inf))
        threshold = t32
    mask = cand_s >= threshold[:, None]
    counts = np.count_nonzero(mask, axis=1)
    widest = int(counts.max()) if counts.size else 0
    if widest == 0:
        return None
    rows, width = cand_s.shape
    flat = np.flatnonzero(mask)  # row-major: grouped by row
    r = flat // width
    pos = np.arange(flat.size) - np.repeat(np.cumsum(counts) - counts, counts)
    dest = r * widest + pos
    packed_s = np.full(rows * widest, -np.inf)
    packed_k = np.zeros(rows * widest, dtype=np.int64)
    packed_s[dest] = cand_s.reshape(-1)[flat] if cand_s.flags.c_contiguous else cand_s[mask]
    if cand_k.ndim == 1:
        packed_k[dest] = cand_k[flat - r * width]
    else:
        packed_k[dest] = cand_k[mask]
    return packed_s.reshape(rows, widest), packed_k.reshape(rows, widest)


def _merge_rows(state_s, state_k, cand_s, cand_k, k: int, prune: bool = True):
    """The k best by (score desc, key asc) of each row's state (rows x w, w <= k, exactly its
    own top-w) and candidates (rows x c; keys (c,) shared by all rows or (rows x c)).

    When the state is full, a candidate below the row's current k-th best score can never get
    in, so only candidates >= that threshold are kept (packed, padded with -inf) before the
    selection: on a large pool almost every candidate is dropped by one comparison."""
    rows, c = cand_s.shape
    if c == 0:
        return state_s, state_k
    if prune and state_s.shape[1] == k and k > 0:
        threshold = state_s.min(axis=1)
        if np.isfinite(threshold).all():
            packed = _above(cand_s, cand_k, threshold)
            if packed is None:
                return state_s, state_k
            if 2 * packed[0].shape[1] <= c:
                cand_s, cand_k = packed
    if cand_s.shape[1] > k and (cand_k.ndim == 1 or state_s.shape[1] == 0):
        # a wide block with shared keys (or no state yet): its own top-k first. Not for -inf
        # padded candidates against a full state: a row with fewer than k real candidates would
        # look tied at -inf and take the slow exact path.
        cand_s, cand_k = _top_k_rows(cand_s, cand_k, k)
    if cand_k.ndim == 1:
        cand_k = np.broadcast_to(cand_k, cand_s.shape)
    if state_s.shape[1] == 0:
        return cand_s, cand_k
    return _top_k_rows(np.concatenate([state_s, cand_s], axis=1), np.concatenate([state_k, cand_k], axis=1), k)


def _top_k_rows(scores: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best by (score desc, key asc). ``keys`` is (width,) shared by every row
    or (rows x width). argpartition picks a top-k set; rows where a tie straddles the k-th place
    are redone with a full lexsort so the choice is exact."""
    shared = keys.ndim == 1
    width = scores.shape[1]
    if width <= k:
        return scores, (np.broadcast_to(keys, scores.shape) if shared else keys)
    part = np.argpartition(np.negative(scores), k - 1, axis=1)[:, :k]
    top_s = np.take_along_axis(scores, part, 1)
    top_k = keys[part] if shared else np.take_along_axis(keys, part, 1)
    threshold = top_s.min(axis=1)
    ambiguous = np.nonzero(np.count_nonzero(scores >= threshold[:, None], axis=1) > k)[0]
    for r in ambiguous:
        row_keys = keys if shared else keys[r]
        order = np.lexsort((row_keys, -scores[r]))[:k]
        top_s[r], top_k[r] = scores[r, order], row_keys[order]
    return top_s, top_k


def round_robin_order(topk: AnchorTopK, budget: int) -> list[int]:
    """Keys picked by anchors in turn (anchor 0's best, anchor 1's best, ..., then each one's
    second best, skipping rows already picked) until ``budget`` keys or the lists run out."""
    _, keys = topk.sorted()
    picked: list[int] = []
    seen: set[int] = set()
    for rank in range(keys.shape[1]):
        for anchor in range(keys.shape[0]):
            key = int(keys[anchor, rank])
            if key not in seen:
                seen.add(key)
                picked.append(key)
                if len(picked) == budget:
                    return picked
    return picked
