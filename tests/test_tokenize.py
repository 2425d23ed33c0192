"""ntk_ray.tokenize: token ids, the loss mask and the scored positions R(x)."""

from __future__ import annotations

import pytest

from ntk_ray.core.tokenize import Tokenized, end_of_turn, has_chat_template, tokenize_batch

pytestmark = pytest.mark.demo

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"

PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Add 12 and 30.", "12 + 30 = 42"),
    ("Translate 'chat' to English.", "Cat.\n\nIt can also mean a conversation."),
    ("", "An answer to nothing."),
    ("Write a haiku about rain", "Soft rain on the roof\nwhispers to the sleeping town\npuddles hold the sky"),
]


def _masked(ids, mask):
    return [i for i, m in zip(ids, mask) if m]


def _check_shift(out: Tokenized, i: int):
    loss, score = out.loss_mask[i], out.score_mask[i]
    assert len(out.input_ids[i]) == len(loss) == len(score) == out.n_tokens[i]
    assert score == loss[1:] + [0]  # position t predicts token t+1
    assert loss[0] == 0


# --------------------------------------------------------------------------------------------
# chat template facts


def test_smollm2_template_facts(tok):
    assert has_chat_template(tok)
    user = [{"role": "user", "content": "Hi"}]
    prompt = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    assert prompt == SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"  # default system prompt
    full = tok.apply_chat_template(user + [{"role": "assistant", "content": "Hello!"}], tokenize=False)
    assert full == prompt + "Hello!<|im_end|>\n"
    marker, ids = end_of_turn(tok)
    assert marker == "<|im_end|>" and ids == [tok.eos_token_id] == [2]
    assert tok("a", add_special_tokens=True)["input_ids"] == tok("a", add_special_tokens=False)["input_ids"]  # no BOS


def test_prefix_property_chat_template(tok):
    """prompt part + response part == the full [user, assistant] conversation minus its trailing newline."""
    prompts, responses = zip(*PAIRS)
    out = tokenize_batch(tok, prompts=prompts, responses=responses, max_length=512)
    for i, (p, r) in enumerate(PAIRS):
        conv = [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
        full = tok.apply_chat_template(conv, tokenize=True, return_dict=False)
        assert out.input_ids[i] == full[:-1], (p, r)
        assert tok.decode(full[-1:]) == "\n"
        gen = tok.apply_chat_template(conv[:1], add_generation_prompt=True, tokenize=True, return_dict=False)
        assert out.input_ids[i][: len(gen)] == gen
        assert out.loss_mask[i].index(1) == len(gen)


def test_prompt_response_masks_are_exactly_the_response(tok):
    prompts, responses = zip(*PAIRS)
    out = tokenize_batch(tok, prompts=prompts, responses=responses, max_length=512)
    assert out.reject == [None] * len(PAIRS)
    assert out.truncated == [False] * len(PAIRS)
    for i, (p, r) in enumerate(PAIRS):
        _check_shift(out, i)
        ids, loss = out.input_ids[i], out.loss_mask[i]
        assert tok.decode(_masked(ids, loss)) == r + "<|im_end|>"
        # the positions whose logits are scored predict exactly those tokens
        predicted = [ids[t + 1] for t, s in enumerate(out.score_mask[i]) if s]
        assert tok.decode(predicted) == r + "<|im_end|>"
        assert tok.decode([x for x, m in zip(ids, loss) if not m]).startswith(SYSTEM)
        assert ids[-1] == tok.eos_token_id


def test_batch_equals_row_by_row(tok):
    prompts, responses = zip(*PAIRS)
    batch = tokenize_batch(tok, prompts=prompts, responses=responses, max_length=64)
    for i, (p, r) in enumerate(PAIRS):
        one = tokenize_batch(tok, prompts=[p], responses=[r], max_length=64)
        assert one.input_ids[0] == batch.input_ids[i]
        assert one.loss_mask[0] == batch.loss_mask[i]
        assert one.score_mask[0] == batch.score_mask[i]


def test_without_chat_template(plain_tok):
    out = tokenize_batch(plain_tok, prompts=["Question: 2+2?\nAnswer:"], responses=[" 4"], max_length=64)
    p = plain_tok("Question: 2+2?\nAnswer:", add_special_tokens=False)["input_ids"]
    r = plain_tok(" 4", add_special_tokens=False)["input_ids"]
    assert out.input_ids[0] == p + r + [plain_tok.eos_token_id]
    assert out.loss_mask[0] == [0] * len(p) + [1] * (len(r) + 1)
    _check_shift(out, 0)
    assert plain_tok.decode(_masked(out.input_ids[0], out.loss_mask[0])) == " 4<|im_end|>"


# --------------------------------------------------------------------------------------------
# text rows


def test_text_rows(tok):
    texts = ["Hello world, this is a plain text row.", "x"]
    out = tokenize_batch(tok, texts=texts, max_length=64)
    for i, t in enumerate(texts):
        ids = out.input_ids[i]
        assert ids == tok(t)["input_ids"]
        assert tok.decode(ids) == t
        assert out.loss_mask[i] == [0] + [1] * (len(ids) - 1)
        assert out.score_mask[i] == [1] * len(ids)
        assert out.n_tokens[i] == len(ids)
    assert out.reject == [None, None] and out.truncated == [False, False]


def test_text_truncate_and_reject(tok):
    text = " ".join(["word"] * 50)
    n = len(tok(text)["input_ids"])
    out = tokenize_batch(tok, texts=[text], max_length=10)
    assert out.truncated == [True] and out.n_tokens == [10]
    assert out.input_ids[0] == tok(text)["input_ids"][:10]
    assert out.score_mask[0] == [1] * 10
    out = tokenize_batch(tok, texts=[text], max_length=10, on_too_long="reject")
    assert out.reject == [f"{n} tokens > --max-length 10"]
    assert out.input_ids == [[]] and out.loss_mask == [[]] and out.score_mask == [[]] and out.n_tokens == [0]


# --------------------------------------------------------------------------------------------
# too long / unusable rows


def test_truncate_cuts_the_response(tok):
    p, r = "Tell me a story.", " ".join(["once upon a time"] * 40)
    prompt_len = len(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False))
    out = tokenize_batch(tok, prompts=[p], responses=[r], max_length=prompt_len + 5)
    assert out.reject == [None] and out.truncated == [True]
    assert out.n_tokens == [prompt_len + 5]
    assert sum(out.loss_mask[0]) == sum(out.score_mask[0]) == 5
    assert out.score_mask[0][prompt_len - 1] == 1 and out.score_mask[0][-1] == 0  # last kept position predicts nothing
    _check_shift(out, 0)
    assert r.startswith(tok.decode(_masked(out.input_ids[0], out.loss_mask[0])))


def test_prompt_too_long_is_rejected_when_truncating(tok):
    p = "Explain: " + "very " * 100
    prompt_len = len(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False))
    out = tokenize_batch(tok, prompts=[p, "ok?"], responses=["fine", "yes"], max_length=50)
    assert out.reject[0] == f"prompt longer than --max-length ({prompt_len} tokens)"
    assert out.input_ids[0] == [] and out.n_tokens[0] == 0
    assert out.reject[1] is None and out.truncated[1] is False


def test_reject_mode(tok):
    p, r = "Q", " ".join(["answer"] * 80)
    out = tokenize_batch(tok, prompts=[p], responses=[r], max_length=40, on_too_long="reject")
    n = len(tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=True, return_dict=False)) - 1
    assert out.reject == [f"{n} tokens > --max-length 40"]
    assert out.input_ids == [[]] and out.truncated == [False]


def test_unusable_rows_keep_their_place(tok):
    prompts = ["a", "b", None, "d", 5, "f"]
    responses = ["fine", "   \n", "x", None, "y", "good"]
    out = tokenize_batch(tok, prompts=prompts, responses=responses, max_length=128)
    assert out.reject == [None, "empty response", "missing prompt", "missing response", "prompt is not a string (int)", None]
    assert len(out) == 6
    assert [len(x) > 0 for x in out.input_ids] == [True, False, False, False, False, True]
    assert tok.decode(_masked(out.input_ids[5], out.loss_mask[5])) == "good<|im_end|>"
    texts = ["", "  ", None, 3.5, "ok"]
    out = tokenize_batch(tok, texts=texts, max_length=16)
    assert out.reject == ["empty text", "empty text", "missing text", "text is not a string (float)", None]


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match="on_too_long"):
        tokenize_batch(tok, texts=["a"], max_length=8, on_too_long="drop")
    with pytest.raises(ValueError, match="either texts or prompts"):
        tokenize_batch(tok, texts=["a"], prompts=["b"], responses=["c"], max_length=8)
    with pytest.raises(ValueError, match="both prompts and responses"):
        tokenize_batch(tok, prompts=["b"], max_length=8)
    with pytest.raises(ValueError, match="1 prompts but 2 responses"):
        tokenize_batch(tok, prompts=["b"], responses=["c", "d"], max_length=8)
    with pytest.raises(ValueError, match="max-length"):
        tokenize_batch(tok, texts=["a"], max_length=0)
    empty = tokenize_batch(tok, texts=[], max_length=8)
    assert len(empty) == 0
