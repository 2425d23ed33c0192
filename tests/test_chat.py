"""Chat-format rows (a ``messages`` / ``conversations`` column): detection, rejects, and the
trained/scored positions against a reference that builds them turn by turn with the tokenizer."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TINY_CHAT_TEMPLATE, TINY_WORDS

from ntk_ray.core.tokenize import (
    fallback_chat_template,
    normalize_conversation,
    tokenize_batch,
)
from ntk_ray.io.paths import InputError
from ntk_ray.io.rows import (
    MODE_CHAT,
    Columns,
    check_columns,
    read_file_rows,
    read_original_rows,
)

# ------------------------------------------------------------------------------------------------
# the reference: masks built turn by turn with the tokenizer


def reference(tok, conv: list[dict], turns: str = "all", template: str | None = None):
    """(ids, loss_mask, score_mask) the slow, obvious way: tokenize the rendered conversation;
    assistant turn k is the tokens of render(conv[:k+1]) (its trailing newline dropped) beyond
    those of render(conv[:k], add_generation_prompt=True); tokens after the last trained turn
    are dropped (they change neither the loss nor F)."""
    def render(c, gen=False):
        return tok.apply_chat_template(c, tokenize=False, add_generation_prompt=gen, chat_template=template)

    def enc(text):
        return list(tok(text, add_special_tokens=False)["input_ids"])

    trained = [k for k, m in enumerate(conv) if m["role"] == "assistant" and k > 0]
    if turns == "last":
        trained = trained[-1:]
    whole = enc(render(conv))
    ids = enc(render(conv[: trained[-1] + 1]).rstrip())
    assert whole[: len(ids)] == ids  # the prefix really is the start of the whole conversation
    loss = [0] * len(ids)
    for k in trained:
        before = enc(render(conv[:k], gen=True))
        upto = enc(render(conv[: k + 1]).rstrip())
        assert ids[: len(upto)] == upto and upto[: len(before)] == before
        loss[len(before): len(upto)] = [1] * (len(upto) - len(before))
    loss[0] = 0
    return ids, loss, loss[1:] + [0]


def random_conversations(rng: random.Random, words: list[str], n: int, system_share: float = 0.3) -> list[list[dict]]:
    solid = [w for w in words if w.strip()]

    def text():  # never whitespace only (an empty reply is a reject)
        return " ".join([rng.choice(solid)] + [rng.choice(words) for _ in range(rng.randint(0, 8))])

    convs = []
    for _ in range(n):
        conv = [{"role": "system", "content": text()}] if rng.random() < system_share else []
        for _ in range(rng.randint(1, 4)):
            conv += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
        if rng.random() < 0.3:
            conv.append({"role": "user", "content": text()})  # a trailing user turn: context, never trained
        convs.append(conv)
    return convs


def check_against_reference(tok, convs, template=None):
    for turns in ("all", "last"):
        out = tokenize_batch(tok, messages=convs, assistant_turns=turns, max_length=100_000,
                             use_chat_template=template is None)
        assert out.reject == [None] * len(convs)
        for i, conv in enumerate(convs):
            ids, loss, score = reference(tok, conv, turns, template)
            assert out.input_ids[i] == ids, (turns, conv)
            assert out.loss_mask[i] == loss, (turns, conv)
            assert out.score_mask[i] == score
            assert out.n_tokens[i] == len(ids) and not out.truncated[i]
    return out


# ------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def tiny_tok(tiny_chat_model_dir):
    """The tiny word-level tokenizer with a chat template WITHOUT a default system prompt
    (conftest's TINY_CHAT_TEMPLATE)."""
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(tiny_chat_model_dir))
    assert t.chat_template == TINY_CHAT_TEMPLATE
    return t


# SmolLM2's words: letters, digits, punctuation, newlines, non-ASCII
SMOL_WORDS = ["The", "cat", "sat", "on", "mat.", "42", "3.14", "hello,", "world!", "\n", "Paris", "(x)", "é", "日本",
              "don't", "`code`", "- item", "Q:", "A:", "\n\n", "yes"]


# ------------------------------------------------------------------------------------------------
# masks against the reference


@pytest.mark.demo
def test_template_with_default_system_prompt_matches_reference(tok):
    """SmolLM2: a default system prompt is written when the conversation has none."""
    convs = random_conversations(random.Random(0), SMOL_WORDS, 25)
    check_against_reference(tok, convs)
    # the trained tokens are exactly each reply and its end-of-turn marker
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "And?"}, {"role": "assistant", "content": "Bye."}]
    out = tokenize_batch(tok, messages=[conv], max_length=512)
    ids, loss = out.input_ids[0], out.loss_mask[0]
    assert tok.decode([t for t, m in zip(ids, loss) if m]) == "Hello!<|im_end|>Bye.<|im_end|>"
    assert tok.decode(ids).startswith("<|im_start|>system\nYou are a helpful AI assistant")
    assert tok.decode(ids).endswith("<|im_start|>assistant\nBye.<|im_end|>")
    predicted = [ids[t + 1] for t, s in enumerate(out.score_mask[0]) if s]
    assert tok.decode(predicted) == "Hello!<|im_end|>Bye.<|im_end|>"
    # a one-turn conversation is tokenized exactly as the same prompt/response row
    pr = tokenize_batch(tok, prompts=["Hi"], responses=["Hello!"], max_length=512)
    one = tokenize_batch(tok, messages=[conv[:2]], max_length=512)
    assert (one.input_ids, one.loss_mask, one.score_mask) == (pr.input_ids, pr.loss_mask, pr.score_mask)


def test_template_without_system_prompt_matches_reference(tiny_tok):
    convs = random_conversations(random.Random(1), TINY_WORDS, 40)
    check_against_reference(tiny_tok, convs)
    out = tokenize_batch(tiny_tok, messages=[[{"role": "user", "content": "what is a"},
                                              {"role": "assistant", "content": "w1 w2"}]], max_length=64)
    ids, loss = out.input_ids[0], out.loss_mask[0]
    assert tiny_tok.convert_ids_to_tokens([t for t, m in zip(ids, loss) if m]) == ["w1", "w2", "</s>"]
    assert tiny_tok.convert_ids_to_tokens(ids[:1]) == ["[UNK]"]  # 'user': no system prompt before it


def test_without_chat_template_uses_the_documented_fallback(tiny_model_dir):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    assert not plain.chat_template
    convs = random_conversations(random.Random(2), TINY_WORDS, 20)
    template = fallback_chat_template(plain)
    check_against_reference(plain, convs, template=template)
    conv = [{"role": "system", "content": "a"}, {"role": "user", "content": "what"}, {"role": "assistant", "content": "w1"}]
    text = plain.apply_chat_template(conv, tokenize=False, chat_template=template)
    assert text == "<|system|>\na\n<|user|>\nwhat\n<|assistant|>\nw1</s>\n"  # Tulu / open-instruct format
    with pytest.raises(ValueError, match="no chat template"):
        tokenize_batch(plain, messages=[conv], max_length=64, use_chat_template=True)


def test_all_versus_last(tiny_tok):
    conv = [{"role": "user", "content": "what"}, {"role": "assistant", "content": "w1 w2"},
            {"role": "user", "content": "is"}, {"role": "assistant", "content": "w3"}, {"role": "user", "content": "a"}]
    all_, last = (tokenize_batch(tiny_tok, messages=[conv], assistant_turns=t, max_length=64) for t in ("all", "last"))
    assert all_.input_ids == last.input_ids  # the same tokens: the last trailing user turn is dropped in both
    trained = {t: tiny_tok.convert_ids_to_tokens([i for i, m in zip(o.input_ids[0], o.loss_mask[0]) if m])
               for t, o in (("all", all_), ("last", last))}
    assert trained == {"all": ["w1", "w2", "</s>", "w3", "</s>"], "last": ["w3", "</s>"]}
    assert sum(last.score_mask[0]) == 2 and sum(all_.score_mask[0]) == 5
    # an assistant message that opens the conversation is context
    opening = [{"role": "assistant", "content": "w9"}] + conv[:2]
    out = tokenize_batch(tiny_tok, messages=[opening, opening[:1]], max_length=64)
    assert tiny_tok.convert_ids_to_tokens([i for i, m in zip(out.input_ids[0], out.loss_mask[0]) if m]) == ["w1", "w2", "</s>"]
    assert out.reject[1] == "no assistant turn after a user or system message"
    with pytest.raises(ValueError, match="assistant_turns"):
        tokenize_batch(tiny_tok, messages=[conv], assistant_turns="first", max_length=64)


def test_sharegpt_and_openai_shapes_are_the_same_conversation(tiny_tok):
    openai = [{"role": "system", "content": "a"}, {"role": "user", "content": "what"},
              {"role": "assistant", "content": "w1", "weight": 1}]
    sharegpt = [{"from": "system", "value": "a"}, {"from": "human", "value": "what"}, {"from": "gpt", "value": "w1"}]
    assert normalize_conversation(sharegpt) == normalize_conversation(openai) == (
        [{"role": "system", "content": "a"}, {"role": "user", "content": "what"}, {"role": "assistant", "content": "w1"}],
        None)
    assert normalize_conversation(json.dumps(sharegpt))[0] == normalize_conversation(openai)[0]  # a JSON string (CSV)
    out = tokenize_batch(tiny_tok, messages=[openai, sharegpt], max_length=64)
    assert out.input_ids[0] == out.input_ids[1] and out.loss_mask[0] == out.loss_mask[1]


# ------------------------------------------------------------------------------------------------
# rejects

BAD = [
    ("hello", "messages is not a list (str)"),
    (5, "messages is not a list (int)"),
    ([], "empty conversation"),
    (["hi"], "messages[0] is not an object (str)"),
    ([{"content": "hi"}], "messages[0] has no role"),
    ([{"role": "user"}], "messages[0] has no content"),
    ([{"role": "user", "content": None}], "messages[0] has no content"),
    ([{"role": "user", "content": "q"}, {"role": "tool", "content": "x"}],
     "messages[1] has unknown role 'tool' (expected system, user or assistant; ShareGPT: human or gpt)"),
    ([{"role": "user", "content": ["what", "is"]}], "messages[0] content is not a string (list)"),
    ([{"from": "human", "value": 3}], "messages[0] content is not a string (int)"),
    ([{"role": "user", "content": "q"}, {"role": "user", "content": "again"}], "no assistant turn"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}], "empty assistant turn (messages[1])"),
    ([{"role": "user", "content": "\ud800"}, {"role": "assistant", "content": "a"}],
     "invalid Unicode in messages[0] (unpaired surrogate)"),
]


def test_bad_conversations_are_rejects_with_reasons(tiny_tok):
    good = [{"role": "user", "content": "what"}, {"role": "assistant", "content": "w1"}]
    values = [good] + [v for v, _ in BAD] + [good]
    out = tokenize_batch(tiny_tok, messages=values, max_length=64)
    assert out.reject == [None] + [r for _, r in BAD] + [None]
    for i in range(1, len(BAD) + 1):
        assert out.input_ids[i] == out.loss_mask[i] == [] and out.n_tokens[i] == 0
    assert out.input_ids[0] == out.input_ids[-1]


def test_a_template_error_is_a_reject(tiny_tok):
    import copy

    strict = copy.deepcopy(tiny_tok)
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                            "{{ raise_exception('System role not supported') }}{% endif %}"
                            "{{ m['role'] }} : {{ m['content'] }}\n{% endfor %}"
                            "{% if add_generation_prompt %}assistant : {% endif %}")
    conv = [{"role": "user", "content": "what"}, {"role": "assistant", "content": "w1"}]
    out = tokenize_batch(strict, messages=[[{"role": "system", "content": "a"}] + conv, conv], max_length=64)
    assert out.reject[0].startswith("chat template error: TemplateError: System role not supported")
    assert out.reject[1] is None


def test_a_template_that_rewrites_earlier_turns(tiny_tok):
    """A template that renders earlier replies differently (as reasoning templates drop earlier
    thoughts) cannot train those turns; --assistant-turns last still works."""
    import copy

    rewriting = copy.deepcopy(tiny_tok)
    rewriting.chat_template = ("{% for m in messages %}{{ m['role'] }} : "
                               "{% if m['role'] == 'assistant' and not loop.last %}w0{% else %}{{ m['content'] }}{% endif %}"
                               " </s>\n{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}")
    conv = [{"role": "user", "content": "what"}, {"role": "assistant", "content": "w1"},
            {"role": "user", "content": "is"}, {"role": "assistant", "content": "w2"}]
    out = tokenize_batch(rewriting, messages=[conv, conv], max_length=64)
    assert out.reject[0].startswith("the chat template renders the conversation up to message 1 differently")
    last = tokenize_batch(rewriting, messages=[conv], max_length=64, assistant_turns="last")
    assert last.reject == [None]
    assert rewriting.convert_ids_to_tokens([i for i, m in zip(last.input_ids[0], last.loss_mask[0]) if m]) == ["w2", "</s>"]


def test_too_long(tiny_tok):
    conv = [{"role": "user", "content": "what is a"}, {"role": "assistant", "content": "w1 w2 w3"},
            {"role": "user", "content": "is"}, {"role": "assistant", "content": "w4 w5"}]
    full = tokenize_batch(tiny_tok, messages=[conv], max_length=64)
    n = full.n_tokens[0]
    first = full.loss_mask[0].index(1)
    cut = tokenize_batch(tiny_tok, messages=[conv], max_length=first + 2)
    assert cut.truncated == [True] and cut.n_tokens == [first + 2]
    assert cut.input_ids[0] == full.input_ids[0][: first + 2]
    assert cut.loss_mask[0] == full.loss_mask[0][: first + 2] and sum(cut.score_mask[0]) == 2
    assert tokenize_batch(tiny_tok, messages=[conv], max_length=first).reject == [
        f"no assistant token within --max-length ({first} tokens before the first assistant reply)"]
    assert tokenize_batch(tiny_tok, messages=[conv], max_length=n - 1, on_too_long="reject").reject == [
        f"{n} tokens > --max-length {n - 1}"]
    assert tokenize_batch(tiny_tok, messages=[conv], max_length=n, on_too_long="reject").reject == [None]


# ------------------------------------------------------------------------------------------------
# reading files: detection, nested values in JSONL and Parquet, originals back


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


CONV = [{"role": "user", "content": "what"}, {"role": "assistant", "content": "w1"}]


def test_check_columns_detects_chat(tmp_path):
    msgs = _jsonl(tmp_path / "m.jsonl", [{"id": "a", "messages": CONV}])
    share = _jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": "q"}]}])
    text = _jsonl(tmp_path / "t.jsonl", [{"text": "x", "messages": CONV}])
    ultra = _jsonl(tmp_path / "u.jsonl", [{"prompt": "what", "prompt_id": "1", "messages": CONV}])  # UltraChat 200k
    dialog = _jsonl(tmp_path / "d.jsonl", [{"dialog": CONV}])
    assert check_columns([msgs, share, ultra], Columns(), "--pool") == MODE_CHAT
    assert check_columns([text], Columns(), "--pool") == "text"  # a text column wins, as before
    assert check_columns([text, msgs], Columns(messages="messages"), "--pool") == MODE_CHAT  # named: chat
    assert check_columns([dialog], Columns(messages="dialog"), "--pool") == MODE_CHAT
    with pytest.raises(InputError, match=r"--pool: .*d.jsonl has no column 'text' \(--text-column\) nor 'prompt'.* nor "
                                         r"'messages'/'conversations' \(--messages-column\); columns found: dialog"):
        check_columns([dialog], Columns(), "--pool")
    with pytest.raises(InputError, match=r"--pool: .*m.jsonl has no column 'dialog' \(--messages-column\)"):
        check_columns([dialog, msgs], Columns(messages="dialog"), "--pool")
    only_text = _jsonl(tmp_path / "o.jsonl", [{"text": "x"}])
    with pytest.raises(InputError, match=r"--pool: files mix column layouts: .*m.jsonl has 'messages' but not 'text'"):
        check_columns([only_text, msgs], Columns(), "--pool")
    with pytest.raises(ValueError, match="assistant_turns"):
        Columns(assistant_turns="some")


def test_read_file_rows_jsonl_and_parquet(tmp_path):
    rows = [
        {"id": "ok", "messages": CONV},
        {"id": "sg", "conversations": [{"from": "human", "value": "what"}, {"from": "gpt", "value": "w1"}]},
        {"id": "none", "messages": None},
        {"id": "tool", "messages": [{"role": "tool", "content": "x"}]},
        {"id": "nocol", "other": 1},
        "[1, 2]",
    ]
    path = _jsonl(tmp_path / "c.jsonl", rows)
    (table,) = read_file_rows(path, Columns(), MODE_CHAT)
    got = table.to_pylist()
    assert [r["reject"] for r in got] == [None, None, "null messages",
                                          ("messages[0] has unknown role 'tool' (expected system, user or assistant; "
                                           "ShareGPT: human or gpt)"), "missing column 'messages'",
                                          "not a JSON object (list)"]
    assert got[0]["messages"] == got[1]["messages"] == CONV
    assert got[2]["messages"] is None and got[0]["text"] is None

    pq_path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": ["p0", "p1", "p2"],
                             "conversations": [[{"from": "human", "value": "what"}, {"from": "gpt", "value": "w1"}],
                                               [], [{"from": "gpt", "value": None}]]}), str(pq_path))
    (table,) = read_file_rows(str(pq_path), Columns(), MODE_CHAT)
    got = table.to_pylist()
    assert [r["reject"] for r in got] == [None, "empty conversation", "conversations[0] has no content"]
    assert got[0]["messages"] == CONV
    original = read_original_rows(str(pq_path), [0])
    assert original.column("conversations").to_pylist()[0] == [{"from": "human", "value": "what"},
                                                                {"from": "gpt", "value": "w1"}]
    original = read_original_rows(path, [1, 0])
    assert original.column("messages").to_pylist()[1] == CONV


# ------------------------------------------------------------------------------------------------
# the whole job, and finetune / evaluate, on chat files


def _tiny_conv(rng: random.Random, turns: int):
    def text(n):
        return " ".join(rng.choice(TINY_WORDS) for _ in range(n))

    conv = []
    for _ in range(turns):
        conv += [{"role": "user", "content": text(rng.randint(1, 4))}, {"role": "assistant", "content": text(rng.randint(1, 5))}]
    return conv


@pytest.fixture
def chat_pool(tmp_path):
    rng = random.Random(3)
    d = tmp_path / "chat"
    d.mkdir()
    _jsonl(d / "domain.jsonl", [{"id": f"d{i}", "messages": _tiny_conv(rng, 1)} for i in range(6)])
    pool = [{"id": f"j{i}", "messages": _tiny_conv(rng, rng.randint(1, 2))} for i in range(14)]
    pool += [{"id": "j-bad-role", "messages": [{"role": "robot", "content": "w1"}]},
             {"id": "j-no-assistant", "messages": [{"role": "user", "content": "w1"}]},
             {"id": "j-not-list", "messages": "w1 w2"}]
    _jsonl(d / "pool.jsonl", pool)
    share = [[{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in _tiny_conv(rng, 1)]
             for _ in range(12)]
    share.append([{"from": "human", "value": "w1"}, {"from": "gpt", "value": None}])
    pq.write_table(pa.table({"id": [f"s{i}" for i in range(len(share))], "conversations": share}), str(d / "pool.parquet"))
    return d, len(pool) + len(share)


def test_select_on_chat_pools(chat_pool, tiny_chat_model_dir, tmp_path, capsys):
    import polars as pl

    from ntk_ray.cli import main

    d, n_pool = chat_pool
    out = tmp_path / "out"
    rc = main(["select", "--domain", str(d / "domain.jsonl"), "--pool", str(d / "pool.jsonl"), str(d / "pool.parquet"),
               "--budget", "8", "--out", str(out), "--model", str(tiny_chat_model_dir), "--executor", "local",
               "--max-length", "48", "--proj-dim", "32", "--warmup-epochs", "0.5"])
    assert rc == 0, capsys.readouterr().err
    ranked = pl.read_parquet(out / "ranked.parquet")
    rejects = pl.read_parquet(out / "rejects.parquet")
    pool_rejects = rejects.filter(pl.col("role") == "pool")
    assert ranked.height + pool_rejects.height == n_pool
    assert set(ranked["id"]) | set(pool_rejects["id"]) == ({f"j{i}" for i in range(14)} | {"j-bad-role", "j-no-assistant",
                                                            "j-not-list"} | {f"s{i}" for i in range(13)})
    reasons = dict(zip(pool_rejects["id"], pool_rejects["reason"]))
    assert reasons["j-no-assistant"] == "no assistant turn"
    assert reasons["j-not-list"] == "messages is not a list (str)"
    assert reasons["j-bad-role"].startswith("messages[0] has unknown role 'robot'")
    assert reasons["s12"] == "conversations[1] has no content"
    selected = pl.read_parquet(out / "selected.parquet")
    assert selected.height == 8 and selected["rank"].to_list() == list(range(1, 9))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["pool_rows"] == n_pool
    # the original conversation column comes back as it was in the input
    originals = {r["id"]: r for r in (json.loads(line) for line in (d / "pool.jsonl").read_text().splitlines())}
    originals |= {r["id"]: r for r in pq.read_table(str(d / "pool.parquet")).to_pylist()}
    for row in selected.to_dicts():
        name = "messages" if row["id"].startswith("j") else "conversations"
        assert row[name] == originals[row["id"]][name]

    # finetune and evaluate read the same chat files
    assert main(["evaluate", "--data", str(d / "pool.jsonl"), "--model", str(tiny_chat_model_dir), "--max-length", "48"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["rows"] == 14 and result["rejected"] == 3 and result["loss"] > 0
    adapter = tmp_path / "adapter"
    assert main(["finetune", "--train", str(d / "pool.parquet"), "--out", str(adapter), "--model", str(tiny_chat_model_dir),
                 "--epochs", "1", "--assistant-turns", "last", "--max-length", "48"]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert trained["rows"] == 12 and trained["rejected"] == 1
