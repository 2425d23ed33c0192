"""Coarse stage: reverse-kNN votes on mean-pooled embeddings (pool C -> M candidates).

Every domain sample a picks its K nearest pool rows by cosine of the L2-normalised mean-pooled
final hidden states (``features.mean_pooled_embeddings``); a pool row's score is its vote count

    votes(x) = |{a in D_t : x in kNN_K(a)}|,   sim(x) = sum of cos(x, a) over those a,

and the top M rows by (votes desc, sim desc, key asc) go on to the NTK stage. The per-anchor
kNN lists are ``scoring.AnchorTopK`` states, built shard by shard (``stages.kernel.merge_topk``)
and merged exactly; ``reference.knn_block`` is the one-block form the tests use.

Cheaper embeddings (``--embed-layer K``, ``--embed-max-tokens T``): with h^(K)_t the hidden
state at position t after K decoder layers (``hidden_states[K]`` of transformers: K = 0 the token
embeddings, K = L the final layer after its norm, today's default),

    e(x) = normalize( (1/T') sum_{t < T'} h^(K)_t ),   T' = min(len(x), T),

computed by a forward pass that stops at layer K (:func:`hidden_states_at`: a pre-hook on
decoder layer K keeps its input and stops the pass) over the first T' tokens only (under causal
attention their hidden states are those of the whole row). Cost: about K / L of the layers' FLOPs
(the embedding lookup aside) and min(len, T) / len of the tokens. The anchors and the pool rows
are embedded with the same K and T. Batches are padded on the right and pooled under the
attention mask, so an embedding does not depend on the other rows of its batch (beyond float
rounding: tests/test_coarse_floor.py).
"""

from __future__ import annotations

import polars as pl
import torch

from ntk_ray.core.scoring import AnchorTopK


class _Stopped(Exception):
    """Raised by the pre-hook of :func:`hidden_states_at` to end a forward pass early."""


def decoder_layers(backbone: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder's list of layers: the ModuleList child with ``config.num_hidden_layers``
    entries (``layers`` in Llama, Qwen, Mistral, Gemma; ``h`` in GPT-2)."""
    n = getattr(getattr(backbone, "config", None), "num_hidden_layers", None)
    for child in backbone.children():
        if isinstance(child, torch.nn.ModuleList) and (n is None or len(child) == n):
            return child
    raise ValueError(f"{type(backbone).__name__}: cannot find its list of decoder layers (--embed-layer)")


def hidden_states_at(backbone: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     layer: int | None = None) -> torch.Tensor:
    """Hidden states (B, T, H) after ``layer`` decoder layers: ``hidden_states[layer]`` of a full
    forward with ``output_hidden_states=True``, but the pass stops at layer ``layer`` (a forward
    pre-hook on it keeps its input and raises). ``None`` or L: the final hidden states, after
    the final norm (``last_hidden_state``)."""
    layers = decoder_layers(backbone) if layer is not None else None
    if layer is None or layer == len(layers):
        return backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    if not 0 <= layer < len(layers):
        raise ValueError(f"--embed-layer {layer}: the model has {len(layers)} decoder layers (0..{len(layers)})")
    kept = {}

    def stop(module, args, kwargs):
        kept["h"] = args[0] if args else kwargs["hidden_states"]
        raise _Stopped

    handle = layers[layer].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        backbone(input_ids=input_ids, attention_mask=attention_mask)
    except _Stopped:
        pass
    finally:
        handle.remove()
    return kept["h"]


def masked_mean_normalized(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """normalize(sum_t m_t h_t / sum_t m_t) per row, in float32 (B, H)."""
    m = attention_mask.to(torch.float32).unsqueeze(-1)
    pooled = (hidden.float() * m).sum(1) / m.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def votes(topk: AnchorTopK) -> pl.DataFrame:
    """key, coarse_votes (int64), coarse_sim (float64) for every pool row that got a vote."""
    keys = topk.keys.ravel()
    sims = topk.scores.ravel()
    if keys.size == 0:
        return pl.DataFrame(schema={"key": pl.Int64, "coarse_votes": pl.Int64, "coarse_sim": pl.Float64})
    return (
        pl.DataFrame({"key": keys, "sim": sims})
        .group_by("key")
        .agg(pl.len().cast(pl.Int64).alias("coarse_votes"), pl.col("sim").sum().alias("coarse_sim"))
    )


def coarse_order(pool_keys: pl.DataFrame, vote_table: pl.DataFrame) -> pl.DataFrame:
    """All pool rows (``pool_keys`` has a ``key`` column) with their votes (0 when none),
    sorted best first: votes desc, summed similarity desc, key asc."""
    return (
        pool_keys.join(vote_table, on="key", how="left")
        .with_columns(pl.col("coarse_votes").fill_null(0), pl.col("coarse_sim").fill_null(0.0))
        .sort(["coarse_votes", "coarse_sim", "key"], descending=[True, True, False])
    )
