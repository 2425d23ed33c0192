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
                  prompt/response and chat rows (0 at the last position), 1 everywhere for text
                  rows.

Chat rows (a conversation: a list of {role, content} messages, or ShareGPT {from, value} with
human -> user, gpt -> assistant; :func:`normalize_conversation`):
  The chat template renders the conversation; the trained positions are the assistant turns
  (``--assistant-turns all``, the default, or ``last``): for turn k (message k, an assistant
  message)
      G_k = render(conv[:k], add_generation_prompt=True)     the context the reply is generated after
      P_k = render(conv[:k + 1]).rstrip()                    ... followed by the reply and its end-of-turn
                                                             marker (the newline after it dropped)
  and the reply is the characters [len(G_k), len(P_k)) of T = P_K, K the last trained turn. Every
  G_k and P_k must be a prefix of T (checked per row; a template that rewrites earlier turns,
  e.g. one dropping the reasoning of earlier replies, fails it for all but the last turn: use
  ``--assistant-turns last``). T is cut at these boundaries and each piece tokenized on its own
  (as a prompt and its response above), so a reply's tokens are exactly what the model has to
  generate after G_k; pieces are concatenated. Messages after the last trained turn are not
  rendered: under causal attention they change neither F nor the loss. An assistant message that
  opens the conversation is context, not trained (nothing prompts it).
  This works with every template that renders prefixes consistently; transformers'
  ``return_assistant_tokens_mask`` would need templates marked up with ``{% generation %}``,
  which few are.
  A tokenizer without a chat template renders with :func:`fallback_chat_template`, the
  Tulu/open-instruct format (``<|user|>\n...\n<|assistant|>\n...EOS\n``, BOS first when the
  tokenizer adds one).

Default system prompts (``system_prompt``, the ``--system-prompt`` flag): some chat templates
write a system turn of their own when a conversation has none (SmolLM2: "You are a helpful AI
assistant named SmolLM, trained by Hugging Face", 31 tokens on every row; Qwen2.5 likewise).
``"default"`` keeps the template's rendering; ``"none"`` removes that turn from rows that have no
system message of their own (rows that bring one are rendered unchanged). The turn is found by
rendering one conversation [user U1, assistant A1, user U2] (:func:`default_system_block`): the
text before U1 is ``B + D + H``, where H, what the template writes before a later user turn,
is the text between A1's end-of-turn marker and U2 (leading whitespace dropped), and B is the
template's BOS text when H does not start with it; D is removed wherever a rendering starts with
``B + D``. A template without a default system turn has D = "" and renders unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from jinja2.exceptions import TemplateError

log = logging.getLogger(__name__)

ON_TOO_LONG = ("truncate", "reject")
ASSISTANT_TURNS = ("all", "last")
#: --system-prompt: keep the chat template's default system turn, or drop it (module docstring)
SYSTEM_PROMPTS = ("default", "none")
#: message roles accepted in a conversation, and what they mean (ShareGPT: human, gpt)
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}
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


def _render_prompts(tokenizer, prompts: list[str], drop: tuple[str, str] | None = None) -> list[str]:
    if not prompts:
        return []
    convs = [[{"role": "user", "content": p}] for p in prompts]
    out = tokenizer.apply_chat_template(convs, add_generation_prompt=True, tokenize=False)
    out = [out] if isinstance(out, str) else list(out)
    return [drop_default_system(t, drop) for t in out] if drop else out


def default_system_block(tokenizer, template: str | None = None) -> tuple[str, str]:
    """(B, D): the BOS text the template writes first and the default system turn D it writes
    after it when a conversation has no system message (module docstring); D = "" when it
    writes none. Raises ValueError when the rendering does not have the form ``B + D + H``."""
    u1, a1, u2 = (f"\u2063ntkRay{w}\u2063" for w in ("User1", "Reply1", "User2"))
    conv = [{"role": "user", "content": u1}, {"role": "assistant", "content": a1}, {"role": "user", "content": u2}]
    text = render_chat(tokenizer, conv, add_generation_prompt=True, template=template)
    i1, j1, i2 = text.find(u1), text.find(a1), text.find(u2)
    if min(i1, j1, i2) < 0:
        raise ValueError("--system-prompt none: the chat template does not render a user/assistant/user conversation")
    marker, _ = end_of_turn(tokenizer)
    between = text[j1 + len(a1):i2]
    header = (between[len(marker):] if marker and between.startswith(marker) else between).lstrip()
    before = text[:i1]
    if not before.endswith(header):
        raise ValueError("--system-prompt none: cannot find where the chat template's first user turn starts")
    bos = tokenizer.bos_token or ""
    lead = bos if bos and before.startswith(bos) and not header.startswith(bos) else ""
    return lead, before[len(lead):len(before) - len(header)]


def drop_default_system(text: str, drop: tuple[str, str] | None) -> str:
    """``text`` without the default system turn ``drop`` = (B, D) of :func:`default_system_block`
    when it starts with B + D (unchanged otherwise, and when D is empty)."""
    if not drop or not drop[1]:
        return text
    lead, block = drop
    return lead + text[len(lead) + len(block):] if text.startswith(lead + block) else text


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
    messages: list | None = None,
    assistant_turns: str = "all",
    max_length: int,
    on_too_long: str = "truncate",
    use_chat_template: bool | None = None,
    system_prompt: str = "default",
) -> Tokenized:
    """Tokenize either ``texts``, or ``prompts`` + ``responses``, or ``messages`` (conversations:
    see :func:`normalize_conversation`), one entry per row.

    ``on_too_long``: ``"truncate"`` keeps the first ``max_length`` tokens (the prompt is kept, the
    response cut; a row whose prompt leaves no response token is rejected; a conversation is cut
    after its first ``max_length`` tokens and rejected when no assistant token is left) and sets
    ``truncated``; ``"reject"`` rejects every row over ``max_length``.
    ``assistant_turns`` (conversations): ``"all"`` trains and scores every assistant turn,
    ``"last"`` only the last one (the earlier ones are context).
    ``use_chat_template``: None = use the tokenizer's chat template when it has one (for
    conversations, :func:`fallback_chat_template` when it has none; False = always that).
    ``system_prompt``: ``"default"`` renders what the chat template writes; ``"none"`` drops the
    system turn the template adds to rows without one (module docstring; no effect on text rows
    and on templates that add none).
    """
    if on_too_long not in ON_TOO_LONG:
        raise ValueError(f"on_too_long must be one of {ON_TOO_LONG}, not {on_too_long!r}")
    if system_prompt not in SYSTEM_PROMPTS:
        raise ValueError(f"system_prompt must be one of {SYSTEM_PROMPTS}, not {system_prompt!r}")
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"--max-length must be an integer >= 2 (got {max_length!r})")
    if messages is not None:
        if texts is not None or prompts is not None or responses is not None:
            raise ValueError("pass messages alone, not with texts or prompts + responses")
        if assistant_turns not in ASSISTANT_TURNS:
            raise ValueError(f"assistant_turns must be one of {ASSISTANT_TURNS}, not {assistant_turns!r}")
        if use_chat_template and not has_chat_template(tokenizer):
            raise ValueError("the tokenizer has no chat template")
        template = None if has_chat_template(tokenizer) and use_chat_template is not False \
            else fallback_chat_template(tokenizer)
        drop = default_system_block(tokenizer, template) if system_prompt == "none" and template is None else None
        return _tokenize_chats(tokenizer, list(messages), max_length, on_too_long, assistant_turns, template, drop)
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
    drop = default_system_block(tokenizer) if system_prompt == "none" and use_chat_template else None
    return _tokenize_pairs(tokenizer, prompts, responses, max_length, on_too_long, use_chat_template, drop)


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
    tokenizer, prompts: list, responses: list, max_length: int, on_too_long: str, chat: bool,
    drop: tuple[str, str] | None = None,
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
        prompt_texts = _render_prompts(tokenizer, [prompts[i] for i in good], drop)
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


# --------------------------------------------------------------------------------------------
# conversations


def normalize_conversation(value, what: str = "messages") -> tuple[list[dict] | None, str | None]:
    """(the conversation as [{"role", "content"}, ...], None) or (None, a reject reason).

    Accepted: a list of messages, each ``{"role", "content"}`` (OpenAI, Tulu, UltraChat) or
    ``{"from", "value"}`` (ShareGPT); a JSON string holding such a list (a CSV cell). Roles
    (case-insensitive): system, user, assistant; ShareGPT's human (-> user) and gpt
    (-> assistant). Other keys of a message (name, weight, ...) are ignored. ``what`` names the
    column in the reasons: ``messages is not a list (int)``, ``empty conversation``,
    ``messages[2] is not an object (str)``, ``messages[2] has no role``, ``messages[2] has
    unknown role 'tool' (...)``, ``messages[2] has no content``, ``messages[2] content is not a
    string (list)``, ``invalid Unicode in messages[2] (unpaired surrogate)``, ``no assistant
    turn``, ``empty assistant turn (messages[3])``."""
    if isinstance(value, str):
        import json

        try:
            value = json.loads(value)
        except ValueError:
            return None, f"{what} is not a list (str)"
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        return None, f"{what} is not a list ({type(value).__name__})"
    if not value:
        return None, "empty conversation"
    conv = []
    for i, message in enumerate(value):
        where = f"{what}[{i}]"
        if not isinstance(message, dict):
            return None, f"{where} is not an object ({type(message).__name__})"
        role, key = message.get("role"), "content"
        if role is None and message.get("from") is not None:
            role, key = message["from"], "value"
        if role is None:
            return None, f"{where} has no role"
        if not isinstance(role, str) or role.lower() not in ROLES:
            return None, (f"{where} has unknown role {role!r} (expected system, user or assistant; "
                          f"ShareGPT: human or gpt)")
        content = message.get(key)
        if content is None:
            return None, f"{where} has no content"
        if not isinstance(content, str):
            return None, f"{where} content is not a string ({type(content).__name__})"
        if _has_surrogate(content):
            return None, f"invalid Unicode in {where} (unpaired surrogate)"
        conv.append({"role": ROLES[role.lower()], "content": content})
    assistants = [i for i, m in enumerate(conv) if m["role"] == "assistant"]
    if not assistants:
        return None, "no assistant turn"
    for i in assistants:
        if not conv[i]["content"].strip():
            return None, f"empty assistant turn ({what}[{i}])"
    return conv, None


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def fallback_chat_template(tokenizer) -> str:
    """The Jinja template conversations are rendered with when the tokenizer has none: the
    Tulu/open-instruct format that LESS trained with, ``<|system|>``/``<|user|>``/``<|assistant|>``
    lines, each message's content on the next line, EOS after an assistant reply; BOS first when
    the tokenizer adds one on its own."""
    # newlines as expressions: transformers renders with trim_blocks (a newline after a tag is dropped)
    bos = "{{ bos_token }}" if _bos_prefix(tokenizer) else ""
    eos = "{{ eos_token }}" if tokenizer.eos_token is not None else ""
    return (bos + "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
            "{% if m['role'] == 'assistant' %}" + eos + "{% endif %}{{ '\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")


def render_chat(tokenizer, conv: list[dict], add_generation_prompt: bool = False, template: str | None = None) -> str:
    """The chat template's text for ``conv`` (``template``: None = the tokenizer's own)."""
    return tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         chat_template=template)


def trained_turns(conv: list[dict], assistant_turns: str = "all") -> list[int]:
    """Indices of the assistant messages that are trained and scored (an opening one is not)."""
    turns = [k for k, m in enumerate(conv) if m["role"] == "assistant" and k > 0]
    return turns[-1:] if assistant_turns == "last" else turns


def _chat_pieces(tokenizer, conv: list[dict], assistant_turns: str, template: str | None,
                 drop: tuple[str, str] | None = None) -> tuple[list[tuple[str, int]] | None, str | None]:
    """([(text, trained 0/1), ...], None): the rendered conversation cut at the reply
    boundaries (module docstring), or (None, a reject reason). ``drop``: the template's default
    system turn, removed from every rendering when the conversation has no system message."""
    turns = trained_turns(conv, assistant_turns)
    if not turns:
        return None, "no assistant turn after a user or system message"
    if conv[0]["role"] == "system":
        drop = None  # the row brings its own system message: rendered as the template writes it

    def render(messages, **kw):
        return drop_default_system(render_chat(tokenizer, messages, template=template, **kw), drop)

    try:
        whole = render(conv[: turns[-1] + 1]).rstrip()
        pieces, at = [], 0
        for k in turns:
            start = render(conv[:k], add_generation_prompt=True)
            stop = whole if k == turns[-1] else render(conv[: k + 1]).rstrip()
            if not (whole.startswith(start) and whole.startswith(stop) and at <= len(start)):
                return None, (f"the chat template renders the conversation up to message {k} differently from "
                              f"the whole (it rewrites earlier turns; try --assistant-turns last)")
            if len(stop) <= len(start):
                return None, f"the chat template writes nothing for the assistant turn (message {k})"
            pieces += [(whole[at:len(start)], 0), (whole[len(start):len(stop)], 1)]
            at = len(stop)
    except (TemplateError, ValueError, TypeError) as exc:  # raise_exception: roles must alternate, no system role...
        message = " ".join(str(exc).split())[:200]
        return None, f"chat template error: {type(exc).__name__}: {message}"
    return pieces, None


def _tokenize_chats(tokenizer, convs: list, max_length: int, on_too_long: str, assistant_turns: str,
                    template: str | None, drop: tuple[str, str] | None = None) -> Tokenized:
    rows: list[list[tuple[str, int]] | str] = []
    for value in convs:
        conv, reason = normalize_conversation(value)
        if reason is None:
            pieces, reason = _chat_pieces(tokenizer, conv, assistant_turns, template, drop)
        rows.append(reason if reason is not None else pieces)
    flat = [text for row in rows if not isinstance(row, str) for text, _ in row]
    ids_flat = iter(_batch_ids(tokenizer, flat, add_special_tokens=False))

    out = Tokenized()
    for row in rows:
        if isinstance(row, str):
            out._reject(row)
            continue
        ids: list[int] = []
        loss: list[int] = []
        for _, trained in row:
            piece = next(ids_flat)
            ids += piece
            loss += [trained] * len(piece)
        n = len(ids)
        first = loss.index(1) if 1 in loss else n  # where the first reply starts
        truncated = False
        if n > max_length:
            if on_too_long == "reject":
                out._reject(f"{n} tokens > --max-length {max_length}")
                continue
            ids, loss, truncated = ids[:max_length], loss[:max_length], True
        if loss:
            loss[0] = 0  # nothing predicts the first token
        score = loss[1:] + [0]
        if not any(score):
            out._reject(f"no assistant token within --max-length ({first} tokens before the first assistant reply)"
                        if truncated else "no assistant token to score")
            continue
        out._append(ids, loss, score, truncated)
    return out
