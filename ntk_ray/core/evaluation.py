"""Held-out evaluation: the response loss and, for multiple-choice rows, accuracy (plain torch).

Loss (``training.mean_token_loss``): mean over all target tokens of -log p(token | prefix), and
perplexity = exp(loss).

Multiple choice: a row with ``prompt``, ``choices`` (list of strings) and ``answer`` (the index
of the right choice, or its text). Each choice c is formatted as the response of a prompt/response
row exactly as training sees it (``tokenize.tokenize_batch``: the chat template's generation
prompt, then the choice tokens, then the end-of-turn marker) and scored by its mean
log-likelihood per choice token

    ll(c) = 1/|c| sum_{t in c} log p(x_t | x_<t)

over the choice's own tokens (the end-of-turn marker, a fact of the template and the same for
every choice, is not counted). The prediction is argmax_c ll(c) (the first on ties);
accuracy = fraction of rows where it is the answer. A row one of whose choices does not fit in
``max_length`` tokens is not truncated (a cut choice cannot be compared fairly): it is counted in
``skipped`` and left out of the accuracy.

Precision: the model may run in bfloat16/float16 (``--dtype``); its logits are cast to float32
before the log-softmax, a sequence's log-likelihoods are summed in float32 and kept as float64
(``sequence_log_likelihoods``), and the loss totals over batches are Python floats
(``training.mean_token_loss``).
"""

from __future__ import annotations

import logging
import numbers
from typing import Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import torch

from ntk_ray.core.features import pack_by_tokens, pad_batch
from ntk_ray.core.tokenize import end_of_turn, has_chat_template, tokenize_batch

log = logging.getLogger(__name__)


def resolve_answers(choices: Sequence[Sequence[str]], answers: Sequence) -> list[int]:
    """Each answer as an index into its row's choices: an int (not bool) in range, or the exact
    text of one of the choices (the first one on repeats). ValueError naming the row otherwise."""
    if len(choices) != len(answers):
        raise ValueError(f"{len(choices)} rows of choices but {len(answers)} answers")
    out = []
    for row, (opts, ans) in enumerate(zip(choices, answers)):
        if isinstance(ans, str):
            try:
                out.append(list(opts).index(ans))
            except ValueError:
                raise ValueError(f"row {row}: answer {ans!r} is not among its {len(opts)} choices") from None
            continue
        if isinstance(ans, (bool, np.bool_)) or not isinstance(ans, (numbers.Integral, float, np.floating)):
            raise ValueError(f"row {row}: answer must be an index into the choices or the text of one of them, "
                             f"not {type(ans).__name__} {ans!r}")
        if isinstance(ans, (float, np.floating)) and not float(ans).is_integer():
            raise ValueError(f"row {row}: answer {ans!r} is not an integer index")
        index = int(ans)
        if not 0 <= index < len(opts):
            raise ValueError(f"row {row}: answer index {index} is out of range for {len(opts)} choices")
        out.append(index)
    return out


def _check_choices(choices: Sequence) -> None:
    for row, opts in enumerate(choices):
        if isinstance(opts, str) or not isinstance(opts, (list, tuple, np.ndarray)):
            raise ValueError(f"row {row}: choices must be a list of strings, not {type(opts).__name__}")
        if len(opts) < 2:
            raise ValueError(f"row {row}: needs at least 2 choices, has {len(opts)}")
        for c in opts:
            if not isinstance(c, str) or not c.strip():
                raise ValueError(f"row {row}: every choice must be a non-empty string (got {c!r})")


def _tail_length(tokenizer) -> int:
    """Tokens ``tokenize_batch`` appends after a response: the end-of-turn marker (chat template)
    or EOS (none without one)."""
    if has_chat_template(tokenizer):
        return len(end_of_turn(tokenizer)[1])
    return 0 if tokenizer.eos_token_id is None else 1


@torch.no_grad()
def sequence_log_likelihoods(model, sequences: list[list[int]], masks: list[list[int]], batch_tokens: int = 8192,
                             device="cpu") -> tuple[np.ndarray, np.ndarray]:
    """Per sequence: (sum of log p(x_t | x_<t) over positions t with mask[t] = 1, number of such t);
    float64 / int64 arrays, input order. Position 0 (nothing predicts it) never counts."""
    model.eval()
    sums = np.zeros(len(sequences))
    counts = np.zeros(len(sequences), dtype=np.int64)
    for batch in pack_by_tokens([len(s) for s in sequences], batch_tokens):
        ids, attn, mask = pad_batch([sequences[i] for i in batch], [masks[i] for i in batch], device=device)
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        m = mask[:, 1:]
        sums[batch] = (logp * m).sum(1).double().cpu().numpy()
        counts[batch] = m.sum(1).long().cpu().numpy()
    return sums, counts


def choice_log_likelihoods(model, tokenizer, prompts: list[str], choices: list[list[str]], max_length: int,
                           device="cpu", batch_tokens: int = 8192, system_prompt: str = "default") -> list[np.ndarray | None]:
    """Per row, ll(c) = mean log-likelihood per token of each choice given the prompt (float64, one
    per choice, module docstring), or None when the row cannot be scored (a choice does not fit in
    ``max_length`` tokens). ValueError on malformed rows (non-string prompt, fewer than 2 choices,
    an empty choice)."""
    prompts, choices = list(prompts), list(choices)
    if len(prompts) != len(choices):
        raise ValueError(f"{len(prompts)} prompts but {len(choices)} rows of choices")
    _check_choices(choices)
    choices = [list(c) for c in choices]
    for row, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"row {row}: prompt must be a string, not {type(p).__name__}")
    flat_rows = [r for r, opts in enumerate(choices) for _ in opts]
    tok = tokenize_batch(tokenizer, prompts=[prompts[r] for r in flat_rows], responses=[c for opts in choices for c in opts],
                         system_prompt=system_prompt,
                         max_length=max_length, on_too_long="reject")
    tail = _tail_length(tokenizer)
    bad_rows = {r for r, reason in zip(flat_rows, tok.reject) if reason is not None}
    seqs, masks, owner = [], [], []
    for i, r in enumerate(flat_rows):
        if r in bad_rows:
            continue
        mask = list(tok.loss_mask[i])
        for j in range(len(mask) - tail, len(mask)):  # the end-of-turn marker is not the choice
            mask[j] = 0
        seqs.append(tok.input_ids[i])
        masks.append(mask)
        owner.append(i)
    mean_ll = np.full(len(flat_rows), -np.inf)
    if seqs:
        sums, counts = sequence_log_likelihoods(model, seqs, masks, batch_tokens, device)
        for i, s, n in zip(owner, sums, counts):
            if n > 0:
                mean_ll[i] = s / n
    out: list[np.ndarray | None] = []
    start = 0
    for r, opts in enumerate(choices):
        span = mean_ll[start:start + len(opts)]
        start += len(opts)
        out.append(None if r in bad_rows or not np.isfinite(span).all() else span)  # all() : a choice without a scored token
    return out


def choice_accuracy(model, tokenizer, prompts: list[str], choices: list[list[str]], answers: list, max_length: int,
                    device="cpu", batch_tokens: int = 8192, system_prompt: str = "default") -> dict:
    """Multiple-choice accuracy: predict argmax_c ll(c) (``choice_log_likelihoods``; the first
    choice on ties), accuracy = fraction of scored rows where the prediction is the answer.

    ``answers``: per row an index into its choices or the text of the right choice. Returns
    {"accuracy" (None when no row could be scored), "rows" (rows scored), "choices_per_row" (mean
    over scored rows), "skipped" (rows with a choice longer than ``max_length`` allows),
    "predictions" (per input row: the argmax index, -1 for skipped rows)}.
    Raises ValueError on malformed rows: unequal lengths, a non-string prompt, fewer than 2
    choices, an empty choice, an answer out of range or not among the choices."""
    choices = list(choices)
    _check_choices(choices)
    choices = [list(c) for c in choices]
    gold = resolve_answers(choices, answers)  # before the model runs: bad labels fail fast
    lls = choice_log_likelihoods(model, tokenizer, prompts, choices, max_length, device=device, batch_tokens=batch_tokens,
                                 system_prompt=system_prompt)
    predictions, correct, scored, n_choices = [], 0, 0, 0
    for r, ll in enumerate(lls):
        if ll is None:
            predictions.append(-1)
            continue
        pred = int(np.argmax(ll))
        predictions.append(pred)
        scored += 1
        n_choices += len(ll)
        correct += int(pred == gold[r])
    skipped = len(lls) - scored
    if skipped:
        log.warning("multiple choice: %d of %d rows skipped (a choice does not fit in max_length %d or has no scored token)",
                    skipped, len(lls), max_length)
    return {"accuracy": correct / scored if scored else None, "rows": scored,
            "choices_per_row": n_choices / scored if scored else None, "skipped": skipped,
            "predictions": predictions}


def _as_columns(rows) -> dict[str, list]:
    """Column name -> Python values, from a list of dicts, a polars DataFrame or a pyarrow Table."""
    if isinstance(rows, list):
        names = list(dict.fromkeys(k for r in rows for k in r))
        return {n: [r.get(n) for r in rows] for n in names}
    if isinstance(rows, pa.Table):
        rows = pl.from_arrow(rows)
    if isinstance(rows, pl.DataFrame):
        return {n: rows[n].to_list() for n in rows.columns}
    raise TypeError(f"rows must be a list of dicts, a polars DataFrame or a pyarrow Table, not {type(rows).__name__}")


def evaluate_rows(model, tokenizer, rows, *, max_length: int, text_column: str = "text", prompt_column: str = "prompt",
                  response_column: str = "response", choices_column: str = "choices", answer_column: str = "answer",
                  on_too_long: str = "truncate", device="cpu", batch_tokens: int = 8192,
                  messages_column: str | None = None, assistant_turns: str = "all", system_prompt: str = "default") -> dict:
    """What ``ntk-ray evaluate`` reports for a set of rows (a list of dicts or a polars DataFrame).

    Loss/perplexity (``training.mean_token_loss``) over the rows' response tokens: prompt +
    response rows, or ``text`` rows, or conversations (``messages_column``; by default
    ``messages`` or ``conversations`` when there is no text or prompt/response column: the
    assistant turns, ``assistant_turns`` all or last); for multiple-choice rows without a response column the
    right choice is the response. Keys: ``loss``, ``perplexity``, ``tokens``, ``rows``,
    ``rejected`` (rows the tokenizer rejected for the loss) and, when the rows carry both
    ``choices`` and ``answer`` columns, ``accuracy``, ``accuracy_rows``, ``choices_per_row``,
    ``accuracy_skipped`` (``choice_accuracy``). A row with choices but a null answer (or the
    reverse) is a ValueError: a partly labelled set gives a misleading accuracy."""
    from ntk_ray.core.training import mean_token_loss

    cols = _as_columns(rows)
    choices, answers = cols.get(choices_column), cols.get(answer_column)
    prompts, responses, texts = cols.get(prompt_column), cols.get(response_column), cols.get(text_column)
    mc = choices is not None and answers is not None
    if mc:
        # "--data: ...": one line naming the flag, which `ntk-ray evaluate` prints as a usage error (exit 2)
        try:
            if prompts is None:
                raise ValueError(f"multiple-choice rows need a {prompt_column!r} column")
            for row, (c, a) in enumerate(zip(choices, answers)):
                if c is None or a is None:
                    raise ValueError(f"row {row}: {choices_column!r} and {answer_column!r} must both be set on every row")
            choices = [list(c) if not isinstance(c, str) else c for c in choices]
            _check_choices(choices)
            gold = resolve_answers(choices, answers)
        except ValueError as e:
            raise ValueError(f"--data: {e}".replace("\n", " ")) from None
        if responses is None:
            responses = [c[g] for c, g in zip(choices, gold)]

    chats = cols.get(messages_column) if messages_column else cols.get("messages", cols.get("conversations"))
    if chats is not None and (messages_column or not (texts is not None or (prompts is not None and responses is not None))):
        tok = tokenize_batch(tokenizer, messages=chats, assistant_turns=assistant_turns, max_length=max_length,
                             on_too_long=on_too_long, system_prompt=system_prompt)
    elif prompts is not None and responses is not None:
        tok = tokenize_batch(tokenizer, prompts=prompts, responses=responses, max_length=max_length, on_too_long=on_too_long,
                             system_prompt=system_prompt)
    elif texts is not None:
        tok = tokenize_batch(tokenizer, texts=texts, max_length=max_length, on_too_long=on_too_long,
                             system_prompt=system_prompt)
    else:
        raise ValueError(f"--data: rows need a {text_column!r} column or {prompt_column!r} and {response_column!r} columns"
                         f" (or {prompt_column!r}, {choices_column!r} and {answer_column!r})")
    keep = [i for i, r in enumerate(tok.reject) if r is None]
    if keep:
        result = mean_token_loss(model, [tok.input_ids[i] for i in keep], [tok.loss_mask[i] for i in keep],
                                 batch_tokens=batch_tokens, device=device)
    else:
        result = {"loss": None, "perplexity": None, "tokens": 0, "rows": 0}
    result["rejected"] = len(tok.reject) - len(keep)
    if mc:
        acc = choice_accuracy(model, tokenizer, prompts, choices, gold, max_length, device=device, batch_tokens=batch_tokens,
                              system_prompt=system_prompt)
        result |= {"accuracy": acc["accuracy"], "accuracy_rows": acc["rows"], "choices_per_row": acc["choices_per_row"],
                   "accuracy_skipped": acc["skipped"]}
    return result
