"""`MethodRun.update_norm`: the mean ||dW||_F of the adapters, the same measure for every method."""
from __future__ import annotations

import pytest
import torch

from increlora_fast.layer import IncreLoRALinear
from increlora_fast.training.registry import build_method
from increlora_fast.training.settings import RunSettings, resolve


def tiny_classifier(seed: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30, hidden_size=12, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=20, max_position_embeddings=16, num_labels=2)
    return BertForSequenceClassification(config)


def settings(method: str) -> RunSettings:
    return resolve(RunSettings(method=method, max_steps=10), train_size=100)


def randomize_adapters(run, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in run.model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


def expected_increlora(run) -> float:
    norms = [torch.linalg.norm(m.delta_weight()) for m in run.model.modules()
             if isinstance(m, IncreLoRALinear)]
    assert len(norms) == 12
    return float(torch.stack(norms).mean())


def expected_lora(run) -> float:
    norms = []
    for m in run.model.modules():
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
            delta = (m.lora_B["default"].weight @ m.lora_A["default"].weight).detach()
            norms.append(torch.linalg.norm(delta * m.scaling["default"]))
    assert len(norms) == 12
    return float(torch.stack(norms).mean())


@pytest.mark.parametrize("method, expected", [("increlora", expected_increlora),
                                              ("lora", expected_lora)])
def test_update_norm_matches_the_adapter_weights(method, expected):
    run = build_method(tiny_classifier(0), settings(method))
    randomize_adapters(run, seed=1)
    run.model.train()
    norm = run.update_norm()
    assert norm == pytest.approx(expected(run), rel=1e-4) and norm > 0
    assert run.model.training, "update_norm must leave the model in the mode it found it in"


def test_update_norm_is_none_without_adapters():
    assert build_method(tiny_classifier(0), settings("full")).update_norm() is None
