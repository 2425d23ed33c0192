"""LoRA training loop and the evaluation loss (tiny random model, no Ray)."""

import math

import torch

from conftest import build_tiny_lora_model, random_samples
from ntk_ray.training import TrainConfig, mean_token_loss, train_lora


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
