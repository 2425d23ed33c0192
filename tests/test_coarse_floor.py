"""The coarse stage's embeddings and the options that make them cheaper (issue 15 item 5):

* batches: an embedding does not depend on which rows share its batch (length-bucketed batches
  of any size give the one-row-at-a-time embeddings, within float rounding);
* ``--embed-layer K``: equals the mean-pool of ``hidden_states[K]`` from a plain full forward
  with ``output_hidden_states=True`` (the reference), although the pass stops at layer K;
* ``--embed-max-tokens T``: equals the mean over the first T positions of the full row's final
  hidden states (causal attention);
* ``--system-prompt none``: rows render without the chat template's default system turn,
  token for token what a copy of the template without that turn gives (demo tokenizer); rows
  with their own system message, text rows and templates without a default are unchanged.
"""

from __future__ import annotations

import copy

import pytest
import torch

from ntk_ray.core.features import mean_pooled_embeddings


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from ntk_ray.models import load_model

    return load_model(str(tiny_model_dir), dtype="float32", device="cpu").eval()


def _rows(n=13, seed=0, vocab=40):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _reference(model, seqs, layer=None, first=None):
    """One row at a time, no padding: mean over positions < first of hidden_states[layer] of a
    full forward (layer None: the last entry, the final hidden states after the norm)."""
    out = []
    with torch.no_grad():
        for s in seqs:
            h = model.model(input_ids=torch.tensor([s]), output_hidden_states=True).hidden_states
            x = h[-1 if layer is None else layer][0, : first or len(s)].float().mean(0)
            out.append(torch.nn.functional.normalize(x, dim=0))
    return torch.stack(out)


def test_bucketed_batches_equal_one_row_at_a_time(tiny):
    seqs = _rows()
    alone = mean_pooled_embeddings(tiny, seqs, max_tokens=1)  # every row its own batch: no padding
    for max_tokens in (40, 120, 100_000):  # several rows per length-sorted batch, then one padded batch
        got = mean_pooled_embeddings(tiny, seqs, max_tokens=max_tokens)
        assert torch.allclose(got, alone, atol=2e-6), max_tokens
    assert torch.allclose(alone, _reference(tiny, seqs), atol=2e-6)
    # shuffling the rows (other batch neighbours) permutes the embeddings, nothing else
    perm = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(1)).tolist()
    shuffled = mean_pooled_embeddings(tiny, [seqs[i] for i in perm], max_tokens=120)
    assert torch.allclose(shuffled, alone[perm], atol=2e-6)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_embed_layer_is_hidden_states_k_of_a_full_forward(tiny, layer):
    seqs = _rows(seed=2)
    got = mean_pooled_embeddings(tiny, seqs, max_tokens=64, layer=layer)
    assert torch.allclose(got, _reference(tiny, seqs, layer=layer), atol=2e-6)
    if layer == 2:  # L: the final hidden states, today's default
        assert torch.allclose(got, mean_pooled_embeddings(tiny, seqs, max_tokens=64), atol=1e-7)
    else:
        assert not torch.allclose(got, _reference(tiny, seqs), atol=1e-3)


def test_embed_layer_stops_the_forward_pass(tiny):
    """Layers after K never run (the point of the option)."""
    ran = []
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, layer in enumerate(tiny.model.layers)]
    try:
        mean_pooled_embeddings(tiny, _rows(n=3), layer=1)
    finally:
        for h in handles:
            h.remove()
    assert ran == [0]
    with pytest.raises(ValueError, match="--embed-layer 3: the model has 2 decoder layers"):
        mean_pooled_embeddings(tiny, _rows(n=2), layer=3)


def test_embed_max_tokens_is_the_mean_over_the_first_t_positions(tiny):
    seqs = _rows(seed=3)
    for t in (1, 5):
        got = mean_pooled_embeddings(tiny, seqs, max_tokens=64, max_row_tokens=t)
        want = torch.stack([_reference(tiny, [s], first=min(t, len(s)))[0] for s in seqs])
        assert torch.allclose(got, want, atol=2e-6), t
    both = mean_pooled_embeddings(tiny, seqs, max_tokens=64, layer=1, max_row_tokens=4)
    want = torch.stack([_reference(tiny, [s], layer=1, first=min(4, len(s)))[0] for s in seqs])
    assert torch.allclose(both, want, atol=2e-6)


# ------------------------------------------------------------------------------------------------
# --system-prompt

SMOL_DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def _without_default(tok):
    """A copy of the demo tokenizer whose template never writes the default system turn."""
    t = copy.deepcopy(tok)
    branch = t.chat_template[t.chat_template.index("{% if loop.first"):t.chat_template.index("{% endif %}") + 11]
    assert SMOL_DEFAULT in branch
    t.chat_template = t.chat_template.replace(branch, "")
    return t


@pytest.mark.demo
def test_system_prompt_none_drops_the_default_turn(tok):
    from ntk_ray.core.tokenize import default_system_block, tokenize_batch

    lead, block = default_system_block(tok)
    assert lead == "" and SMOL_DEFAULT in block and block.startswith("<|im_start|>system")
    plain = _without_default(tok)
    prompts, responses = ["What is a pear?", "Name a colour.\n\nOne word."], ["A fruit.", " Blue"]
    none = tokenize_batch(tok, prompts=prompts, responses=responses, max_length=256, system_prompt="none")
    ref = tokenize_batch(plain, prompts=prompts, responses=responses, max_length=256)
    default = tokenize_batch(tok, prompts=prompts, responses=responses, max_length=256)
    assert (none.input_ids, none.loss_mask, none.score_mask) == (ref.input_ids, ref.loss_mask, ref.score_mask)
    n_block = len(tok(block, add_special_tokens=False)["input_ids"])
    assert [d - n for d, n in zip(default.n_tokens, none.n_tokens)] == [n_block] * 2
    assert all(SMOL_DEFAULT not in tok.decode(ids) for ids in none.input_ids)
    assert all(SMOL_DEFAULT in tok.decode(ids) for ids in default.input_ids)
    # conversations: the same, turn by turn; a row with its own system message is unchanged
    convs = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
              {"role": "user", "content": "And?"}, {"role": "assistant", "content": "Bye."}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
              {"role": "assistant", "content": "Yo."}]]
    none = tokenize_batch(tok, messages=convs, max_length=256, system_prompt="none")
    ref = tokenize_batch(plain, messages=convs, max_length=256)
    default = tokenize_batch(tok, messages=convs, max_length=256)
    assert none.reject == [None, None]
    assert (none.input_ids, none.loss_mask, none.score_mask) == (ref.input_ids, ref.loss_mask, ref.score_mask)
    assert none.input_ids[1] == default.input_ids[1] and none.n_tokens[0] == default.n_tokens[0] - n_block
    # text rows never use the template
    assert tokenize_batch(tok, texts=["a b"], max_length=16, system_prompt="none").input_ids == \
        tokenize_batch(tok, texts=["a b"], max_length=16).input_ids
    with pytest.raises(ValueError, match="system_prompt"):
        tokenize_batch(tok, texts=["a"], max_length=8, system_prompt="short")


def test_system_prompt_none_changes_nothing_without_a_default(tiny_chat_model_dir):
    from transformers import AutoTokenizer

    from ntk_ray.core.tokenize import default_system_block, tokenize_batch

    t = AutoTokenizer.from_pretrained(str(tiny_chat_model_dir))
    assert default_system_block(t)[1] == ""
    kw = {"prompts": ["what is a"], "responses": ["w1 w2"], "max_length": 32}
    assert tokenize_batch(t, **kw, system_prompt="none").input_ids == tokenize_batch(t, **kw).input_ids
