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

``AnchorTopK`` keeps, per anchor, the k best (score, key) pairs seen so far, ordered by score
descending then key ascending, so merging partial results from any sharding of the pool gives
exactly the result of one full sort. The coarse stage's kNN votes use the same structure.
"""

from __future__ import annotations

import hashlib

import numpy as np

SCORERS = ("mean", "cosine", "max", "round-robin")


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
    """The anchors' features and the reductions the scorers need, computed once."""

    def __init__(self, anchor_features: np.ndarray, anchor_block: int = 1024):
        a = np.asarray(anchor_features, dtype=np.float32)
        if a.ndim != 2 or a.shape[0] == 0:
            raise ValueError("need a non-empty (anchors x d) feature matrix")
        if not np.isfinite(a).all():
            raise ValueError("anchor features contain NaN or inf")
        self.features = a
        self.unit = _unit_rows(a)
        self.mean = a.mean(axis=0, dtype=np.float64)
        self.unit_mean = self.unit.mean(axis=0, dtype=np.float64)
        self.anchor_block = anchor_block

    @property
    def n_anchors(self) -> int:
        return self.features.shape[0]

    def blocks(self, x: np.ndarray, unit: bool = False):
        """Yield (start, kernel block (B x a_block)) over anchor blocks: never B x all anchors
        at once when the anchor set is large."""
        anchors = self.unit if unit else self.features
        rows = _unit_rows(x) if unit else x
        for start in range(0, self.n_anchors, self.anchor_block):
            yield start, rows @ anchors[start : start + self.anchor_block].T

    def score(self, x: np.ndarray, scorer: str) -> np.ndarray:
        """s(x) (float64, one per row of x) for the scorers that reduce over anchors per row."""
        x = np.asarray(x, dtype=np.float32)
        if scorer == "mean":
            return x.astype(np.float64) @ self.mean
        if scorer == "cosine":
            return _unit_rows(x).astype(np.float64) @ self.unit_mean
        if scorer in ("max", "round-robin"):
            best = np.full(x.shape[0], -np.inf)
            for _, block in self.blocks(x, unit=scorer == "round-robin"):
                best = np.maximum(best, block.max(axis=1))
            return best
        raise ValueError(f"unknown scorer {scorer!r} (choose from {', '.join(SCORERS)})")


class AnchorTopK:
    """Exact running top-k per anchor of (score, key); mergeable across shards.

    Memory is O(anchors x k) for the state plus O(rows_per_chunk x width) scratch: blocks and
    merges are reduced a chunk of anchor rows at a time, a block is cut to its own top-k before
    it meets the state, and the block's keys are never broadcast to (anchors x B)."""

    # scratch entries (anchor rows x candidates) reduced at once; ~8 bytes each, a few times
    chunk_entries = 1 << 22

    def __init__(self, n_anchors: int, k: int):
        self.k = int(k)
        self.scores = np.empty((n_anchors, 0), dtype=np.float64)
        self.keys = np.empty((n_anchors, 0), dtype=np.int64)

    def _chunks(self, width: int):
        rows = self.scores.shape[0]
        step = max(1, self.chunk_entries // max(1, width))
        for start in range(0, rows, step):
            yield slice(start, min(rows, start + step))

    def update(self, scores: np.ndarray, keys: np.ndarray) -> "AnchorTopK":
        """Add a block: scores (anchors x B) for rows with ``keys`` (B,)."""
        block = np.asarray(scores)
        if block.dtype != np.float32:  # float32 kernel blocks are selected as they are (exact)
            block = block.astype(np.float64, copy=False)
        block_keys = np.asarray(keys, dtype=np.int64)
        if block.ndim != 2 or block.shape[0] != self.scores.shape[0] or block_keys.shape[-1] != block.shape[1]:
            raise ValueError(f"block of shape {block.shape} for {self.scores.shape[0]} anchors and keys of shape {block_keys.shape}")
        if block_keys.ndim == 2 and block_keys.shape[0] == 1:
            block_keys = block_keys[0]
        elif block_keys.ndim != 1:
            block_keys = np.broadcast_to(block_keys, block.shape)
        have = self.scores.shape[1]
        out_w = min(self.k, have + block.shape[1])
        out_s = np.empty((block.shape[0], out_w), dtype=np.float64)
        out_k = np.empty((block.shape[0], out_w), dtype=np.int64)
        for rows in self._chunks(block.shape[1] + have):
            # the block's own top-k first (no (anchors x B) keys or float64 copy), then the state
            s, k = _top_k_rows(block[rows], block_keys if block_keys.ndim == 1 else block_keys[rows], self.k)
            if have:
                s, k = _top_k_rows(np.concatenate([self.scores[rows], s], axis=1),
                                   np.concatenate([self.keys[rows], np.broadcast_to(k, s.shape)], axis=1), self.k)
            out_s[rows], out_k[rows] = s, k
        self.scores, self.keys = out_s, out_k
        return self

    def merge(self, other: "AnchorTopK") -> "AnchorTopK":
        scores, keys = other.scores, other.keys
        if scores.shape[0] != self.scores.shape[0]:
            raise ValueError(f"{scores.shape[0]} anchors merged into a state of {self.scores.shape[0]}")
        width = self.scores.shape[1] + scores.shape[1]
        out_s = np.empty((scores.shape[0], min(self.k, width)), dtype=np.float64)
        out_k = np.empty((scores.shape[0], min(self.k, width)), dtype=np.int64)
        for rows in self._chunks(width):
            # always copies: the state never aliases ``other`` (possibly a read-only object-store buffer)
            s, k = _top_k_rows(np.concatenate([self.scores[rows], scores[rows]], axis=1),
                               np.concatenate([self.keys[rows], keys[rows]], axis=1), self.k)
            out_s[rows], out_k[rows] = s, k
        self.scores, self.keys = out_s, out_k
        return self

    def sorted(self) -> tuple[np.ndarray, np.ndarray]:
        """(scores, keys) per anchor ordered by score descending, key ascending."""
        order = np.lexsort((self.keys, -self.scores), axis=1)
        return np.take_along_axis(self.scores, order, 1), np.take_along_axis(self.keys, order, 1)


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
