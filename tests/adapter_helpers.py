"""Adapters that look trained, on conftest's hand-written TinyNet, for the save/load tests."""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from increlora_fast import IncreLoRAConfig, increlora_layers, inject_increlora
from increlora_fast.layer import IncreLoRALinear


def fresh(base: nn.Module, config: IncreLoRAConfig) -> nn.Module:
    """An injected copy of ``base`` (``base`` itself is left as it is)."""
    return inject_increlora(copy.deepcopy(base), config)


def trained(base: nn.Module, config: IncreLoRAConfig,
            grow: Callable[[int, IncreLoRALinear], None]) -> nn.Module:
    """An injected copy of ``base`` whose adapters and head look trained: ``grow(i, layer)``
    gives the i-th adapted layer its rank pattern, then its factors and lambda get random
    values, and so does the head's weight."""
    model = fresh(base, config)
    with torch.no_grad():
        for i, (_, layer) in enumerate(increlora_layers(model)):
            grow(i, layer)
            layer.lora_A.normal_(std=0.2)
            layer.lora_B.normal_(std=0.2)
            layer.lora_lambda.normal_()
        model.head.weight.normal_()
    return model


def tied_tiny_llama() -> nn.Module:
    """A 1-layer Llama (seed 7, eval mode) whose ``lm_head`` shares the input embedding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
        bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=True)).eval()
