"""Held-out evaluation: multiple-choice accuracy and the loss (tiny random model, demo tokenizer, no Ray)."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch

from conftest import build_tiny_lora_model
from ntk_ray.core.evaluation import choice_accuracy, choice_log_likelihoods, evaluate_rows, resolve_answers
from ntk_ray.core.tokenize import has_chat_template, tokenize_batch
from ntk_ray.core.training import mean_token_loss

pytestmark = pytest.mark.demo  # the demo tokenizer

PROMPTS = [
    "What is the capital of France?",
    "Which animal says moo?",
    "2 + 2 = ?",
    "Pick the colour of the sky on a clear day.",
    "Which is a prime number?",
]
CHOICES = [
    ["Paris", "Lyon", "Berlin, the capital of Germany"],
    ["A cow", "A cat"],
    ["4", "5", "22", "four"],
    ["blue", "green", "a deep and very bright red"],
    ["9", "7", "15"],
]


@pytest.fixture(scope="module")
def model(tok):
    return build_tiny_lora_model(seed=5, vocab=len(tok))


def reference_mean_ll(model, tokenizer, prompt: str, choice: str) -> float:
    """One forward per prompt + choice, built by hand (not via tokenize.py), log-probs summed by hand."""
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        prefix = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        prefix = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    answer = tokenizer(choice, add_special_tokens=False)["input_ids"]
    ids = prefix + answer
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    total = sum(float(logp[t - 1, ids[t]]) for t in range(len(prefix), len(ids)))
    return total / len(answer)


@pytest.mark.parametrize("chat", [True, False])
def test_choice_log_likelihoods_match_a_slow_per_choice_reference(model, tok, plain_tok, chat):
    tokenizer = tok if chat else plain_tok
    got = choice_log_likelihoods(model, tokenizer, PROMPTS, CHOICES, max_length=128, batch_tokens=90)  # several padded batches
    for row, (p, opts) in enumerate(zip(PROMPTS, CHOICES)):
        want = [reference_mean_ll(model, tokenizer, p, c) for c in opts]
        assert got[row].dtype == np.float64 and got[row].shape == (len(opts),)
        np.testing.assert_allclose(got[row], want, rtol=1e-4, atol=1e-4)


def test_choice_accuracy_counts_argmax_hits_and_accepts_answer_text(model, tok):
    want_pred = [int(np.argmax([reference_mean_ll(model, tok, p, c) for c in opts])) for p, opts in zip(PROMPTS, CHOICES)]
    # rows 0, 2, 4 labelled with the model's own pick, rows 1 and 3 with another choice: accuracy 3/5
    answers = [pred if row % 2 == 0 else (pred + 1) % len(CHOICES[row]) for row, pred in enumerate(want_pred)]
    got = choice_accuracy(model, tok, PROMPTS, CHOICES, answers, max_length=128)
    assert got["predictions"] == want_pred
    assert got["accuracy"] == pytest.approx(3 / 5)
    assert got["rows"] == 5 and got["skipped"] == 0
    assert got["choices_per_row"] == pytest.approx(sum(map(len, CHOICES)) / 5)
    as_text = [CHOICES[row][a] for row, a in enumerate(answers)]
    assert choice_accuracy(model, tok, PROMPTS, CHOICES, as_text, max_length=128) == got
    mixed = [a if row % 2 else CHOICES[row][a] for row, a in enumerate(answers)]
    assert choice_accuracy(model, tok, PROMPTS, CHOICES, mixed, max_length=128)["accuracy"] == pytest.approx(3 / 5)


def test_rows_whose_choices_do_not_fit_are_skipped_and_counted(model, tok):
    prompts = PROMPTS[:2]
    choices = [CHOICES[0], ["A cow", "word " * 200]]
    got = choice_accuracy(model, tok, prompts, choices, [0, 0], max_length=64)
    assert got["rows"] == 1 and got["skipped"] == 1 and got["predictions"][1] == -1
    assert got["choices_per_row"] == 3
    assert choice_log_likelihoods(model, tok, prompts, choices, max_length=64)[1] is None


@pytest.mark.parametrize("answers,match", [
    ([3, 0], "out of range"),
    ([-1, 0], "out of range"),
    (["Marseille", 0], "not among"),
    (["paris", 0], "not among"),  # exact text only
    ([True, 0], "index"),
    ([None, 0], "index"),
    ([0.5, 0], "integer"),
    ([0], "answers"),
])
def test_bad_answers_raise_a_clear_error(model, tok, answers, match):
    with pytest.raises(ValueError, match=match):
        choice_accuracy(model, tok, PROMPTS[:2], CHOICES[:2], answers, max_length=128)


def test_bad_choices_raise_a_clear_error(model, tok):
    with pytest.raises(ValueError, match="at least 2"):
        choice_accuracy(model, tok, ["q"], [["only one"]], [0], max_length=128)
    with pytest.raises(ValueError, match="list of strings"):
        choice_accuracy(model, tok, ["q"], ["ab"], [0], max_length=128)
    with pytest.raises(ValueError, match="non-empty string"):
        choice_accuracy(model, tok, ["q"], [["a", "  "]], [0], max_length=128)
    with pytest.raises(ValueError, match="non-empty string"):
        choice_accuracy(model, tok, ["q"], [["a", 3]], [0], max_length=128)
    with pytest.raises(ValueError, match="prompt"):
        choice_accuracy(model, tok, [None], [["a", "b"]], [0], max_length=128)


def test_resolve_answers_accepts_numpy_and_integral_floats():
    assert resolve_answers([["a", "b"], ["c", "d", "e"]], [np.int64(1), 2.0]) == [1, 2]
    assert resolve_answers([["x", "x", "y"]], ["x"]) == [0]


def test_evaluate_rows_reports_loss_and_accuracy(model, tok):
    answers = [0, 1, 0, 2, 1]
    rows = [{"prompt": p, "choices": c, "answer": a} for p, c, a in zip(PROMPTS, CHOICES, answers)]
    got = evaluate_rows(model, tok, rows, max_length=128, batch_tokens=200)
    # without a response column the right choice is the response of the loss
    t = tokenize_batch(tok, prompts=PROMPTS, responses=[c[a] for c, a in zip(CHOICES, answers)], max_length=128)
    loss = mean_token_loss(model, t.input_ids, t.loss_mask)
    assert got["loss"] == pytest.approx(loss["loss"], rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(loss["loss"]), rel=1e-5)
    assert got["rows"] == 5 and got["rejected"] == 0
    acc = choice_accuracy(model, tok, PROMPTS, CHOICES, answers, max_length=128)
    assert got["accuracy"] == acc["accuracy"] and got["accuracy_rows"] == 5
    assert got["choices_per_row"] == acc["choices_per_row"] and got["accuracy_skipped"] == 0

    # a polars frame with a list column and answers as text, plus an explicit response column
    frame = pl.DataFrame({"prompt": PROMPTS, "response": ["x"] * 5, "choices": CHOICES,
                          "answer": [c[a] for c, a in zip(CHOICES, answers)]})
    got2 = evaluate_rows(model, tok, frame, max_length=128)
    assert got2["accuracy"] == acc["accuracy"]
    t2 = tokenize_batch(tok, prompts=PROMPTS, responses=["x"] * 5, max_length=128)
    assert got2["loss"] == pytest.approx(mean_token_loss(model, t2.input_ids, t2.loss_mask)["loss"], rel=1e-5)

    # plain rows: loss only
    plain = evaluate_rows(model, tok, [{"text": "Some held-out text."}, {"text": ""}], max_length=64)
    assert "accuracy" not in plain and plain["rows"] == 1 and plain["rejected"] == 1
    with pytest.raises(ValueError, match="both be set"):
        evaluate_rows(model, tok, rows[:1] + [{"prompt": "q", "choices": ["a", "b"], "answer": None}], max_length=64)
    with pytest.raises(ValueError, match="column"):
        evaluate_rows(model, tok, [{"question": "q"}], max_length=64)


def test_evaluate_command_prints_loss_and_accuracy(tmp_path, capsys):
    """`ntk-ray evaluate` on a JSONL file with multiple-choice rows and one broken line."""
    import json as _json

    from ntk_ray.cli import main

    rows = [{"prompt": "What does \"apple\" mean?", "choices": ["fruit with red or green skin", "a large boat"], "answer": 0},
            {"prompt": "What does \"oak\" mean?", "choices": ["a kind of fish", "a tree bearing acorns"], "answer": "a tree bearing acorns"},
            {"prompt": "What does \"sprint\" mean?", "choices": ["run fast over a short distance", "sleep"], "answer": 0}]
    data = tmp_path / "mc.jsonl"
    data.write_text("\n".join(_json.dumps(r) for r in rows) + "\n{broken\n")
    assert main(["evaluate", "--data", str(data), "--max-length", "64"]) == 0
    captured = capsys.readouterr()
    result = _json.loads(captured.out.strip().splitlines()[-1])
    assert result["rows"] == 3 and result["accuracy_rows"] == 3 and result["unreadable"] == 1
    assert 0.0 <= result["accuracy"] <= 1.0 and result["accuracy"] * 3 == round(result["accuracy"] * 3)
    assert result["loss"] > 0 and result["perplexity"] > 1
    assert "mc.jsonl:3" in captured.err
