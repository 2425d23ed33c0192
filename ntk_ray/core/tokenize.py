"""Tokenizing rows and marking the positions the NTK features are taken over.

F(x) sums the logits over the positions R(x) (method.md): under teacher forcing, the positions
whose logits predict a response token when the row has a prompt/response split, all positions
for a plain ``text`` row.

Prompt/response rows, tokenizer with a chat template:
  prompt part   = apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
  response part = tokens of the response + the template's end-of-turn marker (``<|im_end|>`` for
                  SmolLM2, found by rendering a sentinel reply; the newline the template writes
                  after it is dropped: generation stops at the marker).
  The two parts are tokenized separately, so the response tokens are exactly what the model would
  have to generate after the generation prompt. For ordinary replies prompt part + response part
  equals the tokenized full [user, assistant] conversation without its trailing newline; a reply
  that starts with whitespace may tokenize differently across the boundary in the joint render.
Without a chat template: prompt tokens (with BOS when the tokenizer adds one) + response tokens +
EOS (when the tokenizer has one).

Masks, per row of length L:
  loss_mask[t]  = 1 where token t is a training target (a response token; for text rows every
                  token but the first). Token 0 is never a target: nothing predicts it.
  score_mask[t] = 1 where the logits at position t enter F: ``loss_mask[t + 1]`` for
                  prompt/response rows (0 at the last position), 1 everywhere for text rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

ON_TOO_LONG = ("truncate", "reject")
_SENTINEL = "\u2063ntkRaySentinelReply\u2063"
_warned: set = set()  # chat templates already warned about


@dataclass
class Tokenized:
    """Per-row token ids and masks; a rejected row has empty lists, n_tokens 0 and a reason."""

    input_ids: list[list[int]] = field(default_factory=list)
    loss_mask: list[list[int]] = field(default_factory=list)
    score_mask: list[list[int]] = field(default_factory=list)
    n_tokens: list[int] = field(default_factory=list)  # len(input_ids[i]) (after truncation)
    truncated: list[bool] = field(default_factory=list)
    reject: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    def _append(self, ids: list[int], loss: list[int], score: list[int], truncated: bool = False) -> None:
        self.input_ids.append(ids)
        self.loss_mask.append(loss)
        self.score_mask.append(score)
        self.n_tokens.append(len(ids))
        self.truncated.append(truncated)
        self.reject.append(None)

    def _reject(self, reason: str) -> None:
        self.input_ids.append([])
        self.loss_mask.append([])
        self.score_mask.append([])
        self.n_tokens.append(0)
        self.truncated.append(False)
        self.reject.append(reason)


# --------------------------------------------------------------------------------------------
# chat template facts


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render_prompts(tokenizer, prompts: list[str]) -> list[str]:
    if not prompts:
        return []
    convs = [[{"role": "user", "content": p}] for p in prompts]
    out = tokenizer.apply_chat_template(convs, add_generation_prompt=True, tokenize=False)
    return [out] if isinstance(out, str) else list(out)


def end_of_turn(tokenizer) -> tuple[str, list[int]]:
    """The text and token ids the chat template writes after an assistant reply (trailing
    whitespace dropped); the EOS token when the template writes nothing recognisable."""
    user = [{"role": "user", "content": "ntk"}]
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": _SENTINEL}], tokenize=False)
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    idx = full.find(_SENTINEL)
    marker = full[idx + len(_SENTINEL):].rstrip() if idx >= 0 else ""
    if (idx < 0 or full[:idx] != prompt) and tokenizer.chat_template not in _warned:
        _warned.add(tokenizer.chat_template)
        log.warning(
            "the chat template does not render the generation prompt as the prefix of a full "
            "conversation; using the generation prompt as the prompt part anyway"
        )
    if not marker:
        if tokenizer.eos_token is None:
            return "", []
        marker = tokenizer.eos_token
    ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
    return marker, list(ids)


def _bos_prefix(tokenizer) -> list[int]:
    """[bos_id] when the tokenizer prepends BOS on its own (add_special_tokens=True), else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return [bos] if with_special[:1] == [bos] and plain[:1] != [bos] else []


# --------------------------------------------------------------------------------------------


def _check_value(value, what: str) -> str | None:
    """A reject reason for a value that is not usable text, else None."""
    if value is None:
        return f"missing {what}"
    if not isinstance(value, str):
        return f"{what} is not a string ({type(value).__name__})"
    return None


def _batch_ids(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    return [list(x) for x in tokenizer(texts, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]]


def tokenize_batch(
    tokenizer,
    *,
    texts: list | None = None,
    prompts: list | None = None,
    responses: list | None = None,
    max_length: int,
    on_too_long: str = "truncate",
    use_chat_template: bool | None = None,
) -> Tokenized:
    """Tokenize either ``texts`` or ``prompts`` + ``responses`` (one entry per row).

    ``on_too_long``: ``"truncate"`` keeps the first ``max_length`` tokens (the prompt is kept, the
    response cut; a row whose prompt leaves no response token is rejected) and sets
    ``truncated``; ``"reject"`` rejects every row over ``max_length``.
    ``use_chat_template``: None = use the tokenizer's chat template when it has one.
    """
    if on_too_long not in ON_TOO_LONG:
        raise ValueError(f"on_too_long must be one of {ON_TOO_LONG}, not {on_too_long!r}")
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"--max-length must be an integer >= 2 (got {max_length!r})")
    if texts is not None:
        if prompts is not None or responses is not None:
            raise ValueError("pass either texts or prompts + responses, not both")
        return _tokenize_texts(tokenizer, list(texts), max_length, on_too_long)
    if prompts is None or responses is None:
        raise ValueError("pass texts, or both prompts and responses")
    prompts, responses = list(prompts), list(responses)
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if use_chat_template is None:
        use_chat_template = has_chat_template(tokenizer)
    elif use_chat_template and not has_chat_template(tokenizer):
        raise ValueError("the tokenizer has no chat template")
    return _tokenize_pairs(tokenizer, prompts, responses, max_length, on_too_long, use_chat_template)


def _tokenize_texts(tokenizer, texts: list, max_length: int, on_too_long: str) -> Tokenized:
    reasons: list[str | None] = []
    for t in texts:
        reason = _check_value(t, "text")
        if reason is None and not t.strip():
            reason = "empty text"
        reasons.append(reason)
    good = [i for i, r in enumerate(reasons) if r is None]
    ids_good = dict(zip(good, _batch_ids(tokenizer, [texts[i] for i in good], add_special_tokens=True)))
    out = Tokenized()
    for i, reason in enumerate(reasons):
        if reason is not None:
            out._reject(reason)
            continue
        ids = ids_good[i]
        n = len(ids)
        if n == 0:
            out._reject("empty text")
            continue
        truncated = False
        if n > max_length:
            if on_too_long == "reject":
                out._reject(f"{n} tokens > --max-length {max_length}")
                continue
            ids, truncated = ids[:max_length], True
        out._append(ids, [0] + [1] * (len(ids) - 1), [1] * len(ids), truncated)
    return out


def _tokenize_pairs(
    tokenizer, prompts: list, responses: list, max_length: int, on_too_long: str, chat: bool
) -> Tokenized:
    reasons: list[str | None] = []
    for p, r in zip(prompts, responses):
        reason = _check_value(p, "prompt") or _check_value(r, "response")
        if reason is None and not r.strip():
            reason = "empty response"
        reasons.append(reason)
    good = [i for i, r in enumerate(reasons) if r is None]

    if chat:
        _, tail = end_of_turn(tokenizer)
        prompt_texts = _render_prompts(tokenizer, [prompts[i] for i in good])
        prompt_ids = _batch_ids(tokenizer, prompt_texts, add_special_tokens=False)
    else:
        eos = tokenizer.eos_token_id
        tail = [eos] if eos is not None else []
        bos = _bos_prefix(tokenizer)
        prompt_ids = [bos + x for x in _batch_ids(tokenizer, [prompts[i] for i in good], add_special_tokens=False)]
    response_ids = _batch_ids(tokenizer, [responses[i] for i in good], add_special_tokens=False)
    parts = {i: (p, r) for i, p, r in zip(good, prompt_ids, response_ids)}

    out = Tokenized()
    for i, reason in enumerate(reasons):
        if reason is not None:
            out._reject(reason)
            continue
        p, r = parts[i]
        if not r:
            out._reject("empty response")
            continue
        r = r + tail
        n = len(p) + len(r)
        truncated = False
        if n > max_length:
            if on_too_long == "reject":
                out._reject(f"{n} tokens > --max-length {max_length}")
                continue
            if len(p) >= max_length:
                out._reject(f"prompt longer than --max-length ({len(p)} tokens)")
                continue
            r, truncated = r[: max_length - len(p)], True
        ids = p + r
        loss = [0] * len(p) + [1] * len(r)
        loss[0] = 0  # nothing predicts the first token
        score = loss[1:] + [0]
        if not any(score):
            out._reject("no response token to score")
            continue
        out._append(ids, loss, score, truncated)
    return out
