"""``tiny_llama``: a small random-weight Llama built from a config (no download, no file), for
tests and benchmarks that need a real transformers causal LM in milliseconds. Its weights are
drawn from its own seed with the global RNG restored afterwards, and its LM head is untied, so
the embedding and head gradients are separate parameters."""

from __future__ import annotations

import torch


def tiny_llama(
    vocab_size: int = 128,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    *,
    attn_implementation: str | None = None,
):
    """A random-weight LlamaForCausalLM (no download), deterministic for ``seed``, untied LM head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()
