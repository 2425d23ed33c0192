"""LoRA training loop and the evaluation loss (tiny random model, no Ray)."""

import math

import torch

from conftest import build_tiny_lora_model, random_samples
from ntk_ray.core.training import TrainConfig, mean_token_loss, train_lora


def test_mean_token_loss_matches_a_manual_cross_entropy():
    model = build_tiny_lora_model(seed=1)
    seqs, masks = random_samples(5, seed=3)
    got = mean_token_loss(model, seqs, masks, batch_tokens=30)
    total, count = 0.0, 0
    with torch.no_grad():
        for s, m in zip(seqs, masks):
            logits = model(input_ids=torch.tensor([s])).logits[0]
            for t in range(1, len(s)):
                if m[t]:
                    total += -torch.log_softmax(logits[t - 1], -1)[s[t]].item()
                    count += 1
    assert got["tokens"] == count
    assert math.isclose(got["loss"], total / count, rel_tol=1e-5)
    assert math.isclose(got["perplexity"], math.exp(total / count), rel_tol=1e-5)


def test_train_lora_lowers_the_loss_and_is_deterministic_for_a_seed():
    seqs, masks = random_samples(12, seed=4)
    before = mean_token_loss(build_tiny_lora_model(seed=2), seqs, masks)["loss"]
    runs = []
    for _ in range(2):
        model = build_tiny_lora_model(seed=2)
        history = train_lora(model, seqs, masks, TrainConfig(epochs=3, lr=1e-2, batch_tokens=64, seed=7), log=lambda m: None)
        runs.append((history["epoch_loss"], mean_token_loss(model, seqs, masks)["loss"]))
    assert runs[0] == runs[1]
    assert runs[0][1] < before
    only_lora = [n for n, p in build_tiny_lora_model(seed=2).named_parameters() if p.requires_grad]
    assert only_lora and all("lora_" in n for n in only_lora)


def test_train_lora_hands_back_adam_moments_only_when_asked(tmp_path):
    import json

    import pytest

    from ntk_ray.core.training import AdamMoments, as_moments, load_adam_moments, save_adam_moments

    seqs, masks = random_samples(8, seed=5)
    cfg = TrainConfig(epochs=1, lr=1e-2, batch_tokens=48, seed=1)
    plain = train_lora(build_tiny_lora_model(seed=3), seqs, masks, cfg, log=lambda m: None)
    assert "adam" not in plain
    json.dumps(plain)  # the history stays JSON-serialisable by default

    model = build_tiny_lora_model(seed=3)
    history = train_lora(model, seqs, masks, cfg, log=lambda m: None, keep_optimizer_state=True)
    assert history["epoch_loss"] == plain["epoch_loss"]  # keeping the state changes nothing
    moments = history["adam"]
    assert isinstance(moments, AdamMoments)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert moments.names == [n for n, _ in trainable]
    assert [tuple(m.shape) for m in moments.exp_avg] == [tuple(p.shape) for _, p in trainable]
    assert [tuple(v.shape) for v in moments.exp_avg_sq] == [tuple(p.shape) for _, p in trainable]
    assert moments.step == history["steps"] > 1
    assert moments.betas == (0.9, 0.999) and moments.eps == 1e-8
    assert all(float(v.min()) >= 0 and float(v.max()) > 0 for v in moments.exp_avg_sq)
    assert all(float(m.abs().max()) > 0 for m in moments.exp_avg)

    # on disk keyed by parameter name, and back
    path = tmp_path / "adam.pt"
    save_adam_moments(path, moments)
    saved = load_adam_moments(path)
    assert saved["names"] == moments.names and saved["step"] == moments.step
    assert saved["betas"] == moments.betas and saved["eps"] == moments.eps
    for name, m, v in zip(moments.names, moments.exp_avg, moments.exp_avg_sq):
        assert torch.equal(saved["exp_avg"][name], m) and torch.equal(saved["exp_avg_sq"][name], v)
    again = as_moments(saved)
    assert again.names == moments.names and all(torch.equal(a, b) for a, b in zip(again.exp_avg, moments.exp_avg))

    # reordered by name, with or without peft's "base_model.model." prefix
    wanted = [n.removeprefix("base_model.model.") for n in reversed(moments.names)]
    picked = moments.select(wanted)
    assert picked.names == wanted and torch.equal(picked.exp_avg[0], moments.exp_avg[-1])
    with pytest.raises(ValueError, match="no Adam moments"):
        moments.select(["nope.weight"])
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an ntk-ray Adam moments file"):
        load_adam_moments(tmp_path / "other.pt")


def test_adam_moments_of_unstepped_and_foreign_parameters():
    import pytest

    from ntk_ray.core.training import adam_moments

    a, b = torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([a, b], lr=0.1, betas=(0.5, 0.6), eps=1e-4)
    a.grad = torch.ones(2, 3)
    opt.step()  # b has no gradient: no state
    m = adam_moments(opt, [a, b], ["a", "b"])
    assert m.step == 1 and m.betas == (0.5, 0.6) and m.eps == 1e-4
    assert torch.allclose(m.exp_avg[0], torch.full((2, 3), 0.5)) and torch.allclose(m.exp_avg_sq[0], torch.full((2, 3), 0.4))
    assert torch.equal(m.exp_avg[1], torch.zeros(4)) and torch.equal(m.exp_avg_sq[1], torch.zeros(4))
    with pytest.raises(ValueError, match="not in the optimizer"):
        adam_moments(opt, [torch.nn.Parameter(torch.ones(1))])
    with pytest.raises(ValueError, match="names"):
        adam_moments(opt, [a, b], ["a"])
