"""Helpers of benchmarks/gpu_check.sh (not an entry point of its own):

    _gpu_check.py model DIR --hidden H --layers L --intermediate I --heads A --kv-heads K --vocab V [--device cuda]
        a random-weight Llama built from its config (no download) and a word-level tokenizer of V
        words ``w0 .. w{V-4}`` with a chat template, saved to DIR (bfloat16 weights above 100M
        parameters, else float32); prints the parameter count
    _gpu_check.py data DIR --vocab V --domain N --pool N --min-words A --max-words B [--seed S]
        domain.jsonl (prompt/response rows drawn from the first tenth of the vocabulary) and
        pool.jsonl (5% like the domain rows, the rest from the whole vocabulary)
    _gpu_check.py features A B
        compares two feature directories (same rows): per-row cosine (min, median) and the
        Spearman correlation of their mean-cosine scores against the first 16 rows; one JSON line
    _gpu_check.py rankings A B
        compares two select outputs: identical ranked.parquet (id, rank, stage)? overlap of the
        selected sets; one JSON line
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def make_model(a) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(a.dir)
    out.mkdir(parents=True, exist_ok=True)
    words = ["[UNK]", "</s>", "<s>"] + [f"w{i}" for i in range(a.vocab - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", bos_token="<s>", unk_token="[UNK]")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}"
                          "{% if m['role'] == 'assistant' %} </s>{% endif %}{{ '\\n' }}{% endfor %}"
                          "{% if add_generation_prompt %}assistant : {% endif %}")
    fast.save_pretrained(str(out))
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                      max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=2, eos_token_id=1)
    torch.manual_seed(a.seed)
    with torch.device(a.device):
        model = LlamaForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    if n > 100_000_000:
        model = model.to(torch.bfloat16)
    model.save_pretrained(str(out))
    print(json.dumps({"model": str(out), "parameters": n, "dtype": str(next(model.parameters()).dtype)}))


def make_data(a) -> None:
    rng = np.random.default_rng(a.seed)
    out = Path(a.dir)
    out.mkdir(parents=True, exist_ok=True)
    n_words = a.vocab - 3
    domain_words = max(2, n_words // 10)

    def row(i: int, prefix: str, words: int) -> dict:
        n = int(rng.integers(a.min_words, a.max_words + 1))
        w = rng.integers(0, words, size=n)
        text = [f"w{j}" for j in w]
        cut = max(1, n // 3)
        return {"id": f"{prefix}{i}", "prompt": " ".join(text[:cut]), "response": " ".join(text[cut:]),
                "label": "domain" if words == domain_words else "other"}

    with open(out / "domain.jsonl", "w") as f:
        f.writelines(json.dumps(row(i, "d", domain_words)) + "\n" for i in range(a.domain))
    with open(out / "pool.jsonl", "w") as f:
        f.writelines(json.dumps(row(i, "p", domain_words if i % 20 == 0 else n_words)) + "\n" for i in range(a.pool))
    print(json.dumps({"domain": a.domain, "pool": a.pool, "dir": str(out)}))


def _features(directory: Path) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    out = {}
    for path in sorted(directory.glob("*.parquet")):
        t = pq.read_table(path).to_pydict()
        for i, f, r in zip(t["id"], t["feature"], t.get("reject", [None] * len(t["id"]))):
            if r is None:
                out[i] = np.asarray(f, dtype=np.float64)
    return out


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def compare_features(a) -> None:
    fa, fb = _features(Path(a.a)), _features(Path(a.b))
    ids = sorted(set(fa) & set(fb))
    xa, xb = np.stack([fa[i] for i in ids]), np.stack([fb[i] for i in ids])
    cos = (xa * xb).sum(1) / (np.linalg.norm(xa, axis=1) * np.linalg.norm(xb, axis=1) + 1e-300)

    def scores(x):
        u = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-300)
        return u[16:] @ u[:16].mean(0)

    print(json.dumps({"rows": len(ids), "missing": len(set(fa) ^ set(fb)), "cos_min": float(cos.min()),
                      "cos_median": float(np.median(cos)),
                      "spearman_scores": _spearman(scores(xa), scores(xb)) if len(ids) > 17 else None}))


def compare_rankings(a) -> None:
    import polars as pl

    ra = pl.read_parquet(Path(a.a) / "ranked.parquet").sort("rank")
    rb = pl.read_parquet(Path(a.b) / "ranked.parquet").sort("rank")
    same = ra.select("id", "rank", "stage").equals(rb.select("id", "rank", "stage"))
    sa, sb = set(ra.filter(pl.col("selected"))["id"]), set(rb.filter(pl.col("selected"))["id"])
    print(json.dumps({"identical": bool(same), "selected_overlap": len(sa & sb) / max(1, len(sa)), "rows": ra.height}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("model")
    m.add_argument("dir")
    for flag, default in (("--hidden", 64), ("--layers", 2), ("--intermediate", 128), ("--heads", 4), ("--kv-heads", 2),
                          ("--vocab", 512), ("--seed", 0)):
        m.add_argument(flag, type=int, default=default)
    m.add_argument("--device", default="cpu")
    d = sub.add_parser("data")
    d.add_argument("dir")
    for flag, default in (("--vocab", 512), ("--domain", 32), ("--pool", 1000), ("--min-words", 8), ("--max-words", 40),
                          ("--seed", 0)):
        d.add_argument(flag, type=int, default=default)
    for name in ("features", "rankings"):
        c = sub.add_parser(name)
        c.add_argument("a")
        c.add_argument("b")
    a = p.parse_args(argv)
    {"model": make_model, "data": make_data, "features": compare_features, "rankings": compare_rankings}[a.cmd](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
