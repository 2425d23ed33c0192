"""Shared fixtures: tiny random causal LMs for the plain-torch tests, one Ray per session."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one torch thread per pytest-xdist worker (`make test` runs 2 on 2 cores), both cores otherwise
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

#: after the last test, the interpreter must be gone within this many seconds (Ray's shutdown
#: included): past it every thread's stack is printed and the process exits 1, so a hang at exit
#: (seen once: pyarrow's S3 shutdown, apache/arrow#50188) fails CI with a stack instead of
#: running into its time limit
EXIT_WATCHDOG_S = 180


def pytest_unconfigure(config):
    import faulthandler
    import sys

    faulthandler.dump_traceback_later(EXIT_WATCHDOG_S, exit=True, file=sys.__stderr__)


@pytest.fixture(autouse=True)
def _no_output_lock_outlives_its_test():
    """Every output lock a test takes is released by the end of that test (a held URI lock keeps
    a heartbeat thread and an object-store file system alive until exit)."""
    from ntk_ray.io import outdir

    before, before_uri = set(outdir._HELD), set(outdir._URI_HELD)
    yield
    leaked = (set(outdir._HELD) - before) | (set(outdir._URI_HELD) - before_uri)
    for key in set(outdir._HELD) - before:
        outdir.release_out_lock(key)
    for key in set(outdir._URI_HELD) - before_uri:
        outdir.release_uri_lock(key)
    assert not leaked, f"output locks still held after the test: {sorted(leaked)}"


def build_tiny_lora_model(seed: int = 0, targets=("q_proj", "k_proj", "v_proj", "o_proj"), vocab: int = 97,
                          lm_head_bias: bool = False):
    """A random 2-layer Llama with LoRA (B initialised non-zero so every factor has gradient)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    if lm_head_bias:
        head = torch.nn.Linear(32, vocab, bias=True)
        head.weight.data.copy_(model.lm_head.weight.data)
        torch.nn.init.normal_(head.bias, std=0.5)
        model.lm_head = head
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model():
    return build_tiny_lora_model()


def random_samples(n: int, vocab: int = 97, min_len: int = 3, max_len: int = 17, seed: int = 0, response: bool = True):
    """Token sequences and score masks; with ``response`` only a suffix of positions is scored."""
    g = torch.Generator().manual_seed(seed)
    seqs, masks = [], []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        seqs.append(torch.randint(0, vocab, (length,), generator=g).tolist())
        start = int(torch.randint(0, length - 1, (1,), generator=g)) if response else 0
        masks.append([0] * start + [1] * (length - start))
    return seqs, masks


@pytest.fixture(scope="module")
def tok():
    """The demo tokenizer (with its chat template)."""
    from ntk_ray import models

    return models.load_tokenizer(None)


@pytest.fixture(scope="module")
def plain_tok(tok):
    """The demo tokenizer without its chat template."""
    import copy

    from ntk_ray.core.tokenize import has_chat_template

    t = copy.deepcopy(tok)
    t.chat_template = None
    assert not has_chat_template(t)
    return t


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (CPU only, small object store)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=300 * 2**20,
                 log_to_driver=False)
    yield ray
    ray.shutdown()


# ---------------------------------------------------------------------------------------------
# a tiny random Llama with weights and a word-level tokenizer, and data in its vocabulary: the
# whole job in seconds, in process (``--executor local``)
TINY_WORDS = [f"w{i}" for i in range(40)] + ["what", "is", "a", "the", "food", "word"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny-llama")
    vocab = {w: i for i, w in enumerate(["[UNK]", "</s>", "<s>"] + TINY_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="[UNK]").save_pretrained(str(d))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(str(d))
    return d


#: a chat template WITHOUT a default system prompt for the tiny word-level tokenizer (it splits on
#: whitespace, so ':' and the role names are [UNK] tokens: fine for a random model)
TINY_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}"
                      "{% if m['role'] == 'assistant' %} </s>{% endif %}{{ '\\n' }}{% endfor %}"
                      "{% if add_generation_prompt %}assistant : {% endif %}")


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny Llama of ``tiny_model_dir`` with TINY_CHAT_TEMPLATE as its chat template."""
    import shutil

    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tiny-chat-llama")
    for f in tiny_model_dir.iterdir():
        shutil.copy(f, d / f.name)
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tok.chat_template = TINY_CHAT_TEMPLATE
    tok.save_pretrained(str(d))
    return d


@pytest.fixture
def tiny_data(tmp_path):
    """domain.jsonl (6 rows of 6 words) and pool.jsonl (30 rows of 2-11 words), ids d*/p*."""
    import numpy as np

    rng = np.random.default_rng(0)
    d = tmp_path / "data"
    d.mkdir()

    def row(prefix, i, n):
        return {"id": f"{prefix}{i}", "text": " ".join(rng.choice(TINY_WORDS, size=n))}

    (d / "domain.jsonl").write_text("".join(json.dumps(row("d", i, 6)) + "\n" for i in range(6)))
    pool = [row("p", i, int(rng.integers(2, 12))) for i in range(30)]
    (d / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pool))
    return d


# ---------------------------------------------------------------------------------------------
# the whole job on tiny real data (bundled corpus + demo model), shared by the e2e/resume tests
BUDGET = 6


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    from ntk_ray.demo import make_demo_split

    d = tmp_path_factory.mktemp("e2e")
    split = make_demo_split(d / "data", n_domain=8, n_eval=8, n_pool=60, seed=0)
    # a second pool file with rows that must be rejected, not lost
    extra = d / "data" / "extra.jsonl"
    lines = [
        json.dumps({"id": "x-good", "prompt": "What does \"bread\" mean?", "response": "food made from flour and water"}),
        "{broken json",
        json.dumps({"id": "x-empty", "prompt": "Define it.", "response": "   "}),
        json.dumps({"id": "x-good", "prompt": "again", "response": "a duplicate id"}),
    ]
    extra.write_text("\n".join(lines) + "\n")
    return d, split


def select_args(data_dir, out, *extra) -> list[str]:
    return ["select", "--domain", str(data_dir / "data" / "domain.jsonl"),
            "--pool", str(data_dir / "data" / "pool.parquet"), str(data_dir / "data" / "extra.jsonl"),
            "--budget", str(BUDGET), "--out", str(out), "--max-length", "48", "--warmup-epochs", "0.5",
            "--proj-dim", "256", "--coarse-factor", "3", *extra]


def run_select(data_dir, out, *extra) -> int:
    from ntk_ray.cli import main

    return main(select_args(data_dir, out, *extra))


@pytest.fixture(scope="session")
def first_run(ray_session, demo_data):
    d, _ = demo_data
    out = d / "run1"
    assert run_select(d, out, "--keep-features") == 0
    return out


def kill_driver_when_marked(patch: str, args: list[str], mark, env: dict, wait_s: float = 120) -> None:
    """Run ``ntk-ray ARGS`` as a separate driver process with ``patch`` (Python source) executed
    first; the patch appends to the file ``$MARK`` at the moment to kill and then sleeps. As soon
    as ``mark`` holds a line the driver is SIGKILLed (a real kill: no cleanup of any kind runs)."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    driver = "import os, sys, time\n" + patch + "\nfrom ntk_ray.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    proc = subprocess.Popen([sys.executable, "-c", driver, *map(str, args)], env=dict(os.environ, MARK=str(mark), **env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parents[1])
    deadline = time.time() + wait_s
    while not (mark.exists() and mark.read_text().strip()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
