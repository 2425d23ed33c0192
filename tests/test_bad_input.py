"""Bad input gets a clear answer before any work starts: `ntk-ray select` exits 2 with ONE line
on stderr naming the file, column or flag, and Ray never starts. Plus the row-level guards that
keep a bad number or a crash from corrupting the outputs (non-finite gradients, atomic writes,
a tokenizer without a pad token).

Every test here runs in well under a second once the tiny model directory exists; none loads
the demo model or starts Ray (``runtime.ray_executor.connect`` is replaced by a function that fails).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ntk_ray.runtime import ray_executor
from ntk_ray.io import atomic
from ntk_ray.cli import main
from ntk_ray.config import MIN_DOMAIN_ROWS
from ntk_ray.models import ModelError, load_tokenizer

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89"


class RayStarted(AssertionError):
    pass


def _word_level_tokenizer(*, eos: str | None = "</s>", unk: str | None = "[UNK]"):
    """A tiny offline fast tokenizer (whitespace + word level), without a pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "</s>", "<s>"] + [f"w{i}" for i in range(20)]
                                        + ["what", "is", "a", "the", "food", "word"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {k: v for k, v in (("eos_token", eos), ("unk_token", unk)) if v is not None}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A local model directory: the config of a 2-layer Llama and a word-level tokenizer (no pad
    token). The weight file is a stand-in that no loader could read: nothing before Ray starts
    may read it (the up-front checks build the model on the meta device at most, and only look
    that a weight file exists)."""
    from transformers import LlamaConfig

    d = tmp_path_factory.mktemp("tiny-model")
    tokenizer = _word_level_tokenizer()
    tokenizer.save_pretrained(str(d))
    LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                tie_word_embeddings=False, architectures=["LlamaForCausalLM"]).save_pretrained(str(d))
    (d / "model.safetensors").write_bytes(b"not read before Ray starts")
    return d


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    (d / "domain.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "text": f"what is w{i}"}) + "\n"
                                            for i in range(6)))
    (d / "pool.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "text": f"the word w{i}"}) + "\n"
                                          for i in range(10)))
    return d


@pytest.fixture
def no_ray(monkeypatch):
    """Fail loudly if anything gets as far as starting Ray."""
    import ray

    before = ray.is_initialized()

    def init_ray(*args, **kwargs):
        raise RayStarted("the command got past every up-front check and tried to start Ray")

    monkeypatch.setattr(ray_executor, "connect", init_ray)
    yield
    assert ray.is_initialized() == before
    if not before:
        assert not ray.is_initialized()


def select(data: Path, model_dir: Path, tmp_path: Path, *extra: str, domain=None, pool=None,
           budget: str = "3") -> list[str]:
    """`select` arguments that pass every check; ``extra`` flags come last (argparse keeps the
    last value of a flag given twice, so ``"--model", other`` overrides the tiny model)."""
    return ["select", "--domain", *(domain or [str(data / "domain.jsonl")]),
            "--pool", *(pool or [str(data / "pool.jsonl")]), "--budget", budget,
            "--out", str(tmp_path / "out"), "--model", str(model_dir), *extra]


def error_line(capsys, args: list[str]) -> str:
    """Run the CLI; assert exit status 2 and exactly one line on stderr; return that line."""
    code = main(args)
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1, lines
    assert lines[0].startswith("ntk-ray: error: ")
    return lines[0][len("ntk-ray: error: "):]


# ---- the control: valid input gets through every check (so the tests below test something) ----

def test_valid_input_passes_every_up_front_check(no_ray, data, model_dir, tmp_path):
    with pytest.raises(RayStarted):
        main(select(data, model_dir, tmp_path))
    stamp = json.loads((tmp_path / "out" / "_work" / "config.json").read_text())
    assert stamp["fingerprint"]


# ---- files --------------------------------------------------------------------------------------

def test_missing_file(no_ray, data, model_dir, tmp_path, capsys):
    missing = str(data / "nope.jsonl")
    line = error_line(capsys, select(data, model_dir, tmp_path, pool=[missing]))
    assert line == f"--pool: no such file or directory: {missing}"


def test_empty_glob(no_ray, data, model_dir, tmp_path, capsys):
    pattern = str(data / "shards" / "*.parquet")
    line = error_line(capsys, select(data, model_dir, tmp_path, pool=[pattern]))
    assert line == f"--pool: glob '{pattern}' matched no files"


def test_directory_without_data_files(no_ray, data, model_dir, tmp_path, capsys):
    (data / "empty").mkdir()
    (data / "empty" / "notes.txt").write_text("x")
    line = error_line(capsys, select(data, model_dir, tmp_path, domain=[str(data / "empty")]))
    assert line == f"--domain: directory {data / 'empty'} has no .jsonl/.json/.parquet/.csv/.tsv/.arrow files"


def test_unsupported_file_type(no_ray, data, model_dir, tmp_path, capsys):
    other = data / "pool.xlsx"  # (.csv is an input format now)
    other.write_text("text\nhello\n")
    line = error_line(capsys, select(data, model_dir, tmp_path, pool=[str(other)]))
    assert line.startswith(f"--pool: unsupported file type '{other}'")


def test_truncated_parquet(no_ray, data, model_dir, tmp_path, capsys):
    path = data / "pool.parquet"
    pq.write_table(pa.table({"text": [f"the word w{i}" for i in range(10)]}), str(path))
    path.write_bytes(path.read_bytes()[:-20])
    line = error_line(capsys, select(data, model_dir, tmp_path, pool=[str(path)]))
    assert line.startswith(f"--pool: {path} is not a readable Parquet file")


@pytest.mark.parametrize("name", ["image.jsonl", "image.json", "image.parquet"])
def test_file_of_another_format(no_ray, data, model_dir, tmp_path, capsys, name):
    path = data / name
    path.write_bytes(PNG)
    line = error_line(capsys, select(data, model_dir, tmp_path, domain=[str(path)]))
    if name.endswith(".parquet"):
        assert line.startswith(f"--domain: {path} is not a readable Parquet file")
    else:
        assert line.startswith(f"--domain: {path} is not JSON Lines or a JSON array (first record: invalid UTF-8")


def test_jsonl_whose_first_line_is_broken_is_not_json(no_ray, data, model_dir, tmp_path, capsys):
    path = data / "broken.jsonl"
    path.write_text('{"text": "what is w1"\n{"text": "what is w2"}\n')
    line = error_line(capsys, select(data, model_dir, tmp_path, pool=[str(path)]))
    assert line.startswith(f"--pool: {path} is not JSON Lines or a JSON array (first record: broken JSON line")


def test_malformed_json_array_is_found_before_work_starts(no_ray, data, model_dir, tmp_path, capsys):
    path = data / "pool.json"
    path.write_text('[{"text": "the word w1"}, {"text" "the word w2"}, {"text": "the word w3"}]')
    line = error_line(capsys, select(data, model_dir, tmp_path, pool=[str(path)], budget="2"))
    assert line.startswith(f"--pool: {path}: malformed JSON array at element 1")


# ---- columns ------------------------------------------------------------------------------------

def test_missing_text_column_names_the_override_flags(no_ray, data, model_dir, tmp_path, capsys):
    path = data / "body.jsonl"
    path.write_text(json.dumps({"body": "x", "id": 1}) + "\n")
    line = error_line(capsys, select(data, model_dir, tmp_path, pool=[str(path)]))
    assert line == (f"--pool: {path} has no column 'text' (--text-column) nor 'prompt' (--prompt-column) and "
                    f"'response' (--response-column) nor 'messages'/'conversations' (--messages-column); "
                    f"columns found: body, id")


def test_missing_response_column_names_its_flag(no_ray, data, model_dir, tmp_path, capsys):
    path = data / "pr.parquet"
    pq.write_table(pa.table({"prompt": ["q"], "answer": ["a"]}), str(path))
    line = error_line(capsys, select(data, model_dir, tmp_path, "--response-column", "reply", pool=[str(path)]))
    assert "has no column 'text' (--text-column) nor 'reply' (--response-column)" in line
    assert line.startswith(f"--pool: {path}")


def test_missing_explicit_id_column(no_ray, data, model_dir, tmp_path, capsys):
    line = error_line(capsys, select(data, model_dir, tmp_path, "--id-column", "uid"))
    assert line.startswith(f"--domain: {data / 'domain.jsonl'} has no column 'uid' (--id-column)")


# ---- row counts ---------------------------------------------------------------------------------

def test_empty_domain_set(no_ray, data, model_dir, tmp_path, capsys):
    path = data / "empty.jsonl"
    path.write_text("\n  \n")
    line = error_line(capsys, select(data, model_dir, tmp_path, domain=[str(path)]))
    assert line == f"--domain: no records in any input file ({path})"


def test_domain_set_smaller_than_the_minimum(no_ray, data, model_dir, tmp_path, capsys):
    path = data / "small.jsonl"
    path.write_text("".join(json.dumps({"text": f"what is w{i}"}) + "\n" for i in range(MIN_DOMAIN_ROWS - 1)))
    line = error_line(capsys, select(data, model_dir, tmp_path, domain=[str(path)]))
    assert line == f"--domain: {MIN_DOMAIN_ROWS - 1} rows in {path}; at least {MIN_DOMAIN_ROWS} are needed"


def test_budget_zero(no_ray, data, model_dir, tmp_path, capsys):
    line = error_line(capsys, select(data, model_dir, tmp_path, budget="0"))
    assert line == "--budget must be at least 1 (got 0)"


def test_budget_larger_than_the_pool(no_ray, data, model_dir, tmp_path, capsys):
    line = error_line(capsys, select(data, model_dir, tmp_path, budget="11"))
    assert line == f"--budget 11 is larger than the pool (10 rows in {data / 'pool.jsonl'})"


def test_budget_equal_to_the_pool_is_fine(no_ray, data, model_dir, tmp_path):
    with pytest.raises(RayStarted):
        main(select(data, model_dir, tmp_path, budget="10"))


# ---- flags --------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag,value", [("--scorer", "best"), ("--on-too-long", "drop"), ("--projector", "x")])
def test_invalid_choice_is_an_argparse_error(no_ray, data, model_dir, tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as info:
        main(select(data, model_dir, tmp_path, flag, value))
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}: invalid choice: '{value}'" in last


def test_max_length_too_small(no_ray, data, model_dir, tmp_path, capsys):
    assert error_line(capsys, select(data, model_dir, tmp_path, "--max-length", "4")) == \
        "--max-length must be between 8 and 1048576 (got 4)"


def test_out_holding_a_run_with_another_config(no_ray, data, model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "_work").mkdir(parents=True)
    (out / "_work" / "config.json").write_text(json.dumps({"fingerprint": "0123456789abcdef", "config": {}}))
    (out / "ranked.parquet").write_bytes(b"previous run")
    line = error_line(capsys, select(data, model_dir, tmp_path))
    assert line == (f"--out {out} holds a run with a different config; pass --overwrite to replace it "
                    "or choose another --out")
    assert (out / "ranked.parquet").read_bytes() == b"previous run"  # untouched


def test_out_is_an_unrelated_non_empty_directory(no_ray, data, model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    line = error_line(capsys, select(data, model_dir, tmp_path))
    # (the rest of the line is the output-directory owner's wording: io/outdir.py)
    assert line.startswith(f"--out {out} exists and is not an ntk-ray run directory; ")
    assert (out / "thesis.tex").read_text() == "precious"


# ---- the model ----------------------------------------------------------------------------------

def test_model_path_that_does_not_exist(no_ray, data, model_dir, tmp_path, capsys):
    missing = str(tmp_path / "models" / "nope")
    line = error_line(capsys, select(data, model_dir, tmp_path, "--model", missing))
    assert line == f"--model {missing}: no such file or directory"


def test_model_directory_without_tokenizer(no_ray, data, model_dir, tmp_path, capsys):
    bare = tmp_path / "bare-model"
    bare.mkdir()
    for name in os.listdir(model_dir):
        if not name.startswith("tokenizer") and name != "special_tokens_map.json":
            shutil.copy(model_dir / name, bare / name)
    line = error_line(capsys, select(data, model_dir, tmp_path, "--model", str(bare)))
    assert line == f"--model: model directory {bare} has no tokenizer (tokenizer.json / tokenizer_config.json)"


def test_model_directory_without_config(no_ray, data, model_dir, tmp_path, capsys):
    bare = tmp_path / "tok-only"
    _word_level_tokenizer().save_pretrained(str(bare))
    line = error_line(capsys, select(data, model_dir, tmp_path, "--model", str(bare)))
    assert line == f"--model: model directory {bare} has no config.json"


def test_model_directory_without_weight_files(no_ray, data, model_dir, tmp_path, capsys):
    bare = tmp_path / "no-weights"
    shutil.copytree(model_dir, bare)
    (bare / "model.safetensors").unlink()
    line = error_line(capsys, select(data, model_dir, tmp_path, "--model", str(bare)))
    assert line == f"--model: model directory {bare} has no weight files (*.safetensors, *.bin, *.pt, *.pth)"
    # also with --adapter (the LoRA targets are then not checked, the weights still are)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    line = error_line(capsys, select(data, model_dir, tmp_path, "--model", str(bare), "--adapter", str(adapter)))
    assert "has no weight files" in line
    assert not (tmp_path / "out").exists()


def test_out_that_is_an_existing_file(no_ray, data, model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("my notes")
    args = select(data, model_dir, tmp_path)
    line = error_line(capsys, args)
    assert line == f"--out {out} is an existing file, not a directory; choose a directory"
    assert out.read_text() == "my notes"


def test_tokenizer_without_pad_eos_or_unk(no_ray, data, model_dir, tmp_path, capsys):
    odd = tmp_path / "odd-model"
    shutil.copytree(model_dir, odd)
    for name in os.listdir(odd):
        if name.startswith("tokenizer") or name == "special_tokens_map.json":
            (odd / name).unlink()
    _word_level_tokenizer(eos=None, unk=None).save_pretrained(str(odd))
    line = error_line(capsys, select(data, model_dir, tmp_path, "--model", str(odd)))
    assert line == f"--model: tokenizer of {odd} has no pad, eos or unk token"


def test_lora_targets_that_the_model_does_not_have(no_ray, data, model_dir, tmp_path, capsys):
    line = error_line(capsys, select(data, model_dir, tmp_path, "--lora-targets", "q_proj", "qkv", "c_attn"))
    assert line == ("--lora-targets: model has no modules named ['qkv', 'c_attn'] for LoRA; Linear modules present: "
                    "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj")


def test_lora_targets_are_not_checked_with_a_given_adapter(no_ray, data, model_dir, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(RayStarted):
        main(select(data, model_dir, tmp_path, "--lora-targets", "qkv", "--adapter", str(adapter)))


def test_adapter_directory_that_is_not_an_adapter(no_ray, data, model_dir, tmp_path, capsys):
    line = error_line(capsys, select(data, model_dir, tmp_path, "--adapter", str(tmp_path)))
    assert line == f"--adapter {tmp_path}: no adapter_config.json (not a saved LoRA adapter)"


# ---- row-level guards ---------------------------------------------------------------------------

def test_load_tokenizer_without_pad_token_uses_eos_then_unk(tmp_path):
    with_eos = tmp_path / "eos"
    _word_level_tokenizer().save_pretrained(str(with_eos))
    tok = load_tokenizer(str(with_eos))
    assert tok.pad_token == tok.eos_token == "</s>" and tok.pad_token_id == 1

    only_unk = tmp_path / "unk"
    _word_level_tokenizer(eos=None).save_pretrained(str(only_unk))
    tok = load_tokenizer(str(only_unk))
    assert tok.pad_token == tok.unk_token == "[UNK]"

    neither = tmp_path / "neither"
    _word_level_tokenizer(eos=None, unk=None).save_pretrained(str(neither))
    with pytest.raises(ModelError, match="has no pad, eos or unk token"):
        load_tokenizer(str(neither))


class _FakeComputer:
    """Stands in for features.FeatureComputer: fixed features, one NaN, one inf, one NaN norm."""

    def __init__(self, feature, norm):
        self.feature, self.norm = feature, norm
        self.calls = []

    def features(self, seqs, masks, max_tokens):
        self.calls.append((seqs, masks, max_tokens))
        return SimpleNamespace(feature=torch.tensor(self.feature), norm=torch.tensor(self.norm),
                               objective=torch.zeros(len(seqs)))


def test_featurizer_rejects_non_finite_gradients_with_a_zero_feature():
    from ntk_ray.stages.workers import Featurizer

    nan, inf = float("nan"), float("inf")
    feat = Featurizer.__new__(Featurizer)
    feat.computer = _FakeComputer([[1.0, 2.0], [nan, 1.0], [0.5, -inf], [3.0, 4.0]], [1.0, 2.0, 3.0, nan])
    feat.batch_tokens = 64
    table = pa.table({"id": ["a", "b", "c", "d"], "key": pa.array([1, 2, 3, 4], pa.int64()),
                      "source": ["f"] * 4, "row": pa.array([0, 1, 2, 3], pa.int64()),
                      "input_ids": [[1, 2], [3], [4, 5], [6]], "score_mask": [[1, 1], [1], [1, 1], [1]]})
    out = feat.process(table)
    assert feat.computer.calls == [([[1, 2], [3], [4, 5], [6]], [[1, 1], [1], [1, 1], [1]], 64)]
    assert out.column("id").to_pylist() == ["a", "b", "c", "d"]
    assert out.column("reject").to_pylist() == [None] + ["non-finite gradient (NaN/inf)"] * 3
    features = np.array(out.column("feature").to_pylist(), dtype=np.float32)
    assert features.tolist() == [[1.0, 2.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    assert np.isfinite(features).all()


def test_write_parquet_atomic_leaves_nothing_when_the_write_fails(tmp_path, monkeypatch):
    final = tmp_path / "ranked.parquet"

    def half_write(self, file, **kwargs):
        file.write(b"PAR1" + b"\0" * 1000)  # half a file ...
        raise OSError(28, "No space left on device")  # ... then the disk fills up

    monkeypatch.setattr(pl.DataFrame, "write_parquet", half_write)
    with pytest.raises(OSError, match="No space left"):
        atomic.write_parquet_atomic(pl.DataFrame({"id": ["a"], "rank": [1]}), final)
    assert os.listdir(tmp_path) == []  # no final file, no temporary left behind


def test_write_atomic_keeps_the_previous_complete_file(tmp_path, monkeypatch):
    final = tmp_path / "ranked.parquet"
    atomic.write_parquet_atomic(pl.DataFrame({"id": ["old"]}), final)
    manifest = tmp_path / "manifest.json"
    atomic.write_json_atomic({"counts": {"ranked": 1}}, manifest)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # killed between writing and renaming

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic.write_parquet_atomic(pl.DataFrame({"id": ["new"] * 1000}), final)
    with pytest.raises(KeyboardInterrupt):
        atomic.write_json_atomic({"counts": {"ranked": 2}}, manifest)
    monkeypatch.undo()
    assert pl.read_parquet(final)["id"].to_list() == ["old"]
    assert json.loads(manifest.read_text()) == {"counts": {"ranked": 1}}
    assert sorted(os.listdir(tmp_path)) == ["manifest.json", "ranked.parquet"]


def test_atomic_temporary_names_are_hidden_and_never_globbed_as_parquet(tmp_path):
    tmp = atomic.atomic_path(tmp_path / "ranked.parquet")
    assert tmp.parent == tmp_path and tmp.name.startswith(".") and not tmp.name.endswith(".parquet")


# ---- non-finite embeddings (coarse stage) and non-finite scores (`score`), end to end in-process ----

POISONED = ("p3", "p7")


def _tiny_select(tiny_data, tiny_model_dir, out, **options):
    from ntk_ray.config import SelectConfig

    return SelectConfig(domain=[str(tiny_data / "domain.jsonl")], pool=[str(tiny_data / "pool.jsonl")], budget=5,
                        out=str(out), model=str(tiny_model_dir), max_length=32, proj_dim=64, warmup_epochs=1.0,
                        batch_tokens=512, **options)


def test_non_finite_embeddings_become_rejects_not_ranked_rows(tiny_data, tiny_model_dir, tmp_path, monkeypatch):
    """Pool rows whose coarse-stage embedding is NaN are listed in rejects.parquet with a reason,
    never ranked (neither as candidates nor as coarse rows), and the row accounting holds."""
    import ntk_ray.core.features as features
    from ntk_ray.runner import run_select
    from ntk_ray.runtime.local import LocalExecutor
    from ntk_ray.stages import model as model_stages
    from ntk_ray.stages.workers import NONFINITE_EMBEDDING, Embedder

    class PoisonedEmbedder(Embedder):
        def process(self, batch):
            real, ids = features.mean_pooled_embeddings, batch.column("id").to_pylist()

            def poisoned(*args, **kwargs):
                emb = real(*args, **kwargs).clone()
                for i, row_id in enumerate(ids):
                    if row_id in POISONED:
                        emb[i] = float("nan")
                return emb

            monkeypatch.setattr(features, "mean_pooled_embeddings", poisoned)
            try:
                return super().process(batch)
            finally:
                monkeypatch.setattr(features, "mean_pooled_embeddings", real)

    monkeypatch.setattr(model_stages, "Embedder", PoisonedEmbedder)
    out = tmp_path / "out"
    manifest = run_select(_tiny_select(tiny_data, tiny_model_dir, out), executor=LocalExecutor())
    assert manifest["coarse"]["skipped"] is False
    ranked = pl.read_parquet(out / "ranked.parquet")
    rejects = pl.read_parquet(out / "rejects.parquet")
    assert not set(POISONED) & set(ranked["id"].to_list())
    got = rejects.filter(pl.col("reason") == NONFINITE_EMBEDDING).sort("id")
    assert got["id"].to_list() == list(POISONED)
    assert got["role"].to_list() == ["pool", "pool"] and got["source"].to_list() == [str(tiny_data / "pool.jsonl")] * 2
    assert sorted(got["row"].to_list()) == [3, 7]
    c = manifest["counts"]
    assert c["pool_rows"] == c["ranked"] + c["rejected"] == 30 and c["rejected"] == 2


def test_score_rejects_non_finite_scores_as_select_does(tiny_data, tiny_model_dir, tmp_path):
    """`ntk-ray score` applies select's non-finite check: a NaN feature gives a NaN score, which
    becomes the reject `non-finite score (NaN/inf)` instead of a ranked row."""
    from ntk_ray.config import ScoreConfig
    from ntk_ray.io.shards import list_shards
    from ntk_ray.runner import run_score, run_select
    from ntk_ray.runtime.local import LocalExecutor

    out = tmp_path / "sel"
    run_select(_tiny_select(tiny_data, tiny_model_dir, out, keep_features=True), executor=LocalExecutor())
    shard = list_shards(str(out / "_work" / "features"))[0]
    table = pq.read_table(shard)
    feats = np.array(table.column("feature").to_pylist(), dtype=np.float32)
    poisoned_id = table.column("id")[0].as_py()
    feats[0, :] = np.nan
    col = table.schema.field("feature")
    table = table.set_column(table.schema.get_field_index("feature"), col,
                             pa.array(feats.tolist(), type=col.type))
    pq.write_table(table, shard)
    manifest = run_score(ScoreConfig(features=str(out / "_work" / "features"), anchors=str(out / "_work" / "anchor_features"),
                                     budget=3, out=str(tmp_path / "score")), executor=LocalExecutor())
    ranked = pl.read_parquet(tmp_path / "score" / "ranked.parquet")
    rejects = pl.read_parquet(tmp_path / "score" / "rejects.parquet")
    assert poisoned_id not in ranked["id"].to_list()
    assert rejects.filter(pl.col("id") == poisoned_id)["reason"].to_list() == ["non-finite score (NaN/inf)"]
    assert ranked["score"].is_finite().all()
    assert manifest["counts"]["pool_rows"] == manifest["counts"]["ranked"] + manifest["counts"]["rejected"]
    # the report, as select writes one: its funnel counts the reject, its manifest entry is recorded
    report = (tmp_path / "score" / "report.md").read_text()
    assert manifest["report"]["html"].endswith("report.html") and (tmp_path / "score" / "report.html").is_file()
    assert "1 rejected)" in report and "`ntk-ray score` (scorer `cosine`)" in report, report[:600]
    assert "`ntk-ray score` of the features in" in report and "scorer <code>cosine</code>" in \
        (tmp_path / "score" / "report.html").read_text()


# ---- errors and crashes inside Ray ---------------------------------------------------------------

@pytest.mark.ray
@pytest.mark.timeout(300)
def test_errors_of_ours_raised_inside_ray_come_out_unwrapped(ray_session, capsys, monkeypatch):
    """A UsageError or a flag-naming ValueError raised in a Ray task or a Ray Data actor reaches
    the caller as itself (not RayTaskError), and the CLI prints one line and exits 2."""
    from ntk_ray.io.accounting import UsageError
    from ntk_ray.runtime.ray_executor import RayExecutor

    def _remote_usage_error(x):  # defined here, so Ray ships it by value
        from ntk_ray.io.accounting import UsageError

        raise UsageError(f"--pool: bad value {x} in a worker")

    def _remote_flag_value_error(x):
        raise ValueError("--domain: non-finite gradients for 2 rows, e.g. ['d1', 'd2']")

    ex = RayExecutor(actors=1, accelerator="cpu", log=lambda m: None)
    with pytest.raises(UsageError) as info:
        ex.run_task(_remote_usage_error, 7, gpu=False)
    assert type(info.value) is UsageError and str(info.value) == "--pool: bad value 7 in a worker"
    with pytest.raises(ValueError) as info:
        list(ex.map_tasks(_remote_flag_value_error, [1, 2]))
    assert type(info.value) is ValueError and str(info.value).startswith("--domain: non-finite gradients")

    class Raises:  # defined here, so Ray ships it by value
        def __init__(self, *args):
            pass

        def __call__(self, batch):
            from ntk_ray.io.accounting import UsageError as Usage

            raise Usage("--text-column: bad row in a worker")

    with pytest.raises(UsageError) as info:
        ex.map_shards(Raises, (), [{"path": "x"}], model=False)
    assert type(info.value) is UsageError and str(info.value) == "--text-column: bad row in a worker"

    # through the CLI: one line, exit 2
    from ntk_ray import cli

    def fails(args):
        return ex.run_task(_remote_flag_value_error, 0, gpu=False)

    monkeypatch.setattr(cli, "cmd_config", fails)
    capsys.readouterr()  # Ray Data's own log lines of the runs above
    assert cli.main(["score", "--features", "f", "--anchors", "a", "--budget", "1", "--out", "o"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["ntk-ray: error: --domain: non-finite gradients for 2 rows, e.g. ['d1', 'd2']"]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_shard_that_always_kills_its_worker_fails_quickly_naming_it(ray_session, tmp_path):
    """Actor pools have bounded restarts and retries: a batch whose worker always dies fails the
    run after MAX_TASK_RETRIES + 1 attempts with one line naming the token shard (its input
    file and row range), long before the no-progress timeout."""
    import time

    from ntk_ray.runtime.ray_executor import MAX_TASK_RETRIES, RayExecutor, ShardFailedError

    good, bad = tmp_path / "000000-000000.parquet", tmp_path / "000001-000000.parquet"
    pq.write_table(pa.table({"source": ["a.jsonl"] * 3, "row": [0, 1, 2]}), good)
    pq.write_table(pa.table({"source": ["b.jsonl"] * 3, "row": [40, 41, 42]}), bad)
    poison = str(bad)

    class DiesOnOneShard:  # defined here, so Ray ships it by value
        def __init__(self, *args):
            pass

        def __call__(self, batch):
            import os

            if batch.column("path").to_pylist()[0] == poison:
                os._exit(1)
            return batch

    ex = RayExecutor(actors=1, accelerator="cpu", log=lambda m: None)
    start = time.monotonic()
    with pytest.raises(ShardFailedError) as info:
        ex.map_shards(DiesOnOneShard, (), [{"path": str(good)}, {"path": poison}])
    message = str(info.value)
    assert time.monotonic() - start < 240
    assert "\n" not in message
    assert f"{MAX_TASK_RETRIES + 1} attempts at shard {bad} (b.jsonl rows 40-42)" in message, message
